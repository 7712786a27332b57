"""LoRA on FAM decoder blocks: targets, trainable count, fit, saving."""

import os

import h5py
import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

VOCAB = 23
RANK = 2


def tiny_lm():
    return tiny_models.tiny_lm(VOCAB, num_key_value_heads=1)


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def data(samples=8, length=10):
    rng = np.random.default_rng(0)
    ids = (rng.integers(0, VOCAB, (samples, 1)) + np.arange(length + 1)) % VOCAB
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((samples, length), bool),
    }
    return x, ids[:, 1:].astype("int32")


def expected_trainable_count(backbone, rank, targets):
    """The count the FAMBackbone docstring promises."""
    count = backbone.fam_length * backbone.hidden_dim
    for layer in backbone.transformer_layers:
        for sublayer in layer._flatten_layers(include_self=False):
            if sublayer.name in targets and hasattr(sublayer, "kernel"):
                shape = tuple(sublayer.kernel.shape)
                count += rank * (int(np.prod(shape[:-1])) + shape[-1])
    return count


def test_default_targets_cover_attention_and_feedforward():
    backbone = tiny_lm().backbone
    backbone.enable_lora(RANK)
    lora = {
        sublayer.name
        for layer in backbone.transformer_layers
        for sublayer in layer._flatten_layers(include_self=False)
        if getattr(sublayer, "lora_enabled", False)
    }
    assert lora == {
        "query",
        "key",
        "value",
        "attention_output",
        "feedforward_gate_dense",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
    }
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert trainable == expected_trainable_count(
        backbone, RANK, backbone.default_lora_layer_names()
    )
    # By hand for this config (rank 2, width 16, 2 heads of 8, 1 KV head):
    # q: (16,2,8) -> 2*(32+8)=80; k, v: (16,1,8) -> 2*(16+8)=48 each;
    # out: (2,8,16) -> 2*(16+16)=64; gate, up: (16,24) -> 2*(16+24)=80
    # each; down: (24,16) -> 2*(24+16)=80. Per layer 480; plus 2*16 summary.
    assert trainable == 2 * 480 + 32


def test_chosen_targets_and_unknown_names():
    backbone = tiny_lm().backbone
    backbone.enable_lora(RANK, target_names=["query", "value"])
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert trainable == expected_trainable_count(
        backbone, RANK, ["query", "value"]
    )
    other = tiny_lm().backbone
    with pytest.raises(ValueError, match="target_layer_names"):
        other.enable_lora(RANK, target_layer_names=["query", "mlp"])
    with pytest.raises(ValueError, match="rank"):
        other.enable_lora(0)


def test_lora_fit_adapter_round_trip_and_merge(tmp_path):
    lm = tiny_lm()
    base_weights = lm.backbone.get_weights()
    lm.backbone.enable_lora(RANK)
    frozen = {w.path: numpy(w) for w in lm.backbone.non_trainable_weights}
    adapters = {w.path: numpy(w) for w in lm.backbone.trainable_weights}
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = data()
    lm.fit(x, y, batch_size=4, epochs=2, verbose=0)
    # Only the adapters (and the summary embeddings) changed.
    for weight in lm.backbone.non_trainable_weights:
        np.testing.assert_array_equal(
            numpy(weight), frozen[weight.path], err_msg=weight.path
        )
    changed = [
        w.path
        for w in lm.backbone.trainable_weights
        if np.abs(numpy(w) - adapters[w.path]).max() > 0
    ]
    assert any("lora_kernel_b" in path for path in changed)
    assert any("fam_summary_embedding" in path for path in changed)
    expected = numpy(lm(x))

    # Adapter-only round trip onto a fresh copy of the base model.
    path = os.path.join(tmp_path, "adapters.lora.h5")
    lm.backbone.save_lora_weights(path)
    with h5py.File(path, "r") as file:
        stored = []
        file.visit(
            lambda name: (
                stored.append(file[name].size)
                if isinstance(file[name], h5py.Dataset)
                else None
            )
        )
    # The adapters, the summary embeddings and the rank: no base weights.
    assert (
        sum(stored)
        == expected_trainable_count(
            lm.backbone, RANK, lm.backbone.default_lora_layer_names()
        )
        + 1
    )
    fresh = tiny_lm()
    fresh.backbone.set_weights(base_weights)
    fresh.backbone.load_lora_weights(path)
    np.testing.assert_array_equal(numpy(fresh(x)), expected)

    # Merged weights (Keras merges LoRA when saving) equal unmerged.
    merged_path = os.path.join(tmp_path, "merged.weights.h5")
    lm.backbone.save_weights(merged_path)
    merged = tiny_lm()
    merged.backbone.load_weights(merged_path)
    assert not any(
        getattr(layer, "lora_enabled", False)
        for layer in merged.backbone._flatten_layers()
    )
    np.testing.assert_allclose(numpy(merged(x)), expected, atol=1e-5)
