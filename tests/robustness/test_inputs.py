"""Hostile call inputs: empty sequences, out-of-range ids, left padding,
NaN at padded positions, empty prompts. Each is a clear error naming the
input, or (NaN under padding) correct numbers."""

import keras
import keras_hub
import numpy as np
import pytest
from tiny_models import tiny_backbone, tiny_lm

from keras_fam.layers import TransformerFAM
from keras_fam.models import FAMCausalLMPreprocessor

VOCAB = 20
LEFT_PADDED = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
GAP = np.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
RIGHT_PADDED = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def ids(batch=2, length=6, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.fixture(scope="module")
def layer():
    layer = TransformerFAM(
        num_heads=2, block_size=4, memory_segments=1, fam_length=2
    )
    layer.build((None, None, 8))
    return layer


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(VOCAB)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(VOCAB)


# === The layer ===


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (np.zeros((2, 0, 8), "float32"), ValueError, r"inputs.shape=\(2, 0"),
        (np.zeros((2, 5), "float32"), ValueError, "inputs.shape"),
        (np.zeros((2, 5, 6), "float32"), ValueError, "inputs.shape"),
        (np.zeros((2, 5, 8), "int32"), TypeError, "inputs.dtype"),
    ],
)
def test_layer_inputs(layer, inputs, error, match):
    with pytest.raises(error, match=match):
        layer(inputs)


def test_layer_empty_chunk_in_a_stream(layer):
    state = layer.get_initial_state(1)
    with pytest.raises(ValueError, match="inputs"):
        layer(np.zeros((1, 0, 8), "float32"), state=state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding_mask=np.ones((2, 4), bool)), "padding_mask.shape"),
        (dict(fam=np.zeros((2, 3, 8), "float32")), "fam.shape"),
        (dict(state={"fam": None}), "state"),
        (dict(state_index=-1, state="x"), "state"),
    ],
)
def test_layer_call_arguments(layer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer(np.zeros((2, 6, 8), "float32"), **kwargs)


@pytest.mark.parametrize(
    "bad, streamed", [(np.nan, False), (-np.inf, False), (np.nan, True)]
)
def test_non_finite_at_padded_positions_stays_there(layer, bad, streamed):
    """A NaN/inf at a padded position reaches no real token (masking alone
    gives `0 * NaN = NaN` in the attention kernels)."""
    x = np.random.default_rng(0).normal(size=(2, 10, 8)).astype("float32")
    mask = np.ones((2, 10), bool)
    mask[0, 7:] = False
    poisoned = x.copy()
    poisoned[0, 7:] = bad
    if streamed:
        state = layer.get_initial_state(2)
        outputs = []
        for start in range(0, 10, 3):
            y, state = layer(
                poisoned[:, start : start + 3],
                padding_mask=mask[:, start : start + 3],
                state=state,
                return_state=True,
            )
            outputs.append(to_numpy(y))
        outputs = np.concatenate(outputs, axis=1)
        # The carried state is finite too (padded keys never reach it).
        assert np.isfinite(to_numpy(state["fam"])).all()
    else:
        outputs = to_numpy(layer(poisoned, padding_mask=mask))
    expected = to_numpy(layer(x, padding_mask=mask))
    assert np.isfinite(outputs[mask]).all()
    np.testing.assert_allclose(outputs[mask], expected[mask], atol=1e-5)


def test_nan_at_a_real_position_is_not_hidden(layer):
    x = np.zeros((1, 6, 8), "float32")
    x[0, 1] = np.nan
    assert np.isnan(to_numpy(layer(x))[0, 2:]).all()


# === The backbone ===


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ({"token_ids": np.zeros((2, 0), "int32")}, ValueError, "token_ids"),
        ({"token_ids": ids() + VOCAB}, ValueError, "vocabulary_size=20"),
        ({"token_ids": ids() - VOCAB}, ValueError, "token_ids"),
        ({"token_ids": ids().astype("float32")}, TypeError, "token_ids"),
        ({"token_ids": ids()[0]}, ValueError, "token_ids.shape"),
        ({"padding_mask": np.ones((2, 6))}, ValueError, "inputs"),
        (ids(), ValueError, "inputs"),
        (
            {"token_ids": ids(), "padding_mask": np.ones((2, 5))},
            ValueError,
            "padding_mask.shape",
        ),
        (
            {"token_ids": ids(), "padding_mask": LEFT_PADDED},
            ValueError,
            r"right-padded.*padding_mask\[0\]=\[0, 0, 1",
        ),
        (
            {"token_ids": ids(), "padding_mask": GAP},
            ValueError,
            r"padding_mask\[0\]=\[1, 1, 0, 1",
        ),
    ],
)
def test_backbone_inputs(backbone, inputs, error, match):
    with pytest.raises(error, match=match):
        backbone(inputs)


