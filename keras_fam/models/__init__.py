"""KerasHub models built on TransformerFAM (needs the `hub` extra:
`pip install keras-fam[hub]`)."""

from keras_fam.models.fam_backbone import FAMBackbone

__all__ = ["FAMBackbone"]
