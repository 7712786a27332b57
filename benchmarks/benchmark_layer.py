"""Speed of one TransformerFAM layer against BSWA and full causal attention.

Run once per backend:

    KERAS_BACKEND=jax python benchmarks/benchmark_layer.py [--quick]
        [--output results.json]

For the current backend it times, in the same run, three configurations of
the same `TransformerFAM` class on the same input:

- FAM: `block_size=256, memory_segments=1, fam_length=16`;
- BSWA: the same with `fam_length=0` (the paper's TransformerBSWA baseline);
- full causal attention: one block covering the whole sequence
  (`block_size=T, memory_segments=0, fam_length=0`), i.e. plain causal
  attention through the same kernel.

and prints the time ratios FAM / BSWA and FAM / full for the forward pass at
T = 2k, 8k, 32k and for forward+backward at 8k and 32k, as a markdown table
(and JSON with `--output`; `--cases fwd:8192 bwd:32768` picks rows,
`--kinds fam bswa` configurations, `--skip-paths` drops the second
table). A second table compares the two ways the layer can run whole blocks
in training, forward+backward at 2k and 8k:
`parallel_blocks=False` (the default loop over the fused block step) and
`parallel_blocks=True`. Width 256, 4 heads, feedforward 1024, batch 1, float32.
Functions are compiled (`jax.jit`, `tf.function(jit_compile=True)`; PyTorch
runs eagerly); the first two calls (compilation, warm-up) are not timed; the
compared configurations then run in turn `--repeats` rounds, the order
rotating by one each round (so a change in machine load hits all alike and
no configuration always follows the same one), each timing repeating its
step for at least half a second, and the median of each is reported. A
configuration whose attention would not fit in memory is reported as `OOM`
with the memory it asked for, instead of being run.

Shape letters: B batch, T sequence, D width, N heads.
"""

import argparse
import json
import os
import statistics
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

from keras_fam.layers.transformer_fam import TransformerFAM  # noqa: E402

WIDTH = 256
NUM_HEADS = 4
BLOCK_SIZE = 256
MEMORY_SEGMENTS = 1
FAM_LENGTH = 16
BATCH = 1
KINDS = ("fam", "bswa", "full")


def layer_config(kind, length):
    """Constructor arguments of one compared configuration."""
    config = {
        "num_heads": NUM_HEADS,
        "block_size": BLOCK_SIZE,
        "memory_segments": MEMORY_SEGMENTS,
        "fam_length": FAM_LENGTH,
    }
    if kind == "bswa":
        config["fam_length"] = 0
    elif kind == "full":
        config.update(block_size=length, memory_segments=0, fam_length=0)
    return config


def attention_bytes(config, length, backward):
    """Rough peak memory of the attention of one configuration.

    The dominant term is the `(B, N, T, K)` float32 logits/probabilities of
    one block step (a few live copies; more with the backward pass) plus the
    boolean masks.
    """
    size = config["block_size"]
    rows = config["fam_length"] + size
    keys = config["memory_segments"] * size + rows
    scores = BATCH * NUM_HEADS * rows * keys * 4
    copies = 6 if backward else 3
    return copies * scores + 2 * BATCH * rows * keys


