"""FAMState: a `FAMBackbone`'s streaming state, savable to disk.

The state of a backbone is one `keras_fam.layers.layer_state` dict per
layer; `FAMState` adds the signature of the configuration that made it and
saves to / loads from a NumPy `.npz` file bit for bit: one array per layer
and key (`layer_{i}/{key}`) and a JSON `__meta__` entry (signature, dtypes,
layer count).
"""

import json
import zipfile
import zlib

import keras
import numpy as np
from keras import ops

from keras_fam.layers.layer_state import INDEX_KEYS, KEYS, MASK_KEYS, LayerState
from keras_fam.models.fam_backbone import FAMBackbone

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

META_KEYS = ("signature", "dtypes", "num_layers")
# Bounds of a file `load` accepts (a state is never read on trust).
MAX_LAYERS = 1024
MAX_META_BYTES = 1 << 24
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_ALLOWED_DTYPES = {
    **{name: ("bool",) for name in MASK_KEYS},
    **{name: ("int32",) for name in INDEX_KEYS},
}
# The signature entries the state's shapes follow from.
_SHAPE_KEYS = (
    "num_layers",
    "num_heads",
    "hidden_dim",
    "block_size",
    "memory_segments",
    "fam_length",
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

    def cast_to(self, backbone):
        """This state with every tensor in `backbone`'s state dtypes (a
        state saved by a model of another dtype policy, or before the FAM
        was carried in float32)."""
        layers = [
            layer.state_spec.cast(state)
            for layer, state in zip(
                backbone.transformer_layers, self.layers, strict=True
            )
        ]
        return FAMState(layers, self.signature)

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
    def load(cls, path, model=None):
        """Load a state saved by `save`.

        The file is checked before any array is read: an uncompressed
        `.npz` archive (as `save` writes it) whose metadata has exactly the
        keys `save` writes, a layer count in `[1, MAX_LAYERS]` that matches
        the arrays present, one array per layer and state key with a dtype
        from the allowed ones (`bool` masks, `int32` positions, `float32`,
        `bfloat16` or `float16` values) and the shape the signature (or
        `model`) implies. Arrays are read without pickle. Positions must be
        non-negative and equal across layers.

        Args:
            path: str. A file written by `save`.
            model: optional `FAMBackbone` or `FAMCausalLM`: the state must
                come from a model of the same configuration (checked before
                any array is read), and its tensors take that model's state
                dtypes. Defaults to `None`.

        Returns:
            A `FAMState`.

        Raises:
            ValueError: naming `path` and what is wrong with the file.
        """
        backbone = None if model is None else getattr(model, "backbone", model)
        if backbone is not None and not isinstance(backbone, FAMBackbone):
            raise TypeError(
                "`model` must be a FAMCausalLM or a FAMBackbone. "
                f"Received: model={type(model).__name__}"
            )
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, ValueError) as error:
            raise _file_error(path, f"not a .npz archive ({error})") from None
        with archive:
            try:
                return cls._read(archive, path, backbone)
            except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
                raise _file_error(path, f"unreadable ({e})") from None

    @classmethod
    def _read(cls, archive, path, backbone):
        entries = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise _file_error(path, f"unexpected entry {info.filename!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _file_error(
                    path, f"entry {info.filename!r} is compressed"
                )
            entries[info.filename[: -len(".npy")]] = info
        if "__meta__" not in entries:
            raise _file_error(path, "no `__meta__` entry (not a FAMState)")
        if entries["__meta__"].file_size > MAX_META_BYTES:
            raise _file_error(
                path,
                f"metadata of {entries['__meta__'].file_size} bytes "
                f"(at most {MAX_META_BYTES})",
            )
        meta = _read_array(archive, entries["__meta__"], path)
        if meta.dtype.kind != "U" or meta.shape != ():
            raise _file_error(path, "`__meta__` is not a JSON string")
        try:
            meta = json.loads(str(meta))
            signature = json.loads(meta["signature"])
        except (ValueError, TypeError, KeyError) as error:
            raise _file_error(
                path, f"metadata is not valid ({error})"
            ) from None
        layers = _check_meta(meta, signature, set(entries) - {"__meta__"}, path)
        if backbone is not None and meta["signature"] != model_signature(
            backbone
        ):
            raise ValueError(
                f"`path` {path!r} holds the state of another model. This "
                f"model: {model_signature(backbone)}. Received: state of "
                f"{meta['signature']}"
            )
        # Shapes and dtypes from the array headers, before reading data.
        headers = {
            key: _read_header(archive, entries[key], path)
            for key in meta["dtypes"]
        }
        batch_size = headers["layer_0/block_mask"][0][:1]
        if len(batch_size) != 1:
            raise _file_error(path, "`layer_0/block_mask` has no batch axis")
        specs = (
            [layer.state_spec for layer in backbone.transformer_layers]
            if backbone is not None
            else [LayerState.from_config(signature)] * layers
        )
        for key, (shape, dtype) in headers.items():
            index, name = _split(key)
            expected = specs[index].shapes(batch_size[0])[name][0]
            stored = meta["dtypes"][key].replace("bfloat16", "float32")
            if dtype != np.dtype(stored) or shape != expected:
                raise _file_error(
                    path,
                    f"`{key}` is a {dtype} array of shape {shape}; the "
                    f"metadata and signature call for {stored} {expected}",
                )
        states = [{} for _ in range(layers)]
        for key in meta["dtypes"]:
            index, name = _split(key)
            array = _read_array(archive, entries[key], path)
            states[index][name] = (array, meta["dtypes"][key])
        for name in INDEX_KEYS:
            values = {int(state[name][0]) for state in states}
            if min(values) < 0 or len(values) > 1:
                raise _file_error(
                    path,
                    f"`{name}` must be one non-negative value for every "
                    f"layer; found {sorted(values)}",
                )
        state = cls(
            [LayerState.from_numpy(state) for state in states],
            meta["signature"],
        )
        return state if backbone is None else state.cast_to(backbone)


