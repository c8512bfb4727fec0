"""GPU end to end (`pytest -m gpu` on a machine with CUDA; CI has none and deselects them).
The kernel tests of test_triton_gemm.py also run on the device when CUDA is present."""
import pytest
import torch

from conftest import tiny_sd3, tiny_sd3_inputs
from segquant_compile.lowering.quantize import sqnr_db

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_tiny_sd3_on_gpu(mode, activations):
    import segquant_compile as sq
    model = tiny_sd3().cuda().to(torch.bfloat16)
    x = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()
         for k, v in tiny_sd3_inputs(batch=2).items()}
    with torch.no_grad():
        ref = model(**x).sample
        options = {"activations": activations, **({"mode": mode} if mode else {})}
        compiled = torch.compile(model, backend="segquant", options=options)
        if activations == "static":
            with sq.calibrate(compiled, progress=False):
                for s in range(4):
                    compiled(**{k: v + 0.01 * s if v.is_floating_point() else v for k, v in x.items()})
        for _ in range(3):          # warm-up, capture, replay
            out = compiled(**x).sample
    assert sqnr_db(ref.float(), out.float()) > 25


@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_unet_convs_on_gpu(activations, channels_last):
    """Conv sites through the Triton implicit-GEMM kernel (NCHW and channels-last inputs)."""
    import segquant_compile as sq
    from conftest import output, tiny_inputs, tiny_unet
    model = tiny_unet().cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = {k: v.cuda() for k, v in tiny_inputs(model).items()}
    x["sample"] = x["sample"].to(memory_format=fmt)
    with torch.no_grad():
        ref = output(model(**x))
        compiled = torch.compile(model, backend="segquant", options={"activations": activations})
        if activations == "static":
            with sq.calibrate(compiled, progress=False):
                for s in range(4):
                    compiled(**{k: v + 0.01 * s if v.is_floating_point() else v for k, v in x.items()})
        out = output(compiled(**x))
    assert sqnr_db(ref.float(), out.float()) > (30 if activations == "dynamic" else 25)
    assert sq.report(compiled).totals()["conv_sites"] == 33


@pytest.mark.parametrize("budget", [4 << 30, 0])
def test_calibration_statistics_on_the_gpu_within_the_budget(budget):
    """GPTQ Hessians and kept rows accumulate on the GPU (no per-call copy) within
    `calibration_device_bytes`, on the CPU beyond it; both calibrate to close steps."""
    import segquant_compile as sq
    from segquant_compile.compiled import find
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "weight_rounding": "gptq",
                                                                 "calibration_device_bytes": budget})
    seen = []
    with sq.calibrate(compiled, progress=False):
        for s in range(3):
            compiled(torch.randn(64, 256, device="cuda"))
        for st in find(compiled).quant_states:
            seen.append((st.stats.hessians[0].device.type, st.stats.kept.device.type))
    want = "cuda" if budget else "cpu"
    assert seen and all(h == r == want for h, r in seen), seen
    x = torch.randn(8, 256, device="cuda")
    assert sqnr_db(model(x).float(), compiled(x).float()) > 25


@pytest.mark.parametrize("fmt", ["int8", "w4a8"])
def test_low_rank_branch_on_gpu(fmt):
    """The low-rank branch in the Triton GEMM's epilogue (bf16 activations): close to the CPU's numbers."""
    import segquant_compile as sq  # noqa: F401
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    x = torch.randn(64, 256)
    outs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        torch._dynamo.reset()
        m = model.to(device, dtype)
        compiled = torch.compile(m, backend="segquant", options={"format": fmt, "low_rank": 16,
                                                                 "weight_rounding": "rtn"})
        outs[device] = compiled(x.to(device, dtype)).float().cpu()
    model.float()
    assert sqnr_db(outs["cpu"], outs["cuda"]) > 30
