"""KerasHub presets -> TransformerFAM models (`from_preset`).

Every preset here is built and saved inside the test session (tiny random
models, tokenizers trained on the spot; see `tiny_presets.py`) and loaded
through KerasHub's own loaders, the code path of a downloaded preset.
"""

import os
import sys

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_fam.models import FAMBackbone, FAMCausalLM
from keras_fam.models.presets import transfer_weights

sys.path.insert(0, os.path.dirname(__file__))
from tiny_presets import FAMILIES, build_tiny_preset, corpus  # noqa: E402

# 20 tokens: 3 blocks of 8; with 3 memory segments every token sees the
# whole prefix, so a FAM model without FAM is the original model.
LENGTH, BLOCK = 20, 8
COVERING = dict(block_size=BLOCK, memory_segments=3, fam_length=0)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            built[family] = build_tiny_preset(family, directory)
        return built[family]

    return get


def _padded_inputs(vocabulary_size, seed=0):
    rng = np.random.RandomState(seed)
    token_ids = rng.randint(3, vocabulary_size, size=(2, LENGTH))
    padding_mask = np.ones((2, LENGTH), "int32")
    padding_mask[1, 13:] = 0  # right padding, as KerasHub's packers do
    token_ids = np.where(padding_mask, token_ids, 0).astype("int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_keras_hub(preset, family):
    path = preset(family)
    original = keras_hub.models.CausalLM.from_preset(path)
    converted = FAMCausalLM.from_preset(path, **COVERING)
    assert isinstance(converted.backbone, FAMBackbone)
    # The preprocessor (and tokenizer) is the preset's own.
    assert type(converted.preprocessor) is type(original.preprocessor)

    inputs = _padded_inputs(original.backbone.vocabulary_size)
    expected = _numpy(original(inputs))
    received = _numpy(converted(inputs))
    real = inputs["padding_mask"].astype(bool)
    assert np.abs(expected[real]).max() > 1.0  # logits of order one
    np.testing.assert_allclose(received[real], expected[real], atol=1e-4)

    # The comparison can fail: a window that no longer covers the input
    # changes the logits of the last block.
    narrow = FAMCausalLM.from_preset(
        path, block_size=BLOCK, memory_segments=1, fam_length=0
    )
    difference = np.abs(_numpy(narrow(inputs)) - expected)[real]
    assert difference.max() > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "llama3", "gpt2"])
def test_backbone_from_preset_equals_keras_hub_backbone(preset, family):
    path = preset(family)
    original = keras_hub.models.Backbone.from_preset(path)
    converted = FAMBackbone.from_preset(path, **COVERING)
    inputs = _padded_inputs(original.vocabulary_size, seed=1)
    real = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(
        _numpy(converted(inputs))[real],
        _numpy(original(inputs))[real],
        atol=1e-4,
    )
    # The summary embeddings are the only new weights.
    assert converted.fam_summary_embedding.shape == (0, original.hidden_dim)
    original_count = sum(int(np.prod(w.shape)) for w in original.weights)
    converted_count = sum(
        int(np.prod(w.shape))
        for w in converted.weights
        if not w.path.startswith(("state_passing/", "position_offset/"))
    )
    assert converted_count == original_count


def test_llama3_rope_scaling_is_carried(preset):
    backbone = FAMBackbone.from_preset(preset("llama3"), **COVERING)
    attention = backbone.transformer_layers[0].attention
    assert attention.rope_frequency_scaling == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    assert attention.rope_max_wavelength == 500000


def test_gemma2_quirks_are_carried(preset):
    backbone = FAMBackbone.from_preset(preset("gemma2"), **COVERING)
    layer = backbone.transformer_layers[0]
    assert layer.sandwich_norm
    assert layer.attention.logit_soft_cap == 2.0
    assert backbone.final_logit_soft_cap == 3.0
    assert backbone.embedding_scale == pytest.approx(32**0.5)
    # KerasHub's Gemma attention always scales queries by head_dim ** -0.5
    # (it ignores `query_head_dim_normalize=False`); so does the FAM model.
    assert layer.attention.query_scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize("family", ["llama"])
