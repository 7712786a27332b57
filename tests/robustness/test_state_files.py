"""Hostile and damaged streaming-state files: `FAMState.load` validates the
file (metadata schema, layer count, dtypes, shapes, positions) before it
reads an array, and every failure is a `ValueError` naming the file.

Each corrupt file is built here from a valid one.
"""

import json
import os
import time
import zipfile

import numpy as np
import pytest
import tiny_models

from keras_fam.models import FAMState
from keras_fam.models.fam_state import MAX_LAYERS

VOCAB = 23


@pytest.fixture(scope="module")
def lm():
    return tiny_models.tiny_lm(VOCAB)


@pytest.fixture
def saved(lm, tmp_path):
    """A valid state file after 5 tokens, and its arrays and metadata."""
    state = FAMState.initial(lm.backbone, batch_size=2)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 5)).astype("int32")
    _, layers = lm.backbone.stream(ids, state.layers)
    state = FAMState(layers, state.signature)
    path = str(tmp_path / "state.npz")
    state.save(path)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data}
    meta = json.loads(str(arrays.pop("__meta__")))
    return path, arrays, meta


def rewrite(path, arrays, meta, compress=False):
    """Write `arrays` and `meta` (a dict, or a raw string) as a state."""
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save = np.savez_compressed if compress else np.savez
    with open(path, "wb") as file:
        save(file, __meta__=np.asarray(raw), **arrays)
    return path


def assert_rejected(path, match, model=None, error=ValueError):
    with pytest.raises(error, match=match) as info:
        FAMState.load(path, model=model)
    message = str(info.value)
    assert str(path) in message, message
    assert "allow_pickle" not in message, message
    return message


def test_valid_file_loads_and_fits_the_model(lm, saved):
    path, _, _ = saved
    state = FAMState.load(path, model=lm)
    assert state.position == 5 and state.batch_size == 2
    state.check_model(lm.backbone)


