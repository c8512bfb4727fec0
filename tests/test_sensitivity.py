"""sensitivity(): one site quantized at a time (checked by hand and against a full segquant compile),
the aggregation by op type and block, the files; allocate(): never over budget, optimal."""
import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Two
from segquant_compile import allocate, cli, sensitivity
from segquant_compile import allocation as alloc
from segquant_compile.capture import lifted_recompile_limits
from segquant_compile.config import QuantConfig
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.examples.mnist_vit import VitRF
from segquant_compile.op_types import block_of, op_type
from segquant_compile.sensitivity import Probe, Sensitivity, relative_error
from segquant_compile.sensitivity_report import SiteSensitivity

FORMATS = ("int8", "fp8")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 2 test cores are shared with other jobs: two intra-op threads then spin-wait on each
    other and these small GEMMs run 3-4x slower than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit():
    """A tiny random ViT of nn.TransformerEncoderLayer: a conv site, the packed q/k/v projection,
    the head-merged out_proj, a GELU-fed linear2 (DualScale)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # else the layer hides its linears from dynamo
    torch.manual_seed(0)
    model = VitRF(dim=32, layers=1).eval()
    g = torch.Generator().manual_seed(1)
    calls = [(torch.rand(2, 1, 28, 28, generator=g), torch.full((2, 1, 1, 1), t), torch.tensor([3, 7]))
             for t in (0.2, 0.8)]
    yield model, calls
    torch.backends.mha.set_fastpath_enabled(before)


@pytest.fixture(scope="module")
def measured(vit):
    model, calls = vit
    return sensitivity(model, calls, formats=FORMATS, progress=False)


def _probe(model, calls):
    probe = Probe(model, QuantConfig(), FORMATS)
    return probe, probe.record([lambda m, c=c: m(*c) for c in calls])


def test_one_site_quantized_by_hand():
    """Only the named site differs from float: the probe's output is the float model with that
    one linear replaced by the quantized GEMM on its state."""
    torch.manual_seed(0)
    model, x = Two().eval(), torch.randn(32, 8)
    with lifted_recompile_limits(), torch.no_grad():
        probe, (ref,) = _probe(model, [(x,)])
        assert torch.allclose(ref[0], model(x), rtol=1e-6, atol=1e-7)
        for name, fmt in itertools.product(("a", "b"), FORMATS):
            (state,) = probe.states[name, fmt].values()
            lo, layer = state.lowering, getattr(model, name)

            def q(h):
                return quantized_linear(h, state.packed, state.d_w, layer.bias, None, None, None, None, state.colsum,
                                        lo.k_bounds, lo.codes, fmt=lo.format, cpu_gemm=lo.cpu_gemm)
            gelu = torch.nn.functional.gelu
            by_hand = model.b(gelu(q(x))) if name == "a" else q(gelu(model.a(x)))
            (out,), = probe.outputs(name, fmt, [lambda m: m(x)])
            assert (out - by_hand).norm() <= 1e-5 * by_hand.norm(), (name, fmt)
            assert 0 < relative_error([ref], [[out]]) < 1e-2


def test_equals_full_compile_with_every_other_site_skipped(vit):
    model, calls = vit
    with lifted_recompile_limits(), torch.no_grad():
        probe, _ = _probe(model, calls[:1])
        names = list(probe.sites)
        cases = [("transformer.0.self_attn.in_proj", "int8"), ("transformer.0.linear2", "int8"),
                 ("transformer.0.self_attn.out_proj", "fp8"), ("patch_embed", "int8")]
        for name, fmt in cases:
            (out,), = probe.outputs(name, fmt, [lambda m: m(*calls[0])])
            options = {"format": fmt, "inductor": False, "skip": [n for n in names if n != name],
                       "weight_rounding": "rtn"}   # as sensitivity measures
            torch._dynamo.reset()
            full = torch.compile(model, backend="segquant", options=options)(*calls[0])
            assert (out - full).norm() <= 1e-5 * full.norm(), (name, fmt)
            assert not torch.equal(out, model(*calls[0]))


def test_errors_finite_positive_and_named(measured, vit):
    assert set(measured.formats) == set(FORMATS) and measured.calls == 2
    names = [s.name for s in measured.sites]
    assert names == ["patch_embed", "transformer.0.self_attn.in_proj", "transformer.0.self_attn.out_proj",
                     "transformer.0.linear1", "transformer.0.linear2"]
    params = dict(vit[0].named_parameters())
    for s in measured.sites:
        assert s.weight_numel == (params.get(s.name + ".weight") if s.name + ".weight" in params
                                  else params[s.name + "_weight"]).numel()
        assert all(math.isfinite(e) and e > 0 for e in s.error.values())
        assert all(math.isfinite(v) for v in s.site_sqnr_db.values())
        assert set(s.error) | set(s.not_applicable) == set(FORMATS)
    conv = measured["patch_embed"]
    assert set(conv.error) == {"int8"} and "int8 only" in conv.not_applicable["fp8"]
    for s in measured.sites[1:]:   # fp8 (e4m3) is coarser than int8 on these rows
        assert s.error["fp8"] > s.error["int8"]


def test_tables(measured):
    text = str(measured)
    for needle in ("attention q/k/v", "attention out", "MLP up", "MLP down", "embedders", "transformer.0",
                   "most sensitive", "dynamic (per token)", "int8 only"):
        assert needle in text, needle
    by_op = measured.by_op_type()
    assert by_op["attention q/k/v"]["int8"].sites == 1 and "fp8" not in by_op["embedders"]
    assert by_op["MLP up"]["fp8"].error == measured["transformer.0.linear1"].error["fp8"]
    assert set(measured.by_block()) == {"(outside blocks)", "transformer.0"}
    assert max(measured.most_sensitive(1)[0].error.values()) == max(max(s.error.values()) for s in measured.sites)


def test_json_round_trip_and_html(measured, tmp_path):
    assert Sensitivity.load(measured.save(tmp_path / "s.json")) == measured
    page = measured.save(tmp_path / "s.html").read_text()
    for s in measured.sites:
        assert page.count(f"<tr><td>{s.name}</td>") == 1
    assert "<svg" in page and "<script" not in page and "src=" not in page and "n/a" in page
    with pytest.raises(ValueError, match="unknown extension"):
        measured.save(tmp_path / "s.csv")


def test_run_measures_the_error_of_a_whole_run(vit, measured):
    """`run`: the error of what a function of the model returns. One call through `run` measures
    what `inputs` measure; a run that feeds each output back (a sampler's loop) compounds it."""
    model, calls = vit
    one = sensitivity(model, run=lambda m: m(*calls[0]), formats=("int8",), progress=False)
    alone = sensitivity(model, [calls[0]], formats=("int8",), progress=False)
    assert {s.name: s.error for s in one.sites} == {s.name: s.error for s in alone.sites}

    def sampler(m):   # a few Euler steps, each input the last output
        x, t, y = calls[0]
        for _ in range(3):
            x = x + 0.3 * m(x, t, y)
        return x
    chained = sensitivity(model, run=sampler, formats=("int8",), progress=False)
    errors = [s.error["int8"] for s in chained.sites]
    assert all(math.isfinite(e) and e > 0 for e in errors)
    assert errors != [s.error["int8"] for s in one.sites]
    assert any("outputs of `run`" in n for n in chained.notes)
    with pytest.raises(ValueError, match="one of them"):
        sensitivity(model, calls, run=sampler, formats=("int8",), progress=False)
    with pytest.raises(ValueError, match="one of them"):
        sensitivity(model, formats=("int8",), progress=False)


def test_static_options_are_measured_dynamic():
    torch.manual_seed(0)
    sens = sensitivity(Two().eval(), (torch.randn(16, 8),), formats=("int8",), options={"activations": "static"},
                       progress=False)
    assert "options ask static" in sens.notes[0] and set(sens["a"].error) == {"int8"}


def test_meta_model_needs_real_weights():
    with torch.device("meta"):
        model = Two()
    with pytest.raises(ValueError, match="needs real weights"):
        sensitivity(model, (torch.empty(2, 8, device="meta"),))


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        sensitivity(Two(), (torch.randn(2, 8),), formats=("int3",))


@pytest.mark.parametrize("name,kind,block", [
    ("transformer_blocks.0.attn.to_q", "attention q/k/v", "transformer_blocks.0"),
    ("transformer_blocks.3.attn.add_k_proj", "attention q/k/v", "transformer_blocks.3"),
    ("transformer_blocks.0.attn2.to_v", "attention q/k/v", "transformer_blocks.0"),
    ("transformer_blocks.0.attn.to_out.0", "attention out", "transformer_blocks.0"),
    ("transformer_blocks.0.attn.to_add_out", "attention out", "transformer_blocks.0"),
    ("transformer_blocks.0.ff.net.0.proj", "MLP up", "transformer_blocks.0"),
    ("transformer_blocks.0.ff_context.net.0.proj", "MLP up", "transformer_blocks.0"),
    ("transformer_blocks.0.ff.net.2", "MLP down", "transformer_blocks.0"),
    ("transformer_blocks.0.ff_context.net.2", "MLP down", "transformer_blocks.0"),
    ("transformer_blocks.0.norm1.linear", "AdaLN/modulation", "transformer_blocks.0"),
    ("transformer_blocks.0.norm1_context.linear", "AdaLN/modulation", "transformer_blocks.0"),
    ("single_transformer_blocks.7.norm.linear", "AdaLN/modulation", "single_transformer_blocks.7"),
    ("single_transformer_blocks.7.proj_mlp", "MLP up", "single_transformer_blocks.7"),
    ("single_transformer_blocks.7.proj_out", "MLP down", "single_transformer_blocks.7"),
    ("single_transformer_blocks.7.attn.to_k", "attention q/k/v", "single_transformer_blocks.7"),
    ("time_text_embed.timestep_embedder.linear_1", "embedders", None),
    ("time_text_embed.guidance_embedder.linear_2", "embedders", None),
    ("x_embedder", "embedders", None),
    ("context_embedder", "embedders", None),
    ("pos_embed.proj", "embedders", None),
    ("norm_out.linear", "AdaLN/modulation", None),
    ("proj_out", "final projection", None),
    ("adaln_single.linear", "AdaLN/modulation", None),
    ("adaln_single.emb.timestep_embedder.linear_1", "embedders", None),
    ("caption_projection.linear_1", "embedders", None),
    ("transformer.2.self_attn.in_proj", "attention q/k/v", "transformer.2"),
    ("layers.1.self_attn.out_proj", "attention out", "layers.1"),
    ("layers.1.linear1", "MLP up", "layers.1"),
    ("layers.1.linear2", "MLP down", "layers.1"),
    ("blocks.4.mlp.fc1", "other", "blocks.4"),
    ("patch_embed", "embedders", None),
    ("conv", "embedders", None),
    ("patch_emb", "embedders", None),
    ("time_emb.1", "embedders", None),
    ("dits.2.gamma1", "AdaLN/modulation", "dits.2"),
    ("dits.2.alpha2", "AdaLN/modulation", "dits.2"),
    ("dits.0.wq", "attention q/k/v", "dits.0"),
    ("dits.0.lv", "attention out", "dits.0"),
    ("dits.0.ff.0", "MLP up", "dits.0"),
    ("dits.0.ff.2", "MLP down", "dits.0"),
    ("dits.0.ff.2#2", "MLP down", "dits.0"),
    ("linear", "final projection", None),
    ("down_blocks.1.resnets.0.time_emb_proj", "AdaLN/modulation", "down_blocks.1"),
    ("down_blocks.1.resnets.0.conv1", "other", "down_blocks.1"),
])
def test_op_type_and_block(name, kind, block):
    assert op_type(name) == kind and block_of(name) == block


# ---------------------------------------------------------------------------------------------- allocation
def _sens(sizes, errors) -> Sensitivity:
    sites = [SiteSensitivity(name=f"s{i}", op_type="other", block=None, kind="linear", in_features=1, out_features=n,
                             weight_numel=n, error=dict(e), site_sqnr_db={f: 30.0 for f in e})
             for i, (n, e) in enumerate(zip(sizes, errors))]
    return Sensitivity(model="m", formats=("int8", "fp8", "w4a8"), calls=1, sites=sites)


def _bits(sens, formats, table=alloc.NOMINAL_BITS) -> Fraction:
    """The exact average weight bits of a choice of formats."""
    return sum(Fraction(table[formats[s.name]]) * s.weight_numel for s in sens.sites) / \
        sum(s.weight_numel for s in sens.sites)


site_errors = st.dictionaries(st.sampled_from(("int8", "fp8", "w4a8")),
                              st.floats(1e-7, 1.0, allow_nan=False), min_size=0, max_size=3)
instances = st.integers(1, 5).flatmap(lambda n: st.tuples(st.lists(st.integers(1, 1000), min_size=n, max_size=n),
                                                          st.lists(site_errors, min_size=n, max_size=n),
                                                          st.floats(0.0, 1.0)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_allocation_optimal_vs_brute_force(instance):
    sizes, errors, frac = instance
    sens = _sens(sizes, errors)
    choices = [["float", *e] for e in errors]
    lowest = _bits(sens, {s.name: min(c, key=alloc.NOMINAL_BITS.get) for s, c in zip(sens.sites, choices)})
    budget = float(lowest + Fraction(frac) * (16 - lowest))   # a float may round below the minimum: infeasible
    best = math.inf
    for combo in itertools.product(*choices):
        if _bits(sens, dict(zip((s.name for s in sens.sites), combo))) <= Fraction(budget):
            best = min(best, sum(e.get(f, 0.0) for e, f in zip(errors, combo)))
    if best == math.inf:
        with pytest.raises(ValueError, match="infeasible"):
            allocate(sens, budget)
        return
    a = allocate(sens, budget)
    assert a.average_bits <= budget and a.average_bits == float(_bits(sens, a.formats))
    assert a.error == pytest.approx(best, rel=1e-12)
    assert alloc.Allocation.from_json(a.to_json()) == a


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 10 ** 6), min_size=1, max_size=12), st.data())
def test_allocation_never_exceeds_the_budget(sizes, data):
    """Coarse cells (costs rounded up) on large random sizes and fractional bits: within the budget."""
    errors = [data.draw(site_errors) for _ in sizes]
    bits = {"w4a8": data.draw(st.floats(2.0, 6.0)), "fp8": 7.5}
    sens = _sens(sizes, errors)
    table = {**alloc.NOMINAL_BITS, **bits}
    lowest = _bits(sens, {s.name: min(["float", *e], key=table.get) for s, e in zip(sens.sites, errors)}, table)
    budget = data.draw(st.floats(float(lowest), 16.0))
    if Fraction(budget) < lowest:
        with pytest.raises(ValueError, match="infeasible"):
            allocate(sens, budget, bits=bits)
        return
    a = allocate(sens, budget, bits=bits)
    assert a.average_bits <= budget and a.average_bits == float(_bits(sens, a.formats, table))
    assert all(f == "float" or f in e for f, e in zip(a.formats.values(), errors))


