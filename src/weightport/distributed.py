"""Sharded models: every rank reads only its own shard of each DTensor, on ``torch.distributed``.

When a module's parameters are DTensors (``distribute_tensor``, FSDP2's
``fully_shard``, tensor-parallel plans: ``Shard(dim)`` and ``Replicate()`` on a
``DeviceMesh``), :func:`weightport.load` becomes a collective that every rank
calls with the same model and source. Each rank:

1. plans the load as a single process does (names, global shapes, dtypes);
2. works out the box of each tensor it holds from the placements, maps it back
   through the layout's transform to boxes of the source tensors
   (:func:`weightport.boxes.region_pieces`: rows ``a:b`` of a transposed
   Keras kernel are its columns ``a:b``) and reads only those
   (:meth:`Source.read_region`: one positioned read per contiguous run),
   checking values as they arrive, into its new local shard (meta tensors) or a
   buffer of its size (existing tensors, unless ``rollback=False``);
3. agrees with the others (one ``all_gather_object`` of the problems): if any
   rank found a problem or failed, every rank raises the same
   :class:`~weightport.errors.LoadError`, naming the tensor and the rank, and no
   rank has written anything;
4. commits: meta DTensors are rebuilt with ``DTensor.from_local`` and swapped into
   the module, existing local shards get one ``copy_``.

Only ``torch.distributed`` is used: processes come from ``torchrun`` or
``torch.multiprocessing``; gloo and NCCL both work (object collectives use the
current CUDA device under NCCL, so call ``torch.cuda.set_device`` first, as
``torchrun`` scripts do). Nothing here imports ``torch.distributed`` until a
DTensor shows up.

>>> import torch
>>> has_dtensors(torch.nn.Linear(2, 2))
False
>>> box_text((slice(0, 3), slice(4, 8)))
'[0:3, 4:8]'
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from weightport import values
from weightport.apply import deferred_interrupts, host_view
from weightport.boxes import Piece, region_pieces
from weightport.copying import copy_into
from weightport.errors import LoadError, Problem, SourceError
from weightport.options import LoadOptions
from weightport.plan import Entry, Plan
from weightport.sources.base import Region, Source, region_shape
from weightport.tensors import narrow
from weightport.value_checks import allowed_nonfinite, value_problem

__all__ = ["is_dtensor", "has_dtensors", "local_region", "box_text", "agree", "ShardedWrite"]

BAND_BYTES = 32 * 1024 * 1024
"""Pieces that cannot be read straight into their destination go through bands of at most this size."""


def _dtensor_class() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before this is imported
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter wrapping one included)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def has_dtensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is a DTensor."""
    cls = _dtensor_class()
    if cls is None:
        return False
    return any(isinstance(t, cls) for t in itertools.chain(module.parameters(), module.buffers()))


def box_text(region: Region) -> str:
    """``[a:b, c:d]``: a box as messages show it."""
    return "[" + ", ".join(f"{part.start}:{part.stop}" for part in region) + "]"


def local_region(tensor: Any) -> Region | None:
    """The box of a DTensor's global shape that this rank holds; None if it is not on the mesh.

    ``Shard(d)`` splits dimension ``d`` as ``torch.chunk`` does (pieces of
    ``ceil(n / k)``, the last ones shorter or empty), mesh dimension by mesh
    dimension; ``Replicate()`` keeps it whole.

    Raises:
        ValueError: a placement other than ``Shard`` and ``Replicate`` (``Partial``,
            strided sharding), or a local shape the placements do not explain.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    shape = tuple(tensor.shape)
    box = [(0, n) for n in shape]
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise ValueError(f"placement {placement} on mesh dimension {mesh_dim}")
        dim = placement.dim % len(shape)
        start, stop = box[dim]
        chunk = -(-(stop - start) // mesh.size(mesh_dim))
        low = min(start + coordinate[mesh_dim] * chunk, stop)
        box[dim] = (low, min(low + chunk, stop))
    region = tuple(slice(a, b) for a, b in box)
    local = tuple(tensor.to_local().shape)
    if region_shape(region) != local:
        raise ValueError(
            f"placements {tuple(tensor.placements)} give this rank a {region_shape(region)} box, "
            f"but its local tensor is {local}"
        )
    return region


def _mesh_device(mesh: Any) -> torch.device:
    kind = mesh.device_type
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def _group(module: nn.Module) -> Any:
    """The process group of the load: the mesh's own for one 1-D mesh, else the default group."""
    dtensors: list[Any] = [t for t in itertools.chain(module.parameters(), module.buffers()) if is_dtensor(t)]
    meshes = {id(t.device_mesh): t.device_mesh for t in dtensors}
    if len(meshes) == 1:
        mesh = next(iter(meshes.values()))
        if mesh.ndim == 1:
            return mesh.get_group()
    return None


