"""keras_fam.training: Random State Passing, Random Position Offset,
streamed state passing, LogWindow and RollbackOnCollapse."""

import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

from keras_fam.models import FAMCausalLM
from keras_fam.training import (
    LogWindow,
    RandomPositionOffset,
    RandomStatePassing,
    RollbackOnCollapse,
    SampleWeightTotal,
    ScaledLearningRate,
    calibrate_write_threshold,
    streamed_batches,
    streamed_dataset,
)

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


# === Streamed state passing ===


def stream_backbone(**overrides):
    return tiny_backbone(training_streams=3, memory_segments=0, **overrides)


def test_streamed_state_passing_continues_each_row_from_its_own_fam():
    """Row b of step t + 1 starts from row b's final FAM of step t, unless
    its `stream_reset` is 1 (then from the initial FAM); rows never see
    each other's FAM; inference neither reads nor writes the carry."""
    backbone = stream_backbone()
    rng = np.random.default_rng(0)
    first_ids = rng.integers(0, VOCAB, (3, 10))
    second_ids = rng.integers(0, VOCAB, (3, 10))
    fresh = backbone.initial_fams(3)
    _, finals = manual_forward(backbone, first_ids, fresh)
    reset = np.ones(3, "float32")
    backbone({"token_ids": first_ids, "stream_reset": reset}, training=True)
    carried = numpy(backbone.stream_passing.carried_fam)
    for index, final in enumerate(finals):
        np.testing.assert_allclose(carried[index], final, atol=1e-5)
    # Rows 0 and 2 continue, row 1 restarts.
    reset = np.array([0.0, 1.0, 0.0], "float32")
    starts = [
        np.stack([final[0], numpy(fresh_fam)[1], final[2]])
        for final, fresh_fam in zip(finals, fresh, strict=True)
    ]
    expected, expected_finals = manual_forward(backbone, second_ids, starts)
    hidden = backbone(
        {"token_ids": second_ids, "stream_reset": reset}, training=True
    )
    np.testing.assert_allclose(numpy(hidden), expected, atol=1e-5)
    # Row independence: changing row 0's tokens changes nothing in rows 1, 2.
    other = second_ids.copy()
    other[0] = (other[0] + 1) % VOCAB
    backbone.stream_passing.carried_fam.assign(np.stack(finals))
    changed = numpy(
        backbone({"token_ids": other, "stream_reset": reset}, training=True)
    )
    np.testing.assert_allclose(changed[1:], expected[1:], atol=1e-5)
    assert np.abs(changed[0] - expected[0]).max() > 1e-3
    # Inference: the fresh initial FAM, and the carry is left alone.
    before = numpy(backbone.stream_passing.carried_fam)
    plain, _ = manual_forward(backbone, second_ids, fresh)
    np.testing.assert_allclose(
        numpy(backbone({"token_ids": second_ids, "stream_reset": reset})),
        plain,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        numpy(backbone.stream_passing.carried_fam), before
    )


def test_streamed_batches_cut_continuous_streams():
    """Each row is its documents end to end; consecutive segments continue
    it exactly; a reset row starts a new document; labels are the next
    tokens and weights follow the documents."""
    counter = iter(range(10**6))

    def document(rng):
        start = next(counter) * 100
        length = int(rng.integers(3, 12))
        return np.arange(start, start + length), np.full(length, 0.5)

    batches = streamed_batches(document, 4, 7, reset_probability=0.3, seed=1)
    x, y, w = next(batches)
    assert x["token_ids"].shape == (4, 7) and y.shape == (4, 7)
    np.testing.assert_array_equal(x["stream_reset"], np.ones(4))
    np.testing.assert_array_equal(w, 0.5)
    streams = [
        list(row) + [label[-1]]
        for row, label in zip(x["token_ids"], y, strict=True)
    ]
    resets = 0
    for _ in range(30):
        x, y, _ = next(batches)
        np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
        for row in range(4):
            if x["stream_reset"][row]:
                resets += 1
                assert x["token_ids"][row, 0] % 100 == 0  # A new document.
                streams[row] = list(x["token_ids"][row]) + [y[row, -1]]
                continue
            # Continues exactly where the previous segment stopped.
            assert x["token_ids"][row, 0] == streams[row][-1]
            streams[row] += list(y[row])
    assert 10 < resets < 70  # ~0.3 * 120 = 36 expected.
    with pytest.raises(ValueError, match="segment_length"):
        next(streamed_batches(document, 2, 0))
    with pytest.raises(ValueError, match="reset_probability"):
        next(streamed_batches(document, 2, 4, reset_probability=1.5))


