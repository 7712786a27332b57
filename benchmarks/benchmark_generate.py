"""Generation speed of FAMCausalLM against KerasHub's LlamaCausalLM:
end-to-end `generate()` and per-token cost against the position.

Run once per backend:

    KERAS_BACKEND=jax python benchmarks/benchmark_generate.py [--quick]
        [--prompts 1024 8192 32768] [--positions 1024 8192 32768]
        [--repeats 3] [--output results.json] [--torch-threads 1]

Both models have the size of issue 12: width 256, 4 layers, 4 heads, gated
feedforward 1024, vocabulary 4096; FAM with `block_size=256,
memory_segments=1, fam_length=16` (`_common.py` holds the sizes).

1. End-to-end `generate()` as a user calls it:
   `model.generate(prompt, stop_token_ids=None)`, greedy, batch 1, a prompt
   of P random tokens followed by `--new-tokens` (64) generated ones, timed
   from the call to its return. Both models run without a preprocessor
   (token ids padded to `P + new_tokens`, as KerasHub's preprocessor would
   pad them); each model's `generate` is compiled by its own
   `make_generate_function`, as a user gets it: `jax.jit`; on TensorFlow
   `tf.function` with XLA for FAM and with the model's `jit_compile` for
   KerasHub (Keras' `"auto"`: no XLA on a CPU-only machine); PyTorch eager
   under `torch.no_grad()`. KerasHub's prefill materialises `4 * heads * P^2`
   bytes of attention scores per layer (17 GiB at 32k); a Llama case that
   would not fit in memory is reported as `OOM` with that size.
2. Per-token cost against the position (`--positions`): each model is
   brought to position P and then runs greedy single-token steps of its
   `call_with_cache` (the function its `generate()` compiles) in one
   compiled loop. FAM is brought there through its streaming state
   (`FAMBackbone.prefill_blocks`, 1,024 random tokens per compiled call)
   and loops `block_size` steps, so every timed loop crosses one block
   boundary and pays one FAM update. KerasHub's Llama loops 32 steps from a
   zero cache of `P + 33` slots (its contents do not change the cost;
   filling it would need its quadratic prefill). Flat means the per-token
   cost does not grow with P: the table gives ms/token and the ratio to the
   first position.

Timing (both parts): the first call of every case compiles and is not
timed; then `--repeats` rounds time every case once, interleaved (each
round starts one case later, so that load from other processes falls on
all cases alike), and the median per case is reported. A per-token timing
repeats its loop for at least half a second.

On a CPU shared with other processes, PyTorch's intra-op threads stall at
every eager op's barrier (a 2-core machine at load 6 made one FAM decoding
step 10x slower with 2 threads than with 1, KerasHub's alike); pass
`--torch-threads 1` there.

`--quick`: prompt and position 1024 only, 3 repeats (a smoke run; the model
size stays that of the issue).

Shape letters: B batch, P prompt length or position.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

LENGTHS = (1024, 8192, 32768)
PREFILL_CHUNK = 1024  # tokens per compiled prefill call; divides positions
LLAMA_STEPS = 32


def prompt(length, total, seed=0):
    """Token ids `(1, total)` whose first `length` are the prompt."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, total), "int32")
    ids[0, :length] = rng.integers(1, _common.SIZES["vocabulary_size"], length)
    mask = np.zeros((1, total), bool)
    mask[0, :length] = True
    return {"token_ids": ids, "padding_mask": mask}


def llama_prefill_bytes(length):
    """Attention scores of KerasHub's prefill for one layer (float32)."""
    return 4 * _common.SIZES["num_heads"] * length**2


# === 1. End-to-end generate ===


def generate_cases(fam, llama, prompts, new):
    cases, skipped = {}, {}
    for length in prompts:
        inputs = prompt(length, length + new)

        def run(lm=fam, inputs=inputs):
            lm.generate(inputs, stop_token_ids=None)

        cases["FAM", length] = run
        if llama is None:
            skipped[length] = "skipped"
            continue
        asked = llama_prefill_bytes(length)
        if 3 * asked > _common.available_bytes():
            skipped[length] = f"OOM (asks ~{asked / 2**30:.0f} GiB)"
            continue

        def run(lm=llama, inputs=inputs):
            lm.generate(inputs, stop_token_ids=None)

        cases["KerasHub", length] = run
    return cases, skipped


# === 2. Per-token cost against the position ===


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


def fam_token_cases(lm, positions, seed=0):
    """`{("FAM", P): (steps, fn)}`: the streaming state prefilled to each
    position and the compiled greedy loop of `block_size` steps from it."""
    backbone = lm.backbone
    size = backbone.block_size
    prefill = _common.compile_function(
        lm,
        lambda ids, state: backbone.prefill_blocks(
            ids, state, PREFILL_CHUNK // size
        ),
    )

    def step(token, state):
        logits, _, state = lm.call_with_cache(token, state)
        return logits, state

    loop = _common.compile_function(lm, greedy_loop(step, size))
    rng = np.random.default_rng(seed)
    state = backbone.get_initial_state(1)
    position, cases = 0, {}
    token = np.ones((1, 1), "int32")
    for target in sorted(positions):
        while position < target:
            ids = rng.integers(0, backbone.vocabulary_size, (1, PREFILL_CHUNK))
            state = prefill(ids.astype("int32"), state)
            position += PREFILL_CHUNK
        index = int(ops.convert_to_numpy(state[0]["index"]))
        assert index == target, (index, target)

        def run(state=state):
            _common.block_until_ready(loop(token, state))

        cases["FAM", target] = (size, run)
    return cases


