"""Gemma 3 text decoders (KerasHub `Gemma3Backbone`) -> `FAMBackbone`.

Gemma 2's layer (`normalization="rms_norm_unit_offset"`, gated GELU with
the tanh approximation, post-attention and post-feedforward norms,
`embedding_scale=sqrt(hidden_dim)`, tied embeddings, head-first
query/key/value kernels) plus:
- an RMS norm (`1 + scale`) on each query and key head before RoPE
  (`query_key_norm=True`);
- a RoPE base and linear scaling factor per layer, read from KerasHub's
  layers: its local (sliding window) layers use base 10,000, its global
  layers (every sixth) base 1,000,000 with the checkpoint's global scaling
  factor (`rope_max_wavelength` and `rope_scaling_factor` become per-layer
  lists);
- KerasHub's Gemma 3 `intermediate_dim` is the width of each gate half (no
  halving, unlike Gemma 1/2).

Local and global layers all become FAM layers: each sees its block, the
`memory_segments` previous blocks and the FAM. Gemma 3's sliding window
(512 or 1024 tokens) is not used: choose `(memory_segments + 1) *
block_size` near it to keep the local layers' receptive field.

Vision encoders (multimodal presets) and embedding models (bidirectional
attention) are not converted.
"""


def convert_config(backbone):
    if backbone.vision_encoder is not None:
        raise ValueError(
            "keras_fam converts Gemma 3 text decoders; this Gemma3Backbone "
            "has a vision encoder (a multimodal preset). Use a text-only "
            "Gemma 3 preset."
        )
    layers = backbone.transformer_layers
    block = layers[0]
    if block.use_bidirectional_attention:
        raise ValueError(
            "keras_fam converts causal Gemma 3 decoders; this Gemma3Backbone "
            "uses bidirectional attention (an embedding model)."
        )
    if block.use_post_attention_norm != block.use_post_ffw_norm:
        raise ValueError(
            "A FAM model has both post-attention and post-feedforward norms "
            "or neither. Received a Gemma 3 preset with "
            f"use_post_attention_norm={block.use_post_attention_norm}, "
            f"use_post_ffw_norm={block.use_post_ffw_norm}"
        )
    if block.query_head_dim_normalize:
        query_scale = backbone.head_dim**-0.5
    else:
        query_scale = (backbone.hidden_dim // backbone.num_query_heads) ** -0.5
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_query_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        num_key_value_heads=backbone.num_key_value_heads,
        head_dim=backbone.head_dim,
        feedforward="gated",
        activation="gelu_approximate",
        normalization="rms_norm_unit_offset",
        layer_norm_epsilon=backbone.layer_norm_epsilon,
        sandwich_norm=block.use_post_attention_norm,
        query_key_norm=block.use_query_key_norm,
        use_bias=False,
        position_embedding="rope",
        rope_max_wavelength=[
            layer.attention.rope_layer.max_wavelength for layer in layers
        ],
        rope_scaling_factor=[
            layer.attention.rope_layer.scaling_factor for layer in layers
        ],
        query_scale=query_scale,
        logit_soft_cap=backbone.attention_logit_soft_cap,
        final_logit_soft_cap=backbone.final_logit_soft_cap,
        embedding_scale=backbone.hidden_dim**0.5,
        tie_word_embeddings=True,
        dropout=backbone.dropout,
    )


def _heads_last(kernel):
    return kernel.transpose(1, 0, 2)


def weight_map(backbone):
    mapping = {
        "token_embedding/embeddings": ("token_embedding/embeddings", None),
        "layer_norm/scale": ("final_normalization/scale", None),
    }
    for index, layer in enumerate(backbone.transformer_layers):
        source = f"decoder_block_{index}/"
        target = f"transformer_layer_{index}/"
        pairs = {
            "attention_norm/scale": ("pre_attention_norm/scale", None),
            "attention/query/kernel": ("attention/query/kernel", _heads_last),
            "attention/key/kernel": ("attention/key/kernel", _heads_last),
            "attention/value/kernel": ("attention/value/kernel", _heads_last),
            "attention/attention_output/kernel": (
                "attention/attention_output/kernel",
                None,
            ),
            "feedforward_norm/scale": ("pre_ffw_norm/scale", None),
            "feedforward/feedforward_gate_dense/kernel": (
                "ffw_gating/kernel",
                None,
            ),
            "feedforward/feedforward_intermediate_dense/kernel": (
                "ffw_gating_2/kernel",
                None,
            ),
            "feedforward/feedforward_output_dense/kernel": (
                "ffw_linear/kernel",
                None,
            ),
        }
        if layer.use_query_key_norm:
            pairs["attention/query_norm/scale"] = (
                "attention/query_norm/scale",
                None,
            )
            pairs["attention/key_norm/scale"] = (
                "attention/key_norm/scale",
                None,
            )
        if layer.use_post_attention_norm:
            pairs["post_attention_norm/scale"] = (
                "post_attention_norm/scale",
                None,
            )
            pairs["post_feedforward_norm/scale"] = ("post_ffw_norm/scale", None)
        for name, (source_name, transform) in pairs.items():
            mapping[target + name] = (source + source_name, transform)
    return mapping
