"""One process of tests/test_distributed.py: calibrates its share of the inputs (all of them with
WORLD_SIZE=1), saves (rank 0), and writes its parameters and outputs to OUT/rank{r}.pt."""
import datetime
import os
import sys

import torch
from torch import nn

import segquant_compile as sq
from segquant_compile.compiled import find


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(48, 64, generator=g) * (1 + i % 3) for i in range(8)]


def main(out: str, fail_rank: int) -> None:
    torch.set_num_threads(1)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = Mlp().eval()
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False})
    result = {}
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
