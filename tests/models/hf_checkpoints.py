"""Tiny random Hugging Face checkpoints (`transformers`' `save_pretrained`).

Each builder makes a randomly initialised `transformers` causal LM of one
family with odd sizes (grouped-query heads, a head size that is not
`hidden_size / num_attention_heads` where the family allows it, tied and
untied embeddings), re-draws its weights with a large spread so that logits
are of order one, and saves it as `config.json` + `model.safetensors`:
exactly what KerasHub's transformers loader reads from a downloaded
checkpoint. No tokenizer is saved (the tests pass `preprocessor=None`).
"""

import numpy as np

VOCAB = 97


def _configs():
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return {
        "llama": tf.LlamaConfig(**common, tie_word_embeddings=False),
        "llama_tied": tf.LlamaConfig(**common, tie_word_embeddings=True),
        "llama3_1": tf.LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
        ),
        "gemma": tf.GemmaConfig(
            **common, head_dim=12, hidden_activation="gelu_pytorch_tanh"
        ),
        "gemma2": tf.Gemma2Config(
            **common,
            head_dim=12,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=256,
        ),
        "mistral": tf.MistralConfig(
            **common,
            head_dim=12,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        "qwen2": tf.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(
            **common, head_dim=12, tie_word_embeddings=False
        ),
        # Six layers: five local (sliding window, RoPE base 1e4) and one
        # global (base 1e6, linear scaling 8), as in Gemma 3.
        "gemma3": tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6},
            head_dim=12,
            query_pre_attn_scalar=12,
            sliding_window=256,
            rope_parameters={
                "full_attention": {
                    "rope_type": "linear",
                    "factor": 8.0,
                    "rope_theta": 1000000.0,
                },
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                },
            },
        ),
        "gpt2": tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    }


FAMILIES = (
    "llama",
    "llama_tied",
    "llama3_1",
    "gemma",
    "gemma2",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "gpt2",
)


def config(family):
    return _configs()[family]


def randomize(model, seed=0):
    """Re-draw every parameter: matrices and embeddings `N(0, 0.3)`, norm
    weights around their neutral value (`0` for Gemma's `1 + weight`
    norms, else `1`), biases `N(0, 0.1)`."""
    import torch

    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = rng.normal(size=tuple(parameter.shape))
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")):
                if name.endswith(".bias"):
                    value = 0.1 * noise
                else:
                    neutral = 0.0 if not parameter.abs().sum() else 1.0
                    value = neutral + 0.2 * noise
            elif name.endswith("ln_f.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = 0.3 * noise
            parameter.copy_(torch.tensor(value, dtype=parameter.dtype))


def build(family, directory, seed=0):
    """Save a tiny random `family` checkpoint under `directory`; return the
    `transformers` model (eager attention, float32, eval mode) and the
    path."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config(family), attn_implementation="eager", dtype=torch.float32
    )
    randomize(model, seed)
    model.eval()
    model.save_pretrained(str(directory))
    return model, str(directory)


def logits(model, token_ids, padding_mask):
    """`transformers`' own forward pass, as NumPy."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(token_ids), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(padding_mask)),
        )
    return out.logits.float().numpy()
