"""Data-parallel calibration over torch.distributed: each rank runs its share of the calibration
inputs, and when the block ends the statistics of every site are reduced over the process group,
so every rank freezes the same parameters.

Calls are numbered across the group as if one process had made them all, interleaved: the k-th
call of rank r is call k * world + r (input i of a list shared as `inputs[rank::world]`). The
statistics use that number for the row sample and the even/odd split, so the reduced statistics are
those of one process calling every input in order (Hessians up to summation order).

The reduction is one small exchange of what each rank holds (`exchange`: counts, row priorities),
then tensor collectives: ranges by all-reduce MAX, Hessians by SUM (`all_reduce_`, in buckets), and
each row of the merged sample sent once, by the rank that holds it (`broadcast_tensors`). No rank
ever holds another rank's whole statistics.

A rank whose block raises still takes part in the first exchange, sending its error instead of
what it holds: every rank then raises and keeps no statistics. A rank that never reaches the exchange
makes the others fail on the group's timeout (`init_process_group(timeout=...)`), not hang."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """This process's place in the calibration group."""
    rank: int = 0
    world: int = 1

    def call_number(self, local: int) -> int:
        return local * self.world + self.rank


SINGLE = Shard()


def calibration_group(group=None):
    """The process group calibration merges over: `group` if given, else the default group when
    torch.distributed is initialised with more than one process; None otherwise."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def init_from_env() -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) with no process group yet: initialise
    the default one (NCCL with CUDA, else gloo)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shard_of(group) -> Shard:
    if group is None:
        return SINGLE
    return Shard(dist.get_rank(group), dist.get_world_size(group))


def shard_items(items, shard: Shard) -> list:
    """This rank's share of `items` (interleaved: item i goes to rank i % world)."""
    return list(items)[shard.rank::shard.world]


class WorkQueue:
    """Items drawn one at a time by the ranks of a group, each item by exactly one rank: a counter
    in the default group's c10d store (the rendezvous store torch.distributed already runs), so a
    rank that finishes early draws more and the ranks end together. `draw` returns the next index,
    or None when all are taken. Each use takes a fresh key (`round`: the same on every rank, as
    every rank runs the same calibrations)."""

    def __init__(self, store, round: int, count: int):
        self.store, self.key, self.count = store, f"segquant/work/{round}", count

    def draw(self) -> int | None:
        i = self.store.add(self.key, 1) - 1
        return i if i < self.count else None

    @staticmethod
    def store_of(group):
        """The default group's store where `group` is that group, else None (the caller then
        splits the items in advance). The store's accessor is internal to torch: feature-tested."""
        if group is not dist.group.WORLD:
            return None
        try:
            from torch.distributed.distributed_c10d import _get_default_store
            return _get_default_store()
        except Exception:   # noqa: BLE001  (any torch without it: the fixed split)
            return None


@dataclass(frozen=True)
class RankFailed:
    """What a rank sends instead of statistics when its block raised."""
    rank: int
    error: str


def exchange(payload, group) -> list:
    """Every rank's payload, in rank order (one all_gather_object on the group)."""
    gathered = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(gathered, payload, group=group)
    except Exception as e:   # a rank that died, or the group's timeout
        raise RuntimeError(f"segquant_compile.calibrate(): exchanging calibration statistics over the process "
                           f"group failed ({type(e).__name__}: {e}); no statistics were kept") from None
    return gathered


def by_rank(gathered: list) -> dict:
    """{key: [each rank's value for it, or None where a rank has none]} from every rank's {key: value};
    raises if a rank failed."""
    failed = [p for p in gathered if isinstance(p, RankFailed)]
    if failed:
        raise RuntimeError("segquant_compile.calibrate(): " + "; ".join(
            f"rank {f.rank} raised inside the block ({f.error})" for f in failed) + "; no statistics were kept")
    out: dict = {}
    for rank, payload in enumerate(gathered):
        for key, value in payload.items():
            out.setdefault(key, [None] * len(gathered))[rank] = value
    return out


BUCKET_BYTES = 64 << 20   # at most this much is flattened into one collective


