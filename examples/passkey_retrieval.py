"""PassKey retrieval: TransformerFAM vs TransformerBSWA (paper Fig. 3a).

Trains tiny TransformerFAM and TransformerBSWA models (BSWA with M0, M1 and
M2 memory segments) from scratch with `model.fit`, then measures pass-key
accuracy against filler length far past the training length, streaming
every evaluation sequence chunk by chunk through the layers' fixed-size
state (`TransformerFAM.get_initial_state` / `return_state=True`), so memory
does not grow with the filler. Prints a table (model x filler length), and
writes `passkey.json` (all numbers, config, timings) and `passkey.png` (a
plot like the paper's Fig. 3a) to `--output-dir`.

    python examples/passkey_retrieval.py                  # JAX (default)
    KERAS_BACKEND=torch python examples/passkey_retrieval.py --fam-steps 300
    python examples/passkey_retrieval.py --eval-lengths 0 200 4096 65536 262144

The task (the paper's prompt, word-level tokens, 52-word vocabulary):
"There is an important info hidden inside a lot of irrelevant text . Find
it and memorize it . I will quiz you about the important information there
. The pass key is K . Remember it . K is the pass key . <filler> What is
the pass key ? The pass key is K". The filler repeats the paper's five
sentences ("The grass is green . The sky is blue . ..."; `--filler random`
shuffles their order). K has `--key-digits` digits (default 1: chance is
10%). Accuracy is whole-key exact match; digits are scored under teacher
forcing, which gives the same exact-match as greedy decoding.

Models (defaults): 2 layers, width 64, 4 heads, block 16. FAM: 8 FAM
vectors, 0 memory segments (the paper's PassKey setting), a learned
initial FAM per layer, FAM normalisation. BSWA: no FAM, M = 0, 1, 2;
its receptive field is `num_layers * (M + 1) * block_size` = 32, 64, 96
tokens.

Training (what the defaults use, and why):
- FAM normalisation (`--fam-normalization`, on): every layer rescales its
  carried FAM to unit root-mean-square after each block
  (`TransformerFAM(fam_normalization=True)`; no weights, not in the paper).
  The FAM's residual stream otherwise adds one update per block, so its
  size grows with the filler and the tiny model meets states it never saw
  in training: without it the key held to about 4x the training segment
  and then drifted (evidence below). This is the one change that took FAM
  from 0.23 to 1.00 at 16384 filler tokens.
- Per-row state passing over streamed episodes (`--reset-probability
  0.2`): every batch row is an endless stream of PassKey episodes cut into
  256-token segments; each step continues each row where the last stopped,
  starting from that row's final FAM of the previous step (kept in
  non-trainable variables; the gradient stops at the segment boundary), and
  a row restarts from the learned initial FAM with probability 0.2. This is
  the paper's Random State Passing made per row and continuous: the paper
  carries row 0's FAM into unrelated sequences, which here (a 1-digit key
  that must be overwritten) left training accuracy at 0.23 after 600 steps.
- Log-uniform filler lengths up to `--longest-filler 480`, so episodes
  cross segment boundaries (the FAM must hold the key across steps) while
  short fillers keep BSWA and the early FAM learnable; a curriculum grows
  the longest filler from 16 over the first 30% of steps.
- AdamW (learning rate 3e-3, cosine decay to 5%, weight decay 0.01, clip
  norm 1), 800 steps of 32 x 256 tokens.
- A 1-digit key: a 2-digit key in the same budget (1000 steps) reached
  1.00 / 1.00 / 0.91 / 0.86 / 0.89 at filler 0 / 200 / 1024 / 4096 / 16384:
  held as steadily, but its digits not always in order.

Evidence (JAX, this shared 2-core machine; pass-key accuracy at filler
lengths 256 / 1024 / 4096 / 16384, 100 sequences each):
- the defaults (800 steps): 1.00 / 1.00 / 1.00 / 1.00, and 1.00 at
  65536 (100 sequences) and at 262144 (20 sequences), the paper's length.
- seed 1: 1.00 / 1.00 / 1.00 / 1.00, and 1.00 at 65536.
- without FAM normalisation (`--no-fam-normalization`): 1.00 / 0.38 /
  0.16 / 0.10. The FAM's RMS before the question grows with the filler,
  10 / 34 / 94 / 331 / 1253 at 0 / 256 / 1024 / 4096 / 16384 tokens (about
  1.2 per block): each block's update is added to the residual stream.
- without state passing (`--reset-probability 1`, normalisation on): 1.00
  / 0.70 / 0.66 / 0.68: the memory is stable (flat beyond 1024), but
  every segment starts afresh, so no key is ever held longer than one
  256-token segment in training.
- before FAM normalisation, 1000 steps, machine at load ~9 (filler 200 /
  1024 / 4096 / 16384): paper-style RSP (p = 0.8, uniform filler <= 230)
  1.00 / 0.48 / 0.14 / 0.00; streamed episodes with filler <= 2048 0.88 /
  0.28 / 0.06 / 0.10; with a curriculum to 2048 over all steps 1.00 / 0.58
  / 0.06 / 0.14; these defaults without normalisation 1.00 / 0.88 / 0.29
  / 0.23.
- `--filler random` (sentences in random order, in training and
  evaluation): 1.00 / 0.95 / 0.86 / 0.89, a plateau rather than a decay:
  unpredictable filler perturbs the memory more than the repeated one.
- PyTorch, the defaults with `--eval-lengths` up to 16384: FAM 1.00 at
  every length (617 s wall in all; its streaming runs eagerly, about 8x
  slower per token than JAX's compiled step).
- BSWA M1 and M2: 1.00 at filler 0 (the key inside the receptive field)
  and chance (0.06-0.14) from filler 64 on; M0 sees only its own block
  and is at chance throughout. A finer sweep (`--eval-lengths 0 16 32 48
  64 96`): M1 1.00 to filler 16 and chance from 32, M2 1.00 to filler 48
  and chance from 64, where the key is 46 and 78 tokens back, past the
  `num_layers * M * block_size` = 32 and 64 tokens every position reaches.

Timing of the defaults (JAX, this 2-core machine at load average 2): 385 s
wall, 615 s CPU; FAM training 211 s, FAM evaluation 99 s (35 s for 100
streams of 65536 filler tokens, 47 s for 20 of 262144), each BSWA model
20-24 s training and 2-3 s evaluation. Every number is in `passkey.json`
(`total_seconds`, `cpu_seconds`, `load_average`, per-length evaluation
seconds and sample counts, and `fam_rms`, the FAM's size before the
question).
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np
from keras import ops

from keras_fam.layers import TransformerFAM

# === The task: token sequences in the paper's PassKey format ===

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text . "
    "Find it and memorize it . I will quiz you about the important "
    "information there ."
).split()
KEY_BEFORE = "The pass key is".split()
KEY_BETWEEN = ". Remember it .".split()
KEY_AFTER = "is the pass key .".split()
FILLER = (
    "The grass is green . The sky is blue . The sun is yellow . Here we go . "
    "There and back again ."
).split()
QUESTION = "What is the pass key ? The pass key is".split()
DIGITS = [str(d) for d in range(10)]


def _vocabulary():
    words = []
    for word in INTRO + KEY_BEFORE + KEY_BETWEEN + KEY_AFTER + FILLER:
        if word not in words:
            words.append(word)
    for word in QUESTION + DIGITS:
        if word not in words:
            words.append(word)
    return words


VOCABULARY = _vocabulary()
TOKEN = {word: index for index, word in enumerate(VOCABULARY)}
FILLER_SENTENCES = []
for _sentence in " ".join(FILLER).split(" . "):
    FILLER_SENTENCES.append([TOKEN[w] for w in _sentence.strip(" .").split()])
    FILLER_SENTENCES[-1].append(TOKEN["."])


def _ids(words):
    return np.array([TOKEN[w] for w in words], dtype="int32")


class PassKeyTask:
    """Builds PassKey token sequences.

    A sequence is `INTRO, "The pass key is" K ". Remember it ." K "is the
    pass key .", filler, "What is the pass key ? The pass key is" K`, with
    `filler_length` filler tokens between the second key and the question.
    `filler="repeated"` repeats the paper's five sentences in order;
    `filler="random"` draws the sentences in random order.
    """

    def __init__(self, key_digits=1, filler="repeated"):
        if key_digits < 1:
            raise ValueError(
                f"`key_digits` must be >= 1. Received: key_digits={key_digits}"
            )
        if filler not in ("repeated", "random"):
            raise ValueError(
                "`filler` must be 'repeated' or 'random'. "
                f"Received: filler={filler!r}"
            )
        self.key_digits = key_digits
        self.filler = filler
        self.intro = _ids(INTRO + KEY_BEFORE)
        self.between = _ids(KEY_BETWEEN)
        self.after = _ids(KEY_AFTER)
        self.question = _ids(QUESTION)
        self.digit_ids = _ids(DIGITS)
        self.cycle = np.concatenate([np.array(s) for s in FILLER_SENTENCES])

    @property
    def vocabulary_size(self):
        return len(VOCABULARY)

    def overhead(self):
        """Tokens of a sequence that are not filler."""
        k = self.key_digits
        return (
            len(self.intro)
            + len(self.between)
            + len(self.after)
            + len(self.question)
            + 3 * k
        )

    def filler_tokens(self, rng, batch, length):
        if self.filler == "repeated":
            reps = length // len(self.cycle) + 1
            row = np.tile(self.cycle, reps)[:length]
            return np.broadcast_to(row, (batch, length))
        # Random order of sentences: draw enough sentences per row.
        lengths = np.array([len(s) for s in FILLER_SENTENCES])
        per_row = length // lengths.min() + 2
        choice = rng.integers(0, len(FILLER_SENTENCES), (batch, per_row))
        out = np.empty((batch, length), dtype="int32")
        table = [np.array(s, dtype="int32") for s in FILLER_SENTENCES]
        for b in range(batch):
            out[b] = np.concatenate([table[c] for c in choice[b]])[:length]
        return out

    def batch(self, rng, batch, filler_length, total_length=None):
        """A batch of sequences with the same filler length.

        Returns `(tokens, keys, answer_start)`: int32 `(batch, T)` tokens
        (`T = overhead + filler_length`, or `total_length` with filler
        appended after the answer), the `(batch, key_digits)` key digit
        indices, and the index of the first answer digit.
        """
        k = self.key_digits
        keys = rng.integers(0, 10, (batch, k))
        key_ids = self.digit_ids[keys]
        rep = lambda a: np.broadcast_to(a, (batch, len(a)))  # noqa: E731
        parts = [
            rep(self.intro),
            key_ids,
            rep(self.between),
            key_ids,
            rep(self.after),
            self.filler_tokens(rng, batch, filler_length),
            rep(self.question),
        ]
        answer_start = sum(p.shape[1] for p in parts)
        parts.append(key_ids)
        length = answer_start + k
        if total_length is not None:
            if total_length < length:
                raise ValueError(
                    f"`total_length` {total_length} < sequence {length}"
                )
            parts.append(self.filler_tokens(rng, batch, total_length - length))
        tokens = np.concatenate(parts, axis=1).astype("int32")
        return tokens, keys, answer_start


# === The model: embedding, TransformerFAM layers, head ===


@keras.saving.register_keras_serializable(package="keras_fam_examples")
class PassKeyModel(keras.Model):
    """Token embedding, `num_layers` TransformerFAM layers, norm, head.

    `fam_length=0` gives TransformerBSWA. Each layer starts a new sequence
    from its own learned initial FAM (`TransformerFAM.initial_fam`).

    Training input is a dict: `"tokens"` `(B, T)` and `"reset"` `(B,)`.
    With `state_passing=True` (FAM only) the model keeps every layer's final
    FAM of every batch row in non-trainable variables (like BatchNorm
    statistics, so it works inside `model.fit` on every backend) and starts
    the next step from it, except for rows with `reset=1`, which start
    from the learned initial FAM. The data then continue each row's token
    stream from step to step (`training_batches`), so this is truncated
    backpropagation through time over a long stream: the gradient stops at
    step boundaries but the FAM runs on. It generalises the paper's Random
    State Passing (which carries row 0's FAM into unrelated sequences).

    For evaluation the input is a dict `"tokens"`, `"states"` (one
    `TransformerFAM` state per layer) and the call streams the tokens
    through the layers' constant-memory state (`stream`).
    """

    def __init__(
        self,
        vocabulary_size,
        batch_size,
        num_layers=2,
        hidden_dim=64,
        num_heads=4,
        block_size=16,
        memory_segments=0,
        fam_length=8,
        state_passing=True,
        fam_normalization=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.batch_size = batch_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.block_size = block_size
        self.memory_segments = memory_segments
        self.fam_length = fam_length
        self.state_passing = bool(state_passing and fam_length)
        self.fam_normalization = fam_normalization
        self.embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, name="embedding"
        )
        self.blocks = [
            TransformerFAM(
                num_heads=num_heads,
                block_size=block_size,
                memory_segments=memory_segments,
                fam_length=fam_length,
                fam_normalization=fam_normalization,
                name=f"transformer_fam_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(name="final_norm")
        self.head = keras.layers.Dense(vocabulary_size, name="head")

    def build(self, input_shape=None):
        shape = (None, None, self.hidden_dim)
        self.embedding.build((None, None))
        for block in self.blocks:
            block.build(shape)
        self.final_norm.build(shape)
        self.head.build(shape)
        if self.state_passing:
            self.carried_fam = [
                self.add_weight(
                    shape=(self.batch_size, self.fam_length, self.hidden_dim),
                    initializer="zeros",
                    trainable=False,
                    name=f"carried_fam_{i}",
                )
                for i in range(self.num_layers)
            ]
        self.built = True

    def call(self, inputs, training=False):
        if "states" in inputs:  # Streaming (evaluation).
            return self.stream(inputs["tokens"], inputs["states"])
        tokens = inputs["tokens"]
        x = self.embedding(tokens)
        passing = bool(training and self.state_passing)
        if passing:
            reset = ops.cast(inputs["reset"], "bool")[:, None, None]
        for i, block in enumerate(self.blocks):
            if not passing:
                x = block(x, training=training)
                continue
            initial = ops.broadcast_to(
                ops.convert_to_tensor(block.initial_fam)[None],
                (self.batch_size, self.fam_length, self.hidden_dim),
            )
            carried = ops.convert_to_tensor(self.carried_fam[i])
            fam = ops.where(reset, initial, carried)
            x, final = block(x, fam=fam, return_fam=True, training=training)
            self.carried_fam[i].assign(ops.stop_gradient(final))
        return self.head(self.final_norm(x))

    def stream(self, tokens, states):
        """Continue sequences: `tokens` `(B, C)` whose first token starts a
        block; `states` one per layer, whose absolute position is kept in
        `position_offset` (and `index` at zero).

        Returns `(logits (B, C, V), states)`.
        """
        x = self.embedding(tokens)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            # The absolute position lives in `position_offset`; the chunk
            # starts a block at index 0, known when traced (`state_index`),
            # so whole blocks run through the fused block step.
            x, state = block(x, state=state, state_index=0, return_state=True)
            state["position_offset"] = state["position_offset"] + state["index"]
            state["index"] = ops.zeros_like(state["index"])
            new_states.append(state)
        return self.head(self.final_norm(x)), new_states

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "batch_size": self.batch_size,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "block_size": self.block_size,
            "memory_segments": self.memory_segments,
            "fam_length": self.fam_length,
            "state_passing": self.state_passing,
            "fam_normalization": self.fam_normalization,
        }


# === Training ===


def sample_filler_length(rng, longest):
    """Log-uniform filler length in `[0, longest]`: short and long fillers
    alike (BSWA learns from the short ones, FAM must hold the long ones)."""
    return int(np.exp(rng.uniform(0.0, np.log(longest + 1.0)))) - 1


def training_batches(
    task,
    rng,
    batch_size,
    train_length,
    longest_filler,
    steps,
    curriculum_steps=0,
    reset_probability=0.1,
    shortest_filler=16,
):
    """Yields `({"tokens", "reset"}, targets, weights)` for `model.fit`.

    Every batch row is an endless stream of PassKey episodes (each with its
    own key and a log-uniform filler length up to `longest_filler`), cut
    into consecutive `train_length`-token segments: step `t + 1` continues
    each row where step `t` stopped, so an episode can span many steps.
    With probability `reset_probability` a row instead starts a fresh
    stream (`reset=1`: the model starts it from the initial FAM). Over the
    first `curriculum_steps` steps the longest filler grows linearly from
    `shortest_filler` to `longest_filler` (a curriculum on filler length).
    Only the answer digits carry loss.
    """
    buffers = [np.zeros(0, "int32")] * batch_size
    marks = [np.zeros(0, "float32")] * batch_size
    k = task.key_digits
    for step in range(steps):
        longest = longest_filler
        if curriculum_steps and step < curriculum_steps:
            longest = shortest_filler + (
                (longest_filler - shortest_filler) * step // curriculum_steps
            )
        reset = np.zeros(batch_size, "float32")
        for row in range(batch_size):
            if step == 0 or rng.uniform() < reset_probability:
                buffers[row] = np.zeros(0, "int32")
                marks[row] = np.zeros(0, "float32")
                reset[row] = 1.0
            pieces, piece_marks = [buffers[row]], [marks[row]]
            have = len(buffers[row])
            while have < train_length + 1:
                filler = sample_filler_length(rng, longest)
                tokens, _, start = task.batch(rng, 1, filler)
                mark = np.zeros(tokens.shape[1], "float32")
                mark[start : start + k] = 1.0
                pieces.append(tokens[0])
                piece_marks.append(mark)
                have += tokens.shape[1]
            buffers[row] = np.concatenate(pieces)
            marks[row] = np.concatenate(piece_marks)
        tokens = np.stack([b[: train_length + 1] for b in buffers])
        weights = np.stack([m[1 : train_length + 1] for m in marks])
        buffers = [b[train_length:] for b in buffers]
        marks = [m[train_length:] for m in marks]
        inputs = {"tokens": tokens[:, :-1], "reset": reset}
        yield inputs, tokens[:, 1:], weights


def build_model(task, fam_length, memory_segments, args):
    model = PassKeyModel(
        vocabulary_size=task.vocabulary_size,
        batch_size=args.batch_size,
        num_layers=args.num_layers,
        hidden_dim=args.hidden_dim,
        num_heads=args.num_heads,
        block_size=args.block_size,
        memory_segments=memory_segments,
        fam_length=fam_length,
        state_passing=args.reset_probability < 1.0,
        fam_normalization=bool(fam_length and args.fam_normalization),
    )
    model.build()
    return model


def train(model, task, args, steps, train_length, longest_filler, verbose=1):
    rng = np.random.default_rng(args.seed)
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate,
        steps,
        alpha=0.05,
        warmup_target=None,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=schedule,
            weight_decay=args.weight_decay,
            clipnorm=1.0,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["sparse_categorical_accuracy"],
    )
    data = training_batches(
        task,
        rng,
        args.batch_size,
        train_length,
        longest_filler,
        steps,
        curriculum_steps=int(args.curriculum * steps),
        reset_probability=args.reset_probability,
    )
    epochs = max(1, min(args.epochs, steps))
    start = time.time()
    history = model.fit(
        data,
        steps_per_epoch=steps // epochs,
        epochs=epochs,
        verbose=verbose,
    )
    return time.time() - start, history.history


# === Evaluation through the constant-memory streaming path ===


def _chunk_lengths(total, block_size, chunk_size):
    """Block-aligned chunks covering `total` tokens (a multiple of the block
    size): full `chunk_size` chunks, then single blocks, so that a compiled
    step only ever sees two chunk shapes."""
    full, rest = divmod(total, chunk_size)
    return [chunk_size] * full + [block_size] * (rest // block_size)


def stream_chunk(model, tokens, states):
    """One compiled streaming step: `(logits, states)` as NumPy arrays.

    On JAX `predict_on_batch` compiles it (one program per chunk shape). On
    TensorFlow the step runs eagerly: Keras' compiled predict function
    relaxes the sequence length to `None` after two shapes, and the layer
    needs a static length. PyTorch runs eagerly anyway.
    """
    inputs = {"tokens": tokens, "states": states}
    if keras.backend.backend() == "jax":
        return model.predict_on_batch(inputs)
    logits, states = model(inputs, training=False)
    to_numpy = ops.convert_to_numpy
    return to_numpy(logits), [
        {k: to_numpy(v) for k, v in state.items()} for state in states
    ]


def initial_states(model, batch):
    states = []
    for block in model.blocks:
        state = block.get_initial_state(batch)
        states.append({k: ops.convert_to_numpy(v) for k, v in state.items()})
    return states


def evaluate(
    model, task, filler_length, num_samples, batch_size, rng, chunk_size
):
    """Pass-key accuracy (whole key exact) at one filler length, and the
    root-mean-square of the FAM before the question (`None` for BSWA).

    Sequences are streamed chunk by chunk through `TransformerFAM`'s state,
    so memory does not grow with the filler. The key digits are scored
    under teacher forcing, which gives the same exact-match accuracy as
    greedy decoding (greedy decoding is right iff every digit's argmax is).
    """
    size = model.block_size
    k = task.key_digits
    correct, fam_rms = 0, []
    for begin in range(0, num_samples, batch_size):
        batch = min(batch_size, num_samples - begin)
        tokens, keys, start = task.batch(rng, batch, filler_length)
        inputs = tokens[:, :-1]
        length = inputs.shape[1]
        tail = length % size
        if tail < k:
            tail += size
        bulk = length - tail
        states = initial_states(model, batch)
        position = 0
        for n in _chunk_lengths(bulk, size, chunk_size):
            chunk = inputs[:, position : position + n]
            _, states = stream_chunk(model, chunk, states)
            position += n
        if model.fam_length:  # How large the FAM is after the filler.
            fam_rms += [np.sqrt(np.mean(state["fam"] ** 2)) for state in states]
        padded = np.zeros((batch, 2 * size), dtype="int32")
        padded[:, :tail] = inputs[:, bulk:]
        logits, _ = stream_chunk(model, padded, states)
        answer = tail - k + np.arange(k)
        predicted = np.argmax(logits[:, answer], axis=-1)
        correct += int(
            np.sum(np.all(predicted == task.digit_ids[keys], axis=1))
        )
    return correct / num_samples, float(np.mean(fam_rms)) if fam_rms else None


# === The experiment ===

MODELS = {
    # name: (fam_length, memory_segments)
    "FAM": None,
    "BSWA M0": (0, 0),
    "BSWA M1": (0, 1),
    "BSWA M2": (0, 2),
}


def receptive_field(args, memory_segments):
    return args.num_layers * (memory_segments + 1) * args.block_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--output-dir", default="passkey_results", help="Output folder.")
    add("--seed", type=int, default=0)
    add("--key-digits", type=int, default=1, help="Digits of the key.")
    add("--filler", default="repeated", choices=("repeated", "random"))
    add("--train-length", type=int, default=256, help="Training tokens.")
    add(
        "--longest-filler",
        type=int,
        default=480,
        help="Longest training filler (episodes span several segments).",
    )
    add(
        "--curriculum",
        type=float,
        default=0.3,
        help="Fraction of steps over which the longest filler grows.",
    )
    add("--fam-steps", type=int, default=800, help="FAM training steps.")
    add("--bswa-steps", type=int, default=400, help="Steps per BSWA model.")
    add(
        "--bswa-train-length",
        type=int,
        default=64,
        help="BSWA training segment (it cannot see further anyway).",
    )
    add("--bswa-longest-filler", type=int, default=128)
    add("--batch-size", type=int, default=32)
    add("--epochs", type=int, default=5, help="Progress-bar epochs.")
    add("--learning-rate", type=float, default=3e-3)
    add("--weight-decay", type=float, default=0.01)
    add(
        "--reset-probability",
        type=float,
        default=0.2,
        help="Chance per step that a row starts a fresh stream from the "
        "initial FAM (1 disables state passing).",
    )
    add("--num-layers", type=int, default=2)
    add("--hidden-dim", type=int, default=64)
    add("--num-heads", type=int, default=4)
    add("--block-size", type=int, default=16)
    add("--fam-length", type=int, default=8)
    add("--fam-memory-segments", type=int, default=0)
    add(
        "--fam-normalization",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Rescale the carried FAM to unit RMS after every block.",
    )
    add("--bswa-memory-segments", type=int, nargs="*", default=[0, 1, 2])
    add(
        "--eval-lengths",
        type=int,
        nargs="+",
        default=[0, 64, 128, 256, 1024, 4096, 16384, 65536, 262144],
        help="Filler lengths to evaluate.",
    )
    add(
        "--bswa-max-length",
        type=int,
        default=1024,
        help="Longest filler evaluated for BSWA (chance beyond its field).",
    )
    add("--eval-samples", type=int, default=100)
    add(
        "--long-eval-samples",
        type=int,
        default=20,
        help="Sequences per length from --long-eval-from filler tokens on.",
    )
    add("--long-eval-from", type=int, default=100_000)
    add("--eval-batch-size", type=int, default=100)
    add(
        "--chunk-size",
        type=int,
        default=4096,
        help="Tokens per streamed chunk (a multiple of the block size).",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    task = PassKeyTask(args.key_digits, args.filler)
    print(
        f"Backend {keras.backend.backend()}; vocabulary "
        f"{task.vocabulary_size}; key digits {args.key_digits}; training "
        f"sequences of {args.train_length} tokens"
    )
    specs = {"FAM": (args.fam_length, args.fam_memory_segments)}
    for m in args.bswa_memory_segments:
        specs[f"BSWA M{m}"] = (0, m)
    results = {
        "config": vars(args),
        "backend": keras.backend.backend(),
        "chance": 10.0**-args.key_digits,
        "models": {},
    }
    total_start, cpu_start = time.time(), time.process_time()
    for name, (fam_length, memory) in specs.items():
        steps = args.fam_steps if fam_length else args.bswa_steps
        print(f"\n== {name}: training {steps} steps")
        model = build_model(task, fam_length, memory, args)
        if fam_length:
            length, longest = args.train_length, args.longest_filler
        else:
            length, longest = args.bswa_train_length, args.bswa_longest_filler
        train_seconds, history = train(
            model, task, args, steps, length, longest
        )
        rng = np.random.default_rng(args.seed + 1)
        lengths = [
            n
            for n in args.eval_lengths
            if fam_length or n <= args.bswa_max_length
        ]
        accuracy, seconds, fam_rms = {}, {}, {}
        eval_start = time.time()
        progress = _progress(lengths, f"{name} eval")
        for n in progress:
            if accuracy and hasattr(progress, "set_postfix_str"):
                progress.set_postfix_str(
                    ", ".join(f"{k}: {a:.2f}" for k, a in accuracy.items())
                )
            length_start = time.time()
            accuracy[n], fam_rms[n] = evaluate(
                model,
                task,
                n,
                _eval_samples(args, n),
                args.eval_batch_size,
                rng,
                args.chunk_size,
            )
            seconds[n] = time.time() - length_start
        eval_seconds = time.time() - eval_start
        print(
            f"{name}: train {train_seconds:.0f}s, eval {eval_seconds:.0f}s, "
            + ", ".join(f"{n}: {a:.2f}" for n, a in accuracy.items())
        )
        results["models"][name] = {
            "fam_length": fam_length,
            "memory_segments": memory,
            "receptive_field": None
            if fam_length
            else receptive_field(args, memory),
            "train_steps": steps,
            "train_length": length,
            "longest_filler": longest,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "final_train_accuracy": history["sparse_categorical_accuracy"][-1],
            "accuracy": {str(n): a for n, a in accuracy.items()},
            "fam_rms": {str(n): r for n, r in fam_rms.items()},
            "eval_samples": {str(n): _eval_samples(args, n) for n in lengths},
            "eval_seconds_by_length": {str(n): t for n, t in seconds.items()},
        }
    results["total_seconds"] = time.time() - total_start
    results["cpu_seconds"] = time.process_time() - cpu_start
    results["load_average"] = os.getloadavg()
    print("\n" + format_table(results))
    with open(os.path.join(args.output_dir, "passkey.json"), "w") as f:
        json.dump(results, f, indent=2)
    from keras_fam.plotting import plot_passkey

    plot_passkey(results, os.path.join(args.output_dir, "passkey.png"))
    print(
        f"Total {results['total_seconds']:.0f}s wall, "
        f"{results['cpu_seconds']:.0f}s CPU (load average "
        f"{results['load_average'][0]:.1f}). Wrote "
        f"{args.output_dir}/passkey.json and passkey.png"
    )
    return results


def _eval_samples(args, filler_length):
    """Sequences evaluated at one filler length: `--eval-samples`, or
    `--long-eval-samples` beyond `--long-eval-from` filler tokens (the
    streaming cost grows with the length)."""
    if filler_length >= args.long_eval_from:
        return args.long_eval_samples
    return args.eval_samples


def _progress(items, description):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=description, file=sys.stdout)


def format_table(results):
    lengths = sorted(
        {int(n) for m in results["models"].values() for n in m["accuracy"]}
    )
    header = ["model"] + [str(n) for n in lengths]
    rows = [header]
    for name, entry in results["models"].items():
        row = [name]
        for n in lengths:
            a = entry["accuracy"].get(str(n))
            row.append("-" if a is None else f"{a:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "Pass-key accuracy by filler length (tokens)\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
