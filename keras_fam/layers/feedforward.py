"""The position-wise feedforward network of a Transformer layer."""

import keras
from keras import ops

from keras_fam.checks import (
    check_bool,
    check_choice,
    check_int,
    get_activation,
    get_initializer,
)

KINDS = ("mlp", "gated")


@keras.saving.register_keras_serializable(package="keras_fam")
class FeedForward(keras.layers.Layer):
    """Two-layer MLP or gated MLP (GeGLU / SwiGLU).

    - `kind="mlp"`: `out(act(intermediate(x)))` (GPT-2).
    - `kind="gated"`: `out(act(gate(x)) * intermediate(x))`; with
      `activation="gelu_approximate"` this is Gemma's gated GELU, with
      `activation="silu"` Llama's SwiGLU.

    Sublayers are named `feedforward_intermediate_dense`,
    `feedforward_gate_dense` (gated only) and `feedforward_output_dense`, as in
    KerasHub's Llama, so LoRA targets and layout maps find them.

    Args:
        intermediate_dim: int. Width of the hidden layer.
        kind: str. `"mlp"` or `"gated"`. Defaults to `"mlp"`.
        activation: str. A Keras activation name, or `"gelu_approximate"`
            (tanh-approximated GELU). Defaults to `"gelu"`.
        use_bias: bool. Biases on the dense layers. Defaults to `True`.
        kernel_initializer: initializer of the kernels. Defaults to
            `"glorot_uniform"`.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        intermediate_dim,
        kind="mlp",
        activation="gelu",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = check_int("intermediate_dim", intermediate_dim)
        # The argument is `feedforward` in `TransformerFAM` and the models.
        self.kind = check_choice("feedforward", kind, KINDS)
        self.activation = activation
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = get_initializer(kernel_initializer)
        self._activation_fn = get_activation(activation)

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.intermediate_dense = self._dense(
            self.intermediate_dim, "feedforward_intermediate_dense"
        )
        self.intermediate_dense.build(input_shape)
        if self.kind == "gated":
            self.gate_dense = self._dense(
                self.intermediate_dim, "feedforward_gate_dense"
            )
            self.gate_dense.build(input_shape)
        self.output_dense = self._dense(hidden_dim, "feedforward_output_dense")
        self.output_dense.build((*input_shape[:-1], self.intermediate_dim))

    def call(self, inputs):
        # The dense layers see 2D rows: on TensorFlow, a `Dense` on 3D inputs
        # of unknown batch size inside a scan has a gradient that XLA cannot
        # compile (`jit_compile=True` training with a partial last batch).
        shape = ops.shape(inputs)
        rows = ops.reshape(inputs, (-1, shape[-1]))
        hidden = self.intermediate_dense(rows)
        if self.kind == "gated":
            hidden = self._activation_fn(self.gate_dense(rows)) * hidden
        else:
            hidden = self._activation_fn(hidden)
        return ops.reshape(self.output_dense(hidden), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "kind": self.kind,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
        }