def make_step(layer, x, backward):
    """A no-argument callable running one (compiled) pass to completion."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def forward(trainable, x):
            outputs, _ = layer.stateless_call(trainable, non_trainable, x)
            return outputs

        if backward:

            def loss(trainable, x):
                return jnp.mean(jnp.square(forward(trainable, x)))

            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        else:
            compiled = jax.jit(forward)
        return lambda: jax.block_until_ready(compiled(trainable, x))
    if backend == "tensorflow":
        import tensorflow as tf

        variables = layer.trainable_variables

        @tf.function(jit_compile=True)
        def compiled(x):
            if not backward:
                return layer(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(tf.square(layer(x)))
            return loss, tape.gradient(loss, [*variables, x])

        return lambda: tf.nest.map_structure(lambda t: t.numpy(), compiled(x))
    if backend == "torch":
        import torch

        if not backward:

            def step():
                with torch.no_grad():
                    return layer(x).sum().item()

            return step

        x = x.detach().requires_grad_(True)

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            loss = torch.mean(torch.square(layer(x)))
            loss.backward()
            return loss.item()

        return step
    raise ValueError(f"Unsupported backend: {backend}")


def prepare(kind, length, backward, memory_limit, parallel_blocks=False):
    """A warmed-up (compiled) step of one configuration, or a dict saying
    why it was not run."""
    config = layer_config(kind, length)
    config["parallel_blocks"] = parallel_blocks
    needed = attention_bytes(config, length, backward)
    if memory_limit is not None and needed > memory_limit:
        return {"oom": needed, "limit": memory_limit}
    keras.utils.set_random_seed(0)
    layer = TransformerFAM(**config)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0)
        .normal(size=(BATCH, length, WIDTH))
        .astype("float32")
    )
    layer.build(x.shape)
    try:
        step = make_step(layer, x, backward)
        step()  # Compilation and warm-up, not timed.
        return step
    except Exception as error:  # Allocation failures differ per backend.
        text = f"{type(error).__name__}: {error}"
        if "memory" in text.lower() or "resource" in text.lower():
            return {"oom": needed, "limit": memory_limit, "error": text[:200]}
        raise


def time_interleaved(steps, repeats, min_seconds=_common.MIN_SECONDS):
    """Median seconds per call of each step.

    Every step is warmed up once more (its first call, in `prepare`, also
    compiled it). Then `repeats` rounds time each step once, in an order
    that rotates by one step per round, so that no step always follows the
    same one (a large configuration evicts the CPU caches of the next) and
    a change in machine load hits all steps alike. Each timing repeats the
    step for at least `min_seconds` and divides by the number of calls, so
    a short step is not timed by one scheduler time slice. Entries that
    are not callables (OOM reports) are passed through.
    """
    times = _common.interleaved(
        {name: step for name, step in steps.items() if callable(step)},
        repeats,
        min_seconds,
    )
    return {
        name: statistics.median(times[name]) if name in times else step
        for name, step in steps.items()
    }


def format_time(result):
    if isinstance(result, dict) and result.get("skipped"):
        return "not run"
    if isinstance(result, dict):
        return f"OOM (asked ~{result['oom'] / 2**30:.1f} GiB)"
    return f"{result * 1e3:.1f}"


def ratio(a, b):
    if isinstance(a, dict) or isinstance(b, dict):
        return None
    return a / b


def format_ratio(value):
    return "n/a" if value is None else f"{value:.3f}"


def _log(text):
    print(text, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short sequences (1k, 2k) and 2 repeats: a smoke run",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", help="also write the results as JSON")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="skip (report OOM) configurations whose attention needs more; "
        "defaults to 80%% of the memory available now",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="rows to run, `fwd:T` or `bwd:T` (forward+backward); "
        "defaults to fwd 2k, 8k, 32k and bwd 8k, 32k",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="configurations to compare (default all three)",
    )
    parser.add_argument(
        "--skip-paths",
        action="store_true",
        help="skip the parallel_blocks table",
    )
    _common.add_torch_threads_argument(parser)
    args = parser.parse_args(argv)
    _common.set_torch_threads(args.torch_threads)
    if args.quick:
        cases = [(1024, False), (2048, False), (2048, True)]
        path_lengths = [1024]
        repeats = args.repeats or 2
    else:
        cases = [
            (2048, False),
            (8192, False),
            (32768, False),
            (8192, True),
            (32768, True),
        ]
        path_lengths = [2048, 8192]
        repeats = args.repeats or 5
    if args.cases:
        cases = []
        for case in args.cases:
            kind, length = case.split(":")
            if kind not in ("fwd", "bwd"):
                parser.error(f"--cases: `fwd:T` or `bwd:T`, not {case!r}")
            cases.append((int(length), kind == "bwd"))
    if args.skip_paths:
        path_lengths = []
    if args.memory_limit_gb is not None:
        memory_limit = int(args.memory_limit_gb * 2**30)
    else:
        memory_limit = int(0.8 * _common.available_bytes())

    backend = keras.backend.backend()
    rows = []
    for length, backward in cases:
        name = "forward+backward" if backward else "forward"
        steps = {
            kind: prepare(kind, length, backward, memory_limit)
            if kind in args.kinds
            else {"skipped": True}
            for kind in KINDS
        }
        times = time_interleaved(steps, repeats)
        del steps
        _log(f"  {backend} {name} T={length}: {times}")
        rows.append(
            {
                "pass": name,
                "length": length,
                "times_s": times,
                "fam_over_bswa": ratio(times["fam"], times["bswa"]),
                "fam_over_full": ratio(times["fam"], times["full"]),
            }
        )
    path_rows = []
    for length in path_lengths:
        steps = {
            parallel: prepare("fam", length, True, memory_limit, parallel)
            for parallel in (False, True)
        }
        times = time_interleaved(steps, repeats)
        del steps
        _log(f"  {backend} forward+backward T={length} paths: {times}")
        path_rows.append(
            {
                "pass": "forward+backward",
                "length": length,
                "times_s": {
                    "block_loop": times[False],
                    "parallel": times[True],
                },
                "parallel_over_block_loop": ratio(times[True], times[False]),
            }
        )

    print(
        f"\nBackend `{backend}`: width {WIDTH}, {NUM_HEADS} heads, block "
        f"{BLOCK_SIZE}, memory segments {MEMORY_SEGMENTS}, FAM length "
        f"{FAM_LENGTH}, batch {BATCH}; median of {repeats}, ms.\n"
    )
    print("| pass | T | FAM | BSWA | full causal | FAM / BSWA | FAM / full |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        times = row["times_s"]
        print(
            f"| {row['pass']} | {row['length']} | "
            f"{format_time(times['fam'])} | {format_time(times['bswa'])} | "
            f"{format_time(times['full'])} | "
            f"{format_ratio(row['fam_over_bswa'])} | "
            f"{format_ratio(row['fam_over_full'])} |"
        )
    if path_rows:
        print(
            "\nFAM training path, `parallel_blocks=True` (FAM rows looped, "
            "token attention batched) against the default block-step loop:\n"
        )
        print("| pass | T | block loop | parallel | parallel / block loop |")
        print("| --- | --- | --- | --- | --- |")
    for row in path_rows:
        times = row["times_s"]
        print(
            f"| {row['pass']} | {row['length']} | "
            f"{format_time(times['block_loop'])} | "
            f"{format_time(times['parallel'])} | "
            f"{format_ratio(row['parallel_over_block_loop'])} |"
        )
    if args.output:
        result = {
            "backend": backend,
            "config": {
                "width": WIDTH,
                "num_heads": NUM_HEADS,
                "block_size": BLOCK_SIZE,
                "memory_segments": MEMORY_SEGMENTS,
                "fam_length": FAM_LENGTH,
                "batch": BATCH,
                "repeats": repeats,
                "cpu_count": os.cpu_count(),
                "torch_threads": args.torch_threads,
            },
            "rows": rows,
            "training_path_rows": path_rows,
        }
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
