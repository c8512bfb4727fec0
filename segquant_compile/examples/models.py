"""Shipped architecture configs (numbers only) and example inputs for diffusers denoisers."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

VAE_FACTOR = 8
# default text length per architecture: SD3 CLIP 77 + T5 256, FLUX T5 512, PixArt T5 300, SDXL CLIP 77
TEXT_TOKENS = {"SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512,
               "PixArtTransformer2DModel": 300, "UNet2DConditionModel": 77}


def shipped() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("segquant_compile.configs").iterdir()
                  if p.name.endswith(".json"))


def load_config(name_or_path: str) -> dict:
    """A shipped config by name, a config.json, or a local diffusers model/pipeline folder."""
    if name_or_path in shipped():
        return json.loads(resources.files("segquant_compile.configs").joinpath(f"{name_or_path}.json").read_text())
    path = Path(name_or_path)
    for candidate in (path, path / "config.json", path / "transformer" / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"{name_or_path!r} is neither a shipped config {shipped()} nor a local diffusers "
                            f"model folder with a config.json (nothing is downloaded)")


def model_folder(path) -> Path:
    """A local diffusers model's own folder (its config.json beside its weights; a pipeline
    folder's transformer/ or unet/); ValueError when it holds a config but no weights."""
    path = Path(path)
    path = path.parent if path.is_file() else path
    for candidate in (path, path / "transformer", path / "unet"):
        if (candidate / "config.json").is_file():
            if not any(candidate.glob("*.safetensors")) and not any(candidate.glob("*.bin")):
                raise ValueError(f"segquant.sensitivity needs real weights: {candidate} holds a config.json but no "
                                 f"weight files (*.safetensors, *.bin)")
            return candidate
    raise FileNotFoundError(f"{path} holds no diffusers model (config.json)")


def model_class(config: dict):
    import diffusers
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise ValueError(f"config names no diffusers model class (_class_name={name!r})")
    return cls


def build(config: dict, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The model with random (or, on meta, no) weights: full-size architectures need no memory on meta."""
    cls = model_class(config)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        model = cls.from_config(kwargs)
    model = model.to(device)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def example_inputs(model, batch: int = 1, resolution: int = 1024, text_tokens: int | None = None,
                   device=None, dtype=None, generator: torch.Generator | None = None,
                   vae_factor: int = VAE_FACTOR, attention_mask: bool = False) -> dict:
    """Keyword inputs for one denoiser call at `resolution` pixels (square). `attention_mask`: also
    the text mask a pipeline passes (PixArt), so the traced graph is the pipeline's."""
    p = next(model.parameters())
    device = p.device if device is None else device
    dtype = p.dtype if dtype is None else dtype
    cfg = model.config
    kind = type(model).__name__
    tokens = text_tokens or TEXT_TOKENS.get(kind, 77)
    latent = resolution // vae_factor

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype, device="cpu").to(device) \
            if str(device) != "meta" else torch.empty(*shape, dtype=dtype, device=device)

    t = (torch.full((batch,), 500.0) if str(device) != "meta" else torch.empty(batch)).to(device=device, dtype=dtype)
    if kind == "SD3Transformer2DModel":
        return dict(hidden_states=rand(batch, cfg.in_channels, latent, latent),
                    encoder_hidden_states=rand(batch, tokens, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t)
    if kind == "FluxTransformer2DModel":
        side = latent // 2
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        out = dict(hidden_states=rand(batch, side * side, cfg.in_channels),
                   encoder_hidden_states=rand(batch, tokens, cfg.joint_attention_dim),
                   pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t / 1000,
                   img_ids=img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
                   txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype))
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5, dtype=dtype).to(device) if str(device) != "meta" \
                else torch.empty(batch, dtype=dtype, device=device)
        return out
    if kind == "PixArtTransformer2DModel":
        out = dict(hidden_states=rand(batch, cfg.in_channels, latent, latent),
                   encoder_hidden_states=rand(batch, tokens, cfg.caption_channels), timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        if attention_mask:
            out["encoder_attention_mask"] = torch.ones(batch, tokens, dtype=torch.long, device=device)
        return out
    if kind == "UNet2DConditionModel":
        out = dict(sample=rand(batch, cfg.in_channels, latent, latent), timestep=t,
                   encoder_hidden_states=rand(batch, tokens, cfg.cross_attention_dim))
        if cfg.addition_embed_type == "text_time":
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": rand(batch, text), "time_ids": rand(batch, 6)}
        return out
    raise ValueError(f"no example inputs known for {kind}; pass inputs to explain() yourself")


# ------------------------------------------------------------------ pipelines
def vae_factor(folder) -> int | None:
    """A pipeline folder's VAE scale factor, as diffusers computes it (None: no vae/config.json)."""
    path = Path(folder) / "vae" / "config.json"
    if not path.is_file():
        return None
    return 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1)


def pipeline_defaults(config: dict, folder=None) -> dict:
    """What one pipeline call with default settings passes the denoiser: the image side the pipeline
    picks (transformer `sample_size` x the VAE factor), the batch (2 with classifier-free guidance:
    every pipeline but FLUX), the text length."""
    factor = (vae_factor(folder) if folder is not None else None) or VAE_FACTOR
    side = config.get("sample_size")
    side = side[0] if isinstance(side, (list, tuple)) else side
    return {"resolution": side * factor if side else 1024, "vae_factor": factor,
            "batch": 1 if config.get("_class_name") == "FluxTransformer2DModel" else 2,
            "text_tokens": TEXT_TOKENS.get(config.get("_class_name"), 77)}


WORDS = "a an the of in on with and photo painting cat dog bird house tree car river city red blue green " \
        "small large old new at night morning sky".split()


def tiny_pixart_pipeline(seed: int = 0):
    """A PixArt-Sigma pipeline from random tiny components, built offline (tests, bench): a T5
    encoder (16 wide), a word-level tokenizer over WORDS, a 2-block transformer (16x16 latents),
    a 2-level VAE (scale factor 2: 32x32 images). Call it with `use_resolution_binning=False`."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline,
                           PixArtTransformer2DModel)
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2)).eval()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=16,
                                           caption_channels=16, sample_size=16, patch_size=2,
                                           norm_type="ada_norm_single", use_additional_conditions=False).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=32).eval()
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
