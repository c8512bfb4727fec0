"""`segquant inspect` on shipped configs and local diffusers folders."""
import json
import subprocess
import sys

from segquant_compile import cli
from conftest import tiny_sd3


def test_inspect_shipped(capsys, tmp_path):
    assert cli.main(["inspect", "pixart-sigma", "--summary", "--save", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "287 sites (286 linear, 1 conv2d)" in out
    assert json.loads((tmp_path / "p.json").read_text())["totals"]["sites"] == 287


def test_inspect_local_folder(capsys, tmp_path):
    tiny_sd3().save_config(tmp_path / "transformer")
    assert cli.main(["inspect", str(tmp_path), "--resolution", "64", "--text-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0.norm1.linear" in out and "9x16 (chunk)" in out


def test_inspect_missing(capsys):
    assert cli.main(["inspect", "/nonexistent/model"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_console_script():
    out = subprocess.run([sys.executable, "-m", "segquant_compile.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout and "demo" in out.stdout


import pytest


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "sd3.5-medium", "--resolution", "0"], "positive integer"),
    (["inspect", "sd3.5-medium", "--resolution", "100"], "multiple of 8"),
    (["inspect", "sd3.5-medium", "--batch", "two"], "not an integer"),
    (["inspect", "sd3.5-medium", "--options", "{bad"], "not valid JSON"),
    (["inspect", "sd3.5-medium", "--options", '{"format": "int4"}'], "valid values"),
    (["inspect", "sd3.5-medium", "--bogus"], "unrecognized arguments"),
    (["autotune"], "required: model"),
    (["frobnicate"], "invalid choice"),
    (["inspect", "/nonexistent/model"], "nothing is downloaded"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle):
    out = subprocess.run([sys.executable, "-m", "segquant_compile.cli", *argv], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_demo_compares_with_float32_and_bfloat16(monkeypatch, capsys):
    """The demo's code path on a tiny model: every number it prints is measured in the run."""
    from conftest import SD3_TINY
    from segquant_compile import demo
    from segquant_compile.examples import sd3_demo
    original = demo.sd3_inputs
    monkeypatch.setattr(sd3_demo, "DEMO_SD3", SD3_TINY)
    monkeypatch.setattr(demo, "sd3_inputs", lambda model, seed=0, **kw: original(model, resolution=64, tokens=5,
                                                                                  seed=seed))
    result = demo.run("sd3", "static")
    out = capsys.readouterr().out
    assert "bfloat16" in out and "vs bfloat16" in out and "Inductor bfloat16" in out
    assert result["bf16_inductor_s"] > 0 and result["speedup_vs_bf16"] > 0
    assert result["sqnr_db"] > 25 and result["bf16_sqnr_db"] > 20