def test_streamed_batches_with_document_resets():
    """Every document starts a segment from a fresh state, continues over
    as many segments as it spans, and its last segment is right-padded
    (masked, weight 0); nothing of another document shares its segments."""
    counter = iter(range(10**6))

    def document(rng):
        start = next(counter) * 100
        length = int(rng.integers(2, 20))
        return np.arange(start, start + length), np.full(length, 0.5)

    batches = streamed_batches(
        document, 3, 6, reset_probability=0.0, seed=2, document_resets=True
    )
    current, ended, last_label = [None] * 3, [True] * 3, [None] * 3
    padded_segments = 0
    for step in range(40):
        x, y, w = next(batches)
        ids, mask = x["token_ids"], x["padding_mask"]
        for row in range(3):
            real = int(mask[row].sum())
            if ended[row]:
                assert x["stream_reset"][row]
            elif not x["stream_reset"][row]:
                # Continues exactly where the previous segment stopped.
                assert ids[row, 0] == last_label[row]
            ended[row], last_label[row] = real < 6, y[row, -1]
            # Right padding only, and nothing real after it.
            np.testing.assert_array_equal(mask[row], np.arange(6) < real)
            assert np.all(w[row, real:] == 0) and np.all(ids[row, real:] == 0)
            if x["stream_reset"][row]:
                assert ids[row, 0] % 100 == 0  # A document's first token.
                current[row] = ids[row, 0] // 100
            else:
                assert step > 0 and ids[row, 0] % 100 != 0
            # Every real token belongs to the row's current document.
            np.testing.assert_array_equal(ids[row, :real] // 100, current[row])
            if real < 6:
                padded_segments += 1
                # The document ends here: the next step resets the row.
                labels = y[row, : max(real - 1, 0)]
                np.testing.assert_array_equal(labels, ids[row, 1:real])
    assert padded_segments > 10
    with pytest.raises(ValueError, match="document_resets"):
        next(streamed_batches(document, 2, 4, document_resets="yes"))


def test_streamed_state_passing_under_fit():
    """`fit` on `streamed_dataset` writes every row's final FAM in the
    compiled train step; `predict` and `evaluate` leave it alone."""
    lm = FAMCausalLM(stream_backbone())
    lm.compile(optimizer="adam")

    def document(rng):
        return rng.integers(0, VOCAB, int(rng.integers(3, 20)))

    passing = lm.backbone.stream_passing
    lm.fit(
        streamed_dataset(document, 3, 8, seed=0), steps_per_epoch=3, verbose=0
    )
    carried = numpy(passing.carried_fam)
    assert carried.shape == (2, 3, 2, 8)
    # Rows differ: each holds its own stream's FAM.
    assert np.abs(carried[:, 0] - carried[:, 1]).max() > 1e-4
    ids = np.random.default_rng(3).integers(0, VOCAB, (3, 8))
    lm.predict(
        {"token_ids": ids, "padding_mask": np.ones((3, 8), bool)}, verbose=0
    )
    np.testing.assert_array_equal(numpy(passing.carried_fam), carried)


def test_streamed_state_passing_errors():
    with pytest.raises(ValueError, match="training_streams"):
        tiny_backbone(training_streams=0)
    with pytest.raises(ValueError, match="fam_length"):
        tiny_backbone(training_streams=2, fam_length=0)
    with pytest.raises(ValueError, match="not both"):
        tiny_backbone(training_streams=2, state_passing_probability=0.5)
    backbone = stream_backbone()
    ids = np.zeros((3, 4), "int32")
    with pytest.raises(ValueError, match="stream_reset"):
        backbone({"token_ids": ids}, training=True)
    with pytest.raises(ValueError, match="training_streams=3"):
        backbone(
            {"token_ids": ids[:2], "stream_reset": np.ones(2, "float32")},
            training=True,
        )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(backbone)
    )
    assert restored.training_streams == 3


