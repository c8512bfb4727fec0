"""Data-parallel calibration over torch.distributed: each rank runs its share of the calibration
inputs, and when the block ends the statistics of every site are gathered over the process group
and merged in rank order, so every rank freezes the same parameters.

Calls are numbered across the group as if one process had made them all, interleaved: the k-th
call of rank r is call k * world + r (input i of a list shared as `inputs[rank::world]`). The
statistics use that number for the row sample and the even/odd split, so the merged statistics are
those of one process calling every input in order (Hessians up to summation order).

A rank whose block raises still takes part in the one exchange, sending its error instead of
statistics: every rank then raises and keeps no statistics. A rank that never reaches the exchange
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


def merged_payload(gathered: list) -> dict:
    """{site name: [statistics of each rank that observed it, in rank order]}; raises if a rank failed."""
    failed = [p for p in gathered if isinstance(p, RankFailed)]
    if failed:
        raise RuntimeError("segquant_compile.calibrate(): " + "; ".join(
            f"rank {f.rank} raised inside the block ({f.error})" for f in failed) + "; no statistics were kept")
    merged: dict[str, list] = {}
    for payload in gathered:
        for name, stats in payload.items():
            merged.setdefault(name, []).append(stats)
    return merged


def statistics_payload(states) -> dict:
    """{state name: its statistics, on the CPU}: what this rank sends."""
    return {st.name: st.stats.to_cpu() for st in states}


def check_names(states) -> None:
    names = [st.name for st in states]
    if len(set(names)) != len(names):
        raise RuntimeError("segquant_compile.calibrate(): two sites share a name; the ranks' statistics are "
                           "matched by site name")
