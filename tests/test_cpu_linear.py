"""The CPU lowering (lowering/cpu_linear.py): same grid as the segquant::gemm op, bit-exact in
its int8 form, fp32-rounding close in its fp32 form; in the Inductor output: no GEMM op, one GEMM
per site, q/k/v quantized once (dynamic: one dynamic_activation op per input; static: fused
into the producer), epilogue fused."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

import segquant_compile as sq
from conftest import site_gemm_calls
from segquant_compile.lowering.cpu_linear import cpu_gemm
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.lowering.ops import column_sums, gemm_reference
from segquant_compile.lowering.quantize import (quantize_dynamic, quantize_static, quantize_weight, sqnr_db,
                                                static_steps, weight_steps)


@st.composite
def problems(draw):
    m = draw(st.sampled_from([1, 2, 17, 33]))
    n = draw(st.integers(1, 24))
    widths = draw(st.lists(st.integers(1, 37), min_size=1, max_size=4))
    schemes = draw(st.lists(st.integers(0, 2), min_size=len(widths), max_size=len(widths)))
    return m, n, widths, schemes, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpu_forms_match_the_op(p):
    m, n, widths, schemes, static, has_bias, seed = p
    g = torch.Generator().manual_seed(seed)
    bounds = [0, *itertools.accumulate(widths)]
    x = torch.randn(m, bounds[-1], generator=g) * 3 + torch.rand(bounds[-1], generator=g)
    w = torch.randn(n, bounds[-1], generator=g)
    bias = torch.randn(n, generator=g) if has_bias else None
    d_w = weight_steps(w)
    packed = quantize_weight(w, d_w)
    colsum = column_sums(packed, bounds)
    if static:
        pos = torch.stack([x[:, a:b].amax().clamp(min=1e-3) for a, b in zip(bounds[:-1], bounds[1:])])
        neg = torch.stack([(-x[:, a:b]).amax().clamp(min=1e-3) for a, b in zip(bounds[:-1], bounds[1:])])
        d, dn, zp = static_steps(pos, neg, schemes)
        q = quantize_static(x, bounds, schemes, d, dn, zp)
        steps = (d, dn, zp)
    else:
        q, d, dn, zp = quantize_dynamic(x, bounds, schemes)
        steps = (None, None, None)
    ref = gemm_reference(q, d, dn, packed, d_w, bias, bounds, schemes, torch.float32, zp, colsum)
    int8 = quantized_linear(x, packed, d_w, bias, *steps, None, colsum, tuple(bounds), tuple(schemes),
                            cpu_gemm="int8")
    assert torch.equal(int8, ref)   # the op's integer sums and epilogue order
    fp32 = quantized_linear(x, packed, d_w, bias, *steps, None, colsum, tuple(bounds), tuple(schemes),
                            cpu_gemm="fp32")
    # fp32 rounding is relative to the sum of the products' magnitudes, not to the result's (they
    # may cancel: one output of 102 products came out 1.02 with 1.1e-5 of rounding)
    magnitude = float((x.abs() @ w.abs().t()).max()) + (float(bias.abs().max()) if bias is not None else 0.0)
    assert float((fp32 - ref).abs().max()) <= 1e-5 * max(magnitude, 1e-3)


def test_nonfinite_rows_stay_nonfinite_in_both_forms():
    x = torch.randn(4, 32)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    w = torch.randn(8, 32)
    d_w = weight_steps(w)
    packed = quantize_weight(w, d_w)
    d, dn, zp = static_steps(torch.full((1,), 3.0), torch.full((1,), 3.0), [0])
    for form in ("int8", "fp32"):
        for steps in ((None, None, None), (d, dn, zp)):
            y = quantized_linear(x, packed, d_w, None, *steps, None, None, (0, 32), (0,), cpu_gemm=form)
            assert not y[1].isfinite().any() and not y[2].isfinite().any(), (form, steps[0])
            assert y[[0, 3]].isfinite().all()


class QKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.q, self.k, self.v = (torch.nn.Linear(64, 64) for _ in range(3))
        self.out = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.norm(x)
        return x + self.out(self.q(h) * self.k(h) + self.v(h)) * 0.5   # gate + residual after a GEMM


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_inductor_code_fuses_and_shares(activations):
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(2, 40, 64)
    compiled = torch.compile(model, backend="segquant", options={"activations": activations, "dualscale": False})
    with torch.no_grad():
        if activations == "static":
            with sq.calibrate(compiled, progress=False):
                compiled(torch.randn(2, 40, 64))
        got, code = run_and_get_code(lambda: compiled(x))
        ref = model(x)
    text = "\n".join(code)
    assert "segquant.gemm" not in text                     # no GEMM op dispatched on CPU
    assert site_gemm_calls(code) == 4                      # one GEMM per site
    rounds = text.count(".round()")                        # vectorized rounding, one per quantized tensor
    ops = text.count("torch.ops.segquant.dynamic_activation.default(")
    # dynamic: q/k/v read one quantized activation (steps from the same input by one rule), one
    # op per input and no traced quantization; static steps are per-site graph inputs: each site
    # rounds its own, fused into the producer
    assert (ops, rounds) == ((2, 0) if activations == "dynamic" else (0, 4))
    assert text.count("cpp_fused") >= 1 and sqnr_db(ref, got) > 30


def test_cpu_gemm_choice_is_forced_by_env_and_checked(monkeypatch):
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "int8")
    assert cpu_gemm() == "int8"
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "avx")
    with pytest.raises(ValueError, match="SEGQUANT_CPU_GEMM"):
        cpu_gemm()
    monkeypatch.delenv("SEGQUANT_CPU_GEMM")
    assert cpu_gemm() in ("int8", "fp32")


def test_the_int8_gemm_is_timed_on_one_thread(monkeypatch):
    """cpu_int8_gemm's choice (which picks every CPU site's form) is timed single-threaded: on a
    busy machine a small multi-threaded fp32 GEMM waits on OpenMP's barriers and comes out tens of
    times slower, so the measurement flipped to oneDNN's reference loop on an AVX2 CPU, ~100x
    slower at model shapes. The thread count is restored."""
    from segquant_compile.lowering import ops
    seen = []

    def record(fn):
        def timed(a, b):
            seen.append(torch.get_num_threads())
            return fn(a, b)
        return timed
    monkeypatch.setattr(torch, "_int_mm", record(torch._int_mm))
    monkeypatch.setattr(ops, "_int_mm_fp32", record(ops._int_mm_fp32))
    threads = torch.get_num_threads()
    assert ops.cpu_int8_gemm.__wrapped__() in ("onednn", "fp32")
    assert seen and set(seen) == {1} and torch.get_num_threads() == threads


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.o = torch.nn.Linear(64, 32)

    def forward(self, a):   # [B, H, S, D] attention output merged into [B, S, H*D]
        return self.o(a.transpose(1, 2).reshape(a.shape[0], a.shape[2], 64))


def test_int8_form_compiles_with_one_int_mm_per_segment(monkeypatch):
    """The int8 form (CPUs with int8 dot instructions), forced: per K segment one `_int_mm`
    (two for DualScale), the partial outputs summed in one fused epilogue, bit-exact with eager."""
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "int8")
    torch.manual_seed(0)
    model = Heads().eval()
    a = torch.randn(1, 4, 24, 16)
    compiled = torch.compile(model, backend="segquant", options={"dualscale": False})
    with torch.no_grad():
        got, code = run_and_get_code(lambda: compiled(a))
    text = "\n".join(code)
    assert text.count("extern_kernels._int_mm(") == 4 and "segquant.gemm" not in text
    assert ".contiguous()" not in text and "aten.cat" not in text
    st_ = next(iter(sq.report(compiled).states.values()))
    lo = st_.lowering
    assert lo.cpu_gemm == "int8" and len(lo.k_bounds) == 5
    eager = quantized_linear(a.transpose(1, 2).reshape(1, 24, 64), st_.packed, st_.d_w, model.o.bias,
                             None, None, None, None, st_.colsum, lo.k_bounds, lo.codes, cpu_gemm="int8")
    assert torch.allclose(got, eager, rtol=1e-6, atol=1e-6)


def test_head_groups_merge_adjacent_heads(monkeypatch):
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "int8")
    torch.manual_seed(0)
    model = Heads().eval()
    a = torch.randn(1, 4, 24, 16)
    compiled = torch.compile(model, backend="segquant", options={"dualscale": False, "head_groups": 2})
    with torch.no_grad():
        got, code = run_and_get_code(lambda: compiled(a))
        ref = model(a)
    assert "\n".join(code).count("extern_kernels._int_mm(") == 2
    report = sq.report(compiled)
    lo = next(iter(report.states.values())).lowering
    assert lo.k_bounds == (0, 32, 64) and lo.heads == 4
    assert "4 heads in 2 segments" in str(report)
    assert sqnr_db(ref, got) > 30
    with pytest.raises(ValueError, match="head_groups"):
        sq.resolve_options({"head_groups": 0})


def test_int8_form_exact_for_a_one_column_segment():
    """oneDNN's _int_mm (VNNI CPUs) misread a [1, N] weight slice with strides (1, 1) and returned
    garbage: a K segment one column wide (here the whole K of a transposed [N, 1] weight)."""
    from segquant_compile.lowering.ops import int_mm_onednn
    q = torch.tensor([[127], [-3]], dtype=torch.int8)
    w = torch.tensor([[-127], [127], [5]], dtype=torch.int8).t()   # [1, 3], strides (1, 1)
    assert w.stride() == (1, 1)
    assert torch.equal(int_mm_onednn(q, w), (q.long() @ w.long()).int())
    x, wf = torch.tensor([[4.9304]]), torch.tensor([[-1.0], [2.0]])
    d_w = weight_steps(wf)
    packed = quantize_weight(wf, d_w)
    qd, d, dn, zp = quantize_dynamic(x, [0, 1], [0])
    ref = gemm_reference(qd, d, dn, packed, d_w, None, [0, 1], [0], torch.float32, zp, column_sums(packed, [0, 1]))
    got = quantized_linear(x, packed, d_w, None, None, None, None, None, column_sums(packed, [0, 1]), (0, 1), (0,),
                           cpu_gemm="int8")
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("compiled", [False, True])
def test_dynamic_activation_op_is_the_dynamic_quantizer_bit_for_bit(kind, compiled, monkeypatch):
    """segquant::dynamic_activation, eagerly and by its shape-generic compiled kernel (forced for
    every size here): the grid values and steps of quantize_dynamic, for each scheme and for
    sizes and widths that share one kernel per (scheme, form)."""
    from segquant_compile.lowering import shape_generic
    from segquant_compile.lowering.cpu_linear import quantized_activation
    from segquant_compile.lowering.quantize import dequantize
    from torch._dynamo.utils import counters
    monkeypatch.setattr(shape_generic, "COMPILED_MIN", 0 if compiled else 1 << 40)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(3)
    for m, bounds, schemes in [(5, [0, 8, 20, 33], [0, 1, 2]), (17, [0, 40, 64, 70], [2, 0, 1]), (3, [0, 9], [1])]:
        x = torch.randn(m, bounds[-1], generator=g) * 2 + 0.5
        q, d, dn, zp = quantize_dynamic(x, bounds, schemes)
        got = quantized_activation(x, bounds, schemes, None, None, None, kind)
        if kind == "fp32":
            assert torch.equal(got, dequantize(q, bounds, schemes, d, dn, zp))
            continue
        for s, ((qs, ds, dns, zs), a, b) in enumerate(zip(got, bounds[:-1], bounds[1:])):
            qs = qs[0] + qs[1] if isinstance(qs, tuple) else qs
            assert torch.equal(qs, q[:, a:b]) and torch.equal(ds, d[:, s:s + 1]) and torch.equal(dns, dn[:, s:s + 1])
            assert torch.equal(zs, zp[:, s:s + 1])
    # one kernel per scheme, whatever the rows, widths and segment offsets
    assert counters["stats"]["unique_graphs"] - graphs == (3 if compiled else 0)
    torch._dynamo.reset()