def test_allocation_spends_bits_where_they_buy_most():
    sens = _sens([100, 100], [{"int8": 1e-3, "w4a8": 1e-2}, {"int8": 1e-6, "w4a8": 1e-5}])
    a = allocate(sens, 6)
    assert a.formats == {"s0": "int8", "s1": "w4a8"} and a.average_bits == 6 and a.error == pytest.approx(1e-3 + 1e-5)
    assert allocate(sens, 16).formats == {"s0": "float", "s1": "float"}
    assert "s0" in a.describe() and "6 average weight bits" in a.describe()


def test_allocation_infeasible_names_the_minimum():
    sens = _sens([100, 300], [{"int8": 1e-3, "w4a8": 1e-2}, {"int8": 1e-4}])
    with pytest.raises(ValueError, match="minimum .* is 7 bits"):
        allocate(sens, 6.5)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_shipped_config_needs_real_weights(capsys):
    assert cli.main(["sensitivity", "pixart-sigma", "--steps", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # (earlier lines: import warnings of diffusers)
    assert last.startswith("segquant: error:") and "needs real weights" in last


def test_cli_folder_without_weights(capsys, tmp_path):
    from conftest import tiny_sd3
    tiny_sd3().save_config(tmp_path / "transformer")
    assert cli.main(["sensitivity", str(tmp_path)]) == 2
    assert "needs real weights" in capsys.readouterr().err


def test_cli_diffusers_folder_with_weights(capsys, tmp_path):
    from conftest import tiny_sd3
    tiny_sd3().save_pretrained(tmp_path / "pipe" / "transformer")
    argv = ["sensitivity", str(tmp_path / "pipe"), "--formats", "int8", "--steps", "2", "--resolution", "64",
            "--text-tokens", "5", "--out", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.html")]
    assert cli.main(argv) == 0
    sens = Sensitivity.load(tmp_path / "s.json")
    assert sens.calls == 2 and sens.model == "SD3Transformer2DModel"
    assert sens["transformer_blocks.0.attn.to_q"].op_type == "attention q/k/v"
    assert all(s.error["int8"] >= 0 for s in sens.sites) and (tmp_path / "s.html").is_file()


def test_cli_whole_run_needs_an_mnist_model(capsys, tmp_path):
    assert cli.main(["sensitivity", str(tmp_path), "--run"]) == 2
    assert "--run" in capsys.readouterr().err


@pytest.mark.real_defaults
def test_cli_mnist_dit_whole_run(shared_data, capsys, tmp_path):
    out = tmp_path / "run.json"
    assert cli.main(["sensitivity", "mnist-dit", "--run", "--formats", "int8", "--out", str(out)]) == 0
    sens = Sensitivity.load(out)
    assert sens.calls == 1 and any("outputs of `run`" in n for n in sens.notes)
    measured = [s for s in sens.sites if "int8" in s.error]
    assert len(measured) == 39 and all(s.error["int8"] > 0 for s in measured)   # K=16 sites: min_k


def test_cli_mnist_dit(shared_data, capsys, tmp_path):
    out = tmp_path / "x.json"
    assert cli.main(["sensitivity", "mnist-dit", "--formats", "int8", "fp8", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MLP down" in text and "dits.2" in text and f"wrote {out}" in text
    data = json.loads(out.read_text())
    assert data["calls"] == 2 and len(data["sites"]) == 41
    sens = Sensitivity.load(out)
    assert sens["conv"].not_applicable.keys() == {"fp8"} and sens["dits.0.wq"].error["fp8"] > 0
