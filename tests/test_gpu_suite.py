"""bench/gpu_suite.py --dry-run: the GPU suite's every stage runs on the CPU under the Triton
interpreter at tiny shapes, so the command works the day a GPU is lent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=2400, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["environment"]["dry_run"] and r["environment"]["torch"]
    stages = r["stages"]
    assert set(stages) == {"pytest", "gemm", "flux_blocks", "sd3_transformer", "profile"}
    assert all("result" in s for s in stages.values()), {k: s for k, s in stages.items() if "result" not in s}
    assert stages["pytest"]["result"]["returncode"] == 0
    timings = stages["gemm"]["result"][0]["timings"]
    for name in ("segquant_int8", "segquant_int8_dual", "segquant_int8_24seg", "segquant_fp8", "bf16_mm"):
        assert "ms" in timings[name], timings[name]
    for module in (stages["flux_blocks"]["result"]["double_block"], stages["flux_blocks"]["result"]["single_block"],
                   stages["sd3_transformer"]["result"]):
        for name in ("inductor_bf16", "segquant_int8_dynamic", "segquant_int8_static", "segquant_fp8_dynamic"):
            assert module[name]["ms"] > 0 and module[name]["sqnr_db_vs_eager"] > 20, (name, module[name])
        for name in ("torchao_int8_dynamic", "torchao_fp8_dynamic"):   # torchao is not a CPU dependency
            assert "ms" in module[name] or "error" in module[name]
    assert stages["profile"]["result"] and "op" in stages["profile"]["result"][0]