# === RollbackOnCollapse ===


def regression(optimizer="adam"):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(64 * 50, 4)).astype("float32")
    return model, x, x @ np.array([[1.0], [2.0], [-1.0], [0.5]], "float32")


def variables_now(model):
    optimizer = model.optimizer
    slots = [v for v in optimizer.variables if v is not optimizer.iterations]
    return [numpy(v) for v in model.trainable_variables + slots]


class Sabotage(keras.callbacks.Callback):
    """Wrecks the weights after step `at` and records the state at the
    steps in `record` (after the callbacks before it in the list)."""

    def __init__(self, at, record=()):
        super().__init__()
        self.at, self.record, self.step, self.seen = at, record, 0, {}

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step in self.record:
            model = self.model
            self.seen[self.step] = (
                variables_now(model),
                int(numpy(model.optimizer.iterations)),
            )
        if self.step == self.at:
            for variable in self.model.trainable_variables:
                variable.assign(ops.full(variable.shape, 5.0))


def test_rollback_on_collapse_restores_an_earlier_state_under_fit():
    model, x, y = regression()
    guard = RollbackOnCollapse(check_every=10, verbose=0)
    sabotage = Sabotage(at=25, record=(10, 30))
    model.fit(
        x, y, batch_size=64, epochs=1, verbose=0, callbacks=[guard, sabotage]
    )
    # Detected at the check after the damage (step 30); the copy restored
    # is the older of the last two (steps 10 and 20).
    assert [(r["step"], r["restored_step"]) for r in guard.rollbacks] == [
        (30, 10)
    ]
    assert guard.rollbacks[0]["value"] > guard.rollbacks[0]["best"] * 2
    copy, _ = sabotage.seen[10]
    restored, iterations = sabotage.seen[30]
    for before, after in zip(copy, restored, strict=True):
        np.testing.assert_array_equal(before, after)
    # Weights and Adam's slots go back; the step counter does not.
    assert iterations == 30
    assert len(copy) == 1 + 2 + 2 * 2  # kernel, bias; m and v of each (+lr)
    recovered = model.evaluate(x, y, verbose=0)

    model, x, y = regression()
    model.fit(
        x, y, batch_size=64, epochs=1, verbose=0, callbacks=[Sabotage(25)]
    )
    assert recovered < 0.1 * model.evaluate(x, y, verbose=0)


