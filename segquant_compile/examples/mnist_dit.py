"""The real MNIST diffusion transformer in ../shared/data, rebuilt from its README, with its EDM
Heun sampler and the scoring classifier. Used by tests and by `segquant demo --model mnist`."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn


def data_dir() -> Path:
    """../shared/data beside the project (or SEGQUANT_DATA)."""
    env = os.environ.get("SEGQUANT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]   # the repository root
    return here.parent / "shared" / "data"


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        half = dim // 2
        self.register_buffer("half_emb", torch.exp(-math.log(1e4) * torch.arange(half) / (half - 1)))

    def forward(self, t):
        x = t[:, None] * self.half_emb[None, :]
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, head_dim: int = 64, seq: int = 49):
        super().__init__()
        self.heads, self.head_dim, self.seq = heads, head_dim, seq
        for n in ("gamma1", "beta1", "alpha1", "gamma2", "beta2", "alpha2"):
            setattr(self, n, nn.Linear(dim, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.wq, self.wk, self.wv = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.lv = nn.Linear(heads * head_dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))

    def forward(self, x, cond):
        b, s, _ = x.shape
        y = self.ln1(x) * (1 + self.gamma1(cond).unsqueeze(1)) + self.beta1(cond).unsqueeze(1)
        q, k, v = (w(y).view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
                   for w in (self.wq, self.wk, self.wv))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(s), dim=-1)  # seq length, as trained
        y = (att @ v).permute(0, 2, 1, 3).reshape(b, s, self.heads * self.head_dim)
        x = x + self.lv(y) * self.alpha1(cond).unsqueeze(1)
        z = self.ln2(x) * (1 + self.gamma2(cond).unsqueeze(1)) + self.beta2(cond).unsqueeze(1)
        return x + self.ff(z) * self.alpha2(cond).unsqueeze(1)


class MnistDiT(nn.Module):
    """F(x, t, y): (B,1,28,28) in [-1,1], t (B,), y (B,) int64."""

    def __init__(self, dim: int = 64, blocks: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 4, stride=4)
        self.patch_emb = nn.Linear(16, dim)
        self.patch_pos_emb = nn.Parameter(torch.zeros(1, 49, dim))
        self.time_emb = nn.Sequential(TimeEmbedding(dim), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.label_emb = nn.Embedding(10, dim)
        self.dits = nn.ModuleList(DiTBlock(dim) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 16)

    def forward(self, x, t, y):
        b = x.shape[0]
        x = self.conv(x).permute(0, 2, 3, 1).reshape(b, 49, 16)
        x = self.patch_emb(x) + self.patch_pos_emb
        cond = self.label_emb(y) + self.time_emb(t)
        for block in self.dits:
            x = block(x, cond)
        x = self.linear(self.ln(x))
        x = x.view(b, 7, 7, 1, 4, 4).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 1, 28, 28)


def load_dit(path: Path | None = None) -> MnistDiT:
    from safetensors.torch import load_file
    path = path or data_dir() / "mnist_dit_edm" / "dit_edm_mnist.safetensors"
    model = MnistDiT()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


SIGMA_DATA = 0.5


def denoise(net, x, sigma, y):
    """EDM preconditioning: D(x, s, y) = c_skip x + c_out F(c_in x, ln(s)/4, y)."""
    s = sigma.reshape(-1, 1, 1, 1)
    sd2 = SIGMA_DATA ** 2
    c_skip = sd2 / (s ** 2 + sd2)
    c_out = s * SIGMA_DATA / (s ** 2 + sd2).sqrt()
    c_in = 1 / (s ** 2 + sd2).sqrt()
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4, y)


def sigmas(steps: int = 18, smin: float = 0.002, smax: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    i = torch.arange(steps, dtype=torch.float64)
    s = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample(net, labels: torch.Tensor, seed: int = 0, steps: int = 18) -> torch.Tensor:
    """Deterministic Heun (Karras et al. 2022, Alg. 1, no churn); the last step plain Euler."""
    g = torch.Generator().manual_seed(seed)
    ts = sigmas(steps)
    x = torch.randn(len(labels), 1, 28, 28, generator=g, dtype=torch.float64) * ts[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        sig = torch.full((len(labels),), float(t))
        d = (x - denoise(net, x.float(), sig, labels).double()) / t
        x_next = x + (t_next - t) * d
        if t_next > 0:
            sig_n = torch.full((len(labels),), float(t_next))
            d2 = (x_next - denoise(net, x_next.float(), sig_n, labels).double()) / t_next
            x_next = x + (t_next - t) * (d + d2) / 2
        x = x_next
    return x.float().clamp(-1, 1)


def load_classifier(path: Path | None = None) -> nn.Module:
    from safetensors.torch import load_file
    path = path or data_dir() / "mnist" / "classifier.safetensors"
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, zero_one: bool = False) -> float:
    """Share of images classified as their label; zero_one: images in [0, 1] (the classifier wants [-1, 1])."""
    if zero_one:
        images = images * 2 - 1
    return (classifier(images).argmax(-1) == labels).float().mean().item()


def test_images(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test images scaled to [-1, 1] and their labels."""
    import numpy as np
    data = np.load(data_dir() / "mnist" / "mnist_t10k.npz")
    images = torch.from_numpy(data["images"][:n]).float().div(127.5).sub(1).unsqueeze(1)
    return images, torch.from_numpy(data["labels"][:n]).long()
