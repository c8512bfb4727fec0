"""What a site is in the architecture, read off its full module path: its op type (attention
q/k/v, MLP down, AdaLN, ...) and its block (`transformer_blocks.3`). For aggregating measured
sensitivity the way Qua2SeDiMo (arXiv 2412.14628) reads it: per op type and per block."""
from __future__ import annotations

import re

OTHER = "other"

# First match wins, on the full module path. Names: diffusers SD3 / FLUX / PixArt / UNet,
# nn.TransformerEncoderLayer (examples/mnist_vit.py) and the MNIST DiT (examples/mnist_dit.py).
_RULES = (
    ("embedders", r"(^|\.)(time_text_embed|time_embedding|x_embedder|context_embedder|pos_embed|patch_embed"
                  r"|patch_emb|caption_projection|time_emb|adaln_single\.emb)(\.|$)|^conv$"),
    ("AdaLN/modulation", r"(^|\.)(norm1|norm1_context|norm|norm_out|adaln_single)\.linear$|(^|\.)time_emb_proj$"
                         r"|(^|\.)(gamma|beta|alpha)[12]$"),
    ("attention q/k/v", r"(^|\.)(to_q|to_k|to_v|to_qkv|to_added_qkv|add_q_proj|add_k_proj|add_v_proj|in_proj"
                        r"|wq|wk|wv)$"),
    ("attention out", r"(^|\.)(to_out\.0|to_add_out|out_proj|lv)$"),
    ("MLP up", r"(^|\.)(net\.0\.proj|proj_mlp|linear1|ff\.0)$"),
    # a FLUX single block's proj_out reads cat([attention, MLP]): 4/5 of its K is the MLP's
    ("MLP down", r"(^|\.)(net\.2|linear2|ff\.2)$|^single_transformer_blocks\.\d+\.proj_out$"),
    ("final projection", r"^(proj_out|linear|unpatch|conv_out)$"),
)
_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in _RULES)
OP_TYPES = tuple(kind for kind, _ in _RULES) + (OTHER,)

_BLOCK = re.compile(r"^(.*?[^.]+\.\d+)\.")   # the first indexed container that holds the site


def op_type(name: str) -> str:
    """`transformer_blocks.0.attn.to_q` -> "attention q/k/v"; unknown names -> "other"."""
    name = name.split("#")[0]   # a weight used twice in one graph: `name#2`
    return next((kind for kind, pattern in _COMPILED if pattern.search(name)), OTHER)


def block_of(name: str) -> str | None:
    """`single_transformer_blocks.7.proj_out` -> `single_transformer_blocks.7`; None outside any
    block (an indexed module that is the site itself, `time_emb.1`, is no block)."""
    match = _BLOCK.match(name.split("#")[0])
    return match.group(1) if match else None
