"""Multi-head / grouped-query attention sublayer of a TransformerFAM layer.

It owns the projections (`query`, `key`, `value`, `attention_output`, named as
in KerasHub so `enable_lora` and layout maps find them) and rotary position
embeddings, and calls the backend's fused attention kernel. It knows nothing
about blocks or FAM: `TransformerFAM` decides which rows attend to which keys
and at which positions.

Shape letters: B batch, T rows (tokens or FAM vectors), K keys, D width,
N query heads, G key/value heads, H head dim.
"""

import math

import keras
from keras import ops

from keras_fam.checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    get_initializer,
)
from keras_fam.layers.rms_normalization import (
    NORMALIZATIONS,
    normalization_layer,
)
from keras_fam.ops import dispatch

QUERY_KEY_NORMS = NORMALIZATIONS
FREQUENCY_SCALING_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def rope_inverse_frequency(
    head_dim, max_wavelength=10000, frequency_scaling=None
):
    """Inverse frequencies `(H / 2,)` of rotary embeddings, in float32.

    Args:
        head_dim: int. Size of each head (even).
        max_wavelength: float. The RoPE base.
        frequency_scaling: `None` or a dict with the keys `factor`,
            `low_freq_factor`, `high_freq_factor` and
            `original_max_position_embeddings`: Llama 3.1's
            frequency-dependent scaling (Hugging Face's `rope_scaling` with
            `rope_type="llama3"`, KerasHub's `rope_frequency_adjustment_factor`
            family). Wavelengths longer than
            `original_max_position_embeddings / low_freq_factor` are divided
            by `factor`, shorter than `... / high_freq_factor` kept, and those
            in between interpolated smoothly. Defaults to `None`.

    Returns:
        float32 tensor of shape `(head_dim // 2,)`.
    """
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inverse_frequency = 1.0 / ops.power(float(max_wavelength), exponents)
    if frequency_scaling is None:
        return inverse_frequency
    factor = float(frequency_scaling["factor"])
    low = float(frequency_scaling["low_freq_factor"])
    high = float(frequency_scaling["high_freq_factor"])
    length = float(frequency_scaling["original_max_position_embeddings"])
    wavelength = 2.0 * math.pi / inverse_frequency
    scaled = ops.where(
        ops.greater(wavelength, length / low),
        inverse_frequency / factor,
        inverse_frequency,
    )
    smooth = (length / wavelength - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = ops.logical_and(
        ops.greater_equal(wavelength, length / high),
        ops.less_equal(wavelength, length / low),
    )
    return ops.where(medium, smoothed, scaled)


def apply_rope(
    x,
    positions,
    max_wavelength=10000,
    scaling_factor=1.0,
    frequency_scaling=None,
):
    """Rotary position embedding (the "rotate half" convention of KerasHub).

    Why not `keras_hub.layers.RotaryEmbedding(...)(x, positions=...)`, whose
    numbers agree in float32: (1) it casts `cos`/`sin` to the compute dtype
    before rotating, so under `mixed_bfloat16` a FAM stream at position
    10^5 and beyond rotates with 3-digit `cos`/`sin`, where this rotates in
    float32 and casts once; (2) it has linear and YaRN scaling but not the
    Llama 3 frequency scaling that converted Llama 3.x presets need
    (`rope_inverse_frequency`); (3) a layer per call site would add
    weightless sublayers to every saved attention layer's config.

    Args:
        x: `(B, T, N, H)` tensor, `H` even.
        positions: `(T,)` float tensor of absolute positions.
        max_wavelength: float. The RoPE base.
        scaling_factor: float. Positions are divided by it (linear scaling).
        frequency_scaling: `None` or a dict of Llama 3 frequency scaling
            arguments, see `rope_inverse_frequency`.

    Returns:
        Tensor like `x`.
    """
    head_dim = ops.shape(x)[-1]
    inverse_frequency = rope_inverse_frequency(
        head_dim, max_wavelength, frequency_scaling
    )
    positions = ops.cast(positions, "float32") / scaling_factor
    angles = positions[:, None] * inverse_frequency[None, :]  # (T, H / 2)
    cos = ops.cos(angles)[None, :, None, :]
    sin = ops.sin(angles)[None, :, None, :]
    x32 = ops.cast(x, "float32")
    first, second = ops.split(x32, 2, axis=-1)
    rotated = ops.concatenate(
        [first * cos - second * sin, second * cos + first * sin], axis=-1
    )
    return ops.cast(rotated, x.dtype)


def _check_frequency_scaling(frequency_scaling):
    if frequency_scaling is None:
        return None
    if not isinstance(frequency_scaling, dict) or set(frequency_scaling) != set(
        FREQUENCY_SCALING_KEYS
    ):
        raise ValueError(
            "`rope_frequency_scaling` must be `None` or a dict with the keys "
            f"{FREQUENCY_SCALING_KEYS}. "
            f"Received: rope_frequency_scaling={frequency_scaling!r}"
        )
    values = {
        key: check_positive(
            f"rope_frequency_scaling['{key}']", frequency_scaling[key]
        )
        for key in FREQUENCY_SCALING_KEYS
    }
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ValueError(
            "`rope_frequency_scaling` values must be positive with "
            "`high_freq_factor > low_freq_factor`. "
            f"Received: rope_frequency_scaling={frequency_scaling!r}"
        )
    return dict(frequency_scaling)


@keras.saving.register_keras_serializable(package="keras_fam")
class FAMAttention(keras.layers.Layer):
    """Projections, RoPE and fused attention of a TransformerFAM layer.

    Args:
        num_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads (grouped-query
            attention); must divide `num_heads`. Defaults to `num_heads`.
        head_dim: int. Size of each head. Defaults to width // `num_heads`.
        use_bias: bool. Biases on the four projections. Defaults to `False`.
        qkv_bias: bool. Biases on the query, key and value projections
            only, not on the output projection (Qwen 2). Implied by
            `use_bias`. Defaults to `False`.
        query_key_norm: `None` or the normalization (`"rms_norm"`,
            `"rms_norm_unit_offset"`, `"layer_norm"`) applied to each head
            of the queries and keys, after projection and before RoPE
            (Qwen 3: `"rms_norm"`; Gemma 3: `"rms_norm_unit_offset"`). Its
            weights (`query_norm`, `key_norm`) have shape `(head_dim,)`,
            shared by all heads. Defaults to `None`.
        query_key_norm_epsilon: float. Epsilon of the query/key norms.
            Defaults to `1e-6`.
        use_rope: bool. Rotary position embeddings on queries and keys; turn
            off for models with learned absolute positions (GPT-2).
            Defaults to `True`.
        rope_max_wavelength: float. RoPE base. Defaults to `10000`.
        rope_scaling_factor: float. Linear RoPE position scaling.
            Defaults to `1.0`.
        rope_frequency_scaling: `None` or a dict with the keys `factor`,
            `low_freq_factor`, `high_freq_factor` and
            `original_max_position_embeddings`: Llama 3.1's RoPE frequency
            scaling (see `rope_inverse_frequency`). Defaults to `None`.
        query_scale: float. Multiplies the attention logits. Defaults to
            `head_dim ** -0.5`.
        logit_soft_cap: float or `None`. Soft-caps the logits as
            `cap * tanh(logits / cap)` (Gemma 2). Defaults to `None`.
        kernel_initializer: initializer of the kernels. Defaults to
            `"glorot_uniform"`.
        attention_implementation: `"auto"` (the backend's fused kernel) or
            `"reference"` (`keras.ops` only). Defaults to `"auto"`.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        num_heads,
        num_key_value_heads=None,
        head_dim=None,
        use_bias=False,
        use_rope=True,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        query_scale=None,
        logit_soft_cap=None,
        kernel_initializer="glorot_uniform",
        attention_implementation="auto",
        rope_frequency_scaling=None,
        qkv_bias=False,
        query_key_norm=None,
        query_key_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_heads = check_int("num_heads", num_heads)
        if num_key_value_heads is None:
            num_key_value_heads = num_heads
        num_key_value_heads = check_int(
            "num_key_value_heads", num_key_value_heads
        )
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        use_bias = check_bool("use_bias", use_bias)
        use_rope = check_bool("use_rope", use_rope)
        if query_key_norm is not None:
            check_choice("query_key_norm", query_key_norm, QUERY_KEY_NORMS)
        if num_heads % num_key_value_heads:
            raise ValueError(
                "`num_key_value_heads` must divide `num_heads`. Received: "
                f"num_key_value_heads={num_key_value_heads}, "
                f"num_heads={num_heads}"
            )
        if head_dim is not None:
            head_dim = check_int("head_dim", head_dim)
            if use_rope and head_dim % 2:
                raise ValueError(
                    "`head_dim` must be even with `use_rope=True`. "
                    f"Received: head_dim={head_dim}"
                )
        dispatch.check_implementation(
            attention_implementation, "attention_implementation"
        )
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.use_bias = use_bias
        self.qkv_bias = qkv_bias
        self.query_key_norm = query_key_norm
        self.query_key_norm_epsilon = check_positive(
            "query_key_norm_epsilon", query_key_norm_epsilon
        )
        self.use_rope = use_rope
        # Zero or negative values would give NaN (or inf) rotations.
        self.rope_max_wavelength = check_positive(
            "rope_max_wavelength", rope_max_wavelength
        )
        self.rope_scaling_factor = check_positive(
            "rope_scaling_factor", rope_scaling_factor
        )
        self.rope_frequency_scaling = _check_frequency_scaling(
            rope_frequency_scaling
        )
        # A non-positive scale or soft cap inverts or breaks the softmax.
        self.query_scale = check_positive(
            "query_scale", query_scale, optional=True
        )
        self.logit_soft_cap = check_positive(
            "logit_soft_cap", logit_soft_cap, optional=True
        )
        self.kernel_initializer = get_initializer(kernel_initializer)
        self.attention_implementation = attention_implementation

    def _projection(self, equation, output_shape, bias_axes, name, bias):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if bias else None,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if self.head_dim is None:
            if hidden_dim % self.num_heads:
                raise ValueError(
                    "`num_heads` must divide the input width when `head_dim` "
                    f"is not given. Received: num_heads={self.num_heads}, "
                    f"width={hidden_dim}"
                )
            self.head_dim = hidden_dim // self.num_heads
            if self.use_rope and self.head_dim % 2:
                raise ValueError(
                    "`head_dim` (width // num_heads) must be even with "
                    f"`use_rope=True`. Received: head_dim={self.head_dim}"
                )
        heads, groups, size = (
            self.num_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        qkv_bias = self.use_bias or self.qkv_bias
        self.query = self._projection(
            "btd,dnh->btnh", (None, heads, size), "nh", "query", qkv_bias
        )
        self.query.build(input_shape)
        self.key = self._projection(
            "btd,dgh->btgh", (None, groups, size), "gh", "key", qkv_bias
        )
        self.key.build(input_shape)
        self.value = self._projection(
            "btd,dgh->btgh", (None, groups, size), "gh", "value", qkv_bias
        )
        self.value.build(input_shape)
        self.attention_output = self._projection(
            "btnh,nhd->btd",
            (None, hidden_dim),
            "d",
            "attention_output",
            self.use_bias,
        )
        self.attention_output.build((None, None, heads, size))
        if self.query_key_norm is not None:
            self.query_norm = self._head_norm("query_norm")
            self.query_norm.build((None, None, heads, size))
            self.key_norm = self._head_norm("key_norm")
            self.key_norm.build((None, None, groups, size))

    def _head_norm(self, name):
        return normalization_layer(
            self.query_key_norm,
            self.query_key_norm_epsilon,
            dtype=self.dtype_policy,
            name=name,
        )

    def _rope(self, x, positions):
        if not self.use_rope:
            return x
        return apply_rope(
            x,
            positions,
            self.rope_max_wavelength,
            self.rope_scaling_factor,
            self.rope_frequency_scaling,
        )

    def project_query(self, hidden, positions):
        """`(B, T, D)` normed rows -> `(B, T, N, H)` (normed) rotated
        queries."""
        query = self.query(hidden)
        if self.query_key_norm is not None:
            query = self.query_norm(query)
        return self._rope(query, positions)

    def project_key_value(self, hidden, positions):
        """`(B, T, D)` normed rows -> (normed) rotated keys and values
        `(B, T, G, H)`."""
        key = self.key(hidden)
        if self.query_key_norm is not None:
            key = self.key_norm(key)
        return self._rope(key, positions), self.value(hidden)

    def attend(self, query, key, value, mask):
        """Attention of `query` over `key`/`value` under a bool `(B, T, K)`
        mask, followed by the output projection. Returns `(B, T, D)`."""
        scale = self.query_scale
        if scale is None:
            scale = self.head_dim**-0.5
        out = dispatch.attention(
            query,
            key,
            value,
            mask,
            scale=float(scale),
            logit_soft_cap=self.logit_soft_cap,
            implementation=self.attention_implementation,
        )
        return self.attention_output(out)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "use_bias": self.use_bias,
            "qkv_bias": self.qkv_bias,
            "query_key_norm": self.query_key_norm,
            "query_key_norm_epsilon": self.query_key_norm_epsilon,
            "use_rope": self.use_rope,
            "rope_max_wavelength": self.rope_max_wavelength,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_frequency_scaling": self.rope_frequency_scaling,
            "query_scale": self.query_scale,
            "logit_soft_cap": self.logit_soft_cap,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "attention_implementation": self.attention_implementation,
        }
