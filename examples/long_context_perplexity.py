"""Per-token loss by position on a long text: a TransformerFAM and its BSWA
twin (the paper's long-context evaluation, in miniature).

The text: random filler tokens in which a marker token is followed, at
random places, by the document's key (a token drawn once per document and
stated at its start). Predicting the token after a marker needs the key,
last seen on average 16 tokens earlier; both models see only their own
block of 8 tokens (`memory_segments=0`), so the BSWA model must guess (loss
near `ln(vocabulary)`), while the FAM model can carry the key in its
feedback memory from block to block.

Both twins (same architecture and initial weights, `fam_length=4` or `0`)
are trained for the same number of steps on 64-token documents, then a
document of `--eval-length` tokens (64x the training length by default) is
scored with `FAMCausalLM.score(..., scoring_mode="loss")`, which streams
it through the fixed-size state in chunks. The plot shows the mean loss per
position bin, over all tokens and over the tokens after a marker, for both
models; `examples/results/long_context_perplexity.{json,png}` hold the
numbers.

Result (JAX, default settings, 2026-12-02; `examples/results/`): BSWA's
loss after a marker stays at chance (3.1-3.6 per 256-token bin; chance
`ln 30 = 3.40`). FAM's is 1.01 over the first 256 tokens (the key is
carried across blocks), 3.06 over the next 256, then rises to ~9 (wrong and
confident) beyond ~500 tokens: trained for 600 steps on 64-token documents,
its memory does not yet extrapolate 60x (the PassKey example shows what
longer training, `fam_normalization` and a length curriculum add). Filler
loss is at chance for both (3.43).

Run it (about 4 minutes on the shared 2-core CPU with JAX):

    KERAS_BACKEND=jax python examples/long_context_perplexity.py
    KERAS_BACKEND=torch python examples/long_context_perplexity.py --steps 100
"""

import argparse
import json
import os
import time

import keras
import numpy as np

from keras_fam.models import FAMBackbone, FAMCausalLM

MARKER = 1


def make_documents(rng, count, length, vocabulary_size, marker_rate):
    """Documents `(count, length + 1)`: `[marker, key, filler...]` where each
    filler position is, with probability `marker_rate`, a marker followed by
    the key. Returns the tokens and a bool array marking key positions after
    the first."""
    keys = rng.integers(2, vocabulary_size, size=(count, 1))
    tokens = rng.integers(2, vocabulary_size, size=(count, length + 1))
    is_key = np.zeros_like(tokens, bool)
    markers = rng.random((count, length + 1)) < marker_rate
    markers[:, :2] = False
    markers[:, -1] = False
    markers[:, 1:] &= ~markers[:, :-1]  # no marker right after a marker
    is_key[:, 1:] = markers[:, :-1]
    tokens = np.where(markers, MARKER, tokens)
    tokens = np.where(is_key, keys, tokens)
    tokens[:, 0], tokens[:, 1] = MARKER, keys[:, 0]
    return tokens.astype("int32"), is_key


def build(args, fam_length, seed):
    keras.utils.set_random_seed(seed)
    backbone = FAMBackbone(
        vocabulary_size=args.vocabulary_size,
        num_layers=2,
        num_heads=2,
        hidden_dim=args.width,
        intermediate_dim=2 * args.width,
        block_size=args.block_size,
        memory_segments=0,
        fam_length=fam_length,
        fam_normalization=fam_length > 0,
    )
    lm = FAMCausalLM(backbone)
    lm.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    return lm


def train(lm, args, seed):
    rng = np.random.default_rng(seed)
    tokens, _ = make_documents(
        rng,
        args.steps * args.batch_size,
        args.train_length,
        args.vocabulary_size,
        args.marker_rate,
    )
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones_like(tokens[:, :-1], bool),
    }
    history = lm.fit(
        x, tokens[:, 1:], batch_size=args.batch_size, epochs=1, verbose=0
    )
    return history.history["loss"][-1]


def binned(values, bins):
    edges = np.linspace(0, len(values), bins + 1).astype(int)
    return [
        float(np.mean(values[a:b])) if b > a else float("nan")
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabulary-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--fam-length", type=int, default=4)
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument("--eval-length", type=int, default=4096)
    parser.add_argument("--marker-rate", type=float, default=1 / 16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--bins", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("examples", "results"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed + 100)
    document, is_key = make_documents(
        rng, 1, args.eval_length, args.vocabulary_size, args.marker_rate
    )
    results = {"config": vars(args), "models": {}}
    for name, fam_length in (("FAM", args.fam_length), ("BSWA", 0)):
        start = time.perf_counter()
        lm = build(args, fam_length, args.seed)
        final_train_loss = train(lm, args, args.seed)
        trained = time.perf_counter() - start
        losses = lm.score(
            document[:, :-1],
            scoring_mode="loss",
            target_ids=document[:, 1:],
        )
        losses = np.asarray(keras.ops.convert_to_numpy(losses))[0]
        keys = is_key[0, 1:]
        key_losses = np.where(keys, losses, np.nan)
        results["models"][name] = {
            "fam_length": fam_length,
            "final_train_loss": float(final_train_loss),
            "mean_loss": float(losses.mean()),
            "mean_key_loss": float(losses[keys].mean()),
            "mean_filler_loss": float(losses[~keys].mean()),
            "loss_by_bin": binned(losses, args.bins),
            "key_loss_by_bin": [
                float(np.nanmean(chunk)) if np.any(~np.isnan(chunk)) else None
                for chunk in np.array_split(key_losses, args.bins)
            ],
            "seconds": time.perf_counter() - start,
            "train_seconds": trained,
        }
        summary = results["models"][name]
        print(
            f"{name}: train loss {final_train_loss:.3f}; on "
            f"{args.eval_length} tokens: mean loss {summary['mean_loss']:.3f},"
            f" after a marker {summary['mean_key_loss']:.3f}, filler "
            f"{summary['mean_filler_loss']:.3f} "
            f"({summary['seconds']:.0f} s)"
        )
    results["chance_loss"] = float(np.log(args.vocabulary_size - 2))
    os.makedirs(args.output, exist_ok=True)
    with open(
        os.path.join(args.output, "long_context_perplexity.json"), "w"
    ) as f:
        json.dump(results, f, indent=2)
    plot(
        results, args, os.path.join(args.output, "long_context_perplexity.png")
    )


def plot(results, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = (np.arange(args.bins) + 0.5) * args.eval_length / args.bins
    figure, axis = plt.subplots(figsize=(7, 4))
    styles = {"FAM": ("tab:blue", "-"), "BSWA": ("tab:orange", "--")}
    for name, model in results["models"].items():
        color, line = styles[name]
        axis.plot(
            centers,
            model["loss_by_bin"],
            color=color,
            linestyle=line,
            alpha=0.5,
            label=f"{name}: all tokens",
        )
        key = [np.nan if v is None else v for v in model["key_loss_by_bin"]]
        axis.plot(
            centers,
            key,
            color=color,
            linestyle=line,
            marker="o",
            label=f"{name}: token after a marker (needs memory)",
        )
    axis.axhline(
        results["chance_loss"], color="gray", linewidth=0.8, label="chance"
    )
    axis.axvline(args.train_length, color="black", linewidth=0.8, linestyle=":")
    axis.text(args.train_length, 0.1, " training length", fontsize=8)
    axis.set_xlabel("position in the document (tokens)")
    axis.set_ylabel("loss (nats)")
    axis.set_title(
        f"Per-token loss by position, block {args.block_size}, no memory "
        "segments"
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
