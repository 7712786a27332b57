"""Streaming throughput (tokens/s) of `FAMStreamer`, one backend per run.

    KERAS_BACKEND=jax python benchmarks/benchmark_streaming.py -o jax.json
    KERAS_BACKEND=tensorflow python benchmarks/benchmark_streaming.py \
        -o tf.json
    KERAS_BACKEND=torch python benchmarks/benchmark_streaming.py \
        --torch-threads 1 -o torch.json
    python benchmarks/benchmark_streaming.py --combine *.json

The model of `benchmark_generate.py` (width 256, 4 layers, 4 heads, gated
feedforward 1024, vocabulary 4096, `block_size=256, memory_segments=1,
fam_length=16`), batch 1, `FAMStreamer(lm, output="last_logits")` fed
`--tokens` random tokens (65,536; 16,384 with `--quick`) in one `feed`
call from a fresh state. A warm-up feed (compiling the streamer's steps) is
not timed; then `--repeats` rounds (5; 3 with `--quick`) time one feed per
`--blocks-per-step` setting, interleaved (each round starting one setting
later), and the median is reported as tokens/s. With `--token-steps N` a
second case times `N` single-token feeds (the streamer's one-token step,
as in generation or a stream split at arbitrary points).

Each backend runs in its own process; `--combine` reads the JSON files and
prints the table with every backend's ratio to JAX (target: TensorFlow and
PyTorch within 2x of JAX).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def measure(args):
    import keras
    import numpy as np

    from keras_fam.models import FAMStreamer

    _common.set_torch_threads(args.torch_threads)
    keras.utils.set_random_seed(0)
    lm = _common.fam_lm()
    rng = np.random.default_rng(0)
    tokens = args.tokens or (16384 if args.quick else 65536)
    repeats = args.repeats or (3 if args.quick else 5)
    ids = rng.integers(1, _common.SIZES["vocabulary_size"], (1, tokens))
    ids = ids.astype("int32")
    streamers, cases = {}, {}
    for blocks in args.blocks_per_step:
        streamer = FAMStreamer(lm, output="last_logits", blocks_per_step=blocks)
        streamers[blocks] = streamer

        def feed(streamer=streamer):
            streamer.reset()
            streamer.feed(ids, verbose=0)

        cases[f"blocks_per_step={blocks}"] = feed
    if args.token_steps:
        token_streamer = FAMStreamer(lm, output="last_logits")
        one = ids[:, : args.token_steps]

        def tokens_one_by_one():
            token_streamer.reset()
            for index in range(args.token_steps):
                token_streamer.feed(one[:, index : index + 1], verbose=0)

        cases[f"{args.token_steps} one-token feeds"] = tokens_one_by_one
    load_before = _common.load_average()
    times = _common.interleaved(cases, repeats, min_seconds=0)
    sizes = {key: tokens for key in cases}
    if args.token_steps:
        sizes[f"{args.token_steps} one-token feeds"] = args.token_steps
    results = {
        **_common.versions(),
        "tokens": tokens,
        "repeats": repeats,
        "torch_threads": args.torch_threads,
        "load_average": [load_before, _common.load_average()],
        "cases": {
            key: {
                "seconds": value,
                "tokens": sizes[key],
                "tokens_per_second": sizes[key] / _common.median(value),
            }
            for key, value in times.items()
        },
    }
    print(
        f"{results['backend']} {results['backend_version']}: "
        f"{tokens} tokens, median of {repeats}, load "
        f"{load_before} -> {results['load_average'][1]}"
    )
    for key, case in results["cases"].items():
        print(f"  {key}: {case['tokens_per_second']:.0f} tokens/s")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


def combine(paths):
    runs = []
    for path in paths:
        with open(path) as file:
            runs.append(json.load(file))
    reference = {
        key: case["tokens_per_second"]
        for run in runs
        if run["backend"] == "jax"
        for key, case in run["cases"].items()
    }
    print("| backend | case | tokens/s | / JAX |")
    print("|---|---|---:|---:|")
    for run in runs:
        name = f"{run['backend']} {run['backend_version']}"
        for key, case in run["cases"].items():
            speed = case["tokens_per_second"]
            ratio = f"{speed / reference[key]:.2f}" if key in reference else "-"
            print(f"| {name} | {key} | {speed:.0f} | {ratio} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--blocks-per-step", type=int, nargs="+", default=[64])
    parser.add_argument("--token-steps", type=int, default=0)
    parser.add_argument("-o", "--output", default=None, help="JSON file")
    parser.add_argument("--combine", nargs="+", metavar="JSON")
    _common.add_torch_threads_argument(parser)
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
    else:
        measure(args)


if __name__ == "__main__":
    main()
