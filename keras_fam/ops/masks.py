"""Static attention masks of one TransformerFAM block step (NumPy).

Every attention call of a TransformerFAM layer uses one key layout,

    keys    = [memory (M * S) ; FAM (F) ; block (S)]
    queries = [FAM (F) ; block (S)]

so one static mask of shape `(F + S, M * S + F + S)` describes them all: the
fused full-block step uses every row, a streaming chunk starting at in-block
index `i` uses rows `F + i ...`, and the FAM update of a streamed block uses
rows `0 ... F - 1`. Masks are built with NumPy so they are compile-time
constants (TPU splash and GPU cuDNN kernels accept them); only key validity
(padding and not-yet-filled memory) is combined in at run time.

Shape letters: S block size, M memory segments, F FAM length.

References:
    Hwang et al., "TransformerFAM: Feedback attention is working memory",
    arXiv 2404.09173, Algorithm 2.
"""

import numpy as np


def block_step_mask(block_size, memory_segments, fam_length):
    """Boolean mask of one fused [FAM ; block] attention step.

    Block queries see all memory keys, all FAM keys, and block keys causally.
    FAM queries see all FAM keys and the whole block, but not the memory.

    Args:
        block_size: int. Tokens per block (S).
        memory_segments: int. Previous blocks whose keys are cached (M).
        fam_length: int. Number of FAM vectors (F).

    Returns:
        `np.ndarray` of dtype bool and shape `(F + S, M * S + F + S)`.
    """
    size, memory, fam = block_size, memory_segments * block_size, fam_length
    mask = np.zeros((fam + size, memory + fam + size), dtype=bool)
    mask[:fam, memory:] = True  # FAM rows: previous FAM + whole block.
    mask[fam:, : memory + fam] = True  # Block rows: memory + FAM.
    mask[fam:, memory + fam :] = np.tril(np.ones((size, size), dtype=bool))
    return mask


def block_self_mask(block_size, memory_segments, fam_length):
    """Mask of each block query's own key (the diagonal of the block part).

    It is OR-ed into the run-time mask so that no query row is ever fully
    masked (a padded token with no valid key still attends to itself), which
    keeps every attention kernel free of NaNs. FAM rows never need it: they
    always see the FAM keys.

    Returns:
        `np.ndarray` of dtype bool and shape `(F + S, M * S + F + S)`.
    """
    size, memory, fam = block_size, memory_segments * block_size, fam_length
    mask = np.zeros((fam + size, memory + fam + size), dtype=bool)
    mask[fam:, memory + fam :] = np.eye(size, dtype=bool)
    return mask