def _file_error(path, why):
    return ValueError(
        f"`path` is not a valid saved FAMState: {why}. Received: path={path!r}"
    )


def _split(key):
    """`"layer_3/fam"` -> `(3, "fam")`."""
    prefix, name = key.split("/", 1)
    return int(prefix[len("layer_") :]), name


def _check_meta(meta, signature, arrays, path):
    """Validates the metadata schema; returns the layer count."""
    if not isinstance(meta, dict) or set(meta) != set(META_KEYS):
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise _file_error(
            path, f"metadata keys must be {sorted(META_KEYS)}, found {keys}"
        )
    layers = meta["num_layers"]
    if (
        isinstance(layers, bool)
        or not isinstance(layers, int)
        or not 1 <= layers <= MAX_LAYERS
    ):
        raise _file_error(
            path, f"`num_layers` must be in [1, {MAX_LAYERS}], found {layers!r}"
        )
    if not isinstance(signature, dict) or not set(_SHAPE_KEYS) <= set(
        signature
    ):
        raise _file_error(path, f"the signature lacks {list(_SHAPE_KEYS)}")
    for key in _SHAPE_KEYS:
        value = signature[key]
        low = 0 if key in ("memory_segments", "fam_length") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _file_error(path, f"signature {key}={value!r}")
    if signature["num_layers"] != layers:
        raise _file_error(
            path,
            f"`num_layers` is {layers} but the signature says "
            f"{signature['num_layers']}",
        )
    expected = {f"layer_{i}/{name}" for i in range(layers) for name in KEYS}
    dtypes = meta["dtypes"]
    if not isinstance(dtypes, dict) or set(dtypes) != expected:
        raise _file_error(
            path,
            f"`dtypes` must name the {len(KEYS)} state arrays of each of "
            f"{layers} layers",
        )
    if arrays != expected:
        missing, extra = sorted(expected - arrays), sorted(arrays - expected)
        raise _file_error(
            path,
            f"the arrays do not match {layers} layers (missing "
            f"{missing[:3]}, unexpected {extra[:3]})",
        )
    for key, dtype in dtypes.items():
        allowed = _ALLOWED_DTYPES.get(_split(key)[1], FLOAT_DTYPES)
        if dtype not in allowed:
            raise _file_error(
                path, f"`{key}` has dtype {dtype!r}; allowed: {allowed}"
            )
    return layers


def _read_header(archive, info, path):
    """`(shape, dtype)` of an `.npy` entry, without reading its data; the
    entry's size must match them."""
    with archive.open(info) as file:
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(file)
            else:
                header = np.lib.format.read_array_header_2_0(file)
        except ValueError as error:
            raise _file_error(
                path, f"`{info.filename}` is not an array ({error})"
            ) from None
        shape, fortran, dtype = header
        size = int(np.prod(shape)) * dtype.itemsize
        if fortran or dtype.hasobject or info.file_size != file.tell() + size:
            raise _file_error(
                path, f"`{info.filename}` is not a plain array of its size"
            )
    return tuple(shape), dtype


def _read_array(archive, info, path):
    with archive.open(info) as file:
        try:
            return np.lib.format.read_array(file, allow_pickle=False)
        except ValueError as error:
            raise _file_error(
                path, f"`{info.filename}` is not an array ({error})"
            ) from None


def _numpy_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return "uint16" if dtype == "bfloat16" else dtype
