"""Random State Passing and Random Position Offset (keras_fam.training)."""

import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

from keras_fam.models import FAMCausalLM
from keras_fam.training import RandomPositionOffset, RandomStatePassing

VOCAB = 19
DRAWS = 400


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def tiny_backbone(**overrides):
    config = {"hidden_dim": 8, "intermediate_dim": 8, "seed": 3, **overrides}
    return tiny_models.tiny_backbone(VOCAB, **config)


def manual_forward(backbone, token_ids, initial_fams):
    """The backbone's forward pass written out with the public layer API;
    returns the hidden states and every layer's final FAM."""
    x = backbone.embed(token_ids)
    finals = []
    for layer, fam in zip(
        backbone.transformer_layers, initial_fams, strict=True
    ):
        x, final = layer(x, fam=fam, return_fam=True)
        finals.append(numpy(final))
    return numpy(backbone.layer_norm(x)), finals


def test_state_passing_probability_statistics():
    """With p = 0.8 the carried FAM is used in 80% of training steps (a
    binomial with n = 400 has standard deviation 0.02: we allow 3 sigma),
    never before a FAM was carried and never at inference."""
    passing = RandomStatePassing(2, 3, 4, probability=0.8, seed=7)
    passing.build()
    fresh = [ops.zeros((2, 3, 4))] * 2
    # Nothing carried yet: always the fresh FAM.
    for _ in range(20):
        chosen = passing.select(fresh, training=True)
        assert np.abs(numpy(chosen[0])).max() == 0
    finals = [ops.ones((2, 3, 4)), 2 * ops.ones((2, 3, 4))]
    passing.update(finals, training=True)
    np.testing.assert_array_equal(
        numpy(passing.carried_fam),
        np.stack([np.ones((3, 4)), 2 * np.ones((3, 4))]),
    )
    carried = 0
    for _ in range(DRAWS):
        chosen = passing.select(fresh, training=True)
        first, second = numpy(chosen[0]), numpy(chosen[1])
        # One coin per step for all layers and rows.
        assert first.min() == first.max() and second.max() == 2 * first.max()
        carried += int(first[0, 0, 0] == 1.0)
    assert abs(carried / DRAWS - 0.8) < 0.06, carried / DRAWS
    for _ in range(20):
        assert (
            np.abs(numpy(passing.select(fresh, training=False)[0])).max() == 0
        )
    passing.update([3 * f for f in finals], training=False)  # Ignored.
    assert numpy(passing.carried_fam).max() == 2.0


def test_state_passing_carries_the_first_rows_final_fam():
    backbone = tiny_backbone(state_passing_probability=1.0)
    rng = np.random.default_rng(0)
    first_ids = rng.integers(0, VOCAB, (3, 10))
    second_ids = rng.integers(0, VOCAB, (3, 10))
    fresh = backbone.initial_fams(3)
    _, finals = manual_forward(backbone, first_ids, fresh)
    backbone({"token_ids": first_ids}, training=True)
    for index, final in enumerate(finals):
        np.testing.assert_allclose(
            numpy(backbone.state_passing.carried_fam[index]),
            final[0],
            atol=1e-5,
        )
    # p = 1: the next training step starts every row from that FAM.
    carried = [np.broadcast_to(final[:1], final.shape) for final in finals]
    expected, _ = manual_forward(backbone, second_ids, carried)
    np.testing.assert_allclose(
        numpy(backbone({"token_ids": second_ids}, training=True)),
        expected,
        atol=1e-5,
    )
    # Inference ignores it.
    plain, _ = manual_forward(backbone, second_ids, fresh)
    np.testing.assert_allclose(
        numpy(backbone({"token_ids": second_ids})), plain, atol=1e-5
    )


def test_state_passing_under_fit():
    """The carried FAM is a non-trainable variable updated in the forward
    pass of the compiled train step, on every backend."""
    lm = FAMCausalLM(tiny_backbone(state_passing_probability=0.8))
    lm.compile(optimizer="adam")
    rng = np.random.default_rng(1)
    x = {
        "token_ids": rng.integers(0, VOCAB, (4, 8)),
        "padding_mask": np.ones((4, 8), bool),
    }
    y = rng.integers(0, VOCAB, (4, 8))
    passing = lm.backbone.state_passing
    assert float(numpy(passing.has_carried_fam)) == 0.0
    lm.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert float(numpy(passing.has_carried_fam)) == 1.0
    assert np.abs(numpy(passing.carried_fam)).max() > 0
    off = FAMCausalLM(tiny_backbone())
    off.compile(optimizer="adam")
    off.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert float(numpy(off.backbone.state_passing.has_carried_fam)) == 0.0


def test_position_offset_statistics():
    """Offsets are uniform in [0, max_offset) and zero with probability
    0.5 in training; always zero at inference."""
    sampler = RandomPositionOffset(max_offset=10000, probability=0.5, seed=5)
    offsets = np.array(
        [int(numpy(sampler.sample(training=True))) for _ in range(DRAWS)]
    )
    assert offsets.min() >= 0 and offsets.max() < 10000
    nonzero = offsets[offsets > 0]
    assert abs(len(nonzero) / DRAWS - 0.5) < 0.075, len(nonzero) / DRAWS
    # Uniform on [0, 10000): mean 5000, std of the mean ~ 2887 / sqrt(200).
    assert abs(nonzero.mean() - 5000) < 700, nonzero.mean()
    assert all(sampler.sample(training=False) == 0 for _ in range(10))
    always = RandomPositionOffset(max_offset=7, probability=1.0, seed=1)
    values = {int(numpy(always.sample(training=True))) for _ in range(200)}
    assert values <= set(range(7)) and len(values) >= 6


def test_position_offset_reaches_the_layers_in_training_only():
    backbone = tiny_backbone(
        position_offset_probability=1.0, max_position_offset=5000
    )
    plain = tiny_backbone()
    plain.set_weights(backbone.get_weights())
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 10))
    reference = numpy(plain({"token_ids": ids}))
    # Inference: offset 0, identical to a model without the trick.
    np.testing.assert_array_equal(
        numpy(backbone({"token_ids": ids})), reference
    )
    # Training: RoPE is relative, so a shared offset changes the result only
    # by float rounding at large positions; it must change it at all.
    trained = numpy(backbone({"token_ids": ids}, training=True))
    assert 0 < np.abs(trained - reference).max() < 1e-2
    received = []
    layer = backbone.transformer_layers[0]
    original = layer.get_initial_state

    def spy(*args, **kwargs):
        received.append(int(numpy(kwargs["position_offset"])))
        return original(*args, **kwargs)

    layer.get_initial_state = spy
    backbone({"token_ids": ids}, training=True)
    assert len(received) == 1 and 0 <= received[0] < 5000


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(probability=-0.1), "state_passing_probability"),
        (dict(probability="high"), "state_passing_probability"),
    ],
)
def test_bad_probability(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomStatePassing(1, 1, 1, **kwargs)


def test_bad_offset_arguments():
    with pytest.raises(ValueError, match="max_position_offset"):
        RandomPositionOffset(max_offset=0)
    with pytest.raises(ValueError, match="position_offset_probability"):
        RandomPositionOffset(max_offset=10, probability=2.0)
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(
                RandomPositionOffset(max_offset=10, probability=0.25)
            )
        ).get_config()["probability"]
        == 0.25
    )
