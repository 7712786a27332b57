"""Test helpers shared by the layer tests, in the style of KerasHub's
`TestCase.run_layer_test` (keras_hub/src/tests/test_case.py)."""

import os
import tempfile
import zlib

import keras
import numpy as np
from keras import ops


def to_numpy(x):
    """Any backend tensor (or nested structure) -> NumPy float/bool array."""
    return keras.tree.map_structure(
        lambda t: (
            np.asarray(ops.convert_to_numpy(ops.cast(t, "float32")))
            if "bfloat16" in str(getattr(t, "dtype", ""))
            else np.asarray(ops.convert_to_numpy(t))
        ),
        x,
    )


def set_weights_by_path(layer, seed=0, scale=0.3):
    """Set every weight of a built `layer` to seeded random values.

    The values of a weight depend only on `seed` and on the weight's path
    below the layer's own name (`attention/query/kernel`), so two layers
    whose configurations differ get identical values for every weight they
    share. Norm scales are drawn around 1, everything else around 0 (biases
    and betas non-zero too, so that every weight matters).

    Returns:
        A dict `{relative path: np.ndarray}` of the values set.
    """
    values = {}
    for variable in layer.weights:
        path = variable.path.split("/", 1)[1]
        rng = np.random.default_rng(seed + zlib.crc32(path.encode()))
        value = rng.normal(size=tuple(variable.shape)) * scale
        if path.endswith(("gamma", "scale")) and "unit_offset" not in path:
            value = value + 1.0
        value = value.astype(keras.backend.standardize_dtype(variable.dtype))
        variable.assign(value)
        values[path] = value
    return values


def weights_by_path(layer):
    """`{path below the layer's name: np.ndarray}` of a built layer."""
    return {
        v.path.split("/", 1)[1]: np.asarray(ops.convert_to_numpy(v))
        for v in layer.weights
    }


def assert_fit_lowers_loss(
    model, x, y, epochs=8, jit_compile="auto", batch_size=None
):
    """`model.fit` on a tiny regression task; the loss must go down."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="mse",
        jit_compile=jit_compile,
    )
    history = model.fit(
        x, y, batch_size=batch_size or len(x), epochs=epochs, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    return losses


def run_layer_test(
    cls,
    init_kwargs,
    input_data,
    expected_output_shape,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights=0,
    run_training_check=True,
    run_precision_check=True,
    run_saving_check=True,
):
    """Basic checks every layer must pass, after KerasHub's
    `run_layer_test`:

    - `get_config` / `from_config` round trip (and Keras serialization);
    - build, with the expected number of weights;
    - symbolic call on a `keras.Input` and `compute_output_shape`;
    - eager call (shape and dtype);
    - `model.fit` on a tiny task lowers the loss (compiled where the backend
      compiles by default: XLA on JAX; `jit_compile=True` on TensorFlow);
    - `mixed_bfloat16`: bfloat16 outputs, float32 variables;
    - `.keras` save and load give equal outputs.

    Returns:
        The output of the eager call as a NumPy array.
    """
    # Config round trip.
    layer = cls(**init_kwargs)
    config = layer.get_config()
    revived = cls.from_config(config)
    assert revived.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    revived = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(revived, cls)
    assert revived.get_config() == config

    # Build.
    layer = cls(**init_kwargs)
    layer.build(input_data.shape)
    assert layer.built
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert len(layer.non_trainable_weights) == (
        expected_num_non_trainable_weights
    )
    # The config of a built layer rebuilds the same layer.
    assert cls.from_config(layer.get_config()).get_config() == (
        layer.get_config()
    )

    # Symbolic call.
    layer = cls(**init_kwargs)
    symbolic_input = keras.Input(
        shape=input_data.shape[1:], batch_size=input_data.shape[0]
    )
    symbolic_output = layer(symbolic_input)
    assert tuple(symbolic_output.shape) == tuple(expected_output_shape)
    assert tuple(layer.compute_output_shape(input_data.shape)) == tuple(
        expected_output_shape
    )
    assert len(layer.trainable_weights) == expected_num_trainable_weights

    # Eager call.
    layer = cls(**init_kwargs)
    output = layer(input_data)
    assert tuple(output.shape) == tuple(expected_output_shape)
    assert keras.backend.standardize_dtype(output.dtype) == "float32"
    output = to_numpy(output)
    assert np.all(np.isfinite(output))

    if run_training_check:
        inputs = keras.Input(shape=input_data.shape[1:])
        model = keras.Model(inputs, cls(**init_kwargs)(inputs))
        target = np.random.default_rng(0).normal(size=output.shape)
        assert_fit_lowers_loss(model, input_data, target.astype("float32"))
        if keras.backend.backend() == "tensorflow":
            # XLA on TensorFlow, with a partial last batch (an unknown batch
            # size in the compiled graph).
            inputs = keras.Input(shape=input_data.shape[1:])
            model = keras.Model(inputs, cls(**init_kwargs)(inputs))
            x = np.concatenate([input_data, input_data[:1]])
            y = np.concatenate([target, target[:1]]).astype("float32")
            assert_fit_lowers_loss(
                model, x, y, jit_compile=True, batch_size=len(x) - 1
            )

    if run_precision_check:
        layer = cls(**{**init_kwargs, "dtype": "mixed_bfloat16"})
        mixed_output = layer(input_data)
        assert keras.backend.standardize_dtype(mixed_output.dtype) == (
            "bfloat16"
        )
        for variable in layer.weights:
            assert keras.backend.standardize_dtype(variable.dtype) == (
                "float32"
            ), variable.path
        assert np.all(np.isfinite(to_numpy(mixed_output)))

    if run_saving_check:
        inputs = keras.Input(shape=input_data.shape[1:])
        model = keras.Model(inputs, cls(**init_kwargs)(inputs))
        before = to_numpy(model(input_data))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        after = to_numpy(loaded(input_data))
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    return output
