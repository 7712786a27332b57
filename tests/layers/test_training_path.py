"""TransformerFAM `parallel_blocks=True` equals the fused block-step loop.

The parallel path projects all tokens at once, loops over the FAM rows only
and runs every block's token attention as one batched call. The fused
[FAM ; block] step (`_block_step`) stays the single source of truth: these
tests compare outputs, final states and gradients of the two paths, with
padding, memory segments > 1, grouped-query attention, a state carried over
from a previous call and dropout.
"""

import keras
import numpy as np
import pytest
from keras import ops
from layer_testing import run_layer_test, set_weights_by_path, to_numpy

from keras_fam.layers import TransformerFAM

BACKEND = keras.backend.backend()
WIDTH = 16
TOLERANCE = dict(atol=1e-5, rtol=0)

CONFIGS = {
    "fam_memory2": dict(memory_segments=2, fam_length=3),
    "fam_memory3_gqa": dict(
        memory_segments=3, fam_length=2, num_key_value_heads=2
    ),
    "fam_no_memory": dict(memory_segments=0, fam_length=2),
    "bswa_memory2": dict(memory_segments=2, fam_length=0),
}


def _pair(seed=0, **kwargs):
    """Two built layers with equal weights: the block-step loop and the
    parallel path."""
    config = dict(
        num_heads=4,
        block_size=4,
        memory_segments=2,
        fam_length=3,
        intermediate_dim=24,
    )
    config.update(kwargs)
    layers = []
    for parallel in (False, True):
        # Equal seed generators too, so dropout draws equal masks.
        keras.utils.set_random_seed(seed)
        layer = TransformerFAM(**config, parallel_blocks=parallel)
        layer.build((None, None, WIDTH))
        set_weights_by_path(layer, seed=seed)
        layers.append(layer)
    return layers


def _inputs(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, WIDTH)).astype("float32")


def _padding_mask(batch, length):
    """Row 0 left-padded by 2 tokens, row 1 right-padded from token 17."""
    mask = np.ones((batch, length), dtype=bool)
    mask[0, :2] = False
    if batch > 1:
        mask[1, 17:] = False
    return mask


def _run(layer, x, padding_mask, split, training=None):
    """The layer on `x`, in one call (`split=0`) or continued from the
    state after the first `split` tokens. Returns (outputs, state)."""
    if not split:
        return layer(
            x, padding_mask=padding_mask, return_state=True, training=training
        )
    head, state = layer(
        x[:, :split],
        padding_mask=padding_mask[:, :split],
        return_state=True,
        training=training,
    )
    tail, state = layer(
        x[:, split:],
        padding_mask=padding_mask[:, split:],
        state=state,
        return_state=True,
        training=training,
    )
    return ops.concatenate([head, tail], axis=1), state


def _assert_states_equal(state, expected):
    assert set(state) == set(expected)
    for name in expected:
        np.testing.assert_allclose(
            to_numpy(state[name]).astype("float64"),
            to_numpy(expected[name]).astype("float64"),
            err_msg=name,
            **TOLERANCE,
        )


@pytest.mark.parametrize("split", [0, 6], ids=["fresh", "from_state"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_outputs_and_state_equal_block_step(config, split):
    # 23 tokens of blocks of 4: 5 whole blocks and a partial one; with
    # split=6 the whole blocks start at index 8 after a streamed head, with
    # memory keys and FAM taken from the state.
    scan, parallel = _pair(**CONFIGS[config])
    x = _inputs(2, 23)
    padding_mask = _padding_mask(2, 23)
    expected, expected_state = _run(scan, x, padding_mask, split)
    outputs, state = _run(parallel, x, padding_mask, split)
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), **TOLERANCE
    )
    _assert_states_equal(state, expected_state)
    # Padding and memory matter here: the comparison is not vacuous.
    unpadded = scan(x)
    assert np.abs(to_numpy(unpadded) - to_numpy(expected)).max() > 1e-3


def test_the_parallel_path_is_the_one_running():
    # A parallel layer whose fused step is broken must still give the right
    # numbers for whole blocks (so the path compared above is a different
    # computation, not the same loop).
    scan, parallel = _pair()
    x = _inputs(1, 12)
    expected = to_numpy(scan(x))

    def broken_step(carry, inputs, training):
        raise AssertionError("the fused block step ran")

    object.__setattr__(parallel, "_block_step", broken_step)
    np.testing.assert_allclose(to_numpy(parallel(x)), expected, **TOLERANCE)
    object.__setattr__(scan, "_block_step", broken_step)
    with pytest.raises(AssertionError, match="fused block step ran"):
        scan(x)


