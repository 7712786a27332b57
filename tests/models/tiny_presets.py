"""Tiny KerasHub presets built locally for the preset-conversion tests.

Each builder makes a randomly initialised KerasHub backbone of one family and
a tokenizer trained here on a small generated corpus (SentencePiece for
Gemma, Llama and Mistral, a byte-level BPE from `tokenizers` for Llama 3 and
GPT-2), and saves both with KerasHub's own `save_to_preset`, so that loading
goes through exactly the code path of a downloaded preset.

Weights are re-drawn with a large spread (norm scales and biases too), so
that logits are of order one and a wrong weight mapping cannot hide under the
comparison tolerance.
"""

import io
import json
import os

import keras
import keras_hub
import numpy as np

FAMILIES = (
    "gemma",
    "gemma2",
    "llama",
    "llama3",
    "mistral",
    "phi3",
    "gpt2",
)

_WORDS = (
    "the a one two red blue green cat dog bird fish tree house river stone "
    "runs sits jumps sings reads writes sees finds keeps holds under over "
    "near far quickly slowly today night morning key number secret remember "
    "memory block window long short story book page line word letter"
).split()


def corpus(num_sentences=400, seed=0):
    """Deterministic pseudo-English sentences."""
    rng = np.random.RandomState(seed)
    sentences = []
    for _ in range(num_sentences):
        length = rng.randint(4, 12)
        words = rng.choice(_WORDS, size=length)
        sentences.append(" ".join(words) + ".")
    return sentences


def train_sentencepiece(special, vocabulary_size=128):
    """A unigram SentencePiece proto (bytes) with the given special ids.

    `special` maps `pad`, `unk`, `bos`, `eos` to `(id, piece)`; id `-1`
    disables one.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    options = {}
    for name, (index, piece) in special.items():
        options[f"{name}_id"] = index
        if index >= 0:
            options[f"{name}_piece"] = piece
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=3,
        **options,
    )
    return model.getvalue()


def train_byte_pair(special_tokens, vocabulary_size=330):
    """A byte-level BPE `(vocabulary, merges)` in GPT-2 format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [
        merge if isinstance(merge, str) else " ".join(merge)
        for merge in state["merges"]
    ]
    return dict(state["vocab"]), merges


def _tokenizer(family):
    if family in ("gemma", "gemma2"):
        proto = train_sentencepiece(
            {
                "pad": (0, "<pad>"),
                "eos": (1, "<eos>"),
                "bos": (2, "<bos>"),
                "unk": (3, "<unk>"),
            }
        )
        return keras_hub.models.GemmaTokenizer(proto=proto)
    if family in ("llama", "mistral", "phi3"):
        proto = train_sentencepiece(
            {
                "unk": (0, "<unk>"),
                "bos": (1, "<s>"),
                "eos": (2, "<|endoftext|>" if family == "phi3" else "</s>"),
                "pad": (-1, None),
            }
        )
        if family == "llama":
            return keras_hub.models.LlamaTokenizer(proto=proto)
        if family == "phi3":
            return keras_hub.models.Phi3Tokenizer(proto=proto)
        return keras_hub.models.MistralTokenizer(proto=proto)
    if family == "llama3":
        vocabulary, merges = train_byte_pair(
            [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        )
        return keras_hub.models.Llama3Tokenizer(
            vocabulary=vocabulary, merges=merges
        )
    if family == "gpt2":
        vocabulary, merges = train_byte_pair(["<|endoftext|>"])
        return keras_hub.models.GPT2Tokenizer(
            vocabulary=vocabulary, merges=merges
        )
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}")


def _backbone(family, vocabulary_size):
    common = dict(vocabulary_size=vocabulary_size, num_layers=2)
    if family in ("gemma", "gemma2"):
        config = dict(
            **common,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=96,
            head_dim=8,
        )
        if family == "gemma2":
            # Small caps so that they change the numbers; a window larger
            # than any test input (the FAM model's own window replaces it).
            config.update(
                use_post_ffw_norm=True,
                use_post_attention_norm=True,
                attention_logit_soft_cap=2.0,
                final_logit_soft_cap=3.0,
                use_sliding_window_attention=True,
                sliding_window_size=256,
                query_head_dim_normalize=False,
            )
        return keras_hub.models.GemmaBackbone(**config)
    if family == "llama":
        return keras_hub.models.LlamaBackbone(
            **common,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            rope_max_wavelength=10000,
        )
    if family == "llama3":
        # A short "pre-training length" puts the RoPE scaling bands inside
        # the test's positions.
        return keras_hub.models.Llama3Backbone(
            **common,
            num_query_heads=4,
            num_key_value_heads=1,
            hidden_dim=32,
            intermediate_dim=64,
            rope_max_wavelength=500000,
            rope_frequency_adjustment_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_pretraining_sequence_length=16,
        )
    if family == "mistral":
        return keras_hub.models.MistralBackbone(
            **common,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            head_dim=12,
            rope_scaling_factor=2.0,
            sliding_window=256,
        )
    if family == "phi3":
        return keras_hub.models.Phi3Backbone(
            **common,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=48,
        )
    if family == "gpt2":
        return keras_hub.models.GPT2Backbone(
            **common,
            num_heads=4,
            hidden_dim=32,
            intermediate_dim=64,
            max_sequence_length=128,
            dropout=0.0,
        )
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}")


def randomize_weights(model, seed=0):
    """Re-draw every weight: kernels and embeddings `N(0, 0.3)`, norm scales
    around their neutral value, biases `N(0, 0.1)`."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        name = variable.path.split("/")[-1]
        noise = rng.normal(size=shape)
        if name in ("scale", "gamma"):
            # Gemma's scale is an offset (it multiplies by `1 + scale`).
            neutral = 0.0 if _is_zero(variable) else 1.0
            value = neutral + 0.2 * noise
        elif name in ("bias", "beta"):
            value = 0.1 * noise
        else:
            value = 0.3 * noise
        variable.assign(
            value.astype(keras.backend.standardize_dtype(variable.dtype))
        )


def _is_zero(variable):
    return not np.any(keras.ops.convert_to_numpy(variable))


def build_tiny_preset(family, directory, seed=0):
    """Save a tiny random `family` preset (backbone + tokenizer) under
    `directory` and return its path."""
    tokenizer = _tokenizer(family)
    backbone = _backbone(family, tokenizer.vocabulary_size())
    randomize_weights(backbone, seed)
    os.makedirs(directory, exist_ok=True)
    backbone.save_to_preset(directory)
    tokenizer.save_to_preset(directory)
    return str(directory)
