"""Data-parallel calibration (issue 30): two gloo processes, each calibrating half of the inputs
(interleaved), freeze the same parameters on both ranks as one process calibrating all of them."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, world: int, fail_rank: int = -1) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(fail_rank)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [{**torch.load(out / f"rank{r}.pt", weights_only=False), "dir": out} for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return _run(base / "one", 1), _run(base / "two", 2)


def test_both_ranks_freeze_the_parameters_of_one_process_calibrating_everything(runs):
    (one,), two = runs
    assert all("error" not in r for r in (one, *two))
    for rank in two:
        assert rank["params"].keys() == one["params"].keys() and len(one["params"]) == 3
        for name, params in one["params"].items():
            for field, value in params.items():
                got = rank["params"][name][field]
                same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
                assert same, (name, field)
        torch.testing.assert_close(rank["output"], one["output"], rtol=1e-6, atol=0)


def test_the_group_reduces_the_statistics_of_one_process_calibrating_everything(runs):
    """What every rank freezes from, after the reduction: the same ranges, the same kept rows (exact
    and coded, in priority order: bottom-k over both ranks' rows), the same counts and sharing as one
    process observing all 8 calls; Hessians equal up to summation order (fp32 sums of the two
    ranks' halves)."""
    (one,), two = runs
    stats = one["statistics"]
    assert stats["a"]["shares_with"] == ["a", "c"] and stats["a"]["hessians"] is not None
    assert stats["b"]["coded_q"] is not None and stats["b"]["hessians"] is None
    assert len(stats["a"]["kept"]) < 8 * 300 and len(stats["b"]["kept"]) + len(stats["b"]["coded_q"]) < 8 * 300
    for rank in two:
        assert rank["statistics"].keys() == stats.keys()
        for name, want in stats.items():
            got = rank["statistics"][name]
            for field in ("ranges", "kept", "coded_q", "coded_steps", "row_calls", "counts", "shares_with"):
                a, b = want[field], got[field]
                if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                    assert all(torch.equal(x, y) for x, y in zip(a, b)), (name, field)
                elif isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), (name, field)
                else:
                    assert a == b, (name, field)
            for x, y in zip(want["hessians"] or [], got["hessians"] or []):
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-3)
    for name in stats:   # every rank holds the same bits
        for x, y in zip(two[0]["statistics"][name]["hessians"] or [], two[1]["statistics"][name]["hessians"] or []):
            assert torch.equal(x, y)


def test_rank_0_saves_once_and_the_save_loads_anywhere(runs):
    """Both ranks called save(); rank 0 wrote it. Loaded here, it runs as the ranks did."""
    from distributed_worker import Mlp
    _, two = runs
    saved = two[0]["dir"] / "saved"
    assert (saved / "manifest.json").is_file()
    torch.manual_seed(0)
    loaded = torch.compile(Mlp().eval(), backend="segquant", options={"load": str(saved), "inductor": False})
    with torch.no_grad():
        out = loaded(torch.randn(16, 64, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(out, two[0]["output"]) and torch.equal(out, two[1]["output"])


def test_a_rank_that_raises_makes_every_rank_raise_and_keep_nothing(tmp_path):
    results = _run(tmp_path / "fail", 2, fail_rank=1)
    assert results[1]["error"] == "ValueError: a bad calibration input"
    assert "rank 1 raised inside the block (ValueError: a bad calibration input)" in results[0]["error"]
    assert not any(results[0]["statistics_left"]) and not any(results[1]["statistics_left"])


def test_the_freeze_queue_gives_each_site_to_one_rank():
    """distributed.WorkQueue: ranks draw site indices from one counter in the group's store, each
    index once, until none is left; a new round (a later calibration) starts from 0 again. (The
    gloo runs above freeze through it and must give identical parameters on both ranks.)"""
    from segquant_compile.distributed import WorkQueue

    class Store:   # c10d's Store.add: atomic add, returns the new value
        def __init__(self):
            self.values = {}

        def add(self, key, n):
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]
    store = Store()
    ranks = [WorkQueue(store, 7, 5), WorkQueue(store, 7, 5)]
    drawn = [[], []]
    for turn in range(8):   # rank 1 is twice as fast
        r = 0 if turn % 3 == 0 else 1
        i = ranks[r].draw()
        if i is not None:
            drawn[r].append(i)
    assert sorted(drawn[0] + drawn[1]) == [0, 1, 2, 3, 4] and len(drawn[1]) > len(drawn[0]) > 0
    assert all(q.draw() is None for q in ranks)
    assert WorkQueue(store, 8, 5).draw() == 0
    assert WorkQueue.store_of(None) is None   # no default group here: split in advance
