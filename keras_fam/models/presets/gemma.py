"""Gemma and Gemma 2 (KerasHub `GemmaBackbone`) -> `FAMBackbone`.

Quirks carried over:
- token embeddings are scaled by `sqrt(hidden_dim)`, output embeddings tied;
- RMS norms multiply by `1 + scale` (`normalization="rms_norm_unit_offset"`);
- gated GELU (tanh approximation): KerasHub's `ffw_gating` is the gate,
  `ffw_gating_2` the linear branch, and its `intermediate_dim` counts both
  halves (the FAM model's is half of it);
- the query scale is what KerasHub's attention layers use (read from the
  loaded layers, not the config: KerasHub 0.2x builds every Gemma attention
  with `query_head_dim_normalize=True` whatever the backbone config says);
- query/key/value kernels are stored head-first `(N, D, H)` and are
  transposed to `(D, N, H)`;
- KerasHub's Gemma RoPE interleaves the two rotated halves of each head
  after rotating; the same permutation of queries and keys leaves their dot
  products unchanged, so plain rotate-half RoPE gives the same attention;
- Gemma 2: post-attention and post-feedforward norms (`sandwich_norm`),
  attention and final logit soft caps. Its alternating local (sliding
  window) and global layers all become FAM layers: each sees its block, the
  `memory_segments` previous blocks and the FAM.
"""


def convert_config(backbone):
    block = backbone.transformer_layers[0]
    attention = block.attention
    if attention.query_head_dim_normalize:
        query_scale = backbone.head_dim**-0.5
    else:
        query_scale = (backbone.hidden_dim // backbone.num_query_heads) ** -0.5
    if backbone.use_post_attention_norm != backbone.use_post_ffw_norm:
        raise ValueError(
            "A FAM model has both post-attention and post-feedforward norms "
            "or neither. Received a Gemma preset with use_post_attention_norm="
            f"{backbone.use_post_attention_norm}, use_post_ffw_norm="
            f"{backbone.use_post_ffw_norm}"
        )
    if block.layer_norm_epsilon != backbone.layer_norm_epsilon:
        raise ValueError(
            "A FAM model uses one norm epsilon. Received a Gemma preset whose "
            f"blocks use {block.layer_norm_epsilon} and final norm "
            f"{backbone.layer_norm_epsilon}."
        )
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_query_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim // 2,
        num_key_value_heads=backbone.num_key_value_heads,
        head_dim=backbone.head_dim,
        feedforward="gated",
        activation="gelu_approximate",
        normalization="rms_norm_unit_offset",
        layer_norm_epsilon=backbone.layer_norm_epsilon,
        sandwich_norm=backbone.use_post_attention_norm,
        use_bias=False,
        position_embedding="rope",
        rope_max_wavelength=attention.rope_layer.max_wavelength,
        rope_scaling_factor=attention.rope_layer.scaling_factor,
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
    for index in range(backbone.num_layers):
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
        if backbone.use_post_attention_norm:
            pairs["post_attention_norm/scale"] = (
                "post_attention_norm/scale",
                None,
            )
            pairs["post_feedforward_norm/scale"] = ("post_ffw_norm/scale", None)
        for name, (source_name, transform) in pairs.items():
            mapping[target + name] = (source + source_name, transform)
    return mapping
