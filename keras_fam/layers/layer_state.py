"""LayerState: the streaming state of one TransformerFAM layer, in one place.

A layer's state is a plain dict of tensors (so it passes through `jit`,
`tf.function`, `ops.while_loop` and KerasHub's samplers as is) with the keys
`LayerState.KEYS`:

    fam                      (B, F, D)     the FAM carried to the next block
    fam_key, fam_value       (B, F, G, H)  its keys/values (RoPE applied)
    memory_key, memory_value (B, M*S, G, H) the last M whole blocks
    memory_mask              (B, M*S)      which memory tokens are real
    block_key, block_value   (B, S, G, H)  the current, open block
    block_mask               (B, S)        which of its tokens are real
    index                    ()            tokens seen (int32)
    position_offset          ()            added to every RoPE position

`LayerState` describes that dict for one layer configuration: its shapes
and dtypes, fresh values, checks, the memory roll at a block's end, the
write of streamed tokens into the open block, the key layout a streamed
token attends to, detaching it from autograd, and its conversion to and from
NumPy arrays (what `keras_fam.models.FAMState` saves). `TransformerFAM`,
`keras_fam.models.FAMBackbone` and `keras_fam.models.FAMState` all use it.

Shape letters: B batch, D width, F FAM length, G key/value heads, H head dim,
M memory segments, S block size.
"""

import keras
import numpy as np
from keras import ops

from keras_fam.checks import shapes_match

KEYS = (
    "fam",
    "fam_key",
    "fam_value",
    "memory_key",
    "memory_value",
    "memory_mask",
    "block_key",
    "block_value",
    "block_mask",
    "index",
    "position_offset",
)
MASK_KEYS = ("memory_mask", "block_mask")
INDEX_KEYS = ("index", "position_offset")