def test_truncated_file(saved, tmp_path):
    path, _, _ = saved
    data = open(path, "rb").read()
    for keep in (len(data) // 2, 100, 0):
        cut = str(tmp_path / f"cut_{keep}.npz")
        with open(cut, "wb") as file:
            file.write(data[:keep])
        assert_rejected(cut, "not a .npz archive")


def test_not_a_zip_file(tmp_path):
    path = str(tmp_path / "notes.npz")
    with open(path, "w") as file:
        file.write('{"signature": "json, not a zip"}')
    assert_rejected(path, "not a .npz archive")


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        FAMState.load(path)


def test_zip_without_metadata(tmp_path):
    path = str(tmp_path / "bogus.npz")
    np.savez(path, x=np.zeros(3))
    assert_rejected(path, "__meta__")


def test_metadata_not_json_or_wrong_schema(saved):
    path, arrays, meta = saved
    assert_rejected(rewrite(path, arrays, "{not json"), "metadata")
    assert_rejected(rewrite(path, arrays, "[1, 2]"), "metadata")
    for bad in (
        {**meta, "extra": 1},
        {key: value for key, value in meta.items() if key != "dtypes"},
        {**meta, "signature": "{"},
        {**meta, "signature": json.dumps({"block_size": 4})},
    ):
        assert_rejected(rewrite(path, arrays, bad), "metadata|signature")


def test_metadata_not_a_string(saved):
    path, arrays, meta = saved
    with open(path, "wb") as file:
        np.savez(file, __meta__=np.zeros(3), **arrays)
    assert_rejected(path, "JSON string")


@pytest.mark.parametrize("layers", [0, -1, 2.0, True, "2", MAX_LAYERS + 1])
def test_layer_count_out_of_range(saved, layers):
    path, arrays, meta = saved
    assert_rejected(
        rewrite(path, arrays, {**meta, "num_layers": layers}), "num_layers"
    )


def test_layer_count_inconsistent_with_arrays(saved):
    path, arrays, meta = saved
    # The metadata claims 3 layers, the file holds 2.
    signature = json.loads(meta["signature"])
    signature["num_layers"] = 3
    dtypes = dict(meta["dtypes"])
    dtypes.update(
        {
            k.replace("layer_1/", "layer_2/"): v
            for k, v in dtypes.items()
            if k.startswith("layer_1/")
        }
    )
    bad = {
        "signature": json.dumps(signature, sort_keys=True),
        "dtypes": dtypes,
        "num_layers": 3,
    }
    assert_rejected(rewrite(path, arrays, bad), "arrays do not match")
    # The signature and the count disagree.
    assert_rejected(
        rewrite(path, arrays, {**meta, "num_layers": 1}), "num_layers|dtypes"
    )
    # An array is missing; an unknown one is present.
    fewer = {k: v for k, v in arrays.items() if k != "layer_1/fam"}
    assert_rejected(rewrite(path, fewer, meta), "arrays do not match")
    more = {**arrays, "layer_0/secret": np.zeros(2)}
    assert_rejected(rewrite(path, more, meta), "arrays do not match")


def test_million_layer_file_fails_fast(saved, tmp_path):
    """A 1.6 MB file whose metadata claims a million layers."""
    path, arrays, meta = saved
    dtypes = {f"layer_{i}/fam": "float32" for i in range(60_000)}
    bad = {**meta, "num_layers": 1_000_000, "dtypes": dtypes}
    big = rewrite(str(tmp_path / "million.npz"), arrays, bad)
    assert os.path.getsize(big) > 1_500_000
    start = time.perf_counter()
    assert_rejected(big, "num_layers")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("dtype", ["float64", "int64", "complex64", "object"])
def test_disallowed_dtype_in_metadata(saved, dtype):
    path, arrays, meta = saved
    dtypes = {**meta["dtypes"], "layer_0/fam": dtype}
    message = assert_rejected(
        rewrite(path, arrays, {**meta, "dtypes": dtypes}), "layer_0/fam"
    )
    assert "allowed" in message


def test_float64_array_where_float32_expected(saved):
    path, arrays, meta = saved
    arrays = {
        **arrays,
        "layer_1/memory_key": arrays["layer_1/memory_key"].astype("float64"),
    }
    assert_rejected(rewrite(path, arrays, meta), "layer_1/memory_key")


def test_int64_index_and_float_mask(saved):
    path, arrays, meta = saved
    wide = {**arrays, "layer_0/index": np.asarray(5, "int64")}
    assert_rejected(rewrite(path, wide, meta), "layer_0/index")
    mask = {**arrays, "layer_0/block_mask": np.ones((2, 4), "float32")}
    assert_rejected(rewrite(path, mask, meta), "layer_0/block_mask")


def test_object_array_is_never_unpickled(saved):
    path, arrays, meta = saved
    arrays = {**arrays, "layer_0/fam": np.asarray([{"x": 1}], dtype=object)}
    with open(path, "wb") as file:
        np.savez(file, __meta__=np.asarray(json.dumps(meta)), **arrays)
    assert_rejected(path, "layer_0/fam")


def test_negative_or_inconsistent_index(saved):
    path, arrays, meta = saved
    for index in (-7, -1):
        negative = {
            **arrays,
            "layer_0/index": np.asarray(index, "int32"),
            "layer_1/index": np.asarray(index, "int32"),
        }
        assert_rejected(rewrite(path, negative, meta), "index")
    split = {**arrays, "layer_1/index": np.asarray(9, "int32")}
    assert_rejected(rewrite(path, split, meta), "index")
    offset = {
        **arrays,
        "layer_0/position_offset": np.asarray(-3, "int32"),
        "layer_1/position_offset": np.asarray(-3, "int32"),
    }
    assert_rejected(rewrite(path, offset, meta), "position_offset")


def test_shape_inconsistent_with_signature(saved):
    path, arrays, meta = saved
    wide = {**arrays, "layer_0/fam": np.zeros((2, 2, 17), "float32")}
    assert_rejected(rewrite(path, wide, meta), "layer_0/fam")
    batch = {**arrays, "layer_1/block_key": np.zeros((3, 4, 2, 8), "float32")}
    assert_rejected(rewrite(path, batch, meta), "layer_1/block_key")
    scalar = {**arrays, "layer_0/block_mask": np.asarray(True)}
    assert_rejected(rewrite(path, scalar, meta), "block_mask")


def test_state_of_another_model(saved, tmp_path):
    path, _, _ = saved
    other = tiny_models.tiny_lm(VOCAB, memory_segments=2)
    message = assert_rejected(path, "another model", model=other)
    assert "memory_segments" in message


def test_compressed_or_foreign_entries(saved, tmp_path):
    path, arrays, meta = saved
    assert_rejected(rewrite(path, arrays, meta, compress=True), "compressed")
    extra = str(tmp_path / "extra.npz")
    rewrite(extra, arrays, meta)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("payload.py", "print('hi')")
    assert_rejected(extra, "payload.py")


def test_corrupted_array_data(saved, tmp_path):
    """A flipped byte inside an array (zip CRC mismatch)."""
    path, _, _ = saved
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("layer_0/fam.npy")
    data[info.header_offset + 200] ^= 0xFF
    bad = str(tmp_path / "flipped.npz")
    with open(bad, "wb") as file:
        file.write(bytes(data))
    assert_rejected(bad, "unreadable|not an array|not a plain")


def test_model_must_be_a_fam_model(saved):
    path, _, _ = saved
    with pytest.raises(TypeError, match="model"):
        FAMState.load(path, model="gemma")
