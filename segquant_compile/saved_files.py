"""The files of a save: a JSON manifest and a safetensors file, read and checked once per
process and file version. A leaf, so that options can adopt a save's options (options.py) without
the runtime that writes and loads saves (persist.py)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

FORMAT_VERSION = 7   # 3: weight formats (group_size, rounding); 4: activation_clip, first-call GPTQ;
                     # 5: the sites a state serves, each with its bias (tied weights);
                     # 6: d_x named d_pos; smooth and activation_clip as their resolved policies;
                     # 7: the low-rank branch (low_rank, l1, l2)
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"

_SAVED_OPTIONS: dict[str, dict] = {}   # resolved path -> options: one read per process and save


def saved_options(path) -> dict:
    """The options a directory was saved with (the manifest only: validating options reads no
    tensors). The last read is kept per path, so report/save still work if the folder goes away."""
    path = Path(path).resolve()
    manifest = path / MANIFEST
    if not manifest.is_file():
        if str(path) in _SAVED_OPTIONS:
            return _SAVED_OPTIONS[str(path)]
        raise FileNotFoundError(f"segquant load: no {MANIFEST} in {path}")
    try:
        options = json.loads(manifest.read_text())["options"]
    except Exception as e:
        raise ValueError(f"segquant load: {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"save it again") from None
    _SAVED_OPTIONS[str(path)] = dict(options)
    return options


@functools.lru_cache(maxsize=4)
def _read(path: Path, stamp: tuple) -> tuple[dict, dict]:
    """The manifest and tensors of a saved directory, read once per (path, file times). A read
    that fails raises every time (nothing is cached)."""
    from safetensors.torch import load_file
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        tensors = load_file(str(path / TENSORS))
    except Exception as e:
        raise ValueError(f"segquant load: {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"save it again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"segquant load: {path} has format version {version}, this segquant reads "
                         f"{FORMAT_VERSION}: save it again")
    return manifest, tensors


def read(path) -> tuple[Path, dict, dict]:
    path = Path(path).resolve()
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"segquant load: no {MANIFEST} and {TENSORS} in {path}")
    stamp = tuple((path / f).stat().st_mtime_ns for f in (MANIFEST, TENSORS))
    return (path, *_read(path, stamp))
