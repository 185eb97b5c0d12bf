"""Writing a checked plan into the module: in place, all or nothing.

Existing tensors get one in-place ``copy_`` each under ``torch.no_grad()``: the
Parameter objects, their device, dtype, ``requires_grad`` and memory format stay,
and an RNN's flat weight buffer stays valid. Tensors on the ``meta`` device have no
storage, so new ones are made from the source and swapped in only after every
one was read. A KeyboardInterrupt while writing is held until writing ends.
When a lazily read file fails mid-way, what was written is put back from a copy
of each tensor taken just before it is overwritten (``rollback=True``: extra
memory up to the size of what is loaded; pass ``rollback=False`` to skip it). Any other failure
while writing (out of memory, a KeyboardInterrupt raised in there) puts back the same and is raised
as it is, with a note of what is left written.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import signal
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from weightport.boxes import view_pieces
from weightport.copying import copy_checked, copy_into
from weightport.errors import LoadError, Problem, SourceError, counted
from weightport.options import LoadOptions
from weightport.plan import Entry, Plan
from weightport.progress import progress_callback
from weightport.sources.base import Source
from weightport.sources.files import byte_view, read_exact
from weightport.staging import Stager
from weightport.tensors import narrow, numpy_of
from weightport.transforms import Identity
from weightport.value_checks import check_ties, check_values, of_source, value_problem
from weightport.values import find_bad_values

__all__ = ["LocalWrite", "apply_plan", "deferred_interrupts", "UndoLog", "UNDO_MEMORY_BYTES"]

UNDO_MEMORY_BYTES = 256 * 1024 * 1024

Progress = Callable[[Entry], None]


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def host_view(tensor: torch.Tensor) -> np.ndarray | None:
    """A writable NumPy view of a CPU, contiguous tensor's memory, else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_meta:
        return None
    try:
        return numpy_of(tensor)  # bfloat16 and float8 through ml_dtypes
    except (TypeError, RuntimeError):
        return None


def goes_through_staging(tensor: torch.Tensor) -> bool:
    """Whether writes to ``tensor`` go through pinned host buffers (tensors off the CPU)."""
    return not (tensor.is_cpu or tensor.is_meta)


def _write(
    entry: Entry,
    source: Source,
    stagers: dict[torch.device, Stager] | None = None,
    tensor: torch.Tensor | None = None,
    fresh: bool = False,
) -> bool | None:
    """Fill ``tensor`` (default: the entry's own) with the entry's value, by the cheapest path.

    Into ``fresh`` memory (a meta tensor's new storage, never written) the pages are backed at once
    before the copy, and a tensor copied as it is from a mapped file is scanned as it is copied (its
    bytes read from memory once for both): then the result says whether every value was finite;
    None where nothing was scanned.
    """
    tensor = entry.tensor if tensor is None else tensor
    rule = entry.rule
    if stagers is not None and goes_through_staging(tensor):
        if tensor.device not in stagers:
            stagers[tensor.device] = Stager(tensor.device)
        stagers[tensor.device].write(tensor, entry.value(source))
        return None
    if fresh and type(rule.op) is Identity:
        mapped = source.mapped(rule.sources[0])
        if mapped is not None:
            finite = copy_checked(tensor, mapped)
            if finite is None:  # another dtype or a small tensor: a plain copy, scanned later
                copy_into(tensor.detach(), mapped, fresh=True)
            return finite
    if not source.in_memory and type(rule.op) is Identity and entry.inputs[0].dtype.isnative:
        view = host_view(tensor)
        if view is not None and view.dtype == entry.inputs[0].dtype:
            source.read_into(rule.sources[0], view)
            return None
    arrays = [_array(source, s) for s in rule.sources]
    if type(rule.op) is Identity:
        copy_into(tensor.detach(), arrays[0], fresh=fresh)
        return None
    pieces = view_pieces(rule.op, arrays)
    if pieces is None:
        copy_into(tensor.detach(), rule.op(*arrays), fresh=fresh)
        return None
    whole = tensor.detach()
    for region, view in pieces:  # the transform fused into the copy: no intermediate array
        copy_into(narrow(whole, region), view, fresh=fresh)
    return None


def _array(source: Source, name: str) -> np.ndarray:
    """Tensor ``name`` in place in its file where the reader can map it, else read into memory."""
    array = source.mapped(name)
    return source.read(name) if array is None else array


def _materialize(entry: Entry, source: Source) -> tuple[torch.Tensor, Problem | None]:
    """A meta tensor's new CPU storage, filled, and the problem with its values (where the check
    was left for after the fill, and not made as the tensor was copied in)."""
    tensor = entry.tensor
    new = _fresh_like(tensor)
    finite = _write(entry, source, tensor=new, fresh=True)
    problem = None if finite else _check_filled(entry, new, source)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(new, requires_grad=tensor.requires_grad), problem
    return new, problem


