"""Qwen 2 / Qwen 2.5 (KerasHub `QwenBackbone`) -> `FAMBackbone`.

Llama's architecture (RMS norms, SwiGLU, grouped-query attention, head size
`hidden_dim // num_heads`) with biases on the query, key and value
projections only (`qkv_bias=True`; none on the output projection or the
feedforward network), linear RoPE scaling (`rope_scaling_factor`), tied or
untied embeddings. Qwen's optional sliding window is replaced by the FAM
model's block window.
"""

from keras_fam.models.presets import llama


def convert_config(backbone):
    return llama.llama_like_config(
        backbone,
        qkv_bias=True,
        rope_scaling_factor=backbone.rope_scaling_factor,
    )


def weight_map(backbone):
    # Llama's layer and weight names, plus the query/key/value biases.
    mapping = llama.weight_map(backbone)
    for index in range(backbone.num_layers):
        prefix = f"transformer_layer_{index}/"
        for projection in ("query", "key", "value"):
            mapping[f"{prefix}attention/{projection}/bias"] = (
                f"{prefix}self_attention/{projection}/bias",
                None,
            )
    return mapping
