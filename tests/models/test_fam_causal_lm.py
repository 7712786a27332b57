"""FAMCausalLM: fit, constant-cache generation, samplers, saving, errors."""

import os
import string

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models
from keras import ops

from keras_fam.models import FAMBackbone, FAMCausalLM, FAMCausalLMPreprocessor

VOCAB = 23
BLOCK = 4


def tiny_lm(**overrides):
    return tiny_models.tiny_lm(VOCAB, **{"block_size": BLOCK, **overrides})


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def pattern_data(samples=16, length=12, seed=0):
    """Sequences that count up by a per-row step modulo VOCAB: learnable."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCAB, (samples, 1))
    step = rng.integers(1, 3, (samples, 1))
    ids = (start + step * np.arange(length + 1)) % VOCAB
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((samples, length), bool),
    }
    return x, ids[:, 1:].astype("int32")


def test_fit_lowers_the_loss():
    lm = tiny_lm()
    lm.compile(optimizer=keras.optimizers.Adam(3e-2))
    x, y = pattern_data()
    history = lm.fit(x, y, batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "lengths",
    # Shortest prompts at, just before and just after block boundaries
    # (2 * BLOCK: an exact multiple of `block_size`), and a 1-token prompt.
    [
        (14, 10),
        (14, 2 * BLOCK),
        (2 * BLOCK - 1, 14),
        (2 * BLOCK + 1, 9),
        (BLOCK, BLOCK),
        (1, 6),
    ],
)
def test_greedy_generate_equals_argmax_of_full_forward(lengths):
    """More than 3 * block_size + 5 generated tokens, crossing FAM updates,
    from prompts of different lengths; every prompt token before the
    shortest prompt's last one is prefilled (whole blocks by the block loop,
    the partial block in one call), the rest token by token."""
    lm = tiny_lm()
    shortest = min(lengths)
    prompt = np.zeros((2, 14 + 3 * BLOCK + 5), "int32")
    mask = np.zeros_like(prompt, bool)
    rng = np.random.default_rng(3)
    for row, length in enumerate(lengths):
        prompt[row, :length] = rng.integers(0, VOCAB, length)
        mask[row, :length] = True
    cache, index = lm._build_cache(prompt, mask)
    assert int(numpy(index)) == shortest
    assert int(numpy(cache[0]["index"])) == shortest - 1
    # The prefilled cache is the streaming state of those tokens.
    streamed = lm.backbone.get_initial_state(2)
    if shortest > 1:
        _, streamed = lm.backbone.stream(prompt[:, : shortest - 1], streamed)
    for got, want in zip(cache, streamed, strict=True):
        for key in ("fam", "memory_key", "memory_mask", "block_mask"):
            np.testing.assert_allclose(
                numpy(got[key]), numpy(want[key]), atol=1e-5
            )
        # Block rows past the prefilled tokens are masked out (and later
        # overwritten): only the real rows must agree.
        real = numpy(want["block_mask"])
        np.testing.assert_allclose(
            numpy(got["block_key"])[real],
            numpy(want["block_key"])[real],
            atol=1e-5,
        )
    out = lm.generate(
        {"token_ids": prompt, "padding_mask": mask}, stop_token_ids=None
    )
    ids = out["token_ids"]
    np.testing.assert_array_equal(ids[mask], prompt[mask])
    logits = numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    predicted = logits.argmax(-1)
    for row, length in enumerate(lengths):
        assert ids.shape[1] - length >= 3 * BLOCK + 5
        np.testing.assert_array_equal(
            predicted[row, length - 1 : -1], ids[row, length:]
        )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only TensorFlow's `generate` depends on `jit_compile`",
)
def test_generate_same_tokens_with_and_without_jit_compile():
    """On TensorFlow `generate` uses XLA unless `jit_compile=False`: both
    paths give the same tokens."""
    lm = tiny_lm()
    prompt = np.zeros((1, 3 * BLOCK + 3), "int32")
    prompt[0, : BLOCK + 1] = np.arange(1, BLOCK + 2)
    inputs = {"token_ids": prompt, "padding_mask": prompt > 0}
    default = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    lm.compile(jit_compile=False)
    plain = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(plain, default)


def test_generation_cache_has_a_fixed_size():
    lm = tiny_lm()
    short = lm.backbone.get_initial_state(1)
    ids = np.arange(40)[None] % VOCAB
    _, _, long = lm.call_with_cache(ids, short)
    for before, after in zip(short, long, strict=True):
        for key in before:
            assert tuple(before[key].shape) == tuple(after[key].shape), key
    assert int(numpy(long[0]["index"])) == 40


def test_samplers_and_stop_tokens():
    """Top-k with k=1 and top-p with a tiny p must reproduce greedy search;
    top-k with k=5 stays in the vocabulary and keeps the prompt; a stop
    token masks everything after it."""
    lm = tiny_lm()
    prompt = {
        "token_ids": np.array([[2, 4, 6]], "int32"),
        "padding_mask": np.array([[1, 1, 1]], bool),
    }
    greedy = lm.generate(prompt, max_length=12, stop_token_ids=None)
    for sampler in (
        keras_hub.samplers.TopKSampler(k=1),
        keras_hub.samplers.TopPSampler(p=1e-6),
    ):
        lm.compile(sampler=sampler)
        sampled = lm.generate(prompt, max_length=12, stop_token_ids=None)
        np.testing.assert_array_equal(sampled["token_ids"], greedy["token_ids"])
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=1))
    ids = lm.generate(prompt, max_length=12, stop_token_ids=None)["token_ids"]
    assert ids.shape == (1, 12) and ids.min() >= 0 and ids.max() < VOCAB
    np.testing.assert_array_equal(ids[:, :3], prompt["token_ids"])
    lm.compile(sampler="greedy")
    stop = int(greedy["token_ids"][0, 5])
    out = lm.generate(prompt, max_length=12, stop_token_ids=(stop,))
    first = 3 + int(np.argmax(greedy["token_ids"][0, 3:] == stop))
    np.testing.assert_array_equal(
        out["padding_mask"][0], np.arange(12) <= first
    )


def test_keras_file_round_trip(tmp_path):
    lm = tiny_lm(tie_word_embeddings=False, final_logit_soft_cap=5.0)
    x, _ = pattern_data(samples=2)
    expected = numpy(lm(x))
    assert np.abs(expected).max() <= 5.0
    path = os.path.join(tmp_path, "lm.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, FAMCausalLM)
    np.testing.assert_array_equal(numpy(restored(x)), expected)


def test_preset_round_trip(tmp_path):
    lm = tiny_lm()
    x, _ = pattern_data(samples=2)
    expected = numpy(lm(x))
    preset = os.path.join(tmp_path, "preset")
    lm.save_to_preset(preset)
    backbone = FAMBackbone.from_preset(preset)
    np.testing.assert_array_equal(numpy(lm.logits(backbone(x))), expected)
    restored = FAMCausalLM.from_preset(preset)
    np.testing.assert_array_equal(numpy(restored(x)), expected)
    via_hub = keras_hub.models.CausalLM.from_preset(preset)
    assert isinstance(via_hub, FAMCausalLM)


def test_preprocessor_generate_strings():
    vocabulary = {"<|endoftext|>": 0, "ab": 1}
    for character in string.ascii_lowercase + "Ġ":
        vocabulary[character] = len(vocabulary)
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["a b"]
    )
    preprocessor = FAMCausalLMPreprocessor(tokenizer, sequence_length=16)
    lm = tiny_models.tiny_lm(
        len(vocabulary),
        preprocessor=preprocessor,
        num_layers=1,
        hidden_dim=8,
        intermediate_dim=8,
    )
    text = lm.generate("abc", max_length=10, stop_token_ids=None)
    assert isinstance(text, str) and text.startswith("abc")
    # Start token + "ab" + "c" and 7 generated tokens (one character each).
    assert len(tokenizer(text)) == 9
    with pytest.raises(ValueError, match="max_length"):
        lm.generate("a much longer prompt", max_length=5)


def test_generate_bad_input_raises():
    lm = tiny_lm()
    prompt = {"token_ids": np.array([[1, 2, 3, 4, 5]], "int32")}
    with pytest.raises(ValueError, match="max_length"):
        lm.generate(prompt, max_length=3, stop_token_ids=None)
    with pytest.raises(ValueError, match="max_length"):
        lm.generate(prompt, max_length=0, stop_token_ids=None)
    with pytest.raises(TypeError, match="token_ids"):
        lm.generate(
            {"token_ids": np.ones((1, 4), "float32")},
            max_length=8,
            stop_token_ids=None,
        )
    with pytest.raises(ValueError, match="token_ids"):
        lm.generate(
            {"token_ids": np.array([[1, VOCAB]])},
            max_length=8,
            stop_token_ids=None,
        )
    with pytest.raises(ValueError, match="padding_mask"):
        lm.generate(
            {
                "token_ids": np.ones((1, 4), "int32"),
                "padding_mask": np.ones((1, 3), bool),
            },
            max_length=8,
            stop_token_ids=None,
        )
    other = tiny_lm(fam_length=3)
    with pytest.raises(ValueError, match="state"):
        lm.call_with_cache(
            np.ones((1, 1), "int32"), other.backbone.get_initial_state(1)
        )
    with pytest.raises(ValueError, match="backbone"):
        FAMCausalLM(
            keras_hub.models.GPT2Backbone(
                vocabulary_size=10,
                num_layers=1,
                num_heads=1,
                hidden_dim=4,
                intermediate_dim=4,
                max_sequence_length=8,
            )
        )
