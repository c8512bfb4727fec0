"""The layering segquant_compile -> passes -> lowering, the backend apart from the examples, the
options a leaf and no import cycle, checked by import-linter's contracts in pyproject.toml. passes/ and lowering/ install as subpackages from folders beside the package
(pyproject's package-dir), which import-linter cannot follow from the source tree, so the check
runs on a tree of links laid out as installed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers(tmp_path):
    package = tmp_path / "segquant_compile"
    package.mkdir()
    for f in (ROOT / "segquant_compile").iterdir():
        if f.name != "__pycache__":
            (package / f.name).symlink_to(f)
    for sub in ("passes", "lowering"):
        (package / sub).symlink_to(ROOT / sub)
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pyproject's test extra)"
    run = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0 and "4 kept, 0 broken" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
