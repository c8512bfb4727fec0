"""Map a dynamo graph's placeholders back to module parameter names.

Dynamo hands the backend parameters as placeholders; their module path is only
recorded in internal structures whose spelling changed across torch 2.11-2.13.
Every spelling we know is handled here, and only here.
"""
from __future__ import annotations

import re

import torch.fx

_SEP = re.compile(r"_(?:dict_)?(?:modules|parameters|buffers)_")


def _strip_root(dotted: str) -> str:
    # "self.blocks.0.weight" / "L['self'].blocks.0.weight" -> "blocks.0.weight"
    return re.sub(r"^L\[['\"][^'\"]+['\"]\]", "", dotted).lstrip(".")


def source_to_name(source_name: str) -> str:
    """`L['self']._modules['blocks']._modules['0']._parameters['weight']` -> `blocks.0.weight`."""
    s = "." + _strip_root(source_name)
    s = s.replace(".__dict__", "")
    s = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]_(?:modules|parameters|buffers)['\"]\]\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", s)
    return s.strip(".")


def _placeholder_key(target: str) -> str:
    # last resort: "L_self_modules_a_modules_b_parameters_weight_" -> "self.a.b.weight"
    t = target[2:] if target.startswith("L_") else target
    return _SEP.sub(".", t.rstrip("_"))


def _spellings(key: str):
    """Placeholder targets dynamo gives the state entry `root.mod.sub.leaf`."""
    *path, leaf = key.split(".")
    if not path:
        return
    root, mods = path[0], path[1:]
    body = "".join(f"_modules_{m}" for m in mods)
    for d in ("", "_dict"):
        for kind in ("parameters", "buffers"):
            yield f"L_{root}{d}{body}_{kind}_{leaf}_"


def param_names(gm: torch.fx.GraphModule) -> dict[str, str]:
    """FX placeholder name -> parameter/buffer name (without the root), for module state only."""
    by_target: dict[str, str] = {}
    known: set[str] = set()
    for full in getattr(gm, "_param_name_to_source", None) or {}:
        if "." in full:
            known.add(full.split(".", 1)[1])
        for spelling in _spellings(full):
            by_target.setdefault(spelling, full.split(".", 1)[1])
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            out[node.name] = str(node.target)
            continue
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is not None:
            name = source_to_name(source.name)
            if name in known or re.search(r"_(?:parameters|buffers)\b", source.name):
                out[node.name] = name
                continue
        target = str(node.target)
        if target in by_target:
            out[node.name] = by_target[target]
        elif re.search(r"_(?:parameters|buffers)_", target):
            key = _placeholder_key(target)
            out[node.name] = key.split(".", 1)[1] if "." in key else key
    return out
