"""Inductor's on-disk caches key a compiled graph on the graph, not on the schemas of the custom
ops it calls. When an upgrade of segquant changes an op's schema (an argument with a default
removed, say) the graph can hash as before, and a warm cache then hands back code calling the op
as the old schema did: it fails at the first call, far from the cause. The key here names the
schemas of every `segquant::` op, so such code is never reused.

The key reaches Inductor as the uuid of a custom post-grad pass that does nothing
(torch._inductor.custom_graph_pass: the documented way for a pass to take part in the cache key).
A pass the user set already is kept: one with a uuid is wrapped (both uuids count), a plain
callable is left as it is (Inductor then bypasses its cache for the graph)."""
from __future__ import annotations

import hashlib

import torch


def ops_key() -> str:
    """A digest of every registered `segquant::` op schema (the ops register on import)."""
    schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("segquant::"))
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:   # a torch without custom-pass uuids: its cache keys on the graph alone
    CustomGraphPass = None


if CustomGraphPass is not None:
    class SegquantOpsKey(CustomGraphPass):
        """A post-grad pass that changes nothing; its uuid carries the ops' key (and the uuid of
        the user's pass it wraps, which it runs)."""

        def __init__(self, key: str, wrapped=None):
            self.key, self.wrapped = key, wrapped

        def __call__(self, graph) -> None:
            if self.wrapped is not None:
                self.wrapped(graph)

        def uuid(self):
            return ("segquant-ops", self.key, None if self.wrapped is None else self.wrapped.uuid())


def config_patches() -> dict:
    """What `compile_fx(..., config_patches=)` takes to key segquant's graphs on its op schemas;
    {} where this torch has no custom-pass uuids or the user's pass is a plain callable (which
    makes Inductor bypass its cache)."""
    if CustomGraphPass is None:
        return {}
    from torch._inductor import config
    user = config.post_grad_custom_post_pass
    if user is not None and not isinstance(user, CustomGraphPass):
        return {}
    return {"post_grad_custom_post_pass": SegquantOpsKey(ops_key(), user)}
