"""segquant codegen-check: every Triton kernel the project can launch, compiled on this CPU for
sm_80, sm_89 and sm_90 with a real launch's specialization, in every config the pruner offers
there, uses tensor cores (wgmma on sm_90), spills nothing, is software-pipelined wherever it asks
for stages and fits the arch's shared memory. Runs the CLI in a subprocess: the other tests run
the kernels under TRITON_INTERPRET=1, which replaces them by interpreted functions."""
import json
import os
import subprocess
import sys

import pytest

from segquant_compile.lowering.codegen_check import epilogue_tile_loads

ARCHS = "sm_80,sm_89,sm_90"


def codegen_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "-m", "segquant_compile.cli", "codegen-check", *args, "--json", str(path)],
                         env=env, capture_output=True, text=True, timeout=3000)
    rows = json.loads(path.read_text()) if path.exists() else []
    return out, rows


def assert_pass(rows):
    assert rows
    for r in rows:
        what = f"{r['arch']} {r['case']} {r['config']}"
        assert r["compiled"], f"{what}: {r['error']}"
        assert r["mma"], f"{what}: no tensor cores"
        assert r["arch"] != "sm_90" or r["mma"].startswith("wgmma"), f"{what}: {r['mma']}"
        assert r["spill_bytes"] == 0, f"{what}: spills {r['spill_bytes']} bytes"
        if r["config"]["num_stages"] >= 2:
            assert r["pipelined"] and r["stages"] >= 2, f"{what}: {r['stages']} stage(s), {r['async_copies']}"
        assert r["shared_bytes"] <= r["shared_limit"], what
        # both tiles through async copies on every arch wherever stages are asked for (the K-major
        # weight: wgmma reads 8-bit operands K-major), but for a conv's byte-wise gathers, which
        # no async copy takes: the static kernel's im2col A tile (its W tile still is async) and
        # the pixel kernel's weight rows c * taps + tap past 1x1 (its A tile still is async)
        if r["config"]["num_stages"] >= 2:
            pixel_1x1 = r["variant"].startswith("conv1x1") and r["variant"].endswith("-pixel")
            allowed = 1 if r["kernel"] == "conv" and not pixel_1x1 else 0
            allowed += epilogue_tile_loads(r)     # the low-rank branch's tiles, once after the K loop
            # known gap: on sm_80/sm_89 the prologue-lr kernel's bf16 x tile, which feeds both the
            # x @ L1 dot and the quantization, stays a synchronous load (async on sm_90)
            allowed += r["variant"].endswith("prologue-lr") and r["arch"] != "sm_90"
            assert r["sync_tile_loads"] <= allowed, f"{what}: {r['sync_tile_loads']} synchronous tile load(s)"
    for key in ("kernel", "variant", "arch", "config", "compiled", "mma", "pipelined", "stages", "registers",
                "spill_bytes", "shared_bytes"):
        assert key in rows[0]


@pytest.fixture(scope="module")
def every(tmp_path_factory):
    """The CLI's full check, once per session (the other tests read its rows): every config the
    pruner offers, every case, every arch."""
    return codegen_check(tmp_path_factory.mktemp("codegen"), "--arch", ARCHS, "--jobs", "2")


@pytest.mark.slow
def test_every_offered_config_on_every_arch(every):
    out, rows = every
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "wrote" in out.stdout
    assert_pass(rows)
    assert {r["arch"] for r in rows} == set(ARCHS.split(","))


@pytest.mark.slow
def test_every_kernel_and_variant_is_checked(every):
    _, rows = every
    assert {r["kernel"] for r in rows} == {"gemm", "conv", "w4a8", "weight-only"}
    assert any(r["variant"].startswith("fp8") and r["mma"] == "wgmma.e4m3" for r in rows)
    # SVDQuant's low-rank branch: the epilogue's up-projection, the prologue's down-projection
    variants = {r["variant"] for r in rows}
    assert {"int8-lr", "int8-dual-lr", "int8-asym-lr", "int8-prologue-lr", "int8-dual-prologue-lr", "fp8-lr",
            "w4a8-lr", "w4a8-dual-lr", "w4a8-dual-asym-lr"} <= variants
    assert any(r["variant"] == "int8-prologue-lr" and r["mma"] == "wgmma.bf16" for r in rows)   # x @ L1
    # the dynamic conv's kernel (steps per input pixel), 3x3 and 1x1, pipelined on wgmma where it fits
    for tag in ("conv3x3s1", "conv1x1s1"):
        assert any(r["variant"].startswith(tag) and r["variant"].endswith("-pixel") and r["pipelined"]
                   and r["mma"] == "wgmma.s8" and not r["problems"] for r in rows), tag


