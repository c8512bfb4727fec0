"""The real terrain UNet in ../shared/data/terrain_unet: OpenAI's guided-diffusion/consistency-models
UNet (1x1-conv attention, scale-shift norm, ResBlock resampling) distilled to a one-step EDM
consistency model of 128x128 heightmaps, conditioned on a continuous difficulty. Rebuilt from the
folder's README (names match the file), with its preconditioning and its two samplers: one step
at sigma 80 (`generate`) and variations of a source map at a smaller sigma (`vary`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segquant_compile.examples.mnist_dit import data_dir

SIGMA_DATA, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0
EMB = 128                                  # conditioning width
H_MAX, ASINH_A = 22.16864013671875, 0.1    # heights (m) <-> model space
ASINH_K = math.asinh(H_MAX / ASINH_A)


def weights_path() -> Path:
    return data_dir() / "terrain_unet" / "terrain_unet.safetensors"


def sigma_frequencies() -> torch.Tensor:
    """f_i = exp(-ln(1e4) i / 16), i = 0..15, as the exported graph stores them: NumPy's float32
    exp of the float32 argument (torch's float32 exp may differ in the last bit)."""
    arg = (-math.log(10000.0) * np.arange(16, dtype=np.float32) / np.float32(16)).astype(np.float32)
    return torch.from_numpy(np.exp(arg))


class ResBlock(nn.Module):
    """GN -> SiLU -> [resample] -> conv3x3, FiLM by the embedding (scale-shift norm), GN -> SiLU ->
    conv3x3, plus the (1x1-conv or identity) skip of the (resampled) input."""

    def __init__(self, c_in: int, c_out: int, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.in_layers = nn.Sequential(nn.GroupNorm(32, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(EMB, 2 * c_out))
        # index 2 is the dropout slot (p = 0 at inference)
        self.out_layers = nn.Sequential(nn.GroupNorm(32, c_out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = self._resample(h), self._resample(x)
        h = self.in_layers[2](h)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention written with 1x1 convs: qkv conv -> (N, 3C, T) -> q|k|v -> heads of 32
    channels folded into the batch -> attention -> heads merged channel-first -> proj_out conv.
    The split is q|k|v first, then heads (consistency_models' order, not QKVAttentionLegacy)."""

    def __init__(self, channels: int, head_channels: int = 32):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, hh * ww)
        q, k, v = qkv.chunk(3, dim=1)
        ch = c // self.heads
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * self.heads, ch, -1),
                         (k * scale).reshape(b * self.heads, ch, -1))
        w = torch.softmax(w, dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v.reshape(b * self.heads, ch, -1))
        return x + self.proj_out(a.reshape(b, c, hh, ww))


class Blocks(nn.Sequential):
    """A sequence of layers where ResBlocks (and attention) also get the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class TerrainUNet(nn.Module):
    """F(x, c_noise, d01): x (N, 1, H, W), c_noise = 250 ln(sigma) (N,), d01 difficulty in [0, 1] (N,)."""

    def __init__(self, base: int = 32, mult=(1, 1, 2, 3, 4), res_blocks: int = 4, attn_levels=(2, 3, 4)):
        super().__init__()
        self.register_buffer("freqs", sigma_frequencies(), persistent=False)   # not in the file
        self.time_embed = nn.Sequential(nn.Linear(32, EMB), nn.SiLU(), nn.Linear(EMB, EMB))
        self.label_emb = nn.Sequential(nn.Linear(1, EMB), nn.SiLU(), nn.Linear(EMB, EMB))
        self.input_blocks = nn.ModuleList([Blocks(nn.Conv2d(1, base, 3, padding=1))])
        skips, ch = [base], base
        for level, m in enumerate(mult):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, base * m)]
                ch = base * m
                if level in attn_levels:
                    layers.append(AttentionBlock(ch))
                self.input_blocks.append(Blocks(*layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Blocks(ResBlock(ch, ch, "down")))
                skips.append(ch)
        self.middle_block = Blocks(ResBlock(ch, ch), AttentionBlock(ch), ResBlock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), base * m)]
                ch = base * m
                if level in attn_levels:
                    layers.append(AttentionBlock(ch))
                if level and i == res_blocks:
                    layers.append(ResBlock(ch, ch, "up"))
                self.output_blocks.append(Blocks(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, c_noise, d01):
        a = c_noise[:, None].float() * self.freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(a), torch.sin(a)], dim=-1))    # cos first
        emb = emb + self.label_emb(d01[:, None].float())
        stack = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            stack.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, stack.pop()], dim=1), emb)      # current first, skip second
        return self.out(h)


def load_unet(path: Path | None = None) -> TerrainUNet:
    from safetensors.torch import load_file
    model = TerrainUNet()
    model.load_state_dict(load_file(str(path or weights_path())))    # strict
    return model.eval()


# ---------------------------------------------------------------- preconditioning

def denoise(net, x: torch.Tensor, sigma: torch.Tensor, d01: torch.Tensor) -> torch.Tensor:
    """D(x, sigma, d01) = clip(c_out F(c_in x, 250 ln sigma, d01) + c_skip x, -1, 1), in the
    exported graph's float32 order (README section 2)."""
    s = (sigma - SIGMA_MIN).reshape(-1, 1, 1, 1)
    sig = sigma.reshape(-1, 1, 1, 1)
    c_skip = 1 / (s * s + SIGMA_DATA ** 2) * SIGMA_DATA ** 2
    r = torch.sqrt(sig * sig + SIGMA_DATA ** 2)
    c_out = s * SIGMA_DATA / r
    c_in = 1 / r
    f = net(c_in * x, torch.log(sigma) * 250, d01)
    return torch.clamp(c_out * f + c_skip * x, -1, 1)


# ---------------------------------------------------------------- model space <-> heights

def heights_to_model(h: torch.Tensor) -> torch.Tensor:
    h = h - h.amin(dim=(-2, -1), keepdim=True)
    h = h.clamp(0, H_MAX)
    return 2 * torch.asinh(h / ASINH_A) / ASINH_K - 1


def model_to_heights(m: torch.Tensor, zero_floor: bool = True) -> torch.Tensor:
    u = ((m + 1) / 2).clamp(0, 1)
    h = (ASINH_A * torch.sinh(u * ASINH_K)).clamp(0, H_MAX)
    return h - h.amin(dim=(-2, -1), keepdim=True) if zero_floor else h


# ---------------------------------------------------------------- samplers (package TerrainGenerator)

def _labels(rng, difficulty, count: int) -> np.ndarray:
    """Integer difficulties 1..100; 'random' draws them from rng (before the noise, as the package)."""
    if isinstance(difficulty, str):
        if difficulty != "random":
            raise ValueError(f"difficulty must be 1..100, a sequence of them, or 'random', got {difficulty!r}")
        return rng.integers(1, 101, size=count)
    d = np.broadcast_to(np.asarray(difficulty, dtype=np.int64), (count,)).copy()
    if d.min() < 1 or d.max() > 100:
        raise ValueError(f"difficulty must lie in 1..100, got {difficulty!r}")
    return d


def difficulty01(d) -> torch.Tensor:
    return torch.from_numpy(((np.asarray(d, dtype=np.float32) - 1) / np.float32(99)).astype(np.float32))


@torch.no_grad()
def _one_step(net, rng, base: torch.Tensor | None, sigma: float, d: np.ndarray, size: int,
              batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(d), batch_size):
        b = len(d[i:i + batch_size])
        noise = torch.from_numpy(rng.standard_normal((b, 1, size, size), dtype=np.float32))
        x = noise * np.float32(sigma) if base is None else base[i:i + b] + np.float32(sigma) * noise
        out.append(denoise(net, x, torch.full((b,), sigma, dtype=torch.float32), difficulty01(d[i:i + b])))
    return torch.cat(out)


def generate(net, count: int = 1, seed: int = 0, difficulty="random", batch_size: int = 16,
             size: int = 128) -> tuple[torch.Tensor, np.ndarray]:
    """One-step generation at sigma 80: (maps in model space (count, 1, size, size), difficulties).
    Heights: `model_to_heights(maps)`."""
    rng = np.random.default_rng(seed)
    d = _labels(rng, difficulty, count)
    return _one_step(net, rng, None, SIGMA_MAX, d, size, batch_size), d


def variation_sigma(strength: float) -> float:
    """sigma = 0.002 (80 / 0.002)^strength: strength 0.5 gives 0.4."""
    return SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** strength


def vary(net, source_heights: torch.Tensor, strength: float = 0.5, seed: int = 0, difficulty="random",
         variants: int = 1, batch_size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """Variations of source heightmaps (N, 1, H, W) in metres: the source in model space plus
    sigma(strength) noise, denoised in one call. Returns (maps in model space, difficulties);
    each source repeated `variants` times, consecutively. strength 0 gives the source back."""
    src = heights_to_model(source_heights).clamp(-1, 1).repeat_interleave(variants, dim=0)
    rng = np.random.default_rng(seed)
    d = _labels(rng, difficulty, len(src))
    if strength == 0:
        return src, d
    return _one_step(net, rng, src, variation_sigma(strength), d, src.shape[-1], batch_size), d
