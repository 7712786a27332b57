"""Plots for keras-fam experiments (matplotlib is imported lazily)."""


def plot_passkey(results, path):
    """Pass-key accuracy against filler length, like the paper's Fig. 3a.

    Args:
        results: dict as written by `examples/passkey_retrieval.py`:
            `results["models"][name]["accuracy"]` maps filler length (str)
            to accuracy, `results["chance"]` is the chance level.
        path: str. Where to write the PNG.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, entry in results["models"].items():
        points = sorted((int(n), a) for n, a in entry["accuracy"].items())
        xs = [max(n, 1) for n, _ in points]
        ys = [100 * a for _, a in points]
        style = "-o" if name.startswith("FAM") else "--s"
        axis.plot(xs, ys, style, label=name, markersize=4)
    axis.axhline(
        100 * results["chance"], color="grey", linestyle=":", label="chance"
    )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("filler tokens")
    axis.set_ylabel("pass-key accuracy (%)")
    axis.set_ylim(-2, 102)
    axis.set_title("PassKey retrieval (cf. TransformerFAM paper, Fig. 3a)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
