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
    return llama.llama_like_config(
        backbone,
        head_dim=backbone.head_dim,
        rope_scaling_factor=backbone.rope_scaling_factor,
    )


def weight_map(backbone):
    # Same layer and weight names as KerasHub's Llama.
    return llama.weight_map(backbone)
