"""Training on long streams: state passing and Random Position Offset.

These are Keras layers owned by `keras_fam.models.FAMBackbone`; they act only
when the backbone is called with `training=True` (as `model.fit` does) and
are off by default. Turn them on with the backbone arguments
`state_passing_probability` (the paper's Random State Passing, `0.8` in the
paper), `training_streams` (per-row streamed state passing, below) and
`position_offset_probability` (the paper uses `0.5`).

- Random State Passing (RSP): at the end of each training step the final FAM
  of every layer, taken from the first batch row, is written to a
  non-trainable variable (updated in the forward pass, like BatchNorm
  statistics, so it works under `jit` on every backend). At the next step
  every batch row starts from that saved FAM with probability `p`, otherwise
  from the learned initial FAM. One coin per step decides for all layers and
  rows. No gradient flows into the saved FAM (it is a variable). This lets a
  model trained on a few blocks extrapolate to hundreds at inference.
- Random Position Offset: each step draws an integer offset uniformly in
  `[0, max_offset)` (the RoPE max wavelength by default) and keeps it with
  probability `p` (the paper zeroes it with probability 0.5); the offset is
  added to every RoPE position. It is always `0` at inference.
- Streamed state passing (`StreamedStatePassing`, backbone argument
  `training_streams=B`): each of the `B` batch rows is an endless token
  stream cut into consecutive training segments (`streamed_batches` /
  `streamed_dataset` build them). Each step continues every row from that
  row's own final FAM of the previous step (truncated backpropagation
  through time: the FAM runs on, the gradient stops at the segment
  boundary); a row whose input `stream_reset` is `1` starts a fresh stream
  from the initial FAM. Unlike Random State Passing, which carries row 0's
  FAM into unrelated sequences, the carried FAM always belongs to the text
  that follows it, so the model learns to hold information across segment
  boundaries for as long as the data asks.

Shape letters: B batch, L layers, F FAM length, D width.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173, section 3.3.
"""

import keras
import numpy as np
from keras import ops

from keras_fam.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_probability,
)


