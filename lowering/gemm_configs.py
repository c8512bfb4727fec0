"""The GEMM-family kernels' candidate configs and the pruner: which of them a launch may take on
its device (shared memory, the minimum dot size, tiles on segment-bound multiples) and, on a
known arch, only those `segquant codegen-check` passed (codegen_table.json: tensor cores,
pipelined where stages are asked for, no spills, within shared memory). Shared by
triton_gemm.py, triton_conv.py and triton_formats.py.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from . import autotune

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The autotuner's candidates (Triton matmul tutorial style: listed right above the kernel).
CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=wp)
    for bm, bn, bk, st, wp in [
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 8),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 4), (64, 64, 64, 5, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4), (16, 32, 64, 3, 4),
        # K tiles of 32 (a dot's minimum): a gathered A tile in fewer registers per thread (added for
        # the conv kernel's former in-register quantization; indices above are the codegen table's:
        # append only)
        (64, 64, 32, 4, 4), (128, 128, 32, 4, 8),
        # 8 warps on a 64x64x32 tile (added for that former conv prologue's DualScale beside
        # asymmetric segments, which spilled in every 4-warp config on sm_90)
        (64, 64, 32, 4, 8),
    ]
]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_stages=1, num_warps=4)
MIN_DOT_K = 32          # 8-bit operands


# What `segquant codegen-check --write-table` found: per arch, per kernel case (codegen_case),
# the CONFIGS indices that compile to tensor cores, pipelined where they ask for stages, with no
# spills and within the arch's shared memory.
CODEGEN_TABLE = Path(__file__).with_name("codegen_table.json")
# cudaDevAttrMaxSharedMemoryPerBlockOptin of each arch the check compiles for (and sm_86)
FP8_ARCHS = ("sm_89", "sm_90")      # e4m3 dots need capability 8.9
ARCH_SHARED = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}


def shared_memory(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 101376


def device_arch(device) -> str | None:
    """`sm_90` for a CUDA device; None elsewhere (the interpreter, CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def codegen_case(variant: str, segmented: bool = True, even: bool = True) -> str:
    """The check's name for what decides a launch's code: the kernel, its variant, whether the K
    loop flushes inside (several segments or groups) and whether the tile columns are loaded
    from the table (bounds not on BLOCK_K multiples)."""
    if variant.startswith("conv"):
        tag, _, variant = variant.partition("-")
        kernel = "conv1x1" if tag.startswith("conv1x1") else "conv"
    elif variant.startswith("w4a8"):
        kernel = "w4a8"
    elif variant.endswith("weight-only"):
        kernel = "weight-only"
    else:
        kernel = "gemm"
    return f"{kernel}:{variant}" + (":segmented" if segmented else "") + ("" if even else ":unaligned")


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    try:
        return json.loads(CODEGEN_TABLE.read_text())
    except (OSError, ValueError):
        return {}


def checked_configs(variant: str, segmented: bool, even: bool, arch: str) -> tuple[list, list]:
    """CONFIGS indices the check passed for this launch on this arch, and those it passed with
    num_stages 1 where none pipelines (a one-segment launch the check did not compile takes its
    segmented case's, whose K loop holds one more tile); None: the arch or the case is not in
    the table."""
    archs = _table().get("archs", {})
    # an arch the check does not compile for takes its nearest checked one of the same major
    # (sm_86/sm_87: sm_80's mma.sync code); others have no verdict
    table = archs.get(arch) or archs.get({"sm_86": "sm_80", "sm_87": "sm_80"}.get(arch, ""), {})
    if not table:
        return None, []
    for seg in (segmented, True):
        name = codegen_case(variant, seg, even)
        if name in table:
            return table[name], table.get(name + ":single_stage", [])
    if variant.startswith("fp8") and arch not in FP8_ARCHS:
        return None, []    # no e4m3 dots here: the launch fails on the device, not in the pruner
    raise RuntimeError(f"segquant: no codegen-check verdict for {codegen_case(variant, segmented, even)} on {arch}: "
                       "a kernel variant was added without regenerating lowering/codegen_table.json "
                       "(`segquant codegen-check --arch sm_80,sm_89,sm_90 --every --write-table`)")


def prune(m: int, n: int, k: int, variant: str, device, bounds=None, arch: str | None = None,
          checked: bool = True) -> list[dict]:
    """Configs that fit: shared memory, the minimum dot size, no tile much larger than the problem;
    on a known arch only those the codegen check passed (no spills, pipelined). `bounds` (K
    segment, or w4a8 group, bounds): tiles no wider than the narrowest and on its multiples
    where a config allows (the pipelined EVEN_K loop); where none does, the table-driven loop,
    which the pipeliner does not take, with num_stages 1. `checked=False`: before the table's
    verdict (what the check compiles to write it)."""
    if INTERPRET and arch is None:
        return [dict(INTERPRETER_CONFIG)]
    arch = arch or device_arch(device)
    elem = 4 if "-prologue" in variant or variant.endswith("weight-only") else 1   # bytes of an A element
    # a real device's own limit; the arch's when the check asks for one
    limit = shared_memory(device) if torch.device(device).type == "cuda" else codegen_limit(arch) if arch else \
        shared_memory(device)
    bounds = tuple(bounds) if bounds is not None else (0, k)
    segmented = len(bounds) > 2
    min_m = 64 if arch == "sm_90" else 16     # wgmma's tile is 64 rows a warpgroup: smaller ones fall back to mma.sync
    fits = [(i, c) for i, c in enumerate(CONFIGS) if c["BLOCK_K"] >= MIN_DOT_K and
            (c["BLOCK_M"] * c["BLOCK_K"] * elem + c["BLOCK_K"] * c["BLOCK_N"]) * c["num_stages"] <= limit]
    even = [(i, c) for i, c in fits if all(b % c["BLOCK_K"] == 0 for b in bounds)]
    out = even or [(i, dict(c, num_stages=1)) for i, c in fits]
    if arch and checked:
        passed, single = checked_configs(variant, segmented, bool(even), arch)
        if passed is not None:
            out = [(i, c) for i, c in out if i in passed] or \
                [(i, dict(c, num_stages=1)) for i, c in out if i in single]
            if not out:
                raise RuntimeError(f"segquant: codegen-check passed no config for "
                                   f"{codegen_case(variant, segmented, bool(even))} on {arch}")
    # no tile much larger than the problem; where every checked one is, the smallest of them
    sized = [(i, c) for i, c in out if not m or (c["BLOCK_M"] <= max(min_m, autotune.m_bucket(m))
                                                 and c["BLOCK_N"] <= max(32, n * 2))]
    if not sized and out:
        area = min(c["BLOCK_M"] * c["BLOCK_N"] for _, c in out)
        sized = [(i, c) for i, c in out if c["BLOCK_M"] * c["BLOCK_N"] == area]
    return [dict(c) for _, c in sized] or [dict(CONFIGS[-1])]


def codegen_limit(arch: str) -> int:
    """Shared memory one block may opt into on this arch (bytes); unknown archs: sm_89's."""
    return ARCH_SHARED.get(arch, ARCH_SHARED["sm_89"])
