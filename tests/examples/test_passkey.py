"""End-to-end checks of examples/passkey_retrieval.py (a reduced run of the
whole pipeline: base preset -> FAM -> LoRA -> fit -> stream)."""

import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), "..", "..", "examples")
)
import passkey_retrieval as passkey  # noqa: E402

from keras_fam.training import RollbackOnCollapse  # noqa: E402

TINY = [
    "--vocabulary-size", "256",
    "--base-context", "96",
    "--base-hidden-dim", "16",
    "--base-heads", "2",
    "--base-max-steps", "100",
    "--block-size", "16",
    "--fam-length", "2",
    "--lora-rank", "2",
    "--train-length", "64",
    "--batch-size", "4",
    "--epochs", "1",
    "--longest-filler", "100",
    "--verbose", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return passkey.train_tokenizer(256, seed=0)


def test_task_tokens_are_the_tokenized_prompt(tokenizer):
    """Sequences assembled from the three tokenized pieces equal the
    tokenizer's encoding of the whole prompt; the answer sits where
    `sequence` says; digits are single tokens."""
    task = passkey.PassKeyTask(tokenizer, key_digits=5)
    key = np.array([7, 1, 4, 3, 2])
    ids, start = task.sequence(key, 2 * len(task.cycle))
    text = passkey.passkey_text("71432", filler_repeats=2)
    expected = np.asarray(tokenizer(text))
    start_id = tokenizer.token_to_id(tokenizer.start_token)
    np.testing.assert_array_equal(ids, np.concatenate([[start_id], expected]))
    assert tokenizer.detokenize(ids[start : start + 5]) == "71432"
    assert "is the pass key" in tokenizer.detokenize(ids[:start])
    np.testing.assert_array_equal(ids[start : start + 5], task.digit_ids[key])
    assert task.overhead() + 2 * len(task.cycle) == len(ids)


def test_documents_weight_the_answer_or_every_predictable_token(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=3)
    rng = np.random.default_rng(0)
    ids, weights = task.document_sampler(0, 50)(rng)
    assert weights.sum() == 3  # The answer's digits only.
    assert np.all(np.isin(ids[weights > 0], task.digit_ids))
    ids, start = task.sequence(np.array([1, 2, 3]), 10)
    every = task.loss_weights(len(ids), start, answer_only=False)
    # Everything but the key's first (random) occurrence.
    assert every.sum() == len(ids) - 3
    assert np.all(every[task.head_key[:3]] == 0)


def test_filler_lengths_are_log_uniform():
    rng = np.random.default_rng(0)
    lengths = np.array(
        [passkey.sample_filler_length(rng, 0, 1023) for _ in range(4000)]
    )
    assert lengths.min() >= 0 and lengths.max() <= 1023
    # Log-uniform over [1, 1024]: half the mass below sqrt(1024) = 32.
    assert 0.45 < np.mean(lengths < 31) < 0.55


def test_the_question_is_asked_again_in_the_last_segment(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=3)
    rng = np.random.default_rng(0)
    sample = task.document_sampler(0, 300, fill_segment=64, gaps=(8, 16))
    answers = []
    for _ in range(50):
        ids, weights = sample(rng)
        # Never past the last segment the first answer needed.
        first_end = task.overhead() + 300
        assert len(ids) <= -(-first_end // 64) * 64
        answered = np.flatnonzero(weights)
        assert len(answered) % 3 == 0
        # Every answer is the key, right after the question.
        key = ids[answered[:3]]
        for start in answered[::3]:
            np.testing.assert_array_equal(ids[start : start + 3], key)
            question = task.question[: task.question_key[0]]
            np.testing.assert_array_equal(
                ids[start - len(question) : start], question
            )
        # The first filler as before; the others from `gaps`.
        starts = answered[::3]
        gaps = np.diff(starts) - len(task.question)
        assert np.all((gaps >= 8) & (gaps <= 16))
        answers.append(len(starts))
        # No room left for one more question in the last segment.
        room = -len(ids) % 64
        assert room < 16 + len(task.question)
    assert max(answers) > 1 and min(answers) >= 1
    # Without `fill_segment`, one question.
    ids, weights = task.document_sampler(0, 300)(rng)
    assert weights.sum() == 3
    # A loss on every predictable token: the repeats' tokens too.
    sample = task.document_sampler(
        0, 10, answer_only=False, fill_segment=64, gaps=(8, 16)
    )
    ids, weights = sample(rng)
    head = len(task.head)
    assert np.all(weights[head:] == 1.0) and len(ids) > task.overhead() + 10


def test_questions_can_be_moved_to_cross_a_block_boundary(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=3)
    first, last = int(task.question_key[0]), int(task.question_key[-1])

    def offsets(share, **kwargs):
        sample = task.document_sampler(
            0, 300, block=16, crossing_share=share, **kwargs
        )
        rng = np.random.default_rng(0)
        found = []
        for _ in range(400):
            ids, weights = sample(rng)
            answered = np.flatnonzero(weights)
            for start in answered[::3]:  # Each question's first token.
                np.testing.assert_array_equal(
                    ids[start : start + 3], ids[answered[:3]]
                )
                found.append(start - task.question_key[0])
        return np.array(found) % 16

    # Crossing: the question starts before the block boundary that its
    # answer starts after (offsets 16 - first .. 15); the answer is split
    # by the boundary at offsets 16 - last .. 16 - first - 1.
    def crossing(found):
        return np.mean(found >= 16 - first)

    def split(found):
        return np.mean((found >= 16 - last) & (found < 16 - first))

    natural = offsets(0.0)
    share = crossing(natural)
    assert 0.8 * first / 16 < share < 1.25 * first / 16
    moved = offsets(0.5)
    assert crossing(moved) == pytest.approx(share + 0.5 * (1 - share), abs=0.06)
    # Every crossing offset is drawn (uniformly), the others stay: the
    # split answers only where a question was not moved.
    counts = np.bincount(moved, minlength=16)
    assert np.all(counts > 0)
    assert split(moved) == pytest.approx(0.5 * split(natural), abs=0.03)
    # The repeated questions too, and none splits its answer.
    repeats = offsets(1.0, fill_segment=64, gaps=(8, 16))
    assert crossing(repeats) == 1.0 and len(repeats) > 400
    assert split(repeats) == 0.0
    with pytest.raises(ValueError, match="block"):
        task.document_sampler(0, 300, crossing_share=0.5)(
            np.random.default_rng(0)
        )


def test_key_stage_fillers_can_be_uniform(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=2)
    sampler = passkey.CurriculumSampler(
        task, 200, curriculum_steps=0, align=1, first_longest=40,
        advance_at=0.9, uniform_key_fillers=True,
    )  # fmt: skip
    rng = np.random.default_rng(0)

    def fillers():
        lengths = []
        for _ in range(2000):
            ids, weights = sampler(rng)
            digits = int(weights.sum())
            lengths.append(len(ids) - sampler.tasks[digits].overhead())
        return np.array(lengths)

    # Uniform in [0, 40] in the key stages: 15% at most 5 (log-uniform 48%).
    assert 0.11 < np.mean(fillers() <= 5) < 0.19
    sampler.stage = 2  # A filler stage: log-uniform again.
    lengths = fillers()
    assert np.mean(lengths <= 5) > 0.2 and lengths.max() <= 80
    # The fixed schedule: uniform while the key grows, not after.
    sampler = passkey.CurriculumSampler(
        task, 200, curriculum_steps=10, align=1, digit_steps=10,
        first_longest=40, uniform_key_fillers=True,
    )  # fmt: skip
    assert 0.11 < np.mean(fillers() <= 5) < 0.19
    sampler.step = 30
    lengths = fillers()
    assert np.mean(lengths <= 5) > 0.2 and lengths.max() <= 200


def test_filler_stages_can_ask_for_a_higher_accuracy(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=2)
    sampler = passkey.CurriculumSampler(
        task, 200, curriculum_steps=0, align=1, advance_at=0.9, window=5,
        filler_advance_at=0.95,
    )  # fmt: skip
    # The last key stage (all digits, shortest fillers) and the filler
    # stages end at 0.95, the others at 0.9.
    assert [sampler.threshold() for sampler.stage in range(4)] == [
        0.9, 0.95, 0.95, 0.95,
    ]  # fmt: skip
    sampler.stage = 0
    step = sampler.callback()
    step.on_epoch_begin(0)
    for batch, accuracy in enumerate([0.92] * 20):
        step.on_train_batch_begin(batch)
        step.on_train_batch_end(
            batch,
            {
                "sparse_categorical_accuracy": np.float32(accuracy),
                "sample_weight_total": 10.0 * (batch + 1),
            },
        )
    assert sampler.stage == 1  # 0.92 ends the first stage, not the second.


def test_curriculum_grows_the_key_then_the_filler(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=3)
    sampler = passkey.CurriculumSampler(
        task, 400, curriculum_steps=100, align=1, digit_steps=10,
        first_longest=40,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    seen = {}
    for step, bounds in [
        (0, (1, 40)), (10, (2, 40)), (19, (2, 40)), (20, (3, 40)),
        (70, (3, 220)), (120, (3, 400)), (500, (3, 400)),
    ]:  # fmt: skip
        sampler.step = step
        assert sampler.bounds() == bounds
        digits = set()
        for _ in range(40):
            ids, weights = sampler(rng)
            digits.add(int(weights.sum()))  # One weight per answer digit.
            assert len(ids) <= task.overhead() + bounds[1]
        seen[step] = digits
    assert seen[0] == {1} and seen[10] == {1, 2} and seen[500] == {1, 2, 3}
    # Without a key curriculum the filler curriculum starts at once.
    sampler = passkey.CurriculumSampler(task, 400, 100, align=1)
    sampler.step = 50
    assert sampler.bounds() == (3, 220)


def test_adaptive_curriculum_moves_on_when_a_stage_is_learned(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=2)
    sampler = passkey.CurriculumSampler(
        task, 200, curriculum_steps=0, align=1, first_longest=40,
        advance_at=0.9, window=5,
    )  # fmt: skip
    assert sampler.stages == [(1, 40), (2, 40), (2, 80), (2, 160), (2, 200)]
    guard = RollbackOnCollapse("sparse_categorical_accuracy", verbose=0)
    guard.on_train_begin()
    guard._best = 0.9
    step = sampler.callback(guard=guard)
    step.on_epoch_begin(0)
    accuracies = [0.5] * 5 + [0.95] * 5 + [0.8] * 10 + [0.92] * 5
    stages = []
    for batch, _ in enumerate(accuracies):
        step.on_train_batch_begin(batch)
        logs = {
            "sparse_categorical_accuracy": np.mean(accuracies[: batch + 1]),
            "sample_weight_total": 10.0 * (batch + 1),
        }
        step.on_train_batch_end(batch, logs)
        stages.append(sampler.bounds())
    # A window of 5 steps at 0.95 moves it on; one at 0.92 again.
    assert sampler.history == [(0, 1, 40), (10, 2, 40), (25, 2, 80)]
    # A new stage resets the collapse guard: its drop is not a collapse.
    assert guard._best is None
    assert stages[9] == (2, 40) and stages[-1] == (2, 80)
    rng = np.random.default_rng(0)

    def draw(count=400):
        digits, fillers = [], []
        for _ in range(count):
            ids, weights = sampler(rng)
            digits.append(int(weights.sum()))  # One weight per answer digit.
            fillers.append(len(ids) - sampler.tasks[digits[-1]].overhead())
        return np.array(digits), np.array(fillers)

    # Keys have all their digits once the filler grows; half of the
    # episodes have fillers in the stage's new range (40-80), the others
    # log-uniform up to 80 (which puts 16% above 40).
    digits, fillers = draw()
    assert set(digits) == {2}
    assert fillers.max() <= 80 and fillers.min() >= 0
    assert 0.48 < np.mean(fillers >= 40) < 0.68
    # In a key stage half of the keys have the stage's digits, the others
    # 1 to that many: 75% have 2 digits.
    sampler.stage = 1
    digits, fillers = draw()
    assert set(digits) == {1, 2} and 0.68 < np.mean(digits == 2) < 0.82
    assert fillers.max() <= 40


def test_a_run_stalled_in_the_first_stage_starts_over_once(tokenizer):
    task = passkey.PassKeyTask(tokenizer, key_digits=2)
    sampler = passkey.CurriculumSampler(
        task, 200, curriculum_steps=0, align=1, advance_at=0.9, window=5
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.layers[0].enable_lora(2)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    step = sampler.callback(restart_after=10, seed=1)
    step.set_model(model)
    step.on_train_begin()
    a_before = np.array(model.layers[0].lora_kernel_a)
    # Some training happened.
    for variable in model.trainable_variables + model.optimizer.variables:
        if variable is not model.optimizer.iterations:
            variable.assign(np.full(variable.shape, 0.3, variable.dtype))
    model.optimizer.iterations.assign(10)
    step.on_epoch_begin(0)
    for batch in range(20):
        step.on_train_batch_begin(batch)
        step.on_train_batch_end(
            batch,
            {
                "sparse_categorical_accuracy": np.float32(0.5),
                "sample_weight_total": 10.0 * (batch + 1),
            },
        )
    assert sampler.restarts == [(10, pytest.approx(0.5))]
    assert sampler.stage == 0
    layer = model.layers[0]
    # B back to zeros (the model is the converted one again), A drawn anew.
    np.testing.assert_array_equal(np.array(layer.lora_kernel_b), 0.0)
    a_after = np.array(layer.lora_kernel_a)
    assert not np.allclose(a_after, a_before) and not np.allclose(a_after, 0.3)
    optimizer = model.optimizer
    for slot in optimizer.variables:
        name = slot.path.split("/")[-1]
        if name.endswith(("momentum", "velocity")):
            np.testing.assert_array_equal(np.array(slot), 0.0)
    # The learning rate and the step count stay.
    assert float(np.array(optimizer.learning_rate)) == pytest.approx(0.3)
    assert int(np.array(optimizer.iterations)) == 10


def test_reduced_pipeline_writes_table_json_and_plot(tmp_path, capsys):
    """Base preset (built, then reused from its cache), FAM from the
    preset with LoRA (only adapters and summary embeddings train), fit on
    streams, evaluation through FAMStreamer; the JSON layout."""
    out = tmp_path / "results"
    base = str(tmp_path / "base")
    flags = TINY + [
        "--base-preset", base,
        "--fam-steps", "3",
        "--bswa-steps", "2",
        "--bswa-memory-segments", "1",
        "--eval-lengths", "0", "40", "200",
        "--bswa-max-length", "40",
        "--eval-samples", "4",
        "--long-eval-samples", "2",
        "--long-eval-from", "200",
        "--eval-batch-size", "2",
        "--blocks-per-step", "4",
        "--calibrate-thresholds", "0.45", "0.55",
        "--calibration-lengths", "0", "40",
        "--calibration-samples", "2",
        "--output-dir", str(out),
    ]  # fmt: skip
    results = passkey.main(flags)
    printed = capsys.readouterr().out
    assert "Pass-key exact match by filler length" in printed
    assert os.path.exists(os.path.join(base, "config.json"))
    with open(out / "passkey.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    config = saved["config"]
    assert config["key_digits"] == 5 and config["train_length"] == 64
    assert config["base_preset"] == base and config["lora_rank"] == 2
    assert 0.0 <= saved["base"]["accuracy_in_context"] <= 1.0
    assert saved["base"]["samples"] == 500
    assert set(saved["models"]) == {"FAM", "BSWA M1"}
    fam, bswa = saved["models"]["FAM"], saved["models"]["BSWA M1"]
    assert fam["samples"] == {"0": 4, "40": 4, "200": 2}
    assert set(bswa["accuracy"]) == {"0", "40"}
    assert bswa["receptive_field"] == 2 * 2 * 16
    assert fam["receptive_field"] is None
    # Trained with a jittered gate threshold, read at the one chosen on
    # validation sequences.
    assert config["fam_write_threshold_jitter"] == 0.1
    calibration = fam["threshold_calibration"]
    assert set(calibration["scores"]) == {"0.45", "0.55"}
    assert calibration["lengths"] == [0, 40] and calibration["samples"] == 2
    best = max(calibration["scores"].values())
    assert fam["fam_write_threshold"] in (0.45, 0.55)
    assert calibration["scores"][str(fam["fam_write_threshold"])] == best
    assert bswa["threshold_calibration"] is None
    # The longest filler the curriculum reached (plotted): a stage's bound.
    stages = {bound for _, _, bound in fam["curriculum"]}
    assert saved["longest_trained_filler"] == max(stages)
    assert fam["rollbacks"] == [] and fam["curriculum"][0] == [0, 1, 40]
    assert fam["restarts"] == []
    for entry in saved["models"].values():
        for n, accuracy in entry["accuracy"].items():
            count = entry["samples"][n]
            assert accuracy * count == pytest.approx(round(accuracy * count))
        # Only LoRA factors and the summary embeddings are trained.
        kinds = set(entry["trainable_weights"]["by_kind"])
        assert kinds <= {
            "lora_kernel_a",
            "lora_kernel_b",
            "fam_summary_embedding",
        }, kinds
    assert fam["trainable_weights"]["by_kind"]["fam_summary_embedding"] == (
        2 * 16
    )
    # FAM normalisation keeps the carried FAM at unit RMS.
    assert all(abs(r - 1.0) < 1e-3 for r in fam["fam_rms"].values())
    png = (out / "passkey.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # A second run reuses the cached base preset.
    report = passkey.build_base_preset(passkey.parse_args(flags))
    assert "reusing" in capsys.readouterr().out
    assert report["accuracy"] == saved["base"]["accuracy_in_context"]