def llama_token_cases(lm, positions, steps=LLAMA_STEPS):
    """The same for KerasHub's Llama, from a zero cache of the length a
    `generate()` call reaching the position would allocate."""
    backbone = lm.backbone
    num_layers = backbone.num_layers
    heads = backbone.num_key_value_heads
    head_dim = backbone.hidden_dim // backbone.num_query_heads

    def step(token, carry):
        cache, index = carry
        logits, _, cache = lm.call_with_cache(token, cache, index)
        return logits, (cache, index + 1)

    loop = _common.compile_function(lm, greedy_loop(step, steps))
    token = np.ones((1, 1), "int32")
    cases, skipped = {}, {}
    for position in positions:
        length = position + steps + 1
        nbytes = 2 * num_layers * length * heads * head_dim * 4
        if 3 * nbytes > _common.available_bytes():
            skipped[position] = f"OOM (cache {nbytes / 2**30:.1f} GiB)"
            continue
        cache = ops.zeros((1, num_layers, 2, length, heads, head_dim))
        carry = (cache, ops.convert_to_tensor(position, "int32"))

        def run(carry=carry):
            _common.block_until_ready(loop(token, carry))

        cases["Llama", position] = (steps, run)
    return cases, skipped


# === Report ===


def generate_table(median, skipped, prompts):
    lines = [
        "| prompt | FAM s | KerasHub s | FAM / KerasHub |",
        "|---:|---:|---:|---:|",
    ]
    for length in prompts:
        fam = median["FAM", length]
        hub = median.get(("KerasHub", length))
        hub_text = f"{hub:.3f}" if hub else skipped.get(length, "-")
        ratio = f"{fam / hub:.2f}" if hub else "-"
        lines.append(f"| {length} | {fam:.3f} | {hub_text} | {ratio} |")
    return lines


def token_table(per_token, skipped, positions):
    lines = [
        "| position | FAM ms/token | FAM / first | Llama ms/token "
        "| Llama / first | FAM / Llama |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    first = positions[0]
    fam0, llama0 = (
        per_token.get(("FAM", first)),
        per_token.get(("Llama", first)),
    )
    for position in positions:
        fam = per_token["FAM", position]
        llama = per_token.get(("Llama", position))
        lines.append(
            f"| {position} | {1e3 * fam:.2f} | {fam / fam0:.2f} | "
            + (
                f"{1e3 * llama:.2f} | {llama / llama0:.2f} | "
                f"{fam / llama:.2f} |"
                if llama and llama0
                else f"{skipped.get(position, '-')} | - | - |"
            )
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, nargs="*", default=None)
    parser.add_argument("--positions", type=int, nargs="*", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--output", default=None, help="JSON results file")
    _common.add_torch_threads_argument(parser)
    args = parser.parse_args()
    _common.set_torch_threads(args.torch_threads)
    default = (1024,) if args.quick else LENGTHS
    prompts = default if args.prompts is None else args.prompts
    positions = default if args.positions is None else args.positions
    if any(position % PREFILL_CHUNK for position in positions):
        parser.error(f"--positions must be multiples of {PREFILL_CHUNK}")
    repeats = args.repeats or 3
    new = args.new_tokens
    info = _common.versions()
    backend = info["backend"]
    load = [_common.load_average()]
    print(
        f"{backend} {info['backend_version']}: prompts {prompts}, "
        f"{new} new tokens; positions {positions}; load {load[0]}",
        flush=True,
    )
    keras.utils.set_random_seed(0)
    fam = _common.fam_lm()
    llama = None if args.skip_llama else _common.llama_lm()
    results = {**info, "new_tokens": new, "repeats": repeats}
    report = []
    if prompts:
        cases, skipped = generate_cases(fam, llama, prompts, new)
        times = _common.interleaved(cases, repeats, min_seconds=0)
        median = {key: _common.median(value) for key, value in times.items()}
        report += [
            f"End-to-end greedy generate, {backend}, batch 1, {new} new "
            f"tokens; median of {repeats} interleaved calls (seconds):",
            "",
            *generate_table(median, skipped, prompts),
            "",
        ]
        results["generate"] = {
            f"{name}@{length}": value for (name, length), value in times.items()
        }
        results["generate_skipped"] = skipped
        load.append(_common.load_average())
    if positions:
        cases = fam_token_cases(fam, positions)
        skipped = {position: "skipped" for position in positions}
        if llama is not None:
            more, skipped = llama_token_cases(llama, positions)
            cases.update(more)
        steps = {key: value[0] for key, value in cases.items()}
        times = _common.interleaved(
            {key: value[1] for key, value in cases.items()}, repeats
        )
        per_token = {
            key: _common.median(value) / steps[key]
            for key, value in times.items()
        }
        report += [
            f"Per generated token from position P ({backend}; median of "
            f"{repeats} interleaved loops of {fam.backbone.block_size} "
            f"(FAM) / {LLAMA_STEPS} (Llama) greedy steps):",
            "",
            *token_table(per_token, skipped, list(positions)),
        ]
        results["per_token_seconds"] = {
            f"{name}@{position}": [t / steps[name, position] for t in value]
            for (name, position), value in times.items()
        }
        results["per_token_skipped"] = skipped
        load.append(_common.load_average())
    results["load_average"] = load
    report.append(f"\nLoad average: {' -> '.join(load)}")
    print("\n".join(report))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
