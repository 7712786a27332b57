"""TransformerFAM: a pre-norm Transformer layer with Feedback Attention Memory.

Everything here is one block step of one layer (paper Algorithm 2):

    (block x, FAM f, memory keys/values of the last M blocks)
        -> (outputs y, new FAM f', memory shifted by one block)

computed as one fused attention of the rows [FAM ; block] over the keys
[memory ; FAM ; block] under the static mask of `keras_fam.ops.masks`, then the
feedforward network on both FAM and block rows (FAM goes through the whole
layer).

`TransformerFAM.step` is the only place this is written: some rows (FAM rows,
token rows or both) attend to a key layout under their rows of the one static
mask, then go through the feedforward network. Its callers only choose rows,
positions and key layout:

- `_block_step`: the fused block step ([FAM ; block] over [memory ; FAM ;
  block]), looped over blocks by `_run_blocks` (training, prefill);
- `_run_blocks_parallel` (`parallel_blocks=True`): FAM rows over [FAM ;
  block] in a loop, then the token rows of all blocks in one call;
- `_chunk_step`: streamed tokens (generation, any chunk length) over the
  state's [memory ; FAM ; block] keys; `_close_block`: the FAM update at a
  streamed block's end, over the same keys;
- `summary_step`: FAM rows over their own keys (the backbone's initial FAMs).

Public entry points for models: `call` (full sequence or streaming with a
`state`), `run_blocks`, `run_partial_block`, `summary_step`,
`get_initial_state`. The streaming state (its keys, shapes, checks, memory
roll and block writes) is described by `keras_fam.layers.layer_state`.

Shape letters: B batch, T sequence, D width, S block size, M memory segments,
F FAM length, G key/value heads, H head dim.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_fam.checks import (
    check_batch_size,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_positive,
    check_rate,
    get_initializer,
    shapes_match,
)
from keras_fam.layers.fam_attention import FAMAttention
from keras_fam.layers.feedforward import FeedForward
from keras_fam.layers.layer_state import LayerState
from keras_fam.layers.rms_normalization import (
    NORMALIZATIONS,
    normalization_layer,
    rms_normalize,
)
from keras_fam.ops import dispatch
from keras_fam.ops.masks import block_self_mask, block_step_mask

FAM_WRITE_GATES = (None, "soft", "hard")


@keras.saving.register_keras_serializable(package="keras_fam")
class TransformerFAM(keras.layers.Layer):
    """Transformer layer with Block Sliding Window Attention and FAM.

    The sequence is cut into blocks of `block_size` tokens. A token attends
    causally to its own block, fully to the previous `memory_segments` blocks
    and to the layer's feedback memory (FAM): `fam_length` vectors that
    attend to themselves and to each whole block, pass through the
    feedforward network too, and become the FAM seen by the next block. With
    `fam_length=0` the layer is TransformerBSWA, the paper's baseline.

    The layer is pre-norm: `a = x + attention(norm(x))`,
    `y = a + feedforward(norm(a))` (with `sandwich_norm=True` each branch is
    normed again before its residual, as in Gemma 2).

    The layer owns a learnable initial FAM (`initial_fam`, shape
    `(fam_length, width)`) used when no FAM or state is passed. FAM positions
    follow the paper: an updated FAM takes the positions of the last
    `fam_length` tokens of the block it compressed; the initial FAM takes the
    `fam_length` positions just before the first token. The first FAM update
    keeps its residual connection (the paper feeds a zero tensor there);
    `keras_fam.models.FAMBackbone` passes each layer the hidden state of the
    summary embeddings at that depth as its initial FAM, and that residual
    is what carries it.

    Args:
        num_heads: int. Number of attention heads.
        block_size: int. Tokens per block. Defaults to `1024` (the paper).
        memory_segments: int. Number of previous blocks each block attends
            to. Defaults to `3` (the paper).
        fam_length: int. Number of FAM vectors; `0` gives TransformerBSWA.
            Defaults to `64` (the paper).
        num_key_value_heads: int. Key/value heads for grouped-query
            attention; must divide `num_heads`. Defaults to `num_heads`.
        head_dim: int. Size of each head. Defaults to width // `num_heads`.
        intermediate_dim: int. Width of the feedforward hidden layer.
            Defaults to `4 * width`.
        feedforward: str. `"mlp"` (GPT-2) or `"gated"` (Gemma's gated GELU,
            Llama's SwiGLU with `activation="silu"`). Defaults to `"mlp"`.
        activation: str. Feedforward activation, a Keras name or
            `"gelu_approximate"`. Defaults to `"gelu"`.
        normalization: str. `"layer_norm"`, `"rms_norm"` (Llama:
            `x * scale`) or `"rms_norm_unit_offset"` (Gemma:
            `x * (1 + scale)`). Defaults to `"layer_norm"`.
        layer_norm_epsilon: float. Epsilon of every norm. Defaults to `1e-5`.
        sandwich_norm: bool. Also norm the attention and feedforward outputs
            before the residual (Gemma 2). Defaults to `False`.
        use_bias: bool. Biases in attention projections and feedforward.
            Defaults to `True`.
        qkv_bias: bool. Biases on the query, key and value projections
            only (Qwen 2); implied by `use_bias`. Defaults to `False`.
        query_key_norm: bool. Normalize each query and key head (over
            `head_dim`, with the layer's `normalization` and
            `layer_norm_epsilon`) before RoPE (Qwen 3, Gemma 3). Defaults
            to `False`.
        use_rope: bool. Rotary position embeddings. Defaults to `True`.
        rope_max_wavelength: float. RoPE base. Defaults to `10000`.
        rope_scaling_factor: float. Linear RoPE scaling. Defaults to `1.0`.
        rope_frequency_scaling: `None` or a dict of Llama 3.1 RoPE frequency
            scaling (`factor`, `low_freq_factor`, `high_freq_factor`,
            `original_max_position_embeddings`), see
            `keras_fam.layers.fam_attention.rope_inverse_frequency`.
            Defaults to `None`.
        query_scale: float. Attention logit scale. Defaults to
            `head_dim ** -0.5`.
        logit_soft_cap: float or `None`. Attention logit soft-cap.
            Defaults to `None`.
        dropout: float. Dropout on the attention and feedforward outputs
            (before each residual). Defaults to `0.0`.
        kernel_initializer: initializer of all kernels. Defaults to
            `"glorot_uniform"`.
        attention_implementation: `"auto"` (backend kernels) or
            `"reference"` (`keras.ops` only, for testing). Defaults to
            `"auto"`.
        learned_initial_fam: bool. Own the learnable `initial_fam` weight.
            `False` when the caller always passes `fam` or `state` (as
            `keras_fam.models.FAMBackbone` does); calling without them then
            raises a `ValueError`. Defaults to `True`.
        parallel_blocks: bool. How whole blocks of a full-sequence call
            (training, prefill) run. `False`: a loop over the fused
            [FAM ; block] step. `True`: token keys/values depend only on the
            input, so all tokens are projected at once, the loop runs over
            the FAM rows alone (each FAM attends to its previous FAM and its
            block, then goes through the feedforward network), and all
            blocks' token attention and feedforward then run as one batched
            call. Same numbers (tests compare the two). Which is faster
            depends on the backend: on CPU, forward+backward at 2k-8k
            tokens, it took 0.69-0.74x the time of the loop on TensorFlow,
            1.0x on JAX and 1.0-1.13x on PyTorch (see
            `benchmarks/README.md`); accelerators were not measured.
            Defaults to `False`.
        fam_normalization: bool. Rescale every updated FAM vector to unit
            root-mean-square before it is carried to the next block (no
            weights; the paper has no such step). The FAM's residual
            stream otherwise sums one update per block, so its norm grows
            with the sequence and a small model trained on short sequences
            drifts out of the range it has seen; with it the FAM lives on a
            fixed sphere and what it holds can persist over any number of
            blocks (see `examples/passkey_retrieval.py`). Leave it off to
            reuse pretrained checkpoints unchanged. Over long streams
            without it the FAM's magnitude grows about linearly with the
            number of blocks (outputs stay finite, but the FAM leaves the
            range seen in training); with it, it stays at unit RMS. In
            either case the carried FAM and every residual add are float32
            (float64 in a float64 layer) whatever the compute dtype, so
            under bfloat16 the memory does not freeze. Defaults to
            `False`.
        fam_write_gate: `None`, `"soft"` or `"hard"`. Scales each FAM vector's
            update at a block boundary by its write share, the attention mass
            (averaged over heads) that the vector's query put on the block's
            tokens rather than on the FAM's own keys: `fam + share * (updated -
            fam)`. No weights: the share is read from the FAM queries' own
            attention (its softmax is computed again beside the fused kernel,
            which returns no weights: F x K logits per block, small next to the
            block's attention), so a model learns when to write by where its
            FAM queries look. `"hard"` writes all or nothing in the forward
            pass, with the soft share's gradient (straight-through); it
            writes when the query's attention per key is higher on the block
            than on the FAM (share > S / (S + F) for S valid block tokens and
            F FAM vectors), so a query that attends uniformly, as in a freshly
            converted checkpoint, sits on the threshold rather than writing
            on every block. A closed gate carries the FAM exactly, so what it
            holds survives any number of blocks that the model reads without
            writing. `None` (the paper's update, every block writes in full)
            keeps converted checkpoints unchanged. Evidence
            (`examples/passkey_retrieval.py`: a converted 2-layer Llama, LoRA
            through `fit`, 5-digit keys): ungated or soft, nothing is read
            beyond the trained fillers (96-576 tokens; 0.00 from 4k). Hard,
            on streamed episodes with fillers of up to 3,072 tokens
            (1,500-3,000 steps): with a fixed threshold of 0.5 (where uniform
            attention writes), 3 of 6 runs latched (the same accuracy from 1k
            to 16k filler tokens, 0.42-0.87) and 3 read 0.00-0.02 from 1k
            tokens on, a few last-layer FAM vectors still writing on 1-5% of
            the filler blocks; with the per-key threshold above, 4 of 4
            latched (flat from 1k to 16k, 0.22-0.70; mean over the runs 0.53
            against 0.34). Defaults to `None`.
        fam_write_threshold: `None` or a float in `(0, 1)`. With
            `fam_write_gate="hard"`: a fixed write share above which a FAM
            vector writes, in training and at inference alike, instead of
            the per-key threshold S / (S + F). `0.5` (below 32 / 48 for
            32-token blocks and 16 FAM vectors) lets a freshly converted
            checkpoint's gates start open, so it learns what to write and
            how to read it back before it learns to stop writing on filler;
            the per-key threshold starts them on the edge. Evidence
            (`examples/passkey_retrieval.py`; results vary from run to run,
            even with the same seed): with `0.5`, of 7 runs three read
            0.84-1.00 from 1k to 16k filler tokens (0.82-1.00 at 0), one
            0.98 / 0.74 / 0.50 at 0 / 1k / 16k, one 0.41 in range and 0.05
            beyond, and two collapsed to chance while the filler grew;
            per-key, 5 of 6 runs latched and read 0.21-0.97, one read only
            the first digit. Without `fam_write_threshold_jitter`, one
            threshold in training and another at inference is worse:
            trained at 0.5 and read per-key, 2 of 4 runs fell to 0.00-0.13
            (one from 0.96-1.00), one was unchanged, one rose (0.82 to 0.98
            at filler 0); with it, see `fam_write_threshold_jitter`.
            Defaults to `None` (the per-key threshold).
        fam_write_threshold_jitter: float in `[0, 0.5)`. With
            `fam_write_gate="hard"`, in training only: every gate's
            threshold at every block is drawn uniformly from
            `threshold +- fam_write_threshold_jitter` (inference uses the
            threshold itself). A write share near the threshold then
            sometimes writes and sometimes not, so the loss pushes the
            shares of the blocks that must be written clearly above it and
            those of filler clearly below it: a margin, where the gate
            otherwise learns only the side of the threshold its training
            blocks happened to need. Drawn on the whole-block paths
            (`call` on whole blocks, training streams); streamed chunks
            never jitter. Evidence (`examples/passkey_retrieval.py`, 5-digit
            keys, trained at 0.5 +- 0.1, inference threshold chosen on
            validation data with `keras_fam.training.
            calibrate_write_threshold`): all 6 seeds held the key at 16k
            filler tokens (0.63-1.00, 3 at 0.95-1.00), where without jitter
            runs leaked it (one read 0.77 / 0.05 / 0.00 at 1k / 3k / 16k);
            a jitter of 0.2 slowed learning. Defaults to `0.0` (off).
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`...).

    Call arguments:
        inputs: float tensor `(batch, sequence, width)`. Any sequence length;
            a last partial block never sees future tokens.
        padding_mask: bool tensor `(batch, sequence)`, `True` for real tokens.
            Masked tokens are never attended to by other tokens or the FAM,
            and a NaN there never reaches other rows, but they keep their
            positions and block slots: blocks are counted from position 0,
            so padding *before* real tokens moves their block boundaries
            (and FAM updates) and changes their outputs. Pad on the right
            (the models, `keras_fam.models.FAMBackbone` and up, reject
            left padding). Keras' implicit mask is used when it is not
            given.
        fam: float tensor `(batch, fam_length, width)`: the initial FAM of a
            new sequence. Defaults to the learned `initial_fam`.
        state: dict from `get_initial_state()` or a previous call with
            `return_state=True`: continue that sequence (streaming). Its size
            does not depend on how many tokens it has seen.
        state_index: int or `None`. The position `state` is at, as a Python
            int, used instead of `state["index"]`. Inside `jax.jit` or
            `tf.function` the state's index tensor is a run-time value, so
            the layer runs the tokens one by one (same numbers); a known
            position lets whole blocks of a block-aligned chunk run through
            the fused block step. Defaults to `None`.
        return_fam: bool. Also return the FAM after the last complete block.
        return_state: bool. Also return the state to continue the sequence.
            Unless `training=True` it is detached from autograd
            (`ops.stop_gradient`): a stream may be fed chunk by chunk
            outside `torch.no_grad()` without keeping earlier chunks'
            graphs; in training, gradients flow back through it.
        training: bool. Enables dropout.

    Returns:
        `outputs` `(batch, sequence, width)`, or a tuple
        `(outputs, fam)`, `(outputs, state)`, `(outputs, fam, state)` when
        asked for.

    Example:

    >>> layer = TransformerFAM(num_heads=2, block_size=4, memory_segments=1,
    ...                        fam_length=2)
    >>> x = np.random.rand(1, 10, 8).astype("float32")
    >>> y = layer(x)
    >>> y1, state = layer(x[:, :3], return_state=True)
    >>> y2 = layer(x[:, 3:], state=state)  # equals y[:, 3:]

    References:
        Hwang et al., "TransformerFAM: Feedback attention is working
        memory", arXiv 2404.09173.
    """

    def __init__(
        self,
        num_heads,
        block_size=1024,
        memory_segments=3,
        fam_length=64,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_dim=None,
        feedforward="mlp",
        activation="gelu",
        normalization="layer_norm",
        layer_norm_epsilon=1e-5,
        sandwich_norm=False,
        use_bias=True,
        use_rope=True,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        query_scale=None,
        logit_soft_cap=None,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        attention_implementation="auto",
        rope_frequency_scaling=None,
        learned_initial_fam=True,
        parallel_blocks=False,
        fam_normalization=False,
        fam_write_gate=None,
        fam_write_threshold=None,
        fam_write_threshold_jitter=0.0,
        qkv_bias=False,
        query_key_norm=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        block_size = check_int("block_size", block_size, minimum=1)
        memory_segments = check_int("memory_segments", memory_segments, 0)
        fam_length = check_int("fam_length", fam_length, minimum=0)
        if intermediate_dim is not None:
            intermediate_dim = check_int("intermediate_dim", intermediate_dim)
        check_choice("normalization", normalization, NORMALIZATIONS)
        layer_norm_epsilon = check_positive(
            "layer_norm_epsilon", layer_norm_epsilon
        )
        dropout = check_rate("dropout", dropout)
        self.num_heads = check_int("num_heads", num_heads)
        self.block_size = block_size
        self.memory_segments = memory_segments
        self.fam_length = fam_length
        self.intermediate_dim = intermediate_dim
        self.feedforward_kind = feedforward
        self.activation = activation
        self.normalization = normalization
        self.layer_norm_epsilon = layer_norm_epsilon
        self.sandwich_norm = check_bool("sandwich_norm", sandwich_norm)
        self.use_bias = check_bool("use_bias", use_bias)
        self.dropout = dropout
        self.learned_initial_fam = check_bool(
            "learned_initial_fam", learned_initial_fam
        )
        self.parallel_blocks = check_bool("parallel_blocks", parallel_blocks)
        self.fam_normalization = check_bool(
            "fam_normalization", fam_normalization
        )
        self.fam_write_gate = check_choice(
            "fam_write_gate", fam_write_gate, FAM_WRITE_GATES
        )
        self.set_fam_write_threshold(fam_write_threshold)
        fam_write_threshold_jitter = check_float(
            "fam_write_threshold_jitter",
            fam_write_threshold_jitter,
            minimum=0.0,
            below=0.5,
        )
        if fam_write_threshold_jitter:
            self._needs_hard_gate(
                "fam_write_threshold_jitter", fam_write_threshold_jitter
            )
        self.fam_write_threshold_jitter = fam_write_threshold_jitter
        query_key_norm = check_bool("query_key_norm", query_key_norm)
        self.kernel_initializer = get_initializer(kernel_initializer)
        self.supports_masking = True
        # Keras would cast every float argument to the compute dtype, the
        # carried float32 FAM in `state`/`fam` too; `__call__` converts
        # `inputs` to a tensor, `call` casts it and the state
        # (`LayerState.cast`).
        self._convert_input_args = False
        # Validates the attention arguments now, so errors come early.
        self.attention = FAMAttention(
            num_heads=num_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            query_key_norm=normalization if query_key_norm else None,
            query_key_norm_epsilon=layer_norm_epsilon,
            use_rope=use_rope,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            rope_frequency_scaling=rope_frequency_scaling,
            query_scale=query_scale,
            logit_soft_cap=logit_soft_cap,
            kernel_initializer=kernel_initializer,
            attention_implementation=attention_implementation,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.feedforward = FeedForward(
            intermediate_dim=intermediate_dim or 1,  # set in build
            kind=feedforward,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            dtype=self.dtype_policy,
            name="feedforward",
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="dropout"
        )
        self.seed_generator = keras.random.SeedGenerator(name="seed")
        self._static_mask = block_step_mask(
            block_size, memory_segments, fam_length
        )
        self._self_mask = block_self_mask(
            block_size, memory_segments, fam_length
        )
        # The FAM's own keys in the one key layout (the write gate's mass).
        self._fam_columns = np.zeros(self._static_mask.shape[1], dtype=bool)
        start = memory_segments * block_size
        self._fam_columns[start : start + fam_length] = True
        self._row_offsets = np.concatenate(
            [np.arange(-fam_length, 0), np.arange(block_size)]
        ).astype("float32")

    # === Build ===

    def _norm(self, name):
        return normalization_layer(
            self.normalization,
            self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, inputs_shape):
        if len(inputs_shape) != 3:
            raise ValueError(
                "`inputs` must have rank 3 (batch, sequence, width). "
                f"Received: inputs.shape={tuple(inputs_shape)}"
            )
        self.hidden_dim = hidden_dim = inputs_shape[-1]
        self.attention_norm = self._norm("attention_norm")
        self.attention_norm.build(inputs_shape)
        self.attention.build(inputs_shape)
        self.feedforward_norm = self._norm("feedforward_norm")
        self.feedforward_norm.build(inputs_shape)
        if self.intermediate_dim is None:
            self.intermediate_dim = 4 * hidden_dim
        self.feedforward.intermediate_dim = self.intermediate_dim
        self.feedforward.build(inputs_shape)
        if self.sandwich_norm:
            self.post_attention_norm = self._norm("post_attention_norm")
            self.post_attention_norm.build(inputs_shape)
            self.post_feedforward_norm = self._norm("post_feedforward_norm")
            self.post_feedforward_norm.build(inputs_shape)
        if self.fam_length and self.learned_initial_fam:
            self.initial_fam = self.add_weight(
                name="initial_fam",
                shape=(self.fam_length, hidden_dim),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
            )

    def set_fam_write_threshold(self, fam_write_threshold):
        """Set `fam_write_threshold` (checked as the constructor checks it).
        It is no weight: a trained layer can be read at another threshold
        (see `fam_write_threshold_jitter`). Functions compiled before keep
        the old value."""
        if fam_write_threshold is not None:
            fam_write_threshold = check_float(
                "fam_write_threshold", fam_write_threshold, above=0.0, below=1.0
            )
            self._needs_hard_gate("fam_write_threshold", fam_write_threshold)
        self.fam_write_threshold = fam_write_threshold

    def _needs_hard_gate(self, name, value):
        if self.fam_write_gate != "hard":
            raise ValueError(
                f'`{name}` needs `fam_write_gate="hard"`. '
                f"Received: fam_write_gate={self.fam_write_gate!r}, "
                f"{name}={value!r}"
            )

    # === The step: the layer's math for some rows over some keys ===

    def step(
        self,
        rows,
        positions,
        keys,
        mask_rows,
        columns=slice(None),
        projected=None,
        keep=None,
        training=None,
        fam_rows=0,
        jitter=None,
    ):
        """One step of the layer: `rows` attend to a key layout, then go
        through the feedforward network (pre-norm, residuals).

        Every path is a caller of this: the fused block step ([FAM ; block]
        rows over [memory ; FAM ; block] keys), `parallel_blocks` (FAM rows
        over [FAM ; block], then all blocks' token rows at once), a streamed
        chunk (token rows over the state's keys), the FAM update at the end
        of a streamed block (FAM rows over the state's keys) and
        `summary_step` (FAM rows over their own keys).

        Args:
            rows: `(B, R, D)` un-normed rows (FAM vectors, tokens or both).
            positions: `(R,)` float positions of the rows (RoPE).
            keys: the key layout, a function `(key, value) -> (keys, values,
                key_mask)` given the rows' own rotated keys and values
                `(B, R, G, H)`: the keys `(B, K, G, H)` the rows attend to
                and which of them are valid `(B, K)`.
            mask_rows: which rows of the one static mask
                (`keras_fam.ops.masks.block_step_mask`) the rows are: a NumPy
                array, or a tensor (a chunk at a run-time offset).
            columns: the static mask's columns of the key layout, a slice of
                [memory ; FAM ; block]. Defaults to all.
            projected: `None`, or `(query, key, value)` of the rows when the
                caller projected them already (all tokens at once).
            keep: `None`, or a pair of dropout keep-masks (inside a scan,
                where a seed generator cannot advance).
            training: bool. Enables dropout.
            fam_rows: int. The first `fam_rows` rows are FAM vectors whose
                update the `fam_write_gate` scales (the callers that carry
                the FAM to the next block). Defaults to `0`.
            jitter: `None`, or `(B, fam_rows)` offsets added to the hard
                gate's threshold (`fam_write_threshold_jitter`; drawn
                outside a scan, like `keep`).

        Returns:
            `(rows, (key, value))`: the rows after the layer, and their own
            keys/values (what the caller stores in memory). The residual
            stream of a step (its two adds) runs in the dtype of the carried
            FAM, float32 whatever the compute dtype (`LayerState`), so
            `rows` come back in it; token rows are cast back to the compute
            dtype by the callers.
        """
        residual = self.state_spec.fam_dtype
        rows = previous = ops.cast(rows, residual)
        if projected is None:
            hidden = self.attention_norm(rows)
            query = self.attention.project_query(hidden, positions)
            key, value = self.attention.project_key_value(hidden, positions)
        else:
            query, key, value = projected
        all_keys, all_values, key_mask = keys(key, value)
        all_keys = _finite_where_masked(all_keys, key_mask)
        all_values = _finite_where_masked(all_values, key_mask)
        mask = self._mask(mask_rows, key_mask, columns)
        attended = self.attention.attend(query, all_keys, all_values, mask)
        if self.sandwich_norm:
            attended = self.post_attention_norm(attended)
        rows = rows + ops.cast(
            self._drop(attended, keep, 0, training), residual
        )
        fed = self.feedforward(self.feedforward_norm(rows))
        if self.sandwich_norm:
            fed = self.post_feedforward_norm(fed)
        rows = rows + ops.cast(self._drop(fed, keep, 1, training), residual)
        if fam_rows and self.fam_write_gate is not None:
            rows = self._gate_fam(
                rows, previous, query, all_keys, mask, columns, fam_rows, jitter
            )
        return rows, (key, value)

    def _gate_fam(
        self, rows, previous, query, keys, mask, columns, count, jitter=None
    ):
        """`fam_write_gate`: scale each FAM vector's update by the share of
        its attention that went to the block rather than to the FAM."""
        attention = self.attention
        scale = attention.query_scale or attention.head_dim**-0.5
        on_fam = dispatch.attention_mass(
            query[:, :count],
            keys,
            mask[:, :count],
            self._fam_columns[columns],
            float(scale),
            attention.logit_soft_cap,
        )
        write = 1.0 - on_fam
        if self.fam_write_gate == "hard":
            # Forward: write all or nothing, so a closed gate keeps the
            # FAM exactly over any number of blocks. Backward: the soft
            # share (straight-through estimator).
            # The threshold is where the query's attention per key is the
            # same on the block as on the FAM: n_block / (n_block + n_fam)
            # valid keys. A query that has not learned where to look
            # (uniform attention, as in a freshly converted checkpoint)
            # sits on it instead of writing on every block, as a fixed 0.5
            # would make it (32 block keys, 16 FAM vectors: share 2/3).
            # `fam_write_threshold`, when set, replaces it by that fixed
            # share (gates that start open; see the argument's docstring).
            if self.fam_write_threshold is not None:
                threshold = self.fam_write_threshold
            else:
                valid = ops.cast(mask[:, :count], write.dtype)
                fam_columns = ops.cast(self._fam_columns[columns], write.dtype)
                on_block = ops.sum(valid * (1.0 - fam_columns), axis=-1)
                threshold = on_block / ops.maximum(ops.sum(valid, axis=-1), 1.0)
            if jitter is not None:
                # `fam_write_threshold_jitter`, training only: each gate's
                # threshold moves at random, so what trains is a margin on
                # both sides of it (see the argument's docstring).
                threshold = threshold + ops.cast(jitter, write.dtype)
            hard = ops.cast(ops.greater(write, threshold), write.dtype)
            write = write + ops.stop_gradient(hard - write)
        write = ops.cast(write[:, :, None], rows.dtype)
        before = previous[:, :count]
        fam = before + write * (rows[:, :count] - before)
        return ops.concatenate([fam, rows[:, count:]], axis=1)

    def _carried_fam(self, fam):
        """The updated FAM as carried to the next block: unit RMS per vector
        with `fam_normalization`, else unchanged."""
        if not self.fam_normalization:
            return fam
        return ops.cast(rms_normalize(fam, epsilon=1e-6), fam.dtype)

    def _drop(self, x, keep, which, training):
        if keep is not None:
            return x * ops.cast(keep[which], x.dtype) / (1.0 - self.dropout)
        return self.dropout_layer(x, training=training)

    def _mask(self, rows, key_mask, columns=slice(None)):
        """Run-time `(B, rows, K)` mask: static rows AND valid keys, OR self.

        `rows` indexes the static mask: a NumPy array (fused step, FAM
        update) or a tensor (a streamed chunk at a run-time offset).
        `columns` selects the static mask's columns of the key layout (the
        FAM rows of the parallel path never see the memory and omit its
        keys).
        """
        if isinstance(rows, np.ndarray):
            static = self._static_mask[rows, columns]
            own = self._self_mask[rows, columns]
        else:
            static = ops.take(self._static_mask[:, columns], rows, axis=0)
            own = ops.take(self._self_mask[:, columns], rows, axis=0)
        allowed = ops.logical_and(static[None], key_mask[:, None, :])
        return ops.logical_or(allowed, own[None])

    def _fam_positions(self, index, position_offset):
        """Positions of a FAM that precedes the block starting at `index`."""
        start = ops.cast(index + position_offset, "float32")
        return ops.add(start, np.arange(-self.fam_length, 0, dtype="float32"))

    def _fam_key_value(self, fam, index, position_offset):
        positions = self._fam_positions(index, position_offset)
        hidden = self.attention_norm(fam)
        return self.attention.project_key_value(hidden, positions)

    # === The fused block step (training, prefill) ===

    def _block_step(self, carry, inputs, training):
        """[FAM ; block] rows over [memory ; FAM ; block] keys, then the
        memory roll."""
        fam_length, size = self.fam_length, self.block_size
        roll = self.state_spec.roll
        fam_mask = ops.ones_like(carry["fam"][:, :, 0], dtype="bool")

        def keys(key, value):
            return (
                ops.concatenate([carry["memory_key"], key], axis=1),
                ops.concatenate([carry["memory_value"], value], axis=1),
                ops.concatenate(
                    [carry["memory_mask"], fam_mask, inputs["mask"]], axis=1
                ),
            )

        fam = carry["fam"]
        rows, (key, value) = self.step(
            ops.concatenate([fam, ops.cast(inputs["x"], fam.dtype)], axis=1),
            ops.add(inputs["start"], self._row_offsets),
            keys,
            np.arange(fam_length + size),
            keep=inputs.get("keep"),
            training=training,
            fam_rows=fam_length,
            jitter=inputs.get("jitter"),
        )
        carry = {
            "fam": self._carried_fam(rows[:, :fam_length]),
            "memory_key": roll(carry["memory_key"], key[:, fam_length:]),
            "memory_value": roll(carry["memory_value"], value[:, fam_length:]),
            "memory_mask": roll(carry["memory_mask"], inputs["mask"]),
        }
        return carry, ops.cast(rows[:, fam_length:], self.compute_dtype)

    def _run_blocks(self, x, mask, state, training):
        """Whole blocks through the fused step, looped by `dispatch.scan`."""
        size, width = self.block_size, self.hidden_dim
        num_blocks = x.shape[1] // size
        blocks = ops.transpose(
            ops.reshape(x, (-1, num_blocks, size, width)), (1, 0, 2, 3)
        )
        xs = {
            "x": blocks,
            "mask": ops.transpose(
                ops.reshape(mask, (-1, num_blocks, size)), (1, 0, 2)
            ),
            "start": ops.add(
                ops.cast(state["index"] + state["position_offset"], "float32"),
                np.arange(num_blocks, dtype="float32") * size,
            ),
        }
        keep = self._block_keep(x, num_blocks, training)
        if keep is not None:
            xs["keep"] = keep
        jitter = self._block_jitter(x, num_blocks, training)
        if jitter is not None:
            xs["jitter"] = jitter
        carry_keys = ("fam", "memory_key", "memory_value", "memory_mask")
        carry = {key: state[key] for key in carry_keys}
        carry, ys = dispatch.scan(
            lambda c, inputs: self._block_step(c, inputs, training),
            carry,
            xs,
            ys_like=ops.zeros_like(blocks[0]),
        )
        outputs = ops.reshape(
            ops.transpose(ys, (1, 0, 2, 3)), (-1, num_blocks * size, width)
        )
        index = state["index"] + num_blocks * size
        fam_key, fam_value = self._fam_key_value(
            carry["fam"], index, state["position_offset"]
        )
        state = {
            **state,
            **carry,
            "fam_key": fam_key,
            "fam_value": fam_value,
            "index": index,
        }
        return outputs, state

    def _block_keep(self, x, num_blocks, training):
        """Dropout keep-masks `(num_blocks, B, F + S, D)` of the attention and
        feedforward outputs of whole blocks, or `None` without dropout. Both
        block paths draw the same ones, so they agree in training too."""
        if not (training and self.dropout > 0):
            return None
        shape = (
            num_blocks,
            ops.shape(x)[0],
            self.fam_length + self.block_size,
            self.hidden_dim,
        )
        return tuple(
            keras.random.uniform(shape, seed=self.seed_generator)
            >= self.dropout
            for _ in range(2)
        )

    def _block_jitter(self, x, num_blocks, training):
        """Offsets `(num_blocks, B, F)` of the hard gate's threshold, uniform
        in `+-fam_write_threshold_jitter`, or `None` (inference, or no
        jitter). Both block paths draw the same ones."""
        amplitude = self.fam_write_threshold_jitter
        if not (training and amplitude and self.fam_length):
            return None
        shape = (num_blocks, ops.shape(x)[0], self.fam_length)
        return keras.random.uniform(
            shape, -amplitude, amplitude, seed=self.seed_generator
        )

    def _run_blocks_parallel(self, x, mask, state, training):
        """Whole blocks with only the FAM rows looped (`parallel_blocks`).

        Equal to `_run_blocks`: token keys/values depend on the layer input
        alone, so (1) all tokens are normed, projected and rotated at once;
        (2) a loop over blocks runs the FAM rows of the fused step (FAM
        queries over [previous FAM ; block]; feedforward), emitting the
        keys/values of the FAM each block receives; (3) the token rows of
        all blocks attend, as one batched call of `step`, to
        [previous M blocks ; incoming FAM ; own block], with the same rows
        of the static mask as the fused step.
        """
        fam_length, size, width = self.fam_length, self.block_size, x.shape[2]
        memory = self.memory_segments * size
        num_blocks = x.shape[1] // size
        start = ops.cast(state["index"] + state["position_offset"], "float32")
        positions = ops.add(
            start, np.arange(num_blocks * size, dtype="float32")
        )
        hidden = self.attention_norm(x)
        query = self.attention.project_query(hidden, positions)
        key, value = self.attention.project_key_value(hidden, positions)
        keep = self._block_keep(x, num_blocks, training)
        jitter = self._block_jitter(x, num_blocks, training)

        def blocks(t):  # (B, n * S, ...) -> (B, n, S, ...)
            return ops.reshape(t, (-1, t.shape[1] // size, size, *t.shape[2:]))

        def block_major(t):  # (B, n, ...) -> (n, B, ...)
            return ops.moveaxis(t, 1, 0)

        fam = state["fam"]
        fam_keys = fam_values = None
        if fam_length:

            def fam_step(fam, inputs):
                fam_mask = ops.ones_like(fam[:, :, 0], dtype="bool")

                def keys(fam_key, fam_value):
                    return (
                        ops.concatenate([fam_key, inputs["key"]], axis=1),
                        ops.concatenate([fam_value, inputs["value"]], axis=1),
                        ops.concatenate([fam_mask, inputs["mask"]], axis=1),
                    )

                fam, fam_key_value = self.step(
                    fam,
                    self._fam_positions(inputs["start"], 0),
                    keys,
                    np.arange(fam_length),
                    columns=slice(memory, None),
                    keep=inputs.get("keep"),
                    training=training,
                    fam_rows=fam_length,
                    jitter=inputs.get("jitter"),
                )
                return self._carried_fam(fam), fam_key_value

            xs = {
                "key": block_major(blocks(key)),
                "value": block_major(blocks(value)),
                "mask": block_major(blocks(mask)),
                "start": ops.add(
                    start, np.arange(num_blocks, dtype="float32") * size
                ),
            }
            if keep is not None:
                xs["keep"] = tuple(k[:, :, :fam_length] for k in keep)
            if jitter is not None:
                xs["jitter"] = jitter
            key_like = ops.zeros_like(state["fam_key"])
            fam, (fam_keys, fam_values) = dispatch.scan(
                fam_step, fam, xs, ys_like=(key_like, key_like)
            )
            fam_keys = ops.moveaxis(fam_keys, 0, 1)  # (B, n, F, G, H)
            fam_values = ops.moveaxis(fam_values, 0, 1)

        # Keys of block i: [blocks i-M .. i-1 ; incoming FAM ; block i].
        all_key = ops.concatenate([state["memory_key"], key], axis=1)
        all_value = ops.concatenate([state["memory_value"], value], axis=1)
        all_mask = ops.concatenate([state["memory_mask"], mask], axis=1)

        def window(t, fam_part):  # (B, M * S + T, ...) -> (B * n, K, ...)
            padded = blocks(t)
            parts = [
                padded[:, segment : segment + num_blocks]
                for segment in range(self.memory_segments)
            ]
            if fam_length:
                parts.append(fam_part)
            parts.append(padded[:, self.memory_segments :])
            joined = ops.concatenate(parts, axis=2)
            return ops.reshape(joined, (-1, *joined.shape[2:]))

        fam_mask = None
        if fam_length:
            fam_mask = ops.ones_like(fam_keys[:, :, :, 0, 0], dtype="bool")
        token_keep = None
        if keep is not None:
            token_keep = tuple(
                ops.reshape(
                    block_major(k[:, :, fam_length:]), (-1, size, width)
                )
                for k in keep
            )

        def token_keys(key, value):
            return (
                window(all_key, fam_keys),
                window(all_value, fam_values),
                window(all_mask, fam_mask),
            )

        outputs, _ = self.step(
            ops.reshape(x, (-1, size, width)),
            None,
            token_keys,
            np.arange(fam_length, fam_length + size),
            projected=(
                ops.reshape(query, (-1, size, *query.shape[2:])),
                None,
                None,
            ),
            keep=token_keep,
            training=training,
        )
        outputs = ops.reshape(
            ops.cast(outputs, self.compute_dtype),
            (-1, num_blocks * size, width),
        )
        index = state["index"] + num_blocks * size
        fam_key, fam_value = self._fam_key_value(
            fam, index, state["position_offset"]
        )
        kept = all_key.shape[1] - memory
        state = {
            **state,
            "fam": fam,
            "fam_key": fam_key,
            "fam_value": fam_value,
            "memory_key": all_key[:, kept:],
            "memory_value": all_value[:, kept:],
            "memory_mask": all_mask[:, kept:],
            "index": index,
        }
        return outputs, state

    # === The streaming chunk step (generation, any chunk length) ===

    def _chunk_step(self, x, mask, state, offset, training, count=None):
        """Tokens `x` `(B, C, D)` that start at in-block index `offset` and
        end inside, or at the end of, the current block.

        `count` (`None` or a scalar, possibly known only at run time): only
        the first `count < block_size - offset` tokens are real and the
        position advances by `count`; the others are masked out of the
        block's keys (a later chunk overwrites them) and the block does not
        complete (a prompt's last, partial block in one call).
        """
        fam_length, length = self.fam_length, x.shape[1]
        advance = length
        if count is not None:
            advance = count
            valid = ops.arange(length, dtype="int32") < ops.cast(count, "int32")
            mask = ops.logical_and(mask, valid[None])
        positions = ops.add(
            ops.cast(state["index"] + state["position_offset"], "float32"),
            np.arange(length, dtype="float32"),
        )
        written = {}

        def keys(key, value):
            written.update(
                self.state_spec.write(state, offset, key, value, mask, advance)
            )
            written["keys"] = self.state_spec.keys(written)
            return written["keys"]

        if isinstance(offset, int):
            rows = np.arange(fam_length + offset, fam_length + offset + length)
        else:
            rows = ops.arange(length, dtype="int32") + (fam_length + offset)
        outputs, _ = self.step(x, positions, keys, rows, training=training)
        outputs = ops.cast(outputs, self.compute_dtype)
        keys, values, key_mask = written.pop("keys")
        state = written
        completes = offset + length == self.block_size
        if count is not None:
            return outputs, state
        if isinstance(offset, int):
            if completes:
                state = self._close_block(state, keys, values, key_mask)
        else:
            state = ops.cond(
                completes,
                lambda: self._close_block(state, keys, values, key_mask),
                lambda: state,
            )
        return outputs, state

    def _close_block(self, state, keys, values, key_mask):
        """The FAM update at the end of a streamed block, and the memory
        shift."""
        fam = state["fam"]
        block_start = state["index"] - self.block_size
        if self.fam_length:
            fam, _ = self.step(
                fam,
                self._fam_positions(block_start, state["position_offset"]),
                lambda key, value: (keys, values, key_mask),
                np.arange(self.fam_length),
                fam_rows=self.fam_length,
            )
            fam = self._carried_fam(fam)
        fam_key, fam_value = self._fam_key_value(
            fam, state["index"], state["position_offset"]
        )
        return self.state_spec.close_block(state, fam, fam_key, fam_value)

    def _stream(self, x, mask, state, training):
        """Any number of tokens from any state: whole blocks go through the
        fused step, the rest through chunk steps."""
        length, size = x.shape[1], self.block_size
        index = dispatch.static_int(state["index"])
        if index is None:  # A run-time position (compiled generation).
            offset = state["index"] % size
            if length == 1:
                return self._chunk_step(x, mask, state, offset, training)

            def token_step(carry, inputs):
                carry_offset = carry["index"] % size
                y, carry = self._chunk_step(
                    inputs["x"], inputs["mask"], carry, carry_offset, False
                )
                return carry, y

            xs = {
                "x": ops.transpose(x, (1, 0, 2))[:, :, None],
                "mask": ops.transpose(mask, (1, 0))[:, :, None],
            }
            state, ys = dispatch.scan(
                token_step, state, xs, ys_like=ops.zeros_like(x[:, :1])
            )
            return ops.transpose(ys[:, :, 0], (1, 0, 2)), state
        offset = index % size
        head = min((size - offset) % size, length)
        whole = (length - head) // size * size
        pieces, outputs = [], []
        if head:
            pieces.append(("chunk", 0, head, offset))
        if whole:
            pieces.append(("blocks", head, head + whole, 0))
        if head + whole < length:
            pieces.append(("chunk", head + whole, length, 0))
        for kind, begin, end, piece_offset in pieces:
            piece_x, piece_mask = x[:, begin:end], mask[:, begin:end]
            if kind == "blocks":
                run_blocks = (
                    self._run_blocks_parallel
                    if self.parallel_blocks
                    else self._run_blocks
                )
                y, state = run_blocks(piece_x, piece_mask, state, training)
            else:
                y, state = self._chunk_step(
                    piece_x, piece_mask, state, piece_offset, training
                )
            outputs.append(y)
        if len(outputs) == 1:
            return outputs[0], state
        return ops.concatenate(outputs, axis=1), state

    # === Public API ===

    def run_blocks(self, inputs, state, padding_mask=None, training=None):
        """Whole blocks from a block boundary, through the fused block step.

        Unlike `call`, the state's position may be known only at run time
        (inside a compiled loop over blocks); it must be a multiple of
        `block_size`. `parallel_blocks` picks the implementation as in
        `call`.

        Args:
            inputs: float tensor `(batch, k * block_size, width)`.
            state: a streaming state at a block boundary.
            padding_mask: optional bool `(batch, k * block_size)`.
            training: bool. Enables dropout.

        Returns:
            `(outputs, state)`.
        """
        mask = self._padding_mask(inputs, padding_mask)
        run = (
            self._run_blocks_parallel
            if self.parallel_blocks
            else (self._run_blocks)
        )
        outputs, state = run(inputs, mask, state, training)
        return outputs, self._returned_state(state, training)

    def run_partial_block(self, inputs, state, length, padding_mask=None):
        """The first `length` tokens of a block, in one call.

        `inputs` holds `block_size` rows starting at a block boundary (the
        state's position, possibly known only at run time); only the first
        `length < block_size` are real (a run-time scalar is fine): the
        state advances by `length` and the block stays open, so later
        tokens continue it. The outputs of the first `length` rows equal
        those of streaming the tokens; the other rows are meaningless.
        This is how a prompt's last, partial block is prefilled at once.

        Args:
            inputs: float tensor `(batch, block_size, width)`.
            state: a streaming state at a block boundary.
            length: int or int scalar tensor in `[0, block_size)`.
            padding_mask: optional bool `(batch, block_size)`.

        Returns:
            `(outputs, state)`.
        """
        mask = self._padding_mask(inputs, padding_mask)
        outputs, state = self._chunk_step(
            inputs, mask, state, 0, False, count=length
        )
        return outputs, self._returned_state(state, False)

    def summary_step(self, fam, training=None):
        """The layer's output on FAM rows alone: its FAM update over an
        empty block (the rows attend to all of themselves at the positions
        of an initial FAM, then the feedforward network). `FAMBackbone`
        derives the next layer's initial FAM with it.

        Args:
            fam: float tensor `(batch, fam_length, width)`.
            training: bool. Enables dropout.

        Returns:
            `(batch, fam_length, width)`.
        """
        memory = self.memory_segments * self.block_size
        fam_mask = ops.ones_like(fam[:, :, 0], dtype="bool")
        fam, _ = self.step(
            fam,
            self._fam_positions(0, 0),
            lambda key, value: (key, value, fam_mask),
            np.arange(self.fam_length),
            columns=slice(memory, memory + self.fam_length),
            training=training,
        )
        return fam

    def _returned_state(self, state, training):
        """The state handed back to the caller: an int32 position, and,
        unless training, no autograd history (`LayerState.detach`): a stream
        fed chunk by chunk outside `torch.no_grad()` would otherwise keep
        every earlier chunk's graph alive in the state."""
        state = {**state, "index": ops.cast(state["index"], "int32")}
        return state if training else self.state_spec.detach(state)

    def _padding_mask(self, inputs, padding_mask):
        if padding_mask is None:
            return ops.ones_like(inputs[:, :, 0], dtype="bool")
        return ops.cast(padding_mask, "bool")

    def get_initial_state(self, batch_size, fam=None, position_offset=0):
        """A fresh streaming state.

        Args:
            batch_size: int. Batch size.
            fam: optional `(batch, fam_length, width)` initial FAM. Defaults
                to the learned `initial_fam`.
            position_offset: int or scalar tensor added to every RoPE
                position (the paper's Random Position Offset). Defaults to
                `0`.

        Returns:
            A dict of tensors whose shapes depend only on the configuration
            and `batch_size`.
        """
        batch_size = check_batch_size(batch_size)
        spec = self.state_spec
        state = spec.zeros(batch_size, position_offset)
        if fam is None and self.fam_length:
            if not self.learned_initial_fam:
                raise ValueError(
                    "This layer has no learned initial FAM "
                    "(`learned_initial_fam=False`): pass `fam` or `state`. "
                    "Received: fam=None"
                )
            fam = ops.broadcast_to(
                self.initial_fam[None], spec.shapes(batch_size)["fam"][0]
            )
        if fam is not None:
            state["fam"] = ops.cast(fam, spec.fam_dtype)
        if self.fam_length:
            state["fam_key"], state["fam_value"] = self._fam_key_value(
                state["fam"], state["index"], state["position_offset"]
            )
        return state

    @property
    def state_spec(self):
        """The `LayerState` of this layer (shapes, checks, updates of its
        streaming state); available once the layer is built."""
        return LayerState(
            self.block_size,
            self.memory_segments,
            self.fam_length,
            self.hidden_dim,
            self.attention.num_key_value_heads,
            self.attention.head_dim,
            dtype=self.compute_dtype,
            # The carried FAM (and every residual add) stays at least
            # float32: in bfloat16 a growing FAM's updates fall below its
            # resolution and the memory freezes over a long stream.
            fam_dtype=max(self.compute_dtype, "float32", key=_float_bits),
        )

    def state_shapes(self, batch_size):
        """`{name: (shape, dtype)}` of a streaming state; nothing depends on
        the position (see `LayerState.shapes`)."""
        return self.state_spec.shapes(batch_size)

    def __call__(self, inputs, *args, **kwargs):
        if not (ops.is_tensor(inputs) or isinstance(inputs, keras.KerasTensor)):
            inputs = ops.convert_to_tensor(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def call(
        self,
        inputs,
        padding_mask=None,
        fam=None,
        state=None,
        return_fam=False,
        return_state=False,
        training=None,
        mask=None,
        state_index=None,
    ):
        self._check_inputs(
            inputs, mask if padding_mask is None else padding_mask, fam, state
        )
        inputs = ops.cast(inputs, self.compute_dtype)
        if state is not None:
            state = self.state_spec.cast(state)
        if state_index is not None:
            if state is None:
                raise ValueError(
                    "`state_index` is the position of a `state`: pass "
                    f"`state` too. Received: state_index={state_index!r}, "
                    "state=None"
                )
            state_index = check_int("state_index", state_index, minimum=0)
            state = {**state, "index": state_index}
        if padding_mask is None:
            padding_mask = mask
        if padding_mask is None:
            padding_mask = ops.ones_like(inputs[:, :, 0], dtype="bool")
        padding_mask = ops.cast(padding_mask, "bool")
        if state is None:
            state = self.get_initial_state(ops.shape(inputs)[0], fam=fam)
            state["index"] = 0  # Known at trace time: the fast path.
        outputs, state = self._stream(inputs, padding_mask, state, training)
        extras = []
        if return_fam:
            extras.append(state["fam"])
        if return_state:
            extras.append(self._returned_state(state, training))
        return (outputs, *extras) if extras else outputs

    def _check_inputs(self, inputs, padding_mask, fam, state):
        shape = tuple(inputs.shape)
        if len(shape) != 3 or shape[-1] != self.hidden_dim:
            raise ValueError(
                "`inputs` must have shape (batch, sequence, "
                f"{self.hidden_dim}). Received: inputs.shape={shape}"
            )
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            raise TypeError(
                "`inputs` must be a float tensor (embed token ids first). "
                f"Received: inputs.dtype={dtype}"
            )
        if shape[1] is None:
            raise ValueError(
                "`inputs` must have a static sequence length. "
                f"Received: inputs.shape={shape}"
            )
        if shape[1] == 0:
            raise ValueError(
                "`inputs` must hold at least one token. "
                f"Received: inputs.shape={shape}"
            )
        if padding_mask is not None:
            mask_shape = tuple(padding_mask.shape)
            if not shapes_match(mask_shape, shape[:2]):
                raise ValueError(
                    "`padding_mask` must have shape (batch, sequence) = "
                    f"{shape[:2]}. Received: padding_mask.shape={mask_shape}"
                )
        if fam is not None:
            if state is not None:
                raise ValueError(
                    "Pass either `fam` (start a new sequence from it) or "
                    "`state` (continue a sequence), not both."
                )
            expected = (shape[0], self.fam_length, self.hidden_dim)
            if not shapes_match(tuple(fam.shape), expected):
                raise ValueError(
                    f"`fam` must have shape {expected}. "
                    f"Received: fam.shape={tuple(fam.shape)}"
                )
        if state is not None:
            self.check_state(state, shape[0])

    def check_state(self, state, batch_size):
        """Raises a `ValueError` unless `state` is a streaming state of this
        layer for `batch_size` rows (`None` matches any)."""
        self.state_spec.check(state, batch_size)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def compute_output_spec(
        self,
        inputs,
        padding_mask=None,
        fam=None,
        state=None,
        return_fam=False,
        return_state=False,
        training=None,
        mask=None,
        state_index=None,
    ):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        specs = self.state_spec.specs(inputs.shape[0])
        extras = []
        if return_fam:
            extras.append(specs["fam"])
        if return_state:
            extras.append(specs)
        return (outputs, *extras) if extras else outputs

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        attention = self.attention
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "block_size": self.block_size,
            "memory_segments": self.memory_segments,
            "fam_length": self.fam_length,
            "num_key_value_heads": attention.num_key_value_heads,
            "head_dim": attention.head_dim,
            "intermediate_dim": self.intermediate_dim,
            "feedforward": self.feedforward_kind,
            "activation": self.activation,
            "normalization": self.normalization,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "sandwich_norm": self.sandwich_norm,
            "use_bias": self.use_bias,
            "qkv_bias": attention.qkv_bias,
            "query_key_norm": attention.query_key_norm is not None,
            "use_rope": attention.use_rope,
            "rope_max_wavelength": attention.rope_max_wavelength,
            "rope_scaling_factor": attention.rope_scaling_factor,
            "rope_frequency_scaling": attention.rope_frequency_scaling,
            "query_scale": attention.query_scale,
            "logit_soft_cap": attention.logit_soft_cap,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "attention_implementation": attention.attention_implementation,
            "learned_initial_fam": self.learned_initial_fam,
            "parallel_blocks": self.parallel_blocks,
            "fam_normalization": self.fam_normalization,
            "fam_write_gate": self.fam_write_gate,
            "fam_write_threshold": self.fam_write_threshold,
            "fam_write_threshold_jitter": self.fam_write_threshold_jitter,
        }


def _float_bits(dtype):
    """64 for float64, 32 for float32, 16 for (b)float16."""
    return int("".join(c for c in dtype if c.isdigit()))


def _finite_where_masked(keys, key_mask):
    """`keys` `(B, K, G, H)` with the non-finite entries of masked keys
    zeroed. Masking alone is not enough: a NaN or inf at a padded position
    would reach every row through `0 * NaN` in the attention kernels.
    Finite values are kept, so the (meaningless) outputs at padded
    positions are unchanged, and a NaN at a real position still shows."""
    keep = ops.logical_or(key_mask[:, :, None, None], ops.isfinite(keys))
    return ops.where(keep, keys, ops.zeros_like(keys))


# The `TransformerFAM` arguments a `keras_fam.models.FAMBackbone` passes to
# every layer unchanged and serialises with its own config (the backbone
# decides `use_rope`, `learned_initial_fam` and the initializer itself). A
# new layer argument is a backbone option as soon as it is in the layer's
# signature and `get_config`.
LAYER_OPTIONS = tuple(
    name
    for name in inspect.signature(TransformerFAM.__init__).parameters
    if name
    not in (
        "self",
        "kwargs",
        "use_rope",
        "learned_initial_fam",
        "kernel_initializer",
    )
)
