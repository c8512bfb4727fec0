"""The GPU code of every Triton kernel the project can launch, checked on a machine without a GPU:
each kernel is compiled with `triton.compile` for an NVIDIA target (sm_80, sm_89, sm_90) with the
specialization a real launch gets, and the PTX and the wheel's `ptxas -v` say whether it uses
tensor cores, is software-pipelined, spills registers and fits the arch's shared memory.

    rows = check(["sm_90"])            # one dict per (kernel, variant, config, arch)
    `segquant codegen-check --arch sm_80,sm_89,sm_90 --json F`

The specialization is the one the launchers produce: each case calls the real launcher on CPU
tensors with the kernel replaced by a recorder, and the recorded arguments go through Triton's
own specializer (pointers and integers divisible by 16 are marked so, integers equal to 1 become
constants). lowering/gemm_configs.py's pruner offers only the configs this check passes.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from .codegen_cases import Case, cases, config_index, configs
from .gemm_configs import FP8_ARCHS

ARCHS = ("sm_80", "sm_89", "sm_90")


def _specialize(value):
    """(type, specialization) of one argument, as the JIT computes it."""
    try:
        from triton._C.libtriton import native_specialize_impl    # triton >= 3.5
        from triton.backends.compiler import BaseBackend
        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:   # the JIT's rule, written out
        if isinstance(value, torch.Tensor):
            from triton.runtime.jit import mangle_type
            return mangle_type(value), "D" if value.data_ptr() % 16 == 0 else ""
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            return ("constexpr", 1) if value == 1 else ("i32", "D" if value % 16 == 0 else "")
        if value is None:
            return "constexpr", None
        return "fp32", None


def source(fn, args, kwargs):
    """ASTSource arguments and compile options of one recorded launch."""
    from triton.backends.compiler import BaseBackend
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, spec = _specialize(v)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _ptxas(ptx: str, cap: int, fp_fusion: bool = True) -> dict:
    """Registers and spill bytes from the wheel's ptxas, run with the flags Triton's own cubin
    build passes (triton 3.7 backends/nvidia/compiler.py make_cubin)."""
    import triton
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{cap}" + ("a" if cap == 90 else "")      # wgmma needs the arch-specific sm_90a
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"] + ([] if fp_fusion else ["--fmad=false"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(exe), *flags, f"--gpu-name={arch}", str(path), "-o", os.devnull],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(log.strip()[-400:])
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": max(spills, default=0)}


def _mma(ptx: str) -> str | None:
    """The tensor-core instruction the kernel's dots use, with its operand type."""
    m = re.search(r"\bwgmma\.mma_async\.[\w.]*?\.(s8|e4m3|e5m2|bf16|f16|tf32)", ptx)
    if m:
        return f"wgmma.{m.group(1)}"
    m = re.search(r"\bmma\.sync\.aligned\.[\w.]*?\.(s8|e4m3|e5m2|bf16|f16|tf32)", ptx)
    return f"mma.sync.{m.group(1)}" if m else None


