"""Plots for keras-fam experiments (matplotlib is imported lazily)."""


def plot_passkey(results, path):
    """Pass-key accuracy against filler length, like the paper's Fig. 3a.

    Args:
        results: dict as written by `examples/passkey_retrieval.py`:
            `results["models"][name]["accuracy"]` maps filler length (str)
            to accuracy, `results["models"][name]["samples"]` (optional) to
            the number of sequences behind it, `results["chance"]` is the
            chance level, `results["config"]["train_length"]` (optional)
            the training segment, `results["config"]["longest_filler"]`
            (optional) the longest filler trained on (streamed over several
            segments; `results["longest_trained_filler"]`, when given,
            replaces it: a curriculum may end before it),
            `results["base"]` (optional) the base model's accuracy inside
            its context.
        path: str. Where to write the PNG.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10.5, 4.8))
    # BSWA lines differ in colour, marker and dash, and are shifted a
    # little along the (log) x axis, so they stay apart where they overlap
    # (at chance, or at 100% inside their window).
    styles = iter(
        [
            ("tab:orange", "s", "--"),
            ("tab:green", "^", "-."),
            ("tab:red", "v", ":"),
        ]
        * 4
    )
    lengths, samples, shift = set(), {}, 2.0**-0.12
    for name, entry in results["models"].items():
        points = sorted((int(n), a) for n, a in entry["accuracy"].items())
        lengths.update(n for n, _ in points)
        for n, count in entry.get("samples", {}).items():
            samples.setdefault(int(n), count)
        xs = [max(n, 1) for n, _ in points]  # Filler 0 drawn at 1.
        ys = [100 * a for _, a in points]
        if name.startswith("FAM"):
            axis.plot(
                xs,
                ys,
                "-o",
                color="tab:blue",
                label=name,
                markersize=6,
                linewidth=2.5,
                zorder=3,
            )
        else:
            color, marker, dash = next(styles)
            shift *= 2.0**0.06
            axis.plot(
                [x * shift for x in xs],
                ys,
                linestyle=dash,
                marker=marker,
                color=color,
                label=name,
                markersize=5,
                linewidth=1.5,
            )
    axis.axhline(
        100 * results["chance"], color="grey", linestyle=":", label="chance"
    )
    train_length = results.get("config", {}).get("train_length")
    if train_length:
        axis.axvline(
            train_length,
            color="black",
            linestyle="-.",
            linewidth=0.8,
            label=f"training segment ({train_length} tokens)",
        )
    longest = results.get("longest_trained_filler") or results.get(
        "config", {}
    ).get("longest_filler")
    if longest and longest != train_length:
        axis.axvline(
            longest,
            color="black",
            linestyle=(0, (1, 3)),
            linewidth=0.8,
            label=f"longest training filler ({longest} tokens)",
        )
    axis.set_xscale("log", base=2)
    ticks = sorted(lengths)
    axis.set_xticks([max(n, 1) for n in ticks])
    axis.set_xticklabels(
        [
            _short_number(n) + (f"\nn={samples[n]}" if n in samples else "")
            for n in ticks
        ],
        fontsize=8,
    )
    axis.minorticks_off()
    axis.set_xlabel("filler tokens (n = sequences per point)")
    axis.set_ylabel("pass-key exact match (%)")
    axis.set_ylim(-2, 102)
    title = "PassKey retrieval (cf. TransformerFAM paper, Fig. 3a)"
    base = results.get("base")
    if base:
        title += (
            f"\nbase model inside its {base['context']}-token context: "
            f"{100 * base['accuracy_in_context']:.1f}%"
        )
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    # Beside the axes: inside, it hides some curve wherever it goes.
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_block_step_mask(block_size, memory_segments, fam_length, path):
    """Picture of the attention mask of one fused [FAM ; block] step.

    Rows are queries (the FAM vectors, then the block's tokens), columns
    are keys (the memory blocks, the previous FAM, the block); dark cells
    may attend. The lines separate memory, FAM and block.

    Args:
        block_size: int. Tokens per block.
        memory_segments: int. Previous blocks attended to.
        fam_length: int. FAM vectors (`0` for BSWA).
        path: str. Where to write the PNG.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_fam.ops.masks import block_step_mask

    mask = block_step_mask(block_size, memory_segments, fam_length)
    memory = memory_segments * block_size
    figure, axis = plt.subplots(
        figsize=(2 + mask.shape[1] / 8, 1.5 + mask.shape[0] / 8)
    )
    axis.imshow(mask, cmap="Greys", vmin=0, vmax=1.25, interpolation="none")
    for column in (memory - 0.5, memory + fam_length - 0.5):
        axis.axvline(column, color="tab:red", linewidth=1)
    axis.axhline(fam_length - 0.5, color="tab:red", linewidth=1)
    axis.set_xlabel(
        f"keys: memory ({memory}) | FAM ({fam_length}) | block ({block_size})"
    )
    axis.set_ylabel(f"queries: FAM ({fam_length}) | block ({block_size})")
    axis.set_title(
        f"Block step mask, S={block_size}, M={memory_segments}, F={fam_length}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _short_number(n):
    """`262144` -> `"256k"`, `1024` -> `"1k"`, `200` -> `"200"`."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)
