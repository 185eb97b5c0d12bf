"""Every transform op: inverse(op(x)) == x on np.arange inputs, and shapes inferred without data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightport.transforms import (
    Chain,
    Concat,
    Identity,
    PadBlocks,
    ReorderBlocks,
    Reshape,
    Select,
    SliceBlocks,
    Stack,
    Sum,
    Transpose,
    Zeros,
)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, data=st.data())
def test_transpose_round_trip(shape, data) -> None:  # type: ignore[no-untyped-def]
    axes = tuple(data.draw(st.permutations(range(len(shape)))))
    x = np.arange(np.prod(shape)).reshape(shape)
    op = Transpose(axes)
    assert op(x).shape == op.out_shape([shape])
    np.testing.assert_array_equal(op.inverse()(op(x)), x)


@settings(max_examples=50, deadline=None)
@given(blocks=st.integers(1, 4), size=st.integers(1, 3), cols=st.integers(1, 3), data=st.data())
def test_reorder_blocks_round_trip(blocks, size, cols, data) -> None:  # type: ignore[no-untyped-def]
    order = tuple(data.draw(st.permutations(range(blocks))))
    axis = data.draw(st.sampled_from([0, 1]))
    shape = (blocks * size, cols) if axis == 0 else (cols, blocks * size)
    x = np.arange(np.prod(shape)).reshape(shape)
    op = ReorderBlocks(axis, order)
    y = op(x)
    assert y.shape == op.out_shape([shape])
    np.testing.assert_array_equal(op.inverse()(y), x)
    # block order[i] lands at position i
    for i, b in enumerate(order):
        src = np.take(x, range(b * size, (b + 1) * size), axis=axis)
        np.testing.assert_array_equal(np.take(y, range(i * size, (i + 1) * size), axis=axis), src)


def test_select_and_stack_are_inverse() -> None:
    x = np.arange(24).reshape(2, 3, 4)
    parts = [Select(i, 2)(x) for i in range(2)]
    assert Select(0, 2).out_shape([x.shape]) == (3, 4)
    np.testing.assert_array_equal(Select(1, 2).inverse()(*parts), x)
    with pytest.raises(ValueError, match="length 3"):
        Select(0, 3).out_shape([x.shape])


def test_slice_blocks_and_concat_are_inverse() -> None:
    x = np.arange(24).reshape(2, 12)
    parts = [SliceBlocks(1, i, 3)(x) for i in range(3)]
    assert SliceBlocks(1, 0, 3).out_shape([x.shape]) == (2, 4)
    np.testing.assert_array_equal(Concat(1, 3)(*parts), x)
    assert Concat(1, 3).out_shape([p.shape for p in parts]) == x.shape
    with pytest.raises(ValueError, match="does not split"):
        SliceBlocks(1, 0, 5).out_shape([x.shape])


def test_reshape_chain_identity() -> None:
    x = np.arange(12).reshape(3, 4)
    op = Chain(Reshape((3, 4), (2, 6)), Transpose((1, 0)), ReorderBlocks(0, (1, 2, 0)))
    np.testing.assert_array_equal(op.inverse()(op(x)), x)
    assert op(x).shape == op.out_shape([(3, 4)])
    np.testing.assert_array_equal(Identity().inverse()(x), x)


def test_value_making_ops_say_so() -> None:
    assert Zeros((2,))().tolist() == [0.0, 0.0] and not Zeros((2,)).value_preserving
    assert Sum(2)(np.ones(2), np.ones(2)).tolist() == [2.0, 2.0] and not Sum(2).value_preserving
    assert Stack(2).out_shape([(3,), (3,)]) == (2, 3)
    with pytest.raises(ValueError, match="no inverse"):
        Zeros((1,)).inverse()


def test_pad_blocks_and_its_inverse() -> None:
    x = np.arange(6).reshape(3, 2)
    op = PadBlocks(0, 2, 3)
    y = op(x)
    assert y.shape == op.out_shape([x.shape]) == (9, 2)
    assert (y[:6] == 0).all()
    np.testing.assert_array_equal(op.inverse()(y), x)
