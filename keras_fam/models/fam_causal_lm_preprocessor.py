"""FAMCausalLMPreprocessor: KerasHub's causal LM preprocessing for FAM."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_fam.models.fam_backbone import FAMBackbone


@keras.saving.register_keras_serializable(package="keras_fam")
class FAMCausalLMPreprocessor(CausalLMPreprocessor):
    """Tokenize, pack and shift text for `keras_fam.models.FAMCausalLM`.

    KerasHub's `CausalLMPreprocessor` with any KerasHub tokenizer (a FAM
    model reuses the vocabulary of the checkpoint it was converted from:
    Gemma, Llama, GPT-2 ...).

    Args:
        tokenizer: a `keras_hub.tokenizers.Tokenizer`.
        sequence_length: int. Packed length. Defaults to `1024`.
        add_start_token: bool. Defaults to `True`.
        add_end_token: bool. Defaults to `True`.

    Example:

    >>> tokenizer = keras_hub.tokenizers.ByteTokenizer()
    >>> preprocessor = FAMCausalLMPreprocessor(tokenizer, sequence_length=8)
    >>> x, y, sample_weight = preprocessor(["hello"])
    """

    backbone_cls = FAMBackbone