def test_right_padding_keeps_real_tokens_exact(backbone):
    tokens = ids()
    full = to_numpy(backbone({"token_ids": tokens}))
    padded = to_numpy(
        backbone({"token_ids": tokens, "padding_mask": RIGHT_PADDED})
    )
    np.testing.assert_allclose(
        padded[RIGHT_PADDED], full[RIGHT_PADDED], atol=1e-5
    )


@pytest.mark.parametrize(
    "token_ids, mask, match",
    [
        (ids(), LEFT_PADDED, "padding_mask"),
        (ids() + VOCAB, None, "token_ids"),
        (np.zeros((2, 0), "int32"), None, "token_ids"),
    ],
)
def test_stream_inputs(backbone, token_ids, mask, match):
    state = backbone.get_initial_state(2)
    with pytest.raises(ValueError, match=match):
        backbone.stream(token_ids, state, padding_mask=mask)


def test_stream_state_of_another_batch_size(backbone):
    with pytest.raises(ValueError, match="state"):
        backbone.stream(ids(), backbone.get_initial_state(3))


# === The causal LM ===


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"token_ids": np.zeros((1, 0), "int32")}, "token_ids"),
        (np.zeros((1, 0), "int32"), "token_ids"),
        (
            {
                "token_ids": np.array([[1, 2], [3, 4]]),
                "padding_mask": np.array([[1, 1], [0, 0]], bool),
            },
            "at least one token",
        ),
        ({"token_ids": np.array([[1, VOCAB]])}, "vocabulary_size"),
        ({"token_ids": np.array([[-1, 2]])}, "token_ids"),
        ({"token_ids": ids(), "padding_mask": LEFT_PADDED}, "padding_mask"),
        ({"token_ids": ids(), "padding_mask": GAP}, "padding_mask"),
        ({"token_ids": np.array([[1.0, 2.0]])}, "token_ids"),
    ],
)
def test_generate_inputs(lm, prompt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lm.generate(prompt, max_length=8, stop_token_ids=None)


def test_generate_function_checks_inputs_it_cannot_see_compiled(lm):
    """The compiled generation function is reached through the checks:
    ids, padding and empty prompts are checked before tracing."""
    generate = lm.make_generate_function()
    with pytest.raises(ValueError, match="vocabulary_size"):
        generate(
            {
                "token_ids": np.array([[1, VOCAB, 0, 0]], "int32"),
                "padding_mask": np.array([[1, 1, 0, 0]], bool),
            }
        )
    with pytest.raises(ValueError, match="at least one token"):
        generate(
            {
                "token_ids": np.zeros((1, 4), "int32"),
                "padding_mask": np.zeros((1, 4), bool),
            }
        )


def test_preprocessor_with_a_larger_vocabulary(lm):
    """A tokenizer whose ids exceed the model's vocabulary: a clear error
    at `generate` (the compiled lookup would give NaN on JAX)."""
    tokenizer = keras_hub.tokenizers.ByteTokenizer()
    # Special tokens for KerasHub's causal LM preprocessor.
    tokenizer.start_token_id = 1
    tokenizer.end_token_id = 2
    tokenizer.pad_token_id = 0
    lm_text = tiny_lm(
        VOCAB,
        preprocessor=FAMCausalLMPreprocessor(tokenizer, sequence_length=8),
    )
    with pytest.raises(ValueError, match="vocabulary_size=20"):
        lm_text.generate("hello", max_length=8, stop_token_ids=None)


@pytest.mark.parametrize(
    "token_ids, mask, match",
    [
        (np.zeros((1, 0), "int32"), None, "token_ids"),
        (ids() + VOCAB, None, "vocabulary_size"),
        (ids(), LEFT_PADDED, "padding_mask"),
        (ids(), np.ones((2, 7)), "padding_mask"),
    ],
)
def test_score_inputs(lm, token_ids, mask, match):
    with pytest.raises(ValueError, match=match):
        lm.score(token_ids, padding_mask=mask)
