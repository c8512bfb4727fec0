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

    def conv(codes, pixel, kernel=(3, 3), channels=(320, 320)):
        geometry = ConvGeometry(sum(channels), kernel, (1, 1), (kernel[0] // 2, kernel[1] // 2))
        kk, n_out = sum(channels) * geometry.taps, 320
        bounds = (0, kk) if len(codes) == 1 else (0, channels[0] * geometry.taps, kk)   # a skip concatenation

        def run(cfg, calls):
            # the int8 input channels-last, as the dynamic path's quantization writes it
            x = torch.zeros(1, sum(channels), 64, 64, dtype=torch.int8).to(memory_format=torch.channels_last)
            d = torch.ones((1, len(codes), 64, 64) if pixel else (1, len(codes)))
            zp = torch.zeros_like(d) if 2 in codes else None
            colsum = torch.zeros(len(codes), n_out, dtype=torch.int32) if 2 in codes and not pixel else None
            kernel_name = "segquant_conv_pixel_kernel" if pixel else "segquant_conv_kernel"
            with _recording(triton_conv, kernel_name, calls):
                triton_conv.launch(x, d, d, k_major(torch.zeros(kk, n_out, dtype=torch.int8)), torch.ones(n_out),
                                   torch.ones(n_out), bounds, codes, geometry, torch.bfloat16, zp=zp, colsum=colsum,
                                   config=cfg)
        return Case("conv", triton_conv.variant(geometry, codes, pixel), kk,
                    triton_conv.prune_bounds(bounds, geometry, pixel), run)

    def w4a8(codes, lr=False, kk=k):
        groups = tuple(range(0, kk, 128)) + (kk,)     # a last group shorter than 128 where K is not a multiple

        def run(cfg, calls):
            down, l2 = branch(m) if lr else (None, None)
            d = torch.ones(m, len(codes))
            zp = torch.zeros_like(d) if 2 in codes else None
            colsum = torch.zeros(len(groups) - 1, n, dtype=torch.int32) if 2 in codes else None
            segments = (0, groups[len(groups) // 2], kk) if len(codes) == 2 else (0, kk)
            with _recording(triton_formats, "w4a8_kernel", calls):
                triton_formats.launch_w4(torch.zeros(m, kk, dtype=torch.int8), d, d,
                                         torch.zeros((kk + 1) // 2, n, dtype=torch.int8),
                                         torch.ones(len(groups) - 1, n), torch.ones(n), segments, groups, codes,
                                         torch.bfloat16, zp=zp, colsum=colsum, config=cfg, lr=down, l2=l2)
        return Case("w4a8", variant_name("w4a8", 1 in codes, False, 2 in codes, lr), kk, groups, run)

    def weight_only(bits, kk=k):
        groups = (tuple(range(0, kk, 128)) + (kk,)) if bits == 4 else (0, kk)

        def run(cfg, calls):
            w = torch.zeros(kk if bits == 8 else (kk + 1) // 2, n, dtype=torch.int8)
            d_w = torch.ones(n) if bits == 8 else torch.ones(len(groups) - 1, n)
            with _recording(triton_formats, "weight_only_kernel", calls):
                triton_formats.launch_weight_only(torch.zeros(m, kk, dtype=torch.bfloat16), w, d_w, torch.ones(n),
                                                  groups, bits, torch.bfloat16, config=cfg)
        return Case("weight-only", f"int{bits}-weight-only", kk, groups, run)

    # Every variant the launchers accept (launchable_variants), each on segments whose bounds sit
    # on BLOCK_K multiples (the pipelined EVEN_K loop) and on segments that do not, on odd
    # columns (the table-driven loop with the narrowest A loads): one segment or group per scheme
    # the variant holds, at least two (a one-segment launch takes its segmented case's configs).
    # Odd bounds: K 1001 = 40 + 61 + 900 (the table-driven loop's unaligned A rows).
    odd = (0, 40, 101, 1001)
    out = []
    for v in launchable_variants():
        if v.kernel == "gemm":   # 24 heads of 64 / DualScale or asymmetric halves / both beside a plain one
            codes, bounds = {(False, False): ((0,) * 24, heads), (True, False): ((1, 0), halves),
                             (False, True): ((2, 0), halves), (True, True): ((1, 2, 0), (0, 512, 1024, k))}[v.dual, v.asym]
            out.append(gemm(codes, bounds, v.fmt, v.prologue, lr=v.lr))
            out.append(gemm((codes + (0, 0))[:3], odd, v.fmt, v.prologue, kk=odd[-1], lr=v.lr))
        elif v.kernel == "conv":
            codes = (1 if v.dual else 0, 2 if v.asym else 0)
            shape = (3, 3) if v.tag == "conv3x3s1" else (1, 1)
            out.append(conv(codes, v.pixel, shape))
            out.append(conv(codes, v.pixel, shape, channels=(20, 27)))   # 180 + 243 columns at 3x3
        elif v.kernel == "w4a8":
            codes = (1 if v.dual else 0, 2 if v.asym else 0)
            out.append(w4a8(codes, v.lr))
            out.append(w4a8(codes, v.lr, kk=1000))
        else:
            out.append(weight_only(v.bits))
            out.append(weight_only(v.bits, kk=1001 if v.bits == 8 else 1000))
    # one segment (the unsegmented K loop) where the pruner's table keeps its own, wider list
    out += [gemm((0,), (0, k)), gemm((1,), (0, k)), gemm((0,), (0, k), prologue=True), gemm((0,), (0, k), fmt="fp8"),
            gemm((0,), (0, k), lr=True), gemm((0,), (0, k), prologue=True, lr=True),
            gemm((0,), (0, k), fmt="fp8", lr=True), conv((0,), False), conv((0,), True)]
    return out


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel variant as the launchers' argument checks allow it."""
    kernel: str                 # gemm | conv | w4a8 | weight-only
    fmt: str = "int8"
    dual: bool = False
    asym: bool = False
    prologue: bool = False
    lr: bool = False
    tag: str = ""               # conv: the geometry's tag (the check compiles a 3x3 and a 1x1 conv)
    bits: int = 8               # weight-only
    pixel: bool = False         # conv: steps per input pixel (the dynamic conv's kernel)

    @property
    def segmented(self) -> bool:
        """Whether its K loop may flush inside (int8 weight-only has one step per column: never)."""
        return not (self.kernel == "weight-only" and self.bits == 8)

    @property
    def name(self) -> str:
        from .site_lowering import variant_name
        if self.kernel == "weight-only":
            return f"int{self.bits}-weight-only"
        name = variant_name(self.fmt, self.dual, self.prologue, self.asym, self.lr)
        return f"{self.tag}-{name}" + ("-pixel" if self.pixel else "") if self.kernel == "conv" else name


def launchable_variants() -> list[Variant]:
    """What the launchers accept: the GEMM's int8 with DualScale, asymmetric segments (not in the
    quantize prologue), the prologue and the low-rank branch; its fp8 with DualScale and the
    branch; w4a8 with DualScale, asymmetric segments and the branch; the conv (3x3 and 1x1) with
    DualScale and asymmetric segments, static or with steps per input pixel; int8 and int4
    weight-only."""
    flags = [(d, a) for d in (False, True) for a in (False, True)]
    out = [Variant("gemm", "int8", d, a, p, lr) for d, a in flags for p in (False, True) for lr in (False, True)
           if not (a and p)]
    out += [Variant("gemm", "fp8", d, False, False, lr) for d in (False, True) for lr in (False, True)]
    out += [Variant("w4a8", "w4a8", d, a, False, lr) for d, a in flags for lr in (False, True)]
    out += [Variant("conv", "int8", d, a, tag=t, pixel=p) for t in ("conv3x3s1", "conv1x1s1") for d, a in flags
            for p in (False, True)]
    out += [Variant("weight-only", bits=b) for b in (8, 4)]
    return out


def configs(case: Case, arch: str, every: bool = False) -> list[dict]:
    """The configs the pruner can return for this case on this arch, whatever the problem's M
    and N (every: all CONFIGS that fit, before the table's verdict: what --write-table reads)."""
    from . import gemm_configs
    return gemm_configs.prune(0, 0, case.k, case.variant, "cpu", case.bounds, arch=arch, checked=not every)


def config_index(config: dict) -> int:
    from .gemm_configs import CONFIGS
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
    return next(i for i, c in enumerate(CONFIGS) if all(c[x] == config[x] for x in keys))
