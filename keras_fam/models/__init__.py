"""KerasHub models built on TransformerFAM (needs the `hub` extra:
`pip install keras-fam[hub]`)."""

from keras_fam.models.fam_backbone import FAMBackbone
from keras_fam.models.fam_causal_lm import FAMCausalLM
from keras_fam.models.fam_causal_lm_preprocessor import (
    FAMCausalLMPreprocessor,
)
from keras_fam.models.fam_state import FAMState
from keras_fam.models.fam_streamer import FAMStreamer

__all__ = [
    "FAMBackbone",
    "FAMCausalLM",
    "FAMCausalLMPreprocessor",
    "FAMState",
    "FAMStreamer",
]
