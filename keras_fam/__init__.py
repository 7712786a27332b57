"""keras-fam: TransformerFAM (Feedback Attention Memory) for Keras 3."""

import importlib.util

from keras_fam import layers, training

__all__ = ["layers", "training"]

# The models (and the streaming state and streamer that drive them,
# `keras_fam.state`) need KerasHub (the `hub` extra); the layers work
# without it.
if importlib.util.find_spec("keras_hub") is not None:
    from keras_fam import models, state  # noqa: F401 (re-exported)

    __all__ += ["models", "state"]

__version__ = "0.1.0"
