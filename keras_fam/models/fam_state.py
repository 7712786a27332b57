"""FAMState: a `FAMBackbone`'s streaming state, savable to disk.

The state of a backbone is one `keras_fam.layers.layer_state` dict per
layer; `FAMState` adds the signature of the configuration that made it and
saves to / loads from a NumPy `.npz` file bit for bit: one array per layer
and key (`layer_{i}/{key}`) and a JSON `__meta__` entry (signature, dtypes,
layer count).
"""

import json

import keras
import numpy as np
from keras import ops

from keras_fam.layers.layer_state import LayerState

SIGNATURE_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_heads",
    "hidden_dim",
    "intermediate_dim",
    "block_size",
    "memory_segments",
    "fam_length",
    "num_key_value_heads",
    "head_dim",
    "position_embedding",
)


def model_signature(backbone):
    """The configuration a state depends on, as a JSON string."""
    config = backbone.get_config()
    signature = {key: config.get(key) for key in SIGNATURE_KEYS}
    signature["class"] = type(backbone).__name__
    return json.dumps(signature, sort_keys=True)


class FAMState:
    """The streaming state of a `FAMBackbone`, savable to disk.

    Args:
        layers: tuple with one state dict per layer, as returned by
            `FAMBackbone.get_initial_state()` or `FAMBackbone.stream()`.
        signature: str from `model_signature(backbone)`.

    Example:

    >>> state = FAMState.initial(backbone, batch_size=1)
    >>> state.save("doc.npz")
    >>> state = FAMState.load("doc.npz")
    """

    def __init__(self, layers, signature):
        self.layers = tuple(layers)
        self.signature = signature

    @classmethod
    def initial(cls, backbone, batch_size=1):
        """A fresh state for `backbone`."""
        return cls(
            backbone.get_initial_state(batch_size), model_signature(backbone)
        )

    @property
    def position(self):
        """Number of tokens this state has seen."""
        return int(ops.convert_to_numpy(self.layers[0]["index"]))

    @property
    def batch_size(self):
        return int(self.layers[0]["block_mask"].shape[0])

    @property
    def nbytes(self):
        """Size in bytes (constant: independent of `position`)."""
        return sum(
            int(np.prod(value.shape))
            * np.dtype(_numpy_dtype(value.dtype)).itemsize
            for layer in self.layers
            for value in layer.values()
        )

    def check_model(self, backbone):
        """Raises a `ValueError` if this state was made by a model with a
        different configuration."""
        expected = model_signature(backbone)
        if self.signature != expected:
            raise ValueError(
                "`state` comes from another model. This model: "
                f"{expected}. Received: state of {self.signature}"
            )
        backbone.check_state(self.layers, self.batch_size)

    def save(self, path):
        """Save to a `.npz` file (bit-exact)."""
        arrays, dtypes = {}, {}
        for index, layer in enumerate(self.layers):
            for name, (array, dtype) in LayerState.to_numpy(layer).items():
                arrays[f"layer_{index}/{name}"] = array
                dtypes[f"layer_{index}/{name}"] = dtype
        meta = {
            "signature": self.signature,
            "dtypes": dtypes,
            "num_layers": len(self.layers),
        }
        arrays["__meta__"] = np.asarray(json.dumps(meta))
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path):
        """Load a state saved by `save`."""
        with np.load(path, allow_pickle=False) as data:
            if "__meta__" not in data:
                raise ValueError(
                    f"`path` is not a saved FAMState. Received: path={path}"
                )
            meta = json.loads(str(data["__meta__"]))
            layers = []
            for index in range(meta["num_layers"]):
                prefix = f"layer_{index}/"
                layers.append(
                    LayerState.from_numpy(
                        {
                            key[len(prefix) :]: (data[key], dtype)
                            for key, dtype in meta["dtypes"].items()
                            if key.startswith(prefix)
                        }
                    )
                )
        return cls(layers, meta["signature"])


def _numpy_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return "uint16" if dtype == "bfloat16" else dtype
