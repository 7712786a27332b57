"""FAMStreamer: feed an unbounded token stream through a FAM model.

`FAMStreamer` feeds token chunks of any length through a `FAMCausalLM` or
`FAMBackbone`, returns logits or hidden states, keeps the backbone's
streaming state as a `FAMState`, and shows a progress bar on long runs.
Resuming from a saved state gives bit-identical outputs to never having
stopped.

Shape letters: B batch, C chunk length, D width, V vocabulary.
"""

import numbers

import keras
import numpy as np
from keras import ops

from keras_fam.models.fam_backbone import FAMBackbone
from keras_fam.models.fam_causal_lm import FAMCausalLM
from keras_fam.models.fam_state import FAMState

OUTPUTS = ("logits", "hidden_states", "last_logits", None)


class FAMStreamer:
    """Feed a long token stream through a FAM model, chunk by chunk.

    `feed` accepts any number of tokens. Tokens up to the next block
    boundary and after the last whole block go through a compiled one-token
    step; whole blocks go through a compiled step of `blocks_per_step`
    blocks (the layers' fused block computation, looped inside the compiled
    step), and the last few whole blocks through a one-block step. Each
    step is compiled once per output kind (Keras' `predict_on_batch`: `jit`
    on JAX, `tf.function(jit_compile=True)` on TensorFlow; eager under
    `torch.no_grad()` on PyTorch) and reused however long the stream
    is. Memory stays constant unless the outputs themselves are kept
    (`output="logits"` or `"hidden_states"`).

    Outputs are bit-identical for the same sequence of `feed` calls whether
    or not the state went through `save`/`load` in between; a different
    split of the same tokens into `feed` calls agrees to float rounding.

    Args:
        model: a `keras_fam.models.FAMCausalLM` (logits available) or a
            `keras_fam.models.FAMBackbone` (hidden states only).
        batch_size: int. Number of parallel streams. Defaults to `1`.
        state: optional `FAMState` to resume from (for example
            `FAMState.load(path)`). Defaults to a fresh state.
        output: `"logits"`, `"hidden_states"`, `"last_logits"` (only the
            logits of the last token: constant memory however long the
            stream) or `None` (nothing kept). Defaults to `"logits"`;
            `feed(..., output=...)` overrides it for one call.
        blocks_per_step: int. Whole blocks fed per compiled step. More
            blocks mean fewer calls (less per-call overhead) and a larger
            compiled program. Defaults to `64`.

    Example:

    >>> streamer = FAMStreamer(causal_lm, output="last_logits")
    >>> logits = streamer.feed(token_ids[:, :100_000], verbose=1)
    >>> streamer.state.save("book.npz")
    >>> resumed = FAMStreamer(causal_lm, state=FAMState.load("book.npz"))
    """

    def __init__(
        self,
        model,
        batch_size=1,
        state=None,
        output="logits",
        blocks_per_step=64,
    ):
        if not isinstance(model, (FAMCausalLM, FAMBackbone)):
            raise ValueError(
                "`model` must be a FAMCausalLM or a FAMBackbone. "
                f"Received: model={type(model).__name__}"
            )
        backbone = getattr(model, "backbone", model)
        self.model = model
        self._check_output(output, backbone)
        if (
            isinstance(blocks_per_step, bool)
            or not isinstance(blocks_per_step, numbers.Integral)
            or blocks_per_step < 1
        ):
            raise ValueError(
                "`blocks_per_step` must be a positive integer. "
                f"Received: blocks_per_step={blocks_per_step!r}"
            )
        self.blocks_per_step = int(blocks_per_step)
        self.backbone = backbone
        self.output = output
        if state is None:
            state = FAMState.initial(backbone, batch_size)
        elif not isinstance(state, FAMState):
            raise ValueError(
                "`state` must be a FAMState. "
                f"Received: state={type(state).__name__}"
            )
        state.check_model(backbone)
        self.state = state.cast_to(backbone)
        self._steps = {}

    def _check_output(self, output, backbone):
        if output not in OUTPUTS:
            raise ValueError(
                f"`output` must be one of {OUTPUTS}. "
                f"Received: output={output!r}"
            )
        if output in ("logits", "last_logits") and backbone is self.model:
            raise ValueError(
                f"`output={output!r}` needs a FAMCausalLM; a backbone gives "
                "`output='hidden_states'` or `None`."
            )

    def _step(self, width, output):
        """The compiled step for `width` tokens (one token, or whole
        blocks) and one output kind, made on first use."""
        key = (width, output)
        if key not in self._steps:
            logits = None if self.backbone is self.model else self.model.logits
            self._steps[key] = _StreamStep(
                self.backbone, logits, output, blocks=width > 1
            )
        return self._steps[key]

    def reset(self):
        """Start a new stream (fresh state)."""
        self.state = FAMState.initial(self.backbone, self.state.batch_size)

    def feed(self, token_ids, verbose="auto", output="default"):
        """Feed `token_ids` `(B, T)` (any `T`) and advance the state.

        Args:
            token_ids: int array `(B, T)`.
            verbose: `"auto"` (a progress bar when `T` spans more than one
                block), `0` or `1`.
            output: what to return for this call (see the class
                arguments). Defaults to the streamer's `output`.

        Returns:
            NumPy `(B, T, V)` logits, `(B, T, D)` hidden states, `(B, V)`
            last logits, or `None`, depending on `output`.
        """
        if output == "default":
            output = self.output
        self._check_output(output, self.backbone)
        token_ids = np.asarray(ops.convert_to_numpy(token_ids))
        if token_ids.ndim != 2 or token_ids.shape[0] != self.state.batch_size:
            raise ValueError(
                "`token_ids` must have shape (batch_size="
                f"{self.state.batch_size}, tokens). "
                f"Received: token_ids.shape={token_ids.shape}"
            )
        self.backbone.check_inputs({"token_ids": token_ids})
        token_ids = token_ids.astype("int32")
        length, size = token_ids.shape[1], self.backbone.block_size
        if verbose == "auto":
            verbose = int(length > size)
        progress = keras.utils.Progbar(length, unit_name="token")
        position = self.state.position
        head = min((-position) % size, length)
        whole = (length - head) // size * size
        chunk = self.blocks_per_step * size
        multiple = whole // chunk * chunk
        steps = [(start, 1) for start in range(head)]
        steps += [(s, chunk) for s in range(head, head + multiple, chunk)]
        steps += [(s, size) for s in range(head + multiple, head + whole, size)]
        steps += [(start, 1) for start in range(head + whole, length)]
        layers, outputs, last = self.state.layers, [], None
        for start, width in steps:
            result = self._step(width, output).predict_on_batch(
                {
                    "token_ids": token_ids[:, start : start + width],
                    "state": layers,
                }
            )
            layers = tuple(result["state"])
            if output in ("logits", "hidden_states"):
                outputs.append(result["outputs"])
            elif output == "last_logits":
                last = result["outputs"]
            if verbose:
                progress.update(start + width)
        self.state = FAMState(layers, self.state.signature)
        if output in ("logits", "hidden_states"):
            return np.concatenate(outputs, axis=1) if outputs else None
        if output == "last_logits" and last is not None:
            return last[:, -1]
        return None


