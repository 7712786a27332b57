"""End-to-end `generate()` of FAMCausalLM against KerasHub's LlamaCausalLM.

Run once per backend:

    KERAS_BACKEND=jax python benchmarks/benchmark_generate.py [--quick]
        [--prompts 1024 8192 32768] [--repeats 5] [--output results.json]

What a user sees: `model.generate(prompt, stop_token_ids=None)` with a
greedy sampler, batch 1, a prompt of P random tokens followed by
`--new-tokens` (64) generated ones, timed from the call to its return. The
FAM model (width 256, 4 layers, 4 heads, gated feedforward 1024, vocabulary
4096, `block_size=256, memory_segments=1, fam_length=16`) and KerasHub's
Llama of the same size run the same prompt, both without a preprocessor
(token ids padded to `P + new_tokens`, as KerasHub's preprocessor would
pad them). Each model's `generate` is compiled the way KerasHub compiles
it (`jax.jit`, `tf.function(jit_compile=True)`, PyTorch eager under
`torch.no_grad()`): the first call per prompt length compiles and is not
timed; then `--repeats` rounds time each case once, interleaved (each
round starts one case later) so that load from other processes falls on
all cases alike, and the median per case is reported with the ratio
FAM / KerasHub. KerasHub's prefill materialises `4 * heads * P^2` bytes of
attention scores per layer (17 GiB at 32k); a Llama case that would not
fit in memory is reported as `OOM`.

A second table gives FAM's per-token cost at each prompt length, from the
same interleaved rounds: (time of `P + new_tokens`) minus (time of
`P + 1`, prefill and one token) over `new_tokens - 1`. Flat means the
per-token cost does not grow with the position.

On a CPU shared with other processes, PyTorch's intra-op threads stall at
every eager op's barrier (a 2-core machine at load 6 made one FAM decoding
step 10x slower with 2 threads than with 1, KerasHub's alike); pass
`--torch-threads 1` there.

`--quick`: prompts (1024,) only and 3 repeats (a smoke run; the model size
stays that of the issue).

Shape letters: B batch, P prompt length.
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np

from keras_fam.models import FAMBackbone, FAMCausalLM

PROMPTS = (1024, 8192, 32768)
SIZES = dict(
    vocabulary_size=4096,
    num_layers=4,
    num_heads=4,
    hidden_dim=256,
    intermediate_dim=1024,
)


def fam_lm():
    return FAMCausalLM(
        FAMBackbone(**SIZES, block_size=256, memory_segments=1, fam_length=16)
    )


def llama_lm():
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=SIZES["vocabulary_size"],
        num_layers=SIZES["num_layers"],
        num_query_heads=SIZES["num_heads"],
        num_key_value_heads=SIZES["num_heads"],
        hidden_dim=SIZES["hidden_dim"],
        intermediate_dim=SIZES["intermediate_dim"],
    )
    return keras_hub.models.LlamaCausalLM(backbone)


def prompt(length, total, seed=0):
    """Token ids `(1, total)` whose first `length` are the prompt."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, total), "int32")
    ids[0, :length] = rng.integers(1, SIZES["vocabulary_size"], length)
    mask = np.zeros((1, total), bool)
    mask[0, :length] = True
    return {"token_ids": ids, "padding_mask": mask}


def available_bytes():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30


def llama_fits(length):
    scores = 4 * SIZES["num_heads"] * length**2
    return 3 * scores < available_bytes()


def run_case(lm, inputs):
    out = lm.generate(inputs, stop_token_ids=None)
    return out["token_ids"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--no-per-token",
        action="store_true",
        help="skip the P + 1 cases (per-token table)",
    )
    parser.add_argument("--output", default=None, help="JSON results file")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads (`torch.set_num_threads`, both "
        "models); 1 avoids thread-barrier stalls of eager ops on an "
        "oversubscribed CPU",
    )
    args = parser.parse_args()
    if args.torch_threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.torch_threads)
    prompts = args.prompts or ((1024,) if args.quick else PROMPTS)
    repeats = args.repeats or (3 if args.quick else 5)
    new = args.new_tokens
    backend = keras.backend.backend()
    print(f"Backend: {backend}; prompts {prompts}; {new} new tokens")
    keras.utils.set_random_seed(0)
    fam = fam_lm()
    llama = None if args.skip_llama else llama_lm()
    cases, skipped = [], {}
    for length in prompts:
        cases.append(("FAM", length, new, fam, prompt(length, length + new)))
        if not args.no_per_token:
            cases.append(("FAM", length, 1, fam, prompt(length, length + 1)))
        if llama is None:
            continue
        if llama_fits(length):
            inputs = prompt(length, length + new)
            cases.append(("KerasHub", length, new, llama, inputs))
        else:
            skipped[length] = "OOM"
    for name, length, steps, lm, inputs in cases:
        start = time.perf_counter()
        run_case(lm, inputs)
        print(
            f"  first call {name} P={length} +{steps}: "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
    times = {case[:3]: [] for case in cases}
    for turn in range(repeats):
        shift = turn % len(cases)
        for name, length, steps, lm, inputs in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            run_case(lm, inputs)
            times[name, length, steps].append(time.perf_counter() - start)
    median = {key: statistics.median(value) for key, value in times.items()}
    lines = [
        f"End-to-end greedy generate, {backend}, batch 1, {new} new tokens; "
        f"median of {repeats} interleaved calls (seconds):",
        "",
        "| prompt | FAM s | KerasHub s | FAM / KerasHub |",
        "|---:|---:|---:|---:|",
    ]
    results = {"backend": backend, "new_tokens": new, "cases": {}}
    for length in prompts:
        fam_time = median["FAM", length, new]
        hub = median.get(("KerasHub", length, new))
        hub_text = f"{hub:.3f}" if hub else skipped.get(length, "skipped")
        ratio = f"{fam_time / hub:.2f}" if hub else "-"
        lines.append(f"| {length} | {fam_time:.3f} | {hub_text} | {ratio} |")
    if not args.no_per_token:
        lines += [
            "",
            "FAM per generated token (ms): (t(P + new) - t(P + 1)) / "
            "(new - 1):",
            "",
            "| prompt | ms/token | ratio to first prompt |",
            "|---:|---:|---:|",
        ]
        first = None
        for length in prompts:
            per_token = (
                median["FAM", length, new] - median["FAM", length, 1]
            ) / (new - 1)
            first = first or per_token
            lines.append(
                f"| {length} | {1e3 * per_token:.2f} "
                f"| {per_token / first:.2f} |"
            )
    for (name, length, steps), value in times.items():
        results["cases"][f"{name}@{length}+{steps}"] = value
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
