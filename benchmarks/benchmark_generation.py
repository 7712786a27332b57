"""Generation latency and streaming memory of FAMCausalLM, with KerasHub's
Llama as the anchor.

Run once per backend:

    KERAS_BACKEND=jax python benchmarks/benchmark_generation.py [--quick]
        [--output results.json]

Three measurements, side by side in one run, printed as markdown tables:

1. Per-token generation latency at positions 1k, 8k and 32k (and the ratio
   to 1k) of a small `FAMCausalLM` (width 256, 4 layers, 4 heads, gated
   feedforward 1024, vocabulary 4096, `block_size=256, memory_segments=1,
   fam_length=16`). The model is brought to each position through its
   streaming state: random token ids are prefilled with
   `FAMBackbone.prefill_blocks` (compiled, 1024 tokens per call, the same
   state carried on), then `steps` greedy single-token steps of
   `FAMCausalLM.call_with_cache` (the function `generate()` compiles) run
   inside one compiled loop from that state. `steps` equals `block_size`,
   so every timed loop crosses one block boundary and pays one FAM update.
2. The anchor: KerasHub's `LlamaCausalLM` of the same size (same width,
   layers, heads, feedforward and vocabulary), timed the same way through
   its own `call_with_cache` (the function its `generate()` compiles) in a
   compiled loop of `min(block_size, 32)` steps (its per-token cost does not
   depend on block boundaries). A KerasHub cache holds every position up to
   `max_length`, so at position P the cache has `P + steps + 1` slots; its
   contents do not change the cost, so it is allocated as zeros instead of
   being prefilled (KerasHub's prefill attends over the whole prompt at
   once: `4 * heads * P^2` bytes of attention scores per layer, 17 GB at
   32k). If the cache would not fit in memory, the row says `OOM`.

   Timing: every case (model x position) is compiled and run twice
   untimed, then `--repeats` rounds time each case once, always from its
   own start state (the loops are pure functions of it; each measurement
   repeats its loop for at least half a second), interleaved (each
   round starting one case later) so that load from other processes falls
   on all cases alike; the best round,
   divided by `steps`, is reported (the JSON output has the medians too).
3. Peak memory of streaming 1M tokens vs 16k tokens (128k vs 16k with
   `--quick`) through a tiny FAM model (width 64, 2 layers, block 256), one
   subprocess per run: token ids are drawn chunk by chunk (nothing grows with
   the stream), fed through the compiled block prefill with one fixed-size
   state, and the process's peak resident set size (`ru_maxrss`) is
   reported with its ratio (target <= 1.05). That peak is usually reached
   while compiling, so the resident set size is also sampled after every
   chunk: its maximum while streaming, against its value after the first
   chunk, shows whether anything grows with the stream. A progress bar
   shows the stream.

Functions are compiled with `jax.jit` (JAX, variables passed through a
`keras.StatelessScope`) or `tf.function(jit_compile=True)` (TensorFlow);
PyTorch runs eagerly under `torch.no_grad()`. The first call of each
function (compilation) is not timed. `--quick` uses a width-64, 2-layer
model (block 64) and shorter runs, for CI smoke tests.

Shape letters: B batch, T tokens, L layers, P position.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
from keras import ops

from keras_fam.models import FAMBackbone, FAMCausalLM

POSITIONS = (1024, 8192, 32768)
MEMORY_CHUNK_BLOCKS = 16
LLAMA_STEPS = 32
PREFILL_CHUNK = 1024  # tokens per compiled prefill call; divides POSITIONS
MIN_SECONDS = 0.5


def model_sizes(quick):
    """Shared size of the FAM model and its Llama anchor."""
    if quick:
        return dict(
            vocabulary_size=1024,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            intermediate_dim=256,
        )
    return dict(
        vocabulary_size=4096,
        num_layers=4,
        num_heads=4,
        hidden_dim=256,
        intermediate_dim=1024,
    )


def fam_lm(quick):
    return FAMCausalLM(
        FAMBackbone(
            **model_sizes(quick),
            block_size=64 if quick else 256,
            memory_segments=1,
            fam_length=16,
        )
    )


def memory_lm():
    """The tiny model streamed through in the memory runs."""
    return FAMCausalLM(
        FAMBackbone(
            vocabulary_size=1024,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            intermediate_dim=256,
            block_size=256,
            memory_segments=1,
            fam_length=16,
        )
    )


def llama_lm(quick):
    import keras_hub

    sizes = model_sizes(quick)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=sizes["vocabulary_size"],
        num_layers=sizes["num_layers"],
        num_query_heads=sizes["num_heads"],
        num_key_value_heads=sizes["num_heads"],
        hidden_dim=sizes["hidden_dim"],
        intermediate_dim=sizes["intermediate_dim"],
    )
    return keras_hub.models.LlamaCausalLM(backbone)


# === Compilation, per backend ===


def compile_function(model, function):
    """`function(*args)` compiled for the current backend, reading the
    variables of `model`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        variables = model.variables

        def pure(values, *args):
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                return function(*args)

        jitted = jax.jit(pure)
        return lambda *args: jitted([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    import torch

    def eager(*args):
        with torch.no_grad():
            return function(*args)

    return eager


def block_until_ready(tree):
    """Wait until every array of `tree` is computed (JAX dispatches
    asynchronously; TensorFlow and PyTorch on CPU return finished
    tensors)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(tree)
    return tree


# === Latency ===


def greedy_loop(step, steps):
    """A function running `steps` greedy single-token steps of `step`
    (`(token, carry) -> (logits, carry)`) in one loop."""

    def run(token, carry):
        def body(_, loop):
            token, carry = loop
            logits, carry = step(token, carry)
            token = ops.cast(ops.argmax(logits[:, -1], axis=-1), "int32")
            return token[:, None], carry

        return ops.fori_loop(0, steps, body, (token, carry))

    return run


def fam_cases(lm, positions, seed=0):
    """One `(name, position, steps, run, token, carry)` case per position:
    the streaming state prefilled to the position and the compiled greedy
    loop of `steps = block_size` steps from it."""
    backbone = lm.backbone
    size = backbone.block_size
    chunk = PREFILL_CHUNK
    chunk_blocks = chunk // size
    prefill = compile_function(
        lm,
        lambda ids, state: backbone.prefill_blocks(ids, state, chunk_blocks),
    )

    def step(token, state):
        logits, _, state = lm.call_with_cache(token, state)
        return logits, state

    run = compile_function(lm, greedy_loop(step, size))
    rng = np.random.default_rng(seed)
    state = backbone.get_initial_state(1)
    position, cases = 0, []
    for target in positions:
        while position < target:
            ids = rng.integers(0, backbone.vocabulary_size, (1, chunk))
            state = prefill(ids.astype("int32"), state)
            position += chunk
        index = int(ops.convert_to_numpy(state[0]["index"]))
        assert index == target, (index, target)
        token = np.ones((1, 1), "int32")
        cases.append(("FAM", target, size, run, token, state))
    return cases


def llama_cases(lm, positions, steps):
    """The same for KerasHub's Llama through its own `call_with_cache`
    (`steps` greedy steps per loop), from a zero cache of the length a
    `generate()` call reaching the position would allocate. Returns
    `(cases, skipped)`; `skipped` maps a position to why it was not run."""
    backbone = lm.backbone
    num_layers = backbone.num_layers
    heads = backbone.num_key_value_heads
    head_dim = backbone.hidden_dim // backbone.num_query_heads
    cases, skipped = [], {}
    for position in positions:
        length = position + steps + 1
        nbytes = 2 * num_layers * length * heads * head_dim * 4
        if 3 * nbytes > available_bytes():
            skipped[position] = f"OOM (cache {nbytes / 2**30:.1f} GiB)"
            continue

        def step(token, carry):
            cache, index = carry
            logits, _, cache = lm.call_with_cache(token, cache, index)
            return logits, (cache, index + 1)

        run = compile_function(lm, greedy_loop(step, steps))
        cache = ops.zeros((1, num_layers, 2, length, heads, head_dim))
        carry = (cache, ops.convert_to_tensor(position, "int32"))
        token = np.ones((1, 1), "int32")
        cases.append(("Llama", position, steps, run, token, carry))
    return cases, skipped


def time_cases(cases, repeats):
    """Seconds per token of each case: compile and warm up every case
    (untimed), then `repeats` rounds that time each case once, always from
    its own start state, so that load from other processes spreads over
    all cases alike. Returns `{(name, position): (min, median)}`."""
    for name, position, _, run, token, carry in cases:
        for _ in range(2):
            block_until_ready(run(token, carry))
        print(f"  compiled {name} at {position}", flush=True)
    times = {(name, position): [] for name, position, *_ in cases}
    for turn in range(repeats):
        # Each round starts one case later, so that no case always follows
        # the same one (a large Llama cache evicts the CPU caches).
        shift = turn % len(cases)
        for name, position, steps, run, token, carry in (
            cases[shift:] + cases[:shift]
        ):
            # Repeat the loop for at least MIN_SECONDS: a short loop would
            # be timed by the scheduler's time slices on a busy machine.
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < MIN_SECONDS:
                block_until_ready(run(token, carry))
                calls += 1
            elapsed = time.perf_counter() - start
            times[name, position].append(elapsed / (calls * steps))
    for name, position, _, _, _, carry in cases:
        if name == "FAM":  # The start state was not modified in place.
            index = int(ops.convert_to_numpy(carry[0]["index"]))
            assert index == position, (index, position)
    return {
        key: (min(values), statistics.median(values))
        for key, values in times.items()
    }


def available_bytes():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30


# === Streaming memory ===


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes():
    """Resident set size now (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_run(tokens, output):
    """Child process: stream `tokens` tokens through `memory_lm()` chunk by
    chunk with one state; write peak RSS figures to `output` (JSON)."""
    lm = memory_lm()
    backbone = lm.backbone
    size = backbone.block_size
    chunk = MEMORY_CHUNK_BLOCKS * size
    if tokens % chunk:
        raise ValueError(
            f"`tokens` must be a multiple of {chunk}. Received: {tokens}"
        )
    prefill = compile_function(
        lm,
        lambda ids, state: backbone.prefill_blocks(
            ids, state, MEMORY_CHUNK_BLOCKS
        ),
    )
    rng = np.random.default_rng(0)
    state = backbone.get_initial_state(1)
    progress = keras.utils.Progbar(tokens, unit_name="token")
    after_first_chunk = None
    streaming_rss = []
    start = time.perf_counter()
    for position in range(0, tokens, chunk):
        ids = rng.integers(0, backbone.vocabulary_size, (1, chunk))
        state = prefill(ids.astype("int32"), state)
        block_until_ready(state[0]["index"])
        if after_first_chunk is None:
            after_first_chunk = peak_rss_bytes()
        streaming_rss.append(current_rss_bytes())
        progress.update(position + chunk)
    seconds = time.perf_counter() - start
    index = int(ops.convert_to_numpy(state[0]["index"]))
    assert index == tokens, (index, tokens)
    state_bytes = sum(
        int(np.prod(value.shape))
        * np.dtype(keras.backend.standardize_dtype(value.dtype)).itemsize
        for layer in state
        for value in layer.values()
    )
    with open(output, "w") as file:
        json.dump(
            {
                "tokens": tokens,
                "peak_rss": peak_rss_bytes(),
                "peak_rss_after_first_chunk": after_first_chunk,
                "rss_after_first_chunk": streaming_rss[0],
                "max_rss_while_streaming": max(streaming_rss),
                "seconds": seconds,
                "state_bytes": state_bytes,
            },
            file,
        )


def memory_compare(lengths):
    """Peak RSS of one subprocess per stream length."""
    results = {}
    for tokens in lengths:
        with tempfile.TemporaryDirectory() as folder:
            output = os.path.join(folder, "memory.json")
            print(f"  streaming {tokens} tokens (subprocess)", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--memory-run", str(tokens), output],
                check=True,
            )
            with open(output) as file:
                results[tokens] = json.load(file)
        print(flush=True)
    return results


# === Report ===


def format_seconds(value):
    return value if isinstance(value, str) else f"{1e3 * value:.3f}"


def format_ratio(value, reference):
    if isinstance(value, str) or isinstance(reference, str):
        return "-"
    return f"{value / reference:.2f}"


def latency_table(fam, llama, positions):
    lines = [
        "| position | FAM ms/token | FAM ratio to 1k | Llama ms/token "
        "| Llama ratio to 1k | Llama / FAM |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    first = positions[0]
    for position in positions:
        lines.append(
            f"| {position} | {format_seconds(fam[position])} "
            f"| {format_ratio(fam[position], fam[first])} "
            f"| {format_seconds(llama[position])} "
            f"| {format_ratio(llama[position], llama[first])} "
            f"| {format_ratio(llama[position], fam[position])} |"
        )
    return "\n".join(lines)


def memory_table(memory):
    lengths = sorted(memory)
    short, long = memory[lengths[0]], memory[lengths[-1]]
    mib = 2**20
    lines = [
        "| tokens streamed | peak RSS MiB | RSS after 1st chunk MiB "
        "| max RSS while streaming MiB | state KiB | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens in lengths:
        run = memory[tokens]
        lines.append(
            f"| {tokens} | {run['peak_rss'] / mib:.1f} "
            f"| {run['rss_after_first_chunk'] / mib:.1f} "
            f"| {run['max_rss_while_streaming'] / mib:.1f} "
            f"| {run['state_bytes'] / 2**10:.1f} "
            f"| {run['tokens'] / run['seconds']:.0f} |"
        )
    ratio = long["peak_rss"] / short["peak_rss"]
    streaming_ratio = (
        long["max_rss_while_streaming"] / short["max_rss_while_streaming"]
    )
    lines.append("")
    lines.append(
        f"Peak RSS ratio {lengths[-1]} / {lengths[0]} tokens: {ratio:.3f} "
        f"(target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'}); "
        f"max RSS while streaming, same ratio: {streaming_ratio:.3f}."
    )
    return "\n".join(lines), ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", default=None, help="JSON results file")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-run", nargs=2, metavar=("TOKENS", "OUTPUT"), help="internal"
    )
    args = parser.parse_args()
    if args.memory_run:
        memory_run(int(args.memory_run[0]), args.memory_run[1])
        return
    keras.utils.set_random_seed(0)
    repeats = args.repeats or (5 if args.quick else 3)
    backend = keras.backend.backend()
    print(f"Backend: {backend}; quick: {args.quick}", flush=True)

    lm = fam_lm(args.quick)
    steps = lm.backbone.block_size
    llama_steps = min(steps, LLAMA_STEPS)
    cases = fam_cases(lm, POSITIONS)
    skipped = {position: "skipped" for position in POSITIONS}
    if not args.skip_llama:
        more, skipped = llama_cases(
            llama_lm(args.quick), POSITIONS, llama_steps
        )
        cases += more
    timed = time_cases(cases, repeats)
    fam = {p: timed["FAM", p][0] for p in POSITIONS}
    llama = {
        p: timed.get(("Llama", p), (skipped.get(p),))[0] for p in POSITIONS
    }
    report = [
        f"Per-token greedy generation latency ({backend}, "
        f"{'quick' if args.quick else 'full'} size; best of {repeats} "
        f"interleaved loops of {steps} (FAM) / {llama_steps} (Llama) "
        "tokens from each position):",
        "",
        latency_table(fam, llama, POSITIONS),
    ]
    results = {
        "backend": backend,
        "quick": args.quick,
        "fam_seconds_per_token": fam,
        "llama_seconds_per_token": llama,
        "min_and_median": {f"{k[0]}@{k[1]}": v for k, v in timed.items()},
    }
    if not args.skip_memory:
        lengths = (16384, 131072) if args.quick else (16384, 1048576)
        memory = memory_compare(lengths)
        table, ratio = memory_table(memory)
        report += ["", "Streaming memory (tiny FAM model):", "", table]
        results["memory"] = memory
        results["memory_ratio"] = ratio
    print("\n".join(report))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
