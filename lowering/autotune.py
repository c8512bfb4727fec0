"""Autotuning of the segquant GEMM: configs, pruning, a per-(M bucket, N, K, variant, device)
key, and winners persisted on disk so a second process starts tuned.

The cache file is SEGQUANT_CACHE_DIR/autotune.json (default: $XDG_CACHE_HOME/segquant or
~/.cache/segquant). `segquant autotune` fills it ahead of time for every GEMM shape of a model.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

# Listed next to the kernel (Triton matmul tutorial / Inductor mm templates style).
CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=wp)
    for bm, bn, bk, st, wp in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 64, 64, 5, 4),
        (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 64, 2, 4),
    ]
]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_stages=1, num_warps=4)
MIN_DOT_K = 32          # 8-bit operands
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


def variant_name(fmt: str, dual: bool, prologue: bool = False) -> str:
    """`int8`, `int8-dual`, `fp8-dual`, `int8-prologue`, ...: the kernel variant part of a key."""
    return fmt + ("-dual" if dual else "") + ("-prologue" if prologue else "")


def key(m: int, n: int, k: int, variant: str, device) -> str:
    return f"{device_name(device)}|{variant}|M{m_bucket(m)}|N{n}|K{k}"


def shared_memory(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 101376


def prune(m: int, n: int, k: int, variant: str, device) -> list[dict]:
    """Configs that fit: shared memory, the minimum dot size, no tile much larger than the problem."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [dict(INTERPRETER_CONFIG)]
    elem = 1 if not variant.endswith("prologue") else 4
    limit = shared_memory(device)
    out = []
    for c in CONFIGS:
        if c["BLOCK_K"] < MIN_DOT_K:
            continue
        smem = (c["BLOCK_M"] * c["BLOCK_K"] * elem + c["BLOCK_K"] * c["BLOCK_N"]) * c["num_stages"]
        if smem > limit:
            continue
        if c["BLOCK_M"] > max(16, m_bucket(m)) or c["BLOCK_N"] > max(32, n * 2):
            continue
        out.append(c)
    return out or [dict(CONFIGS[-1])]


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


def _cached(kk: str) -> dict | None:
    cfg = _MEMORY.get(kk) or _load().get(kk)
    if cfg is not None:
        _MEMORY[kk] = cfg
    return cfg


def choose(m: int, n: int, k: int, variant: str, device) -> dict:
    """The tuned config for this shape: memory, then disk, then the first config that fits
    (call tune() or `segquant autotune` ahead of time, never inside a CUDA graph capture)."""
    kk = key(m, n, k, variant, device)
    cfg = _cached(kk)
    if cfg is None:
        cfg = _MEMORY[kk] = prune(m, n, k, variant, device)[0]
    return cfg


def ensure(m: int, n: int, k: int, variant: str, device) -> dict:
    """A tuned config for this key, tuning now if neither memory nor disk has one."""
    return _cached(key(m, n, k, variant, device)) or tune(m, n, k, variant, device)[0]


def tune(m: int, n: int, k: int, variant: str, device, bench=None) -> tuple[dict, list]:
    """Time every pruned config on random data of this shape; persist and return the winner."""
    from .triton_gemm import launch
    device = torch.device(device)
    dual = variant.split("-")[1:2] == ["dual"]
    prologue = variant.endswith("prologue")
    fp8 = variant.startswith("fp8")
    g = torch.Generator(device="cpu").manual_seed(0)
    if prologue:
        a = torch.randn(m, k, generator=g).to(device)
    elif fp8:
        a = torch.randn(m, k, generator=g).to(device).to(torch.float8_e4m3fn)
    else:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w = (torch.randn(k, n, generator=g).to(device).to(torch.float8_e4m3fn) if fp8 else
         torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).to(device))
    d = torch.full((m, 1), 0.01, device=device)
    d_w = torch.full((n,), 0.01, device=device)
    bench = bench or _bench
    timings = []
    for cfg in prune(m, n, k, variant, device):
        try:
            t = bench(lambda: launch(a, d, d, w, d_w, None, (0, k), (int(dual),), torch.bfloat16,
                                     prologue=prologue, config=cfg))
        except Exception as e:       # a config the compiler rejects (resources): skip it
            t = float("inf")
            cfg = {**cfg, "error": type(e).__name__}
        timings.append((t, cfg))
    ran = [(t, c) for t, c in timings if "error" not in c] or timings
    best_cfg = {k_: v for k_, v in min(ran, key=lambda tc: tc[0])[1].items() if k_ != "error"}
    kk = key(m, n, k, variant, device)
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
