"""End-to-end checks of examples/passkey_retrieval.py (a reduced run)."""

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

TINY = [
    "--num-layers", "1",
    "--hidden-dim", "16",
    "--num-heads", "2",
    "--block-size", "8",
    "--fam-length", "2",
    "--train-length", "80",
    "--batch-size", "4",
    "--epochs", "1",
    "--longest-filler", "100",
]  # fmt: skip


def _words(tokens):
    return [passkey.VOCABULARY[t] for t in tokens]


def test_sequence_format():
    task = passkey.PassKeyTask(key_digits=3)
    rng = np.random.default_rng(0)
    tokens, keys, start = task.batch(rng, 2, filler_length=11)
    assert tokens.shape == (2, task.overhead() + 11)
    words = _words(tokens[0])
    key = "".join(str(d) for d in keys[0])
    text = " ".join(words)
    assert f"The pass key is {' '.join(key)} . Remember it ." in text
    assert text.endswith(
        f"What is the pass key ? The pass key is {' '.join(key)}"
    )
    # The filler sits between "is the pass key ." and the question.
    q = len(passkey.QUESTION)
    after = "is the pass key .".split()
    assert words[start - q - 11 - 5 : start - q - 11] == after
    assert words[start - q - 11 : start - q] == (
        "The grass is green . The sky is blue . The".split()
    )
    assert list(tokens[0, start:]) == list(task.digit_ids[keys[0]])


def test_training_batches_continue_each_row_and_weight_the_answers():
    task = passkey.PassKeyTask(key_digits=2)
    rng = np.random.default_rng(0)
    batches = list(
        passkey.training_batches(
            task, rng, 3, 64, 300, 6, reset_probability=0.3
        )
    )
    assert len(batches) == 6
    np.testing.assert_array_equal(batches[0][0]["reset"], [1, 1, 1])
    resets = 0
    for (inputs, y, w), (following, _, _) in zip(
        batches[:-1], batches[1:], strict=True
    ):
        x = inputs["tokens"]
        assert x.shape == y.shape == w.shape == (3, 64)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        # Weighted targets are exactly the digits of the answers.
        assert np.all(np.isin(y[w > 0], task.digit_ids))
        for row in range(3):
            if following["reset"][row]:
                resets += 1
            else:  # The next segment continues this row's stream.
                assert following["tokens"][row, 0] == y[row, -1]
    assert 0 < resets < 15
    total = sum(b[2].sum() for b in batches)
    assert total > 0 and total % 2 == 0


def test_filler_lengths_are_log_uniform():
    rng = np.random.default_rng(0)
    lengths = np.array(
        [passkey.sample_filler_length(rng, 1023) for _ in range(4000)]
    )
    assert lengths.min() >= 0 and lengths.max() <= 1023
    # Log-uniform over [1, 1024]: half the mass below sqrt(1024) = 32.
    assert 0.45 < np.mean(lengths < 31) < 0.55


def test_streamed_logits_equal_the_full_forward_pass():
    args = passkey.parse_args(TINY)
    task = passkey.PassKeyTask(1)
    model = passkey.build_model(task, 2, 1, args)
    rng = np.random.default_rng(1)
    tokens, _, _ = task.batch(rng, 2, filler_length=40)
    tokens = tokens[:, :64]
    full = np.asarray(model.predict_on_batch({"tokens": tokens}))
    states = passkey.initial_states(model, 2)
    pieces = []
    for begin, end in [(0, 16), (16, 48), (48, 64)]:
        logits, states = passkey.stream_chunk(
            model, tokens[:, begin:end], states
        )
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=1e-4
    )
    assert int(states[0]["position_offset"]) == 64


def test_state_passing_carries_each_rows_final_fam():
    args = passkey.parse_args(TINY)
    task = passkey.PassKeyTask(1)
    model = passkey.build_model(task, 2, 0, args)
    rng = np.random.default_rng(2)
    tokens, _, _ = task.batch(rng, 4, filler_length=30)
    tokens = tokens[:, :64]
    fresh = model({"tokens": tokens}, training=False)
    reset = np.ones(4, "float32")
    first = model({"tokens": tokens, "reset": reset}, training=True)
    # Rows that reset start from the initial FAM: same as inference.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(first),
        keras.ops.convert_to_numpy(fresh),
        atol=1e-5,
    )
    _, final = model.blocks[0](
        model.embedding(tokens), return_fam=True, training=False
    )
    carried = keras.ops.convert_to_numpy(model.carried_fam[0])
    np.testing.assert_allclose(
        carried, keras.ops.convert_to_numpy(final), atol=1e-5
    )
    keep = np.array([1, 0, 1, 0], "float32")
    second = keras.ops.convert_to_numpy(
        model({"tokens": tokens, "reset": keep}, training=True)
    )
    fresh = keras.ops.convert_to_numpy(fresh)
    np.testing.assert_allclose(second[keep == 1], fresh[keep == 1], atol=1e-5)
    # Continued rows start from the carried FAM: different outputs.
    assert np.abs(second[keep == 0] - fresh[keep == 0]).max() > 1e-3


def test_chunk_lengths_cover_and_align():
    lengths = passkey._chunk_lengths(8 * 13, 8, 32)
    assert sum(lengths) == 104 and all(n % 8 == 0 for n in lengths)
    assert lengths == [32, 32, 32, 8]
    assert passkey._chunk_lengths(8 * 7, 8, 32) == [32, 8, 8, 8]


def test_reduced_run_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "results"
    results = passkey.main(
        TINY
        + [
            "--fam-steps", "3",
            "--bswa-steps", "2",
            "--bswa-memory-segments", "0",
            "--eval-lengths", "0", "40", "200",
            "--bswa-max-length", "40",
            "--eval-samples", "3",
            "--long-eval-samples", "2",
            "--long-eval-from", "200",
            "--eval-batch-size", "2",
            "--chunk-size", "32",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "Pass-key accuracy by filler length" in printed
    with open(out / "passkey.json") as f:
        saved = json.load(f)
    assert set(saved["models"]) == {"FAM", "BSWA M0"}
    assert set(saved["models"]["FAM"]["accuracy"]) == {"0", "40", "200"}
    assert set(saved["models"]["BSWA M0"]["accuracy"]) == {"0", "40"}
    assert saved["models"]["BSWA M0"]["receptive_field"] == 1 * 1 * 8
    fam = saved["models"]["FAM"]
    assert fam["eval_samples"] == {"0": 3, "40": 3, "200": 2}
    assert set(fam["eval_seconds_by_length"]) == {"0", "40", "200"}
    for entry in saved["models"].values():
        for n, accuracy in entry["accuracy"].items():
            # n samples: accuracy is a multiple of 1/n.
            samples = entry["eval_samples"][n]
            assert accuracy * samples == pytest.approx(
                round(accuracy * samples)
            )
    # FAM normalisation (on by default) keeps the carried FAM at unit RMS.
    assert all(abs(r - 1.0) < 1e-3 for r in fam["fam_rms"].values())
    assert set(saved["models"]["BSWA M0"]["fam_rms"].values()) == {None}
    assert saved == json.loads(json.dumps(results))
    png = (out / "passkey.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