def test_lora_fit_lowers_loss_and_generates(preset, family):
    model = FAMCausalLM.from_preset(
        preset(family), block_size=8, memory_segments=1, fam_length=2
    )
    assert model.backbone.fam_length == 2
    model.preprocessor.sequence_length = 25
    model.backbone.enable_lora(2)
    # Only the adapters, the new summary embeddings and (Keras' LoRA
    # freezes kernels only) GPT-2's biases train.
    trainable = [w.path for w in model.trainable_weights]
    assert any("lora" in path for path in trainable)
    assert all(
        "lora" in path or path.endswith(("fam_summary_embedding", "/bias"))
        for path in trainable
    ), trainable
    # A "long document": sentences joined well past one block.
    documents = [" ".join(corpus()[i : i + 4]) for i in range(0, 64, 4)]
    model.compile(
        optimizer=keras.optimizers.Adam(2e-2),
        sampler="greedy",
    )
    history = model.fit(documents, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.1, losses

    text = model.generate("the cat", max_length=12, stop_token_ids=None)
    assert isinstance(text, str) and text.startswith("the cat")
    assert len(text) > len("the cat")


@pytest.mark.parametrize("family", ["gemma2", "mistral", "gpt2"])
def test_converted_model_is_a_preset(preset, family, tmp_path):
    model = FAMCausalLM.from_preset(
        preset(family), block_size=8, memory_segments=1, fam_length=2
    )
    # Make the new summary embeddings distinct from a fresh initialisation.
    model.backbone.fam_summary_embedding.assign(
        np.random.RandomState(3).normal(
            size=model.backbone.fam_summary_embedding.shape
        )
    )
    directory = str(tmp_path / "fam")
    model.save_to_preset(directory)

    inputs = _padded_inputs(model.backbone.vocabulary_size, seed=2)
    expected = _numpy(model(inputs))
    for loaded in (
        FAMCausalLM.from_preset(directory),
        keras_hub.models.CausalLM.from_preset(directory),
    ):
        assert type(loaded) is FAMCausalLM
        assert loaded.backbone.get_config() == model.backbone.get_config()
        np.testing.assert_allclose(_numpy(loaded(inputs)), expected, atol=1e-6)
        assert type(loaded.preprocessor) is type(model.preprocessor)
        np.testing.assert_array_equal(
            _numpy(loaded.preprocessor.tokenizer("the red cat")),
            _numpy(model.preprocessor.tokenizer("the red cat")),
        )
    for backbone in (
        FAMBackbone.from_preset(directory),
        keras_hub.models.Backbone.from_preset(directory),
    ):
        assert type(backbone) is FAMBackbone
        np.testing.assert_allclose(
            _numpy(backbone(inputs)),
            _numpy(model.backbone(inputs)),
            atol=1e-6,
        )
    # FAM settings of a FAM preset can be overridden on load.
    longer = FAMCausalLM.from_preset(directory, block_size=16)
    assert longer.backbone.block_size == 16


def test_wrong_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        FAMCausalLM.from_preset(str(tmp_path / "no_such_preset"))
    with pytest.raises(ValueError, match="preset"):
        FAMBackbone.from_preset("no_such_builtin_preset_name")


def test_unsupported_family_lists_supported_ones(tmp_path):
    backbone = keras_hub.models.OPTBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    directory = str(tmp_path / "opt")
    backbone.save_to_preset(directory)
    for cls in (FAMBackbone, FAMCausalLM):
        with pytest.raises(ValueError, match="OPTBackbone") as error:
            cls.from_preset(directory)
        for family in ("gemma", "llama", "mistral", "gpt2"):
            assert family in str(error.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=-8), "block_size"),
        (dict(memory_segments=-1), "memory_segments"),
        (dict(fam_length=1.5), "fam_length"),
        (dict(dtype="int8"), "dtype"),
        (dict(dtype="int32"), "dtype"),
        (dict(dtype="float17"), "dtype"),
        (dict(hidden_dim=64), "hidden_dim"),
    ],
)
def test_incompatible_overrides_are_clear_errors(preset, overrides, match):
    with pytest.raises(ValueError, match=match):
        FAMCausalLM.from_preset(preset("llama"), **overrides)


def test_bfloat16_dtype_is_applied(preset):
    backbone = FAMBackbone.from_preset(
        preset("llama"), dtype="bfloat16", **COVERING
    )
    assert backbone.dtype_policy.name == "bfloat16"
    kernel = backbone.transformer_layers[0].attention.query.kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "bfloat16"


def test_weight_mapping_must_be_complete_and_shape_exact(preset):
    from keras_fam.models.presets import convert_backbone, llama

    original = keras_hub.models.Backbone.from_preset(preset("llama"))
    target = convert_backbone(original, load_weights=False, **COVERING)
    mapping = llama.weight_map(original)
    incomplete = dict(mapping)
    incomplete.pop("transformer_layer_1/attention/value/kernel")
    with pytest.raises(ValueError, match="value/kernel"):
        transfer_weights(incomplete, original, target)
    wrong_shape = {
        **mapping,
        "transformer_layer_0/attention/query/kernel": (
            "transformer_layer_0/self_attention/query/kernel",
            lambda kernel: kernel[:, :1],
        ),
    }
    with pytest.raises(ValueError, match="shape"):
        transfer_weights(wrong_shape, original, target)
    missing = {**mapping, "layer_norm/scale": ("no/such/weight", None)}
    with pytest.raises(ValueError, match="no/such/weight"):
        transfer_weights(missing, original, target)


def test_gemma_with_one_post_norm_cannot_be_converted():
    from keras_fam.models.presets import convert_backbone

    original = keras_hub.models.GemmaBackbone(
        vocabulary_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        use_post_attention_norm=True,
    )
    with pytest.raises(ValueError, match="use_post_attention_norm"):
        convert_backbone(original)