def _stages(ttgir: str) -> int:
    """Buffers of the deepest multi-buffered shared-memory tile: the pipeliner's stages (a
    kernel whose loads are not pipelined keeps one, or allocates none)."""
    depth = [int(d) for d in re.findall(r"ttg\.local_alloc[^\n]*?!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depth, default=1)


def _sync_tile_loads(ttgir: str) -> int:
    """2-D loads left synchronous (a conv's byte-wise im2col gather: no async copy takes it)."""
    return len(re.findall(r"= tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr", ttgir))


def epilogue_tile_loads(row: dict) -> int:
    """2-D loads a kernel makes once after its K loop, synchronous by nature (counted in
    sync_tile_loads, not against the K loop's pipelining): the low-rank branch's lr and L2 tiles
    (one rank chunk, as the check compiles it), or in the prologue kernel the L2 tile only (its
    x @ L1 reads the K loop's x tiles and L1 tiles, async like the others)."""
    if not row["variant"].endswith("-lr"):
        return 0
    return 1 if "-prologue" in row["variant"] else 2


def compile_row(case: Case, config: dict, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from .gemm_configs import codegen_limit
    cap, limit = int(arch[3:]), codegen_limit(arch)
    row = {"kernel": case.kernel, "variant": case.variant, "arch": arch,
           "config": {k: config[k] for k in sorted(config)}, "compiled": False, "error": None, "mma": None,
           "pipelined": False, "stages": 0, "async_copies": None, "sync_tile_loads": None, "registers": None, "spill_bytes": None,
           "shared_bytes": None, "shared_limit": limit}
    calls = []
    case.run(config, calls)
    fn, args, kwargs = calls[0]
    signature, constexprs, attrs, options = source(fn, args, kwargs)
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                           options=options)
        ptx = k.asm["ptx"]
        row.update(_ptxas(ptx, cap, options.get("enable_fp_fusion", True)))
    except Exception as e:    # the row says why; the check fails on it
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"
        return row
    tma = "cp.async.bulk" in ptx
    row.update(compiled=True, mma=_mma(ptx), shared_bytes=int(k.metadata.shared),
               async_copies="tma" if tma else ("cp.async" if "cp.async" in ptx else None),
               stages=_stages(k.asm["ttgir"]), sync_tile_loads=_sync_tile_loads(k.asm["ttgir"]))
    row["pipelined"] = row["async_copies"] is not None and row["stages"] >= 2
    return row


def problems(row: dict) -> list[str]:
    """What makes a row fail the check (empty: it passes)."""
    if not row["compiled"]:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["mma"] is None:
        out.append("no tensor-core instruction")
    if row["arch"] == "sm_90" and row["mma"] and not row["mma"].startswith("wgmma"):
        out.append(f"{row['mma']} instead of wgmma on sm_90")
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} bytes")
    if row["config"].get("num_stages", 1) >= 2 and not row["pipelined"]:
        out.append(f"not pipelined ({row['stages']} stage(s), async copies: {row['async_copies']})")
    if row["shared_bytes"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared_bytes']} > {row['shared_limit']}")
    return out


def check(archs=ARCHS, every: bool = False, kernels=None, progress=None, jobs: int = 1,
          first: bool = False, names=None) -> list[dict]:
    """One row per (case, config, arch), in that order; `jobs` processes compile in parallel;
    `first`: only the first config the pruner offers per case (a quick check)."""
    from . import triton_gemm
    if not hasattr(triton_gemm.segquant_gemm_kernel, "params"):
        raise RuntimeError("segquant codegen-check compiles for a GPU: run it without TRITON_INTERPRET=1")
    tasks = [(arch, i, cfg) for arch in archs for i, case in enumerate(cases())
             if (not kernels or case.kernel in kernels) and (not names or any(n in case.name for n in names)) and (arch in FP8_ARCHS or not case.variant.startswith("fp8"))
             for cfg in configs(case, arch, every)[: 1 if first else None]]
    if jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.imap(_task, tasks)
            return [_report(r, progress) for r in results]
    return [_report(_task(t), progress) for t in tasks]


def _task(task) -> dict:
    arch, i, cfg = task
    case = cases()[i]
    row = compile_row(case, cfg, arch)
    row["case"], row["config_index"] = case.name, config_index(cfg)
    row["problems"] = problems(row)
    return row


def _report(row, progress):
    if progress:
        progress(row)
    return row


def table(rows: list[dict], single_rows: list[dict] | None = None) -> dict:
    """The pruner's table (gemm_configs.CODEGEN_TABLE) from a check over every config: per arch and
    case, the CONFIGS indices that pass. A case where none pipelines (a conv's byte-wise im2col
    gather of int8 input on sm_90: no async copy takes it, so the pipeliner leaves the loop)
    keeps the configs that pass all else under "single_stage": the pruner runs them with
    num_stages 1, a different compile, so only those that pass compiled so (`single_rows`,
    single_stage_rows) are kept."""
    ok = None if single_rows is None else {(r["arch"], r["case"], r["config_index"]) for r in single_rows
                                           if not r["problems"]}
    out: dict = {}
    for (arch, case), rs in _groups(rows, ("arch", "case")).items():
        passed = [r["config_index"] for r in rs if not r["problems"]]
        entry = out.setdefault(arch, {})
        entry[case] = passed
        if not passed:
            entry[case + ":single_stage"] = [r["config_index"] for r in rs
                                             if all(p.startswith("not pipelined") for p in r["problems"])
                                             and (ok is None or (arch, case, r["config_index"]) in ok)]
    return {"archs": out}


def single_stage_rows(t: dict, jobs: int = 1) -> list[dict]:
    """The `:single_stage` configs of a table compiled as the pruner runs them, with num_stages 1."""
    from .gemm_configs import CONFIGS
    index = {c.name: i for i, c in enumerate(cases())}
    tasks = [(arch, index[name.removesuffix(":single_stage")], dict(CONFIGS[j], num_stages=1))
             for arch, entry in sorted(t["archs"].items()) for name, js in sorted(entry.items())
             if name.endswith(":single_stage") for j in js]
    if jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return list(pool.imap(_task, tasks))
    return [_task(x) for x in tasks]


def table_json(t: dict) -> str:
    """The table as JSON with a case a line."""
    import json
    archs = ",\n".join(f'  "{a}": {{\n' + ",\n".join(f'   "{c}": {json.dumps(v)}' for c, v in sorted(cases.items()))
                        + "\n  }" for a, cases in sorted(t["archs"].items()))
    return '{"archs": {\n' + archs + "\n}}\n"


def _groups(rows, keys) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def summary(rows: list[dict]) -> str:
    """One line per (arch, kernel variant): configs compiled, spilling, pipelined, mma kind."""
    lines = [f"{'arch':6} {'case':42} {'cfgs':>4} {'ok':>3} {'comp':>4} {'spill':>5} "
             f"{'pipe':>4} {'regs':>8} mma"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r.get("case", r["kernel"] + ":" + r["variant"])), []).append(r)
    for (arch, case), rs in groups.items():
        regs = [r["registers"] for r in rs if r["registers"] is not None]
        mma = sorted({r["mma"] or "-" for r in rs if r["compiled"]})
        lines.append(f"{arch:6} {case:42} {len(rs):4d} {sum(not r['problems'] for r in rs):3d} "
                     f"{sum(r['compiled'] for r in rs):4d} {sum(bool(r['spill_bytes']) for r in rs):5d} "
                     f"{sum(r['pipelined'] for r in rs):4d} {(f'{min(regs)}-{max(regs)}' if regs else '-'):>8} "
                     f"{','.join(mma)}")
    return "\n".join(lines)


def arch_summary(rows: list[dict]) -> str:
    """One line per arch: rows, compiled, spilling, pipelined with both tiles' loads async (of
    the rows asking for stages), the largest shared memory, tensor-core instructions, failing."""
    lines = []
    for (arch,), rs in sorted(_groups(rows, ("arch",)).items()):
        asked = [r for r in rs if r["config"].get("num_stages", 1) >= 2]
        both = sum(r["pipelined"] and r["sync_tile_loads"] == epilogue_tile_loads(r) for r in asked)
        lines.append(f"{arch}: {len(rs)} rows, {sum(r['compiled'] for r in rs)} compiled, "
                     f"{sum(bool(r['spill_bytes']) for r in rs)} spilling, "
                     f"{sum(r['pipelined'] for r in asked)} pipelined ({both} with both tiles async) of {len(asked)} "
                     f"asking for stages, shared memory up to {max((r['shared_bytes'] or 0) for r in rs)} B, "
                     f"mma {','.join(sorted({r['mma'] for r in rs if r['mma']}))}, "
                     f"{sum(bool(r['problems']) for r in rs)} failing")
    return "\n".join(lines)


def run(archs, json_path=None, every: bool = False, write_table: bool = False, jobs: int = 1,
        verbose: bool = False, first: bool = False) -> int:
    """`segquant codegen-check`: the summary on stdout, rows to JSON; exit status 1 where a row
    fails (every: the candidates before the table's verdict; write_table: the pruner's table)."""
    import json
    unknown = set(archs) - set(ARCHS)
    if unknown:
        raise ValueError(f"codegen-check: unknown arch {sorted(unknown)}; known: {', '.join(ARCHS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("codegen-check compiles for a GPU: unset TRITON_INTERPRET")
    def progress(r):
        print(f"{r['arch']} {r['case']} #{r['config_index']}: {'; '.join(r['problems']) or 'ok'}", flush=True)
    rows = check(archs, every=every, jobs=jobs, progress=progress if verbose else None, first=first)
    print(summary(rows))
    print(arch_summary(rows))
    bad = [r for r in rows if r["problems"]]
    for r in bad if not every else ():
        print(f"FAIL {r['arch']} {r['case']} {r['config']}: {'; '.join(r['problems'])}")
    if json_path:
        Path(json_path).write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")   # a row a line
        print(f"wrote {json_path}")
    if write_table:
        from .gemm_configs import CODEGEN_TABLE
        CODEGEN_TABLE.write_text(table_json(table(rows, single_stage_rows(table(rows), jobs))))
        print(f"wrote {CODEGEN_TABLE}")
    return 1 if bad and not every else 0
