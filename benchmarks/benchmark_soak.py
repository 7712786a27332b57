"""Soak test: a long token stream through a small FAM model, as users stream.

The documented loop, on the current backend, outside `torch.no_grad()`:

    state = backbone.get_initial_state(batch_size)
    for chunk in stream:
        hidden, state = backbone.stream(chunk, state)

(`FAMBackbone.stream` runs each layer's `layer(x, state=state,
return_state=True)`, the README's layer loop.) Every `--tokens` run goes in
a fresh subprocess per dtype (`float32`, then `bfloat16`), so the peak
resident memory (`ru_maxrss`) of one does not hide the other's. Reported at
`--checkpoint` tokens (default 16k) and at the end (default 1M): peak RSS,
tokens/s over the last `--window` tokens before each point, the carried
FAM's largest magnitude, and whether the whole state is finite. Targets
(issue 11): end / checkpoint memory <= 1.05, flat speed.

Model (`_common.SMALL_CONFIG`, shared with `benchmark_score_memory.py`): 2
layers, width 64, 4 heads, vocabulary 256, block 128, 1 memory segment, 8
FAM vectors (`--fam-normalization` to switch it on), batch 1,
random weights and tokens, chunks of `--chunk` tokens.

    KERAS_BACKEND=jax python benchmarks/benchmark_soak.py
    KERAS_BACKEND=torch python benchmarks/benchmark_soak.py --tokens 65536
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SMALL_CONFIG  # noqa: E402


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    import keras
    from keras import ops
    from tqdm import tqdm

    from keras_fam.models import FAMBackbone

    if keras.backend.backend() == "torch" and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    keras.utils.set_random_seed(0)
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[args.dtype]
    backbone = FAMBackbone(
        **SMALL_CONFIG,
        fam_normalization=args.fam_normalization,
        dtype=policy,
    )
    rng = np.random.default_rng(0)
    state = backbone.get_initial_state(1)
    points = sorted({args.checkpoint, args.tokens})
    results, marks = [], {}
    start_time = time.perf_counter()
    bar = tqdm(
        total=args.tokens,
        unit="tok",
        unit_scale=True,
        desc=f"{keras.backend.backend()} {args.dtype}",
        file=sys.stderr,
        mininterval=2.0,
    )
    fed = 0
    while fed < args.tokens:
        ids = rng.integers(
            0, SMALL_CONFIG["vocabulary_size"], (1, args.chunk)
        ).astype("int32")
        hidden, state = backbone.stream(ids, state)
        fed += args.chunk
        bar.update(args.chunk)
        marks[fed] = time.perf_counter()
        if fed in points:
            window_start = marks.get(fed - args.window)
            tokens_per_second = (
                args.window / (marks[fed] - window_start)
                if window_start is not None
                else float("nan")
            )
            fams = [ops.convert_to_numpy(layer["fam"]) for layer in state]
            finite = all(
                np.all(
                    np.isfinite(ops.convert_to_numpy(ops.cast(v, "float32")))
                )
                for layer in state
                for name, v in layer.items()
                if name not in ("memory_mask", "block_mask")
            )
            results.append(
                {
                    "tokens": fed,
                    "peak_rss_mib": peak_rss_mib(),
                    "tokens_per_second": tokens_per_second,
                    "fam_max_abs": float(max(np.abs(f).max() for f in fams)),
                    "fam_dtype": str(fams[0].dtype),
                    "state_finite": bool(finite),
                    "position": int(ops.convert_to_numpy(state[0]["index"])),
                    "seconds": marks[fed] - start_time,
                }
            )
        # Keep only the marks a later window needs.
        marks.pop(fed - args.window - args.chunk, None)
    bar.close()
    del hidden
    print(json.dumps(results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--checkpoint", type=int, default=1 << 14)
    parser.add_argument("--window", type=int, default=1 << 13)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
    )
    parser.add_argument("--fam-normalization", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("tokens", "checkpoint", "window", "chunk"):
        if getattr(args, name) % args.chunk and name != "chunk":
            parser.error(f"--{name} must be a multiple of --chunk")
    if args.checkpoint > args.tokens or args.window > args.checkpoint:
        parser.error("need --window <= --checkpoint <= --tokens")
    if args.worker:
        args.dtype = args.worker
        worker(args)
        return
    backend = os.environ.get("KERAS_BACKEND", "jax")
    rows = []
    print(
        f"| backend | dtype | peak RSS at {args.checkpoint} (MiB) | at "
        f"{args.tokens} | ratio | tok/s at {args.checkpoint} | at "
        f"{args.tokens} | ratio | FAM max abs | FAM dtype | finite | time |"
    )
    print("|---" * 12 + "|")
    for dtype in args.dtypes:
        command = [sys.executable, __file__, "--worker", dtype]
        for name in ("tokens", "checkpoint", "window", "chunk"):
            command += [f"--{name}", str(getattr(args, name))]
        command += ["--torch-threads", str(args.torch_threads)]
        if args.fam_normalization:
            command.append("--fam-normalization")
        output = subprocess.run(
            command, check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        points = json.loads(output.strip().splitlines()[-1])
        first, last = points[0], points[-1]
        rows.append({"backend": backend, "dtype": dtype, "at": [first, last]})
        print(
            f"| {backend} | {dtype} | {first['peak_rss_mib']:.0f} | "
            f"{last['peak_rss_mib']:.0f} | "
            f"{last['peak_rss_mib'] / first['peak_rss_mib']:.3f} | "
            f"{first['tokens_per_second']:.0f} | "
            f"{last['tokens_per_second']:.0f} | "
            f"{last['tokens_per_second'] / first['tokens_per_second']:.2f} | "
            f"{first['fam_max_abs']:.3g} -> {last['fam_max_abs']:.3g} | "
            f"{last['fam_dtype']} | {last['state_finite']} | "
            f"{last['seconds']:.0f} s |",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
