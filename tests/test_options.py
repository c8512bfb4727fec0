"""Typed options: presets as data and as objects, flat options round trip, errors by field type,
the format and scheme registries, and every "auto" resolved once with its reason."""
import json

import pytest
import torch
from torch import nn

import segquant_compile as sq
from segquant_compile.config import GROUPS, QuantConfig
from segquant_compile.lowering.formats import Format, Scheme
from segquant_compile.lowering.site_lowering import ActivationClip, Rounding, SmoothPolicy, WeightClip


def test_preset_as_data_with_overrides_over_it():
    c = sq.resolve_options({"preset": "w8a8-static", "smooth": 0.5})
    assert c.activations == "static" and c.smooth == 0.5 and c.format == "int8"
    assert sq.resolve_options({"preset": "w4a8", "format": "int8"}).format == "int8"   # given wins
    assert sq.resolve_options({"preset": "int4-weight-only"}).format is Format.INT4_WEIGHT_ONLY
    with pytest.raises(ValueError, match="'preset'; valid values"):
        sq.resolve_options({"preset": "w3a3"})
    with pytest.raises(ValueError, match="needs options 'budget'.*'sensitivity'"):
        sq.resolve_options({"preset": "mixed"})     # the budget is there; the measurement is the user's


def test_preset_objects_and_groups():
    c = sq.presets.W8A8_STATIC
    assert isinstance(c, QuantConfig) and c.activation.activations == "static" and c.activations == "static"
    assert sq.presets.FP8.precision.format is Format.FP8
    assert sq.presets.W8A8_DYNAMIC == QuantConfig().replace(min_k=64)   # built with the shipped defaults
    with pytest.raises(Exception):
        c.activation = None                 # frozen
    with pytest.raises(AttributeError, match="no option 'bogus'"):
        c.bogus
    m = sq.presets.mixed("sens.json", weight_bits=5)
    assert m.format == "auto" and m.budget == (("weight_bits", 5.0),) and m.sensitivity == "sens.json"


def test_flat_round_trip_through_json():
    c = sq.resolve_options({"preset": "w4a8", "formats": {"a.*": "float"}, "skip": "x", "smooth": None,
                            "dualscale": False, "activation_group_size": 32})
    flat = c.to_flat()
    assert set(flat) == {f for g in GROUPS.values() for f in g.__dataclass_fields__}
    assert QuantConfig.from_flat(json.loads(json.dumps(flat))) == c   # as a saved manifest holds it
    assert c.replace(group_size=64).group_size == 64 and c.replace(group_size=64).format == "w4a8"


def test_wrong_types_name_the_expected_type():
    with pytest.raises(ValueError, match=r"option 'calibration_steps' must be None or a positive int, got int 0"):
        sq.resolve_options({"calibration_steps": 0})
    with pytest.raises(ValueError, match=r"invalid value 'yes' for segquant option 'inductor'; valid values: True or False"):
        sq.resolve_options({"inductor": "yes"})
    with pytest.raises(ValueError, match=r"option 'load' must be a string .* or None, got int 3"):
        sq.resolve_options({"load": 3})
    with pytest.raises(ValueError, match=r"valid values: 'per-channel' or 'per-tensor'"):
        sq.resolve_options({"weights": "per-row"})
    with pytest.raises(TypeError, match="a dict or a QuantConfig"):
        sq.resolve_options(["int8"])


def test_compile_with_a_config_object_or_a_preset_name():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(8, 128)
    with torch.no_grad():
        ref = m(x)
        for compiled in (sq.compile(m, sq.presets.W8A8_DYNAMIC, min_k=0),
                         sq.compile(m, "w4a8", min_k=0, inductor=False),
                         torch.compile(m, backend="segquant", options={"preset": "fp8", "min_k": 0, "inductor": False})):
            out = compiled(x)
            assert len(sq.report(compiled).states) == 2
            assert (out - ref).pow(2).sum() / ref.pow(2).sum() < 2e-2
            torch._dynamo.reset()


def test_format_and_scheme_registries():
    assert [f.weight_bits for f in Format] == [8, 8, 4, 8, 4]
    assert {f for f in Format if f.weight_only} == {Format.INT8_WEIGHT_ONLY, Format.INT4_WEIGHT_ONLY}
    assert {f for f in Format if f.grouped} == {Format.W4A8, Format.INT4_WEIGHT_ONLY}
    assert Format.FP8.grid == "fp8" and Format.W4A8.grid == "int8" and not Format.FP8.integer
    assert [s.code for s in Scheme] == [0, 1, 2] and Scheme("dualscale") is Scheme.DUALSCALE
    assert Scheme.ASYMMETRIC == "asymmetric" and f"{Scheme.ASYMMETRIC}" == "asymmetric"
    assert json.dumps([Scheme.SYMMETRIC, Format.W4A8]) == '["symmetric", "w4a8"]'


def _lowering(options):
    """The SiteLowering explain() plans for one Linear(128, 32) under `options`."""
    report = sq.explain(nn.Sequential(nn.Linear(128, 32)), torch.randn(4, 128), options={**options, "min_k": 0})
    (lowering,) = report.planned.values()
    return lowering


@pytest.mark.parametrize("options, expect", [
    ({}, dict(rounding=Rounding.GPTQ_FIRST_CALL, weight_clip=WeightClip.ABSMAX,
              smooth=SmoothPolicy.SEARCH_FROM_CALIBRATION, activation_clip=None, auto=True)),
    ({"activations": "static"}, dict(rounding=Rounding.GPTQ, smooth=SmoothPolicy.SEARCH_FROM_CALIBRATION,
                                     activation_clip=ActivationClip.SEARCH_IF_UNSMOOTHED)),
    ({"activations": "static", "smooth": None}, dict(activation_clip=ActivationClip.SEARCH)),
    ({"activations": "static", "smooth": 0.5}, dict(smooth=0.5, activation_clip=ActivationClip.ABSMAX)),
    ({"activations": "static", "smooth": "search", "activation_clip": "search"},
     dict(smooth=SmoothPolicy.SEARCH, activation_clip=ActivationClip.SEARCH)),
    ({"format": "w4a8"}, dict(weight_clip=WeightClip.MSE, rounding=Rounding.GPTQ_FIRST_CALL)),
    ({"format": "fp8"}, dict(rounding=Rounding.RTN)),
    ({"format": "int4-weight-only"}, dict(smooth=None, auto=False, weight_clip=WeightClip.MSE)),
    ({"dualscale": False, "weight_rounding": "rtn", "smooth": None}, dict(auto=False, rounding=Rounding.RTN)),
])
def test_every_auto_resolves_once_to_a_value_or_policy(options, expect):
    lowering = _lowering(options)
    for key, value in expect.items():
        assert getattr(lowering, key) == value, (key, getattr(lowering, key))
    given = {k for k, v in options.items() if v != "auto"}
    for reason in lowering.reasons:   # a reason per option left "auto", none for an option given
        assert reason.split(" auto:")[0] not in given, reason


def test_the_report_names_how_autos_resolved():
    m = nn.Sequential(nn.Linear(128, 32))
    text = str(sq.explain(m, torch.randn(4, 128), options={"activations": "static", "min_k": 0}))
    assert "weight_rounding auto: gptq on the calibration's rows (1 site)" in text
    assert "activation_clip auto: search-if-unsmoothed" in text and "smooth auto:" in text
    rows = sq.explain(m, torch.randn(4, 128), options={"min_k": 0}).to_dict()["sites"]
    assert any(r.startswith("dualscale auto:") for r in rows[0]["resolved"])