@keras.saving.register_keras_serializable(package="keras_fam")
class RandomStatePassing(keras.layers.Layer):
    """Carries the final FAM of a training step into the next one.

    Owns two non-trainable variables: `carried_fam` `(L, F, D)`, the final
    FAM of each layer for the first batch row of the last training step, and
    `has_carried_fam`, `1.0` once a step has written it.

    Args:
        num_layers: int. Number of FAM layers.
        fam_length: int. FAM length.
        hidden_dim: int. Width.
        probability: float. Chance that a training step starts from the
            carried FAM. `0.0` turns the trick off. Defaults to `0.8` (the
            paper).
        seed: int or `None`. Seed of the coin. Defaults to `None`.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> passing = RandomStatePassing(2, 4, 8, probability=0.8, seed=1)
    >>> passing.build()
    >>> fams = [keras.ops.zeros((3, 4, 8))] * 2
    >>> fams = passing.select(fams, training=True)  # first step: unchanged
    >>> passing.update([keras.ops.ones((3, 4, 8))] * 2, training=True)
    """

    def __init__(
        self,
        num_layers,
        fam_length,
        hidden_dim,
        probability=0.8,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_probability("state_passing_probability", probability)
        self.num_layers = num_layers
        self.fam_length = fam_length
        self.hidden_dim = hidden_dim
        self.probability = float(probability)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed")

    def build(self, input_shape=None):
        self.carried_fam = self.add_weight(
            name="carried_fam",
            shape=(self.num_layers, self.fam_length, self.hidden_dim),
            initializer="zeros",
            trainable=False,
        )
        self.has_carried_fam = self.add_weight(
            name="has_carried_fam",
            shape=(),
            initializer="zeros",
            trainable=False,
        )
        self.built = True

    @property
    def active(self):
        return self.probability > 0.0 and self.fam_length > 0

    def select(self, fams, training=None):
        """Per-layer initial FAMs `(B, F, D)`: the carried ones with
        probability `probability` (training only), else `fams`."""
        if not (training and self.active):
            return fams
        coin = keras.random.uniform((), seed=self.seed_generator)
        use = ops.logical_and(
            coin < self.probability, self.has_carried_fam > 0.5
        )
        selected = []
        for index, fam in enumerate(fams):
            carried = ops.cast(self.carried_fam[index], fam.dtype)
            carried = ops.broadcast_to(carried[None], ops.shape(fam))
            selected.append(ops.where(use, carried, fam))
        return selected

    def update(self, final_fams, training=None):
        """Saves the first batch row of each layer's final FAM (training
        only)."""
        if not (training and self.active):
            return
        rows = [ops.stop_gradient(fam[0]) for fam in final_fams]
        stacked = ops.cast(ops.stack(rows, axis=0), self.carried_fam.dtype)
        self.carried_fam.assign(stacked)
        self.has_carried_fam.assign(ops.ones((), self.has_carried_fam.dtype))

    def reset(self):
        """Forget the carried FAM (the next step starts fresh)."""
        self.has_carried_fam.assign(0.0)

    def get_config(self):
        return {
            **super().get_config(),
            "num_layers": self.num_layers,
            "fam_length": self.fam_length,
            "hidden_dim": self.hidden_dim,
            "probability": self.probability,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_fam")
class RandomPositionOffset(keras.layers.Layer):
    """Draws the per-step RoPE position offset of the paper.

    Args:
        max_offset: int. The offset is uniform in `[0, max_offset)`; the
            paper uses the RoPE max wavelength.
        probability: float. Chance that the drawn offset is kept (else it is
            `0`). `0.0` turns the trick off. Defaults to `0.5` (the paper).
        seed: int or `None`. Defaults to `None`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call `sample(training)` (not the layer itself): it returns a scalar
    int32 tensor, or the Python int `0` unless `training` is true.
    """

    def __init__(self, max_offset, probability=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        check_probability("position_offset_probability", probability)
        max_offset = check_float("max_position_offset", max_offset, 1)
        self.max_offset = int(max_offset)
        self.probability = float(probability)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed")
        self.built = True

    @property
    def active(self):
        return self.probability > 0.0

    def sample(self, training=None):
        """The offset of this step: `0` unless `training` is true."""
        if not (training and self.active):
            return 0
        draw = keras.random.uniform((2,), maxval=1.0, seed=self.seed_generator)
        offset = ops.floor(draw[0] * self.max_offset)
        offset = ops.minimum(offset, self.max_offset - 1)
        offset = ops.where(draw[1] < self.probability, offset, 0.0)
        return ops.cast(offset, "int32")

    def get_config(self):
        return {
            **super().get_config(),
            "max_offset": self.max_offset,
            "probability": self.probability,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_fam")
class StreamedStatePassing(keras.layers.Layer):
    """Per-row state passing over streamed training data.

    Owns one non-trainable variable, `carried_fam` `(L, B, F, D)`: the final
    FAM of every layer and every batch row of the last training step. At
    the next training step row `b` starts from `carried_fam[:, b]` unless
    its `stream_reset` is `1`, in which case it starts from the initial FAM
    (the summary embeddings propagated through the layers). Rows never see
    each other's FAM. No gradient flows into the carried FAM (it is a
    variable; the gradient stops at the segment boundary). At inference
    (`training=False`: `predict`, `evaluate`, `generate`, streaming) the
    carried FAM is neither read nor written.

    Only the FAM is carried: each segment's first block sees no memory
    blocks of the previous segment, and positions restart at `0` in every
    segment. RoPE is relative and the initial FAM sits at the `F`
    positions before token 0, exactly where a carried FAM, the last
    positions of the previous segment, would be relative to the new one.

    Args:
        num_layers: int. Number of FAM layers.
        fam_length: int. FAM length.
        hidden_dim: int. Width.
        streams: int. Batch size of every training step (one stream per
            row).
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> passing = StreamedStatePassing(2, 4, 8, streams=3)
    >>> passing.build()
    >>> fams = [keras.ops.zeros((3, 4, 8))] * 2
    >>> reset = keras.ops.convert_to_tensor([1.0, 0.0, 0.0])
    >>> fams = passing.select(fams, reset, training=True)
    >>> passing.update([keras.ops.ones((3, 4, 8))] * 2, training=True)
    """

    def __init__(self, num_layers, fam_length, hidden_dim, streams, **kwargs):
        super().__init__(**kwargs)
        # The batch size of every training step.
        streams = check_int("training_streams", streams)
        self.num_layers = num_layers
        self.fam_length = fam_length
        self.hidden_dim = hidden_dim
        self.streams = int(streams)

    def build(self, input_shape=None):
        self.carried_fam = self.add_weight(
            name="carried_fam",
            shape=(
                self.num_layers,
                self.streams,
                self.fam_length,
                self.hidden_dim,
            ),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )
        self.built = True

    def select(self, fams, reset, training=None):
        """Per-layer initial FAMs `(B, F, D)`: row `b` continues from its
        carried FAM unless `reset[b]` is true (training only)."""
        if not training:
            return fams
        if reset is None:
            raise ValueError(
                "A backbone built with `training_streams` trains on streams: "
                "every training batch needs `stream_reset` `(batch,)` (1 "
                "where a row starts a new stream) besides `token_ids`, as "
                "`keras_fam.training.streamed_dataset` yields. "
                "Received: inputs without 'stream_reset'"
            )
        batch = reset.shape[0]
        if batch is not None and batch != self.streams:
            raise ValueError(
                f"This backbone trains {self.streams} streams "
                f"(`training_streams={self.streams}`): every training batch "
                f"must have {self.streams} rows. Received: a batch of "
                f"{batch}"
            )
        restart = ops.cast(ops.reshape(reset, (-1, 1, 1)), "bool")
        selected = []
        for index, fam in enumerate(fams):
            carried = ops.cast(self.carried_fam[index], fam.dtype)
            selected.append(ops.where(restart, fam, carried))
        return selected

    def update(self, final_fams, training=None):
        """Keeps every row's final FAM for the next step (training only)."""
        if not training:
            return
        stacked = ops.stack([ops.stop_gradient(f) for f in final_fams], 0)
        self.carried_fam.assign(ops.cast(stacked, self.carried_fam.dtype))

    def get_config(self):
        return {
            **super().get_config(),
            "num_layers": self.num_layers,
            "fam_length": self.fam_length,
            "hidden_dim": self.hidden_dim,
            "streams": self.streams,
        }


def streamed_batches(
    sample_document,
    batch_size,
    segment_length,
    reset_probability=0.1,
    seed=None,
    document_resets=False,
):
    """Training batches cut from `batch_size` endless token streams.

    Every row is a stream of documents drawn with `sample_document(rng)`,
    laid end to end and cut into consecutive `segment_length`-token
    segments: step `t + 1` continues each row exactly where step `t`
    stopped, so a document may span many steps (the FAM carries it, see
    `StreamedStatePassing`). At the first step, and then with probability
    `reset_probability` per row and step, a row drops what was left of its
    stream and starts a new one (`stream_reset = 1`).

    With `document_resets=True` every document is a stream of its own, as
    at inference, where a prompt starts from a fresh state: each document
    starts at a segment boundary from the initial FAM (`stream_reset = 1`),
    the FAM carries it across as many segments as it spans, and the
    segment that holds its end is right-padded (`padding_mask` `False`,
    weight `0`). No row then starts a document with the FAM of an
    unrelated one (PassKey: a stale key in the memory).

    Args:
        sample_document: callable `rng -> token_ids` or `rng ->
            (token_ids, loss_weights)`, 1-D integer ids (and float weights
            of the same length: the weight of predicting each token;
            defaults to all ones). `rng` is a `numpy.random.Generator`.
        batch_size: int. Rows (streams) per batch: the backbone's
            `training_streams`.
        segment_length: int. Tokens per row and step.
        reset_probability: float in `[0, 1]`. Chance that a row restarts.
            Defaults to `0.1`.
        seed: int or `None`. Seed of the document and reset draws.
        document_resets: bool. Start every document at a segment boundary
            from a fresh state (above). Defaults to `False`.

    Yields:
        `(x, y, sample_weight)` for `fit`: `x` a dict of `"token_ids"`
        `(B, S)`, `"padding_mask"` `(B, S)` and `"stream_reset"` `(B,)`;
        `y` the next tokens `(B, S)`; `sample_weight` `(B, S)`, the weight
        of each next token.
    """
    batch_size = check_int("batch_size", batch_size)
    segment_length = check_int("segment_length", segment_length)
    check_probability("reset_probability", reset_probability)
    if not callable(sample_document):
        raise TypeError(
            "`sample_document` must be a callable `rng -> token_ids`. "
            f"Received: sample_document={sample_document!r}"
        )
    document_resets = check_bool("document_resets", document_resets)
    rng = np.random.default_rng(seed)
    need = segment_length + 1  # Inputs and their next tokens.
    tokens = [np.zeros(0, "int32") for _ in range(batch_size)]
    weights = [np.zeros(0, "float32") for _ in range(batch_size)]
    first = True
    while True:
        reset = np.zeros(batch_size, "float32")
        for row in range(batch_size):
            # With document resets a document is over when at most its
            # last token is left (already the previous segment's label).
            done = document_resets and len(tokens[row]) <= 1
            if first or done or rng.uniform() < reset_probability:
                tokens[row] = np.zeros(0, "int32")
                weights[row] = np.zeros(0, "float32")
                reset[row] = 1.0
            pieces, piece_weights = [tokens[row]], [weights[row]]
            have = len(tokens[row])
            while have < need and not (document_resets and have):
                ids, weight = _document(sample_document, rng)
                pieces.append(ids)
                piece_weights.append(weight)
                have += len(ids)
            tokens[row] = np.concatenate(pieces)
            weights[row] = np.concatenate(piece_weights)
        first = False
        lengths = np.array([min(len(t), need) for t in tokens])
        window = np.stack([_pad(t[:need], need) for t in tokens])
        weight = np.stack([_pad(w[1:need], need - 1) for w in weights])
        # This segment's last label is the next segment's first input.
        tokens = [t[segment_length:] for t in tokens]
        weights = [w[segment_length:] for w in weights]
        x = {
            "token_ids": window[:, :-1],
            "padding_mask": np.arange(segment_length)[None] < lengths[:, None],
            "stream_reset": reset,
        }
        yield x, window[:, 1:], weight


def streamed_dataset(
    sample_document,
    batch_size,
    segment_length,
    reset_probability=0.1,
    seed=None,
    document_resets=False,
):
    """`streamed_batches` as an endless `tf.data.Dataset`, which every
    Keras backend's `fit` (and KerasHub's tasks, which take datasets rather
    than Python generators) accepts. Pass `steps_per_epoch` to `fit`.

    Example:

    >>> lm = FAMCausalLM.from_preset(preset, fam_length=8, training_streams=8)
    >>> lm.backbone.enable_lora(4)
    >>> lm.compile(optimizer="adam")
    >>> data = streamed_dataset(sample_document, 8, 256)
    >>> lm.fit(data, steps_per_epoch=100)
    """
    import tensorflow as tf

    batches = streamed_batches(
        sample_document,
        batch_size,
        segment_length,
        reset_probability,
        seed,
        document_resets,
    )
    shape = (batch_size, segment_length)
    signature = (
        {
            "token_ids": tf.TensorSpec(shape, tf.int32),
            "padding_mask": tf.TensorSpec(shape, tf.bool),
            "stream_reset": tf.TensorSpec((batch_size,), tf.float32),
        },
        tf.TensorSpec(shape, tf.int32),
        tf.TensorSpec(shape, tf.float32),
    )
    return tf.data.Dataset.from_generator(
        lambda: batches, output_signature=signature
    )


def _pad(values, length):
    """`values` right-padded with zeros to `length`."""
    return np.pad(values, (0, length - len(values)))


def _document(sample_document, rng):
    document = sample_document(rng)
    if isinstance(document, tuple):
        ids, weight = document
    else:
        ids, weight = document, None
    ids = np.asarray(ids, dtype="int32").reshape(-1)
    if weight is None:
        weight = np.ones(len(ids), "float32")
    weight = np.asarray(weight, dtype="float32").reshape(-1)
    if len(ids) == 0 or len(weight) != len(ids):
        raise ValueError(
            "`sample_document` must return a non-empty 1-D array of token "
            "ids (and weights of the same length). Received: "
            f"{len(ids)} ids and {len(weight)} weights"
        )
    return ids, weight


@keras.saving.register_keras_serializable(package="keras_fam")
class SampleWeightTotal(keras.metrics.Metric):
    """The total sample weight seen since the last reset (every epoch in
    `fit`): what `LogWindow(weight_log=...)` needs to recover a weighted
    metric's mean over a window of steps.

    Compile it among the `weighted_metrics` (the plain `metrics` get no
    sample weights); without sample weights it counts the targets.

    Example:

    >>> model.compile(
    ...     "adam",
    ...     "sparse_categorical_crossentropy",
    ...     weighted_metrics=["accuracy", SampleWeightTotal()],
    ... )
    """

    def __init__(self, name="sample_weight_total", dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="total"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            weight = ops.cast(ops.size(y_true), self.dtype)
        else:
            weight = ops.sum(ops.cast(sample_weight, self.dtype))
        self.total.assign_add(weight)

    def result(self):
        return ops.convert_to_tensor(self.total)

    def reset_state(self):
        self.total.assign(0.0)


class LogWindow:
    """Means of one training log over windows of `steps` steps.

    Keras logs running means that restart every epoch; the mean over the
    steps since the last window is recovered from two of them. Unweighted
    (the loss with a fixed batch size), each step counts alike. A weighted
    metric's running mean weights each step by its sample weight, which
    varies from step to step (answers per batch, say): pass `weight_log`,
    the log of a `SampleWeightTotal` compiled beside it, and the window's
    mean is exact (weighting steps alike, a window right after the weights
    grew read above 1 for an accuracy). Call `reset()` at the start of
    every epoch and `update(batch, logs)` after every step (from a
    callback's `on_epoch_begin` and `on_train_batch_end`).

    Args:
        monitor: str. The training log, e.g. `"loss"` or
            `"sparse_categorical_accuracy"`.
        steps: int. Steps per window.
        weight_log: `None` or str. The log of the total sample weight since
            the epoch began (`SampleWeightTotal`).
    """

    def __init__(self, monitor, steps, weight_log=None):
        _check_log_name("monitor", monitor)
        if weight_log is not None:
            _check_log_name("weight_log", weight_log)
        self.monitor, self.weight_log = monitor, weight_log
        self.steps = check_int("steps", steps)
        self.reset()

    def reset(self):
        self._last = (0, 0.0, 0.0)  # (steps done, running mean, its weight)

    def update(self, batch, logs):
        """The mean over the window that step `batch` (0-based within the
        epoch) completes, else `None` (also when the window had no
        weight)."""
        done = batch + 1
        last_done, last_mean, last_weight = self._last
        if done - last_done < self.steps:
            return None
        for name in (self.monitor, self.weight_log):
            if name is not None and (logs is None or name not in logs):
                raise ValueError(
                    f"`{name!r}` is not among the training logs "
                    f"{sorted(logs or {})}."
                )
        mean = float(np.asarray(logs[self.monitor]))
        weight = float(done)
        if self.weight_log is not None:
            weight = float(np.asarray(logs[self.weight_log]))
        self._last = (done, mean, weight)
        if weight <= last_weight:
            return None
        return (weight * mean - last_weight * last_mean) / (
            weight - last_weight
        )


def _check_log_name(name, value):
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"`{name}` must be the name of a training log. "
            f"Received: {name}={value!r}"
        )


@keras.saving.register_keras_serializable(package="keras_fam")
class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant `scale`.

    What `RollbackOnCollapse(learning_rate_factor=...)` puts in place of an
    optimizer's schedule when it lowers the learning rate (Keras' own
    `ReduceLROnPlateau` accepts float learning rates only).

    Args:
        schedule: a `keras.optimizers.schedules.LearningRateSchedule`.
        scale: float > 0.

    Example:

    >>> cosine = keras.optimizers.schedules.CosineDecay(1e-3, 100)
    >>> round(float(ScaledLearningRate(cosine, 0.5)(0)), 6)
    0.0005
    """

    def __init__(self, schedule, scale):
        if not isinstance(
            schedule, keras.optimizers.schedules.LearningRateSchedule
        ):
            raise ValueError(
                "`schedule` must be a `LearningRateSchedule`. Received: "
                f"schedule={schedule!r}"
            )
        self.schedule = schedule
        self.scale = check_float("scale", scale, above=0.0)

    def __call__(self, step):
        return self.schedule(step) * self.scale

    def get_config(self):
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "scale": self.scale,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(
            config["schedule"]
        )
        return cls(**config)


class RollbackOnCollapse(keras.callbacks.Callback):
    """Rolls `fit` back to an earlier state when a training metric collapses.

    Long-stream fine-tuning can collapse: a run learns, then within a hundred
    steps its training accuracy falls to chance and never comes back (the
    PassKey example saw this in 2 of 7 runs with the hard FAM write gate,
    as the training filler grew). This is the remedy large language model
    runs use for loss spikes (PaLM restarted from a checkpoint before the
    spike and went on with other batches): every `check_every` steps the
    callback compares the mean of `monitor` over those steps with the best
    such mean so far; when it has collapsed (below `collapse_ratio` times
    the best for `mode="max"`, above the best divided by `collapse_ratio`
    for `mode="min"`, or not finite) the trainable weights and the
    optimizer's slots go back to a copy taken at least `check_every` steps
    before the last healthy check, and training goes on from there with new
    batches. The optimizer's step counter is not rolled back, so a
    learning-rate schedule keeps decaying. Keras' own callbacks act once
    per epoch (`EarlyStopping(restore_best_weights=True)`) or after a crash
    (`BackupAndRestore`); this one acts within an epoch.

    The mean over a window comes from `LogWindow`. Copies are taken on the
    host every `check_every` steps (on JAX this syncs the training state to
    the model, which `fit` otherwise does once per epoch).

    Args:
        monitor: str. The training log to watch, e.g. `"loss"` or
            `"sparse_categorical_accuracy"`.
        mode: `"min"`, `"max"` or `"auto"` (`"max"` when `monitor` names an
            accuracy, else `"min"`).
        check_every: int. Steps per window.
        collapse_ratio: float in `(0, 1)`. How far a window may fall behind
            the best before it counts as a collapse.
        max_rollbacks: int >= 0. Rollbacks allowed in one `fit`; after that
            training goes on without them.
        learning_rate_factor: `None` or a float in `(0, 1]`. Multiplies the
            optimizer's learning rate after each rollback, for the rest of
            the fit (a run that collapses again from the restored state at
            the same learning rate tends to, as PassKey's seed 3 did three
            times). A float learning rate is assigned; a schedule is wrapped
            in `ScaledLearningRate` (and the train function traced again, as
            the JAX and TensorFlow ones hold the schedule's constants).
            `None` (the default) leaves it alone.
        weight_log: `None` or str. For a weighted `monitor`, the log of a
            `SampleWeightTotal` compiled beside it (see `LogWindow`).
        verbose: int. `1` prints each rollback.

    Attributes:
        rollbacks: one dict per rollback in the last `fit`: `step` (the
            global step it was detected at), `value` (the collapsed window
            mean), `best`, `restored_step` (the step of the copy) and
            `learning_rate_scale` (the product of the factors so far).

    Example:

    >>> guard = RollbackOnCollapse("sparse_categorical_accuracy")
    >>> lm.fit(data, steps_per_epoch=500, callbacks=[guard])
    >>> guard.rollbacks
    []
    """

    def __init__(
        self,
        monitor="loss",
        mode="auto",
        check_every=50,
        collapse_ratio=0.5,
        max_rollbacks=3,
        learning_rate_factor=None,
        weight_log=None,
        verbose=1,
    ):
        super().__init__()
        self.window = LogWindow(
            monitor, check_int("check_every", check_every), weight_log
        )
        check_choice("mode", mode, ("min", "max", "auto"))
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        self.monitor, self.mode = monitor, mode
        self.check_every = self.window.steps
        self.collapse_ratio = check_float(
            "collapse_ratio", collapse_ratio, above=0.0, below=1.0
        )
        self.max_rollbacks = check_int(
            "max_rollbacks", max_rollbacks, minimum=0
        )
        if learning_rate_factor is not None:
            learning_rate_factor = check_float(
                "learning_rate_factor",
                learning_rate_factor,
                above=0.0,
                maximum=1.0,
            )
        self.learning_rate_factor = learning_rate_factor
        self.verbose = check_int("verbose", verbose, minimum=0)
        self.rollbacks = []

    def on_train_begin(self, logs=None):
        self.rollbacks = []
        self._step = 0
        self._scale = 1.0
        self.reset()

    def reset(self):
        """Forgets the best window and the copies (keeps `rollbacks`): call
        it when the run starts over on purpose (new weights, a new task),
        so that the drop is not taken for a collapse."""
        self._best = None
        self._copies = []  # [(global step, weights, optimizer slots)]

    def on_epoch_begin(self, epoch, logs=None):
        self.window.reset()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        value = self.window.update(batch, logs)
        if value is None:
            return
        if self._collapsed(value) and self._copies:
            if len(self.rollbacks) < self.max_rollbacks:
                self._roll_back(value)
                return
        if np.isfinite(value) and (self._best is None or self._beats(value)):
            self._best = value
        if len(self.rollbacks) < self.max_rollbacks:
            # No copy (a host transfer, a state sync on JAX) that can never
            # be restored.
            self._copy()

    def _beats(self, value):
        if self.mode == "max":
            return value > self._best
        return value < self._best

    def _collapsed(self, value):
        if not np.isfinite(value):
            return True
        if self._best is None:
            return False
        if self.mode == "max":
            return value < self.collapse_ratio * self._best
        return value > self._best / self.collapse_ratio

    def _optimizer_slots(self):
        optimizer = self.model.optimizer
        return [v for v in optimizer.variables if v is not optimizer.iterations]

    def _copy(self):
        model = self.model  # On JAX, syncs the training state to the model.
        weights = [np.array(v) for v in model.trainable_variables]
        slots = [np.array(v) for v in self._optimizer_slots()]
        # The oldest copy is the one restored: at least `check_every` steps
        # before the last healthy check, in case the collapse had begun.
        self._copies = (self._copies + [(self._step, weights, slots)])[-2:]

    def _roll_back(self, value):
        step, weights, slots = self._copies[0]
        variables = self.model.trainable_variables + self._optimizer_slots()
        # The rate when the collapse was seen: a float rate is restored with
        # the slots, possibly from a copy taken before an earlier cut.
        learning_rate = np.array(self.model.optimizer.learning_rate)
        for variable, copy in zip(variables, weights + slots, strict=True):
            variable.assign(copy)
        self._copies = self._copies[:1]
        lowered = ""
        if self.learning_rate_factor is not None:
            self._lower_learning_rate(learning_rate)
            lowered = f" Learning rate now x{self._scale:.3g}."
        self.rollbacks.append(
            {
                "step": self._step,
                "value": value,
                "best": self._best,
                "restored_step": step,
                "learning_rate_scale": self._scale,
            }
        )
        if self.verbose:
            print(
                f"\nRollbackOnCollapse: {self.monitor} over the last "
                f"{self.check_every} steps was {value:.4g} (best "
                f"{self._best:.4g}) at step {self._step}; restored the "
                f"weights of step {step}.{lowered}"
            )

    def _lower_learning_rate(self, learning_rate):
        model = self.model
        optimizer = model.optimizer
        factor = self.learning_rate_factor
        self._scale *= factor
        # The optimizer's own learning rate (a variable or a schedule): the
        # public `learning_rate` returns its current value only.
        current = optimizer._learning_rate
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            if isinstance(current, ScaledLearningRate):
                current = current.schedule
            optimizer.learning_rate = ScaledLearningRate(current, self._scale)
            # Compiled train functions hold the schedule's constants.
            model.make_train_function(force=True)
        elif isinstance(current, keras.Variable):
            current.assign(learning_rate * factor)
        else:
            raise ValueError(
                "`learning_rate_factor` needs an optimizer whose learning "
                "rate is a float or a `LearningRateSchedule`. Received: "
                f"learning_rate={current!r}"
            )


def calibrate_write_threshold(model, score, thresholds, verbose=1):
    """Choose the hard write gate's threshold on validation data.

    `fam_write_gate="hard"` writes a FAM vector only when more than
    `fam_write_threshold` of its attention went to the block. The threshold
    is not a weight: a model trained with `fam_write_threshold_jitter`
    (every gate's threshold drawn from `threshold +- jitter` at every
    block) works across that range, and the best value for reading far
    beyond the training length differs from run to run. This sets each
    candidate in turn (`model.set_fam_write_threshold`), calls
    `score(model)` (higher is better; e.g. exact match on held-out
    sequences, read through a new `FAMStreamer`), and leaves the model at
    the best one. Ties go to the candidate closest to the model's current
    threshold, then to the earlier one.

    Evidence (`examples/passkey_retrieval.py`, 5-digit PassKey, trained at
    0.5 +- 0.1): one run read 0.62 / 0.03 at 1k / 3k filler tokens at 0.5
    and 1.00 / 1.00 at 0.7; another read 0.99 at 0.5 and 0.78 at 0.7.

    Args:
        model: a `FAMCausalLM` (or anything with `set_fam_write_threshold`
            and a `backbone`) with `fam_write_gate="hard"`.
        score: callable `model -> float`, higher is better.
        thresholds: the candidates, floats in `(0, 1)`.
        verbose: int. `1` shows a progress bar with the scores.

    Returns:
        `(best, scores)`: the chosen threshold (now set) and a dict of each
        candidate's score.

    Example:

    >>> best, scores = calibrate_write_threshold(
    ...     lm, lambda lm: validation_accuracy(lm), [0.4, 0.5, 0.6, 0.7]
    ... )
    """
    thresholds = [
        check_float("thresholds", t, above=0.0, below=1.0) for t in thresholds
    ]
    if not thresholds:
        raise ValueError("`thresholds` is empty: pass at least one candidate.")
    if not callable(score):
        raise ValueError(
            f"`score` must be a callable `model -> float`. Received: {score!r}"
        )
    check_int("verbose", verbose, minimum=0)
    current = model.backbone.layer_options.get("fam_write_threshold")
    current = 0.5 if current is None else current
    progress = keras.utils.Progbar(len(thresholds), verbose=verbose)
    scores = {}
    for index, threshold in enumerate(thresholds):
        model.set_fam_write_threshold(threshold)
        value = float(score(model))
        scores[threshold] = value
        progress.update(index + 1, values=[(f"{threshold:g}", value)])
    best = max(
        thresholds,
        key=lambda t: (
            scores[t] if np.isfinite(scores[t]) else -np.inf,
            -abs(t - current),
            -thresholds.index(t),
        ),
    )
    model.set_fam_write_threshold(best)
    return best, scores