def _at(bad: str, offset: tuple[int, ...]) -> str:
    """``bad`` with its first ``index (i, j)`` moved by ``offset`` (piece -> whole-tensor indices)."""

    def shift(match: re.Match[str]) -> str:
        index = [int(x) for x in match.group(1).split(",") if x.strip()]
        if len(index) != len(offset):
            return match.group(0)
        return f"index {tuple(i + o for i, o in zip(index, offset))}"

    return re.sub(r"index \(([-\d, ]*)\)", shift, bad, count=1)


def _straight(piece: Piece) -> bool:
    """Whether the piece's values are its source box reshaped (no transposition, no new axes)."""
    return all(a >= 0 for a in piece.axes) and list(piece.axes) == sorted(piece.axes)


def _bands(piece: Piece, itemsize: int) -> Iterator[Piece]:
    """``piece`` cut along its first axis into parts of at most :data:`BAND_BYTES`."""
    shape = region_shape(piece.dst)
    if not shape:
        yield piece
        return
    rows = max(1, BAND_BYTES // max(1, math.prod(shape[1:]) * itemsize))
    start, stop = piece.dst[0].start, piece.dst[0].stop
    if stop - start <= rows:
        yield piece
        return
    for low in range(start, stop, rows):
        part = piece.clip(0, low, min(low + rows, stop))
        if part is not None:
            yield part


@dataclass
class _Target:
    """One tensor to write on this rank: its box, and where its new values go."""

    entry: Entry
    region: Region | None  # the box this rank holds (global coordinates); None: none
    sharded: bool
    local: torch.Tensor | None  # the existing tensor written in place (None: a meta tensor)
    buffer: torch.Tensor | None = None  # the values read, waiting for the commit


class ShardedWrite:
    """The reading, checking and writing of one load on this rank (see the module docstring)."""

    def __init__(self, plan: Plan, source: Source, options: LoadOptions) -> None:
        self.plan = plan
        self.source = source
        self.options = options
        self.rollback = options.rollback
        self.targets: list[_Target] = []
        self._ties: list[tuple[Entry, _Target]] = []
        meshes = [cast(Any, e.tensor).device_mesh for e in plan.entries if is_dtensor(e.tensor)]
        # plain tensors on meta in a sharded model go where its shards live (a CUDA mesh: the current GPU)
        self.device = _mesh_device(meshes[0]) if meshes else torch.device("cpu")

    def read(self) -> None:
        """Read (and check) this rank's part of every planned tensor, into buffers unless nothing
        will be written (a dry run, or problems found already)."""
        check, allow_nonfinite = self.options.check_values, self.options.allow_nonfinite
        fill = not self.options.dry_run and not self.plan.problems
        first: dict[int, _Target] = {}
        for entry in self.plan.entries:
            tensor = entry.tensor
            if id(tensor) in first:
                self._ties.append((entry, first[id(tensor)]))
                continue
            target = self._target(entry)
            if target is None:
                continue
            first[id(tensor)] = target
            self.targets.append(target)
            keep = fill and (target.local is None or self.rollback)
            if keep and target.region is not None:
                target.buffer = self._new_buffer(target)
            allowed = allowed_nonfinite(entry.target, allow_nonfinite)
            bad = self._transfer(target, target.buffer, check=check, allowed=allowed)
            if bad is not None:
                self.plan.problems.append(bad)
        for entry, target in self._ties:
            self._compare_tie(entry, target)

    def _target(self, entry: Entry) -> _Target | None:
        tensor = entry.tensor
        if not is_dtensor(tensor):
            whole = tuple(slice(0, d) for d in tensor.shape)
            return _Target(entry, whole, False, None if tensor.is_meta else tensor.detach())
        try:
            region = local_region(tensor)
        except ValueError as e:
            self.plan.problems.append(
                Problem(
                    entry.target,
                    "a DTensor placed with Shard(dim) or Replicate() on each mesh dimension",
                    str(e),
                    "load before applying that placement, or redistribute it "
                    "(dtensor.redistribute(mesh, [Replicate()]))",
                )
            )
            return None
        local = cast(Any, tensor).to_local()
        return _Target(entry, region, True, None if local.is_meta else local.detach())

    def _new_buffer(self, target: _Target) -> torch.Tensor:
        if target.local is not None:
            return torch.empty_like(target.local)
        assert target.region is not None
        shape = region_shape(target.region)
        return torch.empty(shape, dtype=target.entry.tensor.dtype, device=self._device(target))

    def _transfer(
        self, target: _Target, out: torch.Tensor | None, *, check: bool, allowed: bool
    ) -> Problem | None:
        """Read the target's box (into ``out`` when given), checking values when ``check``."""
        entry, region = target.entry, target.region
        if region is None or math.prod(region_shape(region)) == 0:
            return None
        check = check and entry.check != "none"
        if out is None and not check:
            return None  # nothing to fill and nothing to check: read nothing
        rule = entry.rule
        where = f", in the shard {box_text(region)}" if target.sharded else ""
        pieces = region_pieces(rule.op, [i.shape for i in entry.inputs], region)
        if pieces is None:  # an op with no box-to-box mapping: compute it whole, keep the box
            value = entry.value(self.source)[region]
            bad = values.find_bad_values(value, entry.tensor.dtype, entry.check, allowed) if check else None
            if bad:
                return value_problem(entry, _at(bad, tuple(p.start for p in region)), where)
            if out is not None:
                copy_into(out, value)
            return None
        for piece in pieces:
            if piece.src is None:
                if out is not None:
                    narrow(out, piece.dst).zero_()
                continue
            key = rule.sources[piece.src]
            itemsize = entry.inputs[piece.src].dtype.itemsize
            for band in _bands(piece, itemsize):
                bad = self._band(entry, key, band, out, check=check, allowed=allowed)
                if bad:
                    offset = tuple(r.start + d.start for r, d in zip(region, band.dst))
                    return value_problem(entry, _at(bad, offset), where)
        return None

    def _band(
        self, entry: Entry, key: str, band: Piece, out: torch.Tensor | None, *, check: bool, allowed: bool
    ) -> str | None:
        destination = narrow(out, band.dst) if out is not None else None
        view = host_view(destination) if destination is not None else None
        source_dtype = self.source.infos[key].dtype
        if view is not None and view.dtype == source_dtype and source_dtype.isnative and _straight(band):
            # straight into the destination's memory: no intermediate array
            self.source.read_region(key, band.region, out=view.reshape(region_shape(band.region)))
            value = view
        else:
            value = band.view(self.source.read_region(key, band.region))
            if destination is not None:
                copy_into(destination, value)
        if not check:
            return None
        return values.find_bad_values(value, entry.tensor.dtype, entry.check, allowed)

    def _compare_tie(self, entry: Entry, first: _Target) -> None:
        """A tied tensor given twice must have the same values under both names (this rank's box)."""
        if first.region is None:
            return
        mine = torch.empty(region_shape(first.region), dtype=entry.tensor.dtype)
        theirs = torch.empty_like(mine)
        self._transfer(_Target(entry, first.region, first.sharded, None), mine, check=False, allowed=True)
        self._transfer(
            _Target(first.entry, first.region, first.sharded, None), theirs, check=False, allowed=True
        )
        same = mine == theirs
        if mine.is_floating_point() or mine.is_complex():
            same |= mine.isnan() & theirs.isnan()
        if not bool(same.all()):
            self.plan.problems.append(entry.tie_problem(first.entry))

    def commit(self, progress: Callable[[Entry], None] | None = None) -> None:
        """Write what was read (after every rank agreed): swap in new tensors, copy into existing ones."""
        new: dict[int, torch.Tensor] = {}
        with deferred_interrupts(), torch.no_grad():
            for target in self.targets:
                tensor = target.entry.tensor
                if target.local is None:  # meta: the buffer becomes the tensor
                    new[id(tensor)] = self._wrap(target)
                elif target.buffer is not None:
                    target.local.copy_(target.buffer)
                else:  # rollback=False: read a second time, straight into the tensor
                    try:
                        self._transfer(target, target.local, check=False, allowed=True)
                    except Exception as e:
                        raise SourceError(
                            f"reading {self.source.description} failed while writing '{target.entry.target}': "
                            f"{e}; the module may be PARTLY WRITTEN on this rank (rollback=False). "
                            "Fix: check the file, then load again on every rank."
                        ) from e
                target.buffer = None
                if progress is not None:
                    progress(target.entry)
            if new:
                _swap_in(self.plan.module, new)

    def _wrap(self, target: _Target) -> torch.Tensor:
        tensor: Any = target.entry.tensor
        local = target.buffer
        if local is None:  # this rank holds none of it
            local = torch.empty(
                tuple(tensor.to_local().shape), dtype=tensor.dtype, device=self._device(target)
            )
        value: torch.Tensor = local
        if target.sharded:
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(
                local,
                tensor.device_mesh,
                tensor.placements,
                run_check=False,
                shape=tensor.shape,
                stride=tensor.stride(),
            )
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(value, requires_grad=tensor.requires_grad)
        return value

    def _device(self, target: _Target) -> torch.device:
        return _mesh_device(cast(Any, target.entry.tensor).device_mesh) if target.sharded else self.device


def _swap_in(module: nn.Module, new: dict[int, torch.Tensor]) -> None:
    """Put the new tensors where the meta ones were; RNNs get their weight list refreshed."""
    for owner in module.modules():
        touched = False
        for store in (owner._parameters, owner._buffers):
            for name, old in store.items():
                if old is not None and id(old) in new:
                    store[name] = new[id(old)]  # type: ignore[assignment]
                    touched = True
        if touched and isinstance(owner, nn.RNNBase):
            if any(is_dtensor(p) for p in owner.parameters(recurse=False)):
                # cuDNN cannot flatten DTensors: refresh the list without flattening
                owner._flat_weights = [getattr(owner, n, None) for n in owner._flat_weights_names]
            else:
                owner._init_flat_weights()


# ---- agreeing across ranks ---------------------------------------------------------------------------


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(r) for r in ranks[:-1]) + f" and {ranks[-1]}"


