from keras_fam.layers.fam_attention import FAMAttention
from keras_fam.layers.feedforward import FeedForward
from keras_fam.layers.rms_normalization import RMSNormalization
from keras_fam.layers.transformer_fam import TransformerFAM

__all__ = ["FAMAttention", "FeedForward", "RMSNormalization", "TransformerFAM"]
