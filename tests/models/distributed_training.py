"""Train a tiny FAMCausalLM on one device and under a distribution engine.

Run by `tests/models/test_distribution.py` in a fresh interpreter, because
the virtual devices must be configured before the backend initialises:

    python tests/models/distributed_training.py ENGINE OUTPUT.npz

`ENGINE` is one of:

- `mirrored`: TensorFlow, `tf.distribute.MirroredStrategy` over two logical
  CPU devices, static shapes (`drop_remainder=True`) and `jit_compile=True`:
  the set-up `TPUStrategy` runs unchanged.
- `data_parallel`: JAX, `keras.distribution.DataParallel` over two virtual
  CPU devices (`--xla_force_host_platform_device_count=2`).
- `model_parallel`: JAX, `keras.distribution.ModelParallel` with
  `FAMBackbone.get_layout_map` on a `(batch=1, model=2)` mesh of the same two
  devices.

The same model (same seed, initial weights saved by the single-device run
and loaded by the distributed one) is trained `STEPS` steps of plain SGD on
the same batch, once on a single device and once distributed. The loss of
every step, the initial weights and the final weights of both runs are
written to `OUTPUT.npz` (keys `single/loss`, `distributed/loss`,
`initial/<weight path>`, `single/<weight path>`,
`distributed/<weight path>`), with a `meta` JSON string describing how the
distributed run was laid out.
"""

import json
import os
import sys

ENGINES = ("mirrored", "data_parallel", "model_parallel")
NUM_DEVICES = 2
STEPS = 5
BATCH = 8
LENGTH = 16
VOCAB = 32
CONFIG = dict(
    vocabulary_size=VOCAB,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    block_size=4,
    memory_segments=1,
    fam_length=2,
)


def configure(engine):
    """Devices and backend, before Keras or the backend is imported."""
    if engine == "mirrored":
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
        )
    else:
        os.environ["KERAS_BACKEND"] = "jax"
        flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"


def data():
    """Rows counting up by 1 or 2 modulo VOCAB from a random start: a
    learnable next-token task."""
    import numpy as np

    rng = np.random.default_rng(0)
    start = rng.integers(0, VOCAB, (BATCH, 1))
    step = rng.integers(1, 3, (BATCH, 1))
    ids = ((start + step * np.arange(LENGTH + 1)) % VOCAB).astype("int32")
    x = {
        "token_ids": ids[:, :-1],
        "padding_mask": np.ones((BATCH, LENGTH), "int32"),
    }
    return x, ids[:, 1:]


def build_and_compile(jit_compile="auto"):
    import keras

    from keras_fam.models import FAMBackbone, FAMCausalLM

    lm = FAMCausalLM(FAMBackbone(**CONFIG, name="fam_backbone"))
    lm.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        jit_compile=jit_compile,
    )
    return lm


def train(lm, engine):
    """`STEPS` steps of `model.fit` (one epoch, the batch repeated); the
    loss of each step.

    One epoch keeps to one data iterator (creating one per epoch costs
    more than the steps). Keras logs the running mean of the loss; the loss
    of step `k` is `k * mean_k - (k - 1) * mean_(k-1)`.
    """
    import keras
    import numpy as np

    x, y = data()
    x = {name: np.tile(value, (STEPS, 1)) for name, value in x.items()}
    y = np.tile(y, (STEPS, 1))
    means = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: means.append(logs["loss"])
    )
    if engine == "mirrored":
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            BATCH, drop_remainder=True
        )
        # Static shapes everywhere, as TPUStrategy requires.
        for spec in tf.nest.flatten(dataset.element_spec):
            assert spec.shape.is_fully_defined(), spec
        lm.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    else:
        lm.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[record],
        )
    means = np.asarray(means, "float64")
    steps = np.arange(1, len(means) + 1)
    return steps * means - np.concatenate([[0.0], (steps * means)[:-1]])


def weights(lm):
    import numpy as np
    from keras import ops

    return {
        v.path: np.asarray(ops.convert_to_numpy(v.value))
        for v in lm.trainable_weights
    }


def main(engine, output):
    configure(engine)
    import keras
    import numpy as np

    from keras_fam.models import FAMBackbone

    keras.utils.set_random_seed(0)
    initial = output + ".initial.weights.h5"
    # TensorFlow: the whole train step XLA-compiled, on static shapes.
    lm = build_and_compile(jit_compile=True if engine == "mirrored" else "auto")
    lm.save_weights(initial)
    results = {f"initial/{k}": v for k, v in weights(lm).items()}
    results["single/loss"] = np.array(train(lm, engine))
    results.update({f"single/{k}": v for k, v in weights(lm).items()})

    meta = {"engine": engine}
    if engine == "mirrored":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices[:NUM_DEVICES])
        meta["replicas"] = strategy.num_replicas_in_sync
        with strategy.scope():
            # XLA cannot compile a step that spans devices (variables on
            # another device): Keras turns `jit_compile` off under
            # `tf.distribute` ("auto"), TPUStrategy compiles each replica's
            # step itself.
            lm = build_and_compile(jit_compile=False)
            lm.load_weights(initial)
            losses = train(lm, engine)
            meta["variable_type"] = type(lm.trainable_weights[0].value).__name__
    else:
        devices = keras.distribution.list_devices("cpu")
        meta["devices"] = len(devices)
        if engine == "data_parallel":
            distribution = keras.distribution.DataParallel(devices=devices)
        else:
            mesh = keras.distribution.DeviceMesh(
                (1, NUM_DEVICES), ("batch", "model"), devices
            )
            distribution = keras.distribution.ModelParallel(
                layout_map=FAMBackbone.get_layout_map(mesh),
                batch_dim_name="batch",
            )
        with distribution.scope():
            lm = build_and_compile()
            lm.load_weights(initial)
            losses = train(lm, engine)
        meta["sharding"] = {
            v.path: [
                str(tuple(v.value.sharding.spec)),
                list(v.value.addressable_shards[0].data.shape),
            ]
            for v in lm.trainable_weights
        }
    results["distributed/loss"] = np.array(losses)
    results.update({f"distributed/{k}": v for k, v in weights(lm).items()})
    results["meta"] = np.array(json.dumps(meta))
    os.remove(initial)
    np.savez(output, **results)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ENGINES:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(ENGINES)}}} OUT")
    main(sys.argv[1], sys.argv[2])
