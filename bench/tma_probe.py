"""Does Triton's TMA (tl.make_tensor_descriptor) or warp specialization (tl.range(...,
warp_specialize=True)) improve the plain int8 GEMM on sm_90 by codegen-check's measures? A
probe kernel (one segment, per-row steps, d_w, bias: the segquant plain int8 GEMM's math, with
the weight K-major as sites pack it for CUDA) is compiled for sm_90 beside the segquant
kernel's `gemm:int8` case in the same configs; per config: registers, spill bytes, pipelined
stages, shared memory, the tensor-core instruction, and whether the TTGIR holds a
warp-specialized region. Runs on CPU (no GPU), outside TRITON_INTERPRET:

    .venv/bin/python bench/tma_probe.py --configs 0,2,3
"""
from __future__ import annotations

import argparse
import re

import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from segquant_compile.lowering import codegen_check as C
from segquant_compile.lowering import codegen_cases, gemm_configs


@triton.jit
def tma_gemm(A, W, Y, DPOS, DW, BIAS, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_m
    pid_n = (pid % (GROUP_M * num_n)) // group_m
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES, warp_specialize=WS):
        acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k * BLOCK_K]), w_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T,
                     acc, out_dtype=tl.int32)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = acc.to(tl.float32) * tl.load(DPOS + rm, mask=rm < M, other=1.0)[:, None]
    y = y * tl.load(DW + rn, mask=rn < N, other=0.0)[None, :] + tl.load(BIAS + rn, mask=rn < N).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(tl.bfloat16), mask=(rm < M)[:, None] & (rn < N)[None, :])


def probe(cfg: dict, ws: bool):
    sig = {"A": "*i8", "W": "*i8", "Y": "*bf16", "DPOS": "*fp32", "DW": "*fp32", "BIAS": "*bf16", "M": "i32", "N": "i32",
           "K": "i32"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "STAGES", "WS"]
    values = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
                  STAGES=cfg["num_stages"], WS=ws)
    sig.update({k: "constexpr" for k in values})
    constexprs = {(names.index(k),): v for k, v in values.items()}
    attrs = {(i,): BaseBackend.parse_attr("D") for i in range(9)}     # a real launch's divisibility by 16
    return triton.compile(ASTSource(tma_gemm, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def measures(k) -> dict:
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    return {**C._ptxas(ptx, 90), "stages": C._stages(ttgir), "shared_bytes": int(k.metadata.shared),
            "mma": C._mma(ptx), "tma": "cp.async.bulk.tensor" in ptx, "cp.async": bool(re.search(r"cp\.async\.c[ga]", ptx)),
            "warp_specialized": "ttg.warp_specialize" in ttgir}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="0,2,3", help="CONFIGS indices (lowering/gemm_configs.py)")
    args = p.parse_args()
    case = next(c for c in codegen_cases.cases() if c.name == "gemm:int8")
    for i in map(int, args.configs.split(",")):
        cfg = dict(gemm_configs.CONFIGS[i])
        row = C.compile_row(case, cfg, "sm_90")
        print(f"#{i} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} stages {cfg['num_stages']} warps {cfg['num_warps']}")
        print("  segquant   ", {k: row[k] for k in ("registers", "spill_bytes", "stages", "shared_bytes", "mma",
                                                   "async_copies")})
        for ws in (False, True):
            print(f"  tma ws={ws!s:5}", measures(probe(cfg, ws)))


if __name__ == "__main__":
    main()
