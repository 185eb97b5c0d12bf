"""The compiled kernels of ``_kernels.c`` against NumPy and torch: the streaming copy moves every byte
at any offset and length, and the NaN/Inf scan agrees with ``torch.isfinite`` for every float layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightport import copying, kernels
from weightport.tensors import numpy_of


@pytest.fixture
def compiled():  # type: ignore[no-untyped-def]
    if kernels.compiled is None:
        pytest.fail("the compiled extension weightport._kernels was not built (is a C compiler installed?)")
    return kernels.compiled


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(0, 40000),
    src_offset=st.integers(0, 4200),
    dst_offset=st.integers(0, 4200),
)
def test_stream_copy_moves_every_byte(length: int, src_offset: int, dst_offset: int) -> None:
    """Unaligned heads (up to a line, and past a page), whole 64-byte lines and ragged tails, with
    the source prefetched past its end: the bytes around the target stay untouched."""
    if kernels.compiled is None:
        pytest.fail("the compiled extension weightport._kernels was not built")
    rng = np.random.default_rng(length)
    src = rng.integers(0, 256, length + 4200, dtype=np.uint8)
    dst = np.zeros(length + 8400, np.uint8)
    kernels.compiled.stream_copy(dst.ctypes.data + dst_offset, src.ctypes.data + src_offset, length)
    assert np.array_equal(dst[dst_offset : dst_offset + length], src[src_offset : src_offset + length])
    assert not dst[:dst_offset].any() and not dst[dst_offset + length :].any()


def test_stream_copy_refuses_a_negative_size(compiled) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="negative"):
        compiled.stream_copy(0, 0, -1)


@pytest.mark.parametrize("parallel", [False, True])
def test_copy_array_and_copy_into_stream_big_copies_exactly(compiled, monkeypatch, parallel: bool) -> None:  # type: ignore[no-untyped-def]
    """Big contiguous copies go through the streaming kernel (split over threads or not) bit for bit."""
    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1 if parallel else 1 << 40)
    calls: list[int] = []
    real = compiled.stream_copy

    def recorded(dst: int, src: int, nbytes: int) -> None:
        calls.append(nbytes)
        real(dst, src, nbytes)

    monkeypatch.setattr(compiled, "stream_copy", recorded)
    src = np.random.default_rng(0).standard_normal(copying.STREAM_BYTES // 4 + 17).astype(np.float32)
    out = np.zeros_like(src)
    copying.copy_array(out, src)
    assert np.array_equal(out.view(np.uint32), src.view(np.uint32))
    assert sum(calls) == src.nbytes and (len(calls) > 1) == parallel
    calls.clear()
    dst = torch.zeros(src.shape)
    copying.copy_into(dst, src)
    assert torch.equal(dst, torch.from_numpy(src)) and sum(calls) == src.nbytes


def test_small_casting_and_overlapping_copies_do_not_stream(compiled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    monkeypatch.setattr(compiled, "stream_copy", lambda *args: calls.append(args[2]))
    big = copying.STREAM_BYTES // 4
    copying.copy_array(np.zeros(8, np.float32), np.ones(8, np.float32))  # small
    cast = np.zeros(big, np.float64)
    copying.copy_array(cast, np.ones(big, np.float32))  # a cast
    buffer = np.arange(2 * big, dtype=np.float32)
    copying.copy_array(buffer[1 : big + 1], buffer[:big])  # overlapping: NumPy's memmove
    assert calls == [] and cast.sum() == big
    assert np.array_equal(buffer[1 : big + 1], np.arange(big, dtype=np.float32))


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [float("nan"), float("inf"), float("-inf"), -float("nan")]


@pytest.mark.parametrize("dtype", FLOATS)
@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 700), where=st.floats(0, 1), special=st.sampled_from([None, *SPECIALS]))
def test_all_finite_agrees_with_torch(dtype: torch.dtype, length: int, where: float, special) -> None:  # type: ignore[no-untyped-def]
    """One NaN or Inf anywhere (first item, last item, inside a vector block or its tail) is seen."""
    values = torch.randn(length, generator=torch.Generator().manual_seed(length)).to(dtype) * 100
    if special is not None:
        values[min(int(where * length), length - 1)] = special
    assert copying.all_finite(values) == bool(torch.isfinite(values).all())


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_edges_of_the_finite_range(compiled, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """The largest finite value, its negative, -0.0 and subnormals are finite; the next pattern is not."""
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, -0.0, info.smallest_normal / 4, info.tiny], dtype=dtype)
    assert copying.all_finite(edges) is True
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[edges.element_size()]
    beyond = edges.view(bits).clone()
    beyond[1] += 1  # -max plus one ulp of magnitude: -inf
    assert not bool(torch.isfinite(beyond.view(dtype)).all())
    assert copying.all_finite(beyond.view(dtype)) is False


@pytest.mark.parametrize("where", [0, 1023, 1024, 5000, -1])
def test_all_finite_split_over_threads_sees_every_part(compiled, monkeypatch, where: int) -> None:  # type: ignore[no-untyped-def]
    """Split into page-aligned parts (one per copy thread), a NaN in any part, at its edges too, is seen."""
    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(copying, "_threads", lambda: 3)
    values = torch.ones(6001)
    assert copying.all_finite(values) is True
    values[where] = float("nan")
    assert copying.all_finite(values) is False


def test_all_finite_says_none_where_it_cannot_tell() -> None:
    assert copying.all_finite(torch.ones(4, 4).T[:, :2]) is None  # not contiguous
    assert copying.all_finite(torch.ones(3, dtype=torch.int32)) is None
    assert copying.all_finite(torch.ones(3, dtype=torch.complex64)) is None


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [None, 0, -1, "middle"])
@pytest.mark.parametrize("populated", [True, False])
def test_copy_checked_copies_and_scans_in_one_pass(
    compiled, monkeypatch, parallel, dtype, bad, populated
) -> None:  # type: ignore[no-untyped-def]
    """Every byte lands whether or not a NaN/Inf is there, in any thread's part, and the scan says so;
    by streamed stores into pages backed first, by plain ones where they could not be (an old kernel)."""
    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1 if parallel else 1 << 40)
    if not populated:
        monkeypatch.setattr(compiled, "populate", lambda addr, nbytes: False)
    modes: list[bool] = []
    real = compiled.copy_finite
    monkeypatch.setattr(compiled, "copy_finite", lambda *args: modes.append(args[5]) or real(*args))
    values = (torch.randn(copying.STREAM_BYTES // 2 + 3) * 50).to(dtype)
    if bad is not None:
        values[values.numel() // 2 if bad == "middle" else bad] = float("nan")
    src = numpy_of(values)
    dst = torch.empty(tuple(values.shape), dtype=dtype)
    assert copying.copy_checked(dst, src) == (bad is None)
    assert torch.equal(dst.view(torch.uint8), values.view(torch.uint8))
    assert modes and set(modes) == {populated}


def test_copy_checked_declines_what_it_cannot_do(compiled) -> None:  # type: ignore[no-untyped-def]
    big = copying.STREAM_BYTES // 4
    dst = torch.zeros(big)
    assert copying.copy_checked(dst, np.ones(big, np.float64)) is None  # a cast
    assert copying.copy_checked(torch.zeros(8), np.ones(8, np.float32)) is None  # small
    assert copying.copy_checked(torch.zeros(big, dtype=torch.int32), np.ones(big, np.int32)) is None
    assert not dst.any()  # nothing was copied where it declined


@pytest.mark.parametrize("offset", [0, 1, 4095, 4097])
def test_populate_backs_whole_pages_and_leaves_every_byte(compiled, offset: int) -> None:
    """The range is rounded inward to whole pages; contents inside and around it stay as they were
    (here, memory already written); a negative size is refused."""
    data = np.random.default_rng(offset).integers(0, 256, 5 << 20, dtype=np.uint8)
    before = data.copy()
    assert compiled.populate(data.ctypes.data + offset, (4 << 20) + 123) is True  # Linux 5.14+ here
    assert np.array_equal(data, before)
    assert compiled.populate(data.ctypes.data + 1, 100) is False  # no whole page inside
    with pytest.raises(ValueError, match="negative"):
        compiled.populate(0, -1)


@pytest.mark.parametrize("populated", [True, False])
def test_copy_into_fresh_memory_streams_only_into_backed_pages(
    compiled, monkeypatch, populated: bool
) -> None:  # type: ignore[no-untyped-def]
    if not populated:
        monkeypatch.setattr(compiled, "populate", lambda addr, nbytes: False)
    streamed: list[int] = []
    real = compiled.stream_copy
    monkeypatch.setattr(compiled, "stream_copy", lambda *args: streamed.append(args[2]) or real(*args))
    src = np.random.default_rng(2).standard_normal(copying.STREAM_BYTES // 4 + 99).astype(np.float32)
    dst = torch.empty(src.shape)
    copying.copy_into(dst, src, fresh=True)
    assert torch.equal(dst, torch.from_numpy(src)) and (sum(streamed) == src.nbytes) == populated
    assert populated or not streamed


def test_a_forked_child_copies_with_threads_of_its_own(compiled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The copy threads do not survive a fork (a DataLoader worker): the child starts its own."""
    import multiprocessing
    import warnings

    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1)
    src = np.arange(copying.STREAM_BYTES // 2, dtype=np.float32)
    copying.copy_array(np.empty_like(src), src)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        # JAX and TensorFlow, loaded by other tests, warn that forking a threaded process may
        # deadlock; the child touches neither, and the timeout turns a hang into a failure.
        warnings.simplefilter("ignore")
        pool = context.Pool(1)
    with pool:
        assert pool.apply_async(_copy_in_child, (src,)).get(timeout=60)


def _copy_in_child(src: np.ndarray) -> bool:
    out = np.zeros_like(src)
    copying.copy_array(out, src)
    return bool(np.array_equal(out, src))
