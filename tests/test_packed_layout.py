"""The packed weight's memory layout is decided in one place (lowering/quantize.py packed_layout):
K-major for the 8-bit formats on CUDA, contiguous [K, N] on CPU and in saved files. `load` lays a
saved weight out as packing does; here the CUDA rule is forced on for the CPU so that the path a
CUDA load takes runs on this machine."""
import torch
from safetensors.torch import load_file
from torch import nn

import segquant_compile as sq
from segquant_compile.lowering import quantize as Q

EAGER = {"inductor": False}   # the quantized graph run as traced: fast to build, same numbers


def test_load_lays_the_saved_weight_out_as_packing_does(tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "reads_k_major", lambda fmt, device: fmt in Q.K_MAJOR_FORMATS)
    model = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    c = torch.compile(model, backend="segquant", options=EAGER)
    with torch.no_grad():
        out = c(x)
    (state,) = sq.report(c).states.values()
    assert state.packed.shape == (64, 32) and state.packed.stride() == (1, 64)     # K-major
    sq.save(c, tmp_path / "q")
    saved = [v for k, v in load_file(next((tmp_path / "q").glob("*.safetensors"))).items() if k.endswith(".packed")]
    assert len(saved) == 1 and saved[0].is_contiguous() and torch.equal(saved[0], state.packed)
    torch._dynamo.reset()
    fresh = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    fresh.load_state_dict(model.state_dict())
    loaded = torch.compile(fresh, backend="segquant", options={"load": str(tmp_path / "q"), **EAGER})
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    (back,) = sq.report(loaded).states.values()
    assert back.packed.stride() == (1, 64) and torch.equal(back.packed, state.packed)
