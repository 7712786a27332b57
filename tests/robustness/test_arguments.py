"""Hostile constructor and method arguments: every one is a `ValueError`
(or `TypeError`) that names the parameter; every legal spelling (NumPy
scalars) is accepted."""

import numpy as np
import pytest
from tiny_models import tiny_backbone, tiny_lm

from keras_fam.layers import TransformerFAM
from keras_fam.layers.fam_attention import FAMAttention
from keras_fam.layers.feedforward import FeedForward
from keras_fam.layers.rms_normalization import RMSNormalization

LAYER = dict(num_heads=2, block_size=4, memory_segments=1, fam_length=2)
VOCAB = 20
NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    "name, value",
    [
        ("block_size", 0),
        ("block_size", 2.0),
        ("block_size", "4"),
        ("block_size", True),
        ("block_size", np.float32(4)),
        ("memory_segments", -1),
        ("memory_segments", None),
        ("fam_length", -1),
        ("fam_length", 1.5),
        ("num_heads", 0),
        ("num_heads", np.int64(-2)),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", 3),
        ("head_dim", 0),
        ("head_dim", 3),
        ("intermediate_dim", 0),
        ("layer_norm_epsilon", 0.0),
        ("layer_norm_epsilon", -1e-5),
        ("layer_norm_epsilon", NAN),
        ("layer_norm_epsilon", "1e-5"),
        ("rope_max_wavelength", 0),
        ("rope_max_wavelength", -10000),
        ("rope_max_wavelength", INF),
        ("rope_scaling_factor", 0.0),
        ("rope_scaling_factor", -2.0),
        ("query_scale", 0.0),
        ("query_scale", -0.5),
        ("query_scale", NAN),
        ("logit_soft_cap", 0.0),
        ("logit_soft_cap", -50.0),
        ("dropout", -0.1),
        ("dropout", 1.0),
        ("dropout", "0.1"),
        ("dropout", NAN),
        ("dropout", None),
        ("normalization", "batch_norm"),
        ("feedforward", "moe"),
        ("activation", "no_such_activation"),
        ("kernel_initializer", "no_such_initializer"),
        ("attention_implementation", "flash"),
        ("use_bias", "yes"),
        ("sandwich_norm", 1),
        ("qkv_bias", None),
        ("query_key_norm", "rms_norm"),
        ("use_rope", "no"),
        ("parallel_blocks", 0),
        ("fam_normalization", "yes"),
        ("learned_initial_fam", 1.0),
        ("rope_frequency_scaling", {"factor": 8.0}),
        (
            "rope_frequency_scaling",
            {
                "factor": "eight",
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ],
)
def test_layer_argument(name, value):
    with pytest.raises(ValueError, match=name):
        TransformerFAM(**{**LAYER, name: value})


def test_layer_misspelled_argument():
    with pytest.raises(ValueError, match="blok_size"):
        TransformerFAM(**LAYER, blok_size=8)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (FAMAttention, dict(num_heads=2, rope_max_wavelength=0), "rope"),
        (FAMAttention, dict(num_heads="2"), "num_heads"),
        (FAMAttention, dict(num_heads=2, query_key_norm="l2"), "query_key"),
        (
            FAMAttention,
            dict(num_heads=2, query_key_norm_epsilon=-1.0),
            "query_key_norm_epsilon",
        ),
        (FeedForward, dict(intermediate_dim=0), "intermediate_dim"),
        (FeedForward, dict(intermediate_dim=8, kind="x"), "feedforward"),
        (FeedForward, dict(intermediate_dim=8, activation=3), "activation"),
        (RMSNormalization, dict(epsilon=0.0), "epsilon"),
        (RMSNormalization, dict(epsilon=-1.0), "epsilon"),
        (RMSNormalization, dict(unit_offset="yes"), "unit_offset"),
    ],
)
def test_sublayer_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_numpy_scalars_are_accepted_as_python_values():
    layer = TransformerFAM(
        num_heads=np.int64(2),
        block_size=np.int32(4),
        memory_segments=np.int64(1),
        fam_length=np.int16(2),
        layer_norm_epsilon=np.float32(1e-5),
        dropout=np.float64(0.0),
        use_bias=np.bool_(True),
    )
    config = layer.get_config()
    for name in ("block_size", "memory_segments", "fam_length", "num_heads"):
        assert type(config[name]) is int
    assert type(config["layer_norm_epsilon"]) is float
    assert type(config["use_bias"]) is bool
    y = layer(np.zeros((1, 5, 8), "float32"))
    assert tuple(y.shape) == (1, 5, 8)
    backbone = tiny_backbone(
        VOCAB, block_size=np.int64(4), num_layers=np.int64(2)
    )
    assert type(backbone.block_size) is int
    assert type(backbone.num_layers) is int


