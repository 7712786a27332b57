"""FAMCausalLM.score: KerasHub's contract, computed chunk by chunk through
the streaming state, equal to the full forward pass."""

import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

VOCAB = 23
BLOCK = 4


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def inputs(length=21, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, VOCAB, (2, length)).astype("int32")
    padding_mask = np.ones((2, length), bool)
    padding_mask[1, length - 7 :] = False  # right padding
    return token_ids, padding_mask


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_word_embeddings=False, final_logit_soft_cap=2.0),
        dict(
            position_embedding="learned",
            max_sequence_length=64,
            normalization="layer_norm",
            feedforward="mlp",
            use_bias=True,
            embedding_scale=4.0,
        ),
        dict(fam_length=0),
    ],
    ids=["rope", "untied_soft_cap", "learned_positions", "bswa"],
)
def test_logits_and_loss_equal_the_forward_pass(overrides):
    lm = tiny_models.tiny_lm(VOCAB, block_size=BLOCK, **overrides)
    token_ids, padding_mask = inputs()
    real = padding_mask
    full = numpy(lm({"token_ids": token_ids, "padding_mask": padding_mask}))
    targets = np.roll(token_ids, -1, axis=1)
    expected_loss = numpy(
        keras.losses.sparse_categorical_crossentropy(
            targets, full, from_logits=True
        )
    )
    # Default (one chunk here), whole blocks, a chunk that is not a
    # multiple of the block size (token-by-token streaming equals the
    # forward pass too: tests/models/test_fam_backbone.py).
    for chunk_size in (None, 2 * BLOCK, 5):
        logits = numpy(lm.score(token_ids, padding_mask, chunk_size=chunk_size))
        assert logits.shape == full.shape
        np.testing.assert_allclose(logits[real], full[real], atol=1e-4)
        if chunk_size not in (None, 5):
            continue
        loss = numpy(
            lm.score(
                token_ids,
                padding_mask,
                scoring_mode="loss",
                target_ids=targets,
                chunk_size=chunk_size,
            )
        )
        assert loss.shape == token_ids.shape
        np.testing.assert_allclose(loss[real], expected_loss[real], atol=1e-4)


def test_default_chunks_cover_long_inputs_and_padding_mask_defaults():
    lm = tiny_models.tiny_lm(VOCAB, block_size=32)
    token_ids = np.random.default_rng(1).integers(0, VOCAB, (1, 1100))
    token_ids = token_ids.astype("int32")
    full = numpy(
        lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    # 1100 tokens: two chunks of the default 1024.
    np.testing.assert_allclose(numpy(lm.score(token_ids)), full, atol=1e-4)


def test_layer_intercept_fn_sees_every_layer_and_is_used():
    lm = tiny_models.tiny_lm(VOCAB, block_size=BLOCK, embedding_scale=3.0)
    token_ids, padding_mask = inputs(length=12)
    seen = []

    def record(x, index):
        seen.append((index, tuple(x.shape), numpy(x)))
        return x

    lm.score(token_ids, padding_mask, layer_intercept_fn=record, chunk_size=8)
    # Two chunks (8 and 4 tokens), each: embeddings then the two layers.
    assert [(i, s) for i, s, _ in seen] == [
        (-1, (2, 8, 16)),
        (0, (2, 8, 16)),
        (1, (2, 8, 16)),
        (-1, (2, 4, 16)),
        (0, (2, 4, 16)),
        (1, (2, 4, 16)),
    ]
    # Index -1 is the input of the first layer (scaled embeddings).
    embedded = numpy(lm.backbone.embed(token_ids))
    np.testing.assert_allclose(seen[0][2], embedded[:, :8], atol=1e-6)
    np.testing.assert_allclose(seen[3][2], embedded[:, 8:], atol=1e-6)

    # What it returns is what goes on: zeroing the last layer's output
    # leaves the final norm of zeros, i.e. its bias-free output 0.
    def zero_last(x, index):
        return ops.zeros_like(x) if index == 1 else x

    logits = numpy(
        lm.score(token_ids, padding_mask, layer_intercept_fn=zero_last)
    )
    np.testing.assert_allclose(logits, 0.0, atol=1e-6)


def test_bad_arguments_are_clear_errors():
    lm = tiny_models.tiny_lm(VOCAB, block_size=BLOCK)
    token_ids, _ = inputs(length=8)
    with pytest.raises(ValueError, match="scoring_mode"):
        lm.score(token_ids, scoring_mode="perplexity")
    with pytest.raises(ValueError, match="target_ids"):
        lm.score(token_ids, scoring_mode="loss")
    with pytest.raises(ValueError, match="target_ids"):
        lm.score(token_ids, scoring_mode="loss", target_ids=token_ids[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        lm.score(token_ids, chunk_size=0)
    with pytest.raises(TypeError, match="layer_intercept_fn"):
        lm.score(token_ids, layer_intercept_fn="print")
    with pytest.raises(ValueError, match="padding_mask"):
        lm.score(token_ids, padding_mask=np.ones((2, 3)))


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="PyTorch autograd only"
)
def test_torch_records_no_graph_unless_intercepting():
    lm = tiny_models.tiny_lm(VOCAB, block_size=BLOCK)
    token_ids, _ = inputs(length=8)
    assert not lm.score(token_ids).requires_grad
    kept = []

    def keep(x, index):
        if index == -1:
            x.retain_grad()
            kept.append(x)
        return x

    loss = lm.score(
        token_ids,
        scoring_mode="loss",
        target_ids=token_ids,
        layer_intercept_fn=keep,
    )
    loss.sum().backward()
    assert kept[0].grad is not None and float(kept[0].grad.abs().sum()) > 0
