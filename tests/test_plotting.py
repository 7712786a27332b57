"""keras_fam.plotting writes readable PNGs."""

import pytest

from keras_fam import plotting

pytest.importorskip("matplotlib")


def _png_pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_plot_passkey_draws_every_model(tmp_path):
    results = {
        # Drawn as vertical lines (the curriculum's longest filler, where
        # it ended before the configured one).
        "config": {"train_length": 256, "longest_filler": 4096},
        "longest_trained_filler": 2048,
        "chance": 0.1,
        "models": {
            "FAM": {
                "accuracy": {"0": 1.0, "256": 1.0, "4096": 0.3},
                "samples": {"0": 100, "256": 100, "4096": 20},
            },
            "BSWA M1": {"accuracy": {"0": 1.0, "256": 0.1}},
            "BSWA M2": {"accuracy": {"0": 1.0, "256": 0.1}},
        },
        "base": {"context": 128, "accuracy_in_context": 0.998},
    }
    path = plotting.plot_passkey(results, str(tmp_path / "passkey.png"))
    pixels = _png_pixels(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    # Not a blank canvas: lines and text make some pixels dark.
    assert (pixels[..., :3].mean(axis=-1) < 0.5).mean() > 0.001


def test_plot_block_step_mask_matches_the_mask(tmp_path):
    path = plotting.plot_block_step_mask(4, 1, 2, str(tmp_path / "mask.png"))
    pixels = _png_pixels(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100
    # The image is mostly the mask: allowed cells are dark grey, others
    # white, so both kinds of pixels are present.
    gray = pixels[..., :3].mean(axis=-1)
    assert (gray < 0.3).mean() > 0.05 and (gray > 0.95).mean() > 0.05
