"""Conv sites (DESIGN.md, Convolutions): the plan of the full-size SDXL UNet, channel segments of
skip concatenations, DualScale after SiLU, quantized execution of tiny UNets, float reasons."""
import dataclasses

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import segquant_compile as sq
from conftest import expected_site_gemms, output, site_gemm_calls, tiny_inputs, tiny_unet
from segquant_compile import site_params as P
from segquant_compile.lowering.conv import im2col
from segquant_compile.passes.rewrite import extra_fields
from segquant_compile.lowering.quantize import sqnr_db


# ------------------------------------------------------------------ the SDXL UNet plan (meta device)
def test_sdxl_unet_conv_sites(meta_report):
    r = meta_report("sdxl-unet", batch=1, resolution=1024, text_tokens=77)
    convs = {s.name: s for s in r.sites if s.kind == "conv2d"}
    # conv_in/out, 17 ResNets x (conv1, conv2), 4 shortcuts (down 1 + 3 per up block x 3... see below),
    # 2 downsamplers, 2 upsamplers: 2 + 34 + 11 + 2 + 2 = 51
    assert len(convs) == 51
    assert sum(n.endswith("conv_shortcut") for n in convs) == 11
    assert all(s.conv.in_channels * s.conv.taps == s.in_features for s in convs.values())
    assert convs["down_blocks.0.downsamplers.0.conv"].conv.stride == (2, 2)
    # every up-block ResNet's 1x1 shortcut reads the skip concatenation: unequal widths kept
    shortcuts = {n: s for n, s in convs.items() if n.startswith("up_blocks") and n.endswith("conv_shortcut")}
    assert len(shortcuts) == 9
    widths = {n: s.input_segments.sizes for n, s in shortcuts.items()}
    assert widths["up_blocks.0.resnets.2.conv_shortcut"] == (1280, 640)
    assert widths["up_blocks.1.resnets.0.conv_shortcut"] == (1280, 640)
    assert widths["up_blocks.2.resnets.0.conv_shortcut"] == (640, 320)
    assert widths["up_blocks.2.resnets.2.conv_shortcut"] == (320, 320)
    assert all(s.input_segments.pattern == "cat" for s in shortcuts.values())
    # GroupNorm(32) -> SiLU -> conv1: the segments survive only where no group straddles the boundary
    # (1280 + 1280: groups of 80, kept; 1280 + 640: groups of 60, 1280 % 60 != 0, dropped)
    segmented_conv1 = {n for n, s in convs.items() if n.endswith("conv1") and s.input_segments is not None}
    assert segmented_conv1 == {"up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv1",
                               "up_blocks.1.resnets.1.conv1", "up_blocks.2.resnets.1.conv1",
                               "up_blocks.2.resnets.2.conv1"}
    kept = convs["up_blocks.0.resnets.0.conv1"]
    assert kept.input_segments.sizes == (1280 * 9, 1280 * 9)    # K ranges: channels x 3 x 3
    assert any("keeps the cat segments" in n for n in kept.notes)
    dropped = convs["up_blocks.0.resnets.2.conv1"]
    assert dropped.input_segments is None and any("straddles" in n for n in dropped.notes)
    assert sum(s.input_segments is not None for s in convs.values()) == 14
    # DualScale / asymmetric candidates: every conv fed by SiLU (conv1, conv2 of 17 ResNets, conv_out)
    dual = {n for n, s in convs.items() if s.dualscale.all}
    assert len(dual) == 35 and "conv_out" in dual
    assert all(n.endswith(("conv1", "conv2")) for n in dual - {"conv_out"})
    assert kept.dualscale.sources == ("silu", "silu")
    assert not any(convs[n].dualscale.any for n in shortcuts)    # the skip concatenation is no activation
    text = str(r)
    assert "794 sites (743 linear, 51 conv2d)" in text
    assert "[1280, 640] ch (cat)" in text
    assert {row["kind"] for row in r.to_dict()["sites"]} == {"linear", "conv2d"}