def _fresh_like(tensor: torch.Tensor) -> torch.Tensor:
    """New CPU memory for meta ``tensor``, in its memory format (a channels_last conv stays one).

    Not ``torch.empty_like``: on a meta tensor it takes a Python path that imports sympy (0.4 s)."""
    if tensor.is_contiguous() or 0 in tensor.stride():
        return torch.empty(tensor.shape, dtype=tensor.dtype)
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)


def _swap_in(module: nn.Module, new: dict[Hashable, torch.Tensor]) -> None:
    touched = set()
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for local, old in store.items():
                if old is not None and id(old) in new:
                    store[local] = new[id(old)]  # type: ignore[assignment]
                    touched.add(owner)
    for owner in touched:
        if isinstance(owner, nn.RNNBase):
            owner._init_flat_weights()


class UndoLog:
    """Copies of tensors about to be overwritten, to put back if a later read fails.

    Only tensors whose reads can fail mid-way are kept (streamed, compressed or
    HDF5-library reads; memory-mapped and in-memory sources cannot raise there). Up to
    ``memory_bytes`` stay in memory; beyond that, CPU tensors are spilled to an unlinked
    temporary file, so a huge load keeps its extra memory small. Costs one extra copy of
    the overwritten bytes.
    """

    def __init__(self, memory_bytes: int | None = None) -> None:
        self.memory_left = UNDO_MEMORY_BYTES if memory_bytes is None else memory_bytes
        self.saved: list[tuple[torch.Tensor, torch.Tensor | int]] = []
        self._spill: BinaryIO | None = None
        self._spilled = 0

    def keep(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        view = host_view(tensor)
        if nbytes <= self.memory_left or view is None:
            self.memory_left -= nbytes
            self.saved.append((tensor, tensor.detach().clone()))
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="weightport-undo-")  # noqa: SIM115 - closed by close()
        self.saved.append((tensor, self._spilled))
        self._spill.write(byte_view(view))
        self._spilled += nbytes

    def restore(self) -> None:
        if self._spill is not None:
            self._spill.flush()
        for tensor, saved in self.saved:
            if isinstance(saved, torch.Tensor):
                tensor.detach().copy_(saved)
            else:
                view = host_view(tensor)
                assert view is not None and self._spill is not None
                read_exact(self._spill.fileno(), saved, byte_view(view), "the undo log", "(saved tensor)")

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.saved.clear()


def _check_filled(entry: Entry, new: torch.Tensor, source: Source) -> Problem | None:
    """The problem with a materialized tensor's values, for entries checked after the fill."""
    if entry.check_after_fill is None:
        return None
    view = host_view(new.detach())
    if view is None:  # channels_last: its values in C order
        view = host_view(new.detach().contiguous())
    bad = find_bad_values(view, new.dtype, "finite", entry.check_after_fill)  # type: ignore[arg-type]
    return value_problem(entry, bad, of_source(entry, source)) if bad else None


class LocalWrite:
    """One load's write in this process: :meth:`read` checks the values, :meth:`commit` writes them
    (the shape :class:`weightport.distributed.ShardedWrite` has too)."""

    def __init__(self, plan: Plan, source: Source, options: LoadOptions) -> None:
        self.plan, self.source, self.options = plan, source, options

    def read(self) -> None:
        """Scan the source's values for what the casts need; problems go into the plan.

        A load that will write leaves the NaN/Inf scan of meta tensors to :meth:`commit`, which
        checks their new storage as it fills it (one read of the file instead of two).
        """
        try:
            if not self.options.check_values:
                check_ties(self.plan, self.source)
                return
            with progress_callback(self.plan, self.source, self.options.progress, "checking") as checked:
                check_values(
                    self.plan,
                    self.source,
                    self.options.allow_nonfinite,
                    after_fill=not self.options.dry_run,
                    progress=checked,
                )
        except OSError as e:  # nothing is written yet: a read failure is the source's problem
            raise SourceError(
                f"reading {self.source.description} failed: {e.strerror or e}. Fix: check the file is complete "
                "and readable, and that the source was not closed (a with-block that ended, or close())."
            ) from e

    def commit(self, progress: Progress | None = None) -> None:
        apply_plan(self.plan, self.source, rollback=self.options.rollback, progress=progress)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte addresses ``[start, end)`` of the storage under ``tensor``."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _copy_aliased_arrays(plan: Plan, source: Source) -> None:
    """Give arrays in memory that share bytes with a tensor being written (a module's own
    ``state_dict()`` tensors, swapped or transposed) copies of their own: written one tensor after
    another, a later read would otherwise see what an earlier write put there."""
    arrays = getattr(source, "arrays", None)
    if not source.in_memory or not isinstance(arrays, dict):
        return
    spans = sorted(
        {_span(e.tensor) for e in plan.entries if e.tensor.device.type == "cpu" and not e.tensor.is_meta}
    )
    if not spans:
        return
    starts = [a for a, _ in spans]
    reach = list(itertools.accumulate((b for _, b in spans), max))  # the furthest end among spans so far
    for name, array in arrays.items():
        if not array.size:
            continue
        start = array.__array_interface__["data"][0]
        low = start + sum(min(0, (n - 1) * stride) for n, stride in zip(array.shape, array.strides))
        high = start + sum(max(0, (n - 1) * stride) for n, stride in zip(array.shape, array.strides))
        i = bisect.bisect_left(starts, high + array.itemsize) - 1  # the last span starting before its end
        if i >= 0 and reach[i] > low:
            arrays[name] = array.copy()


