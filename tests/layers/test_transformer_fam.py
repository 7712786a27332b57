"""TransformerFAM: equivalences, a NumPy reference, streaming, gradients.

The NumPy reference below is written from /work/shared/fam-spec.md (paper
Algorithm 2), block by block and row by row, with none of the layer's
helpers: pre-norm attention and feedforward for block tokens and FAM, block
tokens see the last M blocks, the previous FAM and their block causally, FAM
sees itself and the whole block, the FFN runs on FAM rows, an updated FAM
takes the positions of the last F tokens of the block it compressed, the
initial FAM the F positions before token 0, and a last partial block does
not update the FAM. Choices the paper leaves open follow the layer's
docstring: the first FAM update keeps its residual; padded tokens are never
attended to by other rows (a padded token still sees itself).

Shape letters: B batch, T tokens, D width, S block size, M memory segments,
F FAM length, N heads, G key/value heads, H head dim.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from layer_testing import (
    run_layer_test,
    set_weights_by_path,
    to_numpy,
    weights_by_path,
)

from keras_fam.layers import TransformerFAM
from keras_fam.ops import dispatch

BACKEND = keras.backend.backend()


def _layer(seed=0, **kwargs):
    """A built TransformerFAM with seeded random weights (biases, norm
    offsets and the initial FAM included)."""
    config = dict(
        num_heads=4,
        num_key_value_heads=2,
        block_size=4,
        memory_segments=1,
        fam_length=2,
        intermediate_dim=24,
    )
    config.update(kwargs)
    width = config.pop("width", 16)
    layer = TransformerFAM(**config)
    layer.build((None, None, width))
    set_weights_by_path(layer, seed=seed)
    return layer


def _inputs(batch, length, width=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, width)).astype("float32")


# === A NumPy TransformerFAM, written from the spec ===


def _erf(x):
    return np.vectorize(math.erf)(x)


class NumpyTransformerFAM:
    """One TransformerFAM layer in float64 NumPy, one batch row at a time.

    Supports the configuration the reference test uses: layer norm, the
    GELU MLP feedforward, biases, RoPE (or none), grouped-query attention.
    """

    def __init__(
        self,
        weights,
        num_heads,
        num_key_value_heads,
        block_size,
        memory_segments,
        fam_length,
        use_rope=True,
        rope_max_wavelength=10000.0,
        epsilon=1e-5,
        fam_normalization=False,
        fam_write_gate=None,
    ):
        self.fam_normalization = fam_normalization
        self.fam_write_gate = fam_write_gate
        self.w = {k: v.astype("float64") for k, v in weights.items()}
        self.heads, self.groups = num_heads, num_key_value_heads
        self.size, self.memory, self.fam = (
            block_size,
            memory_segments,
            fam_length,
        )
        self.use_rope, self.base, self.epsilon = (
            use_rope,
            rope_max_wavelength,
            epsilon,
        )

    def norm(self, x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + self.epsilon)
        return normed * self.w[f"{name}/gamma"] + self.w[f"{name}/beta"]

    def rope(self, x, positions):
        """x (T, N, H): rotate the two halves of each head."""
        if not self.use_rope:
            return x
        head_dim = x.shape[-1]
        inverse = self.base ** -(np.arange(0, head_dim, 2) / head_dim)
        angle = positions[:, None] * inverse[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return np.concatenate(
            [first * cos - second * sin, second * cos + first * sin], -1
        )

    def project(self, name, hidden):
        w = self.w
        out = np.einsum("td,dnh->tnh", hidden, w[f"attention/{name}/kernel"])
        return out + w[f"attention/{name}/bias"]

    def qkv(self, rows, positions):
        hidden = self.norm(rows, "attention_norm")
        query = self.rope(self.project("query", hidden), positions)
        key = self.rope(self.project("key", hidden), positions)
        return query, key, self.project("value", hidden)

    def attend(self, query, key, value, allowed, mass_columns=None):
        """query (Q, N, H), key/value (K, G, H), allowed bool (Q, K).
        With `mass_columns` (K,) also returns the attention mass on those
        columns, averaged over heads (Q,)."""
        head_dim = query.shape[-1]
        per_group = self.heads // self.groups
        out = np.zeros(query.shape)
        mass = np.zeros(len(query))
        for head in range(self.heads):
            group = head // per_group
            logits = query[:, head] @ key[:, group].T / np.sqrt(head_dim)
            logits = np.where(allowed, logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, head] = probs @ value[:, group]
            if mass_columns is not None:
                mass += probs[:, mass_columns].sum(-1) / self.heads
        w = self.w
        out = np.einsum(
            "qnh,nhd->qd", out, w["attention/attention_output/kernel"]
        )
        out = out + w["attention/attention_output/bias"]
        return out if mass_columns is None else (out, mass)

    def feedforward(self, x):
        w = self.w
        hidden = x @ w["feedforward/feedforward_intermediate_dense/kernel"]
        hidden = hidden + w["feedforward/feedforward_intermediate_dense/bias"]
        hidden = 0.5 * hidden * (1.0 + _erf(hidden / np.sqrt(2.0)))
        out = hidden @ w["feedforward/feedforward_output_dense/kernel"]
        return out + w["feedforward/feedforward_output_dense/bias"]

    def residual(self, rows, attended):
        rows = rows + attended
        return rows + self.feedforward(self.norm(rows, "feedforward_norm"))

    def __call__(self, x, padding_mask, fam, position_offset=0):
        """x (T, D), padding_mask (T,), fam (F, D) -> outputs (T, D), FAM
        after the last complete block (F, D)."""
        x = x.astype("float64")
        fam = fam.astype("float64")
        length, size, fam_length = len(x), self.size, self.fam
        outputs = np.zeros_like(x)
        fam_positions = position_offset + np.arange(-fam_length, 0.0)
        memory = []  # (keys, values, valid) of each complete block.
        for start in range(0, length, size):
            block = x[start : start + size]
            valid = padding_mask[start : start + size]
            count = len(block)
            positions = position_offset + start + np.arange(count, dtype=float)
            query, key, value = self.qkv(block, positions)
            fam_query, fam_key, fam_value = self.qkv(fam, fam_positions)
            seen = memory[-self.memory :] if self.memory else []
            # Block tokens: memory blocks, previous FAM, own block causally.
            keys = np.concatenate([m[0] for m in seen] + [fam_key, key])
            values = np.concatenate([m[1] for m in seen] + [fam_value, value])
            allowed = np.zeros((count, len(keys)), dtype=bool)
            memory_valid = np.concatenate(
                [m[2] for m in seen] + [np.zeros(0, bool)]
            )
            first_token_key = len(memory_valid) + fam_length
            for t in range(count):
                allowed[t, : len(memory_valid)] = memory_valid
                allowed[t, len(memory_valid) : first_token_key] = True
                for j in range(t + 1):
                    allowed[t, first_token_key + j] = valid[j] or j == t
            attended = self.attend(query, keys, values, allowed)
            outputs[start : start + count] = self.residual(block, attended)
            if count < size:
                break  # A partial block does not update the FAM.
            if fam_length:
                # FAM: previous FAM and the whole (valid) block, no memory.
                fam_keys = np.concatenate([fam_key, key])
                fam_values = np.concatenate([fam_value, value])
                fam_allowed = np.concatenate([np.ones(fam_length, bool), valid])
                fam_allowed = np.broadcast_to(
                    fam_allowed, (fam_length, len(fam_keys))
                )
                own = np.arange(len(fam_keys)) < fam_length
                attended, on_fam = self.attend(
                    fam_query, fam_keys, fam_values, fam_allowed, own
                )
                updated = self.residual(fam, attended)
                # The write gate: the update scaled by the attention share
                # on the block (all or nothing when "hard": open when the
                # attention per key is higher on the block than on the FAM).
                threshold = valid.sum() / (valid.sum() + fam_length)
                write = {
                    None: np.ones_like(on_fam),
                    "soft": 1.0 - on_fam,
                    "hard": (1.0 - on_fam > threshold).astype(float),
                }[self.fam_write_gate]
                fam = fam + write[:, None] * (updated - fam)
                if self.fam_normalization:  # Unit RMS per FAM vector.
                    rms = np.sqrt(np.mean(fam**2, -1, keepdims=True) + 1e-6)
                    fam = fam / rms
                fam_positions = position_offset + start + size - fam_length
                fam_positions = fam_positions + np.arange(
                    fam_length, dtype=float
                )
            memory.append((key, value, valid))
        return outputs, fam


def _numpy_reference(layer, x, padding_mask, fam=None, position_offset=0):
    config = layer.get_config()
    weights = weights_by_path(layer)
    if fam is None:
        fam = np.broadcast_to(
            weights["initial_fam"], (len(x),) + weights["initial_fam"].shape
        )
    reference = NumpyTransformerFAM(
        weights,
        config["num_heads"],
        config["num_key_value_heads"],
        config["block_size"],
        config["memory_segments"],
        config["fam_length"],
        use_rope=config["use_rope"],
        rope_max_wavelength=config["rope_max_wavelength"],
        epsilon=config["layer_norm_epsilon"],
        fam_normalization=config["fam_normalization"],
        fam_write_gate=config["fam_write_gate"],
    )
    results = [
        reference(x[b], padding_mask[b], fam[b], position_offset)
        for b in range(len(x))
    ]
    return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])


def _padding_mask(batch, length):
    mask = np.ones((batch, length), dtype=bool)
    mask[-1, 5] = False  # Inside a full block.
    mask[-1, 9:11] = False  # Two tokens of the third block.
    mask[-1, -1] = False  # The last (partial) block.
    return mask


@pytest.mark.parametrize(
    "memory_segments, fam_length, length, parallel_blocks, normalized, gate",
    [
        (1, 2, 14, False, False, None),
        (2, 3, 11, True, False, None),
        (0, 1, 9, False, False, None),
        (1, 2, 14, False, True, None),
        (2, 3, 11, True, True, None),
        (1, 3, 14, False, True, "soft"),
        (2, 2, 11, True, False, "soft"),
        (1, 3, 14, False, True, "hard"),
        (1, 3, 14, True, True, "hard"),
    ],
)
def test_matches_numpy_reference(
    memory_segments, fam_length, length, parallel_blocks, normalized, gate
):
    # GQA (4 heads, 2 key/value heads), RoPE, a last partial block, padding;
    # whole blocks through the fused block loop, or `parallel_blocks`; the
    # carried FAM rescaled to unit RMS or not.
    layer = _layer(
        memory_segments=memory_segments,
        fam_length=fam_length,
        parallel_blocks=parallel_blocks,
        fam_normalization=normalized,
        fam_write_gate=gate,
    )
    x = _inputs(2, length)
    padding_mask = _padding_mask(2, length)
    outputs, fam = layer(x, padding_mask=padding_mask, return_fam=True)
    expected, expected_fam = _numpy_reference(layer, x, padding_mask)
    np.testing.assert_allclose(to_numpy(outputs), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(to_numpy(fam), expected_fam, atol=1e-5, rtol=0)
    # The FAM did change (the check is not of an identity).
    initial = weights_by_path(layer)["initial_fam"]
    assert np.abs(expected_fam - initial).max() > 1e-2


def test_matches_numpy_reference_given_fam_and_position_offset():
    layer = _layer(memory_segments=1, fam_length=2)
    x = _inputs(2, 10, seed=1)
    padding_mask = _padding_mask(2, 10)
    fam = _inputs(2, 2, seed=2)
    state = layer.get_initial_state(2, fam=fam, position_offset=7)
    outputs, state = layer(
        x, padding_mask=padding_mask, state=state, return_state=True
    )
    expected, expected_fam = _numpy_reference(
        layer, x, padding_mask, fam=fam, position_offset=7
    )
    np.testing.assert_allclose(to_numpy(outputs), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        to_numpy(state["fam"]), expected_fam, atol=1e-5, rtol=0
    )
    # `fam=` starts a sequence from the given FAM at offset 0.
    outputs = layer(x, padding_mask=padding_mask, fam=fam)
    expected, _ = _numpy_reference(layer, x, padding_mask, fam=fam)
    np.testing.assert_allclose(to_numpy(outputs), expected, atol=1e-5, rtol=0)


# === BSWA (fam_length=0) ===


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_bswa_with_window_covering_sequence_equals_causal_attention(
    num_key_value_heads,
):
    # (memory_segments + 1) * block_size = 12 >= T = 11: every token sees
    # all earlier tokens, so the layer is a plain pre-norm causal Transformer
    # layer. The reference is Keras' own attention layer with the weights
    # copied in, plus the layer's norms and feedforward.
    layer = _layer(
        fam_length=0,
        memory_segments=2,
        num_key_value_heads=num_key_value_heads,
        use_rope=False,
    )
    x = ops.convert_to_tensor(_inputs(2, 11))
    w = weights_by_path(layer)
    if num_key_value_heads == 4:
        attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4)
        attention.build((2, 11, 16), (2, 11, 16))
    else:
        attention = keras.layers.GroupQueryAttention(
            head_dim=4, num_query_heads=4, num_key_value_heads=2
        )
        attention.build((2, 11, 16), (2, 11, 16))
    for name, dense in [
        ("query", attention._query_dense),
        ("key", attention._key_dense),
        ("value", attention._value_dense),
        ("attention_output", attention._output_dense),
    ]:
        dense.kernel.assign(w[f"attention/{name}/kernel"])
        dense.bias.assign(w[f"attention/{name}/bias"])
    hidden = layer.attention_norm(x)
    attended = x + attention(hidden, hidden, use_causal_mask=True)
    expected = attended + layer.feedforward(layer.feedforward_norm(attended))
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(expected), atol=1e-5, rtol=0
    )


def _bswa_window(t, block_size, memory_segments):
    """Tokens that token t may see in one BSWA layer: blocks b-M..b-1 and
    its own block up to t."""
    block = t // block_size
    first = max(0, (block - memory_segments) * block_size)
    return set(range(first, t + 1))


def test_bswa_each_token_sees_exactly_its_window():
    # One layer, S=3, M=1: perturb each token in turn (batch row p has token
    # p perturbed) and check which outputs move. Each row is compared with
    # the same row of an unperturbed batch of the same shape, so both go
    # through identical arithmetic (kernels may round differently at
    # different batch rows).
    size, memory, length = 3, 1, 12
    layer = _layer(
        fam_length=0, block_size=size, memory_segments=memory, width=16
    )
    base = np.repeat(_inputs(1, length), length, axis=0)
    x = base.copy()
    # Neither a constant shift nor a rescaling: the layer norm removes both.
    for p in range(length):
        x[p, p] += _inputs(1, 1, seed=100 + p)[0, 0]
    y, y_base = to_numpy(layer(x)), to_numpy(layer(base))
    for p in range(length):
        for t in range(length):
            delta = np.abs(y[p, t] - y_base[p, t]).max()
            if p in _bswa_window(t, size, memory):
                assert delta > 1e-4, (p, t)
            else:
                assert delta == 0.0, (p, t, delta)  # Exactly unchanged.


# === Streaming ===


def _state_signature(state):
    return {
        name: (tuple(v.shape), keras.backend.standardize_dtype(v.dtype))
        for name, v in state.items()
    }


@pytest.mark.parametrize(
    "fam_normalization, gate", [(False, None), (True, None), (True, "hard")]
)
def test_streaming_in_chunks_equals_full_call(fam_normalization, gate):
    # Chunks of 1, 3, block_size and 2.5 * block_size tokens, from a fresh
    # state each time; one full call is the reference for all of them.
    layer = _layer(fam_normalization=fam_normalization, fam_write_gate=gate)
    length = 18
    x = _inputs(2, length, seed=4)
    padding_mask = _padding_mask(2, length)
    full, full_fam = layer(x, padding_mask=padding_mask, return_fam=True)
    full, full_fam = to_numpy(full), to_numpy(full_fam)
    signature = _state_signature(layer.get_initial_state(2))
    for chunk in (1, 3, 4, 10):
        state = layer.get_initial_state(2)
        outputs = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            y, state = layer(
                x[:, start:end],
                padding_mask=padding_mask[:, start:end],
                state=state,
                return_state=True,
            )
            assert _state_signature(state) == signature, (chunk, start)
            assert int(to_numpy(state["index"])) == end
            outputs.append(to_numpy(y))
        np.testing.assert_allclose(
            np.concatenate(outputs, axis=1),
            full,
            atol=1e-5,
            rtol=0,
            err_msg=f"chunk={chunk}",
        )
        np.testing.assert_allclose(
            to_numpy(state["fam"]),
            full_fam,
            atol=1e-5,
            rtol=0,
            err_msg=f"chunk={chunk}",
        )


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("margin", [None, 0.01])
@pytest.mark.parametrize("parallel_blocks", [False, True])
def test_hard_write_gate_keeps_or_replaces_the_fam(
    parallel_blocks, margin, threshold, training, monkeypatch
):
    # All attention on the FAM's own keys: the gate stays closed and the
    # FAM leaves every block exactly as it came in (any number of blocks).
    # None on them: the gate is open and the layer is the ungated one.
    # With a margin: the threshold sits where attention per key is the
    # same on the block and on the FAM (with S block tokens and F FAM
    # vectors, a share of F / (F + S) on the FAM), or at a write share of
    # `fam_write_threshold` (on the FAM: 1 - threshold) when it is set, in
    # training and at inference alike; just above it the gate stays
    # closed, just below it the FAM is written. (Here F / (F + S) = 1 / 3,
    # so 0.5 +- 0.01 on the FAM also tells the two thresholds apart.)
    x = _inputs(2, 16, seed=5)
    gated = _layer(
        fam_write_gate="hard",
        fam_write_threshold=threshold,
        parallel_blocks=parallel_blocks,
    )
    plain = _layer(parallel_blocks=parallel_blocks)
    plain.set_weights(gated.get_weights())
    initial = weights_by_path(gated)["initial_fam"]
    closed, opened = 1.0, 0.0
    if margin is not None:
        on_fam = gated.fam_length / (gated.fam_length + gated.block_size)
        if threshold is not None:
            on_fam = 1.0 - threshold
        closed, opened = on_fam + margin, on_fam - margin
    for share, expected in ((closed, None), (opened, plain)):
        monkeypatch.setattr(
            dispatch,
            "attention_mass",
            lambda query, *args, share=share: ops.full(
                ops.shape(query)[:2], share
            ),
        )
        outputs, fam = gated(x, return_fam=True, training=training)
        if expected is None:
            np.testing.assert_array_equal(
                to_numpy(fam), np.broadcast_to(initial, fam.shape)
            )
        else:
            want, want_fam = expected(x, return_fam=True, training=training)
            # before + 1 * (after - before): equal up to rounding.
            np.testing.assert_allclose(
                to_numpy(fam), to_numpy(want_fam), atol=1e-5
            )
            np.testing.assert_allclose(
                to_numpy(outputs), to_numpy(want), atol=1e-5
            )


@pytest.mark.parametrize("parallel_blocks", [False, True])
def test_write_threshold_jitter_moves_the_gate_in_training_only(
    parallel_blocks, monkeypatch
):
    # `fam_write_threshold_jitter`: in training every gate's threshold is
    # drawn from 0.5 +- 0.2 at every block. A write share of 0.6 then
    # writes some blocks and not others (fresh draws each call), while a
    # share beyond the jitter's reach (0.75, 0.25) acts as without it; at
    # inference the threshold is 0.5 itself.
    x = _inputs(2, 16, seed=5)
    options = dict(
        fam_write_gate="hard",
        fam_write_threshold=0.5,
        parallel_blocks=parallel_blocks,
    )

    def layers(share):
        # New layers for every share: TensorFlow keeps traced steps, with
        # the patched share in them.
        monkeypatch.setattr(
            dispatch,
            "attention_mass",
            lambda query, *args: ops.full(ops.shape(query)[:2], 1.0 - share),
        )
        jittered = _layer(fam_write_threshold_jitter=0.2, **options)
        plain = _layer(**options)
        plain.set_weights(jittered.get_weights())
        return jittered, plain

    def fam(layer, training):
        return to_numpy(layer(x, return_fam=True, training=training)[1])

    for share in (0.75, 0.6, 0.25):
        jittered, plain = layers(share)
        np.testing.assert_allclose(
            fam(jittered, False), fam(plain, False), atol=1e-6
        )
        if share != 0.6:
            np.testing.assert_allclose(
                fam(jittered, True), fam(plain, True), atol=1e-6
            )
    jittered, plain = layers(0.6)
    first, second = fam(jittered, True), fam(jittered, True)
    assert np.abs(first - fam(plain, True)).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3


def test_write_threshold_jitter_is_the_same_on_both_block_paths():
    # The fused and the parallel block paths draw the same thresholds from
    # the same seed state, so they agree in training too.
    x = _inputs(2, 16, seed=6)
    options = dict(
        fam_write_gate="hard",
        fam_write_threshold=0.5,
        fam_write_threshold_jitter=0.3,
    )
    fused = _layer(parallel_blocks=False, **options)
    parallel = _layer(parallel_blocks=True, **options)
    parallel.set_weights(fused.get_weights())
    parallel.seed_generator.state.assign(fused.seed_generator.state.value)
    want, want_fam = fused(x, return_fam=True, training=True)
    got, got_fam = parallel(x, return_fam=True, training=True)
    np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-5)
    np.testing.assert_allclose(to_numpy(got_fam), to_numpy(want_fam), atol=1e-5)
    config = fused.get_config()
    assert config["fam_write_threshold_jitter"] == 0.3
    assert TransformerFAM.from_config(config).fam_write_threshold_jitter == 0.3


def _compiled_step(layer):
    """`(state, tokens, mask) -> (outputs, state)` compiled so that the
    state's position is a run-time value."""

    def step(state, tokens, token_mask):
        return layer(
            tokens, padding_mask=token_mask, state=state, return_state=True
        )

    if BACKEND == "jax":
        import jax

        return jax.jit(step)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(step)
    pytest.skip(
        "PyTorch runs eagerly: the position is always known when the layer "
        "runs, so there is no run-time-position path to compile."
    )


