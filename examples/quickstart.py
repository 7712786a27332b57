"""Quickstart: a TransformerFAM remembers what sliding-window attention forgets.

The task: each sequence starts with a key token, then random filler tokens; at
every position of the last block the model must output the key. With
`memory_segments=0` a token sees only its own block, so TransformerBSWA cannot
know the key once it lies in an earlier block; TransformerFAM carries it in its
feedback memory from block to block.

Run it with any backend:

    KERAS_BACKEND=jax python examples/quickstart.py
    KERAS_BACKEND=torch python examples/quickstart.py --steps 100
"""

import argparse

import keras
import numpy as np

from keras_fam.layers import TransformerFAM


def make_data(rng, num_sequences, length, vocabulary_size, block_size):
    """Key-recall sequences: token 0 is the key, the rest is filler.

    Returns token ids `(N, length)`, targets `(N, block_size)` (the key,
    repeated over the last block) and the keys `(N,)`.
    """
    keys = rng.integers(1, vocabulary_size, size=(num_sequences,))
    tokens = rng.integers(1, vocabulary_size, size=(num_sequences, length))
    tokens[:, 0] = keys
    targets = np.repeat(keys[:, None], block_size, axis=1)
    return tokens, targets, keys


def build_model(args, fam_length):
    """Embedding, a stack of TransformerFAM layers, a classifier over the
    last block."""
    tokens = keras.Input((args.length,), dtype="int32")
    x = keras.layers.Embedding(args.vocabulary_size, args.width)(tokens)
    for _ in range(args.num_layers):
        x = TransformerFAM(
            num_heads=2,
            block_size=args.block_size,
            memory_segments=0,
            fam_length=fam_length,
        )(x)
    x = keras.layers.LayerNormalization()(x[:, -args.block_size :])
    logits = keras.layers.Dense(args.vocabulary_size)(x)
    model = keras.Model(tokens, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--vocabulary-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = make_data(
        rng,
        args.steps * args.batch_size,
        args.length,
        args.vocabulary_size,
        args.block_size,
    )
    test = make_data(
        rng, 512, args.length, args.vocabulary_size, args.block_size
    )
    chance = 1.0 / (args.vocabulary_size - 1)
    results = {}
    for name, fam_length in (("TransformerFAM", 4), ("TransformerBSWA", 0)):
        print(f"\n== {name} (fam_length={fam_length}, memory_segments=0)")
        model = build_model(args, fam_length)
        model.fit(train[0], train[1], batch_size=args.batch_size, epochs=1)
        predictions = model.predict(test[0], verbose=0).argmax(-1)[:, -1]
        results[name] = float(np.mean(predictions == test[2]))
    print(
        f"\nKey recall over {args.length // args.block_size} blocks "
        f"(chance {chance:.2f}):"
    )
    for name, accuracy in results.items():
        print(f"  {name:16s} accuracy {accuracy:.2f}")
    return results


if __name__ == "__main__":
    main()
