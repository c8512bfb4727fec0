import contextlib
import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before any @triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses

from segquant_compile.config import Sites
from segquant_compile.examples import models
from segquant_compile.examples.mnist_dit import data_dir


def _set_default(cls, name, value):
    """Change one option group's field default (its generated __init__'s); returns the old one."""
    names = [f.name for f in dataclasses.fields(cls)]
    defaults = list(cls.__init__.__defaults__)
    old, defaults[names.index(name)] = defaults[names.index(name)], value
    cls.__init__.__defaults__ = tuple(defaults)
    return old


# The tiny models of these tests have K of 8 to 64 throughout: their tests are about quantizing
# sites, so they quantize every site (min_k=0). Tests marked `real_defaults` (the real models, the
# min_k rule itself) run with the shipped default.
MIN_K = _set_default(Sites, "min_k", 0)


@pytest.fixture(autouse=True)
def _real_defaults(request):
    if request.node.get_closest_marker("real_defaults") is None:
        yield
        return
    _set_default(Sites, "min_k", MIN_K)
    try:
        yield
    finally:
        _set_default(Sites, "min_k", 0)

SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
                qk_norm="rms_norm")


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3_TINY).eval()


def tiny_sd3_inputs(batch: int = 1, seed: int = 1, side: int = 8, tokens: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, tokens, 16, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g),
                timestep=torch.tensor([500.0] * batch))


@pytest.fixture(scope="session")
def meta_report():
    """explain() of a shipped full-size architecture on the meta device, once per session."""
    from segquant_compile import explain
    cache = {}

    def get(name, batch=1, **kw):
        key = (name, batch, tuple(sorted(kw.items())))
        if key not in cache:
            model = models.build(models.load_config(name), device="meta")
            cache[key] = explain(model, **models.example_inputs(model, batch=batch, **kw))
        return cache[key]
    return get


@pytest.fixture(scope="session")
def shared_data():
    path = data_dir()
    if not (path / "mnist_dit_edm" / "dit_edm_mnist.safetensors").exists():
        pytest.skip(f"shared test data not found at {path} (see ../shared/data/README.md)")
    return path


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=16, sample_size=8,
                                    patch_size=2, norm_type="ada_norm_single",
                                    use_additional_conditions=False).eval()


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8, sample_size=8, in_channels=4,
                                out_channels=4).eval()


class Two(torch.nn.Module):
    """Two linears with a GELU between them: the smallest model with a DualScale site."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


TINY = {"sd3": tiny_sd3, "flux": tiny_flux, "pixart": tiny_pixart, "unet": tiny_unet}


def tiny_inputs(model, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return models.example_inputs(model, batch=batch, resolution=64, text_tokens=5, generator=g)


def output(result):
    return result.sample if hasattr(result, "sample") else result[0]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every torch.compile(..., options=...) is a new backend to dynamo, i.e. a new cache entry
    per code object; tests compile the same tiny classes many times, so start each test clean
    (dynamo runs a model eagerly past its recompile limit)."""
    torch._dynamo.reset()
    yield


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    """torch's fused MultiheadAttention / TransformerEncoderLayer fast path on or off within the
    block (a process-wide switch: tests and mnist_vit set it)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def expected_site_gemms(report) -> int:
    """GEMM launches the report's quantized sites make on this CPU: one per conv site and per
    linear site in the fp32 form; in the int8 form (CPUs with VNNI/AMX) one `_int_mm` per K
    segment, two for a DualScale segment (lowering/cpu_linear.py)."""
    from segquant_compile.lowering.formats import Scheme
    n = 0
    for st in report.states.values():
        lo = st.lowering
        n += sum(2 if s is Scheme.DUALSCALE else 1 for s in lo.schemes) if lo.cpu_gemm == "int8" else 1
    return n


def site_gemm_calls(code: list[str]) -> int:
    """GEMM launches of quantized sites in Inductor output code: segquant ops (CUDA, fp8, convs) and,
    on CPU, the extern GEMMs Inductor attributes to a `quantized_linear` source node."""
    n = 0
    for c in code:
        lines = c.splitlines()
        n += sum(line.count(f"torch.ops.segquant.{op}.default(") for line in lines
                 for op in ("gemm", "gemm_prologue", "conv2d", "conv2d_dynamic"))
        n += sum(1 for prev, line in zip(lines, lines[1:])
                 if "quantized_linear" in prev and any(f"extern_kernels.{g}(" in line for g in ("addmm", "mm", "_int_mm")))
    return n
