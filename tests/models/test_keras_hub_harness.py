"""FAMBackbone and FAMCausalLM through KerasHub's own test helpers
(`keras_hub.src.tests.test_case.TestCase`), as KerasHub's models are
tested: serialization, variable lengths, compiled predict, mixed precision,
int8/float8 quantization policies, `.keras` saving, task predict/fit with
and without split preprocessing."""

import string

import keras_hub
import numpy as np
import pytest

pytest.importorskip("grain")  # KerasHub's test_case imports it.
from keras_hub.src.tests.test_case import TestCase  # noqa: E402

from keras_fam.models import (  # noqa: E402
    FAMBackbone,
    FAMCausalLM,
    FAMCausalLMPreprocessor,
)

BACKBONE_KWARGS = dict(
    vocabulary_size=30,
    num_layers=2,
    num_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=24,
    block_size=4,
    memory_segments=1,
    fam_length=2,
)


def _tokenizer():
    vocabulary = {"<|endoftext|>": 0, "ab": 1}
    for character in string.ascii_lowercase + "Ġ":
        vocabulary[character] = len(vocabulary)
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b"])


class FAMBackboneTest(TestCase):
    def setUp(self):
        self.init_kwargs = dict(BACKBONE_KWARGS)
        self.input_data = {
            "token_ids": np.ones((2, 9), dtype="int32"),
            "padding_mask": np.ones((2, 9), dtype="int32"),
        }

    def test_backbone_basics(self):
        self.run_backbone_test(
            cls=FAMBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
            expected_output_shape=(2, 9, 16),
        )

    def test_saved_model(self):
        self.run_model_saving_test(
            cls=FAMBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
        )


class FAMCausalLMTest(TestCase):
    def setUp(self):
        self.tokenizer = _tokenizer()
        self.preprocessor = FAMCausalLMPreprocessor(
            self.tokenizer, sequence_length=10
        )
        self.backbone = FAMBackbone(
            **{
                **BACKBONE_KWARGS,
                "vocabulary_size": self.tokenizer.vocabulary_size(),
            }
        )
        self.init_kwargs = {
            "preprocessor": self.preprocessor,
            "backbone": self.backbone,
        }
        self.train_data = (["the quick brown fox", "abc abc abc"],)
        self.input_data = self.preprocessor(*self.train_data)[0]

    def test_causal_lm_basics(self):
        self.run_task_test(
            cls=FAMCausalLM,
            init_kwargs=self.init_kwargs,
            train_data=self.train_data,
            expected_output_shape=(2, 10, self.tokenizer.vocabulary_size()),
        )

    def test_saved_model(self):
        self.run_model_saving_test(
            cls=FAMCausalLM,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
        )


def _numpy(x):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x))


def test_int8_quantized_model_generates_and_reloads_from_preset(tmp_path):
    import keras

    backbone = FAMBackbone(**BACKBONE_KWARGS)
    lm = FAMCausalLM(backbone)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 30, (2, 13)).astype("int32"),
        "padding_mask": np.ones((2, 13), "int32"),
    }
    before = _numpy(lm(x))
    lm.quantize("int8")
    quantized = [
        layer.path
        for layer in lm._flatten_layers()
        if getattr(layer, "quantization_mode", None) == "int8"
    ]
    # Every attention projection and feedforward dense of both layers.
    assert len(quantized) == 2 * 7, quantized
    after = _numpy(lm(x))
    difference = np.abs(after - before).max()
    assert 0 < difference < 0.25 * np.abs(before).max()

    prompt = {
        "token_ids": np.array([[1, 2, 3] + [0] * 11], "int32"),
        "padding_mask": np.array([[1, 1, 1] + [0] * 11], bool),
    }
    generated = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    # Greedy generation with the constant-size cache equals the argmax of
    # the quantized model's full forward pass.
    logits = _numpy(
        lm({"token_ids": generated, "padding_mask": np.ones((1, 14))})
    )
    np.testing.assert_array_equal(logits.argmax(-1)[0, 2:-1], generated[0, 3:])

    directory = str(tmp_path / "int8")
    lm.save_to_preset(directory)
    for restored in (
        FAMCausalLM.from_preset(directory),
        keras_hub.models.CausalLM.from_preset(directory),
    ):
        assert isinstance(restored, FAMCausalLM)
        np.testing.assert_allclose(_numpy(restored(x)), after, atol=1e-6)
        np.testing.assert_array_equal(
            restored.generate(prompt, stop_token_ids=None)["token_ids"],
            generated,
        )
    assert (
        keras.backend.standardize_dtype(
            restored.backbone.transformer_layers[
                0
            ].attention.query._kernel.dtype
        )
        == "int8"
    )


def test_generate_without_preprocessor_needs_explicit_stop_tokens():
    # As KerasHub's causal LMs: "auto" stop tokens need a preprocessor.
    lm = FAMCausalLM(FAMBackbone(**BACKBONE_KWARGS))
    prompt = {
        "token_ids": np.array([[1, 2, 3, 0]], "int32"),
        "padding_mask": np.array([[1, 1, 1, 0]], bool),
    }
    with pytest.raises(ValueError, match="stop_token_ids"):
        lm.generate(prompt)
