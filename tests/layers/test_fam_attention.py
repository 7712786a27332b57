"""FAMAttention: projections, RoPE and attention against NumPy.

Shape letters: B batch, T rows, K keys, D width, N heads, G key/value heads,
H head dim.
"""

import numpy as np
import pytest
from keras import ops
from layer_testing import set_weights_by_path, to_numpy, weights_by_path

from keras_fam.layers import FAMAttention
from keras_fam.layers.fam_attention import apply_rope


def _numpy_rope(x, positions, base=10000.0, scaling=1.0):
    """Rotate-half RoPE: pair (i, i + H/2) turns by position * base^(-2i/H)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    angle = (positions / scaling)[:, None] * base ** (
        -2.0 * np.arange(half) / head_dim
    )
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate(
        [first * cos - second * sin, second * cos + first * sin], -1
    )


def _attention(**kwargs):
    config = dict(num_heads=4, num_key_value_heads=2, use_bias=True)
    config.update(kwargs)
    layer = FAMAttention(**config)
    layer.build((None, None, 16))
    set_weights_by_path(layer, seed=1)
    return layer


def _rows(length=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, length, 16)).astype("float32")


@pytest.mark.parametrize("base, scaling", [(10000, 1.0), (50, 2.5)])
def test_apply_rope_matches_numpy(base, scaling):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 8)).astype("float32")
    positions = np.array([-2.0, 0.0, 1.0, 5.0, 17.0, 300.0], "float32")
    out = apply_rope(x, positions, base, scaling)
    np.testing.assert_allclose(
        to_numpy(out), _numpy_rope(x, positions, base, scaling), atol=2e-5
    )


def test_rope_logits_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 1, 8)).astype("float32")

    def logit(m, n):
        rq = to_numpy(apply_rope(q, np.array([m], "float32")))
        rk = to_numpy(apply_rope(k, np.array([n], "float32")))
        return float((rq * rk).sum())

    assert logit(3, 1) == pytest.approx(logit(10, 8), abs=1e-4)
    assert logit(3, 1) == pytest.approx(logit(-4, -6), abs=1e-4)
    assert abs(logit(3, 1) - logit(3, 2)) > 1e-3


def test_weights_and_shapes_with_gqa():
    layer = _attention()
    shapes = {k: v.shape for k, v in weights_by_path(layer).items()}
    assert shapes == {
        "query/kernel": (16, 4, 4),
        "query/bias": (4, 4),
        "key/kernel": (16, 2, 4),
        "key/bias": (2, 4),
        "value/kernel": (16, 2, 4),
        "value/bias": (2, 4),
        "attention_output/kernel": (4, 4, 16),
        "attention_output/bias": (16,),
    }
    no_bias = FAMAttention(num_heads=4, head_dim=6)
    no_bias.build((None, None, 16))
    assert sorted(weights_by_path(no_bias)) == [
        "attention_output/kernel",
        "key/kernel",
        "query/kernel",
        "value/kernel",
    ]
    assert tuple(no_bias.query.kernel.shape) == (16, 4, 6)


def test_projections_match_numpy():
    layer = _attention()
    w = weights_by_path(layer)
    rows = _rows()
    positions = np.arange(3, 8, dtype="float32")
    query = to_numpy(layer.project_query(rows, positions))
    key, value = layer.project_key_value(rows, positions)
    expected_query = np.einsum("btd,dnh->btnh", rows, w["query/kernel"])
    expected_query = _numpy_rope(expected_query + w["query/bias"], positions)
    expected_key = np.einsum("btd,dgh->btgh", rows, w["key/kernel"])
    expected_key = _numpy_rope(expected_key + w["key/bias"], positions)
    expected_value = np.einsum("btd,dgh->btgh", rows, w["value/kernel"])
    expected_value = expected_value + w["value/bias"]  # Values: no RoPE.
    np.testing.assert_allclose(query, expected_query, atol=1e-5)
    np.testing.assert_allclose(to_numpy(key), expected_key, atol=1e-5)
    np.testing.assert_allclose(to_numpy(value), expected_value, atol=1e-5)
    # Without RoPE the positions are ignored.
    plain = _attention(use_rope=False)
    np.testing.assert_allclose(
        to_numpy(plain.project_query(rows, positions)),
        to_numpy(plain.project_query(rows, positions + 100.0)),
        atol=1e-6,
    )


def _numpy_attend(w, query, key, value, mask, scale, cap=None):
    heads, groups = query.shape[2], key.shape[2]
    group = np.arange(heads) // (heads // groups)
    logits = np.einsum("bqnh,bknh->bnqk", query, key[:, :, group]) * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    logits = np.where(mask[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh->bqnh", probs, value[:, :, group])
    out = np.einsum("bqnh,nhd->bqd", out, w["attention_output/kernel"])
    return out + w["attention_output/bias"]


@pytest.mark.parametrize(
    "kwargs, scale, cap",
    [
        ({}, 0.5, None),  # Default scale: head_dim ** -0.5 = 4 ** -0.5.
        ({"query_scale": 1.3}, 1.3, None),
        ({"logit_soft_cap": 0.7}, 0.5, 0.7),
        ({"attention_implementation": "reference"}, 0.5, None),
    ],
)
def test_attend_matches_numpy(kwargs, scale, cap):
    layer = _attention(**kwargs)
    w = weights_by_path(layer)
    rng = np.random.default_rng(2)
    query = rng.normal(size=(2, 3, 4, 4)).astype("float32")
    key = rng.normal(size=(2, 6, 2, 4)).astype("float32")
    value = rng.normal(size=(2, 6, 2, 4)).astype("float32")
    mask = rng.random((2, 3, 6)) < 0.5
    mask[:, :, 2] = True
    out = layer.attend(
        *[ops.convert_to_tensor(a) for a in (query, key, value, mask)]
    )
    expected = _numpy_attend(w, query, key, value, mask, scale, cap)
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-5)


def test_config_round_trip():
    layer = FAMAttention(
        num_heads=4,
        num_key_value_heads=1,
        head_dim=6,
        use_bias=True,
        use_rope=False,
        rope_max_wavelength=500,
        rope_scaling_factor=2.0,
        query_scale=0.1,
        logit_soft_cap=30.0,
        attention_implementation="reference",
        name="attention",
    )
    config = layer.get_config()
    assert FAMAttention.from_config(config).get_config() == config
    assert config["num_key_value_heads"] == 1
    assert config["logit_soft_cap"] == 30.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0), "num_heads=0"),
        (dict(num_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(num_heads=2, head_dim=5), "head_dim=5"),
        (dict(num_heads=2, attention_implementation="x"), "'x'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAMAttention(**kwargs)


def test_num_heads_must_divide_width():
    layer = FAMAttention(num_heads=3)
    with pytest.raises(ValueError, match="num_heads=3.*width=16"):
        layer.build((None, None, 16))
    # An odd derived head_dim with RoPE is refused too.
    with pytest.raises(ValueError, match="head_dim=3"):
        FAMAttention(num_heads=2).build((None, None, 6))
    # Without RoPE it is fine.
    FAMAttention(num_heads=2, use_rope=False).build((None, None, 6))


def test_qkv_bias_puts_biases_on_query_key_value_only():
    layer = _attention(use_bias=False, qkv_bias=True)
    w = weights_by_path(layer)
    assert sorted(w) == [
        "attention_output/kernel",
        "key/bias",
        "key/kernel",
        "query/bias",
        "query/kernel",
        "value/bias",
        "value/kernel",
    ]
    rows = _rows()
    positions = np.arange(5, dtype="float32")
    key, value = layer.project_key_value(rows, positions)
    expected_key = np.einsum("btd,dgh->btgh", rows, w["key/kernel"])
    expected_key = _numpy_rope(expected_key + w["key/bias"], positions)
    expected_value = np.einsum("btd,dgh->btgh", rows, w["value/kernel"])
    np.testing.assert_allclose(to_numpy(key), expected_key, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(value), expected_value + w["value/bias"], atol=1e-5
    )
    with pytest.raises(ValueError, match="qkv_bias"):
        FAMAttention(num_heads=2, qkv_bias="yes")


@pytest.mark.parametrize("norm", ["rms_norm", "rms_norm_unit_offset"])
def test_query_key_norm_matches_numpy(norm):
    layer = _attention(use_bias=False, query_key_norm=norm)
    w = weights_by_path(layer)
    assert w["query_norm/scale"].shape == (4,)  # (head_dim,)
    assert w["key_norm/scale"].shape == (4,)
    rows = _rows()
    positions = np.arange(2, 7, dtype="float32")

    def head_norm(x, scale):
        x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
        return x * (1.0 + scale if norm == "rms_norm_unit_offset" else scale)

    query = np.einsum("btd,dnh->btnh", rows, w["query/kernel"])
    expected_query = _numpy_rope(
        head_norm(query, w["query_norm/scale"]), positions
    )
    key = np.einsum("btd,dgh->btgh", rows, w["key/kernel"])
    expected_key = _numpy_rope(head_norm(key, w["key_norm/scale"]), positions)
    received_key, value = layer.project_key_value(rows, positions)
    np.testing.assert_allclose(
        to_numpy(layer.project_query(rows, positions)),
        expected_query,
        atol=1e-5,
    )
    np.testing.assert_allclose(to_numpy(received_key), expected_key, atol=1e-5)
    # Values are not normed.
    np.testing.assert_allclose(
        to_numpy(value),
        np.einsum("btd,dgh->btgh", rows, w["value/kernel"]),
        atol=1e-5,
    )
    # The effect: a normed query does not change when its kernel is scaled
    # (up to the epsilon and float32 rounding).
    before = to_numpy(layer.project_query(rows, positions))
    layer.query.kernel.assign(3.0 * w["query/kernel"])
    np.testing.assert_allclose(
        to_numpy(layer.project_query(rows, positions)), before, atol=1e-4
    )


def test_new_options_round_trip_and_are_checked():
    layer = FAMAttention(
        num_heads=2,
        qkv_bias=True,
        query_key_norm="rms_norm_unit_offset",
        query_key_norm_epsilon=1e-5,
    )
    config = layer.get_config()
    assert config["qkv_bias"] is True
    assert config["query_key_norm"] == "rms_norm_unit_offset"
    assert config["query_key_norm_epsilon"] == 1e-5
    assert FAMAttention.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="query_key_norm='batch_norm'"):
        FAMAttention(num_heads=2, query_key_norm="batch_norm")
