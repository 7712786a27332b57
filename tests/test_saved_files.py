"""Files saved by keras-fam before the step / state / options refactor load
and give the same numbers (`.keras`, presets, `FAMState` `.npz`).

The files come from `tests/fixtures/make_saved_fixtures.py`, run once with
the code of that time (JAX backend); every backend reproduces them.
"""

import os

import keras
import numpy as np
from keras import ops

from keras_fam.models import FAMBackbone, FAMCausalLM
from keras_fam.state import FAMState, FAMStreamer

FOLDER = os.path.join(
    os.path.dirname(__file__), "fixtures", "saved_before_refactor"
)


def _expected():
    with np.load(os.path.join(FOLDER, "expected.npz")) as data:
        return {key: data[key] for key in data}


def _logits(lm, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return np.asarray(ops.convert_to_numpy(lm(inputs)))


def test_keras_file_loads_with_the_same_logits():
    expected = _expected()
    lm = keras.saving.load_model(os.path.join(FOLDER, "lm.keras"))
    assert isinstance(lm, FAMCausalLM)
    np.testing.assert_allclose(
        _logits(lm, expected["token_ids"]), expected["logits"], atol=1e-5
    )


def test_preset_loads_with_the_same_logits():
    expected = _expected()
    preset = os.path.join(FOLDER, "preset")
    lm = FAMCausalLM.from_preset(preset)
    np.testing.assert_allclose(
        _logits(lm, expected["token_ids"]), expected["logits"], atol=1e-5
    )
    backbone = FAMBackbone.from_preset(preset)
    assert backbone.fam_normalization and backbone.num_key_value_heads == 1


def test_saved_state_resumes_the_stream():
    expected = _expected()
    lm = keras.saving.load_model(os.path.join(FOLDER, "lm.keras"))
    state = FAMState.load(os.path.join(FOLDER, "state.npz"))
    assert state.position == 7
    streamer = FAMStreamer(lm, batch_size=2, state=state)
    streamed = streamer.feed(expected["token_ids"][:, 7:], verbose=0)
    np.testing.assert_allclose(streamed, expected["streamed_logits"], atol=1e-5)
    np.testing.assert_allclose(streamed, expected["logits"][:, 7:], atol=1e-5)
