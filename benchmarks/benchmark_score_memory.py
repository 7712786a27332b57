"""Peak memory of `FAMCausalLM.score` against the document length.

Each length is scored in a fresh subprocess (so that one measurement cannot
inherit another's allocations); the child builds a small FAM language model
(`_common.SMALL_CONFIG`, shared with `benchmark_soak.py`),
scores one warm-up block, then scores a random document of the given length
in `"loss"` mode, and reports its peak resident set size (`ru_maxrss`). The
parent prints each peak relative to the shortest length's.

`score` streams the document chunk by chunk through the backbone's
fixed-size state, so only the token ids and the per-token losses (4 bytes a
token each) grow with the length: the target is a 64k-token document within
1.1x the peak of an 8k-token one.

Usage:
    KERAS_BACKEND=jax python benchmarks/benchmark_score_memory.py
    KERAS_BACKEND=torch python benchmarks/benchmark_score_memory.py \
        --lengths 8192 65536
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SMALL_CONFIG as CONFIG  # noqa: E402


def child(length):
    import resource

    import numpy as np

    from keras_fam.models import FAMBackbone, FAMCausalLM

    lm = FAMCausalLM(FAMBackbone(**CONFIG))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG["vocabulary_size"], (1, length + 1))
    ids = ids.astype("int32")
    # Warm-up: everything that does not depend on the length is allocated.
    lm.score(ids[:, :256], scoring_mode="loss", target_ids=ids[:, 1:257])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    losses = lm.score(ids[:, :-1], scoring_mode="loss", target_ids=ids[:, 1:])
    seconds = time.perf_counter() - start
    assert tuple(losses.shape) == (1, length)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "length": length,
                "peak_kib": peak,
                "warm_peak_kib": before,
                "seconds": seconds,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = []
    for length in args.lengths:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(length)],
            capture_output=True,
            text=True,
            env=os.environ,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]["peak_kib"]
    print(f"backend: {os.environ.get('KERAS_BACKEND', 'jax')}")
    print("tokens    peak RSS (MiB)   vs first   score time (s)")
    for result in results:
        print(
            f"{result['length']:>6}    {result['peak_kib'] / 1024:>14.0f}"
            f"   {result['peak_kib'] / base:>8.3f}"
            f"   {result['seconds']:>14.1f}"
        )


if __name__ == "__main__":
    main()
