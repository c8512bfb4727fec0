"""WeightWatcher: tells whether a float weight changed since its site packed it (version counter,
storage, a few probed values), and frees its storage when asked (release_float_weights)."""
from __future__ import annotations

import hashlib
import warnings
import weakref

import torch
from torch import Tensor

from segquant_compile import registry

PROBES = 64                # weight values compared at every call: catches edits through `.data`


class FloatWeightsReleased(RuntimeError):
    """The float copy of a quantized weight was freed (release_float_weights=True)."""


def fingerprint(t: Tensor | None) -> str | None:
    """Identifies a tensor's values cheaply: shape, dtype and a strided sample with the sum."""
    if t is None:
        return None
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].float().cpu().clone()   # a copy: numpy views pin the storage
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(sample.numpy().tobytes())
    h.update(repr(round(float(flat.sum(dtype=torch.float64)), 6)).encode())
    return h.hexdigest()[:32]


def probe(weight: Tensor) -> Tensor:
    """A view of PROBES values of a weight, evenly spread, compared at every call: `w.data += d`
    and `w.data.copy_(new)` bump no version counter but write into this view's storage, and a
    LoRA merge or a copy changes nearly every value. An edit of a few single values can pass
    unseen; swapping the storage (`w.data = new`) changes the stamp instead."""
    flat = weight.detach().reshape(-1)   # a view for contiguous weights (the usual case)
    step = max(1, flat.numel() // PROBES)
    return flat[step // 2::step][:PROBES]


def stamp(weight: Tensor) -> tuple[int, int]:
    return weight._version, weight.untyped_storage().data_ptr()


class WeightWatcher:
    """One site's view of its float weight: held weakly (a site dies with its weight)."""

    def __init__(self, weight: Tensor):
        self.released = False
        self.watch(weight)

    def watch(self, weight: Tensor) -> None:
        """Remember the weight as it is now (just packed)."""
        self.fingerprint = fingerprint(weight)
        self._stamp = stamp(weight)
        self._weight = weakref.ref(weight)
        # a view made once (slicing a Parameter per call costs microseconds); a non-contiguous
        # weight's probe is a copy, so it is taken again at each check
        view = probe(weight)
        self._probe_view = view if weight.is_contiguous() else None
        self._probe = view.clone()

    def weight(self, name: str) -> Tensor:
        weight = self._weight()
        if weight is None:
            raise RuntimeError(f"segquant: the weight of {name} is gone")
        return weight

    def is_current(self, weight: Tensor) -> bool:
        """Unchanged since packing: same version and storage, same probed values."""
        if self._stamp != stamp(weight):
            return False
        if self._probe is None:   # released: the storage is gone, the stamp says it all
            return True
        view = self._probe_view if self._probe_view is not None else probe(weight)
        return torch.equal(view, self._probe)

    def release(self, weight: Tensor) -> int:
        """Free the float weight's storage (metadata stays, so dynamo guards still hold); the
        bytes freed."""
        if self.released:
            return 0
        storage = weight.untyped_storage()
        freed = storage.nbytes()
        storage.resize_(0)
        self.released = True
        self._stamp, self._probe, self._probe_view = stamp(weight), None, None
        registry.RELEASED[id(weight)] = weakref.ref(weight)
        return freed


def _refuse_released(module: torch.nn.Module, _args) -> None:
    if torch.compiler.is_compiling() or not registry.RELEASED:   # traced graphs never run this
        return
    for name, p in module._parameters.items():
        if p is not None and registry.is_released(p):
            raise FloatWeightsReleased(
                f"segquant: {type(module).__name__}.{name} was released by a segquant-compiled model "
                f"(options release_float_weights=True): only the compiled model can run it; load the float "
                f"weights again to use this module eagerly")


def guard_released_weights() -> None:
    """Eager calls of a module whose float weight was released raise a clear error (instead of
    torch's storage error). Installed in the backend call, before dynamo builds its guards, so
    it adds no recompile."""
    def install():
        # torch warns that global hooks also fire on the OptimizedModule wrapper: harmless here
        # (the wrapper owns no parameters)
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        return torch.nn.modules.module.register_module_forward_pre_hook(_refuse_released)
    registry.install_once("released-weights", install)