class LayerState:
    """Shapes, initial values, checks and updates of a layer's state dict.

    Args:
        block_size: int. Tokens per block (S).
        memory_segments: int. Whole blocks kept in memory (M).
        fam_length: int. FAM vectors (F).
        hidden_dim: int. Width of the layer (D).
        num_key_value_heads: int. Key/value heads (G).
        head_dim: int. Size of each head (H).
        dtype: str. Dtype of the keys and values (the layer's compute
            dtype).
        fam_dtype: str. Dtype of the carried FAM. Defaults to `dtype`.
    """

    KEYS = KEYS

    def __init__(
        self,
        block_size,
        memory_segments,
        fam_length,
        hidden_dim,
        num_key_value_heads,
        head_dim,
        dtype="float32",
        fam_dtype=None,
    ):
        self.block_size = block_size
        self.memory_segments = memory_segments
        self.fam_length = fam_length
        self.hidden_dim = hidden_dim
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.dtype = keras.backend.standardize_dtype(dtype)
        self.fam_dtype = keras.backend.standardize_dtype(fam_dtype or dtype)

    @classmethod
    def from_config(cls, config, dtype="float32", fam_dtype=None):
        """From a `FAMBackbone` config (or a saved state's signature):
        `block_size`, `memory_segments`, `fam_length`, `hidden_dim`,
        `num_heads`, optional `num_key_value_heads` and `head_dim`."""
        heads = config.get("num_key_value_heads") or config["num_heads"]
        head_dim = config.get("head_dim") or (
            config["hidden_dim"] // config["num_heads"]
        )
        return cls(
            config["block_size"],
            config["memory_segments"],
            config["fam_length"],
            config["hidden_dim"],
            heads,
            head_dim,
            dtype=dtype,
            fam_dtype=fam_dtype,
        )

    # === Shapes and fresh values ===

    def dtypes(self):
        """`{name: dtype}`: the FAM in `fam_dtype`, keys and values in
        `dtype`, masks bool, positions int32."""
        return {
            name: "bool"
            if name in MASK_KEYS
            else "int32"
            if name in INDEX_KEYS
            else self.fam_dtype
            if name == "fam"
            else self.dtype
            for name in KEYS
        }

    def shapes(self, batch_size):
        """`{name: (shape, dtype)}`; nothing depends on the position."""
        groups, head_dim = self.num_key_value_heads, self.head_dim
        memory = self.memory_segments * self.block_size
        size, fam = self.block_size, self.fam_length
        shapes = {
            "fam": (batch_size, fam, self.hidden_dim),
            "fam_key": (batch_size, fam, groups, head_dim),
            "fam_value": (batch_size, fam, groups, head_dim),
            "memory_key": (batch_size, memory, groups, head_dim),
            "memory_value": (batch_size, memory, groups, head_dim),
            "memory_mask": (batch_size, memory),
            "block_key": (batch_size, size, groups, head_dim),
            "block_value": (batch_size, size, groups, head_dim),
            "block_mask": (batch_size, size),
            "index": (),
            "position_offset": (),
        }
        dtypes = self.dtypes()
        return {name: (shapes[name], dtypes[name]) for name in KEYS}

    def zeros(self, batch_size, position_offset=0):
        """A fresh state: zeros everywhere (the caller sets the FAM and its
        keys/values), position 0."""
        state = {
            name: ops.zeros(shape, dtype=dtype)
            for name, (shape, dtype) in self.shapes(batch_size).items()
            if name not in INDEX_KEYS
        }
        state["index"] = ops.convert_to_tensor(0, "int32")
        state["position_offset"] = ops.cast(position_offset, "int32")
        return state

    def specs(self, batch_size):
        """`{name: keras.KerasTensor}` (symbolic shapes)."""
        return {
            name: keras.KerasTensor(shape, dtype=dtype)
            for name, (shape, dtype) in self.shapes(batch_size).items()
        }

    # === Checks ===

    def check(self, state, batch_size=None, name="state"):
        """Raises a `ValueError` unless `state` is a state of this
        configuration for `batch_size` rows (`None` matches any)."""
        if not isinstance(state, dict) or set(state) != set(KEYS):
            keys = sorted(state) if isinstance(state, dict) else type(state)
            raise ValueError(
                f"`{name}` must be a dict with keys {sorted(KEYS)} as "
                "returned by `get_initial_state()` or `return_state=True`. "
                f"Received: {name} with keys {keys}"
            )
        for key, (expected, _) in self.shapes(batch_size).items():
            received = tuple(state[key].shape)
            if not shapes_match(received, expected):
                raise ValueError(
                    f"`{name}` comes from a differently configured layer "
                    f"(block_size={self.block_size}, memory_segments="
                    f"{self.memory_segments}, fam_length={self.fam_length}, "
                    f"width {self.hidden_dim}): {name}['{key}'] should have "
                    f"shape {expected}. Received: {received}"
                )

    def cast(self, state):
        """`state` with its FAM, keys, values and masks in this
        configuration's dtypes (a state made under another dtype policy, or
        from NumPy arrays); positions are left as they are."""
        dtypes = self.dtypes()
        return {
            name: value
            if name in INDEX_KEYS
            or (
                hasattr(value, "dtype")
                and keras.backend.standardize_dtype(value.dtype) == dtypes[name]
            )
            else ops.cast(value, dtypes[name])
            for name, value in state.items()
        }

    # === Updates ===

    def roll(self, memory, block):
        """`memory` without its oldest block, `block` appended."""
        if not self.memory_segments:
            return memory
        return ops.concatenate([memory[:, self.block_size :], block], axis=1)

    def write(self, state, offset, key, value, mask, advance):
        """`state` with streamed tokens' keys/values/mask written into the
        open block at in-block `offset` and the position advanced."""
        return {
            **state,
            "block_key": _write_at(state["block_key"], offset, key),
            "block_value": _write_at(state["block_value"], offset, value),
            "block_mask": _write_at(state["block_mask"], offset, mask),
            "index": state["index"] + advance,
        }

    def close_block(self, state, fam, fam_key, fam_value):
        """`state` after its open block ended: the new FAM (and its
        keys/values), the block rolled into memory, an empty block."""
        return {
            **state,
            "fam": fam,
            "fam_key": fam_key,
            "fam_value": fam_value,
            "memory_key": self.roll(state["memory_key"], state["block_key"]),
            "memory_value": self.roll(
                state["memory_value"], state["block_value"]
            ),
            "memory_mask": self.roll(state["memory_mask"], state["block_mask"]),
            "block_key": ops.zeros_like(state["block_key"]),
            "block_value": ops.zeros_like(state["block_value"]),
            "block_mask": ops.zeros_like(state["block_mask"]),
        }

    def keys(self, state):
        """The keys a streamed token attends to, [memory ; FAM ; block],
        their values and their validity `(B, K)`."""
        keys = ops.concatenate(
            [state["memory_key"], state["fam_key"], state["block_key"]], axis=1
        )
        values = ops.concatenate(
            [state["memory_value"], state["fam_value"], state["block_value"]],
            axis=1,
        )
        fam_mask = ops.ones_like(state["fam"][:, :, 0], dtype="bool")
        key_mask = ops.concatenate(
            [state["memory_mask"], fam_mask, state["block_mask"]], axis=1
        )
        return keys, values, key_mask

    def detach(self, state):
        """`state` with no gradient history (`ops.stop_gradient` on its
        float tensors): what a stream carries outside training."""
        return {
            name: value
            if name in MASK_KEYS or name in INDEX_KEYS
            else ops.stop_gradient(value)
            for name, value in state.items()
        }

    # === NumPy (saving) ===

    @staticmethod
    def to_numpy(state):
        """`{name: (array, dtype)}`: NumPy arrays bit for bit, and the
        tensor dtype (bfloat16, which NumPy lacks, is stored as float32)."""
        arrays = {}
        for name, value in state.items():
            dtype = keras.backend.standardize_dtype(value.dtype)
            array = np.asarray(ops.convert_to_numpy(value))
            if dtype == "bfloat16":
                array = array.astype("float32")
            arrays[name] = (array, dtype)
        return arrays

    @staticmethod
    def from_numpy(arrays):
        """The inverse of `to_numpy`: `{name: (array, dtype)}` -> state."""
        state = {}
        for name, (array, dtype) in arrays.items():
            state[name] = ops.cast(ops.convert_to_tensor(array), dtype)
        return state


def _write_at(buffer, offset, update):
    """`buffer` with `update` written at `offset` along axis 1.

    A static offset uses slicing and concatenation, which has gradients on
    every backend (TensorFlow's `slice_update` has none outside XLA); a
    run-time offset (compiled generation) uses `ops.slice_update`.
    """
    if isinstance(offset, int):
        end = offset + update.shape[1]
        return ops.concatenate(
            [buffer[:, :offset], update, buffer[:, end:]], axis=1
        )
    start = (0, offset) + (0,) * (len(buffer.shape) - 2)
    return ops.slice_update(buffer, start, update)
