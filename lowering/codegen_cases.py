"""What `segquant codegen-check` compiles: every kernel variant the launchers can start (a Case),
on the segments real sites have, each run through its real launcher on CPU tensors with the
kernel replaced by a recorder, so the check compiles the very arguments (layouts included) a
launch passes; and the configs the pruner can offer for it on an arch.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel variant as a launcher runs it on a site's shape: `run(config, calls)` calls the
    launcher with bounds `bounds` (K segments; w4a8 and weight-only: weight groups)."""
    kernel: str
    variant: str          # the launcher's variant (its autotune key), site_lowering.variant_name
    k: int
    bounds: tuple
    run: object

    @property
    def name(self) -> str:
        """The pruner's table key (gemm_configs.codegen_case)."""
        from .gemm_configs import codegen_case
        even = any(all(b % c["BLOCK_K"] == 0 for b in self.bounds) for c in _configs())
        return codegen_case(self.variant, len(self.bounds) > 2, even)


def _configs():
    from .gemm_configs import CONFIGS
    return CONFIGS


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(module, name, calls):
    fn = getattr(module, name)
    setattr(module, name, _Recorder(fn, calls))
    try:
        yield
    finally:
        setattr(module, name, fn)


def cases() -> list[Case]:
    """Every kernel variant the launchers can start (site_lowering.variant_name names them), on
    the segments real sites have: 24 head segments of 64 (attention's to_out), DualScale beside
    plain segments, asymmetric segments, a site whose segments are not on 16-column multiples,
    convs over a skip concatenation, 4-bit weights in groups of 128; each GEMM and w4a8 variant
    again with a low-rank branch (`-lr`)."""
    from . import triton_conv, triton_formats, triton_gemm
    from .quantize import k_major   # 8-bit weights as packed for CUDA (quantize.packed_layout)
    from .site_lowering import ConvGeometry, variant_name
    m, n, k = 4096, 1536, 1536
    heads, halves = tuple(range(0, k + 1, 64)), (0, 768, k)

    rank = triton_gemm.BRANCH_RANK

    def branch(rows):
        """SVDQuant's branch in bf16 (a diffusion model's dtype): lr [rows, r] (prologue: l1
        [K, r]) and l2 [r, N]."""
        return torch.zeros(rows, rank, dtype=torch.bfloat16), torch.zeros(rank, n, dtype=torch.bfloat16)

    def gemm(codes, bounds, fmt="int8", prologue=False, kk=k, lr=False):
        variant = variant_name(fmt, 1 in codes, prologue, 2 in codes, lr)

        def run(cfg, calls):
            down, l2 = branch(kk if prologue else m) if lr else (None, None)
            if fmt == "fp8":
                a = torch.zeros(m, kk, dtype=torch.float8_e4m3fn)
                w = k_major(torch.zeros(kk, n, dtype=torch.float8_e4m3fn))
            else:   # float x with the prologue: fp32, or bf16 with the branch (its x @ L1 on tensor cores)
                a = torch.zeros(m, kk, dtype=(torch.bfloat16 if lr else torch.float32) if prologue else torch.int8)
                w = k_major(torch.zeros(kk, n, dtype=torch.int8))
            d = torch.ones(1 if prologue else m, len(codes))
            zp = torch.zeros_like(d) if 2 in codes else None
            colsum = torch.zeros(len(codes), n, dtype=torch.int32) if 2 in codes else None
            with _recording(triton_gemm, "segquant_gemm_kernel", calls):
                triton_gemm.launch(a, d, d, w, torch.ones(n), torch.ones(n, dtype=torch.bfloat16), bounds, codes,
                                   torch.bfloat16, smooth=torch.ones(kk) if prologue else None, prologue=prologue,
                                   config=cfg, zp=zp, colsum=colsum, lr=None if prologue else down, l2=l2,
                                   l1=down if prologue else None)
        return Case("gemm", variant, kk, tuple(bounds), run)

    def conv(codes, prologue, kernel=(3, 3)):
        geometry = ConvGeometry(640, kernel, (1, 1), (kernel[0] // 2, kernel[1] // 2))
        kk = 640 * geometry.taps
        bounds = (0, kk) if len(codes) == 1 else (0, 320 * geometry.taps, kk)   # a skip concatenation

        def run(cfg, calls):
            x = torch.zeros(1, 640, 64, 64, dtype=torch.float32 if prologue else torch.int8)
            d = torch.ones(64 * 64 if prologue else 1, len(codes))
            zp = torch.zeros_like(d) if 2 in codes else None
            colsum = torch.zeros(len(codes), 320, dtype=torch.int32) if 2 in codes else None
            with _recording(triton_conv, "segquant_conv_kernel", calls):
                triton_conv.launch(x, d, d, k_major(torch.zeros(kk, 320, dtype=torch.int8)), torch.ones(320), None, bounds,
                                   codes, geometry, torch.bfloat16, zp=zp, colsum=colsum, config=cfg)
        return Case("conv", triton_conv.variant(geometry, codes, prologue), kk, bounds, run)

    def w4a8(codes, lr=False):
        groups = tuple(range(0, k + 1, 128))

        def run(cfg, calls):
            down, l2 = branch(m) if lr else (None, None)
            d = torch.ones(m, len(codes))
            zp = torch.zeros_like(d) if 2 in codes else None
            colsum = torch.zeros(len(groups) - 1, n, dtype=torch.int32) if 2 in codes else None
            with _recording(triton_formats, "w4a8_kernel", calls):
                triton_formats.launch_w4(torch.zeros(m, k, dtype=torch.int8), d, d,
                                         torch.zeros(k // 2, n, dtype=torch.int8), torch.ones(len(groups) - 1, n),
                                         None, halves if len(codes) == 2 else (0, k), groups, codes,
                                         torch.bfloat16, zp=zp, colsum=colsum, config=cfg, lr=down, l2=l2)
        return Case("w4a8", variant_name("w4a8", 1 in codes, False, 2 in codes, lr), k, groups, run)

    def weight_only(bits):
        groups = tuple(range(0, k + 1, 128)) if bits == 4 else (0, k)

        def run(cfg, calls):
            w = torch.zeros(k if bits == 8 else k // 2, n, dtype=torch.int8)
            d_w = torch.ones(n) if bits == 8 else torch.ones(len(groups) - 1, n)
            with _recording(triton_formats, "weight_only_kernel", calls):
                triton_formats.launch_weight_only(torch.zeros(m, k, dtype=torch.bfloat16), w, d_w, None, groups,
                                                  bits, torch.bfloat16, config=cfg)
        return Case("weight-only", f"int{bits}-weight-only", k, groups, run)

    return [
        gemm((0,), (0, k)), gemm((0,) * 24, heads), gemm((1,), (0, k)), gemm((1, 0), halves),
        gemm((2, 0), halves), gemm((0, 0, 0), (0, 40, 100, 1000), kk=1000),
        gemm((0,), (0, k), prologue=True), gemm((0,) * 24, heads, prologue=True), gemm((1, 0), halves, prologue=True),
        gemm((0,), (0, k), fmt="fp8"), gemm((1, 0), halves, fmt="fp8"),
        conv((0, 0), False), conv((1, 0), False), conv((2, 0), False), conv((0,), True), conv((1, 2), True),
        conv((0, 0), True, (1, 1)),
        w4a8((0,)), w4a8((1, 0)), w4a8((1, 2)), weight_only(8), weight_only(4),
        # SVDQuant's low-rank branch of rank BRANCH_RANK: the up-projection in the epilogue, and
        # in the prologue kernel the down-projection's [BLOCK_M, 32] fp32 sum alive in the K loop
        gemm((0,), (0, k), lr=True), gemm((0,) * 24, heads, lr=True), gemm((1, 0), halves, lr=True),
        gemm((2, 0), halves, lr=True), gemm((0, 0, 0), (0, 40, 100, 1000), kk=1000, lr=True),
        gemm((0,), (0, k), prologue=True, lr=True), gemm((0,) * 24, heads, prologue=True, lr=True),
        gemm((1, 0), halves, prologue=True, lr=True),
        gemm((0,), (0, k), fmt="fp8", lr=True), gemm((1, 0), halves, fmt="fp8", lr=True),
        w4a8((0,), lr=True), w4a8((1, 0), lr=True), w4a8((1, 2), lr=True),
    ]


def configs(case: Case, arch: str, every: bool = False) -> list[dict]:
    """The configs the pruner can return for this case on this arch, whatever the problem's M
    and N (every: all CONFIGS that fit, before the table's verdict: what --write-table reads)."""
    from . import gemm_configs
    return gemm_configs.prune(0, 0, case.k, case.variant, "cpu", case.bounds, arch=arch, checked=not every)


def config_index(config: dict) -> int:
    from .gemm_configs import CONFIGS
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
    return next(i for i, c in enumerate(CONFIGS) if all(c[x] == config[x] for x in keys))