@pytest.mark.parametrize(
    "name, value",
    [
        ("vocabulary_size", 0),
        ("vocabulary_size", 20.0),
        ("num_layers", 0),
        ("num_layers", "2"),
        ("hidden_dim", -16),
        ("intermediate_dim", 0),
        ("block_size", 0),
        ("block_size", np.float64(4)),
        ("memory_segments", -2),
        ("fam_length", -1),
        ("rope_max_wavelength", 0),
        ("rope_max_wavelength", [10000.0, 0.0]),
        ("rope_max_wavelength", [10000.0, "x"]),
        ("rope_scaling_factor", 0),
        ("rope_scaling_factor", [1.0, -1.0]),
        ("layer_norm_epsilon", -1e-6),
        ("query_scale", 0),
        ("logit_soft_cap", -1.0),
        ("final_logit_soft_cap", 0.0),
        ("final_logit_soft_cap", "30"),
        ("embedding_scale", 0.0),
        ("embedding_scale", NAN),
        ("dropout", 1.5),
        ("dropout", "high"),
        ("tie_word_embeddings", "yes"),
        ("position_embedding", "sinusoidal"),
        ("max_sequence_length", 0),
        ("state_passing_probability", 1.5),
        ("state_passing_probability", "0.8"),
        ("position_offset_probability", -0.5),
        ("max_position_offset", 0),
        ("training_streams", 0),
        ("training_streams", 2.5),
        ("seed", "1"),
        ("seed", 1.5),
        ("normalization", "layer_norm2"),
    ],
)
def test_backbone_argument(name, value):
    with pytest.raises(ValueError, match=name):
        tiny_backbone(VOCAB, **{name: value})


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("blok_size", "block_size"),
        ("fam_lenght", "fam_length"),
        ("memory_segment", "memory_segments"),
        ("num_head", "num_heads"),
        ("use_rope", None),
        ("kernel_initializer", None),
        ("vocab_size", "vocabulary_size"),
    ],
)
def test_backbone_unknown_argument(name, suggestion):
    with pytest.raises(ValueError, match=f"Unknown argument.*{name}") as error:
        tiny_backbone(VOCAB, **{name: 8})
    if suggestion is not None:
        assert f"did you mean `{suggestion}`" in str(error.value)


def test_backbone_base_arguments_still_work():
    backbone = tiny_backbone(
        VOCAB,
        name="my_backbone",
        trainable=False,
        dtype="float32",
        attention_implementation="reference",
        parallel_blocks=True,
    )
    assert backbone.name == "my_backbone"
    assert not backbone.trainable
    assert backbone.transformer_layers[0].parallel_blocks


@pytest.mark.parametrize("batch_size", [0, -1, "2", 2.0, None, True])
def test_get_initial_state_batch_size(batch_size):
    layer = TransformerFAM(**LAYER)
    layer.build((None, None, 8))
    with pytest.raises(ValueError, match="batch_size"):
        layer.get_initial_state(batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_backbone(VOCAB).get_initial_state(batch_size)


def test_get_initial_state_numpy_batch_size():
    backbone = tiny_backbone(VOCAB)
    state = backbone.get_initial_state(np.int64(3))
    assert tuple(state[0]["fam"].shape) == (3, 2, 16)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(VOCAB)


PROMPT = {
    "token_ids": np.array([[1, 2, 3]], "int32"),
    "padding_mask": np.array([[1, 1, 1]], bool),
}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_length=0), "max_length"),
        (dict(max_length=-5), "max_length"),
        (dict(max_length=8.0), "max_length"),
        (dict(max_length="8"), "max_length"),
        (dict(max_length=2), "max_length"),  # Shorter than the prompt.
        (dict(max_length=8, strip_prompt="yes"), "strip_prompt"),
    ],
)
def test_generate_argument(lm, kwargs, name):
    with pytest.raises(ValueError, match=name):
        lm.generate(PROMPT, stop_token_ids=None, **kwargs)


def test_generate_numpy_max_length(lm):
    out = lm.generate(PROMPT, max_length=np.int64(6), stop_token_ids=None)
    assert out["token_ids"].shape == (1, 6)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(scoring_mode="perplexity"), ValueError, "scoring_mode"),
        (dict(scoring_mode="loss"), ValueError, "target_ids"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=4.0), ValueError, "chunk_size"),
        (dict(chunk_size="4"), ValueError, "chunk_size"),
        (dict(layer_intercept_fn=3), TypeError, "layer_intercept_fn"),
        (
            dict(scoring_mode="loss", target_ids=np.zeros((1, 2), "int32")),
            ValueError,
            "target_ids",
        ),
    ],
)
def test_score_argument(lm, kwargs, error, name):
    with pytest.raises(error, match=name):
        lm.score(PROMPT["token_ids"], **kwargs)


def test_score_numpy_chunk_size(lm):
    scores = lm.score(PROMPT["token_ids"], chunk_size=np.int64(2))
    assert tuple(scores.shape) == (1, 3, VOCAB)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(rank=2, target_layer_names=["attention"]), "target_layer"),
    ],
)
def test_enable_lora_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_backbone(VOCAB).enable_lora(**kwargs)
