"""Data-parallel calibration over torch.distributed: each rank runs its share of the calibration
inputs, and when the block ends the statistics of every site are reduced over the process group,
so every rank freezes the same parameters.

Calls are numbered across the group as if one process had made them all, interleaved: the k-th
call of rank r is call k * world + r (input i of a list shared as `inputs[rank::world]`). The
statistics use that number for the row sample and the even/odd split, so the reduced statistics are
those of one process calling every input in order (Hessians up to summation order).

The reduction is one small exchange of what each rank holds (`exchange`: counts, row priorities),
then tensor collectives: ranges by all-reduce MAX, Hessians by SUM (`all_reduce_`, in buckets), and
each row of the merged sample sent once, by the rank that holds it (`broadcast_bytes`). No rank
ever holds another rank's whole statistics.

A rank whose block raises still takes part in the first exchange, sending its error instead of
what it holds: every rank then raises and keeps no statistics. A rank that never reaches the exchange
makes the others fail on the group's timeout (`init_process_group(timeout=...)`), not hang."""
from __future__ import annotations

from dataclasses import dataclass


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
    import torch.distributed as dist
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def init_from_env() -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) with no process group yet: initialise
    the default one (NCCL with CUDA, else gloo)."""
    import os

    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shard_of(group) -> Shard:
    if group is None:
        return SINGLE
    import torch.distributed as dist
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
        import torch.distributed as dist
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
    import torch.distributed as dist
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
    import torch
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: list, op, group) -> None:
    """Reduce `tensors` (one dtype) in place over the group: flattened into buckets of up to
    BUCKET_BYTES on the collective device, one all-reduce per bucket."""
    import torch
    import torch.distributed as dist
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


def broadcast_bytes(buffer, nbytes: int, src: int, group):
    """`src`'s byte buffer ([nbytes] uint8; None on the other ranks, which know its size) on every
    rank, on `src`'s buffer's device there and the collective device elsewhere."""
    import torch
    import torch.distributed as dist
    device = collective_device(group)
    mine = buffer is not None
    sent = buffer.to(device) if mine else torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.broadcast(sent, group_src=src, group=group)
    return buffer if mine else sent


def check_names(states) -> None:
    names = [st.name for st in states]
    if len(set(names)) != len(names):
        raise RuntimeError("segquant_compile.calibrate(): two sites share a name; the ranks' statistics are "
                           "matched by site name")
