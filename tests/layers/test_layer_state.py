"""The streaming state of a layer (`keras_fam.layers.layer_state`): its
description, the carried state detached from autograd outside training,
and the FAM carried in float32 whatever the compute dtype."""

import keras
import numpy as np
import pytest
from keras import ops
from layer_testing import set_weights_by_path, to_numpy

from keras_fam.layers import TransformerFAM
from keras_fam.layers.layer_state import KEYS, LayerState

CONFIG = dict(num_heads=2, block_size=4, memory_segments=1, fam_length=2)


def built(dtype=None, **overrides):
    layer = TransformerFAM(**{**CONFIG, **overrides}, dtype=dtype)
    layer.build((None, None, 16))
    set_weights_by_path(layer)
    return layer


def test_layer_state_describes_the_layer_state():
    layer = built(num_key_value_heads=1)
    state = layer.get_initial_state(3)
    spec = LayerState.from_config(
        dict(
            block_size=4,
            memory_segments=1,
            fam_length=2,
            hidden_dim=16,
            num_heads=2,
            num_key_value_heads=1,
        )
    )
    assert set(state) == set(KEYS)
    for name, (shape, dtype) in spec.shapes(3).items():
        assert tuple(state[name].shape) == shape, name
        assert keras.backend.standardize_dtype(state[name].dtype) == dtype
    assert spec.shapes(3) == layer.state_shapes(3)
    with pytest.raises(ValueError, match="state"):
        spec.check({"fam": state["fam"]})
    with pytest.raises(ValueError, match="memory_key"):
        built(memory_segments=2, num_key_value_heads=1).check_state(state, 3)


def test_numpy_round_trip_is_bit_exact_in_bfloat16():
    layer = built(dtype="mixed_bfloat16")
    x = np.random.default_rng(0).normal(size=(2, 6, 16)).astype("float32")
    _, state = layer(x, return_state=True)
    arrays = LayerState.to_numpy(state)
    assert arrays["memory_key"][1] == "bfloat16"
    back = LayerState.from_numpy(arrays)
    for name in KEYS:
        assert back[name].dtype == state[name].dtype, name
        np.testing.assert_array_equal(
            to_numpy(back[name]), to_numpy(state[name])
        )


def _gradient(fn, x):
    """d sum(fn(x)) / dx as NumPy (zeros where no gradient flows)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: ops.sum(fn(t)))(x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.sum(fn(x))
        gradient = tape.gradient(y, x)
        return np.zeros(x.shape) if gradient is None else gradient.numpy()
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = ops.sum(fn(x))
    if not y.requires_grad:
        return np.zeros(tuple(x.shape))
    y.backward()
    return np.zeros(tuple(x.shape)) if x.grad is None else x.grad.numpy()


@pytest.mark.parametrize("training", [True, None])
def test_carried_state_holds_gradients_only_in_training(training):
    """Outside training the state returned for the next chunk is detached
    (no autograd graph kept over a stream); in training the gradient of a
    later segment reaches an earlier one through the state."""
    layer = built()
    rng = np.random.default_rng(1)
    first = rng.normal(size=(1, 5, 16)).astype("float32")
    second = rng.normal(size=(1, 6, 16)).astype("float32")

    def later_segment(x):
        _, state = layer(x, return_state=True, training=training)
        return layer(second, state=state, training=training)

    gradient = _gradient(later_segment, first)
    if training:
        assert np.abs(gradient).max() > 1e-4
    else:
        np.testing.assert_array_equal(gradient, 0.0)
    # Within a segment the gradient always flows.
    within = _gradient(lambda x: layer(x, training=training), first)
    assert np.abs(within).max() > 1e-4


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="autograd graphs: PyTorch"
)
def test_torch_stream_outside_no_grad_keeps_no_graph():
    """The README loop outside `torch.no_grad()`: no state tensor keeps an
    autograd graph (before, every chunk's graph stayed alive)."""
    layer = built()
    x = np.random.default_rng(2).normal(size=(2, 30, 16)).astype("float32")
    state = layer.get_initial_state(batch_size=2)
    for start in range(0, 30, 7):
        y, state = layer(
            x[:, start : start + 7], state=state, return_state=True
        )
        assert y.requires_grad  # The outputs still can be trained.
        for name, value in state.items():
            assert value.grad_fn is None and not value.requires_grad, name


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_bfloat16_fam_updates_do_not_freeze(policy):
    """A large carried FAM (as a long stream without `fam_normalization`
    makes it) keeps receiving its updates in a bfloat16 layer: the FAM and
    its residual adds are float32. In bfloat16 (resolution 16 at 3000) the
    updates of one block, of order 1, would vanish."""
    reference, low = built(), built(dtype=policy)
    x = np.random.default_rng(4).normal(size=(2, 4, 16)).astype("float32")
    start = 3000.0 + to_numpy(reference.initial_fam)[None].repeat(2, 0)
    deltas = []
    for layer in (reference, low):
        fam = ops.convert_to_tensor(start)
        state = {**layer.get_initial_state(2), "fam": fam}
        _, state = layer(x, state=state, return_state=True)
        assert keras.backend.standardize_dtype(state["fam"].dtype) == (
            "float32"
        )
        deltas.append(to_numpy(state["fam"]) - start)
    exact, delta = deltas
    assert np.abs(exact).max() > 0.5
    np.testing.assert_allclose(delta, exact, atol=0.1 * np.abs(exact).max())


def test_bfloat16_stream_stays_close_to_float32():
    """Over a long stream the bfloat16 model's FAM follows the float32
    model's; without `fam_normalization` it grows with the stream."""
    blocks = 150
    reference = built()
    low = built(dtype="mixed_bfloat16")
    x = np.random.default_rng(3).normal(size=(1, 4 * blocks, 16))
    x = x.astype("float32")
    state32 = reference.get_initial_state(1)
    state16 = low.get_initial_state(1)
    for start in range(0, 4 * blocks, 40):
        chunk = x[:, start : start + 40]
        y32, state32 = reference(chunk, state=state32, return_state=True)
        y16, state16 = low(chunk, state=state16, return_state=True)
    assert keras.backend.standardize_dtype(y16.dtype) == "bfloat16"
    fam32, fam16 = to_numpy(state32["fam"]), to_numpy(state16["fam"])
    assert np.all(np.isfinite(fam16))
    assert np.abs(fam32).max() > 10 * np.abs(to_numpy(low.initial_fam)).max()
    error = np.linalg.norm(fam16 - fam32) / np.linalg.norm(fam32)
    assert error < 0.03, error
    np.testing.assert_allclose(to_numpy(y16), to_numpy(y32), atol=0.25)
