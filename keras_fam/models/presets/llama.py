"""Llama, Llama 2 and Llama 3 (KerasHub `LlamaBackbone`,
`Llama3Backbone`) -> `FAMBackbone`.

Quirks carried over:
- RMS norms (`x * scale`), SwiGLU feedforward (`silu(gate) * up`), no
  biases, grouped-query attention, head size `hidden_dim // num_heads`;
- Llama 3.1 RoPE frequency scaling (`rope_frequency_adjustment_factor`,
  `rope_low_freq_factor`, `rope_high_freq_factor`,
  `rope_pretraining_sequence_length`) becomes `rope_frequency_scaling`;
- KerasHub's Llama rotary layer ignores `rope_position_scaling_factor`
  (its inverse frequencies never use it), so the FAM model does too:
  `rope_scaling_factor=1.0`;
- input and output embeddings are tied or not as in the preset.
"""


def convert_config(backbone):
    frequency_scaling = None
    if backbone.rope_frequency_adjustment_factor is not None:
        frequency_scaling = {
            "factor": backbone.rope_frequency_adjustment_factor,
            "low_freq_factor": backbone.rope_low_freq_factor,
            "high_freq_factor": backbone.rope_high_freq_factor,
            "original_max_position_embeddings": (
                backbone.rope_pretraining_sequence_length
            ),
        }
    return llama_like_config(
        backbone,
        rope_scaling_factor=1.0,
        rope_frequency_scaling=frequency_scaling,
    )


def llama_like_config(backbone, **overrides):
    """The FAMBackbone config shared by Llama-architecture presets (RMS
    norms, SwiGLU, grouped-query attention, RoPE, no biases)."""
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_query_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        num_key_value_heads=backbone.num_key_value_heads,
        feedforward="gated",
        activation="silu",
        normalization="rms_norm",
        layer_norm_epsilon=backbone.layer_norm_epsilon,
        use_bias=False,
        position_embedding="rope",
        rope_max_wavelength=backbone.rope_max_wavelength,
        tie_word_embeddings=backbone.token_embedding.tie_weights,
        dropout=backbone.dropout,
        **overrides,
    )


def weight_map(backbone):
    mapping = {
        "token_embedding/embeddings": ("token_embedding/embeddings", None),
        "layer_norm/scale": ("sequence_output_layernorm/scale", None),
    }
    if not backbone.token_embedding.tie_weights:
        mapping["token_embedding/reverse_embeddings"] = (
            "token_embedding/reverse_embeddings",
            None,
        )
    for index in range(backbone.num_layers):
        prefix = f"transformer_layer_{index}/"
        pairs = {
            "attention_norm/scale": "self_attention_layernorm/scale",
            "attention/query/kernel": "self_attention/query/kernel",
            "attention/key/kernel": "self_attention/key/kernel",
            "attention/value/kernel": "self_attention/value/kernel",
            "attention/attention_output/kernel": (
                "self_attention/attention_output/kernel"
            ),
            "feedforward_norm/scale": "feedforward_layernorm/scale",
            "feedforward/feedforward_gate_dense/kernel": (
                "feedforward_gate_dense/kernel"
            ),
            "feedforward/feedforward_intermediate_dense/kernel": (
                "feedforward_intermediate_dense/kernel"
            ),
            "feedforward/feedforward_output_dense/kernel": (
                "feedforward_output_dense/kernel"
            ),
        }
        for name, source in pairs.items():
            mapping[prefix + name] = (prefix + source, None)
    return mapping