def test_first_config_of_named_cases(tmp_path):
    """`first` and `names` (the CLI's --first, a quick check): one config per case, only the
    named cases."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "rows.json"
    code = ("import json; from segquant_compile.lowering import codegen_check as c; "
            "first = {k.name: c.config_index(c.configs(k, 'sm_90')[0]) for k in c.cases()}; "
            f"json.dump([c.check(['sm_90'], names=['int8-prologue-lr'], first=True), first], open({str(path)!r}, 'w'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-2000:]
    rows, first = json.loads(path.read_text())
    assert_pass(rows)
    assert rows and all("int8-prologue-lr" in r["case"] for r in rows)
    assert [r["config_index"] for r in rows] == [first[r["case"]] for r in rows]   # the first offered only
    assert len({r["case"] for r in rows}) == len(rows)


def test_refuses_the_interpreter_and_unknown_archs():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "segquant_compile.cli", "codegen-check", "--arch", "sm_90"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
    env.pop("TRITON_INTERPRET")
    out = subprocess.run([sys.executable, "-m", "segquant_compile.cli", "codegen-check", "--arch", "sm_70"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "sm_70" in out.stderr


def test_the_table_has_a_verdict_for_every_launchable_variant():
    """Every variant the launchers accept, on aligned and on odd segment bounds, has a case in the
    check and a verdict in the pruner's table on every arch (fp8: where e4m3 dots exist), so the
    pruner never offers a config the check did not compile."""
    from segquant_compile.lowering import gemm_configs
    from segquant_compile.lowering.codegen_cases import cases, launchable_variants
    names = {c.name for c in cases()}
    table = gemm_configs._table()["archs"]
    for v in launchable_variants():
        for even in (True, False):
            name = gemm_configs.codegen_case(v.name, v.segmented, even)
            assert name in names, f"no codegen-check case for {name}"
            for arch in ("sm_80", "sm_89", "sm_90"):
                if v.fmt == "fp8" and arch not in gemm_configs.FP8_ARCHS:
                    continue
                assert name in table[arch], f"{arch}: no verdict for {name}"
                passed, single = gemm_configs.checked_configs(v.name, False, even, arch)
                assert passed or single, f"{arch}: nothing passes for {name}"


def test_the_pruner_refuses_a_variant_the_check_never_compiled():
    from segquant_compile.lowering import gemm_configs
    with pytest.raises(RuntimeError, match="codegen-check verdict"):
        gemm_configs.checked_configs("int8-dual-made-up", True, True, "sm_90")
    # an arch without a table (a newer GPU) has no verdict: every fitting config stays offered
    assert gemm_configs.checked_configs("int8", True, True, "sm_100") == (None, [])


def test_single_stage_configs_are_kept_only_where_they_pass_compiled_so():
    """A case where nothing pipelines keeps the configs that pass all else, to run with num_stages
    1: a different compile, so one that spills compiled so is dropped."""
    from segquant_compile.lowering.codegen_check import table
    row = lambda i, problems: {"arch": "sm_90", "case": "conv:x", "config_index": i, "problems": problems}  # noqa: E731
    rows = [row(0, ["not pipelined (1 stage(s), async copies: None)"]), row(1, ["not pipelined (1 stage(s))"]),
            row(2, ["spills 8 bytes"])]
    assert table(rows)["archs"]["sm_90"] == {"conv:x": [], "conv:x:single_stage": [0, 1]}
    single = [row(0, []), row(1, ["spills 16 bytes"])]
    assert table(rows, single)["archs"]["sm_90"] == {"conv:x": [], "conv:x:single_stage": [0]}