# ------------------------------------------------------------------ segments and DualScale on small graphs
class Skip(nn.Module):
    """A UNet up-block in miniature: cat(hidden, skip) with unequal widths, read by a 1x1 shortcut
    directly and by a 3x3 conv through GroupNorm -> SiLU; an upsampled cat; a chunked conv output."""

    def __init__(self, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, 24)
        self.shortcut = nn.Conv2d(24, 8, 1)
        self.conv1 = nn.Conv2d(24, 8, 3, padding=1)
        self.up = nn.Conv2d(24, 8, 3, padding=1)
        self.mixed = nn.Conv2d(24, 8, 3, padding=1)
        self.split = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, h, skip):
        x = torch.cat([h, skip], dim=1)                                  # 16 + 8 channels
        y = self.shortcut(x) + self.conv1(nn.functional.silu(self.norm(x)))
        y = y + self.up(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))[..., ::2, ::2]
        y = y + self.mixed(torch.cat([nn.functional.silu(h), skip], dim=1))
        a, b, c = self.split(y).split([4, 4, 4], dim=1)
        return a * b + c


def test_channel_segments_dualscale_and_output_segments():
    args = (torch.randn(2, 16, 6, 6), torch.randn(2, 8, 6, 6))
    r = sq.explain(Skip(groups=3), *args)          # groups of 8 channels: the boundary at 16 falls between
    assert r.plan["shortcut"].input_segments.sizes == (16, 8)
    assert r.plan["conv1"].input_segments.sizes == (16 * 9, 8 * 9) and r.plan["conv1"].dualscale.sources == ("silu",) * 2
    assert r.plan["up"].input_segments.sizes == (16 * 9, 8 * 9)       # nearest upsampling keeps channels
    assert r.plan["mixed"].dualscale.sources == ("silu", None)        # DualScale per segment
    assert r.plan["split"].output_segments.sizes == (4, 4, 4)
    straddled = sq.explain(Skip(groups=2), *args)  # groups of 12 channels: one straddles channel 16
    assert straddled.plan["conv1"].input_segments is None
    assert straddled.plan["shortcut"].input_segments.sizes == (16, 8)
    assert any("straddles" in n for n in straddled.plan["conv1"].notes)
    skipped = sq.explain(Skip(groups=3), *args, options={"skip": ["shortcut", "up"]})
    assert set(skipped.fallbacks) == {"shortcut", "up"}


class ConvAttention(nn.Module):
    """Attention written with 1x1 convs (ADM / guided-diffusion): the qkv conv's output cut into
    q | k | v after a reshape, heads folded into the batch, merged back channel-first for proj_out."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj_out = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3 * c, h * w).chunk(3, dim=1)
        d = c // self.heads
        att = torch.einsum("bct,bcs->bts", q.reshape(b * self.heads, d, -1), k.reshape(b * self.heads, d, -1))
        a = torch.einsum("bts,bcs->bct", att.softmax(-1), v.reshape(b * self.heads, d, -1))
        return x + self.proj_out(a.reshape(b, c, h, w))


@pytest.mark.parametrize("batch", [1, 2])   # at batch 1 the folded dim is the heads alone
def test_attention_of_1x1_convs(batch):
    r = sq.explain(ConvAttention(), torch.randn(batch, 16, 4, 4))
    assert r.plan["qkv"].output_segments.sizes == (16, 16, 16)
    assert r.plan["proj_out"].input_segments.sizes == (8, 8) and r.plan["proj_out"].input_segments.pattern == "head_merge"


class Resample(nn.Module):
    """SiLU, then pooling or upsampling, then a conv (guided-diffusion's up/down ResBlocks)."""

    def __init__(self, op):
        super().__init__()
        self.op, self.conv = op, nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.op(nn.functional.silu(x)))