@pytest.mark.parametrize("chunk", [1, 3])
def test_compiled_streaming_with_run_time_position(chunk):
    layer = _layer()
    length = 12
    x = _inputs(1, length, seed=5)
    padding_mask = _padding_mask(1, length)
    full, full_fam = layer(x, padding_mask=padding_mask, return_fam=True)
    step = _compiled_step(layer)
    state = layer.get_initial_state(1)
    signature = _state_signature(state)
    outputs = []
    for start in range(0, length, chunk):
        y, state = step(
            state,
            ops.convert_to_tensor(x[:, start : start + chunk]),
            ops.convert_to_tensor(padding_mask[:, start : start + chunk]),
        )
        assert _state_signature(state) == signature
        outputs.append(to_numpy(y))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), to_numpy(full), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        to_numpy(state["fam"]), to_numpy(full_fam), atol=1e-5, rtol=0
    )
    assert int(to_numpy(state["index"])) == length


@pytest.mark.parametrize("chunk", [1, 3])
def test_run_time_position_write_path_on_every_backend(chunk):
    # The write path of a run-time position (`ops.slice_update` at a tensor
    # offset, the static mask's rows taken at run time, the FAM update under
    # `ops.cond`) driven with tensor offsets, so that PyTorch, which runs
    # eagerly and always knows the position inside `call`, runs it too.
    layer = _layer()
    size, length = 4, 12
    x = _inputs(2, length, seed=5)
    padding_mask = _padding_mask(2, length)
    full, full_fam = layer(x, padding_mask=padding_mask, return_fam=True)
    state = layer.get_initial_state(2)
    outputs, start = [], 0
    while start < length:
        # Chunks end at block boundaries: the step's contract.
        end = min(start + chunk, (start // size + 1) * size)
        offset = ops.convert_to_tensor(start % size, "int32")
        y, state = layer._chunk_step(
            ops.convert_to_tensor(x[:, start:end]),
            ops.convert_to_tensor(padding_mask[:, start:end]),
            state,
            offset,
            False,
        )
        assert int(to_numpy(state["index"])) == end
        outputs.append(to_numpy(y))
        start = end
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), to_numpy(full), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        to_numpy(state["fam"]), to_numpy(full_fam), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("length", [0, 1, 3])
def test_run_partial_block_equals_streaming(length):
    # A block's first `length` tokens in one call (a run-time length), then
    # the rest streamed: the same numbers as the full call.
    layer = _layer()
    x = _inputs(2, 12, seed=7)
    full = to_numpy(layer(x))
    state = layer.get_initial_state(2)
    first, state = layer.run_blocks(ops.convert_to_tensor(x[:, :4]), state)
    head, state = layer.run_partial_block(
        ops.convert_to_tensor(x[:, 4:8]),
        state,
        ops.convert_to_tensor(length, "int32"),
    )
    assert int(to_numpy(state["index"])) == 4 + length
    rest = layer(x[:, 4 + length :], state=state)
    outputs = np.concatenate(
        [to_numpy(first), to_numpy(head)[:, :length], to_numpy(rest)], axis=1
    )
    np.testing.assert_allclose(outputs, full, atol=1e-5, rtol=0)


def test_state_index_keeps_the_fused_block_path_when_traced():
    # `state_index` (a Python int) stays known while the layer is traced, so
    # a block-aligned chunk runs through the fused block step (not token by
    # token), with the same numbers as an eager call.
    if BACKEND == "torch":
        pytest.skip("PyTorch runs eagerly: every position is known.")
    layer = _layer()
    x = _inputs(2, 12, seed=5)
    fam = _inputs(2, 2, seed=6)
    expected = layer(
        x, state=layer.get_initial_state(2, fam=fam, position_offset=3)
    )
    paths = []
    run_blocks, chunk_step = layer._run_blocks, layer._chunk_step
    layer._run_blocks = lambda *a: paths.append("blocks") or run_blocks(*a)
    layer._chunk_step = lambda *a: paths.append("chunk") or chunk_step(*a)

    def step(fam, offset, index):
        state = layer.get_initial_state(2, fam=fam, position_offset=offset)
        if index is None:
            return layer(x, state=state, state_index=0)
        return layer(x, state={**state, "index": index})

    _jit(step)(fam, np.int32(3), np.int32(0))
    assert "blocks" not in paths  # A run-time index: token by token.
    paths.clear()
    outputs = _jit(lambda f, o: step(f, o, None))(fam, np.int32(3))
    assert paths == ["blocks"]
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), atol=1e-5, rtol=0
    )
    state = layer.get_initial_state(2)
    with pytest.raises(ValueError, match="state_index=-1"):
        layer(x, state=state, state_index=-1)
    with pytest.raises(ValueError, match="pass `state` too"):
        layer(x, state_index=0)