def _restored(undo: UndoLog | None, written: int, half: str, from_source: bool) -> str:
    """What a failure while writing left of the module, for its message: ``written`` tensors went in
    without an undo copy, and ``half`` (a name, or '') was being written without one."""
    if (
        not written and not half
    ):  # every write had an undo copy, or none began (meta tensors go in at the end)
        return "every tensor written so far was put back" if undo is not None else "the module is unchanged"
    if undo is None:
        return "the module may be PARTLY WRITTEN (rollback=False)"
    if from_source:  # a memory-mapped file shrank during the writing pass
        return "the module may be PARTLY WRITTEN (the file changed while it was being read)"
    what = [counted(written, "tensor") + " written in full"] if written else []
    what += [f"'{half}' in part"] if half else []
    return (
        f"the module is PARTLY WRITTEN: {' and '.join(what)}, without an undo copy (reads from memory and "
        "memory-mapped files keep none, as they cannot fail)"
    )


def apply_plan(
    plan: Plan, source: Source, *, rollback: bool = True, progress: Progress | None = None
) -> None:
    """Write every planned tensor; on a read error put back what was written and raise.

    Meta tensors are read into new storage and swapped in at the end, only if every one
    was read (and, where the checks were left for after the fill, passed them).
    """
    _copy_aliased_arrays(plan, source)
    done: set[Hashable] = set()
    undo = UndoLog() if rollback else None
    unsaved = 0  # writes begun without an undo copy (their reads cannot fail, or rollback=False)
    materialized: dict[Hashable, torch.Tensor] = {}
    problems: list[Problem] = []
    stagers: dict[torch.device, Stager] = {}
    target, reading, copied = "", False, True  # reading: inside a read of the source (its failures are the
    # source's); copied: the tensor being written has an undo copy
    with deferred_interrupts(), torch.no_grad():
        try:
            for entry in plan.entries:
                if entry.key in done:
                    continue
                done.add(entry.key)
                target = entry.target
                if entry.tensor.is_meta:
                    reading = True
                    materialized[entry.key], problem = _materialize(entry, source)
                    reading = False
                    if problem is not None:
                        problems.append(problem)
                else:
                    if (
                        undo is not None
                        and not source.in_memory
                        and any(source.read_can_fail(s) for s in entry.rule.sources)
                    ):
                        undo.keep(entry.tensor)
                        copied = True
                    else:
                        unsaved, copied = unsaved + 1, False
                    reading = True
                    _write(entry, source, stagers)
                    reading = False
                if progress is not None:
                    progress(entry)
            for stager in stagers.values():
                stager.finish()
        except BaseException as e:  # a KeyboardInterrupt raised in here too: put back what can be
            for stager in stagers.values():
                with contextlib.suppress(Exception):  # the failure being handled is the one to report
                    stager.finish()
            if undo is not None:
                undo.restore()
            from_source = reading and isinstance(e, (OSError, SourceError)) and not source.in_memory
            half = reading and not copied  # the tensor being written may be half written
            restored = _restored(undo, unsaved - half, target if half else "", from_source)
            if from_source:
                raise SourceError(
                    f"reading {source.description} failed while writing '{target}': {e}; {restored}. "
                    "Fix: check the file is complete and not being changed, then load again."
                ) from e
            # not a read of the source (out of memory, an interrupt, a progress callback): raised as it is
            add_note = getattr(e, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(
                    f"weightport: raised while writing '{target}' from {source.description}; {restored}."
                )
            raise
        finally:
            if undo is not None:
                undo.close()
        if problems:
            raise LoadError(problems, target=type(plan.module).__name__)
        if materialized:
            _swap_in(plan.module, materialized)
