"""Phi-3 (KerasHub `Phi3Backbone`) -> `FAMBackbone`.

Llama's architecture (RMS norms, SwiGLU, grouped-query attention, head size
`hidden_dim // num_heads`, no biases, untied embeddings) under other layer
names. Only presets without RoPE scaling (`rope_scaling_type=None`: the 4k
context models) are converted; Phi-3's LongRoPE (`"su"`, per-frequency
short and long factors, the 128k models) has no `FAMBackbone` equivalent.
KerasHub 0.32 has no Hugging Face converter for Phi-3, so Phi-3 loads from
KerasHub presets only.
"""

from keras_fam.models.presets import llama


def convert_config(backbone):
    if backbone.rope_scaling_type is not None:
        raise ValueError(
            "keras_fam converts Phi-3 presets without RoPE scaling; this "
            "Phi3Backbone uses LongRoPE. Received: rope_scaling_type="
            f"{backbone.rope_scaling_type!r}"
        )
    return llama.llama_like_config(backbone)


def weight_map(backbone):
    names = {
        "self_attention_layernorm": "pre_attention_layernorm",
        "self_attention/": "attention/",
        "feedforward_layernorm": "post_attention_layernorm",
    }
    mapping = {}
    for target, (source, transform) in llama.weight_map(backbone).items():
        for old, new in names.items():
            source = source.replace(old, new)
        mapping[target] = (source, transform)
    return mapping