def _jit(function):
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    import tensorflow as tf

    return tf.function(function)


# === Gradients ===


def _input_gradient(layer, x, loss_weights):
    """d sum(layer(x) * loss_weights) / dx, with the backend's autodiff."""
    if BACKEND == "jax":
        import jax

        def loss(inputs):
            return (layer(inputs) * loss_weights).sum()

        return np.asarray(jax.grad(loss)(x))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(layer(inputs) * loss_weights)
        return tape.gradient(loss, inputs).numpy()
    import torch

    inputs = torch.tensor(x, requires_grad=True)
    loss = (layer(inputs) * torch.tensor(loss_weights)).sum()
    loss.backward()
    return inputs.grad.numpy()


@pytest.mark.parametrize("fam_length", [2, 0])
def test_gradient_reaches_first_block_only_through_fam(fam_length):
    # S=2, M=1, T=8: the last block (tokens 6, 7) sees block 2 in one
    # layer; block 0 is outside its BSWA receptive field. Only the FAM
    # carries it there (no stop-gradient anywhere).
    size = 2
    layer = _layer(block_size=size, memory_segments=1, fam_length=fam_length)
    x = _inputs(1, 8, seed=6)
    loss_weights = np.zeros((1, 8, 16), "float32")
    loss_weights[:, -size:] = _inputs(1, size, seed=7)
    gradient = _input_gradient(layer, x, loss_weights)
    first_block = np.abs(gradient[:, :size]).max()
    if fam_length:
        assert first_block > 1e-6
    else:
        assert first_block == 0.0
    # In both cases the loss does depend on the last two blocks.
    assert np.abs(gradient[:, -2 * size :]).min(axis=-1).max() > 0.0


