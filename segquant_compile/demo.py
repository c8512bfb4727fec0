"""`segquant demo`: the main job on an embedded default model, everything measured in the run."""
from __future__ import annotations

import statistics
import time

import torch

from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs


def timed_runs(fn, warmup: int = 2, reps: int = 5) -> list[float]:
    """Seconds of each of `reps` calls of fn (no grad), after `warmup` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def median_seconds(fn, warmup: int = 2, reps: int = 5) -> float:
    return statistics.median(timed_runs(fn, warmup, reps))


def run(model_name: str = "sd3", activations: str = "static", save: list[str] | None = None) -> dict:
    import segquant_compile as sq
    from segquant_compile.lowering.quantize import sqnr_db
    torch._dynamo.config.cache_size_limit = 64
    if model_name == "mnist":
        return run_mnist(save)
    model = demo_sd3()
    x = sd3_inputs(model, seed=0)
    report = sq.explain(model, **x)
    print(f"model: SD3-style MMDiT, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{x['hidden_states'].shape[-1] ** 2 // 4} image + 77 text tokens")
    print("plan:", report.summary())
    with torch.no_grad():
        ref = model(**x).sample
    t0 = time.perf_counter()
    fp32 = torch.compile(model, backend="inductor")
    t_fp32 = median_seconds(lambda: fp32(**x))
    compile_fp32 = time.perf_counter() - t0
    # bfloat16 is the peer a user would pick: its own copy of the model and inputs
    import copy
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x_bf16 = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    bf16 = torch.compile(model_bf16, backend="inductor")
    t_bf16 = median_seconds(lambda: bf16(**x_bf16))
    with torch.no_grad():
        db_bf16 = sqnr_db(ref, bf16(**x_bf16).sample.float())
    t0 = time.perf_counter()
    quant = torch.compile(model, backend="segquant", options={"activations": activations})
    if activations == "static":
        with torch.no_grad(), sq.calibrate(quant):
            for s in range(1, 5):
                quant(**sd3_inputs(model, seed=s))
    with torch.no_grad():
        out = quant(**x).sample
    setup = time.perf_counter() - t0
    t_quant = median_seconds(lambda: quant(**x))
    db = sqnr_db(ref, out)
    result = {"sqnr_db": db, "float_inductor_s": t_fp32, "bf16_inductor_s": t_bf16, "bf16_sqnr_db": db_bf16,
              "segquant_s": t_quant, "speedup": t_fp32 / t_quant, "speedup_vs_bf16": t_bf16 / t_quant,
              "compile_float_s": compile_fp32, "compile_calibrate_segquant_s": setup}
    print(f"output SQNR against float32: segquant {db:.1f} dB ({activations} W8A8, SegLinear + DualScale); "
          f"Inductor bfloat16 {db_bf16:.1f} dB")
    print(f"forward time: torch.compile float32 {t_fp32 * 1e3:.0f} ms, bfloat16 {t_bf16 * 1e3:.0f} ms, segquant "
          f"{t_quant * 1e3:.0f} ms ({result['speedup']:.2f}x vs float32, {result['speedup_vs_bf16']:.2f}x vs "
          f"bfloat16)   [median of 5 after warm-up, {torch.get_num_threads()} threads]")
    print(f"setup: float compile {compile_fp32:.0f} s; segquant compile + calibration {setup:.0f} s")
    final = sq.report(quant)
    for path in save or ():
        print(f"wrote {final.save(path)}")
    return result


def run_mnist(save) -> dict:
    import segquant_compile as sq
    from segquant_compile.examples import mnist_dit as md
    net, clf = md.load_dit(), md.load_classifier()
    labels = torch.arange(100) % 10
    print("model: the MNIST DiT of ../shared/data (real weights), 100 samples, 18 Heun steps")
    print("plan:", sq.explain(net, torch.randn(2, 1, 28, 28), torch.zeros(2), labels[:2]).summary())
    ref = md.sample(net, labels, seed=0)
    compiled = torch.compile(net, backend="segquant", options={"activations": "static"})
    with sq.calibrate(compiled):
        for run_ in range(20):
            md.sample(compiled, torch.arange(10), seed=1000 + run_)
    out = md.sample(compiled, labels, seed=0)
    psnr = float(10 * torch.log10(4 / (ref - out).pow(2).mean()))
    result = {"psnr_db": psnr, "acc_float": md.accuracy(clf, ref, labels), "acc_segquant": md.accuracy(clf, out, labels)}
    print(f"samples against float: PSNR {psnr:.1f} dB; classifier accuracy float {result['acc_float']:.0%}, "
          f"segquant {result['acc_segquant']:.0%}")
    for path in save or ():
        print(f"wrote {sq.report(compiled).save(path)}")
    return result
