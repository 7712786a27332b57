"""Convert a KerasHub preset to TransformerFAM, LoRA-fine-tune it, generate.

The paper's recipe (arXiv 2404.09173, section 3): FAM adds no weights beyond
a few summary embeddings, so a pretrained checkpoint is loaded as is, turned
into a TransformerFAM (block sliding window attention plus feedback memory)
and adapted with LoRA on attention and feedforward layers.

`--preset` is anything KerasHub accepts (`gemma2_2b_en`, `hf://...`,
`kaggle://...`, a local directory) of a supported family (Gemma, Gemma 2,
Llama, Llama 3, Mistral, GPT-2). Without it the script builds a tiny random
Llama preset with a freshly trained SentencePiece tokenizer (the test
helpers in `tests/models/tiny_presets.py`), so it runs offline in a minute.

The task is a long-document one: each document states a key word, goes on
for several blocks of filler, and asks for the key again at the end; with
`memory_segments=0` only the FAM can carry the key across blocks.

    KERAS_BACKEND=jax python examples/finetune_preset_lora.py
    KERAS_BACKEND=torch python examples/finetune_preset_lora.py --epochs 2
    python examples/finetune_preset_lora.py --preset gemma2_2b_en \\
        --block-size 1024 --fam-length 64 --sequence-length 8192
"""

import argparse
import os
import sys
import tempfile

import keras
import numpy as np

import keras_fam

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_local_preset(directory):
    """A tiny random Llama preset with a tokenizer trained here."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
    from tiny_presets import build_tiny_preset

    return build_tiny_preset("llama", directory)


def documents(rng, num_documents, num_filler_sentences):
    """Key-recall documents: `the key is K . <filler> the key is K .`"""
    from_words = "red blue green cat dog bird fish tree house river stone"
    keys = from_words.split()
    filler = (
        "the dog runs under the tree . a bird sings near the river . "
        "one cat reads a long book today . the fish keeps a secret . "
        "two stones sit far over the house ."
    ).split(" . ")
    texts = []
    for _ in range(num_documents):
        key = rng.choice(keys)
        body = " . ".join(rng.choice(filler, size=num_filler_sentences))
        texts.append(f"the key is {key} . {body} . the key is {key} .")
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--memory-segments", type=int, default=0)
    parser.add_argument("--fam-length", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=96)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--filler-sentences", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as scratch:
        preset = args.preset or tiny_local_preset(os.path.join(scratch, "tiny"))
        model = keras_fam.models.FAMCausalLM.from_preset(
            preset,
            block_size=args.block_size,
            memory_segments=args.memory_segments,
            fam_length=args.fam_length,
        )
        print(
            f"{preset}: {model.backbone.num_layers} FAM layers, block "
            f"{args.block_size}, {args.memory_segments} memory segments, "
            f"FAM length {args.fam_length}"
        )
        model.preprocessor.sequence_length = args.sequence_length
        model.backbone.enable_lora(args.lora_rank)
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        print(f"LoRA rank {args.lora_rank}: {trainable} trainable parameters")

        texts = documents(rng, args.documents, args.filler_sentences)
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate),
            sampler="greedy",
        )
        history = model.fit(
            texts, batch_size=args.batch_size, epochs=args.epochs, verbose=1
        )
        losses = history.history["loss"]
        print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}")

        prompt = texts[0].rsplit(" the key is", 1)[0] + " the key is"
        output = model.generate(prompt, max_length=args.sequence_length)
        print("prompt ends:", prompt[-40:])
        print("generated:  ", output[len(prompt) :])
        if args.preset is None:
            print(
                "(a tiny random model learns the text's format in a few "
                "steps, not the key; pass --preset for a real checkpoint)"
            )

        # The fine-tuned model is a preset itself (LoRA merged on save).
        saved = os.path.join(scratch, "fam_preset")
        model.save_to_preset(saved)
        reloaded = keras_fam.models.FAMCausalLM.from_preset(saved)
        print("reloaded from", saved, "->", type(reloaded).__name__)


if __name__ == "__main__":
    main()