# === Backend parity with a checked-in fixture ===


def test_backend_parity_with_fixture():
    import json
    import os

    path = os.path.join(
        os.path.dirname(__file__),
        "..",
        "fixtures",
        "transformer_fam_parity.npz",
    )
    data = np.load(path)
    config = json.loads(str(data["config"]))
    layer = TransformerFAM.from_config(config)
    layer.build((None, None, data["inputs"].shape[-1]))
    paths = sorted(v.path.split("/", 1)[1] for v in layer.weights)
    saved = sorted(k[len("weight:") :] for k in data if k.startswith("weight:"))
    assert paths == saved
    for variable in layer.weights:
        variable.assign(data["weight:" + variable.path.split("/", 1)[1]])
    outputs, fam = layer(
        data["inputs"], padding_mask=data["padding_mask"], return_fam=True
    )
    np.testing.assert_allclose(
        to_numpy(outputs), data["outputs"], atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(to_numpy(fam), data["fam"], atol=1e-5, rtol=0)


# === Layer checks (KerasHub's run_layer_test) ===

SMALL = dict(
    num_heads=2,
    block_size=4,
    memory_segments=1,
    fam_length=2,
    intermediate_dim=16,
)


def test_layer_basics():
    # 1 initial FAM + 4 projections x (kernel, bias) + 2 dense x 2 + 2 norms
    # x (gamma, beta). With dropout, so `fit` also shows that dropout inside
    # the block scan trains (compiled: XLA on JAX and TensorFlow).
    run_layer_test(
        TransformerFAM,
        init_kwargs=dict(SMALL, dropout=0.1),
        input_data=_inputs(2, 10, width=8),
        expected_output_shape=(2, 10, 8),
        expected_num_trainable_weights=17,
    )


def test_layer_basics_bswa_gqa_gated_rms():
    run_layer_test(
        TransformerFAM,
        init_kwargs=dict(
            SMALL,
            num_heads=4,
            num_key_value_heads=2,
            fam_length=0,
            feedforward="gated",
            normalization="rms_norm",
            use_bias=False,
        ),
        input_data=_inputs(2, 10, width=8),
        expected_output_shape=(2, 10, 8),
        expected_num_trainable_weights=4 + 3 + 2,
        # Training, mixed precision and saving are covered above; the
        # config, build and call checks are what differ here.
        run_training_check=False,
        run_precision_check=False,
        run_saving_check=False,
    )


def test_return_structures():
    layer = _layer()
    x = _inputs(2, 9)
    y = layer(x)
    y_fam, fam = layer(x, return_fam=True)
    y_state, state = layer(x, return_state=True)
    y_both, fam_both, state_both = layer(x, return_fam=True, return_state=True)
    for other in (y_fam, y_state, y_both):
        np.testing.assert_array_equal(to_numpy(other), to_numpy(y))
    assert tuple(fam.shape) == (2, 2, 16)
    assert set(state) == set(state_both)
    np.testing.assert_array_equal(to_numpy(state["fam"]), to_numpy(fam))
    np.testing.assert_array_equal(to_numpy(fam_both), to_numpy(fam))
    # The state after 9 tokens does not grow with the sequence.
    signature = _state_signature(layer.get_initial_state(2))
    assert _state_signature(state) == signature


def test_keras_implicit_mask_equals_padding_mask():
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 0, 8, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 16, mask_zero=True)
    layer = _layer()
    inputs = keras.Input(shape=(9,), dtype="int32")
    model = keras.Model(inputs, layer(embedding(inputs)))
    expected = layer(embedding(ids), padding_mask=ids != 0)
    np.testing.assert_allclose(
        to_numpy(model(ids)), to_numpy(expected), atol=1e-6, rtol=0
    )
    unmasked = layer(embedding(ids), padding_mask=np.ones((2, 9), bool))
    assert np.abs(to_numpy(unmasked) - to_numpy(expected)).max() > 1e-3