def feed(guard, values, epoch_length=None):
    """Drives `guard` with per-step `values` of an `acc` log (Keras logs
    running means over each epoch)."""
    epoch_length = epoch_length or len(values)
    for begin in range(0, len(values), epoch_length):
        guard.on_epoch_begin(begin // epoch_length)
        epoch = values[begin : begin + epoch_length]
        for batch in range(len(epoch)):
            guard.on_train_batch_end(
                batch, {"acc": float(np.mean(epoch[: batch + 1]))}
            )


def test_log_window_recovers_window_means_from_running_means():
    values = np.random.default_rng(0).uniform(size=23)
    window = LogWindow("loss", 5)
    means = []
    for epoch in (values[:12], values[12:]):
        window.reset()  # Keras restarts its running means every epoch.
        for batch in range(len(epoch)):
            mean = window.update(batch, {"loss": np.mean(epoch[: batch + 1])})
            if mean is not None:
                means.append(mean)
    expected = [values[0:5], values[5:10], values[12:17], values[17:22]]
    np.testing.assert_allclose(means, [np.mean(v) for v in expected])
    with pytest.raises(ValueError, match="steps"):
        LogWindow("loss", 0)


def test_log_window_weights_steps_by_their_sample_weight():
    rng = np.random.default_rng(0)
    correct = rng.uniform(size=20)  # Per-step accuracy.
    weights = np.concatenate([np.full(10, 1.0), np.full(10, 100.0)])
    window = LogWindow("acc", 5, weight_log="total")
    unweighted = LogWindow("acc", 5)
    means, naive = [], []
    for batch in range(20):
        done = slice(0, batch + 1)
        total = weights[done].sum()
        logs = {  # What Keras logs: the weighted running mean.
            "acc": (weights[done] * correct[done]).sum() / total,
            "total": total,
        }
        for log_window, found in ((window, means), (unweighted, naive)):
            mean = log_window.update(batch, logs)
            if mean is not None:
                found.append(mean)
    expected = [correct[i : i + 5].mean() for i in range(0, 20, 5)]
    np.testing.assert_allclose(means, expected)
    # Weighting every step alike is off once the weights change.
    assert abs(naive[2] - expected[2]) > 0.1
    with pytest.raises(ValueError, match="total"):
        LogWindow("acc", 5, weight_log="total").update(4, {"acc": 0.5})
    with pytest.raises(ValueError, match="weight_log"):
        LogWindow("acc", 5, weight_log="")


def test_sample_weight_total_under_fit():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["sparse_categorical_accuracy", SampleWeightTotal()],
    )
    x = np.zeros((12, 4), "float32")
    y = np.zeros((12,), "int32")
    weight = np.arange(12, dtype="float32")
    history = model.fit(
        x, y, sample_weight=weight, batch_size=4, epochs=2, verbose=0
    )
    # Reset every epoch: each epoch's total is the whole weight.
    assert history.history["sample_weight_total"] == [66.0, 66.0]
    metric = SampleWeightTotal()
    metric.update_state(np.zeros((2, 3)), None)
    assert float(numpy(metric.result())) == 6.0
    config = keras.saving.serialize_keras_object(metric)
    again = keras.saving.deserialize_keras_object(config)
    assert isinstance(again, SampleWeightTotal)


@pytest.mark.parametrize("epoch_length", [None, 7])
def test_rollback_on_collapse_detects_collapses_not_declines(epoch_length):
    model, _, _ = regression()
    model.optimizer.build(model.trainable_variables)
    guard = RollbackOnCollapse("acc", check_every=5, verbose=0)
    guard.set_model(model)
    guard.on_train_begin()
    # Learns to 0.9, then declines gently to 0.5 (a harder curriculum):
    # more than half of the best, so no rollback.
    rising = list(np.linspace(0.1, 0.9, 20))
    declining = list(np.linspace(0.9, 0.5, 20))
    feed(guard, rising + declining, epoch_length)
    assert guard.rollbacks == []
    # A window below half of the best is a collapse.
    feed(guard, [0.3] * 5, epoch_length)
    (rollback,) = guard.rollbacks
    assert rollback["step"] == 45
    assert rollback["value"] == pytest.approx(0.3)
    assert rollback["best"] > 0.8
    # The older of the last two copies: at least a window before the last
    # healthy check.
    if epoch_length is None:
        assert rollback["restored_step"] == 35
    else:  # Windows restart with every epoch of 7 steps.
        assert rollback["restored_step"] <= 45 - 2 * 5
    # A non-finite window is one too.
    feed(guard, [float("nan")] * 5, epoch_length)
    assert len(guard.rollbacks) == 2


