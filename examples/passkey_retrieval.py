"""PassKey retrieval the paper's way: a pretrained checkpoint, FAM, LoRA, fit.

The paper's pipeline (arXiv 2404.09173, Fig. 3a) end to end through the
public API of keras_fam and KerasHub:

1. **Base model.** A small KerasHub `LlamaCausalLM` (full causal attention,
   its own SentencePiece tokenizer) pretrained within its context on
   PassKey-format text, saved with `save_to_preset`. It stands in for a
   downloaded Gemma/Llama checkpoint (which cannot be fetched here): the
   rest of the job loads it by path, the same code path a preset name
   takes. It is built once and cached in `--base-preset` (default
   `passkey_results/base_preset`); `--rebuild-base` builds it again, and so
   does any change of its flags. Its exact-match accuracy on keys inside its
   context is measured and kept in the JSON.
2. **FAM.** `FAMCausalLM.from_preset(base, block_size=..., memory_segments=0,
   fam_length=..., fam_normalization=True, fam_write_gate="hard",
   fam_write_threshold=0.5, fam_write_threshold_jitter=0.1,
   training_streams=...)`, then
   `backbone.enable_lora(rank)`: the trainable weights are the LoRA
   adapters and the summary embeddings only (printed). `fit` trains on
   streams from `keras_fam.training.streamed_dataset`: every batch row
   is a stream cut into segments, continued from that row's own final FAM
   at the next step (per-row state passing, `training_streams`); with
   `document_resets=True` (the default here) each PassKey episode is a
   stream of its own, started from the initial FAM (`--no-document-resets`
   lays episodes end to end instead). After `fit`,
   `keras_fam.training.calibrate_write_threshold` sets the write gate's
   threshold that reads validation sequences best (`--calibrate-
   thresholds`).
3. **BSWA baselines** M0, M1, M2: the same preset, `fam_length=0`, the same
   LoRA rank, `fit` on single episodes.
4. **Evaluation** through `keras_fam.state.FAMStreamer` (compiled steps on
   JAX and TensorFlow, fixed-size state): each sequence is streamed to the
   question, and the key's digits are read from the logits of the answer
   (teacher forcing: the whole key is right iff greedy decoding gives it).

    python examples/passkey_retrieval.py                  # JAX (default)
    python examples/passkey_retrieval.py --eval-lengths 0 1024 262144
    KERAS_BACKEND=torch python examples/passkey_retrieval.py

The prompt (the paper's): "There is an important info hidden inside a lot
of irrelevant text. Find it and memorize it. I will quiz you about the
important information there. The pass key is 71432. Remember it. 71432 is
the pass key. <filler> What is the pass key? The pass key is 71432." The
filler repeats "The grass is green. The sky is blue. The sun is yellow.
Here we go. There and back again." The key has `--key-digits` digits
(default 5, chance 1e-5); accuracy is exact match of the whole key.

Prints a table (model x filler length) and writes `passkey.json` and
`passkey.png` to `--output-dir`.

Defaults and why: the base (width 64, 2 layers, 4 heads, context 128,
vocabulary 256, AdamW 3e-3, batch 32, loss on every predictable token)
reaches its target in about 1,200 steps: exact match stays near 0 until
~700 steps, then jumps (0.26 at 900, 0.77 at 1,000, 1.00 at 1,200) as the
copying circuit forms; it then scores 0.996 on 500 fresh in-context
sequences. FAM: block 32, no memory segment (the paper's PassKey
setting: the key, in the prompt's second block, never shares a window
with the answer, so the answer must come from the memory), 16 FAM
vectors, FAM normalisation, the hard FAM write gate (`fam_write_gate=
"hard"`: a FAM vector is updated at a block boundary only when more than
half of its query's attention went to the block, `fam_write_threshold=
0.5`, else carried exactly; in training each gate's threshold is drawn
from 0.4-0.6 at every block, `fam_write_threshold_jitter=0.1`, and the
inference threshold is chosen among 0.40, 0.45, ... 0.70 by the lowest
exact match over fillers 0 and 1,024 of 100 validation sequences drawn
from their own seed), LoRA rank 16 (about 62k trainable weights
of the model's ~165k), AdamW 5e-3 with cosine decay, 1,500 steps of 32
streams x 192 tokens, every episode a stream of its own that starts from
the initial FAM (`streamed_dataset(..., document_resets=True)`: as every
evaluation sequence does, and as the paper's fine-tuning sequences each
started with the prompt), and an adaptive curriculum (`--advance-at
0.9`): keys of 1 digit at first (each episode draws its key length up to
the current bound), fillers uniform up to 40 tokens until all 5 digits
are in (`--key-stage-fillers uniform`: log-uniform, half of the 1-digit
answers share the key's block and need no memory), half of the
questions moved to start in one block with the answer in the next
(`--crossing-share 0.5`, below), then the longest
filler doubles (80, 160, ... 3,072 tokens, log-uniform), half of the
episodes in the new range; the next stage starts when the training digit
accuracy over the last 50 steps (weighted by the digits each step
answered) reaches 0.9, and 0.95 from the 5-digit
stage on (`--filler-advance-at`; runs learn the key digits at different
speeds: 475-800 steps for all five; a run still on 1-digit keys at step
300 starts over, once). Each episode asks its question again, after
16-64 filler tokens, while question and answer fit in its last training
segment (`--ask-again`: segments that document resets would pad; 2.5
answers per segment in the 5-digit stage instead of 1). `RollbackOnCollapse`
guards the fit (a 50-step digit accuracy below half of the best so far
restores the weights of 100 steps before). A long
episode spans up to 17 segments of 192 tokens; each batch row carries
its own FAM from one `fit` step to the next (per-row state passing,
gradients stop at segment boundaries), so the answer's loss is taken on
a FAM that has crossed up to 96 filler blocks (its gradient reaches back
through the last segment's 6 blocks only).

Status (issue 9, shared 2-core CPU): the default command reads 0.96 at
filler 0 and 1.00 at 32 / 96 / 1k / 3k / 16k / 64k / 262k (seed 0,
alone, base cached, 569 s wall; 535 s building the base first), and
BSWA reads 0.00 beyond its field. All six seeds of the defaults hold the
key far beyond their training (0.63-1.00 at 16k, flat in distance), three
of them at 0.95-1.00; filler 0 reads 0.80-1.00 (the last bullet below;
the README has the table of seeds).
What we measured, in order (LoRA
rank 16 unless said; exact match on held-out sequences; 5-digit keys
unless said):
- Without the key curriculum nothing beyond the window is learned: block
  32, M1, 1e-2, 400 steps: 1.00 inside the M1 window, 0.00 beyond (the
  previous defaults); fillers all beyond the window (64-480): per-digit
  accuracy at chance (0.10) after 400 steps; full fine-tuning instead of
  LoRA (3e-3): the same; M0 with fillers 0-160: chance after 1,150 steps;
  M0, full fine-tuning, fillers 0-40: chance after 500 steps.
- The FAM holds the key; the answer cannot read it. Before any training
  a ridge probe reads every digit from the layers' FAM (1.00 after 7
  filler blocks at a fixed filler; 0.89-1.00 for layer 1 over fillers of
  128-255), and changing the key moves the carried FAM by 6-20% of its
  size for ~500 tokens; but the probe reads nothing (0.11) from the
  answer position's final hidden state once the filler length varies.
- A 1-digit key through the FAM (M0, fillers 0-40) is learned in 100
  steps, by LoRA (5e-3) or full fine-tuning (3e-3): 1.00. So reading the
  memory is learnable; five digits in order is the plateau.
- The key curriculum breaks it: M0, fillers 0-40, single episodes, 5e-3:
  5-digit exact match 0.92-0.95 at steps 700-800; with fillers 0-160:
  0.28 at 600 steps (first digit 1.00, the others 0.56-0.83), still
  rising.
- Streams of episodes (the previous default: each row's next episode
  started after the previous one's key, resets with probability 0.2 per
  step, fillers to 480, 1,000 steps) reached 0.39 / 0.07 / 0.03 / 0.07 /
  0.01 at filler 0 / 64 / 128 / 256 / 1k. Padded single episodes from a
  fresh FAM (the default's recipe without `fit`'s streams, 1,500 steps,
  fillers to 224): 1.00 / 0.83 / 0.81 at 0 / 128 / 256, then 0.00 at 1k
  and 4k. Runs of one recipe differ by the draw (when the copying circuit
  forms varies by a few hundred steps). **Longer episodes, whole:** the
  same with fillers up to 480 (episodes of up to 576 tokens, 18 blocks,
  back-propagated whole; 1,500 steps, 1,221 s at load ~1): 1.00 at filler
  0 / 128 / 256 / 480 (100 sequences each), 0.03 at 1k, 0.00 at 4k. So
  every trained distance is read perfectly; these were the previous
  defaults (their run, through `fit` on streams, drew 0.96 / 0.94 /
  0.85 / 0.58 at 0 / 64 / 128 / 480, and 0.00 from 9k).
- Ungated, distance is what is missing: no run holds the key over more
  blocks than it was trained on. The memory's own dynamics explain part
  of it: the spread of the carried FAM across 8 keys (same filler),
  relative to the FAM's size, shows how much of the key it still holds.
  In the converted, untrained model it falls from 0.034 / 0.097 (layers
  0 / 1) at 96 tokens to 0.006 / 0.005 at 1,120: every FAM update adds
  an update of 0.2-0.8x the FAM's own size, so the key fades in ~30
  blocks. Carrying the FAM at a larger RMS (`r`: the same as scaling
  each update by `1 / r`, since every use of the FAM is normalised)
  slows that: at r = 16 the spread falls only from 0.0024 / 0.006 to
  0.0007 / 0.0038 at 8,288 tokens, at r = 64 from 0.0006 / 0.0015 to
  0.0005 / 0.0012. But the imprint is r times smaller: at r = 16 from
  the start LoRA learned nothing in 500 steps (per-digit accuracy at
  chance), and growing r from 1 to 16 during training (steps 500-1,300)
  ended at 0.79 / 0.36 / 0.15 at 0 / 128 / 256 and 0.00 from 1k, with
  layer 0's key spread gone by 2k tokens and layer 1's growing to 0.6
  (the trained memory diverges instead of holding). So neither option is
  in the library.
- **The write gate latches, when it is learned.** `fam_write_gate=
  "hard"`, at first with a fixed threshold, updated a FAM vector only when
  most of its attention went to the block (not to the FAM): a closed gate
  carries the FAM exactly, so whatever the model stops writing on filler
  blocks it holds at any distance. Padded single episodes outside `fit`
  (as above, fillers to 224, 1,200 steps): 0.63 / 0.67 / 0.67 at 0 / 128 /
  224 and **0.62 / 0.74 / 0.61 at 1k / 4k / 16k** (flat: the first run
  ever to read keys beyond its training range); fillers to 96, 1,500
  steps: 1.00 / 0.91 at 0 / 96, **0.59 / 0.63 at 1k / 16k**. In that model
  every one of layer 1's 16 FAM vectors stays closed on every filler block
  from the 7th block on; 4 of layer 0's write on every block. But it is a
  draw: the same with fillers to 224 and 1,800 steps read 0.99 / 0.83 in
  range and 0.01 at 1k (3 of layer 1's 16 vectors open on every third
  filler block, the filler's period, and the key leaks away), and through
  `fit` (the defaults then, fillers to 96) 3 of 5 runs read nothing beyond
  the range, the others 0.04-0.12 (the default command alone on the CPU:
  786 s wall with the base cached, FAM fit 513 s). The soft gate
  (`"soft"`, the share itself) does not latch: 0.92 / 0.84 / 0.46 at 0 /
  128 / 224, 0.00 from 1k. A loss on the mean write share (0.0003-0.01 per
  unit, tried to pull gates closed) stopped all learning: per-digit
  accuracy at chance after 700 steps (Adam takes full-size steps along a
  steady gradient however small its weight), so it is not in the library.
- **Long streamed fillers and a per-key threshold make the latch the
  rule.** Through `fit` with fillers of up to 3,072 tokens streamed over
  192-token segments (1,500 steps; two runs at once, load ~4): with the
  gate's old fixed threshold (write when share > 0.5) `--seed 0` read
  0.97 / 0.10 at 0 / 96 and 0.00 from 1k, `--seed 1` **1.00 / 0.99 /
  0.87 / 0.71 / 0.68** at 0 / 96 / 1k / 4k / 16k; starting each training
  filler at a random token of its cycle (`--random-filler-phase`):
  0.66 / 0.75 / 0.44 / 0.42 / 0.51 and 0.81 / 0.25 / 0.00 / 0.00 / 0.00
  (in that run layer 1's gates never closed: with uniform attention a
  FAM vector puts 2/3 of its mass on the 32 block tokens, so a fixed 0.5
  writes every block, and the model must learn to close every gate);
  3,000 steps: 0.93 / 0.80 / 0.02 / 0.00 / 0.00 (a few of layer 1's
  vectors still writing on 1-5% of the filler blocks) and 0.95 / 0.82 /
  0.82 / 0.81 / 0.77 (layer 1 writes on the key's block only). With the
  threshold where attention per key is equal on block and FAM (now
  `"hard"`; uniform attention sits on it, and a converted model's FAM
  vectors already open on the key's block, 0.93 of layer 1's, and on
  ~0.3 of filler blocks): every run latched. 1,500 steps: 0.70 / 0.56 /
  0.48 / 0.61 / 0.52 and 0.65 / 0.62 / 0.65 / 0.69 / 0.70; 3,000 steps:
  0.97 / 0.21 / 0.29 / 0.26 / 0.22 and 0.89 / 0.84 / 0.56 / 0.70 / 0.65;
  the default run above. In the latched models the key's block opens
  only 44-63% of a layer's FAM vectors, and in-range accuracy is no
  higher than far beyond it.
- **Gates that start open: a fixed threshold of 0.5 again, in training
  and at inference** (`fam_write_threshold=0.5`, the default now). This
  session (one new base preset, the recipe above): per-key, the default
  run read only the first digit (exact match 0.00 everywhere, digits 2-5
  at chance). At 0.5, seven runs (exact match at 0 / 1k / 16k; 300
  sequences, 100 in the default run): 1.00 / 0.96 / 0.97, 0.82 / 0.99 /
  0.99, 0.99 / 0.88 / 0.84 (the default run above), 0.98 / 0.74 / 0.50,
  0.41 / 0.06 / 0.05, and twice a collapse to chance while the filler
  grew (steps 600-800; finite weights, the digit distribution went
  uniform and stayed). The run that read 0.82-0.99 and the example's own
  seed-0 run that collapsed had the same recipe and seed: outcomes are
  draws, not reproducible run to run here. A training threshold that
  differs from the inference one is worse: the same four models read
  per-key gave 0.07-0.13, 0.98-1.00, 0.00-0.02 and 0.02-0.44. Forward
  writes on every block in training (straight-through gradient of the
  share) and per-key at inference: 0.99 / 0.80 / 0.79 / 0.77 at 0 / 96 /
  1k / 16k once, 0.00 twice (only digit 2, or digits 2 and 4, read).
  Learning rate 1e-2 (per-key): chance. 32 FAM vectors with the gate
  open at the start (`--fam-length 32 --fam-write-threshold 0.4`; at 0.5
  it would sit on the per-key threshold 32 / 64), one run: collapsed to
  chance by step ~1,000 (0.35 s per step against 0.24 s).
- **An adaptive curriculum** (the default now). The fixed schedule moved
  on at set steps whether or not a run had learned its stage, and runs
  learn at different speeds (all five key digits took 475-800 steps
  below). Now each stage (one more digit, then the longest filler
  doubled) starts when the training digit accuracy over 50 steps reaches
  0.9. Exact match at 0 / 96 / 1k / 16k (100 sequences each; runs two at
  a time), in the order tried:
  - fixed schedule with `RollbackOnCollapse` (2 runs): 0.00 everywhere
    (training accuracy settled at 0.43, no collapse to roll back), and
    1.00 / 0.08 / 0.00 / 0.00 (layer 1's gates open on 94% of the filler
    blocks).
  - adaptive, fillers log-uniform from 0 and key lengths uniform up to
    the stage's (4 runs): 1.00 / 0.95 / 0.91 / 0.90, 0.99 / 0.99 / 1.00 /
    0.98, 0.03 (stuck at 3 digits from step 250 to 800: it never reached
    the long fillers), and 1.00 / 0.58 / 0.00 / 0.00 (layer 1's gates
    never closed: short fillers, most of the episodes, carried the
    accuracy that moved it on).
  - then half of a filler stage's episodes in its new range (4 runs):
    1.00 / 1.00 / 1.00 / 1.00, 0.93 / 1.00 / 0.98 / 0.93, 0.69 / 0.57 /
    0.25 / 0.15 (after a rollback at step 725: 0.49 against a best of
    0.98), 0.55 / 0.52 / 0.38 / 0.42. The last two never bound the later
    digits firmly: at filler 0 a key has at most one wrong digit, most
    often another digit of the same key, and training accuracy stayed at
    0.86-0.92 from the 5-digit stage on (0.97-0.99 in the good runs).
  - then (the default) keys of all 5 digits once the filler grows (the
    metric then measures the task evaluated) and half of a key stage's
    keys with its newest digit count (2 runs): 1.00 / 0.99 / 0.99 / 1.00,
    and 0.99 / 0.98 / 0.66 / 0.49 (layer-1 gates that write on a few
    percent of filler blocks).
  So 5 of these 10 runs hold the key at 16k with 0.90-1.00, against 3 of
  9 with the fixed schedule (0.84-0.99), and the good runs are better;
  the others are short of binding the later digits or of closing every
  gate on filler. The next run, the default command alone, never left
  the first stage: 0.60 digit accuracy on 1-digit keys from step 50 to
  1,500, and 0.00 everywhere (every other run had left it by step 100-
  250). So a run still in the first stage after some steps now starts
  over, once (`--restart-stalled-after`: new LoRA factors, optimizer
  slots zeroed). At 400 steps the default run did (0.601 at step 425, as
  in a run stopped earlier: with one seed a run repeats here), learned
  1-digit keys 150 steps later, but took 325 steps for the second digit
  and ended on 3-digit keys: 0.02 at filler 0, 0.00 beyond. At 300 (the
  default now): 1-digit keys again by step 525, 3-digit keys at step
  1,000, 0.00 everywhere. After a restart this seed learns each digit
  more slowly than the runs that never stalled (225-475 steps against
  100-225): the default seed is a failing draw, and the README says so.
- **Uniform key-stage fillers, the question asked again, 0.95 for the
  later stages** (the defaults now). The default seed's first-stage
  stall: at 0.60 digit accuracy it answered every 1-digit key whose
  answer shares the key's block (fillers of 0-5 tokens: 48% of fillers
  log-uniform in [0, 40]) and none that needed the memory (0.06-0.24 at
  fillers of 10-38 tokens; layer 1's FAM vectors all wrote on the key's
  block, so the memory held the key: the readout was missing). With
  fillers uniform in [0, 40] in the key stages (15% local) it leaves the
  first stage at step 200. What fails after that depends on where the
  question falls. Every evaluated filler is a multiple of 32, so the
  question starts at token 23 of a block and its first 9 tokens end that
  block; filler 300 (question and answer in one block) read 0.92-1.00 in
  every run below. In a run that read 0.45 at 96 and 1.00 at 300, layer
  1's FAM vectors wrote on 0.52 of the block with the question's start
  (0.33 on filler blocks), and digits 3-4 fell to 0.64-0.67: that block
  holds the words of the key's block ("the pass key"), and a model must
  learn to write on one and not the other. Answers were scarce: one per
  episode, so at most one per 192-token segment (document resets pad the
  rest) and 0.26 per segment in the last stage. Now each episode asks
  again after 16-64 filler tokens while question and answer fit in its
  last segment (`--ask-again`: 2.5 answers per segment in the 5-digit
  stage), and the stages from the 5-digit one on end at 0.95
  (`--filler-advance-at`). Exact match at 0 / 96 / 300 / 1k / 16k, seeds
  0 and 1, two runs at a time: uniform key-stage fillers, 0.91 / 0.45 / -
  / 0.35 / 0.40 and 0.97 / 0.61 / - / 0.32 / 0.22; + 0.95 from the 5-digit
  stage, 0.12 / 0.64 / 0.92 / 0.46 / 0.14 (640-token fillers at step
  1,375) and 0.99 / 1.00 / 0.98 / 0.76 / 0.31; + asked again (the
  defaults), 0.97 / 0.97 / 1.00 / 0.70 / 0.67 and 0.98 / 0.98 / 1.00 /
  0.99 / 0.94; + a cosine floor of 0.3 (`--learning-rate-floor`), 0.87 /
  0.84 / 1.00 / 0.85 / 0.81 and 0.84 / 0.99 / 1.00 / 0.70 / 0.59.
  Seeds 2 and 3 of the defaults: 0.97 / 0.95 / 1.00 / 0.98 / 0.95, and
  0.00 (a collapse to chance in the 4-digit stage at step 675; three
  rollbacks to step 575 collapsed again).
- **Where the question falls in its block; exact training windows.**
  Accuracy by the question's offset in its block (fillers 1,024-1,054, 100
  sequences each) in two models of an earlier recipe that read 0.91 and
  1.00 at 1k: 14 of 16 offsets read 0.86-1.00, and the two where the key's
  digits are split by a block boundary or start one (question at token 19
  or 21 of its block) 0.01-0.28: with no memory segment the answer's later
  digits see neither the question nor the digits before them, so the
  memory must carry where the answer is. The defaults' seed 0 (0.70 at 1k)
  lost middle digits where the question starts 9 tokens before the
  answer's block (token 23: every evaluated filler). Now half of the
  training questions are moved (their filler lengthened by less than a
  block) to an offset where question and answer cross a block boundary
  (`--crossing-share 0.5`: 73% of the questions cross, against 49%). Seed
  0 then reads 0.93 / 1.00 / 1.00 / 1.00 / 1.00 at 0 / 96 / 300 / 1k /
  16k, and at 1k 15 of its 16 offsets read 0.99-1.00, the split answer
  0.65 (from 0.01). The curriculum's windows read wrongly too: `LogWindow`
  recovered a window's mean from Keras' running means weighting every step
  alike, but a weighted metric's running mean weights each step by its
  answered digits, which jump when a stage adds a digit, and windows read
  up to 1.05 right after: stages advanced early. They are exact now
  (`SampleWeightTotal`, `LogWindow(weight_log= ...)`). Seeds 0-3 with both
  (0 / 96 / 300 / 1k / 16k): 0.93 / 1.00 / 1.00 / 1.00 / 1.00, 0.64 / 0.91
  / 0.94 / 0.02 / 0.00, 0.98 / 0.98 / 1.00 / 0.21 / 0.04, 0.26 / 0.32 /
  0.01 / 0.00 / 0.00 (and seed 4: 0.00-0.05 everywhere, never past the
  4-digit stage). With the early windows the same four read 0.93 / 1.00 /
  1.00 / 1.00 / 1.00, 0.19 / 0.83 / 0.99 / 0.77 / 0.78, 0.96 / 0.96 / 1.00
  / 0.92 / 0.89 and 0.91 / 0.95 / 0.97 / 0.71 / 0.13 (no collapse). Exact
  windows without crossing questions, seeds 0 and 1: 0.86 / 0.78 / 0.99 /
  0.70 / 0.78 and 0.90 / 0.83 / 0.95 / 0.41 / 0.05; with them and 0.9 for
  every stage (`--filler-advance-at none`), seeds 1 and 3: 0.52 / 0.92 /
  1.00 / 0.13 / 0.00 and 0.23 / 0.22 / 0.93 / 0.00 / 0.00. One memory
  segment (the answer's block sees the one before; key-stage fillers up to
  160 so the key can still lie beyond the window): both seeds stuck on
  3-digit keys from step 350, at 1.2x the step time. The failing runs are
  the slow ones: with exact windows they spend 275 to over 900 steps on
  5-digit keys at 40-token fillers, reach the long fillers late or never,
  and read nothing beyond what they trained on.
- **Crossing questions that keep the answer whole** (the default now).
  The moved questions were drawn at every offset where question and
  answer cross a block boundary, including the four (question at token
  17-20 of its block) where the boundary splits the answer itself: 17%
  of the training answers were split (10% unmoved), the hardest case
  with no memory segment (0.62-0.77 in the best models). The slow seeds'
  training digit accuracy then sat at 0.86-0.93 in the 5-digit stage for
  hundreds of steps, short of its 0.95. Now a moved question starts at
  token 21-31 of a block and its answer lies whole in the next (5% of
  the answers split, all unmoved). Seeds 0-5 (0 / 96 / 300 / 1k / 16k;
  100 sequences; two runs at a time): 1.00 / 1.00 / 1.00 / 1.00 / 1.00,
  0.81 / 0.99 / 1.00 / 1.00 / 0.99, 0.99 / 0.98 / 1.00 / 1.00 / 0.99,
  0.85 / 0.66 / 0.99 / 0.06 / 0.00, 0.06 / 0.10 / 0.37 / 0.08 / 0.10 and
  0.13 / 1.00 / 1.00 / 1.00 / 1.00: four of six hold the key at 1k and
  16k, against one of five before. Those four passed the 5-digit stage in
  100-325 steps (seeds 0-2 took 150-375 before); seed 3 took 425 and
  reached 640-token fillers only at step 1,325; seed 4 spent 425 and 525
  steps on 3- and 4-digit keys and reached 5 digits at step 1,375.
  Seeds 1, 3 and 5 miss at filler 0 only: seed 5 reads 1.00 at every
  even filler from 2 to 26 and, at filler 0, the key's second digit at
  chance (0.12). Only at filler 0 does the question start at token 23 of
  the key's own block. Batch 16 with 3,000 steps (the same tokens; a
  100-step window) was no better: seed 1 0.82 / 0.95 / 0.99 / 0.33 /
  0.00 (950 steps in the 5-digit stage), seed 4 0.00 (950 steps on
  2-digit keys). A higher learning rate saves one slow seed and breaks
  others. A cosine over 2,500 steps saved seed 3 (0.93 / 1.00 / 1.00 /
  1.00 / 1.00), but seed 4 collapsed (0.00). The rate held at its peak
  until the last stage, with `--rollback-learning-rate-factor 0.5`,
  made seeds 0, 3 and 4 collapse two or three times each in the key
  stages.
- **Gates with a margin, and the threshold chosen on validation** (the
  defaults now). A new machine built a different base from the same
  flags (1,200 steps, 0.996 in context, against 1,300 and 1.000; each
  machine rebuilds its own exactly), and on it the defaults' seed 0 read
  0.53 / 0.99 / 1.00 / 0.77 / 0.05 / 0.00 at 0 / 32 / 96 / 1k / 3k / 16k:
  the key leaked on filler blocks. Read at other thresholds the same
  model gave, at 1k / 3k, 0.68 / 0.02 at 0.5, 0.92 / 0.01 at 0.55, 0.96 /
  0.34 at 0.6 and 0.29 / 0.21 at 0.7: filler blocks wrote just above 0.5
  and the key's block not far above 0.6. With each gate's threshold
  drawn from 0.5 +- 0.1 at every training block
  (`fam_write_threshold_jitter`), the same seed read 0.96 / 1.00 / 1.00 /
  0.62 / 0.00 at 0 / 96 / 300 / 1k / 16k at 0.5, but 0.96 / 1.00 / 1.00 /
  1.00 / 1.00 at 0.7; seed 3 read 0.99 at 1k at 0.5 and 0.78 at 0.7. So
  the best threshold is a property of the run, and the example chooses it
  on validation sequences (`calibrate_write_threshold`, 25 s alone).
  Seeds 0-5 of these defaults (0 / 96 / 300 / 1k / 16k, chosen threshold
  in brackets): 0.96 / 1.00 / 1.00 / 1.00 / 1.00 (0.7), 0.80 / 0.89 /
  1.00 / 0.88 / 0.88 (0.5), 0.81 / 0.72 / 0.87 / 0.72 / 0.71 (0.6; 0.00
  on validation at 0.5), 1.00 / 0.99 / 1.00 / 0.98 / 1.00 (0.5), 0.94 /
  1.00 / 1.00 / 1.00 / 0.95 (0.5) and 0.96 / 0.98 / 1.00 / 0.64 / 0.63
  (0.6; 0.34 / 0.00 at 1k / 16k at 0.5). None reads nothing beyond its
  training now. A jitter of 0.2 slowed the key stages (seed 0: 275 steps
  on 3-digit keys, then a collapse at step 625); LoRA rank 32 was worse
  (seed 3 never left the first stage, seed 4 spent 1,050 steps on
  4-digit keys).
- What it would take: gates that latch with the whole key in every run
  (seeds 1, 2 and 5 hold 0.63-0.88 of keys at any distance), filler 0
  in every run (0.80-1.00; question and key in one block), answers split
  by a block boundary (0.62-0.77; a memory segment would show the answer
  its question, but the key curriculum then stalled), and key stages
  that are fast for every draw (a stage is a jump in accuracy after a
  wait that depends on the draw: 100-450 steps). The default run has
  about 30 s left of its 10 minutes.
  `RollbackOnCollapse(learning_rate_factor=...)` lowers the learning
  rate after each rollback (`--rollback-learning-rate-factor`); it is off
  by default (no default run collapsed; at a held peak rate it slowed
  the collapses without ending them). The paper fine-tunes 1B+ models
  on 2k-18k-token fillers for 5k steps.
"""