# === Every constructor argument has an effect ===

VARIANTS = [
    dict(sandwich_norm=True),
    dict(normalization="rms_norm"),
    dict(normalization="rms_norm_unit_offset"),
    dict(feedforward="gated"),
    dict(activation="silu"),
    dict(activation="gelu_approximate"),
    dict(use_bias=False),
    dict(logit_soft_cap=0.5),
    dict(query_scale=1.0),
    dict(use_rope=False),
    dict(rope_max_wavelength=100),
    dict(rope_scaling_factor=4.0),
    dict(layer_norm_epsilon=1.0),
    dict(intermediate_dim=8),
    dict(num_key_value_heads=4),
    dict(head_dim=8),
    dict(block_size=2),
    dict(memory_segments=0),
    dict(memory_segments=2),
    dict(fam_length=0),
    dict(fam_length=3),
    dict(fam_normalization=True),
    dict(fam_write_gate="soft"),
    dict(fam_write_gate="hard", fam_write_threshold=0.9),
    dict(
        rope_frequency_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    ),
]


def _variant_id(variant):
    return ",".join(f"{k}={v}" for k, v in variant.items())


@pytest.fixture(scope="module")
def _base_output():
    x = _inputs(1, 14)
    return x, to_numpy(_layer(seed=11)(x))


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_argument_changes_output(variant, _base_output):
    # Same values for every weight the two layers share (by path).
    x, base = _base_output
    changed = to_numpy(_layer(seed=11, **variant)(x))
    assert np.abs(changed - base).max() > 1e-4, variant


