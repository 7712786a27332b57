"""Hostile presets: corrupt, truncated or wrongly typed files and
misspelled overrides, built in the test. Each gives a `ValueError` that
names the preset file or the argument."""

import os
import shutil

import keras_hub
import numpy as np
import pytest
from tiny_models import tiny_backbone

from keras_fam.models import FAMBackbone, FAMCausalLM

VOCAB = 20


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """A FAM preset and a (tiny, random) KerasHub Llama preset."""
    root = tmp_path_factory.mktemp("presets")
    fam = str(root / "fam")
    tiny_backbone(VOCAB).save_to_preset(fam)
    llama = str(root / "llama")
    keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
    ).save_to_preset(llama)
    return {"fam": fam, "llama": llama}


def broken_copy(presets, kind, tmp_path, name, damage):
    directory = str(tmp_path / kind)
    shutil.copytree(presets[kind], directory)
    path = os.path.join(directory, name)
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(damage(data))
    return directory


DAMAGES = {
    "garbage": lambda data: b"\x00\x01 not a preset file \xff" * 10,
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("kind", ["fam", "llama"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", ["config.json", "metadata.json"])
def test_corrupt_json_names_the_file(presets, tmp_path, kind, damage, name):
    directory = broken_copy(presets, kind, tmp_path, name, DAMAGES[damage])
    with pytest.raises(ValueError, match=f"{name} is not valid JSON"):
        FAMBackbone.from_preset(directory)


@pytest.mark.parametrize("kind", ["fam", "llama"])
def test_json_of_the_wrong_type_names_the_file(presets, tmp_path, kind):
    directory = broken_copy(
        presets, kind, tmp_path, "config.json", lambda data: b"[1, 2]"
    )
    with pytest.raises(ValueError, match="config.json must hold a JSON"):
        FAMCausalLM.from_preset(directory, preprocessor=None)


@pytest.mark.parametrize("kind", ["fam", "llama"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("cls", [FAMBackbone, FAMCausalLM])
def test_corrupt_weights_name_the_file(presets, tmp_path, kind, damage, cls):
    directory = broken_copy(
        presets, kind, tmp_path, "model.weights.h5", DAMAGES[damage]
    )
    kwargs = {"preprocessor": None} if cls is FAMCausalLM else {}
    with pytest.raises(ValueError, match="model.weights.h5") as error:
        cls.from_preset(directory, **kwargs)
    assert "allow_pickle" not in str(error.value)
    assert "Could not load preset" in str(error.value)


def test_missing_weights_file(presets, tmp_path):
    directory = str(tmp_path / "fam")
    shutil.copytree(presets["fam"], directory)
    os.remove(os.path.join(directory, "model.weights.h5"))
    with pytest.raises(ValueError, match="preset"):
        FAMBackbone.from_preset(directory)


@pytest.mark.parametrize("kind", ["fam", "llama"])
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(blok_size=8), "did you mean `block_size`"),
        (dict(fam_lenght=4), "did you mean `fam_length`"),
        (dict(memory_segmnts=2), "memory_segmnts"),
        (dict(totally_unknown=1), "totally_unknown"),
        (dict(block_size=np.float64(8)), "block_size"),
        (dict(fam_length="4"), "fam_length"),
        (dict(dropout=2.0), "dropout"),
        (dict(rope_scaling_factor=0.0), "rope_scaling_factor"),
    ],
)
def test_bad_overrides(presets, kind, overrides, match):
    with pytest.raises(ValueError, match=match):
        FAMCausalLM.from_preset(presets[kind], preprocessor=None, **overrides)


def test_misspelled_backbone_override(presets):
    with pytest.raises(ValueError, match="did you mean `block_size`"):
        FAMBackbone.from_preset(presets["fam"], blok_size=8)


def test_good_overrides_and_numpy_values_still_load(presets):
    backbone = FAMBackbone.from_preset(
        presets["fam"], block_size=np.int64(8), memory_segments=2
    )
    assert backbone.block_size == 8 and backbone.memory_segments == 2
    assert type(backbone.get_config()["block_size"]) is int
    converted = FAMBackbone.from_preset(
        presets["llama"], block_size=8, memory_segments=np.int32(1)
    )
    assert converted.memory_segments == 1
