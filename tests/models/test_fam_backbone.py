"""FAMBackbone: forward pass, streaming, summary embeddings, config, errors."""

import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

from keras_fam.models import FAMBackbone

VOCAB = 37


def tiny_backbone(**overrides):
    return tiny_models.tiny_backbone(VOCAB, **overrides)


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def token_ids(batch=2, length=13, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def test_output_shape_and_sublayer_names():
    backbone = tiny_backbone()
    ids = token_ids()
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    assert tuple(hidden.shape) == (2, 13, 16)
    names = [layer.name for layer in backbone.transformer_layers]
    assert names == ["transformer_layer_0", "transformer_layer_1"]
    assert backbone.token_embedding.name == "token_embedding"
    assert backbone.layer_norm.name == "layer_norm"
    assert tuple(backbone.fam_summary_embedding.shape) == (2, 16)
    # The layers own no initial FAM of their own: the summary embeddings are
    # the only FAM initialisation parameters.
    paths = [weight.path for weight in backbone.weights]
    assert not any("initial_fam" in path for path in paths)


@pytest.mark.parametrize("chunks", [(13,), (5, 8), (1, 3, 4, 5), (4, 4, 5)])
def test_streaming_equals_full_forward(chunks):
    backbone = tiny_backbone()
    ids = token_ids()
    full = numpy(backbone({"token_ids": ids}))
    state = backbone.get_initial_state(2)
    outputs, start = [], 0
    for length in chunks:
        hidden, state = backbone.stream(ids[:, start : start + length], state)
        outputs.append(numpy(hidden))
        start += length
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-5)
    assert int(numpy(state[0]["index"])) == 13


def test_summary_embeddings_reach_each_layer_by_propagation():
    """Layer 0 starts from the summary embeddings; layer 1 from layer 0's
    FAM update of them over an empty (all padded) block."""
    backbone = tiny_backbone()
    fams = backbone.initial_fams(3)
    summary = numpy(backbone.fam_summary_embedding)
    np.testing.assert_allclose(numpy(fams[0]), np.stack([summary] * 3))
    layer = backbone.transformer_layers[0]
    empty = np.zeros((3, 4, 16), "float32")
    _, fam = layer(
        empty,
        padding_mask=np.zeros((3, 4), bool),
        fam=fams[0],
        return_fam=True,
    )
    np.testing.assert_allclose(numpy(fams[1]), numpy(fam), atol=1e-5)
    # Shared by all batch rows, and actually different from layer 0's.
    np.testing.assert_allclose(numpy(fams[1])[0], numpy(fams[1])[2])
    assert np.abs(numpy(fams[1]) - numpy(fams[0])).max() > 1e-2


def test_summary_embeddings_change_outputs():
    backbone = tiny_backbone()
    ids = token_ids()
    before = numpy(backbone({"token_ids": ids}))
    backbone.fam_summary_embedding.assign(
        numpy(backbone.fam_summary_embedding) + 1.0
    )
    after = numpy(backbone({"token_ids": ids}))
    # The first block sees the initial FAM directly.
    assert np.abs(after[:, :4] - before[:, :4]).max() > 1e-3


def test_padding_mask_hides_padded_tokens():
    backbone = tiny_backbone()
    ids = token_ids(length=8)
    mask = np.ones_like(ids)
    mask[:, 6:] = 0
    other = ids.copy()
    other[:, 6:] = (ids[:, 6:] + 1) % VOCAB
    first = numpy(backbone({"token_ids": ids, "padding_mask": mask}))
    second = numpy(backbone({"token_ids": other, "padding_mask": mask}))
    np.testing.assert_allclose(first[:, :6], second[:, :6], atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            position_embedding="learned",
            max_sequence_length=32,
            normalization="layer_norm",
            feedforward="mlp",
            activation="gelu",
            use_bias=True,
        ),
        dict(
            normalization="rms_norm_unit_offset",
            activation="gelu_approximate",
            embedding_scale=4.0,
            sandwich_norm=True,
            logit_soft_cap=50.0,
            query_scale=0.3,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
        dict(fam_length=0),
        dict(fam_normalization=True),
        dict(qkv_bias=True, rope_scaling_factor=2.0),
        dict(
            normalization="rms_norm_unit_offset",
            query_key_norm=True,
            sandwich_norm=True,
            head_dim=12,
            rope_max_wavelength=[10000.0, 1000000.0],
            rope_scaling_factor=[1.0, 8.0],
        ),
    ],
    ids=[
        "gpt2_like",
        "gemma2_like",
        "bswa",
        "fam_normalization",
        "qwen2_like",
        "gemma3_like",
    ],
)
def test_architectures_stream_and_round_trip_config(overrides):
    backbone = tiny_backbone(**overrides)
    ids = token_ids()
    full = numpy(backbone({"token_ids": ids}))
    state = backbone.get_initial_state(2)
    first, state = backbone.stream(ids[:, :7], state)
    second, state = backbone.stream(ids[:, 7:], state)
    streamed = np.concatenate([numpy(first), numpy(second)], axis=1)
    np.testing.assert_allclose(streamed, full, atol=1e-5)
    clone = FAMBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_allclose(
        numpy(clone({"token_ids": ids})), full, atol=1e-6
    )
    assert clone.get_config() == backbone.get_config()
    for layer in clone.transformer_layers:
        assert layer.fam_normalization == backbone.fam_normalization


