"""keras-fam: TransformerFAM (Feedback Attention Memory) for Keras 3."""

import importlib.util

from keras_fam import layers, state, training

__all__ = ["layers", "state", "training"]

# The models need KerasHub (the `hub` extra); the layers work without it.
if importlib.util.find_spec("keras_hub") is not None:
    from keras_fam import models  # noqa: F401 (re-exported)

    __all__.append("models")

__version__ = "0.1.0"
