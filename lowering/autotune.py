"""Autotuning: a per-(device, variant, M bucket, N, K) key, a timing loop over a kernel's
candidate configs (the kernels live in triton_gemm.py and beside it, their configs in
gemm_configs.py), and winners persisted on disk so a second process starts tuned.

The cache file is SEGQUANT_CACHE_DIR/autotune.json (default: $XDG_CACHE_HOME/segquant or
~/.cache/segquant). `segquant autotune` fills it ahead of time for every GEMM shape of a model.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}
_CACHE_DIR: list[str] = []


def set_cache_dir(path) -> None:
    """Where winners persist (the `autotune_cache` option, `segquant autotune --cache`)."""
    _CACHE_DIR[:] = [str(path)] if path else []
    _MEMORY.clear()


def cache_path() -> Path:
    root = _CACHE_DIR[0] if _CACHE_DIR else os.environ.get("SEGQUANT_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segquant"
    return Path(root) / "autotune.json"


def m_bucket(m: int) -> int:
    """Powers of two from 16 to 8192: configs chosen for one M serve its neighbours."""
    b = 16
    while b < m and b < 8192:
        b *= 2
    return b


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} sm{p.major}{p.minor}"
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


def key(m: int, n: int, k: int, variant: str, device) -> str:
    return f"{device_name(device)}|{variant}|M{m_bucket(m)}|N{n}|K{k}"


def _load() -> dict:
    path = cache_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(k: str, cfg: dict) -> None:
    path = cache_path()
    with _LOCK:
        data = _load()
        data[k] = cfg
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)


def cached(kk: str) -> dict | None:
    cfg = _MEMORY.get(kk) or _load().get(kk)
    if cfg is not None:
        _MEMORY[kk] = cfg
    return cfg


def choose(kk: str, candidates: list[dict]) -> dict:
    """The tuned config for this key: memory, then disk, then the first candidate (tune ahead of
    time: `segquant autotune`, or the backend at compile time). A tuned config that is not among
    the candidates (tuned for other segment bounds, or before the codegen table dropped it) is not
    used."""
    cfg = cached(kk)
    if cfg is None:
        cfg = _MEMORY[kk] = candidates[0]
    return cfg if cfg in candidates else candidates[0]


def tune(kk: str, candidates: list[dict], run, bench=None) -> tuple[dict, list]:
    """Time `run(config)` for every candidate; persist and return the winner (ties: the first)."""
    bench = bench or _bench
    timings = []
    for cfg in candidates:
        try:
            t = bench(lambda: run(cfg))
        except Exception as e:       # a config the compiler rejects (resources): skip it
            t = float("inf")
            cfg = {**cfg, "error": type(e).__name__}
        timings.append((t, cfg))
    ran = [(t, c) for t, c in timings if "error" not in c] or timings
    best_cfg = {k_: v for k_, v in min(ran, key=lambda tc: tc[0])[1].items() if k_ != "error"}
    _MEMORY[kk] = best_cfg
    _store(kk, best_cfg)
    return best_cfg, timings


def _bench(fn) -> float:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        import time
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50)