def test_rollback_on_collapse_limits_and_mode():
    model, _, _ = regression()
    model.optimizer.build(model.trainable_variables)
    guard = RollbackOnCollapse("acc", check_every=5, max_rollbacks=1)
    assert guard.mode == "max"
    assert RollbackOnCollapse("loss").mode == "min"
    guard.verbose = 0
    guard.set_model(model)
    guard.on_train_begin()
    feed(guard, [0.9] * 10 + [0.1] * 20)
    assert len(guard.rollbacks) == 1
    # No copy is taken once no rollback is left: only the restored one.
    assert [c[0] for c in guard._copies] == [
        guard.rollbacks[0]["restored_step"]
    ]
    # After `reset` (a deliberate new start) a low window is the new best.
    guard = RollbackOnCollapse("acc", check_every=5, verbose=0)
    guard.set_model(model)
    guard.on_train_begin()
    feed(guard, [0.9] * 10)
    guard.reset()
    feed(guard, [0.2] * 10 + [0.15] * 5 + [0.05] * 5)
    assert [r["step"] for r in guard.rollbacks] == [30]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"monitor": ""}, "monitor"),
        ({"mode": "up"}, "mode"),
        ({"check_every": 0}, "check_every"),
        ({"collapse_ratio": 1.0}, "collapse_ratio"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"learning_rate_factor": 0.0}, "learning_rate_factor"),
        ({"learning_rate_factor": 1.5}, "learning_rate_factor"),
    ],
)
def test_rollback_on_collapse_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RollbackOnCollapse(**kwargs)


def test_rollback_on_collapse_names_a_missing_log():
    model, x, y = regression()
    guard = RollbackOnCollapse("accuracy", check_every=2)
    with pytest.raises(ValueError, match="accuracy.*loss"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[guard])


@pytest.mark.parametrize("schedule", [False, True])
def test_rollback_on_collapse_lowers_the_learning_rate(schedule):
    def run(factor):
        keras.utils.set_random_seed(0)  # The same weights in both runs.
        learning_rate = 0.01
        if schedule:
            learning_rate = keras.optimizers.schedules.ExponentialDecay(
                0.01, decay_steps=10, decay_rate=0.9
            )
        model, x, y = regression(keras.optimizers.Adam(learning_rate))
        guard = RollbackOnCollapse(
            check_every=10, learning_rate_factor=factor, verbose=0
        )
        sabotage = Sabotage(at=25, record=(30, 31))
        model.fit(
            x,
            y,
            batch_size=64,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[guard, sabotage],
        )
        # The first step after the rollback (from the restored state).
        moved = sabotage.seen[31][0][0] - sabotage.seen[30][0][0]
        return model, guard, moved

    model, guard, moved = run(0.5)
    _, _, moved_before = run(None)
    assert [r["learning_rate_scale"] for r in guard.rollbacks] == [0.5]
    # The train function uses the halved rate: from the same state and
    # batch, Adam's step is proportional to the learning rate.
    np.testing.assert_allclose(moved, 0.5 * moved_before, rtol=1e-4)
    optimizer = model.optimizer
    expected = 0.01 * 0.5
    if schedule:
        assert isinstance(optimizer._learning_rate, ScaledLearningRate)
        expected *= 0.9 ** (int(numpy(optimizer.iterations)) / 10)
    np.testing.assert_allclose(
        float(numpy(optimizer.learning_rate)), expected, rtol=1e-5
    )


def test_scaled_learning_rate_serializes():
    cosine = keras.optimizers.schedules.CosineDecay(1e-3, 100)
    scaled = ScaledLearningRate(cosine, 0.25)
    again = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(scaled)
    )
    assert isinstance(again, ScaledLearningRate)
    for step in (0, 50):
        np.testing.assert_allclose(
            float(numpy(again(step))), float(numpy(cosine(step))) * 0.25
        )
    with pytest.raises(ValueError, match="scale"):
        ScaledLearningRate(cosine, 0.0)
    with pytest.raises(ValueError, match="schedule"):
        ScaledLearningRate(1e-3, 0.5)


# === The hard write gate's threshold, set after training ===


