"""FAMCausalLM: a KerasHub causal language model with a constant-size cache.

Shape letters: B batch, T tokens, D width, V vocabulary.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173.
"""

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM

from keras_fam.checks import check_bool, check_choice, check_int, concrete
from keras_fam.models.fam_backbone import FAMBackbone
from keras_fam.models.fam_causal_lm_preprocessor import (
    FAMCausalLMPreprocessor,
)
from keras_fam.ops import dispatch


@keras.saving.register_keras_serializable(package="keras_fam")
class FAMCausalLM(CausalLM):
    """End-to-end TransformerFAM model for causal language modeling.

    `model.fit` trains next-token prediction on the full sequence (the
    backbone's fused block path); `generate()` samples with any KerasHub
    sampler that uses the base `Sampler` loop (`"greedy"`, `"top_k"`,
    `"top_p"`, `"random"`; not beam or contrastive search).

    The generation cache is the backbone's streaming state: for each layer
    the keys/values of the last `memory_segments` blocks, the current block
    and the FAM. Its size does not depend on the position, and the FAM
    update at a block boundary happens inside the compiled generation loop
    (`ops.cond` in the layer's one-token step). Per-token cost is constant.

    Prefill: KerasHub pads prompts to `max_length` and the sampler starts at
    the shortest prompt's end. `generate_step` feeds every token before that
    point first (`FAMBackbone.prefill`): the whole blocks with a loop over
    blocks (one block of token ids sliced, embedded and run through every
    layer's fused block step per iteration), then the last, partial block in
    one call of each layer (`TransformerFAM.run_partial_block`). So besides
    the token ids (`(B, max_length)`, which KerasHub's `generate` owns)
    nothing grows with the prompt, and the sampler loop runs one step per
    generated token (and per prompt token of rows longer than the shortest
    one; the sampler keeps prompt tokens where `padding_mask` is true).
    Prompts must hold at least one token (for example a start token).

    `max_length`: with a preprocessor it is the packed length (a
    `ValueError` if a tokenized prompt is longer); without one, prompts are
    padded (or trimmed of padding) to it, and a `ValueError` is raised if a
    prompt is longer.

    Args:
        backbone: a `keras_fam.models.FAMBackbone`.
        preprocessor: a `keras_fam.models.FAMCausalLMPreprocessor` (or any
            KerasHub `CausalLMPreprocessor`) or `None`.
        **kwargs: `keras_hub.models.CausalLM` arguments.

    Example:

    >>> backbone = FAMBackbone(vocabulary_size=100, num_layers=2,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32, block_size=8,
    ...     memory_segments=1, fam_length=2)
    >>> lm = FAMCausalLM(backbone)
    >>> prompt = {"token_ids": np.array([[1, 5, 7]]),
    ...           "padding_mask": np.array([[1, 1, 1]])}
    >>> out = lm.generate(prompt, max_length=40, stop_token_ids=None)

    References:
        Hwang et al., "TransformerFAM: Feedback attention is working
        memory", arXiv 2404.09173.
    """

    backbone_cls = FAMBackbone
    preprocessor_cls = FAMCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        if not isinstance(backbone, FAMBackbone):
            raise ValueError(
                "`backbone` must be a `keras_fam.models.FAMBackbone`. "
                f"Received: backbone={type(backbone).__name__}"
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        # Functional, as KerasHub's tasks are: KerasHub resets and re-injects
        # the `Functional` base of its task classes whenever a task is built,
        # so a subclassed task would break every live KerasHub task (and
        # vice versa). `call` below computes the same thing.
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = self.logits(hidden_states)
        super().__init__(
            inputs=inputs,
            outputs=outputs,
            dtype=backbone.dtype_policy,
            **kwargs,
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A FAM causal LM from a KerasHub preset.

        A FAM preset (saved by `save_to_preset`) loads as is; a preset of a
        supported family (Gemma, Gemma 2, Llama, Llama 3, Mistral, GPT-2) is
        loaded with KerasHub's own loaders and converted, reusing its weights
        and its own preprocessor and tokenizer (see
        `keras_fam.models.presets`).

        Args:
            preset: str. A built-in preset name, a local directory,
                `kaggle://` or `hf://` handle.
            load_weights: bool. Load (and convert) the weights.
            **kwargs: `dtype`, `preprocessor`, and FAM or training
                arguments that override the preset's (`block_size`,
                `memory_segments`, `fam_length`, `dropout` ...).
        """
        from keras_fam.models import presets

        return presets.causal_lm_from_preset(
            cls, preset, load_weights=load_weights, **kwargs
        )

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        jit_compile="auto",
        **kwargs,
    ):
        """KerasHub's `CausalLM.compile`. One difference: with
        `jit_compile="auto"` (the default) `generate` is compiled with XLA
        on TensorFlow also on a CPU-only machine, where Keras' `"auto"`
        turns XLA off for training (a FAM generation step is ~200 small
        ops; XLA fuses them: `generate` ~1.9x faster on a CPU, same
        tokens). `jit_compile=False` keeps `generate` on plain
        `tf.function`."""
        # Read by `make_generate_function`.
        self._generate_jit_compile = jit_compile
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            jit_compile=jit_compile,
            **kwargs,
        )

    def set_fam_write_threshold(self, threshold):
        """`FAMBackbone.set_fam_write_threshold`, and drops this model's
        compiled functions (`predict`, `evaluate`, `fit`, `generate`) so
        that they are traced again with the new threshold. `FAMStreamer`s
        built before keep the old one."""
        self.backbone.set_fam_write_threshold(threshold)
        self.generate_function = None
        self.predict_function = None
        self.test_function = None
        self.train_function = None

    # === Forward pass ===

    def call(self, inputs, training=None):
        hidden_states = self.backbone(inputs, training=training)
        return self.logits(hidden_states)

    def logits(self, hidden_states):
        """Final hidden states `(B, T, D)` -> logits `(B, T, V)` (tied or
        untied output embedding, Gemma 2 final soft cap)."""
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        cap = self.backbone.final_logit_soft_cap
        if cap is not None:
            logits = ops.tanh(logits / cap) * cap
        return logits

    # === Scoring ===

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
        chunk_size=None,
    ):
        """Score token ids: per-token logits or per-token loss.

        KerasHub's `CausalLM.score` contract (`GemmaCausalLM.score`,
        `LlamaCausalLM.score`), equal to the full forward pass (`self(...)`)
        but computed chunk by chunk through the backbone's streaming state
        (`get_initial_state` then `stream`): chunks of whole blocks go
        through the fused block step, and besides the inputs and the
        returned scores nothing grows with the length. In `"loss"` mode the
        logits of one chunk, `(B, chunk_size, V)`, are the largest tensor, so
        a document of any length (100k tokens and more) can be scored.

        Args:
            token_ids: int tensor `(B, T)` of the tokens to score, e.g. the
                output of `generate()`.
            padding_mask: `(B, T)`, `1` for real tokens. Padded tokens are
                never attended to (their own scores are returned but
                meaningless). Defaults to all ones.
            scoring_mode: `"logits"` (returns `(B, T, V)`) or `"loss"`
                (returns `(B, T)`: the sparse categorical cross-entropy of
                `target_ids` under the logits of each position, unreduced).
                Defaults to `"logits"`.
            layer_intercept_fn: optional `fn(x, index) -> x` that sees and
                may replace activations `(B, C, D)`: the embedded input of
                the first layer (`index=-1`, after embedding scale and
                position embeddings) and the output of each layer (`index`
                0 to `num_layers - 1`). It is called once per chunk, on the
                rows of that chunk; pass `chunk_size >= T` to have it see
                the whole sequence at once as KerasHub's models do. On
                PyTorch, autograd graphs are recorded only when it is given
                (for gradients through the activations it intercepts);
                without it scoring runs under `torch.no_grad()`, so that the
                memory of earlier chunks is freed. Defaults to `None`.
            target_ids: int tensor `(B, T)` of the tokens each position
                predicts (typically `token_ids` shifted left by one).
                Required in `"loss"` mode.
            chunk_size: int. Tokens per streamed chunk. Defaults to the
                smallest multiple of `block_size` that is at least 1024.

        Returns:
            `(B, T, V)` logits or `(B, T)` per-token losses.

        Example:

        >>> lm = FAMCausalLM(FAMBackbone(vocabulary_size=100, num_layers=2,
        ...     num_heads=2, hidden_dim=16, intermediate_dim=32,
        ...     block_size=8, memory_segments=1, fam_length=2))
        >>> ids = np.random.randint(0, 100, (1, 5000))
        >>> losses = lm.score(ids[:, :-1], scoring_mode="loss",
        ...                   target_ids=ids[:, 1:])  # (1, 4999)
        """
        check_choice("scoring_mode", scoring_mode, ("logits", "loss"))
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                "Cannot compute loss without targets: pass `target_ids` "
                'with scoring_mode="loss". Received: target_ids=None'
            )
        if layer_intercept_fn is not None and not callable(layer_intercept_fn):
            raise TypeError(
                "`layer_intercept_fn` must be a callable `fn(x, index)`. "
                f"Received: layer_intercept_fn={layer_intercept_fn!r}"
            )
        if chunk_size is None:
            block_size = self.backbone.block_size
            chunk_size = -(-1024 // block_size) * block_size
        chunk_size = check_int("chunk_size", chunk_size)
        token_ids, padding_mask = self.backbone.check_inputs(
            {"token_ids": token_ids, "padding_mask": padding_mask}
        )
        length = token_ids.shape[1]
        if target_ids is not None:
            target_ids = ops.convert_to_tensor(target_ids)
            if tuple(target_ids.shape) != tuple(token_ids.shape):
                raise ValueError(
                    "`target_ids` must have the shape of `token_ids` "
                    f"{tuple(token_ids.shape)}. Received: "
                    f"target_ids.shape={tuple(target_ids.shape)}"
                )
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )
        scores = []
        with dispatch.no_grad(enabled=layer_intercept_fn is None):
            state = self.backbone.get_initial_state(ops.shape(token_ids)[0])
            for start in range(0, length, chunk_size):
                end = min(start + chunk_size, length)
                hidden_states, state = self.backbone.stream(
                    token_ids[:, start:end],
                    state,
                    padding_mask=padding_mask[:, start:end],
                    layer_intercept_fn=layer_intercept_fn,
                )
                logits = self.logits(hidden_states)
                if scoring_mode == "loss":
                    logits = loss_fn(target_ids[:, start:end], logits)
                scores.append(logits)
        if len(scores) == 1:
            return scores[0]
        return ops.concatenate(scores, axis=1)

    # === Generation ===

    def call_with_cache(self, token_ids, cache):
        """Continue the cached sequence with `token_ids` `(B, C)`.

        Unlike KerasHub's attention caches there is no `cache_update_index`
        argument: the position is part of the cache, which only moves
        forward.

        Args:
            token_ids: int tensor `(B, C)`, any `C`.
            cache: from `_build_cache` or `backbone.get_initial_state`.

        Returns:
            `(logits, hidden_states, cache)`.
        """
        hidden_states, cache = self.backbone.stream(token_ids, cache)
        return self.logits(hidden_states), hidden_states, cache

    def _build_cache(self, token_ids, padding_mask):
        """A cache holding every prompt token before the shortest prompt's
        last token, and the index at which the sampler starts."""
        batch_size = ops.shape(token_ids)[0]
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        shortest = ops.maximum(ops.min(row_lengths), 1)
        cache = self.backbone.get_initial_state(batch_size)
        cache = self.backbone.prefill(token_ids, cache, shortest - 1)
        return cache, shortest

    def generate_step(self, inputs, stop_token_ids=None):
        """A compilable generation function for one batch.

        Args:
            inputs: dict with `"token_ids"` and `"padding_mask"` `(B, T)`.
            stop_token_ids: tuple of token ids that end a row.
        """
        token_ids = inputs["token_ids"]
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        cache, index = self._build_cache(token_ids, padding_mask)

        def next(prompt, cache, index):
            batch_size = ops.shape(prompt)[0]
            token = ops.slice(prompt, (0, index - 1), (batch_size, 1))
            logits, hidden_states, cache = self.call_with_cache(token, cache)
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                cache,
            )

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            model=self,
        )
        if stop_token_ids is not None:
            end_locations = ops.logical_and(
                _any_equal(token_ids, stop_token_ids),
                ops.logical_not(padding_mask),
            )
            end_locations = ops.cast(end_locations, "int32")
            cumsum = ops.cast(ops.cumsum(end_locations, axis=-1), "int32")
            padding_mask = ops.logical_not(
                ops.cast(cumsum - end_locations, "bool")
            )
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
    ):
        """Generate from prompts; see `keras_hub.models.CausalLM.generate`.

        Without a preprocessor, `inputs` is a dict of `"token_ids"` and
        `"padding_mask"` (or an int array of token ids, all real), and
        `max_length`, when given, pads them. Prompts are right-padded and
        hold at least one real token; the ids are in
        `[0, vocabulary_size)`. These are checked (a `ValueError`) before
        the compiled generation function, where they could not be, with
        or without a preprocessor.
        """
        if max_length is not None:
            max_length = check_int("max_length", max_length)
        strip_prompt = check_bool("strip_prompt", strip_prompt)
        if self.preprocessor is None:
            if not _is_dataset(inputs):
                inputs = self._pad_prompt(inputs, max_length)
        elif max_length is not None and not _is_dataset(inputs):
            self._check_prompt_fits(inputs, max_length)
        return super().generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def _pad_prompt(self, inputs, max_length):
        if not isinstance(inputs, dict):
            inputs = {"token_ids": inputs}
        token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        mask = inputs.get("padding_mask")
        if mask is None:
            mask = np.ones(token_ids.shape, bool)
        mask = np.asarray(ops.convert_to_numpy(mask)).astype(bool)
        if mask.ndim == 1:
            mask = mask[None]
        self.backbone.check_inputs(
            {"token_ids": token_ids, "padding_mask": mask}
        )
        _check_prompts_not_empty(mask)
        if max_length is not None:
            longest = int(mask.sum(axis=-1).max()) if mask.size else 0
            if max_length < longest:
                raise ValueError(
                    "`max_length` must be at least the prompt length "
                    f"{longest}. Received: max_length={max_length}"
                )
            width = token_ids.shape[1]
            if width < max_length:
                pad = ((0, 0), (0, max_length - width))
                token_ids = np.pad(token_ids, pad)
                mask = np.pad(mask, pad)
            token_ids, mask = token_ids[:, :max_length], mask[:, :max_length]
        return {"token_ids": token_ids.astype("int32"), "padding_mask": mask}

    def make_generate_function(self):
        """KerasHub's (compiled) generation function, behind the checks of
        its inputs: inside it the token ids and padding mask are traced and
        cannot be read, so they are checked here, where they are known
        (ids in `[0, vocabulary_size)`, right padding, at least one real
        token per row), whether they come from a preprocessor or not."""
        if self.generate_function is not None:
            return self.generate_function
        if (
            keras.backend.backend() == "tensorflow"
            and not self.run_eagerly
            and getattr(self, "_generate_jit_compile", "auto") == "auto"
        ):
            import tensorflow as tf

            compiled = tf.function(self.generate_step, jit_compile=True)
        else:
            compiled = super().make_generate_function()

        def generate_function(inputs, stop_token_ids=None):
            if isinstance(inputs, dict) and "token_ids" in inputs:
                _, mask = self.backbone.check_inputs(inputs)
                _check_prompts_not_empty(concrete(mask))
            return compiled(inputs, stop_token_ids=stop_token_ids)

        self.generate_function = generate_function
        return generate_function

    def _check_prompt_fits(self, inputs, max_length):
        prompts = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if isinstance(inputs, dict) or not all(
            isinstance(p, str) for p in prompts
        ):
            return
        tokenizer = self.preprocessor.tokenizer
        extra = int(bool(getattr(self.preprocessor, "add_start_token", 0)))
        for prompt in prompts:
            length = len(_to_list(tokenizer(prompt))) + extra
            if length > max_length:
                raise ValueError(
                    "`max_length` must be at least the tokenized prompt "
                    f"length {length}. Received: max_length={max_length}"
                )


def _check_prompts_not_empty(padding_mask):
    """Every prompt holds a real token (generation continues the last
    one); `padding_mask` a NumPy array or `None` (not known)."""
    if padding_mask is None:
        return
    if padding_mask.size == 0 or not padding_mask.any(axis=-1).all():
        lengths = padding_mask.sum(axis=-1).astype(int).tolist()
        raise ValueError(
            "Every prompt must hold at least one token (for example a start "
            "token): generation continues from a prompt's last token. "
            f"Received: prompts of lengths {lengths} (padding_mask.shape="
            f"{tuple(padding_mask.shape)})"
        )


def _any_equal(token_ids, values):
    found = ops.equal(token_ids, values[0])
    for value in values[1:]:
        found = ops.logical_or(found, ops.equal(token_ids, value))
    return found


def _is_dataset(inputs):
    return type(inputs).__name__.endswith("Dataset")


def _to_list(tokens):
    if hasattr(tokens, "numpy"):
        tokens = tokens.numpy()
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return list(tokens)
