"""The paper's training tricks: Random State Passing and Random Position Offset.

Both are Keras layers owned by `keras_fam.models.FAMBackbone` and act only when
the backbone is called with `training=True` (as `model.fit` does). Both are off
by default (probability `0.0`); turn them on with the backbone arguments
`state_passing_probability` (the paper uses `0.8`) and
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

Shape letters: B batch, L layers, F FAM length, D width.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173, section 3.3.
"""

import keras
from keras import ops


def _check_probability(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1]. Received: {name}={value}"
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
        _check_probability("state_passing_probability", probability)
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
        _check_probability("position_offset_probability", probability)
        if isinstance(max_offset, bool) or not isinstance(
            max_offset, (int, float)
        ):
            raise ValueError(
                "`max_position_offset` must be a positive number. "
                f"Received: max_position_offset={max_offset!r}"
            )
        if max_offset < 1:
            raise ValueError(
                "`max_position_offset` must be at least 1. "
                f"Received: max_position_offset={max_offset}"
            )
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
