"""Qwen 3 dense models (KerasHub `Qwen3Backbone`) -> `FAMBackbone`.

Llama's architecture (RMS norms, SwiGLU, grouped-query attention, no
biases) with an explicit `head_dim` and an RMS norm on each query and key
head before RoPE (`query_key_norm=True`, weights `(head_dim,)` shared by the
heads), linear RoPE scaling, tied or untied embeddings. Qwen 3's optional
sliding window is replaced by the FAM model's block window. (Qwen 3 MoE,
`Qwen3MoeBackbone`, has mixture-of-experts feedforwards and is not
supported.)
"""

from keras_fam.models.presets import llama


def convert_config(backbone):
    return llama.llama_like_config(
        backbone,
        head_dim=backbone.head_dim,
        query_key_norm=True,
        rope_scaling_factor=backbone.rope_scaling_factor,
    )


def weight_map(backbone):
    # Llama's layer and weight names, plus the query/key norms.
    mapping = llama.weight_map(backbone)
    for index in range(backbone.num_layers):
        prefix = f"transformer_layer_{index}/"
        for projection in ("query", "key"):
            mapping[f"{prefix}attention/{projection}_norm/scale"] = (
                f"{prefix}self_attention/{projection}_dense_layernorm/scale",
                None,
            )
    return mapping