def test_rms_norm_kinds_differ_from_each_other():
    x = _inputs(1, 6)
    plain = _layer(seed=11, normalization="rms_norm")(x)
    offset = _layer(seed=11, normalization="rms_norm_unit_offset")(x)
    assert np.abs(to_numpy(plain) - to_numpy(offset)).max() > 1e-4


def test_reference_attention_implementation_equals_auto():
    x = _inputs(2, 14)
    padding_mask = _padding_mask(2, 14)
    auto = _layer(seed=3)(x, padding_mask=padding_mask)
    reference = _layer(seed=3, attention_implementation="reference")(
        x, padding_mask=padding_mask
    )
    np.testing.assert_allclose(
        to_numpy(reference), to_numpy(auto), atol=1e-5, rtol=0
    )


def test_dropout_changes_training_output_only():
    x = _inputs(1, 10)
    base = _layer(seed=5)
    dropped = _layer(seed=5, dropout=0.3)
    expected = to_numpy(base(x))
    np.testing.assert_allclose(to_numpy(dropped(x)), expected, atol=1e-6)
    first = to_numpy(dropped(x, training=True))
    second = to_numpy(dropped(x, training=True))
    assert np.abs(first - expected).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3  # Fresh masks each call.


def test_without_learned_initial_fam():
    # The layer owns no initial FAM, needs one passed in, and then equals a
    # layer whose learned initial FAM holds the same values.
    layer = _layer(seed=4, learned_initial_fam=False)
    learned = _layer(seed=4)
    names = {v.path.split("/", 1)[1] for v in layer.weights}
    assert names == {v.path.split("/", 1)[1] for v in learned.weights} - {
        "initial_fam"
    }
    x = _inputs(2, 10)
    with pytest.raises(ValueError, match="fam=None"):
        layer(x)
    fam = np.broadcast_to(to_numpy(learned.initial_fam), (2, 2, 16))
    np.testing.assert_allclose(
        to_numpy(layer(x, fam=fam)), to_numpy(learned(x)), atol=1e-6
    )