def collective_device(group):
    """Where the group's collectives take their tensors: the current CUDA device under NCCL, else
    the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: list, op, group) -> None:
    """Reduce `tensors` (one dtype) in place over the group: flattened into buckets of up to
    BUCKET_BYTES on the collective device, one all-reduce per bucket."""
    device = collective_device(group)
    bucket: list = []

    def flush():
        flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()
    size = 0
    for t in tensors:
        if bucket and size + t.numel() * t.element_size() > BUCKET_BYTES:
            flush()
            size = 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        flush()


def broadcast_tensors(tensors: list[Tensor] | None, specs: list["TensorSpec"], src: int, group) -> list[Tensor]:
    """`src`'s tensors (None on the other ranks, which know their `specs`) on every rank, as one
    byte buffer (`pack`): one collective, whatever their dtypes. The receivers' tensors are on the
    collective device."""
    device = collective_device(group)
    if tensors is not None:
        dist.broadcast(pack(tensors).to(device), group_src=src, group=group)
        return tensors
    buffer = torch.empty(sum(s.nbytes for s in specs), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, group_src=src, group=group)
    return unpack(buffer, specs)


ALIGN = 8   # each packed tensor starts at a multiple of this many bytes: its dtype's view needs it


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to rebuild a tensor from bytes."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype)

    @classmethod
    def dense(cls, shape: tuple[int, ...], dtype: torch.dtype) -> "TensorSpec":
        return cls(tuple(shape), torch.empty(shape, device="meta").stride(), dtype)

    @property
    def nbytes(self) -> int:
        return -(-math.prod(self.shape) * self.dtype.itemsize // ALIGN) * ALIGN


def pack(tensors: list[Tensor]) -> Tensor:
    """The tensors' values as one uint8 buffer, each part padded to ALIGN bytes."""
    parts = []
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        parts += [raw, raw.new_zeros(TensorSpec.of(t).nbytes - len(raw))]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: Tensor, specs: list[TensorSpec]) -> list[Tensor]:
    """`pack`'s tensors back, with their strides: each its own storage (views of one buffer as
    several dtypes could be neither saved nor freed apart)."""
    out, offset = [], 0
    for s in specs:
        n = math.prod(s.shape) * s.dtype.itemsize
        t = buffer[offset:offset + n].view(s.dtype).view(s.shape)
        stride = s.stride if _dense(s.shape, s.stride) else t.stride()   # an expanded tensor comes materialized
        out.append(torch.empty_strided(s.shape, stride, dtype=s.dtype, device=buffer.device).copy_(t))
        offset += s.nbytes
    return out


def _dense(shape, stride) -> bool:
    """Do these strides lay the elements out one after another in some order of the dimensions?"""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda d: d[1]):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def record_skeleton(record) -> tuple[object, list[Tensor]]:
    """A dataclass record with its tensor fields replaced by their TensorSpecs (what the ranks
    exchange as objects), and those tensors in field order (what is broadcast as bytes)."""
    tensors = {name: getattr(record, name) for name in _fields_of(record, Tensor)}
    return dataclasses.replace(record, **{k: TensorSpec.of(t) for k, t in tensors.items()}), list(tensors.values())


def _fields_of(record, kind) -> list[str]:
    """The names of a dataclass record's fields holding a `kind`, in field order."""
    return [f.name for f in dataclasses.fields(record) if isinstance(getattr(record, f.name), kind)]


def record_specs(skeleton) -> list[TensorSpec]:
    return [getattr(skeleton, name) for name in _fields_of(skeleton, TensorSpec)]


def fill_record(skeleton, tensors: list[Tensor]):
    """The record a skeleton stands for, with its tensors (in field order)."""
    return dataclasses.replace(skeleton, **dict(zip(_fields_of(skeleton, TensorSpec), tensors)))


def check_names(states) -> None:
    names = [st.name for st in states]
    if len(set(names)) != len(names):
        raise RuntimeError("segquant_compile.calibrate(): two sites share a name; the ranks' statistics are "
                           "matched by site name")
