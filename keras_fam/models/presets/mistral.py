"""Mistral (KerasHub `MistralBackbone`) -> `FAMBackbone`.

Llama's architecture (RMS norms, SwiGLU, grouped-query attention, untied
embeddings) with an optional explicit `head_dim` and linear RoPE position
scaling (`rope_scaling_factor`). Mistral's sliding window becomes the FAM
model's block window: each block sees itself, `memory_segments` previous
blocks and the FAM (choose `(memory_segments + 1) * block_size` near the
preset's `sliding_window` to keep its receptive field).
"""

from keras_fam.models.presets import llama


def convert_config(backbone):
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_query_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        num_key_value_heads=backbone.num_key_value_heads,
        head_dim=backbone.head_dim,
        feedforward="gated",
        activation="silu",
        normalization="rms_norm",
        layer_norm_epsilon=backbone.layer_norm_epsilon,
        use_bias=False,
        position_embedding="rope",
        rope_max_wavelength=backbone.rope_max_wavelength,
        rope_scaling_factor=backbone.rope_scaling_factor,
        tie_word_embeddings=backbone.token_embedding.tie_weights,
        dropout=backbone.dropout,
    )


def weight_map(backbone):
    # Same layer and weight names as KerasHub's Llama.
    return llama.weight_map(backbone)