def test_dropout_in_training_equals_block_step():
    scan, parallel = _pair(seed=4, dropout=0.3)
    x = _inputs(2, 20)
    padding_mask = _padding_mask(2, 20)
    expected, expected_state = _run(scan, x, padding_mask, 0, training=True)
    outputs, state = _run(parallel, x, padding_mask, 0, training=True)
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), **TOLERANCE
    )
    _assert_states_equal(state, expected_state)
    # Dropout was active.
    inference = scan(x, padding_mask=padding_mask)
    assert np.abs(to_numpy(inference) - to_numpy(expected)).max() > 1e-2


def _gradients(layer, x, padding_mask, seed=0):
    """Gradients of a weighted sum of the outputs, the final FAM and the
    final memory keys, with respect to the input and every trainable
    weight (the initial FAM included), in `layer.trainable_variables`
    order after the input."""
    rng = np.random.default_rng(seed)
    output_weights = ops.convert_to_tensor(
        rng.normal(size=x.shape).astype("float32")
    )

    def loss_of(outputs, state):
        loss = ops.sum(outputs * output_weights)
        loss = loss + ops.sum(ops.sin(state["fam"]))
        return loss + ops.sum(ops.cos(state["memory_key"]))

    if BACKEND == "jax":
        import jax

        def loss(trainable, inputs):
            (outputs, state), _ = layer.stateless_call(
                trainable,
                [v.value for v in layer.non_trainable_variables],
                inputs,
                padding_mask=padding_mask,
                return_state=True,
            )
            return loss_of(outputs, state)

        trainable = [v.value for v in layer.trainable_variables]
        weights, inputs = jax.grad(loss, argnums=(0, 1))(trainable, x)
        return [np.asarray(inputs)] + [np.asarray(g) for g in weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = loss_of(
                *layer(inputs, padding_mask=padding_mask, return_state=True)
            )
        grads = tape.gradient(loss, [inputs, *layer.trainable_variables])
        return [g.numpy() for g in grads]
    import torch

    inputs = torch.tensor(x, requires_grad=True)
    layer.zero_grad(set_to_none=True)
    loss_of(
        *layer(inputs, padding_mask=padding_mask, return_state=True)
    ).backward()
    grads = [inputs.grad] + [v.value.grad for v in layer.trainable_variables]
    return [g.detach().cpu().numpy() for g in grads]


@pytest.mark.parametrize("config", ["fam_memory2", "fam_memory3_gqa"], ids=str)
def test_gradients_equal_block_step(config):
    scan, parallel = _pair(seed=2, **CONFIGS[config])
    x = _inputs(2, 20, seed=3)
    padding_mask = _padding_mask(2, 20)
    expected = _gradients(scan, x, padding_mask)
    gradients = _gradients(parallel, x, padding_mask)
    names = ["inputs"] + [v.path for v in scan.trainable_variables]
    assert any(name.endswith("initial_fam") for name in names)
    assert len(gradients) == len(expected) == len(names)
    # Float32 sums in a different order (other key sets and batch shapes)
    # through five FAM updates: equal to 1e-5 of each gradient's scale.
    for name, gradient, reference in zip(
        names, gradients, expected, strict=True
    ):
        scale = np.abs(reference).max()
        assert scale > 0.0, name
        np.testing.assert_allclose(
            gradient, reference, err_msg=name, atol=1e-5 * scale, rtol=0
        )


def test_layer_basics_with_parallel_blocks():
    # Config round trip (the option is serialised), symbolic and eager
    # calls, a compiled fit step, mixed precision, .keras save and load.
    run_layer_test(
        TransformerFAM,
        init_kwargs=dict(
            num_heads=2,
            block_size=4,
            memory_segments=2,
            fam_length=2,
            intermediate_dim=16,
            parallel_blocks=True,
        ),
        input_data=_inputs(2, 10)[..., :8],
        expected_output_shape=(2, 10, 8),
        expected_num_trainable_weights=17,
    )
    config = TransformerFAM(num_heads=2, parallel_blocks=True).get_config()
    assert config["parallel_blocks"] is True
    assert TransformerFAM.from_config(config).parallel_blocks is True


def test_parallel_blocks_must_be_bool():
    with pytest.raises(ValueError, match="parallel_blocks=1"):
        TransformerFAM(num_heads=2, parallel_blocks=1)