@pytest.mark.parametrize("op,expected", [
    (lambda x: nn.functional.avg_pool2d(x, 2), "silu"),               # an average stays in the range
    (lambda x: nn.functional.max_pool2d(x, 2), "silu"),
    (lambda x: nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), "silu"),
    (lambda x: nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear"), "silu"),
    (lambda x: nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic"), None),   # overshoots
    (lambda x: nn.functional.pad(x, (1, 1, 1, 1), value=-3.0), None),                  # pads outside it
    (lambda x: nn.functional.avg_pool2d(x, 2, divisor_override=1), None),            # a sum, not an average
])
def test_dualscale_through_resampling(op, expected):
    r = sq.explain(Resample(op), torch.randn(2, 8, 8, 8))
    assert r.plan["conv"].dualscale.sources == (expected,)


# ------------------------------------------------------------------ float reasons
class Odd(nn.Module):
    """One conv of each kind segquant cannot lower, and one it can."""

    def __init__(self):
        super().__init__()
        self.ok = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.line = nn.Conv1d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 4, 1, 1))

    def forward(self, x):
        h = self.same(self.dilated(self.grouped(self.ok(x))))
        h = h + nn.functional.conv2d(x, self.w * 2)          # weight computed in the graph
        return self.up(h), self.line(x.flatten(2))


def test_unlowered_convs_are_reported_float_with_their_reason():
    r = sq.explain(Odd(), torch.randn(1, 4, 6, 6))
    assert [s.name for s in r.sites] == ["ok"] and r.sites[0].kind == "conv2d"
    why = {c.name: (c.kind, c.reason) for c in r.float_calls}
    assert "groups=2" in why["grouped"][1]
    assert "dilation" in why["dilated"][1]
    assert "padding='same'" in why["same"][1]
    assert "transposed" in why["up"][1]
    assert why["line"][0] == "conv1d" and "only conv2d" in why["line"][1]
    assert any("not a parameter" in reason for _, reason in why.values())
    assert len(why) == 6
    off = sq.explain(Odd(), torch.randn(1, 4, 6, 6), options={"convs": False})
    assert off.fallbacks == {"ok": "conv site kept float (options convs=False)"}


# ------------------------------------------------------------------ tiny UNets, quantized
def tiny_unet2d(seed: int = 0):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=8).eval()


def unet2d_inputs(seed: int = 1, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 3, 8, 8, generator=g), timestep=torch.tensor([500.0] * batch))


