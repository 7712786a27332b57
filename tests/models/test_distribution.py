"""Scale-out on the engines Keras supports: TensorFlow `tf.distribute` and
JAX `keras.distribution`, each agreeing with single-device training.

Each test runs `distributed_training.py` in a fresh interpreter (the
virtual devices must exist before the backend starts): two logical CPU
devices for TensorFlow, two virtual XLA host devices for JAX. The script
trains a tiny `FAMCausalLM` a few SGD steps from the same saved initial
weights on one device and distributed; here we check that the loss falls,
that the two runs agree step by step and in their final weights, and that
the engine really spread the work (replicas, shardings).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_fam.models import FAMBackbone

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_training.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4

requires_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution (DataParallel, ModelParallel) is JAX-only.",
)
requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies need the TensorFlow backend.",
)


def run_engine(engine, tmp_path):
    output = str(tmp_path / f"{engine}.npz")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [ROOT, env.get("PYTHONPATH")])
    )
    process = subprocess.run(
        [sys.executable, SCRIPT, engine, output],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    with np.load(output) as data:
        results = {key: data[key] for key in data.files}
    meta = json.loads(str(results.pop("meta")))
    return results, meta


def check_agreement(results):
    single, distributed = results["single/loss"], results["distributed/loss"]
    assert len(single) == len(distributed) == 5
    # Training works: the loss falls every step.
    assert np.all(np.diff(single) < 0), single
    assert single[-1] < single[0] - 0.3, single
    np.testing.assert_allclose(distributed, single, atol=LOSS_TOLERANCE)
    names = sorted(
        k[len("single/") :]
        for k in results
        if "/loss" not in k and k.startswith("single/")
    )
    assert len(names) == 21  # every trainable weight of the tiny model
    for name in names:
        np.testing.assert_allclose(
            results[f"distributed/{name}"],
            results[f"single/{name}"],
            atol=WEIGHT_TOLERANCE,
            err_msg=name,
        )
    # Agreement is not trivial: training moved the weights far more.
    moved = max(
        np.abs(results[f"single/{n}"] - results[f"initial/{n}"]).max()
        for n in names
    )
    assert moved > 1000 * WEIGHT_TOLERANCE, moved


@requires_tensorflow
def test_mirrored_strategy_matches_single_device(tmp_path):
    results, meta = run_engine("mirrored", tmp_path)
    assert meta["replicas"] == 2
    assert meta["variable_type"] == "MirroredVariable"
    check_agreement(results)


@requires_jax
def test_data_parallel_matches_single_device(tmp_path):
    results, meta = run_engine("data_parallel", tmp_path)
    assert meta["devices"] == 2
    kernel = meta["sharding"]["transformer_layer_0/attention/query/kernel"]
    assert kernel == ["(None, None, None)", [16, 2, 8]]  # replicated
    check_agreement(results)


@requires_jax
def test_model_parallel_matches_single_device(tmp_path):
    results, meta = run_engine("model_parallel", tmp_path)
    assert meta["devices"] == 2
    sharding = meta["sharding"]
    # Weights split in half on the `model` axis, as the layout map says.
    assert sharding["transformer_layer_1/attention/query/kernel"] == [
        "('model', 'batch', None)",
        [8, 2, 8],
    ]
    assert sharding[
        "transformer_layer_0/attention/attention_output/kernel"
    ] == [
        "('model', None, 'batch')",
        [1, 8, 16],
    ]
    assert sharding[
        "transformer_layer_0/feedforward/feedforward_gate_dense/kernel"
    ] == ["('batch', 'model')", [16, 16]]
    assert sharding["token_embedding/embeddings"] == [
        "('model', 'batch')",
        [16, 16],
    ]
    assert sharding["layer_norm/scale"] == ["(None,)", [16]]
    check_agreement(results)


def layout_backbone(**overrides):
    config = dict(
        vocabulary_size=32,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        block_size=4,
        memory_segments=1,
        fam_length=2,
    )
    config.update(overrides)
    return FAMBackbone(**config)


def test_layout_map_covers_the_projections():
    """Every sharded weight gets the layout of KerasHub's Llama layout map;
    everything else is replicated (no layout)."""
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), ["cpu:0"])
    layout_map = FAMBackbone.get_layout_map(mesh)
    backbone = layout_backbone(tie_word_embeddings=False)
    layouts = {}
    for variable in backbone.weights:
        layout = layout_map[variable.path]
        layouts[variable.path] = None if layout is None else layout.axes
    model, batch = "model", "batch"
    expected = {
        "token_embedding/embeddings": (model, batch),
        "token_embedding/reverse_embeddings": (batch, model),
    }
    for index in range(2):
        prefix = f"transformer_layer_{index}"
        for name in ("query", "key", "value"):
            expected[f"{prefix}/attention/{name}/kernel"] = (model, batch, None)
        expected[f"{prefix}/attention/attention_output/kernel"] = (
            model,
            None,
            batch,
        )
        for name, axes in (
            ("intermediate", (batch, model)),
            ("gate", (batch, model)),
            ("output", (model, batch)),
        ):
            expected[
                f"{prefix}/feedforward/feedforward_{name}_dense/kernel"
            ] = axes
    sharded = {path: axes for path, axes in layouts.items() if axes}
    assert sharded == expected
    # Norms, summary embeddings and RSP state are replicated.
    assert "layer_norm/scale" in layouts
    assert layouts["layer_norm/scale"] is None
    # Each layout has one axis per dimension of its weight.
    for variable in backbone.weights:
        if layouts[variable.path]:
            assert len(layouts[variable.path]) == len(variable.shape)


def test_layout_map_with_lora_leaves_adapters_replicated():
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), ["cpu:0"])
    layout_map = FAMBackbone.get_layout_map(mesh)
    backbone = layout_backbone()
    backbone.enable_lora(2)
    lora = [v.path for v in backbone.weights if "lora" in v.path]
    assert len(lora) == 2 * 7 * 2  # (A, B) x 7 targets x 2 layers
    assert all(layout_map[path] is None for path in lora)


def test_layout_map_bad_arguments():
    mesh = keras.distribution.DeviceMesh((1, 1), ("data", "model"), ["cpu:0"])
    with pytest.raises(ValueError, match="device_mesh"):
        FAMBackbone.get_layout_map("mesh")
    with pytest.raises(ValueError, match="data_parallel_dim_name='batch'"):
        FAMBackbone.get_layout_map(mesh)
    with pytest.raises(ValueError, match="model_parallel_dim_name='tensor'"):
        FAMBackbone.get_layout_map(
            mesh,
            model_parallel_dim_name="tensor",
            data_parallel_dim_name="data",
        )
    layout_map = FAMBackbone.get_layout_map(mesh, data_parallel_dim_name="data")
    assert layout_map["token_embedding/embeddings"].axes == ("model", "data")