class _StreamStep(keras.Model):
    """One compiled streaming step: whole blocks at a block boundary
    (`blocks=True`, the layers' fused block step) or one token (the
    layers' streaming step, FAM update under `ops.cond`)."""

    def __init__(self, backbone, logits, output, blocks):
        super().__init__(
            name="fam_stream_block" if blocks else "fam_stream_token"
        )
        self.backbone = backbone
        self._logits = logits
        self._output = output
        self._blocks = blocks
        self.built = True
        if keras.backend.backend() == "tensorflow":
            # XLA also on a CPU-only machine, where Keras' "auto" leaves
            # it off: the one-token step is many small ops.
            self.jit_compile = True

    def call(self, inputs):
        token_ids, state = inputs["token_ids"], inputs["state"]
        state = tuple(_as_layer_state(layer) for layer in state)
        if self._blocks:
            hidden, state = self.backbone.stream_block(token_ids, state)
        else:
            hidden, state = self.backbone.stream(token_ids, state)
        outputs = hidden
        if self._output in ("logits", "last_logits"):
            outputs = self._logits(hidden)
        if self._output is None:
            outputs = ops.zeros((), "float32")
        return {"outputs": outputs, "state": state}


def _as_layer_state(layer):
    return {name: ops.convert_to_tensor(value) for name, value in layer.items()}
