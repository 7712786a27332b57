"""keras-fam: TransformerFAM (Feedback Attention Memory) for Keras 3."""

from keras_fam import layers

__version__ = "0.1.0"
