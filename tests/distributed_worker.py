"""One process of tests/test_distributed.py: calibrates its share of the inputs (all of them with
WORLD_SIZE=1), saves (rank 0), and writes its parameters and outputs to OUT/rank{r}.pt, with every
site's statistics as the freeze reads them (after the group's reduction).

The sites: `a` and `c` read the same input (one statistics set, a Hessian summed: K 64), `b` keeps
GPTQ's rows with those beyond the sample coded (K 128 is over HESSIAN_MAX_K, lowered here), and 8
calls of 300 rows overflow every row sample, so which rows are kept depends on both ranks' rows."""
import datetime
import os
import sys

import torch
from torch import nn

import segquant_compile as sq
from segquant_compile import statistics
from segquant_compile.compiled import find


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))) + self.c(x)


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(300, 64, generator=g) * (1 + i % 3) for i in range(8)]


def snapshot(states) -> dict:
    """{site: its statistics' tensors and counts} (shared sets appear under each site)."""
    out = {}
    for st in states:
        s = st.stats
        out[st.name] = {"ranges": [t.clone() for p in s.parity_max for t in p], "kept": s.kept.clone(),
                        "coded_q": None if s.coded is None else s.coded.q.clone(),
                        "coded_steps": None if s.coded is None else s.coded.steps.clone(),
                        "row_calls": s.row_calls.clone(), "counts": (s.rows_seen, s.calls),
                        "hessians": None if s.hessians is None else [h.full() for h in s.hessians],
                        "shares_with": sorted(o.name for o in states if o.stats is s)}
    return out


def record_statistics(result: dict) -> None:
    """Snapshot the statistics where the freeze starts: one process's freeze, or the group's."""
    from segquant_compile import calibration
    freeze, freeze_over_group = calibration.freeze, calibration.Session._freeze_over_group

    def one(pairs):
        pairs = list(pairs)
        result["statistics"] = snapshot([st for st, _ in pairs])
        return freeze(pairs)

    def group(session):
        result["statistics"] = snapshot([st for st, _ in session.touched.values()])
        return freeze_over_group(session)
    calibration.freeze, calibration.Session._freeze_over_group = one, group


def main(out: str, fail_rank: int) -> None:
    torch.set_num_threads(1)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    statistics.HESSIAN_MAX_K = 100
    torch.manual_seed(0)
    model = Mlp().eval()
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False})
    result = {}
    record_statistics(result)
    try:
        with sq.calibrate(compiled, progress=False):
            for i, x in enumerate(inputs()[rank::world]):
                if rank == fail_rank and i == 2:
                    raise ValueError("a bad calibration input")
                compiled(x)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["statistics_left"] = [not st.stats.empty for st in find(compiled).quant_states]
    else:
        sq.save(compiled, os.path.join(out, "saved"))
        with torch.no_grad():
            result["output"] = compiled(torch.randn(16, 64, generator=torch.Generator().manual_seed(9)))
        result["params"] = {st.name: {f: getattr(st.params, f) for f in ("packed", "d_w", "d_pos", "d_neg", "zp",
                                                                         "smooth", "alpha", "act_clip", "chosen")}
                            for st in find(compiled).quant_states}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