def test_per_layer_rope_and_attention_options_reach_the_layers():
    backbone = tiny_backbone(
        rope_max_wavelength=[500.0, 20000.0],
        rope_scaling_factor=[1.0, 4.0],
        qkv_bias=True,
        query_key_norm=True,
    )
    first, second = (layer.attention for layer in backbone.transformer_layers)
    assert (first.rope_max_wavelength, first.rope_scaling_factor) == (500, 1)
    assert (second.rope_max_wavelength, second.rope_scaling_factor) == (
        20000,
        4,
    )
    for attention in (first, second):
        assert attention.qkv_bias and not attention.use_bias
        assert attention.query_key_norm == "rms_norm"
        assert attention.query.bias is not None
        assert attention.attention_output.bias is None
    # The default Random Position Offset range is the largest base.
    assert backbone.position_offset.max_offset == 20000
    # A per-layer list changes the outputs of the layer it names only.
    ids = token_ids()
    uniform = tiny_backbone(
        rope_max_wavelength=500.0,
        rope_scaling_factor=1.0,
        qkv_bias=True,
        query_key_norm=True,
    )
    uniform.set_weights(backbone.get_weights())
    mixed = uniform.transformer_layers[0]
    x = uniform.embed(ids)
    fams = uniform.initial_fams(2)
    np.testing.assert_allclose(
        numpy(mixed(x, fam=fams[0])),
        numpy(backbone.transformer_layers[0](x, fam=fams[0])),
        atol=1e-6,
    )
    difference = numpy(uniform({"token_ids": ids})) - numpy(
        backbone({"token_ids": ids})
    )
    assert np.abs(difference).max() > 1e-3


def test_embedding_scale_and_untied_head_take_effect():
    ids = token_ids()
    base = tiny_backbone()
    scaled = tiny_backbone(embedding_scale=3.0)
    scaled.set_weights(base.get_weights())
    assert (
        np.abs(
            numpy(base({"token_ids": ids})) - numpy(scaled({"token_ids": ids}))
        ).max()
        > 1e-3
    )
    untied = tiny_backbone(tie_word_embeddings=False)
    assert len(untied.weights) == len(base.weights) + 1


def test_prefill_blocks_equals_streaming():
    backbone = tiny_backbone()
    ids = token_ids(length=14)
    state = backbone.prefill_blocks(
        ids, backbone.get_initial_state(2), ops.convert_to_tensor(3)
    )
    _, expected = backbone.stream(ids[:, :12], backbone.get_initial_state(2))
    for got, want in zip(state, expected, strict=True):
        for key in want:
            np.testing.assert_allclose(
                numpy(got[key]).astype("float32"),
                numpy(want[key]).astype("float32"),
                atol=1e-5,
                err_msg=key,
            )


def test_bad_inputs_raise_naming_the_argument():
    backbone = tiny_backbone()
    ids = token_ids()
    with pytest.raises(ValueError, match="token_ids"):
        backbone({"token_ids": ids + VOCAB})
    with pytest.raises(ValueError, match="token_ids"):
        backbone({"token_ids": ids - VOCAB})
    with pytest.raises(TypeError, match="token_ids"):
        backbone({"token_ids": ids.astype("float32")})
    # Only Keras' shape inference may pass float ids (its build batch under
    # tf.distribute is a replica average); see test_distribution.py.
    from keras.src.backend.common.symbolic_scope import SymbolicScope

    with SymbolicScope():
        hidden = backbone({"token_ids": ids.astype("float32")})
    assert tuple(hidden.shape) == (2, 13, 16)
    with pytest.raises(ValueError, match="padding_mask"):
        backbone({"token_ids": ids, "padding_mask": np.ones((2, 12))})
    with pytest.raises(ValueError, match="inputs"):
        backbone(ids)
    other = tiny_backbone(memory_segments=2)
    with pytest.raises(ValueError, match="state"):
        backbone.stream(ids, other.get_initial_state(2))
    deeper = tiny_backbone(num_layers=3)
    with pytest.raises(ValueError, match="state"):
        backbone.stream(ids, deeper.get_initial_state(2))
    wider = tiny_backbone(hidden_dim=32, intermediate_dim=8)
    with pytest.raises(ValueError, match="state"):
        backbone.stream(ids, wider.get_initial_state(2))


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(vocabulary_size=0), "vocabulary_size"),
        (dict(num_layers=1.5), "num_layers"),
        (dict(position_embedding="alibi"), "position_embedding"),
        (dict(normalization="batch_norm"), "normalization"),
        (dict(position_embedding="learned"), "max_sequence_length"),
        (dict(state_passing_probability=1.5), "state_passing_probability"),
        (dict(rope_max_wavelength=[1e4, 1e4, 1e4]), "rope_max_wavelength"),
        (dict(rope_scaling_factor=[1.0]), "rope_scaling_factor"),
        (dict(query_key_norm="yes"), "query_key_norm"),
        (
            dict(
                position_embedding="learned",
                max_sequence_length=8,
                position_offset_probability=0.5,
            ),
            "position_offset_probability",
        ),
    ],
)
def test_bad_config_raises(overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny_backbone(**overrides)


def test_learned_positions_bound_the_sequence_length():
    backbone = tiny_backbone(
        position_embedding="learned", max_sequence_length=8
    )
    with pytest.raises(ValueError, match="max_sequence_length"):
        backbone({"token_ids": token_ids(length=9)})
    _, state = backbone.stream(
        token_ids(length=6), backbone.get_initial_state(2)
    )
    with pytest.raises(ValueError, match="max_sequence_length"):
        backbone.stream(token_ids(length=3), state)


def test_mixed_precision_outputs():
    backbone = tiny_backbone(dtype="mixed_bfloat16")
    hidden = backbone({"token_ids": token_ids()})
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    assert (
        keras.backend.standardize_dtype(backbone.fam_summary_embedding.dtype)
        == "float32"
    )
