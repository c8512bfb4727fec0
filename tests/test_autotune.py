"""Autotuning: keys, pruning, persistence across processes, `segquant autotune`."""
import json
import os
import subprocess
import sys

import pytest

from segquant_compile import cli
from segquant_compile.lowering import autotune, gemm_configs, triton_gemm


@pytest.fixture
def cache(tmp_path):
    autotune.set_cache_dir(tmp_path)
    yield tmp_path
    autotune.set_cache_dir(None)


def test_key_and_buckets():
    assert [autotune.m_bucket(m) for m in (1, 16, 17, 333, 4096, 100000)] == [16, 16, 32, 512, 4096, 8192]
    k = autotune.key(333, 1536, 64, "int8-dual", "cpu")
    assert "int8-dual" in k and "M512" in k and "N1536" in k and "K64" in k


def test_prune_respects_shared_memory_and_min_dot(monkeypatch):
    monkeypatch.setattr(gemm_configs, "INTERPRET", False)
    monkeypatch.setattr(gemm_configs, "shared_memory", lambda device: 64 * 1024)
    configs = gemm_configs.prune(4096, 4096, 4096, "int8", "cpu")
    assert configs and all(c["BLOCK_K"] >= gemm_configs.MIN_DOT_K for c in configs)
    assert all((c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]) * c["num_stages"] <= 64 * 1024
               for c in configs)
    small = gemm_configs.prune(1, 64, 64, "int8", "cpu")
    assert all(c["BLOCK_M"] <= 16 for c in small)


def test_tune_persists_for_a_second_process(cache):
    cfg, timings = triton_gemm.tune(20, 48, 64, "int8", "cpu")
    key = autotune.key(20, 48, 64, "int8", "cpu")
    assert timings and cfg == autotune.choose(key, triton_gemm.prune(20, 48, 64, "int8", "cpu"))
    data = json.loads((cache / "autotune.json").read_text())
    assert data[autotune.key(20, 48, 64, "int8", "cpu")] == cfg
    code = ("import json; from segquant_compile.lowering import autotune as a; "
            "k = a.key(20, 48, 64, 'int8', 'cpu'); print(json.dumps(a._load().get(k)))")
    env = {**os.environ, "SEGQUANT_CACHE_DIR": str(cache), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(out.stdout) == cfg


def test_cli_tunes_every_shape_of_a_model(cache, tmp_path, capsys):
    from conftest import tiny_sd3
    tiny_sd3().save_config(tmp_path / "model")
    assert cli.main(["autotune", str(tmp_path / "model"), "--batch", "1", "2", "--resolution", "64",
                     "--text-tokens", "5", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    data = json.loads((cache / "autotune.json").read_text())
    n = int(out.split("tuned ")[1].split()[0])
    assert n == len(data) > 5
    assert any("int8-dual" in k for k in data)
    assert any("int8-asym" in k for k in data)   # dualscale="auto" may choose zero points


def test_bench_gemm_shapes_come_from_the_plan():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_gemm", Path(__file__).parent.parent / "bench" / "gemm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.gemm_shapes("flux.1-dev", 1, 1024)
    by = {(r["M"], r["N"], r["K"]): r for r in rows}
    # single blocks run on the joined 4096 image + 512 text tokens
    assert by[(4608, 3072, 15360)]["dual"] and by[(4608, 3072, 15360)]["sites"] == 38   # proj_out
    assert by[(4096, 3072, 3072)]["segments"] == 24                                       # to_out heads
    assert sum(r["sites"] for r in rows) == 504


def test_tune_survives_equal_timings(cache, monkeypatch):
    monkeypatch.setattr(triton_gemm, "prune", lambda *a: [dict(triton_gemm.INTERPRETER_CONFIG),
                                                           dict(triton_gemm.INTERPRETER_CONFIG, BLOCK_N=16)])
    cfg, timings = triton_gemm.tune(20, 48, 64, "int8", "cpu", bench=lambda fn: 1.0)   # a tie
    assert len(timings) == 2 and cfg == triton_gemm.INTERPRETER_CONFIG


def test_autotune_tunes_the_prologue_variant_the_gpu_runs(cache, tmp_path, capsys):
    """Static options at small M run the in-kernel quantize prologue on CUDA: the CLI tunes it."""
    from conftest import tiny_sd3
    tiny_sd3().save_config(tmp_path / "model")
    assert cli.main(["autotune", str(tmp_path / "model"), "--resolution", "64", "--text-tokens", "5",
                     "--cache", str(cache), "--options", '{"activations": "static", "dualscale": true}']) == 0
    data = json.loads((cache / "autotune.json").read_text())
    variants = [k.split("|")[1] for k in data]
    assert data and all(v.endswith("-prologue") for v in variants if not v.startswith("conv"))
    # the patch embedding conv: its implicit-GEMM kernel reads the int8 input quantized once (static)
    assert "conv2x2s2-int8" in variants


def test_kernel_module_owns_its_configs_and_autotune_imports_no_kernel():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(autotune))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("triton_gemm" in name or "gemm_configs" in name for name in imported)
    assert not hasattr(autotune, "CONFIGS") and gemm_configs.CONFIGS


def test_conv_tune_launches_each_conv_kernel_as_its_sites_run(cache):
    """`segquant autotune` of a conv site: the static kernel on int8 input with steps per segment,
    the pixel kernel (dynamic) on channels-last int8 input with steps per input pixel."""
    from segquant_compile.lowering import triton_conv
    from segquant_compile.lowering.site_lowering import ConvGeometry
    geo = ConvGeometry(8, (3, 3), (1, 1), (1, 1))
    for pixel in (False, True):
        name = triton_conv.variant(geo, (1, 2), pixel)
        assert name == "conv3x3s1-int8-dual-asym" + ("-pixel" if pixel else "")
        runs = []
        cfg, timings = triton_conv.tune(16, 16, geo, name, "cpu", bench=lambda fn: (runs.append(fn()), 1.0)[1])
        assert cfg and timings and runs
