"""Backend dispatch: every backend kernel gives the numbers of the
`keras.ops` reference, and the reference gives the numbers of NumPy."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fam.ops import dispatch


def _attention_inputs(seed, batch=2, queries=5, keys=7, heads=4, groups=2):
    rng = np.random.default_rng(seed)
    head_dim = 8
    query = rng.normal(size=(batch, queries, heads, head_dim))
    key = rng.normal(size=(batch, keys, groups, head_dim))
    value = rng.normal(size=(batch, keys, groups, head_dim))
    mask = rng.random((batch, queries, keys)) < 0.6
    mask[:, :, 0] = True  # No fully masked row.
    return [a.astype("float32") for a in (query, key, value)] + [mask]


def _tensors(*arrays):
    """The kernels take backend tensors, not NumPy arrays."""
    return [ops.convert_to_tensor(a) for a in arrays]


def _numpy_attention(query, key, value, mask, scale, logit_soft_cap=None):
    """Grouped-query attention: query head n uses key/value head
    n // (heads / groups)."""
    heads, groups = query.shape[2], key.shape[2]
    group_of_head = np.arange(heads) // (heads // groups)
    key = key[:, :, group_of_head].astype("float64")
    value = value[:, :, group_of_head].astype("float64")
    logits = np.einsum("bqnh,bknh->bnqk", query.astype("float64"), key) * scale
    if logit_soft_cap is not None:
        logits = np.tanh(logits / logit_soft_cap) * logit_soft_cap
    logits = np.where(mask[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknh->bqnh", probs, value)


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_reference_attention_matches_numpy(groups):
    query, key, value, mask = _attention_inputs(0, groups=groups)
    out = dispatch.attention_reference(
        *_tensors(query, key, value, mask), scale=0.3
    )
    expected = _numpy_attention(query, key, value, mask, 0.3)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)


def test_reference_attention_soft_cap_matches_numpy():
    query, key, value, mask = _attention_inputs(1)
    out = dispatch.attention_reference(
        *_tensors(query, key, value, mask), scale=1.0, logit_soft_cap=2.0
    )
    expected = _numpy_attention(query, key, value, mask, 1.0, 2.0)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)
    uncapped = _numpy_attention(query, key, value, mask, 1.0)
    assert np.abs(expected - uncapped).max() > 1e-2  # The cap matters.


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_backend_attention_equals_reference(groups):
    query, key, value, mask = _tensors(*_attention_inputs(2, groups=groups))
    auto = dispatch.attention(query, key, value, mask, scale=0.35)
    reference = dispatch.attention_reference(
        query, key, value, mask, scale=0.35
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(auto), ops.convert_to_numpy(reference), atol=1e-5
    )
    explicit = dispatch.attention(
        query, key, value, mask, scale=0.35, implementation="reference"
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(explicit), ops.convert_to_numpy(reference)
    )


def test_backend_attention_bfloat16_close_to_float32():
    query, key, value, mask = _attention_inputs(3)
    expected = _numpy_attention(query, key, value, mask, 0.35)
    low = [ops.cast(t, "bfloat16") for t in _tensors(query, key, value)]
    for implementation in ("auto", "reference"):
        out = dispatch.attention(
            *low,
            ops.convert_to_tensor(mask),
            scale=0.35,
            implementation=implementation,
        )
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
        out = ops.convert_to_numpy(ops.cast(out, "float32"))
        np.testing.assert_allclose(out, expected, atol=5e-2)


def test_attention_mask_is_respected():
    # Changing a masked-out key or value leaves the output unchanged.
    query, key, value, mask = _attention_inputs(4, groups=2)
    mask[:, :, -1] = False
    key2, value2 = key.copy(), value.copy()
    key2[:, -1] += 5.0
    value2[:, -1] -= 5.0
    for implementation in ("auto", "reference"):
        a = dispatch.attention(
            *_tensors(query, key, value, mask),
            0.3,
            implementation=implementation,
        )
        b = dispatch.attention(
            *_tensors(query, key2, value2, mask),
            0.3,
            implementation=implementation,
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=1e-6
        )


def test_unknown_implementation_is_rejected():
    query, key, value, mask = _tensors(*_attention_inputs(5))
    with pytest.raises(ValueError, match="implementation='fast'"):
        dispatch.attention(query, key, value, mask, 1.0, implementation="fast")
    with pytest.raises(ValueError, match="implementation='fast'"):
        dispatch.scan(lambda c, x: (c, x), 0.0, np.zeros(2), 0.0, "fast")


def _scan_step(carry, x):
    total = carry + x["a"] * x["scale"]
    # One tensor carry and one tensor per step: `keras.ops.scan` on
    # TensorFlow packs `ys` with the carry's structure (keras 3.15).
    return total, total * x["b"]


def test_scan_equals_keras_ops_scan():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(5, 2, 3)).astype("float32")
    b = rng.normal(size=(5, 2, 3)).astype("float32")
    scale = (0.5 ** np.arange(5, dtype="float32"))[:, None, None]
    xs = {
        "a": ops.convert_to_tensor(a),
        "b": ops.convert_to_tensor(b),
        "scale": ops.convert_to_tensor(np.broadcast_to(scale, a.shape)),
    }
    init = ops.zeros((2, 3))
    carry, ys = dispatch.scan(_scan_step, init, xs, ops.zeros((2, 3)))
    expected_carry, expected_ys = ops.scan(_scan_step, init, xs)
    np.testing.assert_allclose(
        ops.convert_to_numpy(carry), ops.convert_to_numpy(expected_carry), 1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(ys), ops.convert_to_numpy(expected_ys), 1e-6
    )
    # And both equal the plain NumPy loop.
    total = np.cumsum(a * scale, axis=0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ys), total * b, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(carry), total[-1], rtol=1e-5, atol=1e-6
    )
    _, reference_ys = dispatch.scan(
        _scan_step, init, xs, None, implementation="reference"
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(reference_ys), total * b, rtol=1e-5, atol=1e-6
    )


def test_static_int():
    assert dispatch.static_int(7) == 7
    assert dispatch.static_int(ops.convert_to_tensor(5, "int32")) == 5