import argparse
import io
import json
import os
import sys
import time

# JAX unless `KERAS_BACKEND` says otherwise: its compiled streaming step is
# the fastest on CPU.
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_fam.models import FAMCausalLM  # noqa: E402
from keras_fam.state import FAMStreamer  # noqa: E402
from keras_fam.training import (  # noqa: E402
    LogWindow,
    RollbackOnCollapse,
    SampleWeightTotal,
    calibrate_write_threshold,
    streamed_dataset,
)

# === The task: the paper's PassKey prompt, tokenized by the base model ===

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important "
    "information there."
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again."
)
QUESTION = "What is the pass key? The pass key is"
DIGITS = "0123456789"


def passkey_text(key, filler_repeats=1):
    """The paper's prompt as text, with the filler sentences repeated."""
    filler = " ".join([FILLER] * filler_repeats)
    return (
        f"{INTRO} The pass key is {key}. Remember it. {key} is the pass "
        f"key. {filler} {QUESTION} {key}."
    )


class PassKeyTask:
    """PassKey token sequences in the vocabulary of `tokenizer`.

    The prompt is tokenized once, in three pieces (the part up to the
    filler with the key twice, one cycle of filler sentences, and the
    question with its answer); sequences are these ids with the key's digit
    tokens filled in and the filler cycle cut to `filler_length` tokens.

    Args:
        tokenizer: a KerasHub tokenizer whose digits are single tokens.
        key_digits: int. Digits of the key.
    """

    def __init__(self, tokenizer, key_digits=5):
        if key_digits < 1:
            raise ValueError(
                f"`key_digits` must be >= 1. Received: key_digits={key_digits}"
            )
        self.key_digits = key_digits
        self.tokenizer = tokenizer
        encode = lambda text: np.asarray(  # noqa: E731
            keras.ops.convert_to_numpy(tokenizer(text)), dtype="int32"
        )
        self.digit_ids = encode(DIGITS)[-10:]
        placeholder = "0" * key_digits
        head = passkey_text(placeholder).split(FILLER)[0].rstrip()
        start = tokenizer.token_to_id(tokenizer.start_token)
        self.head = np.concatenate([[start], encode(head)]).astype("int32")
        self.head_key = np.flatnonzero(np.isin(self.head, self.digit_ids))
        self.cycle = encode(FILLER)
        self.question = encode(f"{QUESTION} {placeholder}.")
        self.question_key = np.flatnonzero(
            np.isin(self.question, self.digit_ids)
        )
        if (
            len(self.head_key) != 2 * key_digits
            or len(self.question_key) != key_digits
            or len(self.digit_ids) != 10
        ):
            raise ValueError(
                "The tokenizer must encode every digit as one token."
            )

    def with_digits(self, key_digits):
        """The same task with keys of `key_digits` digits."""
        return PassKeyTask(self.tokenizer, key_digits)

    def overhead(self):
        """Tokens of a sequence that are not filler."""
        return len(self.head) + len(self.question)

    def filler(self, length, phase=0):
        """`length` filler tokens, starting `phase` tokens into the cycle."""
        reps = (length + phase) // len(self.cycle) + 1
        return np.tile(self.cycle, reps)[phase : phase + length]

    def sequence(self, key, filler_length, phase=0):
        """`(token_ids, answer_start)` for one key (digit values)."""
        head = self.head.copy()
        head[self.head_key] = np.tile(self.digit_ids[key], 2)
        question = self.answered_question(key)
        filler = self.filler(filler_length, phase)
        ids = np.concatenate([head, filler, question])
        start = len(head) + filler_length + self.question_key[0]
        return ids, start

    def answered_question(self, key):
        """The question's ids with `key`'s digits as its answer."""
        question = self.question.copy()
        question[self.question_key] = self.digit_ids[key]
        return question

    def batch(self, rng, batch, filler_length):
        """`(token_ids (B, T), keys (B, K), answer_start)`."""
        keys = rng.integers(0, 10, (batch, self.key_digits))
        rows = [self.sequence(key, filler_length) for key in keys]
        return np.stack([r[0] for r in rows]), keys, rows[0][1]

    def loss_weights(self, length, answer_start, answer_only):
        """Weights of predicting each token of a sequence: the answer's
        digits (`answer_only`) or every predictable token (all but the
        key's first occurrence, which is random)."""
        weights = np.zeros(length, "float32")
        if not answer_only:
            weights[:] = 1.0
            weights[self.head_key[: self.key_digits]] = 0.0
        weights[answer_start : answer_start + self.key_digits] = 1.0
        return weights

    def document_sampler(
        self,
        shortest,
        longest,
        answer_only=True,
        align=1,
        random_phase=False,
        uniform=False,
        fill_segment=None,
        gaps=(16, 64),
        block=None,
        crossing_share=0.0,
    ):
        """`rng -> (token_ids, weights)` with a log-uniform filler length
        in `[shortest, longest]`, for `streamed_dataset`.

        With `crossing_share` (and `block`, the block size; episodes must
        start at block boundaries) that share of the questions are moved
        (their filler lengthened by less than a block) so that question
        and answer cross a block boundary: the answer's block then starts
        after the question began, or the key's last digits start a block
        of their own, and what was read before the boundary must come
        through the memory.

        With `fill_segment` (the training segment's length), the question is
        asked again, after `gaps` (uniform, in tokens) of filler, as long as
        question and answer fit in the episode's last segment, which
        document resets would otherwise pad: more answers per step for the
        same compute, each read from the memory at a different distance.

        With `random_phase` the filler starts at a random token of its
        cycle (evaluation always starts it at the cycle's first token), so
        that every phase of the filler meets every block position.

        With `align > 1` filler follows the answer (no loss on it) up to a
        multiple of `align` tokens, so that in a stream every prompt starts
        at a block boundary, as it does at evaluation (and in the paper's
        fine-tuning, whose sequences each start with the prompt).
        """

        def sample(rng):
            if uniform:
                filler = int(rng.integers(shortest, longest + 1))
            else:
                filler = sample_filler_length(rng, shortest, longest)
            filler += self._crossing(
                rng, len(self.head) + filler, block, crossing_share
            )
            key = rng.integers(0, 10, self.key_digits)
            phase = int(rng.integers(len(self.cycle))) if random_phase else 0
            ids, start = self.sequence(key, filler, phase)
            weights = self.loss_weights(len(ids), start, answer_only)
            if fill_segment:
                ids, weights = self._ask_again(
                    rng,
                    key,
                    ids,
                    weights,
                    fill_segment,
                    gaps,
                    answer_only,
                    block,
                    crossing_share,
                )
            tail = -len(ids) % align
            ids = np.concatenate([ids, self.filler(tail)])
            weights = np.concatenate([weights, np.zeros(tail, "float32")])
            return ids, weights

        return sample

    def _ask_again(
        self,
        rng,
        key,
        ids,
        weights,
        segment,
        gaps,
        answer_only,
        block=None,
        crossing_share=0.0,
    ):
        """Filler and the question with its answer, again, while they fit
        in the last segment (weighted as `loss_weights` weights the
        first)."""
        question = self.answered_question(key)
        end = -(-len(ids) // segment) * segment
        while True:
            gap = int(rng.integers(gaps[0], gaps[1] + 1))
            gap += self._crossing(rng, len(ids) + gap, block, crossing_share)
            if len(ids) + gap + len(question) > end:
                return ids, weights
            added = np.full(gap + len(question), 0.0 if answer_only else 1.0)
            added[gap + self.question_key] = 1.0
            ids = np.concatenate([ids, self.filler(gap), question])
            weights = np.concatenate([weights, added.astype("float32")])

    def _crossing(self, rng, position, block, share):
        """With probability `share`, the tokens (fewer than `block`) to add
        before a question at `position` so that it starts where question
        and answer cross a block boundary with the answer whole after it
        (the question starts in one block, the key's first digit starts
        the next or lies in it), at an offset drawn uniformly from those;
        else 0.

        Offsets that split the answer itself (its later digits in the next
        block, seeing neither the question nor the digits before them)
        are not drawn: with no memory segment those digits must learn
        where the answer is from the memory alone, the hardest case there
        is, and moving questions there too (17% of the training answers
        split, against 5%) held runs in the 5-digit stage for hundreds of
        steps (the example's docstring has the runs)."""
        if not (share and rng.uniform() < share):
            return 0
        if not block:
            raise ValueError("`crossing_share` needs `block`.")
        first = int(self.question_key[0])
        offset = int(rng.integers(max(block - first, 1), block))
        return (offset - position) % block


def sample_filler_length(rng, shortest, longest):
    """Log-uniform in `[shortest, longest]`: short and long fillers alike."""
    low, high = np.log(shortest + 1.0), np.log(longest + 1.0)
    return int(np.exp(rng.uniform(low, high))) - 1


def padded_batch(task, rng, batch, context, answer_only):
    """Single episodes (filler up to what fits in `context`), right-padded:
    `(x, y, sample_weight)` for `fit` without a preprocessor."""
    longest = context - task.overhead()
    tokens = np.zeros((batch, context + 1), "int32")
    weights = np.zeros((batch, context + 1), "float32")
    lengths = np.zeros(batch, "int32")
    for row in range(batch):
        filler = sample_filler_length(rng, 0, longest)
        key = rng.integers(0, 10, task.key_digits)
        ids, start = task.sequence(key, filler)
        lengths[row] = len(ids)
        tokens[row, : len(ids)] = ids
        weights[row, : len(ids)] = task.loss_weights(
            len(ids), start, answer_only
        )
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.arange(context)[None] < lengths[:, None],
    }
    return x, tokens[:, 1:], weights[:, 1:]


