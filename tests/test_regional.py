"""Regional compilation (diffusers' `compile_repeated_blocks`: each repeated block compiled in
place with `block.compile(backend="segquant", ...)`): every block's sites are quantized under
their full module paths, with a state per weight; report, calibrate and save/load take the model."""
import pytest
import torch
from torch import nn

import segquant_compile as sq
from conftest import output, tiny_inputs, tiny_unet
from segquant_compile.compiled import find
from segquant_compile.lowering.quantize import sqnr_db


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(x)))


class Stack(nn.Module):
    _repeated_blocks = ("Block",)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _regional(model, **options):
    for m in model.modules():
        if type(m).__name__ in model._repeated_blocks:
            m.compile(backend="segquant", options={"inductor": False, **options})
    return model


def test_every_blocks_sites_are_quantized_under_their_full_names():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(4, 16, 64)
    ref = model(x)
    _regional(model)
    with torch.no_grad():
        got = model(x)
    assert sqnr_db(ref, got) > 35
    found = find(model)
    names = sorted(found.name_of(st) for st in found.quant_states)
    assert names == [f"blocks.{i}.{s}" for i in range(3) for s in "ab"]
    assert sorted(st.name for st in found.quant_states) == names   # the runtime named them so too
    report = sq.report(model)
    assert sorted(report.states) == names
    assert "outside the blocks compiled in place" in report.unreached["out"]


def test_static_regional_calibrates_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = Stack().eval()
    calib = [torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    x = torch.randn(4, 16, 64)
    ref = model(x)
    _regional(model, activations="static")
    with sq.calibrate(model, progress=False):
        for c in calib:
            model(c)
    with torch.no_grad():
        got = model(x)
    assert sqnr_db(ref, got) > 30
    sq.save(model, tmp_path / "q")
    torch.manual_seed(0)
    again = _regional(Stack().eval(), activations="static", load=str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_blocks_compiled_with_different_options_are_refused():
    model = Stack().eval()
    model.blocks[0].compile(backend="segquant", options={"inductor": False})
    model.blocks[1].compile(backend="segquant", options={"inductor": False, "activations": "static"})
    with pytest.raises(TypeError, match="different backends or options"):
        find(model)
    with pytest.raises(TypeError, match="no compiled block"):
        find(Stack())


def test_diffusers_compile_repeated_blocks():
    model = tiny_unet().eval()
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = output(model(**x))
    model.compile_repeated_blocks(backend="segquant", options={"inductor": False})
    with torch.no_grad():
        got = output(model(**x))
    assert sqnr_db(ref, got) > 25
    report = sq.report(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in model._repeated_blocks]
    in_blocks = [n for n in report.states if any(n.startswith(b + ".") for b in blocks)]
    linears = [n for b in blocks for n, m in model.get_submodule(b).named_modules() if isinstance(m, nn.Linear)]
    assert blocks and len(in_blocks) == len(linears) == len(report.states)
    assert all(r.startswith("outside the blocks") for r in report.unreached.values()) and report.unreached
