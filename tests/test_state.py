"""Streaming long documents: FAMState save/load and FAMStreamer."""

import os

import numpy as np
import pytest
import tiny_models
from keras import ops

from keras_fam.state import FAMState, FAMStreamer

VOCAB = 29


def tiny_lm(**overrides):
    config = {"hidden_dim": 8, "intermediate_dim": 8, **overrides}
    return tiny_models.tiny_lm(VOCAB, **config)


def document(length=30, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def test_streamed_logits_equal_the_full_forward_pass():
    lm = tiny_lm()
    ids = document()
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    full = np.asarray(ops.convert_to_numpy(lm(inputs)))
    streamer = FAMStreamer(lm, batch_size=2)
    first = streamer.feed(ids[:, :11], verbose=0)
    second = streamer.feed(ids[:, 11:], verbose=0)
    np.testing.assert_allclose(
        np.concatenate([first, second], axis=1), full, atol=1e-5
    )
    assert streamer.state.position == 30


def test_resume_from_disk_is_bit_identical(tmp_path):
    lm = tiny_lm()
    ids = document(length=26)
    chunks = [(0, 9), (9, 14), (14, 26)]
    straight = FAMStreamer(lm, batch_size=2)
    expected = [straight.feed(ids[:, a:b], verbose=0) for a, b in chunks]

    interrupted = FAMStreamer(lm, batch_size=2)
    interrupted.feed(ids[:, :9], verbose=0)
    path = os.path.join(tmp_path, "state.npz")
    interrupted.state.save(path)
    del interrupted
    resumed = FAMStreamer(lm, batch_size=2, state=FAMState.load(path))
    assert resumed.state.position == 9
    for (a, b), want in zip(chunks[1:], expected[1:], strict=True):
        np.testing.assert_array_equal(
            resumed.feed(ids[:, a:b], verbose=0), want
        )
    for got, want in zip(
        resumed.state.layers, straight.state.layers, strict=True
    ):
        for key in want:
            np.testing.assert_array_equal(
                ops.convert_to_numpy(got[key]), ops.convert_to_numpy(want[key])
            )


def test_state_size_is_constant_and_outputs_choices():
    lm = tiny_lm()
    ids = document(length=40, batch=1)
    hidden = FAMStreamer(lm.backbone, output="hidden_states")
    size = hidden.state.nbytes
    out = hidden.feed(ids, verbose=0)
    assert out.shape == (1, 40, 8)
    assert hidden.state.nbytes == size
    last = FAMStreamer(lm, output="last_logits")
    logits = FAMStreamer(lm, output="logits").feed(ids, verbose=0)
    np.testing.assert_allclose(
        last.feed(ids, verbose=0), logits[:, -1], atol=1e-6
    )
    nothing = FAMStreamer(lm, output=None)
    assert nothing.feed(ids, verbose=0) is None
    assert nothing.state.position == 40
    nothing.reset()
    assert nothing.state.position == 0


def test_progress_bar_on_long_runs(capsys):
    lm = tiny_lm()
    streamer = FAMStreamer(lm, output=None)
    streamer.feed(document(length=12, batch=1))
    assert "12/12" in capsys.readouterr().out
    streamer.feed(document(length=3, batch=1))  # One chunk: no bar.
    assert capsys.readouterr().out == ""


def test_state_from_another_model_or_file_is_rejected(tmp_path):
    lm = tiny_lm()
    other = tiny_lm(fam_length=3)
    with pytest.raises(ValueError, match="state"):
        FAMStreamer(lm, state=FAMState.initial(other.backbone))
    path = os.path.join(tmp_path, "other.npz")
    FAMState.initial(other.backbone).save(path)
    with pytest.raises(ValueError, match="state"):
        FAMStreamer(lm, state=FAMState.load(path))
    bogus = os.path.join(tmp_path, "bogus.npz")
    np.savez(bogus, x=np.zeros(3))
    with pytest.raises(ValueError, match="path"):
        FAMState.load(bogus)
    with pytest.raises(ValueError, match="output"):
        FAMStreamer(lm.backbone, output="logits")
    with pytest.raises(ValueError, match="token_ids"):
        FAMStreamer(lm, batch_size=2).feed(document(batch=1))
    with pytest.raises(ValueError, match="token_ids"):
        FAMStreamer(lm, batch_size=1).feed(document(batch=1) + VOCAB)


def test_multi_block_steps_and_per_call_output():
    """Whole blocks fed `blocks_per_step` at a time (and the rest block by
    block, token by token) give the full forward pass; `feed(output=...)`
    overrides the streamer's output for one call."""
    lm = tiny_lm()
    ids = document(length=47)  # Block 4: 11 whole blocks and 3 tokens.
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    full = np.asarray(ops.convert_to_numpy(lm(inputs)))
    streamer = FAMStreamer(lm, batch_size=2, output=None, blocks_per_step=3)
    assert streamer.feed(ids[:, :2], verbose=0) is None
    # 2 tokens to the boundary, then 3 + 3 + 3 blocks, 1 block, 3 tokens.
    rest = streamer.feed(ids[:, 2:], verbose=0, output="logits")
    np.testing.assert_allclose(rest, full[:, 2:], atol=1e-5)
    widths = sorted({width for width, _ in streamer._steps})
    assert widths == [1, 4, 12], widths
    with pytest.raises(ValueError, match="blocks_per_step"):
        FAMStreamer(lm, blocks_per_step=0)
    with pytest.raises(ValueError, match="output"):
        streamer.feed(ids[:, :1], output="everything")