def _gated_lm(**overrides):
    return tiny_models.tiny_lm(
        VOCAB,
        fam_write_gate="hard",
        fam_write_threshold=0.5,
        **{"hidden_dim": 8, "intermediate_dim": 8, "seed": 3, **overrides},
    )


def _token_inputs(batch=2, length=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, VOCAB, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "bool"),
    }


def test_set_fam_write_threshold_reaches_layers_compiled_functions_config():
    lm = _gated_lm()
    inputs = _token_inputs()
    at_half = lm.predict(inputs, verbose=0)
    lm.set_fam_write_threshold(0.99)  # Every gate closed: the FAM stays.
    assert [
        layer.fam_write_threshold for layer in lm.backbone.transformer_layers
    ] == [0.99, 0.99]
    closed = lm.predict(inputs, verbose=0)
    assert np.abs(closed - at_half).max() > 1e-4
    np.testing.assert_allclose(numpy(lm(inputs)), closed, atol=1e-5)
    config = lm.backbone.get_config()
    assert config["fam_write_threshold"] == 0.99
    rebuilt = FAMCausalLM(
        type(lm.backbone).from_config(config), preprocessor=None
    )
    rebuilt.backbone.set_weights(lm.backbone.get_weights())
    np.testing.assert_allclose(numpy(rebuilt(inputs)), closed, atol=1e-5)
    lm.set_fam_write_threshold(0.5)
    np.testing.assert_allclose(
        lm.predict(inputs, verbose=0), at_half, atol=1e-5
    )


def test_set_fam_write_threshold_errors():
    with pytest.raises(ValueError, match="threshold=1.5"):
        _gated_lm().set_fam_write_threshold(1.5)
    ungated = tiny_models.tiny_lm(VOCAB, hidden_dim=8, intermediate_dim=8)
    with pytest.raises(ValueError, match='needs `fam_write_gate="hard"`'):
        ungated.set_fam_write_threshold(0.5)


def test_calibrate_write_threshold_sets_the_best_candidate():
    lm = _gated_lm()
    inputs = _token_inputs()
    seen = []

    def score(model):
        # The threshold really reaches the model: predictions change.
        threshold = model.backbone.layer_options["fam_write_threshold"]
        seen.append((threshold, model.predict(inputs, verbose=0)))
        return -abs(threshold - 0.6)

    best, scores = calibrate_write_threshold(
        lm, score, [0.4, 0.6, 0.99], verbose=0
    )
    assert best == 0.6 and list(scores) == [0.4, 0.6, 0.99]
    assert lm.backbone.layer_options["fam_write_threshold"] == 0.6
    assert np.abs(seen[2][1] - seen[0][1]).max() > 1e-4
    np.testing.assert_allclose(
        lm.predict(inputs, verbose=0), seen[1][1], atol=1e-5
    )
    # Ties: the candidate closest to the current threshold (0.6 now).
    best, _ = calibrate_write_threshold(
        lm, lambda model: 1.0, [0.3, 0.7, 0.55], verbose=0
    )
    assert best == 0.55


@pytest.mark.parametrize(
    "thresholds, score, message",
    [
        ([], lambda m: 0.0, "thresholds"),
        ([0.5, 1.0], lambda m: 0.0, "thresholds=1.0"),
        ([0.5], "accuracy", "score"),
    ],
)
def test_calibrate_write_threshold_errors(thresholds, score, message):
    with pytest.raises(ValueError, match=message):
        calibrate_write_threshold(_gated_lm(), score, thresholds, verbose=0)


def test_write_threshold_jitter_trains_under_fit():
    # The jittered thresholds are drawn in the compiled train step (outside
    # the block loop) on every backend.
    lm = _gated_lm(fam_write_threshold_jitter=0.1)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss="auto")
    inputs = _token_inputs(batch=4, seed=1)
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    history = lm.fit(inputs, labels, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert lm.backbone.get_config()["fam_write_threshold_jitter"] == 0.1
