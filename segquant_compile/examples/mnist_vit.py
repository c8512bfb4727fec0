"""The second real MNIST model in ../shared/data: a class-conditional ViT (torch's own
TransformerEncoderLayer, GELU MLP) trained with rectified flow, rebuilt from its README, with its
guided Euler sampler. Images are in [0, 1]; score them with `accuracy(..., zero_one=True)`."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from segquant_compile.examples.mnist_dit import accuracy, data_dir, load_classifier  # noqa: F401 (shared helpers)

NULL_LABEL = 10  # y = -1 maps here: the unconditional label of classifier-free guidance


class VitRF(nn.Module):
    """net(x, t, y) -> predicted clean image: x (B,1,28,28), t (B,1,1,1) in [0,1), y (B,) in 0..9 or -1."""

    def __init__(self, dim: int = 64, layers: int = 4):
        super().__init__()
        self.dim = dim
        self.patch_embed = nn.Conv2d(1, dim, 7, stride=7)
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, dim))
        # not persistent: the file holds no frequencies (strict loading)
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(dim) / (dim - 1)), persistent=False)
        self.y_encoder = nn.Embedding(11, 2 * dim)
        self.transformer = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=256, batch_first=True, activation="gelu")
            for _ in range(layers)))
        self.unpatch = nn.ConvTranspose2d(dim, 1, 7, stride=7)

    def forward(self, x, t, y):
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed      # (B, 16, 64)
        tf = t.reshape(b, 1) * self.freqs
        t_tok = torch.cat([torch.sin(tf), torch.cos(tf)], -1).view(b, 2, self.dim)     # two time tokens
        y_tok = self.y_encoder(torch.where(y < 0, NULL_LABEL, y)).view(b, 2, self.dim)  # two label tokens
        h = self.transformer(torch.cat([patches, t_tok, y_tok], 1))[:, :16]
        return self.unpatch(h.transpose(1, 2).reshape(b, self.dim, 4, 4))


def load_vit(path: Path | None = None) -> VitRF:
    from safetensors.torch import load_file
    # eval-mode TransformerEncoderLayer otherwise takes a fused fast path that hides its Linear
    # modules (and so the graph) from torch.compile backends
    torch.backends.mha.set_fastpath_enabled(False)
    path = path or data_dir() / "mnist_vit_rf" / "vit_rf_mnist.safetensors"
    model = VitRF()
    model.load_state_dict(load_file(str(path)))  # strict
    return model.eval()


@torch.no_grad()
def sample(net, labels: torch.Tensor, seed: int = 0, steps: int = 50, guidance: float = 2.0) -> torch.Tensor:
    """Rectified-flow Euler from t=0 (noise) to t=1 (image); CFG only while 0.3 < t < 0.7. Returns [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    x = torch.randn(n, 1, 28, 28, generator=g)
    null = torch.full_like(labels, -1)
    for i in range(steps):
        t = i / steps
        if 0.3 < t < 0.7:
            # conditional and null calls in one forward (batch of 2n): half the calls
            tt = torch.full((2 * n, 1, 1, 1), t)
            xx = torch.cat([x, x])
            v_c, v_u = ((net(xx, tt, torch.cat([labels, null])) - xx) / (1 - t)).chunk(2)
            v = guidance * v_c - (guidance - 1) * v_u
        else:
            v = (net(x, torch.full((n, 1, 1, 1), t), labels) - x) / (1 - t)
        x = x + v / steps
    return x.clamp(0, 1)
