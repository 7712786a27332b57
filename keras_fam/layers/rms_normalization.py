"""The norms of keras_fam: root-mean-square layer normalization, as in Llama
(`scale`) and Gemma (`1 + scale`), and `normalization_layer`, the one
factory every layer and model builds its norms with.

Why not `keras.layers.RMSNormalization`: it has no Gemma unit offset, and its
weight is named differently (`scale` here, as in KerasHub's Llama and Gemma
norms and in every file saved by keras_fam), so presets and `.keras` files
would no longer load. The math is the same (`rms_normalize`).
"""

import keras
from keras import ops

from keras_fam.checks import check_bool, check_choice, check_positive

NORMALIZATIONS = ("layer_norm", "rms_norm", "rms_norm_unit_offset")


def normalization_layer(kind, epsilon, dtype=None, name=None):
    """A norm layer of `kind` (one of `NORMALIZATIONS`): Keras'
    `LayerNormalization`, or `RMSNormalization` with (Gemma) or without
    (Llama) unit offset."""
    check_choice("normalization", kind, NORMALIZATIONS)
    epsilon = check_positive("layer_norm_epsilon", epsilon)
    if kind == "layer_norm":
        return keras.layers.LayerNormalization(
            epsilon=epsilon, dtype=dtype, name=name
        )
    return RMSNormalization(
        epsilon=epsilon,
        unit_offset=kind == "rms_norm_unit_offset",
        dtype=dtype,
        name=name,
    )


def rms_normalize(x, epsilon=1e-6):
    """`x / sqrt(mean(x ** 2) + epsilon)` over the last axis, in float32
    (no scale)."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(
        ops.mean(ops.square(x), axis=-1, keepdims=True) + epsilon
    )


@keras.saving.register_keras_serializable(package="keras_fam")
class RMSNormalization(keras.layers.Layer):
    """RMS normalization over the last axis, computed in float32.

    `y = x / sqrt(mean(x ** 2) + epsilon) * scale`, or `* (1 + scale)` with
    `unit_offset=True` (Gemma's convention, where `scale` starts at zero).

    Args:
        epsilon: float. Added to the mean square. Defaults to `1e-6`.
        unit_offset: bool. Multiply by `1 + scale` instead of `scale`.
            Defaults to `False`.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, epsilon=1e-6, unit_offset=False, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_positive("epsilon", epsilon)
        self.unit_offset = check_bool("unit_offset", unit_offset)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(input_shape[-1],),
            initializer="zeros" if self.unit_offset else "ones",
        )

    def call(self, inputs):
        x = rms_normalize(inputs, self.epsilon)
        scale = ops.cast(self.scale, "float32")
        x = x * (1.0 + scale if self.unit_offset else scale)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "unit_offset": self.unit_offset,
        }