# === Stage 1: the base model (a stand-in for a downloaded checkpoint) ===


def train_tokenizer(vocabulary_size, seed):
    """A SentencePiece BPE tokenizer trained on PassKey text, digits split
    into single tokens, Llama's special tokens."""
    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    texts = [
        passkey_text("".join(rng.choice(list(DIGITS), 5)), 2)
        for _ in range(1000)
    ]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=proto,
        vocab_size=vocabulary_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=3,
    )
    return keras_hub.models.LlamaTokenizer(proto=proto.getvalue())


def base_config(args):
    return {
        "key_digits": args.key_digits,
        "base_context": args.base_context,
        "base_hidden_dim": args.base_hidden_dim,
        "base_layers": args.base_layers,
        "base_heads": args.base_heads,
        "base_max_steps": args.base_max_steps,
        "vocabulary_size": args.vocabulary_size,
        "seed": args.base_seed,
        "backend": keras.backend.backend(),
    }


def exact_match(lm, task, tokens, keys, starts):
    """Whole-key exact match of a full-attention model under teacher
    forcing (right iff greedy decoding gives the key)."""
    padding = np.ones_like(tokens, bool)
    logits = lm.predict(
        {"token_ids": tokens, "padding_mask": padding},
        batch_size=len(tokens),
        verbose=0,
    )
    k = task.key_digits
    rows = np.arange(len(tokens))[:, None]
    columns = np.asarray(starts)[:, None] - 1 + np.arange(k)[None]
    predicted = np.argmax(logits[rows, columns], axis=-1)
    return float(np.mean(np.all(predicted == task.digit_ids[keys], axis=1)))


