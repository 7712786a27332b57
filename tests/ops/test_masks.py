"""The static masks of one [FAM ; block] step, checked against small arrays
written out by hand from the paper's Algorithm 2."""

import numpy as np

from keras_fam.ops.masks import block_self_mask, block_step_mask


def _bool(rows):
    return np.array(rows, dtype=bool)


def test_step_mask_one_memory_segment_one_fam():
    # S=2, M=1, F=1. Keys: [mem0 mem1 | fam | tok0 tok1].
    expected = _bool(
        [
            [0, 0, 1, 1, 1],  # FAM: no memory, FAM + whole block.
            [1, 1, 1, 1, 0],  # tok0: memory, FAM, itself.
            [1, 1, 1, 1, 1],  # tok1: memory, FAM, tok0 and itself.
        ]
    )
    np.testing.assert_array_equal(block_step_mask(2, 1, 1), expected)


def test_step_mask_bswa_without_memory_is_causal():
    # F=0, M=0: plain causal attention inside the block.
    np.testing.assert_array_equal(
        block_step_mask(3, 0, 0),
        _bool([[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
    )


def test_step_mask_two_memory_segments_two_fam():
    # S=1, M=2, F=2. Keys: [mem0 mem1 | fam0 fam1 | tok0].
    expected = _bool(
        [
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ]
    )
    np.testing.assert_array_equal(block_step_mask(1, 2, 2), expected)


def test_step_mask_bswa_with_memory():
    # S=2, M=1, F=0: a token sees the previous block and its block causally.
    np.testing.assert_array_equal(
        block_step_mask(2, 1, 0),
        _bool([[1, 1, 1, 0], [1, 1, 1, 1]]),
    )


def test_self_mask_marks_each_block_query_own_key():
    expected = _bool(
        [
            [0, 0, 0, 0, 0],  # FAM rows never need it.
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    np.testing.assert_array_equal(block_self_mask(2, 1, 1), expected)
    np.testing.assert_array_equal(block_self_mask(3, 0, 0), np.eye(3) > 0)


def test_masks_shapes_and_dtype():
    for size, memory, fam in [(4, 3, 2), (1, 0, 0), (5, 0, 3)]:
        step = block_step_mask(size, memory, fam)
        own = block_self_mask(size, memory, fam)
        expected_shape = (fam + size, memory * size + fam + size)
        assert step.shape == own.shape == expected_shape
        assert step.dtype == own.dtype == np.bool_
        # The own key of every block query is always allowed by the step mask.
        assert np.all(step[own])
