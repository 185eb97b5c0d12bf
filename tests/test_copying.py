"""copy_into: every strided view lands exactly, through the compiled kernel and without it,
on one thread and split over several."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightport import copying

KERNEL = pytest.param(True, id="kernel")
NO_KERNEL = pytest.param(False, id="torch-fallback")


@pytest.fixture(params=[KERNEL, NO_KERNEL])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param:
        if copying._kernels is None:
            pytest.fail("the compiled kernel weightport._kernels was not built (is a C compiler installed?)")
    else:
        monkeypatch.setattr(copying, "_kernels", None)
    return bool(request.param)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: k.T, id="whole-transposed"),
        pytest.param(lambda k: k[:, 300:600].T, id="column-block-transposed"),
        pytest.param(lambda k: k[:, 1:].T, id="ragged-block"),
        pytest.param(lambda k: k[::2].T, id="strided-rows"),
        pytest.param(lambda k: k[::-1].T, id="negative-strides"),
        pytest.param(lambda k: k, id="contiguous"),
        pytest.param(lambda k: k.astype(">f4").T, id="big-endian"),
        pytest.param(lambda k: k.astype(ml_dtypes.bfloat16).T, id="bfloat16"),
        pytest.param(lambda k: k.astype(np.float16)[:, 7:500].T, id="float16-block"),
        pytest.param(lambda k: k.astype(np.float64).T, id="float64-cast"),
    ],
)
@pytest.mark.parametrize("fresh", [False, True])
def test_copy_into_is_exact(monkeypatch, kernel: bool, parallel: bool, make, fresh: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1 if parallel else 1 << 40)
    k = np.random.default_rng(0).standard_normal((300, 900)).astype(np.float32)
    view = make(k)
    dtype = {np.dtype(ml_dtypes.bfloat16): torch.bfloat16, np.dtype(np.float16): torch.float16}
    dst = torch.empty(view.shape, dtype=dtype.get(view.dtype, torch.float32))
    copying.copy_into(dst, view, fresh=fresh)
    expected = torch.from_numpy(np.ascontiguousarray(view.astype(np.float32))).to(dst.dtype)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.int64, np.int16, np.complex64, np.uint8, np.bool_, np.complex128]
)
def test_every_item_size_moves_bit_for_bit(kernel: bool, dtype: type) -> None:
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((70, 90)) * 100).astype(dtype)
    if np.dtype(dtype).kind == "c":
        k = k + 1j * k[::-1]
    view = k[:, 3:80].T
    dst = torch.zeros(view.shape, dtype=torch.from_numpy(k).dtype)
    copying.copy_into(dst, view)
    assert np.array_equal(dst.numpy(), view)


def test_unaligned_source_lands_exactly(kernel: bool) -> None:
    """A float32 view at an odd byte offset (as a memory-mapped file can give) is copied exactly."""
    k = np.random.default_rng(3).standard_normal((40, 30)).astype(np.float32)
    raw = np.zeros(k.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=k.size, offset=1).reshape(k.shape)
    raw[1:] = k.view(np.uint8).reshape(-1)
    dst = torch.empty(30, 40)
    copying.copy_into(dst, unaligned.T)
    assert torch.equal(dst, torch.from_numpy(k.T.copy()))


def test_destination_rows_inside_a_wider_tensor(kernel: bool) -> None:
    """A block of a flat buffer (rows of a wider tensor): only the block is written."""
    k = np.random.default_rng(2).standard_normal((40, 60)).astype(np.float32)
    whole = torch.full((70, 50), 7.0)
    copying.copy_into(whole[5:65, 3:43], k.T)
    assert torch.equal(whole[5:65, 3:43], torch.from_numpy(k.T.copy()))
    outside = whole.clone()
    outside[5:65, 3:43] = 7.0
    assert bool((outside == 7.0).all())


def test_overlapping_memory_is_not_given_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that shares memory with the destination goes through torch, as ``copy_`` would."""
    if copying._kernels is None:
        pytest.fail("the compiled kernel weightport._kernels was not built")
    calls: list[tuple[int, ...]] = []
    real = copying._kernels.transpose

    def recorded(*args: int) -> None:
        calls.append(args)
        real(*args)

    monkeypatch.setattr(copying._kernels, "transpose", recorded)
    t = torch.empty(64, 64)
    src = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    copying.copy_into(t, src.numpy().T)  # disjoint: the kernel
    assert len(calls) == 1 and torch.equal(t, src.T)
    u = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    copying.copy_into(u[:32], u.numpy()[:, 32:].T[:32])  # rows 0-31 from columns 32-63 of the same tensor
    assert len(calls) == 1
    v = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    v[:32].copy_(torch.from_numpy(v.numpy()[:, 32:].T[:32]))
    assert torch.equal(u, v)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    extra_cols=st.integers(0, 9),
    offset=st.integers(0, 9),
    itemsize=st.sampled_from([2, 4, 8]),
    pad=st.integers(0, 16),
    start=st.sampled_from([0, 0, 1, 8]),
)
def test_kernel_matches_numpy_for_any_shape(
    rows: int, cols: int, extra_cols: int, offset: int, itemsize: int, pad: int, start: int
) -> None:
    """The compiled kernel against NumPy's own transpose: ragged edges, odd strides, whole line-wide
    strips and their remainder, destination rows aligned (streamed stores) or not."""
    if copying._kernels is None:
        pytest.fail("the compiled kernel weightport._kernels was not built")
    dtype = {2: np.int16, 4: np.int32, 8: np.int64}[itemsize]
    width = rows + offset + extra_cols
    k = np.arange(cols * width, dtype=dtype).reshape(cols, width)  # the "Keras kernel"
    view = k[:, offset : offset + rows].T
    whole = torch.full((rows, start + cols + pad), -1, dtype=torch.from_numpy(k).dtype)
    dst = whole[:, start : start + cols]
    copying.copy_into(dst, view)
    assert np.array_equal(dst.numpy(), view)
    assert bool((whole[:, :start] == -1).all()) and bool((whole[:, start + cols :] == -1).all())