MODELS = {"unet2d_condition": (tiny_unet, lambda m, s: tiny_inputs(m, seed=s)),
          "unet2d": (tiny_unet2d, lambda m, s: unet2d_inputs(seed=s))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both tiny UNets, dynamic (Inductor: its output code) and static (calibrated, then saved;
    run without Inductor to keep the suite fast: test_quantized.py compiles a static UNet), once
    per module: SQNR, report, output code, the saved folder."""
    out = {}
    for name, (build, inputs) in MODELS.items():
        model = build()
        x = inputs(model, 1)
        with torch.no_grad():
            ref = output(model(**x))
            for activations in ("dynamic", "static"):
                torch._dynamo.reset()
                compiled = torch.compile(model, backend="segquant",
                                         options={"activations": activations, "inductor": activations == "dynamic"})
                saved = None
                if activations == "static":
                    with sq.calibrate(compiled, progress=False):
                        for s in range(4):
                            compiled(**inputs(model, 10 + s))
                    saved = sq.save(compiled, tmp_path_factory.mktemp(name) / "w8a8")
                got, code = run_and_get_code(lambda: output(compiled(**x)))
                out[name, activations] = (sqnr_db(ref, got), sq.report(compiled), code, saved, x, got)
    return out


@pytest.mark.parametrize("activations,floor", [("dynamic", 30), ("static", 25)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_unets_quantized_with_convs(runs, name, activations, floor):
    db, report, code, *_ = runs[name, activations]
    print(f"{name} {activations}: SQNR {db:.2f} dB")
    assert db >= floor
    t = report.totals()
    assert t["float"] == 0 and t["conv_sites"] >= 10 and t["sites"] - t["conv_sites"] >= 4
    assert set(report.states) == {s.name for s in report.sites}     # every conv and linear quantized
    assert all(report.states[s.name].lowering.conv == s.conv for s in report.sites)
    if activations == "dynamic":   # static: the graph compiled during calibration, not in this call
        # on the CPU a dynamic conv site is one conv2d_dynamic op (its rows and GEMM inside): the
        # generated code does not grow per conv site
        joined = "\n".join(code)
        assert joined.count("torch.ops.segquant.conv2d_dynamic.default(") == t["conv_sites"]
        assert "torch.ops.segquant.conv2d.default(" not in joined
        assert site_gemm_calls(code) == expected_site_gemms(report)   # the CPU form's GEMMs (cpu_linear.py)
        # no float convolution left in the compiled graph
        assert "extern_kernels.convolution" not in joined and "_convolution_pointwise" not in joined
    else:
        assert all(st.settled and st.sqnr is not None for st in report.states.values())


def test_report_names_conv_kind_segments_and_steps(runs):
    _, report, *_ = runs["unet2d_condition", "static"]
    text = str(report)
    assert "sites (50 linear, 33 conv2d)" in text
    row = next(r for r in report.to_dict()["sites"] if r["site"] == "up_blocks.0.resnets.1.conv_shortcut")
    assert row["kind"] == "conv2d" and row["input_segments"] == [64, 32] and row["quant"]["kernel"].startswith("conv1x1")
    assert len(row["quant"]["act_step"]) == 2        # one static step per channel segment
    conv1 = report.states["down_blocks.0.resnets.0.conv1"]
    assert conv1.site.dualscale.sources == ("silu",) and conv1.candidates is not None


def test_save_and_load_conv_states(runs):
    _, report, _, saved, x, got = runs["unet2d", "static"]
    torch._dynamo.reset()
    loaded = torch.compile(tiny_unet2d(), backend="segquant", options={"load": str(saved), "inductor": False})
    with torch.no_grad():
        assert torch.equal(output(loaded(**x)), got)
    states = sq.report(loaded).states
    assert {n for n, st in states.items() if st.site.conv is not None} == \
        {s.name for s in report.sites if s.conv is not None}
    assert all(st.source == str(saved) for st in states.values())


def test_convs_false_keeps_them_float():
    model = tiny_unet2d()
    x = unet2d_inputs()
    compiled = torch.compile(model, backend="segquant", options={"convs": False, "inductor": False})
    with torch.no_grad():
        assert sqnr_db(output(model(**x)), output(compiled(**x))) > 40
    report = sq.report(compiled)
    t = report.totals()
    assert t["float"] == t["conv_sites"] > 0
    assert "float: conv site kept float (options convs=False)" in str(report)


class LoudChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_static_conv_smoothing_divides_per_input_channel():
    """A conv input with one loud channel (UNet residual streams have them): SmoothQuant's
    divisor is one per input channel, repeated over its taps (the input is divided before
    im2col, the weight's channel multiplied), and recovers the quiet channels' resolution; the
    compiled site (divisor fused before the quantization) computes the eager rows' numbers."""
    torch.manual_seed(0)
    model = LoudChannel().eval()
    gain = torch.ones(1, 8, 1, 1)
    gain[0, 3] = 300.0
    with torch.no_grad():   # the loud channel's weights quiet: each channel adds alike to the output
        model.conv.weight[:, 3] /= 300.0
    calls = [torch.randn(2, 8, 10, 10) * gain for _ in range(4)]
    x = torch.randn(2, 8, 10, 10) * gain
    got = {}
    with torch.no_grad():
        ref = model(x)
        for smooth in (None, "auto"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="segquant", options={"activations": "static", "smooth": smooth})
            with sq.calibrate(compiled, progress=False):
                for c in calls:
                    compiled(c)
            got[smooth] = sqnr_db(ref, compiled(x))
            st = sq.report(compiled).states["conv"]
    s = st.params.smooth
    assert st.params.alpha is not None and s.shape == (72,)
    per_channel = s.view(8, 9)
    assert torch.equal(per_channel, per_channel[:, :1].expand(8, 9))    # one divisor per channel
    assert int(per_channel[:, 0].argmax()) == 3
    assert got["auto"] > got[None] + 10, got   # unsmoothed, the quiet channels round to zero
    with torch.no_grad():
        eager = st.run_rows(im2col(x, st.lowering.conv), model.conv.bias.detach())
        compiled_rows = compiled(x).permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.allclose(compiled_rows, eager, rtol=1e-5, atol=1e-4)


class SiluConv(nn.Module):
    """A skip concatenation into SiLU -> 3x3 conv (two input segments, post-SiLU ranges)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 16, 3, padding=1)

    def forward(self, x, skip):
        return self.conv(torch.nn.functional.silu(torch.cat([x, skip * 3], dim=1)))


@pytest.mark.parametrize("dualscale", [False, True, "auto"])
def test_a_dynamic_conv_sites_rows_model_is_the_compiled_site(dualscale):
    """The searches score a dynamic conv site on its im2col rows (site_params.run_rows, with the K
    columns tap-major and a step per (segment, tap) group): the compiled site's numbers, whose
    steps are per input pixel and segment, at every output pixel; per output pixel (one step per
    row and segment) they would differ."""
    torch.manual_seed(0)
    model = SiluConv().eval()
    x, skip = torch.randn(2, 8, 9, 9), torch.randn(2, 4, 9, 9)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="segquant", options={"activations": "dynamic", "dualscale": dualscale})
    with torch.no_grad():
        y = compiled(x, skip).permute(0, 2, 3, 1).reshape(-1, 16)
        st = sq.report(compiled).states["conv"]
        assert len(st.lowering.k_bounds) == 3       # the concatenation's two segments
        rows = im2col(torch.nn.functional.silu(torch.cat([x, skip * 3], dim=1)), st.lowering.conv)
        eager = st.run_rows(rows, model.conv.bias.detach())
        assert torch.allclose(y, eager, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
        assert sqnr_db(model(x, skip).permute(0, 2, 3, 1).reshape(-1, 16), y) > 30
        per_row = dataclasses.replace(st.lowering, conv=None)    # the rows as a linear site's
        other = P.run_rows(st.params, per_row, rows, model.conv.bias.detach())
        assert not torch.allclose(y, other, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_cpu_conv_sites_fp32_form_reads_the_dequantized_weight(activations, monkeypatch):
    """On a CPU without int8 dot instructions a conv site takes the "fp32" form, as linear sites
    do: its graph input is the dequantized weight (no packed grid, no per-call dequantization) and
    it runs one fp32 convolution of the dequantized input; the same grid as the "int8" form
    (exact integer sums; the two lowerings share one state), so the outputs agree to fp32
    summation."""
    torch.manual_seed(0)
    model = SiluConv().eval()
    calls = [(torch.randn(2, 8, 9, 9), torch.randn(2, 4, 9, 9)) for _ in range(3)]
    x = calls[0]
    out = {}
    for form in ("int8", "fp32"):
        monkeypatch.setenv("SEGQUANT_CPU_GEMM", form)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="segquant", options={"activations": activations, "dualscale": True})
        with torch.no_grad():
            if activations == "static" and form == "int8":   # the second compile shares the state
                with sq.calibrate(compiled, progress=False):
                    for c in calls:
                        compiled(*c)
            if form == "int8":
                out[form] = compiled(*x)
            else:
                out[form], code = run_and_get_code(compiled, *x)
    # the fp32 form's graph: no int8 conv op; the static site is a float convolution there
    assert "segquant.conv2d.default(" not in "".join(code)
    assert ("conv2d_dynamic" in "".join(code)) == (activations == "dynamic")
    lo = sq.report(compiled).states["conv"].lowering   # the state's (the first compile's) lowering
    assert extra_fields(dataclasses.replace(lo, cpu_gemm="fp32"))[0] == "dequantized"
    assert torch.allclose(out["fp32"], out["int8"], rtol=1e-5, atol=1e-5 * float(out["int8"].abs().max()))
    with torch.no_grad():
        assert sqnr_db(model(*x), out["fp32"]) > 25
