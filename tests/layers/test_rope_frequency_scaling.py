"""Llama 3.1 RoPE frequency scaling in `apply_rope`, `FAMAttention` and
`TransformerFAM`."""

import keras
import numpy as np
import pytest
from keras import ops
from keras_hub.src.models.llama.llama_rotary_embedding import (
    LlamaRotaryEmbedding,
)

from keras_fam.layers import FAMAttention, TransformerFAM
from keras_fam.layers.fam_attention import apply_rope, rope_inverse_frequency

SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_matches_keras_hub_llama3_rotary_embedding():
    x = np.random.RandomState(0).randn(2, 40, 3, 16).astype("float32")
    reference = LlamaRotaryEmbedding(
        max_wavelength=500,
        frequency_adjustment_factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        pretraining_sequence_length=32,
    )(x)
    positions = np.arange(40, dtype="float32")
    out = apply_rope(x, positions, 500, 1.0, SCALING)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out), ops.convert_to_numpy(reference), atol=1e-6
    )
    # The scaling changes the result (the reference is not the plain RoPE).
    plain = ops.convert_to_numpy(apply_rope(x, positions, 500, 1.0))
    assert np.abs(plain - ops.convert_to_numpy(reference)).max() > 1.0


def test_inverse_frequency_bands():
    # head_dim 16, base 500: wavelengths 2 pi * 500 ** (i / 8).
    inverse = ops.convert_to_numpy(rope_inverse_frequency(16, 500))
    scaled = ops.convert_to_numpy(rope_inverse_frequency(16, 500, SCALING))
    wavelength = 2 * np.pi / inverse
    high = wavelength < 32 / 4  # kept
    low = wavelength > 32 / 1  # divided by the factor
    np.testing.assert_allclose(scaled[high], inverse[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], inverse[low] / 8.0, rtol=1e-6)
    medium = ~(high | low)
    assert medium.any()
    assert np.all(scaled[medium] < inverse[medium])
    assert np.all(scaled[medium] > inverse[medium] / 8.0)


def test_transformer_fam_uses_and_serializes_it():
    x = np.random.RandomState(1).randn(1, 12, 16).astype("float32")
    kwargs = dict(num_heads=2, block_size=4, memory_segments=1, fam_length=2)
    plain = TransformerFAM(**kwargs)
    scaled = TransformerFAM(**kwargs, rope_frequency_scaling=SCALING)
    plain.build(x.shape)
    scaled.build(x.shape)
    scaled.set_weights(plain.get_weights())
    difference = ops.convert_to_numpy(plain(x) - scaled(x))
    assert np.abs(difference).max() > 1e-4

    config = scaled.get_config()
    assert config["rope_frequency_scaling"] == SCALING
    restored = TransformerFAM.from_config(
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(config)
        )
    )
    restored.build(x.shape)
    restored.set_weights(scaled.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored(x)),
        ops.convert_to_numpy(scaled(x)),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"factor": 8.0},
        {**SCALING, "factor": 0.0},
        {**SCALING, "high_freq_factor": 1.0},
        "llama3",
    ],
)
def test_rejects_bad_scaling(bad):
    with pytest.raises(ValueError, match="rope_frequency_scaling"):
        FAMAttention(num_heads=2, rope_frequency_scaling=bad)
