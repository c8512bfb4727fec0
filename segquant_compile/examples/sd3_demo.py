"""The demo's model: an SD3-style MMDiT with random weights, and its inputs."""
from __future__ import annotations

import torch

# sized so that one CPU forward takes about a second and linears dominate
DEMO_SD3 = dict(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512,
                pooled_projection_dim=256, out_channels=16, pos_embed_max_size=64, dual_attention_layers=(0, 1),
                qk_norm="rms_norm")


def demo_sd3(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**DEMO_SD3, **overrides}).eval()


def sd3_inputs(model, batch: int = 1, resolution: int = 512, tokens: int = 77, seed: int = 0,
               dtype=torch.float32) -> dict:
    from segquant_compile.examples.models import example_inputs
    g = torch.Generator().manual_seed(seed)
    x = example_inputs(model, batch=batch, resolution=resolution, text_tokens=tokens, generator=g, dtype=dtype)
    x["timestep"] = torch.rand(batch, generator=g).mul(1000).to(dtype)
    return x
