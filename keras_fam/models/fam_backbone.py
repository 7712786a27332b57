"""FAMBackbone: a KerasHub backbone made of TransformerFAM layers.

Shape letters: B batch, T tokens, D width (`hidden_dim`), F FAM length,
L layers, V vocabulary.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173.
"""

import inspect

import keras
import numpy as np
from keras import ops
from keras_hub.layers import PositionEmbedding, ReversibleEmbedding
from keras_hub.models import Backbone

from keras_fam.checks import (
    check_batch_size,
    check_bool,
    check_choice,
    check_int,
    check_known_arguments,
    check_positive,
    check_rate,
    check_right_padded,
    check_token_ids,
    concrete,
)
from keras_fam.layers.rms_normalization import (
    NORMALIZATIONS,
    normalization_layer,
)
from keras_fam.layers.transformer_fam import LAYER_OPTIONS, TransformerFAM
from keras_fam.training import (
    RandomPositionOffset,
    RandomStatePassing,
    StreamedStatePassing,
)

POSITION_EMBEDDINGS = ("rope", "learned")
LORA_TARGETS = (
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_gate_dense",
    "feedforward_output_dense",
)


@keras.saving.register_keras_serializable(package="keras_fam")
class FAMBackbone(Backbone):
    """TransformerFAM decoder backbone (token embedding, FAM layers, norm).

    A stack of `keras_fam.layers.TransformerFAM` layers: Block Sliding Window
    Attention with Feedback Attention Memory, so that memory and per-token
    compute stay constant however long the sequence is. Configurable to host
    Llama/Mistral (`normalization="rms_norm"`, `feedforward="gated"`,
    `activation="silu"`, untied embeddings), Gemma
    (`normalization="rms_norm_unit_offset"`,
    `activation="gelu_approximate"`, `embedding_scale=hidden_dim ** 0.5`,
    `sandwich_norm` and soft caps for Gemma 2) and GPT-2
    (`position_embedding="learned"`, `normalization="layer_norm"`,
    `feedforward="mlp"`, `use_bias=True`) checkpoints.

    Summary embeddings (paper appendix B.1; our choices where it is silent):
    the backbone owns `fam_summary_embedding` `(F, D)`, shared by all batch
    rows, added at the embedding lookup like a soft prompt (no embedding
    scale, no position embedding: they are not tokens). They reach each
    layer by ordinary forward propagation through the summary rows alone:
    layer 0's initial FAM is the summary embeddings; layer `l + 1`'s initial
    FAM is layer `l`'s output on the summary rows when those rows attend only
    to themselves (all of them, as FAM attends to FAM) and then go through
    the feedforward network - exactly the layer's FAM update over an empty
    block. So each layer starts from a representation suited to its depth,
    with no per-layer learned prefix (which the paper found worse) and with
    compute independent of the input. Each layer's first FAM update keeps its
    residual connection (the initial FAM, not a zero tensor, is added back).

    Training tricks (`keras_fam.training`), all off by default and active
    only with `training=True`: Random State Passing
    (`state_passing_probability`, `0.8` in the paper), streamed state
    passing (`training_streams`: every batch row continues its own token
    stream from its own final FAM of the previous step; the training data
    come from `keras_fam.training.streamed_dataset` and carry a
    `"stream_reset"` input) and Random Position Offset
    (`position_offset_probability`, `0.5` in the paper; RoPE only).

    LoRA: `enable_lora(rank)` puts Keras' own LoRA on the attention
    projections (`query`, `key`, `value`, `attention_output`) and the
    feedforward denses, freezes every other weight except the summary
    embeddings (new FAM parameters, trained too), so the trainable parameter
    count is `sum(rank * (kernel.size // kernel.shape[-1] + kernel.shape[-1])`
    `for every targeted kernel) + fam_length * hidden_dim`, plus the biases
    of the targeted layers when `use_bias=True` (Keras' LoRA freezes only the
    kernel, as in GPT-2 presets). Saving
    (`save_weights`, `save_to_preset`, `.keras`) merges the adapters into the
    kernels; `save_lora_weights` saves only the adapters and the summary
    embeddings.

    Args:
        vocabulary_size: int. Size of the token vocabulary.
        num_layers: int. Number of TransformerFAM layers.
        num_heads: int. Number of query heads.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of the feedforward hidden layer.
        block_size: int. Tokens per block. Defaults to `1024`.
        memory_segments: int. Previous blocks each block attends to.
            Defaults to `3`.
        fam_length: int. FAM vectors per layer; `0` gives TransformerBSWA.
            Defaults to `64`.
        num_key_value_heads: int. Key/value heads (grouped-query
            attention). Defaults to `num_heads`.
        head_dim: int. Size of each head. Defaults to
            `hidden_dim // num_heads`.
        feedforward: str. `"gated"` or `"mlp"`. Defaults to `"gated"`.
        activation: str. Feedforward activation. Defaults to `"silu"`.
        normalization: str. `"rms_norm"`, `"rms_norm_unit_offset"` or
            `"layer_norm"`, for every norm including the final one.
            Defaults to `"rms_norm"`.
        layer_norm_epsilon: float. Epsilon of every norm. Defaults to `1e-6`.
        sandwich_norm: bool. Gemma 2 post-attention/feedforward norms.
            Defaults to `False`.
        use_bias: bool. Biases in projections and feedforward. Defaults to
            `False`.
        qkv_bias: bool. Biases on the query, key and value projections
            only (Qwen 2). Defaults to `False`.
        query_key_norm: bool. Normalize each query and key head before RoPE
            (Qwen 3, Gemma 3), see `TransformerFAM`. Defaults to `False`.
        position_embedding: str. `"rope"` or `"learned"` (GPT-2 style, needs
            `max_sequence_length`; the total streamed length is then bounded
            by it). Defaults to `"rope"`.
        max_sequence_length: int or `None`. Size of the learned position
            table. Defaults to `None`.
        rope_max_wavelength: float, or a list of one float per layer
            (Gemma 3's local and global layers). RoPE base. Defaults to
            `10000`.
        rope_scaling_factor: float, or a list of one float per layer.
            Linear RoPE scaling. Defaults to `1.0`.
        rope_frequency_scaling: `None` or a dict of Llama 3.1 RoPE frequency
            scaling (`factor`, `low_freq_factor`, `high_freq_factor`,
            `original_max_position_embeddings`). Defaults to `None`.
        query_scale: float or `None`. Attention logit scale. Defaults to
            `head_dim ** -0.5`.
        logit_soft_cap: float or `None`. Attention logit soft cap. Defaults
            to `None`.
        final_logit_soft_cap: float or `None`. Output logit soft cap, applied
            by `FAMCausalLM` (Gemma 2). Defaults to `None`.
        embedding_scale: float or `None`. Multiplies the token embeddings
            (Gemma: `hidden_dim ** 0.5`). Defaults to `None`.
        tie_word_embeddings: bool. Output projection shares the token
            embedding matrix. Defaults to `True`.
        dropout: float. Dropout rate on embeddings and in every layer.
            Defaults to `0.0`.
        fam_normalization: bool. Every layer rescales its carried FAM to
            unit RMS after each block (`TransformerFAM`'s
            `fam_normalization`; not in the paper). Keeps a model trained
            from scratch on short sequences stable over long ones. It
            changes the paper's FAM update, so leave it off to use a
            converted preset as it is; turn it on when fine-tuning a
            converted model for long streams, as
            `examples/passkey_retrieval.py` does. Defaults to `False`.
        fam_write_gate: `None`, `"soft"` or `"hard"`. Every layer scales
            its FAM update by the share of the FAM's attention on the block
            (`TransformerFAM`'s `fam_write_gate`; not in the paper; no
            weights). Defaults to `None` (the paper's update).
        fam_write_threshold: `None` or a float in `(0, 1)`. With the hard
            gate, a fixed write-share threshold instead of the per-key one
            (`TransformerFAM`'s `fam_write_threshold`). Defaults to `None`.
        state_passing_probability: float. Random State Passing probability
            (training only). Defaults to `0.0` (off).
        training_streams: int or `None`. Train on this many parallel
            token streams with per-row state passing
            (`keras_fam.training.StreamedStatePassing`): every training
            batch must have this many rows and a `"stream_reset"` input.
            Cannot be combined with `state_passing_probability`. Defaults to
            `None` (off).
        position_offset_probability: float. Probability that the Random
            Position Offset of a training step is non-zero. Defaults to `0.0`
            (off).
        max_position_offset: int or `None`. Offsets are uniform in
            `[0, max_position_offset)`. Defaults to `rope_max_wavelength` (its
            largest value for a per-layer list).
        seed: int or `None`. Seed of the training tricks' random draws.
            Defaults to `None`.
        dtype: dtype policy of the model. Defaults to `None`.
        **kwargs: base `keras_hub.models.Backbone` arguments (`name`...).

    Call arguments:
        inputs: dict with `"token_ids"` (int `(B, T)`) and `"padding_mask"`
            (`(B, T)`, `1` for real tokens; optional). Rows are
            right-padded: blocks (and FAM updates) are counted from a
            row's first position, so a mask with a `0` before a `1` is
            rejected with a `ValueError` wherever its values are known
            (eager calls, `stream`, and `FAMCausalLM.generate` /
            `score`); inside a compiled function (a `fit` step) it cannot
            be read and right padding is assumed (KerasHub's
            preprocessors pad on the right).
        training: bool. Dropout and the training tricks.

    Returns:
        The final-normed hidden states `(B, T, hidden_dim)`.

    Example:

    >>> backbone = FAMBackbone(vocabulary_size=100, num_layers=2,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, block_size=8,
    ...     memory_segments=1, fam_length=2)
    >>> ids = np.ones((1, 20), "int32")
    >>> hidden = backbone({"token_ids": ids, "padding_mask": ids})

    References:
        Hwang et al., "TransformerFAM: Feedback attention is working
        memory", arXiv 2404.09173.
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        block_size=1024,
        memory_segments=3,
        fam_length=64,
        num_key_value_heads=None,
        head_dim=None,
        feedforward="gated",
        activation="silu",
        normalization="rms_norm",
        layer_norm_epsilon=1e-6,
        sandwich_norm=False,
        use_bias=False,
        qkv_bias=False,
        query_key_norm=False,
        position_embedding="rope",
        max_sequence_length=None,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        rope_frequency_scaling=None,
        query_scale=None,
        logit_soft_cap=None,
        final_logit_soft_cap=None,
        embedding_scale=None,
        tie_word_embeddings=True,
        dropout=0.0,
        fam_normalization=False,
        state_passing_probability=0.0,
        position_offset_probability=0.0,
        max_position_offset=None,
        seed=None,
        training_streams=None,
        dtype=None,
        **kwargs,
    ):
        # Misspelled or unknown arguments are an error, not ignored.
        check_known_arguments(
            "FAMBackbone",
            {
                name: value
                for name, value in kwargs.items()
                if name not in LAYER_OPTIONS
            },
            BACKBONE_ARGUMENTS,
        )
        dropout = check_rate("dropout", dropout)
        vocabulary_size = check_int("vocabulary_size", vocabulary_size)
        num_layers = check_int("num_layers", num_layers)
        hidden_dim = check_int("hidden_dim", hidden_dim)
        intermediate_dim = check_int("intermediate_dim", intermediate_dim)
        check_choice(
            "position_embedding", position_embedding, POSITION_EMBEDDINGS
        )
        check_choice("normalization", normalization, NORMALIZATIONS)
        tie_word_embeddings = check_bool(
            "tie_word_embeddings", tie_word_embeddings
        )
        final_logit_soft_cap = check_positive(
            "final_logit_soft_cap", final_logit_soft_cap, optional=True
        )
        embedding_scale = check_positive(
            "embedding_scale", embedding_scale, optional=True
        )
        if seed is not None:
            seed = check_int("seed", seed, minimum=None)
        if training_streams is not None:
            training_streams = check_int("training_streams", training_streams)
        if max_position_offset is not None:
            check_positive("max_position_offset", max_position_offset)
        if position_embedding == "learned":
            max_sequence_length = check_int(
                "max_sequence_length", max_sequence_length
            )
            if position_offset_probability:
                raise ValueError(
                    "Random Position Offset shifts RoPE positions and needs "
                    '`position_embedding="rope"`. Received: '
                    f"position_offset_probability={position_offset_probability}"
                    ' with position_embedding="learned"'
                )
        elif max_sequence_length is not None:
            max_sequence_length = check_int(
                "max_sequence_length", max_sequence_length
            )
        if training_streams is not None:
            if not fam_length:
                raise ValueError(
                    "`training_streams` carries the FAM between training "
                    "steps and needs `fam_length > 0`. Received: "
                    f"training_streams={training_streams!r} with fam_length=0"
                )
            if state_passing_probability:
                raise ValueError(
                    "Use either Random State Passing "
                    "(`state_passing_probability`) or streamed state passing "
                    "(`training_streams`), not both. Received: "
                    f"state_passing_probability={state_passing_probability}, "
                    f"training_streams={training_streams!r}"
                )
        wavelengths = _per_layer(
            "rope_max_wavelength", rope_max_wavelength, num_layers
        )
        scaling_factors = _per_layer(
            "rope_scaling_factor", rope_scaling_factor, num_layers
        )
        # The layers' options, passed to every layer and serialised as one
        # unit. Any other `TransformerFAM` argument given to the backbone
        # (see `LAYER_OPTIONS`) joins them.
        layer_options = dict(
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            block_size=block_size,
            memory_segments=memory_segments,
            fam_length=fam_length,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            feedforward=feedforward,
            activation=activation,
            normalization=normalization,
            layer_norm_epsilon=layer_norm_epsilon,
            sandwich_norm=sandwich_norm,
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            query_key_norm=query_key_norm,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            rope_frequency_scaling=rope_frequency_scaling,
            query_scale=query_scale,
            logit_soft_cap=logit_soft_cap,
            dropout=dropout,
            fam_normalization=fam_normalization,
        )
        for name in list(kwargs):
            if name in LAYER_OPTIONS:
                layer_options[name] = kwargs.pop(name)
        self.layer_options = layer_options
        # === Layers ===
        policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=policy,
            name="token_embedding",
        )
        self.position_embedding = None
        if position_embedding == "learned":
            self.position_embedding = PositionEmbedding(
                sequence_length=max_sequence_length,
                initializer=keras.initializers.RandomNormal(stddev=0.02),
                dtype=policy,
                name="position_embedding",
            )
        self.embeddings_dropout = keras.layers.Dropout(
            dropout, dtype=policy, name="embeddings_dropout"
        )
        self.transformer_layers = []
        for index in range(num_layers):
            self.transformer_layers.append(
                TransformerFAM(
                    **{
                        **layer_options,
                        # Per-layer values (a list in the config).
                        "rope_max_wavelength": wavelengths[index],
                        "rope_scaling_factor": scaling_factors[index],
                    },
                    use_rope=position_embedding == "rope",
                    learned_initial_fam=False,
                    dtype=policy,
                    name=f"transformer_layer_{index}",
                )
            )
        # NumPy scalars (np.int64(4) ...) are stored as the layers stored
        # them, as Python values, so the config stays JSON-serialisable.
        checked = self.transformer_layers[0].get_config()
        for name, value in layer_options.items():
            if isinstance(value, np.generic):
                layer_options[name] = checked[name]
            elif isinstance(value, (list, tuple)):
                layer_options[name] = [_python(v) for v in value]
        self.layer_options = layer_options
        self.layer_norm = normalization_layer(
            normalization, layer_norm_epsilon, dtype=policy, name="layer_norm"
        )
        self.state_passing = RandomStatePassing(
            num_layers=num_layers,
            fam_length=fam_length,
            hidden_dim=hidden_dim,
            probability=state_passing_probability,
            seed=seed,
            dtype=policy,
            name="state_passing",
        )
        self.stream_passing = None
        if training_streams is not None:
            self.stream_passing = StreamedStatePassing(
                num_layers=num_layers,
                fam_length=fam_length,
                hidden_dim=hidden_dim,
                streams=training_streams,
                dtype=policy,
                name="stream_passing",
            )
        self.position_offset = RandomPositionOffset(
            max_offset=(
                max(wavelengths)
                if max_position_offset is None
                else max_position_offset
            ),
            probability=position_offset_probability,
            seed=None if seed is None else seed + 1,
            dtype=policy,
            name="position_offset",
        )

        # === Build ===
        self.token_embedding.build((None, None))
        sequence_shape = (None, None, hidden_dim)
        if self.position_embedding is not None:
            self.position_embedding.build(sequence_shape)
        for layer in self.transformer_layers:
            layer.build(sequence_shape)
        self.layer_norm.build(sequence_shape)
        self.state_passing.build()
        if self.stream_passing is not None:
            self.stream_passing.build()

        # === Functional Model ===
        # KerasHub backbones are functional models (KerasHub turns the base
        # class functional for the whole process as soon as any of its models
        # is built); the graph holds the stack, `call` below adds the FAM.
        token_id_input = keras.Input(
            shape=(None,), dtype="int32", name="token_ids"
        )
        padding_mask_input = keras.Input(
            shape=(None,), dtype="int32", name="padding_mask"
        )
        x = self.token_embedding(token_id_input)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x)
        x = self.embeddings_dropout(x)
        for layer in self.transformer_layers:
            x = layer(x, padding_mask=padding_mask_input)
        super().__init__(
            inputs={
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
            },
            outputs=self.layer_norm(x),
            dtype=dtype,
            **kwargs,
        )
        # Track the layers outside the graph.
        self.state_passing = self.state_passing
        self.stream_passing = self.stream_passing
        self.position_offset = self.position_offset
        self.fam_summary_embedding = self.add_weight(
            name="fam_summary_embedding",
            shape=(fam_length, hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            # Empty for BSWA: nothing to train (and no "gradients do not
            # exist" warning from the optimizer).
            trainable=bool(fam_length),
        )
        self.built = True

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        # Every layer option is also readable as an attribute
        # (`backbone.block_size` ...).
        for name, value in layer_options.items():
            setattr(self, name, value)
        attention = self.transformer_layers[0].attention
        self.num_key_value_heads = attention.num_key_value_heads
        self.head_dim = attention.head_dim
        self.position_embedding_type = position_embedding
        self.max_sequence_length = max_sequence_length
        self.final_logit_soft_cap = final_logit_soft_cap
        self.embedding_scale = embedding_scale
        self.tie_word_embeddings = tie_word_embeddings
        self.state_passing_probability = state_passing_probability
        self.position_offset_probability = position_offset_probability
        self.max_position_offset = max_position_offset
        self.seed = seed
        self.training_streams = training_streams

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A FAM backbone from a KerasHub preset.

        A FAM preset (saved by `save_to_preset`) loads as is; a preset of a
        supported family (Gemma, Gemma 2, Llama, Llama 3, Mistral, GPT-2) is
        loaded with KerasHub's own loader and converted, reusing its weights
        (see `keras_fam.models.presets`).

        Args:
            preset: str. A built-in preset name, a local directory,
                `kaggle://` or `hf://` handle.
            load_weights: bool. Load (and convert) the weights.
            **kwargs: `dtype`, and FAM or training arguments that override
                the preset's (`block_size`, `memory_segments`, `fam_length`,
                `dropout` ...).
        """
        from keras_fam.models import presets

        return presets.backbone_from_preset(
            cls, preset, load_weights=load_weights, **kwargs
        )

    @property
    def input_spec(self):
        # `call` checks its own inputs: `padding_mask` may be left out.
        return None

    @input_spec.setter
    def input_spec(self, value):
        pass

    # === Embedding and initial FAM ===

    def embed(self, token_ids, start_index=0, training=None):
        """Token ids `(B, T)` -> input of the first layer `(B, T, D)`.

        `start_index` is the absolute position of the first token (used by
        learned position embeddings).
        """
        x = self.token_embedding(token_ids)
        if self.embedding_scale is not None:
            x = x * ops.cast(self.embedding_scale, x.dtype)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x, start_index=start_index)
        return self.embeddings_dropout(x, training=training)

    def initial_fams(self, batch_size, training=None):
        """The initial FAM of every layer, `L` tensors `(B, F, D)`.

        Propagates the summary embeddings through the layers as described in
        the class docstring; all batch rows share them.
        """
        if not self.fam_length:
            return [None] * self.num_layers
        carried = self.transformer_layers[0].state_spec.fam_dtype  # float32+
        fam = ops.cast(self.fam_summary_embedding, carried)[None]
        fams = []
        for index, layer in enumerate(self.transformer_layers):
            fams.append(fam)
            if index + 1 < self.num_layers:
                fam = layer.summary_step(fam, training=training)
        shape = (batch_size, self.fam_length, self.hidden_dim)
        return [ops.broadcast_to(fam, shape) for fam in fams]

    # === Forward pass (training, scoring) ===

    def call(self, inputs, training=None):
        token_ids, padding_mask = self.check_inputs(inputs)
        batch_size = ops.shape(token_ids)[0]
        x = self.embed(token_ids, training=training)
        fams = self.initial_fams(batch_size, training=training)
        fams = self.state_passing.select(fams, training=training)
        if self.stream_passing is not None:
            fams = self.stream_passing.select(
                fams, inputs.get("stream_reset"), training=training
            )
        offset = self.position_offset.sample(training=training)
        final_fams = []
        for layer, fam in zip(self.transformer_layers, fams, strict=True):
            if isinstance(offset, int) and offset == 0:
                x, final = layer(
                    x,
                    padding_mask=padding_mask,
                    fam=fam,
                    return_fam=True,
                    training=training,
                )
            else:
                state = layer.get_initial_state(
                    batch_size, fam=fam, position_offset=offset
                )
                x, final = layer(
                    x,
                    padding_mask=padding_mask,
                    state=state,
                    state_index=0,  # Known when traced: the fused path.
                    return_fam=True,
                    training=training,
                )
            final_fams.append(final)
        self.state_passing.update(final_fams, training=training)
        if self.stream_passing is not None:
            self.stream_passing.update(final_fams, training=training)
        return self.layer_norm(x)

    # === Streaming (generation, long documents) ===

    def get_initial_state(self, batch_size, position_offset=0):
        """A fresh streaming state: a tuple with one fixed-size state dict
        per layer (see `TransformerFAM.get_initial_state`).

        Args:
            batch_size: int. Batch size.
            position_offset: int or scalar tensor added to every RoPE
                position. Defaults to `0` (inference).
        """
        batch_size = check_batch_size(batch_size)
        fams = self.initial_fams(batch_size)
        return tuple(
            layer.get_initial_state(
                batch_size, fam=fam, position_offset=position_offset
            )
            for layer, fam in zip(self.transformer_layers, fams, strict=True)
        )

    def stream(
        self,
        token_ids,
        state,
        padding_mask=None,
        training=None,
        layer_intercept_fn=None,
    ):
        """Continue the sequence of `state` with `token_ids` `(B, C)`.

        Any chunk length `C` at any position: whole blocks go through the
        layers' fused block step, the rest token-exactly through their
        streaming step. The result equals the matching rows of the full
        forward pass.

        Args:
            token_ids: int tensor `(B, C)`.
            state: from `get_initial_state()` or a previous `stream()`.
            padding_mask: optional `(B, C)`, `1` for real tokens.
            training: bool. Dropout.
            layer_intercept_fn: optional `fn(x, index) -> x` called on the
                embedded chunk (`index=-1`) and on each layer's output
                (`index` 0 to `num_layers - 1`); what it returns goes on
                (KerasHub's `score` hook). Defaults to `None`.

        Returns:
            `(hidden_states, state)`: final-normed `(B, C, D)` and the new
            state (same shapes as the old one).
        """
        token_ids, padding_mask = self.check_inputs(
            {"token_ids": token_ids, "padding_mask": padding_mask}
        )
        self.check_state(state, ops.shape(token_ids)[0])
        position = concrete(state[0]["index"])
        if self.position_embedding is not None and position is not None:
            end = int(position) + token_ids.shape[1]
            if end > self.max_sequence_length:
                raise ValueError(
                    "With learned position embeddings a stream may hold at "
                    f"most max_sequence_length={self.max_sequence_length} "
                    f"tokens. Received: token_ids reaching position {end}"
                )
        if layer_intercept_fn is None:

            def layer_intercept_fn(x, index):
                return x

        x = self.embed(token_ids, start_index=state[0]["index"])
        x = layer_intercept_fn(x, -1)
        new_state = []
        for index, (layer, layer_state) in enumerate(
            zip(self.transformer_layers, state, strict=True)
        ):
            x, layer_state = layer(
                x,
                padding_mask=padding_mask,
                state=layer_state,
                return_state=True,
                training=training,
            )
            x = layer_intercept_fn(x, index)
            new_state.append(layer_state)
        return self.layer_norm(x), tuple(new_state)

    def stream_block(self, token_ids, state):
        """Feed whole blocks `token_ids` `(B, k * block_size)` that start at a
        block boundary (`state`'s position is a multiple of `block_size`,
        possibly only known at run time) through every layer's fused block
        step. Returns `(hidden_states, state)` like `stream`.

        `stream` picks this path by itself when the position is known at
        trace time; inside a compiled loop it is not, and `stream` would take
        the (equal, slower) token-by-token path.
        """
        x = self.embed(token_ids, start_index=state[0]["index"])
        new_state = []
        for layer, layer_state in zip(
            self.transformer_layers, state, strict=True
        ):
            x, layer_state = layer.run_blocks(x, layer_state)
            new_state.append(layer_state)
        return self.layer_norm(x), tuple(new_state)

    def prefill(self, token_ids, state, length):
        """Feed the first `length` tokens of `token_ids` `(B, T)` into a
        fresh `state`: whole blocks one per loop iteration
        (`prefill_blocks`), then the last partial block in one call of each
        layer's `run_partial_block`. `length` may be a run-time scalar
        (inside a compiled `generate`); nothing grows with it.

        Returns:
            The state after `length` tokens.
        """
        size = self.block_size
        batch_size = ops.shape(token_ids)[0]
        length = ops.cast(length, "int32")
        num_blocks = length // size
        state = self.prefill_blocks(token_ids, state, num_blocks)
        # One block of ids from the partial block's start; padded so the
        # slice stays inside `token_ids` (a clamped slice would shift it).
        padded = ops.pad(token_ids, ((0, 0), (0, size)))
        start = num_blocks * size
        ids = ops.slice(padded, (0, start), (batch_size, size))
        x = self._embed_block(ids, start)
        new_state = []
        for layer, layer_state in zip(
            self.transformer_layers, state, strict=True
        ):
            x, layer_state = layer.run_partial_block(
                x, layer_state, length - start
            )
            new_state.append(layer_state)
        return tuple(new_state)

    def _embed_block(self, token_ids, start_index):
        """`embed` of one block at a run-time position; learned positions
        past the table (rows after the real tokens) are clipped to its last
        row instead of shifting the whole slice."""
        if self.position_embedding is None:
            return self.embed(token_ids)
        x = self.token_embedding(token_ids)
        if self.embedding_scale is not None:
            x = x * ops.cast(self.embedding_scale, x.dtype)
        positions = ops.minimum(
            start_index + ops.arange(token_ids.shape[1], dtype="int32"),
            self.max_sequence_length - 1,
        )
        table = self.position_embedding.position_embeddings
        return x + ops.cast(ops.take(table, positions, axis=0), x.dtype)

    def prefill_blocks(self, token_ids, state, num_blocks):
        """Feed the first `num_blocks` whole blocks of `token_ids` `(B, T)`
        into a fresh `state`, one block per loop iteration.

        `num_blocks` may be a run-time scalar (inside a compiled `generate`);
        nothing that grows with `num_blocks` is materialised: each iteration
        slices one block of token ids and runs it through `stream_block`.
        """
        size = self.block_size
        batch_size = ops.shape(token_ids)[0]

        def body(block, state):
            ids = ops.slice(token_ids, (0, block * size), (batch_size, size))
            _, state = self.stream_block(ids, state)
            return block + 1, state

        _, state = ops.while_loop(
            lambda block, state: block < num_blocks,
            body,
            (ops.convert_to_tensor(0, "int32"), state),
        )
        return state

    def check_state(self, state, batch_size=None):
        """Raises a `ValueError` unless `state` fits this backbone."""
        if not isinstance(state, (tuple, list)) or len(state) != len(
            self.transformer_layers
        ):
            received = (
                f"a sequence of {len(state)} layer states"
                if isinstance(state, (tuple, list))
                else type(state).__name__
            )
            raise ValueError(
                "`state` must hold one layer state per layer "
                f"({self.num_layers}), as returned by "
                "`get_initial_state()`; it comes from another model. "
                f"Received: {received}"
            )
        if batch_size is None:
            batch_size = ops.shape(state[0]["fam"])[0]
        for layer, layer_state in zip(
            self.transformer_layers, state, strict=True
        ):
            layer.check_state(layer_state, batch_size)

    # === Input checks ===

    def check_inputs(self, inputs):
        """Checks a `{"token_ids", "padding_mask"}` dict (raising a
        `ValueError`/`TypeError` naming the bad argument) and returns
        `(token_ids, padding_mask)`, the mask as bool (all `True` when not
        given).

        Shapes and dtypes are always checked; values (ids in
        `[0, vocabulary_size)`, right padding) only where they are known:
        not inside a compiled function."""
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            received = (
                sorted(inputs) if isinstance(inputs, dict) else type(inputs)
            )
            raise ValueError(
                "`inputs` must be a dict with keys 'token_ids' and "
                f"'padding_mask'. Received: {received}"
            )
        token_ids = inputs["token_ids"]
        if not hasattr(token_ids, "dtype"):
            token_ids = ops.convert_to_tensor(token_ids)
        dtype = keras.backend.standardize_dtype(token_ids.dtype)
        if "int" not in dtype:
            if not _in_symbolic_scope():
                raise TypeError(
                    "`token_ids` must be an integer tensor. "
                    f"Received: token_ids.dtype={dtype}"
                )
            # Shape inference only (no values): under a `tf.distribute`
            # strategy Keras builds the compiled loss and metrics from a
            # batch averaged across replicas, which makes the ids floats.
            token_ids = ops.cast(token_ids, "int32")
        shape = tuple(token_ids.shape)
        if len(shape) != 2:
            raise ValueError(
                "`token_ids` must have shape (batch, sequence). "
                f"Received: token_ids.shape={shape}"
            )
        if shape[1] == 0:
            raise ValueError(
                "`token_ids` must hold at least one token. "
                f"Received: token_ids.shape={shape}"
            )
        # Values are checked where they are known (eager calls, `generate`,
        # `score`, `stream`); inside a compiled function they are not, and
        # an id >= vocabulary_size gives NaN on JAX (see the README).
        check_token_ids(token_ids, self.vocabulary_size)
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        else:
            if not hasattr(padding_mask, "shape"):
                padding_mask = ops.convert_to_tensor(padding_mask)
            mask_shape = tuple(padding_mask.shape)
            if len(mask_shape) != 2 or any(
                a is not None and b is not None and a != b
                for a, b in zip(mask_shape, shape, strict=True)
            ):
                raise ValueError(
                    "`padding_mask` must have the shape of `token_ids` "
                    f"{shape}. Received: padding_mask.shape={mask_shape}"
                )
            check_right_padded(padding_mask)
            padding_mask = ops.cast(padding_mask, "bool")
        if self.position_embedding is not None and shape[1] is not None:
            if shape[1] > self.max_sequence_length:
                raise ValueError(
                    "With learned position embeddings a sequence may hold "
                    f"at most max_sequence_length={self.max_sequence_length}"
                    f" tokens. Received: token_ids.shape={shape}"
                )
        return token_ids, padding_mask

    # === Distribution ===

    @classmethod
    def get_layout_map(
        cls,
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` for `ModelParallel` training.

        The sharding of KerasHub's `LlamaBackbone.get_layout_map` (the Gemma
        team's training configuration), on this backbone's weight paths:

        ```
        weight (shape)                                layout
        token_embedding/embeddings (V, D)             (model, batch)
        token_embedding/reverse_embeddings (D, V)     (batch, model)
        .../attention/{query,key,value}/kernel (D, N, H)
                                                      (model, batch, None)
        .../attention/attention_output/kernel (N, H, D)
                                                      (model, None, batch)
        .../feedforward_{intermediate,gate}_dense/kernel (D, I)
                                                      (batch, model)
        .../feedforward_output_dense/kernel (I, D)    (model, batch)
        ```

        Everything else (norms, biases, the `(F, D)` summary embeddings,
        LoRA factors, the Random State Passing variables) is replicated.
        Each sharded dimension must divide by the size of its mesh axis
        (with grouped-query attention, `num_key_value_heads` by the data
        axis).

        Args:
            device_mesh: `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: str. Mesh axis the weights are split
                on. Defaults to `"model"`.
            data_parallel_dim_name: str. Mesh axis the batch is split on.
                Defaults to `"batch"`.

        Returns:
            A `keras.distribution.LayoutMap`.

        Example:

        >>> mesh = keras.distribution.DeviceMesh(
        ...     (1, 2), ("batch", "model"), keras.distribution.list_devices())
        >>> distribution = keras.distribution.ModelParallel(
        ...     layout_map=FAMBackbone.get_layout_map(mesh),
        ...     batch_dim_name="batch")
        >>> with distribution.scope():
        ...     backbone = FAMBackbone(...)
        """
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(
                "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
                f"Received: device_mesh={type(device_mesh).__name__}"
            )
        for name, value in (
            ("model_parallel_dim_name", model_parallel_dim_name),
            ("data_parallel_dim_name", data_parallel_dim_name),
        ):
            if value not in device_mesh.axis_names:
                raise ValueError(
                    f"`{name}` must be one of the mesh axis names "
                    f"{list(device_mesh.axis_names)}. "
                    f"Received: {name}={value!r}"
                )
        model_dim, data_dim = model_parallel_dim_name, data_parallel_dim_name
        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map["token_embedding/embeddings"] = (model_dim, data_dim)
        layout_map["token_embedding/reverse_embeddings"] = (data_dim, model_dim)
        layout_map["transformer_layer.*attention.*(query|key|value).kernel"] = (
            model_dim,
            data_dim,
            None,
        )
        layout_map["transformer_layer.*attention_output.kernel"] = (
            model_dim,
            None,
            data_dim,
        )
        for name in ("intermediate", "gate"):
            layout_map[
                f"transformer_layer.*feedforward_{name}_dense.kernel"
            ] = (
                data_dim,
                model_dim,
            )
        layout_map["transformer_layer.*feedforward_output_dense.kernel"] = (
            model_dim,
            data_dim,
        )
        return layout_map

    # === LoRA ===

    def default_lora_layer_names(self):
        """Attention projections and feedforward denses (the paper adapts
        attention and feedforward layers)."""
        return list(LORA_TARGETS)

    def enable_lora(self, rank, target_layer_names=None, target_names=None):
        """Enable Keras' LoRA on the attention and feedforward layers.

        Freezes every weight except the LoRA factors and the summary
        embeddings (see the class docstring for the trainable count).

        Args:
            rank: int. LoRA rank.
            target_layer_names: list of sublayer names among
                `default_lora_layer_names()`. Defaults to all of them.
            target_names: alias of `target_layer_names`.
        """
        check_int("rank", rank)
        if target_names is not None:
            if target_layer_names is not None:
                raise ValueError(
                    "Pass `target_layer_names` or `target_names`, not both."
                )
            target_layer_names = target_names
        if target_layer_names is not None:
            unknown = sorted(set(target_layer_names) - set(LORA_TARGETS))
            if unknown:
                raise ValueError(
                    f"`target_layer_names` must be among {LORA_TARGETS}. "
                    f"Received unknown names: {unknown}"
                )
            target_layer_names = list(target_layer_names)
        super().enable_lora(rank, target_layer_names=target_layer_names)

    def save_lora_weights(self, filepath):
        """Save the LoRA factors and the summary embeddings only
        (`filepath` ends in `.lora.h5`)."""
        super().save_lora_weights(filepath)
        import h5py

        with h5py.File(filepath, "a") as file:
            file["fam/fam_summary_embedding"] = ops.convert_to_numpy(
                self.fam_summary_embedding
            )

    def load_lora_weights(self, filepath):
        """Load what `save_lora_weights` saved (enables LoRA if needed)."""
        super().load_lora_weights(filepath)
        import h5py

        with h5py.File(filepath, "r") as file:
            if "fam/fam_summary_embedding" in file:
                value = file["fam/fam_summary_embedding"][()]
                if value.shape != tuple(self.fam_summary_embedding.shape):
                    raise ValueError(
                        f"`filepath` {filepath} holds summary embeddings of "
                        f"shape {value.shape}; this model's are "
                        f"{tuple(self.fam_summary_embedding.shape)}."
                    )
                self.fam_summary_embedding.assign(value)

    # === The hard write gate's threshold ===

    def set_fam_write_threshold(self, threshold):
        """Set every layer's `fam_write_threshold` (and the config's).

        The hard gate's threshold is not a weight, so it can be chosen
        after training, e.g. on validation data when the model was trained
        with `fam_write_threshold_jitter` (any value inside the jittered
        range is one the model was trained to work at;
        `keras_fam.training.calibrate_write_threshold` picks one).
        Functions compiled before keep the old value: use
        `FAMCausalLM.set_fam_write_threshold`, which drops the task's
        compiled functions, and build new `FAMStreamer`s.

        Args:
            threshold: `None` (the per-key threshold) or a float in
                `(0, 1)`.
        """
        if self.layer_options.get("fam_write_gate") != "hard":
            raise ValueError(
                '`set_fam_write_threshold` needs `fam_write_gate="hard"`. '
                "Received: fam_write_gate="
                f"{self.layer_options.get('fam_write_gate')!r}"
            )
        for layer in self.transformer_layers:
            layer.set_fam_write_threshold(threshold)
        self.layer_options["fam_write_threshold"] = self.transformer_layers[
            0
        ].fam_write_threshold

    # === Config ===

    def get_config(self):
        options = dict(self.layer_options)
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            **options,
            "position_embedding": self.position_embedding_type,
            "max_sequence_length": self.max_sequence_length,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "embedding_scale": self.embedding_scale,
            "tie_word_embeddings": self.tie_word_embeddings,
            "state_passing_probability": self.state_passing_probability,
            "position_offset_probability": self.position_offset_probability,
            "max_position_offset": self.max_position_offset,
            "seed": self.seed,
            "training_streams": self.training_streams,
        }


def _in_symbolic_scope():
    """Whether Keras is inferring output shapes (`compute_output_spec`),
    where tensors have no values."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return in_symbolic_scope()


def _python(value):
    """A NumPy scalar as the Python value it holds."""
    return value.item() if isinstance(value, np.generic) else value


def _per_layer(name, value, num_layers):
    """A positive number or one per layer -> a list of `num_layers`
    floats."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(
                f"`{name}` must be a number or a list of one number per "
                f"layer ({num_layers}). Received: {name}={value!r}"
            )
        return [
            check_positive(f"{name}[{index}]", v)
            for index, v in enumerate(value)
        ]
    return [check_positive(name, value)] * num_layers


# Every argument `FAMBackbone(...)` accepts: its own, the layer options it
# passes on, and the base `keras.Model` arguments a saved config holds.
BACKBONE_ARGUMENTS = frozenset(
    [
        name
        for name in inspect.signature(FAMBackbone.__init__).parameters
        if name not in ("self", "kwargs")
    ]
    + list(LAYER_OPTIONS)
    + ["name", "trainable"]
)
