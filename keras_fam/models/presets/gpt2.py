"""GPT-2 (KerasHub `GPT2Backbone`) -> `FAMBackbone`.

Quirks carried over: learned absolute position embeddings (no RoPE; the
table bounds the total sequence length to `max_sequence_length`), biases on
every projection, LayerNorm (`epsilon=1e-5`), a two-layer MLP with
tanh-approximated GELU, tied input/output embeddings.
"""


def convert_config(backbone):
    block = backbone.transformer_layers[0]
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        feedforward="mlp",
        activation="gelu_approximate",
        normalization="layer_norm",
        layer_norm_epsilon=block.layer_norm_epsilon,
        use_bias=True,
        position_embedding="learned",
        max_sequence_length=backbone.max_sequence_length,
        tie_word_embeddings=True,
        dropout=backbone.dropout,
    )


def weight_map(backbone):
    mapping = {
        "token_embedding/embeddings": ("token_embedding/embeddings", None),
        "position_embedding/embeddings": (
            "position_embedding/embeddings",
            None,
        ),
        "layer_norm/gamma": ("layer_norm/gamma", None),
        "layer_norm/beta": ("layer_norm/beta", None),
    }
    for index in range(backbone.num_layers):
        prefix = f"transformer_layer_{index}/"
        pairs = {
            "attention_norm": "self_attention_layer_norm",
            "feedforward_norm": "feedforward_layer_norm",
        }
        for target, source in pairs.items():
            for weight in ("gamma", "beta"):
                mapping[f"{prefix}{target}/{weight}"] = (
                    f"{prefix}{source}/{weight}",
                    None,
                )
        for projection in ("query", "key", "value", "attention_output"):
            for weight in ("kernel", "bias"):
                mapping[f"{prefix}attention/{projection}/{weight}"] = (
                    f"{prefix}self_attention/{projection}/{weight}",
                    None,
                )
        for dense in (
            "feedforward_intermediate_dense",
            "feedforward_output_dense",
        ):
            for weight in ("kernel", "bias"):
                mapping[f"{prefix}feedforward/{dense}/{weight}"] = (
                    f"{prefix}{dense}/{weight}",
                    None,
                )
    return mapping
