"""The segquant backend: registration, options, float passthrough."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import segquant_compile as sq
from conftest import tiny_sd3, tiny_sd3_inputs
from segquant_compile.lowering.quantize import sqnr_db


def test_entry_point_without_import():
    code = ("import torch, sys\n"
            "m = torch.nn.Linear(4, 3)\n"
            "x = torch.randn(2, 4)\n"
            "assert 'segquant_compile' not in sys.modules\n"
            "c = torch.compile(m, backend='segquant', options={'inductor': False})\n"
            "err = (c(x) - m(x)).pow(2).sum() / m(x).pow(2).sum()\n"
            "assert err < 1e-3, err   # int8: SQNR > 30 dB\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_backend_after_import_is_the_same_function():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("segquant") is sq.segquant_backend


@pytest.mark.parametrize("options,match", [
    ({"fromat": "int8"}, "unknown segquant option"),
    ({"format": "int4"}, "valid values"),
    ({"activations": "sometimes"}, "valid values"),
    ({"smooth": 2.0}, "smooth"),
    ({"dualscale_activations": ["swish"]}, "valid values"),
])
def test_invalid_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        sq.resolve_options(options)
    m = nn.Linear(4, 4)
    compiled = torch.compile(m, backend="segquant", options=options)
    with pytest.raises(Exception, match=match) as info:
        compiled(torch.randn(2, 4))
    # dynamo wraps backend errors (BackendCompilerFailed) and keeps ours as inner_exception
    inner = getattr(info.value, "inner_exception", info.value.__cause__) or info.value
    assert isinstance(inner, ValueError)


def test_config_is_frozen_and_names_valid_options():
    c = sq.resolve_options({"format": "fp8", "skip": "*embedder*"})
    assert c.skip == ("*embedder*",)
    with pytest.raises(Exception):
        c.format = "int8"
    with pytest.raises(ValueError) as info:
        sq.resolve_options({"bogus": 1})
    for key in ("format", "activations", "weights", "smooth", "dualscale_activations", "skip"):
        assert key in str(info.value)


def test_compiled_matches_eager_and_does_not_recompile():
    model = tiny_sd3()
    inputs = tiny_sd3_inputs(batch=2)
    with torch.no_grad():
        expected = model(**inputs).sample
        compiled = torch.compile(model, backend="segquant")
        got = compiled(**inputs).sample
        assert sqnr_db(expected, got) > 35
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(**tiny_sd3_inputs(batch=2, seed=7)).sample
        assert sqnr_db(model(**tiny_sd3_inputs(batch=2, seed=7)).sample, again) > 35


def test_float_passthrough_without_sites():
    """With every site skipped the backend is plain Inductor: exact up to float reassociation."""
    model = tiny_sd3()
    inputs = tiny_sd3_inputs(batch=1)
    with torch.no_grad():
        compiled = torch.compile(model, backend="segquant", options={"skip": ["*"]})
        torch.testing.assert_close(compiled(**inputs).sample, model(**inputs).sample, rtol=1e-4, atol=1e-4)
    t = sq.report(compiled).totals()
    assert t["float"] == t["sites"] == 37      # 36 linears + the patch embedding conv


def test_model_without_linears():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.ReLU())    # a depthwise conv is no site
    x = torch.randn(1, 2, 6, 6)
    report = sq.explain(model, x)
    assert report.totals()["sites"] == 0 and report.totals()["float_calls"] == 1
    assert "0 linear sites" in str(report)
    compiled = torch.compile(model, backend="segquant", options={"inductor": False})
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("thing", [None, 3, "model", torch.randn(2)])
def test_explain_needs_callable(thing):
    with pytest.raises(TypeError, match="callable"):
        sq.explain(thing, torch.randn(2))