def held_out_set(task, rng, count, context):
    """Sequences with fillers spread over what fits in `context`, padded to
    `context`."""
    longest = context - task.overhead()
    tokens = np.zeros((count, context), "int32")
    keys, starts = [], []
    for row in range(count):
        key = rng.integers(0, 10, task.key_digits)
        ids, start = task.sequence(key, int(rng.integers(0, longest + 1)))
        tokens[row, : len(ids)] = ids
        keys.append(key)
        starts.append(start)
    return tokens, np.array(keys), np.array(starts)


def build_base_preset(args):
    """Pretrain the base `LlamaCausalLM` within its context and save it
    with `save_to_preset`; reuse it when it was built with the same
    flags."""
    path = args.base_preset
    report_path = os.path.join(path, "passkey_base.json")
    config = base_config(args)
    if not args.rebuild_base and os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        if report["config"] == config:
            print(
                f"Base preset: reusing {path} (exact match in context "
                f"{report['accuracy']:.3f}; --rebuild-base to rebuild)"
            )
            return report
        print(f"Base preset: {path} was built with other flags; rebuilding")
    start = time.time()
    keras.utils.set_random_seed(args.base_seed)
    tokenizer = train_tokenizer(args.vocabulary_size, args.base_seed)
    task = PassKeyTask(tokenizer, args.key_digits)
    width = args.base_hidden_dim
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=args.base_layers,
        num_query_heads=args.base_heads,
        num_key_value_heads=args.base_heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        rope_max_wavelength=10000,
    )
    lm = keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)
    lm.compile(
        optimizer=keras.optimizers.AdamW(
            args.base_learning_rate, weight_decay=0.01, clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    rng = np.random.default_rng(args.base_seed)
    held_out = held_out_set(
        task, np.random.default_rng(args.base_seed + 7), 200, args.base_context
    )
    steps, accuracy, log = 0, 0.0, []
    print(
        f"Base preset: pretraining a LlamaCausalLM (width {width}, "
        f"{args.base_layers} layers, context {args.base_context}) until "
        f">= {args.base_target:.3f} exact match in context"
    )
    while steps < args.base_max_steps:
        x, y, w = padded_batch(
            task, rng, args.batch_size * 100, args.base_context, False
        )
        lm.fit(x, y, sample_weight=w, batch_size=args.batch_size, verbose=0)
        steps += 100
        accuracy = exact_match(lm, task, *held_out)
        log.append((steps, accuracy))
        print(f"  step {steps}: exact match in context {accuracy:.3f}")
        if accuracy >= args.base_target:
            break
    # The final figure on fresh sequences (not the stopping set).
    accuracy = exact_match(
        lm,
        task,
        *held_out_set(
            task,
            np.random.default_rng(args.base_seed + 8),
            500,
            args.base_context,
        ),
    )
    preprocessor = keras_hub.models.LlamaCausalLMPreprocessor(
        tokenizer, sequence_length=args.base_context
    )
    keras_hub.models.LlamaCausalLM(
        backbone, preprocessor=preprocessor
    ).save_to_preset(path)
    report = {
        "config": config,
        "accuracy": accuracy,
        "accuracy_samples": 500,
        "steps": steps,
        "log": log,
        "seconds": time.time() - start,
    }
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"Base preset: saved to {path} after {steps} steps, "
        f"{report['seconds']:.0f}s; exact match in context {accuracy:.3f} "
        "(500 sequences)"
    )
    return report


# === Stage 2 and 3: FAM and BSWA from the preset, LoRA, fit ===


def trainable_summary(lm):
    """`{"total": n, "by_kind": {...}}` of the trainable weights: after
    `enable_lora` only LoRA factors and the summary embeddings."""
    by_kind = {}
    for variable in lm.trainable_weights:
        name = variable.path.split("/")[-1]
        by_kind[name] = by_kind.get(name, 0) + int(np.prod(variable.shape))
    return {"total": sum(by_kind.values()), "by_kind": by_kind}


def compile_for_fine_tuning(lm, args, steps):
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, steps, alpha=args.learning_rate_floor
    )
    lm.compile(
        optimizer=keras.optimizers.AdamW(
            schedule, weight_decay=0.0, clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # The digits answered per step vary (keys of 1-5 digits, questions
        # asked again): windows of the accuracy are weighted by them.
        weighted_metrics=["sparse_categorical_accuracy", SampleWeightTotal()],
    )


def fine_tune_fam(args, task):
    """FAM from the base preset, LoRA, `fit` on streamed episodes."""
    gate = None if args.fam_write_gate == "none" else args.fam_write_gate
    lm = FAMCausalLM.from_preset(
        args.base_preset,
        preprocessor=None,
        block_size=args.block_size,
        memory_segments=args.fam_memory_segments,
        fam_length=args.fam_length,
        fam_normalization=args.fam_normalization,
        fam_write_gate=gate,
        fam_write_threshold=(
            args.fam_write_threshold if gate == "hard" else None
        ),
        fam_write_threshold_jitter=(
            args.fam_write_threshold_jitter if gate == "hard" else 0.0
        ),
        training_streams=args.batch_size,
    )
    lm.backbone.enable_lora(args.lora_rank)
    steps = args.fam_steps
    compile_for_fine_tuning(lm, args, steps)
    sampler = CurriculumSampler(
        task,
        args.longest_filler,
        int(args.curriculum * steps),
        # Document resets start every episode at a segment boundary (a
        # multiple of the block size) already.
        align=(
            args.block_size
            if args.align_episodes and not args.document_resets
            else 1
        ),
        digit_steps=args.digit_curriculum_steps,
        first_longest=args.first_longest_filler,
        random_phase=args.random_filler_phase,
        advance_at=args.advance_at,
        uniform_key_fillers=args.key_stage_fillers == "uniform",
        filler_advance_at=args.filler_advance_at,
        fill_segment=(
            args.train_length
            if args.ask_again and args.document_resets
            else None
        ),
        block=args.block_size,
        crossing_share=args.crossing_share,
    )
    data = streamed_dataset(
        sampler,
        args.batch_size,
        args.train_length,
        reset_probability=args.reset_probability,
        seed=args.seed,
        document_resets=args.document_resets,
    )
    epochs = max(1, min(args.epochs, steps))
    guard = None
    if args.rollback_on_collapse:
        guard = RollbackOnCollapse(
            "sparse_categorical_accuracy",
            check_every=args.rollback_every,
            weight_log="sample_weight_total",
            learning_rate_factor=args.rollback_learning_rate_factor,
        )
    restart_after = args.restart_stalled_after or None
    # The guard first: a restart then resets it after it saw that step.
    callbacks = [guard] if guard is not None else []
    callbacks.append(sampler.callback(restart_after, args.seed, guard))
    start = time.time()
    history = lm.fit(
        data,
        steps_per_epoch=steps // epochs,
        epochs=epochs,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    history = dict(history.history)
    history["rollbacks"] = guard.rollbacks if guard else []
    history["curriculum"] = sampler.history
    history["longest_filler"] = sampler.bounds()[1]  # Where it ended.
    history["train_accuracy_windows"] = sampler.accuracy_log
    history["restarts"] = sampler.restarts
    return lm, time.time() - start, history


class CurriculumSampler:
    """Streamed episodes with a curriculum on the key's length, then on the
    filler's.

    Key length: keys have 1 digit at first, and each episode draws its
    length uniformly from 1 to the current bound, up to the task's
    `key_digits`. Filler: log-uniform up to `first_longest` until all the
    digits are in, then up to a growing bound that ends at `longest`.

    Adaptive (`advance_at` set, the default): the bounds move one stage at
    a time (one more digit; then the longest filler doubled, up to
    `longest`) when the mean training digit accuracy over the last `window`
    steps of the stage reaches `advance_at`, so that each run moves on when
    it has learned the stage, however fast. A share `focus` of the episodes
    are the stage's newest (keys of the stage's most digits; in a filler
    stage, where keys have all their digits, fillers in the stage's new
    range, from the previous bound up), the others anywhere up to the
    bounds: otherwise short keys and fillers, learned stages ago, carry the
    accuracy while the new ones fail. Fixed (`advance_at=None`): one
    more digit every `digit_steps` steps (`0`: full keys from the start),
    then the bound grows linearly to `longest` over `curriculum_steps`.

    Options: `uniform_key_fillers` draws fillers uniformly (not
    log-uniformly) while the key grows; `filler_advance_at` is the
    adaptive threshold from the stage with all the key's digits on
    (`None`: `advance_at`); `fill_segment` (the training segment's
    length) asks each episode's question again while it fits in the
    episode's last segment (`PassKeyTask.document_sampler`).
    """

    def __init__(
        self,
        task,
        longest,
        curriculum_steps,
        align,
        digit_steps=0,
        first_longest=40,
        random_phase=False,
        advance_at=None,
        window=50,
        focus=0.5,
        uniform_key_fillers=False,
        filler_advance_at=None,
        fill_segment=None,
        block=None,
        crossing_share=0.0,
    ):
        self.tasks = {
            d: task.with_digits(d) for d in range(1, task.key_digits + 1)
        }
        self.key_digits = task.key_digits
        self.longest, self.first_longest = longest, first_longest
        self.align = align
        self.random_phase = random_phase
        self.digit_steps = digit_steps
        self.curriculum_steps = curriculum_steps
        self.advance_at, self.window, self.focus = advance_at, window, focus
        self.uniform_key_fillers = uniform_key_fillers
        self.filler_advance_at = filler_advance_at
        self.fill_segment = fill_segment
        self.block, self.crossing_share = block, crossing_share
        first = min(first_longest, longest)
        self.stages = [(d, first) for d in range(1, self.key_digits + 1)]
        while self.stages[-1][1] < longest:
            self.stages.append(
                (self.key_digits, min(2 * self.stages[-1][1], longest))
            )
        self.stage = 0
        self.step = 0
        self.history = [(0, *self.stages[0])]  # (step, digits, longest)
        self.accuracy_log = []  # (step, digit accuracy over the window)
        self.restarts = []  # (step, digit accuracy over the window)

    def bounds(self):
        """`(most digits, longest filler)` at the current step."""
        if self.advance_at is not None:
            return self.stages[self.stage]
        digits, grow_from = self.key_digits, self._key_steps()
        if self.digit_steps:
            digits = min(self.key_digits, 1 + self.step // self.digit_steps)
        longest = min(self.first_longest, self.longest)
        if self.step >= grow_from:
            done = self.step - grow_from
            if done >= self.curriculum_steps:
                longest = self.longest
            else:
                span = self.longest - longest
                longest += span * done // self.curriculum_steps
        return digits, longest

    def _key_steps(self):
        """Fixed schedule: the steps of its key curriculum."""
        return self.digit_steps * (self.key_digits - 1)

    def __call__(self, rng):
        most_digits, longest = self.bounds()
        digits = int(rng.integers(1, most_digits + 1))
        shortest = 0
        if self.advance_at is not None:
            # The newest stage's keys and fillers get a share `focus` of
            # the episodes (keys have all their digits once the filler
            # grows), so that the accuracy that moves the curriculum on is
            # not carried by what was learned stages ago.
            focus = rng.uniform() < self.focus
            if self.stage >= self.key_digits:
                digits = self.key_digits
                if focus:
                    shortest = self.stages[self.stage - 1][1]
            elif focus:
                digits = most_digits
        task = self.tasks[digits]
        if self.advance_at is not None:
            key_stage = self.stage < self.key_digits
        else:  # The fixed schedule's key curriculum.
            key_stage = self.step < self._key_steps()
        uniform = self.uniform_key_fillers and key_stage
        return task.document_sampler(
            shortest,
            longest,
            align=self.align,
            random_phase=self.random_phase,
            uniform=uniform,
            fill_segment=self.fill_segment,
            block=self.block,
            crossing_share=self.crossing_share,
        )(rng)

    def callback(self, restart_after=None, seed=0, guard=None):
        """The `fit` callback that counts steps and moves the adaptive
        curriculum on. With `restart_after`, a run still in the first stage
        after that many steps starts over (once): the LoRA factors are drawn
        again (A from `he_uniform`, B zeros, as `enable_lora` does), the
        summary embeddings go back to the converted model's and the
        optimizer's slots to zeros. `guard` (a `RollbackOnCollapse` that
        runs before this callback) is reset at every new stage and at a
        restart, so that it takes neither drop for a collapse."""
        sampler = self
        window = LogWindow(
            "sparse_categorical_accuracy", self.window, "sample_weight_total"
        )

        class Step(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if restart_after:  # What a restart goes back to.
                    variables = self.model.trainable_variables
                    self.initial = [np.array(v) for v in variables]

            def on_epoch_begin(self, epoch, logs=None):
                window.reset()

            def on_train_batch_begin(self, batch, logs=None):
                sampler.step += 1

            def on_train_batch_end(self, batch, logs=None):
                accuracy = window.update(batch, logs)
                if accuracy is None or sampler.advance_at is None:
                    return
                sampler.accuracy_log.append((sampler.step, accuracy))
                if accuracy >= sampler.threshold() and sampler.stage + 1 < len(
                    sampler.stages
                ):
                    sampler.advance(accuracy)
                    if guard is not None:  # A harder task: a lower accuracy.
                        guard.reset()
                elif (
                    restart_after
                    and sampler.stage == 0
                    and not sampler.restarts
                    and sampler.step >= restart_after
                ):
                    self.restart(accuracy)

            def restart(self, accuracy):
                model = self.model  # On JAX, syncs the training state.
                initializer = keras.initializers.HeUniform(seed=seed)
                for variable, value in zip(
                    model.trainable_variables, self.initial, strict=True
                ):
                    if variable.path.endswith("lora_kernel_a"):
                        value = initializer(variable.shape, variable.dtype)
                    variable.assign(value)
                optimizer = model.optimizer
                for slot in optimizer.variables:
                    name = slot.path.split("/")[-1]
                    if name not in ("iteration", "learning_rate"):
                        slot.assign(np.zeros(slot.shape, slot.dtype))
                if guard is not None:
                    guard.reset()
                sampler.restarts.append((sampler.step, accuracy))
                print(
                    f"\n[curriculum] step {sampler.step}: digit accuracy "
                    f"{accuracy:.3f}, still in the first stage; starting "
                    "the fine-tuning over"
                )

        return Step()

    def threshold(self):
        """The digit accuracy at which the current stage ends."""
        if self.filler_advance_at is not None and (
            self.stage + 1 >= self.key_digits
        ):
            return self.filler_advance_at
        return self.advance_at

    def advance(self, accuracy):
        self.stage += 1
        self.history.append((self.step, *self.stages[self.stage]))
        digits, longest = self.stages[self.stage]
        print(
            f"\n[curriculum] step {self.step}: digit accuracy "
            f"{accuracy:.3f}; now keys of up to {digits} digits, "
            f"fillers up to {longest} tokens"
        )


def fine_tune_bswa(args, task, memory_segments):
    """BSWA (`fam_length=0`) from the base preset with the same LoRA rank,
    `fit` on single episodes of up to `--bswa-train-length` tokens."""
    lm = FAMCausalLM.from_preset(
        args.base_preset,
        preprocessor=None,
        block_size=args.block_size,
        memory_segments=memory_segments,
        fam_length=0,
    )
    lm.backbone.enable_lora(args.lora_rank)
    steps = args.bswa_steps
    compile_for_fine_tuning(lm, args, steps)
    rng = np.random.default_rng(args.seed + memory_segments)
    x, y, w = padded_batch(
        task, rng, args.batch_size * steps, args.bswa_train_length, True
    )
    start = time.time()
    history = lm.fit(
        x,
        y,
        sample_weight=w,
        batch_size=args.batch_size,
        epochs=1,
        verbose=args.verbose,
    )
    return lm, time.time() - start, history.history


# === Stage 4: evaluation through the streaming API ===


class Evaluator:
    """Pass-key accuracy at one filler length through `FAMStreamer`.

    Each batch of sequences is streamed up to the answer with no outputs
    kept (a fixed-size state, whatever the filler), then the answer's
    tokens are fed with `output="logits"`; the whole key is right when
    every digit is the argmax (teacher forcing = greedy decoding's exact
    match). One streamer per batch size, reset between batches, so every
    compiled step is reused.
    """

    def __init__(self, lm, task, blocks_per_step):
        self.lm, self.task = lm, task
        self.blocks_per_step = blocks_per_step
        self.streamers = {}

    def streamer(self, batch):
        if batch not in self.streamers:
            self.streamers[batch] = FAMStreamer(
                self.lm,
                batch_size=batch,
                output=None,
                blocks_per_step=self.blocks_per_step,
            )
        streamer = self.streamers[batch]
        streamer.reset()
        return streamer

    def accuracy(self, filler_length, samples, batch, rng):
        """`(accuracy, fam_rms)`: the exact-match rate, and the root mean
        square of the FAM just before the answer (`None` for BSWA)."""
        k = self.task.key_digits
        correct, fam_rms = 0, []
        for begin in range(0, samples, batch):
            size = min(batch, samples - begin)
            tokens, keys, start = self.task.batch(rng, size, filler_length)
            streamer = self.streamer(size)
            # Everything before the answer, no outputs kept.
            streamer.feed(tokens[:, : start - 1], verbose=0)
            if self.lm.backbone.fam_length:
                fam_rms += [
                    float(np.sqrt(np.mean(np.square(layer["fam"]))))
                    for layer in streamer.state.layers
                ]
            # Logits at `start - 1 + j` predict the key's digit `j`.
            answer = streamer.feed(
                tokens[:, start - 1 : start - 1 + k],
                verbose=0,
                output="logits",
            )
            predicted = np.argmax(answer, axis=-1)
            correct += int(
                np.sum(np.all(predicted == self.task.digit_ids[keys], axis=1))
            )
        return correct / samples, (float(np.mean(fam_rms)) if fam_rms else None)


def calibrate(lm, task, args):
    """The hard write gate's threshold, chosen on validation sequences.

    Every candidate of `--calibrate-thresholds` is scored by the lowest
    exact match over `--calibration-lengths` on the same validation
    sequences (keys and fillers drawn from their own seed, never the
    evaluation's), read through new `FAMStreamer`s; the model keeps the
    best (`keras_fam.training.calibrate_write_threshold`).
    """
    samples = args.calibration_samples
    batch = min(samples, args.eval_batch_size)

    def score(model):
        evaluator = Evaluator(model, task, args.blocks_per_step)
        rng = np.random.default_rng(args.seed + 7919)
        return min(
            evaluator.accuracy(n, samples, batch, rng)[0]
            for n in args.calibration_lengths
        )

    start = time.time()
    best, scores = calibrate_write_threshold(
        lm, score, args.calibrate_thresholds, verbose=min(args.verbose, 1)
    )
    seconds = time.time() - start
    print(
        f"Write threshold {best:g} (validation exact match, lowest over "
        f"fillers {args.calibration_lengths}: "
        + ", ".join(f"{t:g}: {a:.2f}" for t, a in scores.items())
        + f"; {seconds:.0f}s)"
    )
    return {
        "lengths": list(args.calibration_lengths),
        "samples": samples,
        "scores": {str(t): a for t, a in scores.items()},
        "seconds": seconds,
    }


def evaluate(lm, task, lengths, args, name):
    evaluator = Evaluator(lm, task, args.blocks_per_step)
    rng = np.random.default_rng(args.seed + 1)
    accuracy, seconds, fam_rms, samples = {}, {}, {}, {}
    progress = _progress(lengths, f"{name} eval")
    for n in progress:
        if accuracy and hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(
                ", ".join(f"{k}: {a:.2f}" for k, a in accuracy.items())
            )
        begin = time.time()
        samples[n] = _eval_samples(args, n)
        batch = min(samples[n], args.eval_batch_size)
        accuracy[n], fam_rms[n] = evaluator.accuracy(n, samples[n], batch, rng)
        seconds[n] = time.time() - begin
    return accuracy, seconds, fam_rms, samples


# === The experiment ===


def receptive_field(num_layers, memory_segments, block_size):
    return num_layers * (memory_segments + 1) * block_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--output-dir", default="passkey_results", help="Output folder.")
    add(
        "--seed",
        type=int,
        default=0,
        help="Seed of fine-tuning and evaluation (the base has its own).",
    )
    add("--key-digits", type=int, default=5, help="Digits of the key.")
    add("--verbose", type=int, default=1, help="fit's verbosity.")
    # Base model.
    add(
        "--base-preset",
        default=os.path.join("passkey_results", "base_preset"),
        help="Where the base preset is cached (built when missing).",
    )
    add("--rebuild-base", action="store_true", help="Rebuild the base.")
    add("--base-seed", type=int, default=0, help="Seed of the base model.")
    add("--vocabulary-size", type=int, default=256)
    add("--base-context", type=int, default=128, help="Base context length.")
    add("--base-hidden-dim", type=int, default=64)
    add("--base-layers", type=int, default=2)
    add("--base-heads", type=int, default=4)
    add("--base-learning-rate", type=float, default=3e-3)
    add("--base-max-steps", type=int, default=3000)
    add(
        "--base-target",
        type=float,
        default=0.995,
        help="Pretraining stops at this exact match in context.",
    )
    # FAM and BSWA.
    add("--block-size", type=int, default=32)
    add("--fam-length", type=int, default=16)
    add("--fam-memory-segments", type=int, default=0)
    add(
        "--fam-normalization",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Rescale the carried FAM to unit RMS after every block.",
    )
    add(
        "--fam-write-gate",
        choices=("none", "soft", "hard"),
        default="hard",
        help="Scale each FAM update by the FAM's attention share on the "
        "block (`fam_write_gate`; hard: write all or nothing).",
    )
    add(
        "--fam-write-threshold",
        type=_optional_float,
        default=0.5,
        help="Hard gate: the write share above which a FAM vector writes "
        "(`fam_write_threshold`; 'none': the per-key threshold S/(S+F)).",
    )
    add(
        "--fam-write-threshold-jitter",
        type=float,
        default=0.1,
        help="Hard gate, training only: each gate's threshold drawn from "
        "threshold +- this at every block (`fam_write_threshold_jitter`).",
    )
    add(
        "--calibrate-thresholds",
        type=float,
        nargs="*",
        default=[0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7],
        help="Hard gate: after fine-tuning, keep the write threshold among "
        "these that reads validation sequences best (none: keep "
        "--fam-write-threshold).",
    )
    add(
        "--calibration-lengths",
        type=int,
        nargs="+",
        default=[0, 1024],
        help="Filler lengths of the validation sequences.",
    )
    add(
        "--calibration-samples",
        type=int,
        default=100,
        help="Validation sequences per filler length.",
    )
    add("--lora-rank", type=int, default=16)
    add("--learning-rate", type=float, default=5e-3)
    add(
        "--learning-rate-floor",
        type=float,
        default=0.05,
        help="Fraction of --learning-rate the cosine decay ends at.",
    )
    add("--batch-size", type=int, default=32)
    add("--epochs", type=int, default=4, help="Progress-bar epochs.")
    add("--train-length", type=int, default=192, help="Training segment.")
    add("--longest-filler", type=int, default=3072)
    add(
        "--random-filler-phase",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Start each training filler at a random token of its cycle.",
    )
    add(
        "--advance-at",
        type=_optional_float,
        default=0.9,
        help="Adaptive curriculum: the training digit accuracy over 50 "
        "steps at which the next stage starts (one more key digit, then "
        "the longest filler doubled); 'none': the fixed schedule below.",
    )
    add(
        "--ask-again",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ask the question again in what is left of an episode's last "
        "training segment (more answers per step; with --document-resets).",
    )
    add(
        "--crossing-share",
        type=float,
        default=0.5,
        help="Share of training questions moved to cross a block boundary "
        "(the question starts in one block, its answer the next).",
    )
    add(
        "--filler-advance-at",
        type=_optional_float,
        default=0.95,
        help="The same for the stages that grow the filler (and the last "
        "key stage); 'none': --advance-at.",
    )
    add(
        "--restart-stalled-after",
        type=int,
        default=300,
        help="Adaptive curriculum: start the FAM fine-tuning over (once) "
        "when it is still in the first stage after this many steps (0: "
        "never).",
    )
    add(
        "--digit-curriculum-steps",
        type=int,
        default=100,
        help="Steps per added key digit (0: full keys from the start).",
    )
    add(
        "--first-longest-filler",
        type=int,
        default=40,
        help="Longest filler while the key curriculum runs.",
    )
    add(
        "--key-stage-fillers",
        choices=("log-uniform", "uniform"),
        default="uniform",
        help="Filler lengths while the key curriculum runs.",
    )
    add(
        "--curriculum",
        type=float,
        default=0.4,
        help="Fraction of steps over which the longest filler grows.",
    )
    add(
        "--align-episodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Start every training episode at a block boundary (without "
        "--document-resets).",
    )
    add(
        "--document-resets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Every training episode is a stream of its own: it starts a "
        "segment from the initial FAM, as every evaluation sequence does.",
    )
    add(
        "--reset-probability",
        type=float,
        default=0.0,
        help="Chance per step that a row starts a new stream.",
    )
    add(
        "--rollback-on-collapse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Roll the FAM fit back when its training accuracy collapses "
        "(`keras_fam.training.RollbackOnCollapse`).",
    )
    add(
        "--rollback-every",
        type=int,
        default=50,
        help="Steps per window of RollbackOnCollapse.",
    )
    add(
        "--rollback-learning-rate-factor",
        type=_optional_float,
        default=None,
        help="Multiply the learning rate by this after each rollback "
        "('none': keep it).",
    )
    add("--fam-steps", type=int, default=1500)
    add("--bswa-steps", type=int, default=100)
    add("--bswa-train-length", type=int, default=320)
    add("--bswa-memory-segments", type=int, nargs="*", default=[0, 1, 2])
    # Evaluation.
    add(
        "--eval-lengths",
        type=int,
        nargs="+",
        default=[0, 32, 96, 1024, 3072, 16384, 65536, 262144],
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
    add("--long-eval-from", type=int, default=50_000)
    add("--eval-batch-size", type=int, default=100)
    add(
        "--blocks-per-step",
        type=int,
        default=64,
        help="Whole blocks per compiled streaming step.",
    )
    args = parser.parse_args(argv)
    if args.crossing_share and not (
        args.document_resets or args.align_episodes
    ):
        parser.error(
            "--crossing-share needs episodes that start at block boundaries "
            "(--document-resets or --align-episodes)"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    total_start, cpu_start = time.time(), time.process_time()
    print(
        f"Backend {keras.backend.backend()}; {args.key_digits}-digit keys; "
        f"training segments of {args.train_length} tokens"
    )
    base = build_base_preset(args)
    keras.utils.set_random_seed(args.seed)
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(args.base_preset)
    task = PassKeyTask(tokenizer, args.key_digits)
    config = vars(args).copy()
    config["base_preset"] = args.base_preset
    results = {
        "config": config,
        "backend": keras.backend.backend(),
        "chance": 10.0**-args.key_digits,
        "base": {
            "accuracy_in_context": base["accuracy"],
            "samples": base["accuracy_samples"],
            "context": args.base_context,
            "pretraining_steps": base["steps"],
            "pretraining_seconds": base["seconds"],
        },
        "models": {},
    }
    specs = {"FAM": (args.fam_length, args.fam_memory_segments)}
    for m in args.bswa_memory_segments:
        specs[f"BSWA M{m}"] = (0, m)
    for name, (fam_length, memory) in specs.items():
        print(f"\n== {name}: {args.base_preset} -> FAMCausalLM, LoRA, fit")
        if fam_length:
            lm, train_seconds, history = fine_tune_fam(args, task)
            train_length = args.train_length
        else:
            lm, train_seconds, history = fine_tune_bswa(args, task, memory)
            train_length = args.bswa_train_length
        trainable = trainable_summary(lm)
        print(f"Trainable weights: {trainable}")
        calibration = None
        hard = args.fam_write_gate == "hard"
        if fam_length and args.calibrate_thresholds and hard:
            calibration = calibrate(lm, task, args)
        # The fine-tuned model is the base preset with the same options plus
        # these adapters (LoRA factors and summary embeddings), see README.
        adapters = os.path.join(
            args.output_dir, name.lower().replace(" ", "_") + ".lora.h5"
        )
        lm.backbone.save_lora_weights(adapters)
        lengths = [
            n
            for n in args.eval_lengths
            if fam_length or n <= args.bswa_max_length
        ]
        eval_start = time.time()
        accuracy, seconds, fam_rms, samples = evaluate(
            lm, task, lengths, args, name
        )
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
            else receptive_field(
                lm.backbone.num_layers, memory, args.block_size
            ),
            "train_steps": args.fam_steps if fam_length else args.bswa_steps,
            "train_length": train_length,
            "train_seconds": train_seconds,
            "fam_write_threshold": lm.backbone.layer_options.get(
                "fam_write_threshold"
            ),
            "threshold_calibration": calibration,
            "eval_seconds": eval_seconds,
            "trainable_weights": trainable,
            "adapters": adapters,
            "final_train_accuracy": history["sparse_categorical_accuracy"][-1],
            "rollbacks": history.get("rollbacks", []),
            "curriculum": history.get("curriculum"),
            "train_accuracy_windows": history.get("train_accuracy_windows"),
            "restarts": history.get("restarts", []),
            "accuracy": {str(n): a for n, a in accuracy.items()},
            "samples": {str(n): s for n, s in samples.items()},
            "fam_rms": {str(n): r for n, r in fam_rms.items()},
            "eval_seconds_by_length": {str(n): t for n, t in seconds.items()},
        }
        if fam_length:  # A curriculum may end before its last stage.
            results["longest_trained_filler"] = history["longest_filler"]
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


def _optional_float(text):
    return None if text.lower() == "none" else float(text)


def _eval_samples(args, filler_length):
    """Sequences evaluated at one filler length: `--eval-samples`, or
    `--long-eval-samples` from `--long-eval-from` filler tokens on (the
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
    base = results["base"]
    return (
        f"Base model, keys inside its {base['context']}-token context: "
        f"{base['accuracy_in_context']:.3f} exact match "
        f"({base['samples']} sequences)\n"
        "Pass-key exact match by filler length (tokens)\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