def _merge(gathered: list[tuple[int, list[Problem], Any]]) -> list[Problem]:
    """Every rank's problems once: those seen on every rank as they are, the others naming their ranks."""
    seen: dict[Problem, list[int]] = {}
    for rank, problems, _ in gathered:
        for problem in problems:
            ranks = seen.setdefault(problem, [])
            if rank not in ranks:
                ranks.append(rank)
    everyone = len(gathered)
    merged = []
    for problem, ranks in seen.items():
        if len(ranks) == everyone:
            merged.append(problem)
        else:
            found = f"{problem.found} (on {_ranks(sorted(ranks))})"
            merged.append(Problem(problem.name, problem.expected, found, problem.fix))
    return sorted(merged)


def _failure(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, str(error))


def agree(module: nn.Module, plan: Plan | None, error: BaseException | None, *, target: str) -> None:
    """Agree with every rank on this load (a collective): afterwards ``plan.problems`` are every
    rank's (the same list on every rank: those not found on every rank name their ranks).

    Every rank calls it whatever happened on it: ``error`` is what opening, planning or reading
    raised here (a file missing on one machine, say), so no rank is left waiting.

    Raises:
        LoadError: some ranks failed (raised the same on every rank).
        Exception: the error every rank hit alike (a bad layout name, say), as it is.
    """
    import torch.distributed as dist

    group = _group(module)
    mine = (dist.get_rank(), list(plan.problems) if plan is not None else [], _failure(error))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    failures = [(r, f) for r, _, f in gathered if f is not None]
    if failures:
        if error is not None and len(failures) == len(gathered) and len({f for _, f in failures}) == 1:
            raise error  # the same error everywhere: raise it as it is
        problems = [
            Problem(
                f"(rank {r})",
                "a load that runs on every rank",
                f"{kind}: {text}",
                "fix what that rank reports (a file missing on its machine?), then load again on every rank",
            )
            for r, (kind, text) in failures
        ]
        raise LoadError(problems + _merge(gathered), target=target) from error
    assert plan is not None
    plan.problems[:] = _merge(gathered)
