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
