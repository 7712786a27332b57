"""The tiny FAM language models the model tests build (one definition)."""

from keras_fam.models import FAMBackbone, FAMCausalLM

TINY_CONFIG = dict(
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=24,
    block_size=4,
    memory_segments=1,
    fam_length=2,
)


def tiny_backbone(vocabulary, **overrides):
    """A 2-layer `FAMBackbone` (width 16, block 4, M1, F2) over `vocabulary`
    tokens; `overrides` replace any argument (`vocabulary_size` too)."""
    return FAMBackbone(
        **{**TINY_CONFIG, "vocabulary_size": vocabulary, **overrides}
    )


def tiny_lm(vocabulary, preprocessor=None, **overrides):
    """`tiny_backbone(vocabulary, **overrides)` in a `FAMCausalLM`."""
    return FAMCausalLM(
        tiny_backbone(vocabulary, **overrides), preprocessor=preprocessor
    )