def test_kernel_initializer_is_used():
    layer = TransformerFAM(**SMALL, kernel_initializer="zeros")
    layer.build((None, None, 8))
    kernels = [v for v in layer.weights if v.path.endswith("kernel")]
    assert len(kernels) == 6
    for kernel in kernels:
        assert not np.any(to_numpy(kernel)), kernel.path
    default = TransformerFAM(**SMALL)
    default.build((None, None, 8))
    assert np.any(to_numpy(default.attention.query.kernel))


# === Bad input: early errors naming the parameter and the value ===


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), "block_size=0"),
        (dict(block_size=-3), "block_size=-3"),
        (dict(memory_segments=-1), "memory_segments=-1"),
        (dict(fam_length=-2), "fam_length=-2"),
        (dict(num_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(normalization="batch_norm"), "normalization='batch_norm'"),
        (dict(feedforward="moe"), "'moe'"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(attention_implementation="flash"), "'flash'"),
        (dict(fam_normalization="yes"), "fam_normalization='yes'"),
        (dict(fam_write_gate="gated"), "fam_write_gate='gated'"),
        (
            dict(fam_write_threshold=0.5),
            'fam_write_threshold.*needs `fam_write_gate="hard"`',
        ),
        (
            dict(fam_write_gate="hard", fam_write_threshold=1.0),
            "fam_write_threshold=1.0",
        ),
        (
            dict(fam_write_threshold_jitter=0.1),
            'fam_write_threshold_jitter.*needs `fam_write_gate="hard"`',
        ),
        (
            dict(fam_write_gate="hard", fam_write_threshold_jitter=0.5),
            "fam_write_threshold_jitter=0.5",
        ),
        (
            dict(fam_write_gate="hard", fam_write_threshold_jitter=-0.1),
            "fam_write_threshold_jitter=-0.1",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerFAM(**{**SMALL, **kwargs})


def test_num_heads_must_divide_width_without_head_dim():
    layer = TransformerFAM(**{**SMALL, "num_heads": 3})
    with pytest.raises(ValueError, match="num_heads=3.*width=8"):
        layer(_inputs(1, 4, width=8))
    # With an explicit head_dim any width works.
    y = TransformerFAM(**{**SMALL, "num_heads": 3, "head_dim": 2})(
        _inputs(1, 4, width=8)
    )
    assert tuple(y.shape) == (1, 4, 8)


def test_wrong_input_rank():
    with pytest.raises(ValueError, match=r"inputs.shape=\(4, 8\)"):
        TransformerFAM(**SMALL)(np.zeros((4, 8), "float32"))


def test_wrong_input_width():
    layer = TransformerFAM(**SMALL)
    layer(_inputs(1, 4, width=8))
    with pytest.raises(ValueError, match=r"inputs.shape=\(1, 4, 6\)"):
        layer(_inputs(1, 4, width=6))


def test_integer_inputs():
    with pytest.raises(TypeError, match="inputs.dtype=int32"):
        TransformerFAM(**SMALL)(np.zeros((1, 4, 8), "int32"))


def test_state_from_differently_configured_layer():
    layer = TransformerFAM(**SMALL)
    other = TransformerFAM(**{**SMALL, "memory_segments": 2})
    x = _inputs(1, 4, width=8)
    layer(x)
    other(x)
    state = other.get_initial_state(1)
    with pytest.raises(ValueError, match=r"memory_key.*\(1, 8, 2, 4\)"):
        layer(x, state=state)
    with pytest.raises(ValueError, match="state"):
        layer(x, state={"fam": state["fam"]})


def test_padding_mask_of_wrong_shape():
    layer = TransformerFAM(**SMALL)
    x = _inputs(2, 6, width=8)
    with pytest.raises(ValueError, match=r"padding_mask.shape=\(2, 5\)"):
        layer(x, padding_mask=np.ones((2, 5), bool))


def test_fam_and_state_together_or_fam_of_wrong_shape():
    layer = TransformerFAM(**SMALL)
    x = _inputs(1, 6, width=8)
    layer(x)
    with pytest.raises(ValueError, match=r"fam.shape=\(1, 3, 8\)"):
        layer(x, fam=np.zeros((1, 3, 8), "float32"))
    state = layer.get_initial_state(1)
    with pytest.raises(ValueError, match="not both"):
        layer(x, fam=state["fam"], state=state)
