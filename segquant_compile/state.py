"""QuantState: everything segquant keeps for one weight (packed int8, steps, calibration
statistics), shared by every graph, graph break and recompile that touches that weight."""
from __future__ import annotations

import fnmatch
import hashlib
import weakref

import torch
from torch import Tensor

from segquant_compile.config import QuantConfig
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.passes import LinearSite

SAMPLE_ROWS = 512          # activation rows kept per site for SQNR and smoothing search
SMOOTH_GRID = (0.0, 0.25, 0.5, 0.75)


def skip_pattern(name: str, config: QuantConfig) -> str | None:
    """The first `skip` pattern a site name matches."""
    return next((p for p in config.skip if fnmatch.fnmatch(name, p)), None)


def fallback_reason(site: LinearSite, weight: Tensor | None, config: QuantConfig) -> str | None:
    """Why a site stays float, or None when it is quantized (weight None: judge the plan alone)."""
    pattern = skip_pattern(site.name, config)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}"
    if weight is not None and not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight is not None and weight.device.type not in ("cpu", "cuda"):
        return f"weight on {weight.device.type} device"
    if config.format not in ("int8", "fp8"):
        return f"format {config.format!r} has no lowering yet ('int8' and 'fp8' do)"
    return None


def fingerprint(w: Tensor) -> str:
    """Identifies a weight's values cheaply: shape, dtype and a strided sample with the sum."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].float().cpu().clone()   # a copy: numpy views pin the storage
    h = hashlib.sha256(str((tuple(w.shape), str(w.dtype))).encode())
    h.update(sample.numpy().tobytes())
    h.update(repr(round(float(flat.sum(dtype=torch.float64)), 6)).encode())
    return h.hexdigest()[:32]


class QuantState:
    def __init__(self, site: LinearSite, weight: Tensor, config: QuantConfig, k_bounds, dual):
        self.name = site.name
        self.site = site
        self.config = config
        self.k_bounds = tuple(k_bounds)
        self.dual = tuple(dual)
        self.out_bounds = site.output_segments.bounds if (site.output_segments and config.weights == "per-tensor"
                                                          and config.seglinear) else None
        if config.weights == "per-tensor" and self.out_bounds is None:
            self.out_bounds = (0, site.out_features)
        self.smooth: Tensor | None = None
        self.alpha: float | None = None
        # calibration statistics, per input channel: positive and negative maxima
        self.pos_max: Tensor | None = None
        self.neg_max: Tensor | None = None
        self.sample: list[Tensor] = []
        self.observed_calls = 0
        self.d_x: Tensor | None = None
        self.d_neg: Tensor | None = None
        self.sqnr: float | None = None
        self.released = False
        self.bias: Tensor | None = None
        self._placeholders: dict[str, Tensor] = {}
        self._weight = weakref.ref(weight)
        self._stamp = None
        self.pack(weight)

    # ------------------------------------------------------------------ weights
    @property
    def frozen(self) -> bool:
        return self.d_x is not None

    def _float_weight(self, weight: Tensor) -> Tensor:
        w = weight.detach()
        return w if self.site.weight_nk else w.t()

    def pack(self, weight: Tensor) -> None:
        """Quantize the weight (with the smoothing factors, if any): packed [K, N] int8 + steps."""
        w = self._float_weight(weight).float()
        if self.smooth is not None:
            w = w * self.smooth
        self.d_w = Q.weight_steps(w, self.out_bounds, self.config.format)
        self.packed = Q.quantize_weight(w, self.d_w, self.config.format)
        self.fingerprint = fingerprint(weight)
        self._weight = weakref.ref(weight)
        self._stamp = self.stamp(weight)

    @staticmethod
    def stamp(weight: Tensor):
        return weight._version, weight.untyped_storage().data_ptr()

    def is_current(self, weight: Tensor) -> bool:
        """The same tensor object (not just the same id: ids are reused), unchanged since packing."""
        return self._weight() is weight and self._stamp == self.stamp(weight)

    def refresh(self, weight: Tensor) -> None:
        """The user replaced or edited the weight: re-pack it (the activation steps stay)."""
        if self.released:
            raise RuntimeError(
                f"segquant: the weight of {self.name} changed after its float copy was released "
                f"(options release_float_weights=True); compile the model again to change weights")
        self.pack(weight)

    def release(self, weight: Tensor) -> int:
        """Free the float weight's storage (metadata stays, so dynamo guards still hold)."""
        storage = weight.untyped_storage()
        freed = storage.nbytes()
        storage.resize_(0)
        self.released = True
        self._weight = weakref.ref(weight)
        self._stamp = self.stamp(weight)
        return freed

    # ------------------------------------------------------------------ calibration
    def observe(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        pos = x2.amax(dim=0).clamp(min=0)
        neg = (-x2).amax(dim=0).clamp(min=0)
        if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
            raise FloatingPointError(f"segquant: NaN or Inf reached the calibration observer of {self.name}")
        self.pos_max = pos if self.pos_max is None else torch.maximum(self.pos_max, pos)
        self.neg_max = neg if self.neg_max is None else torch.maximum(self.neg_max, neg)
        kept = sum(len(s) for s in self.sample)
        if kept < SAMPLE_ROWS:
            idx = torch.randperm(len(x2), generator=torch.Generator().manual_seed(self.observed_calls))
            self.sample.append(x2[idx[: min(len(x2), max(1, SAMPLE_ROWS // 8), SAMPLE_ROWS - kept)]].cpu())
        self.observed_calls += 1

    def reset_calibration(self) -> None:
        self.pos_max = self.neg_max = self.d_x = self.d_neg = self.sqnr = None
        self.sample, self.observed_calls = [], 0

    def freeze(self, weight: Tensor) -> None:
        """Turn the statistics into static steps (choosing SmoothQuant's alpha if asked)."""
        if self.pos_max is None:
            raise RuntimeError(f"segquant: {self.name} saw no calibration data")
        smooth = self.config.smooth
        rows = torch.cat(self.sample)
        if smooth is None:
            self._set_smooth(weight, None)
        elif smooth == "search":
            best = None
            for alpha in (None, *SMOOTH_GRID):
                self._set_smooth(weight, alpha)
                score = self._sqnr(weight, rows)
                if best is None or score > best[0]:
                    best = (score, alpha)
            self._set_smooth(weight, best[1])
        else:
            self._set_smooth(weight, float(smooth))
        self.sqnr = self._sqnr(weight, rows)

    def _set_smooth(self, weight: Tensor, alpha: float | None) -> None:
        self.alpha = alpha
        if alpha is None:
            self.smooth = None
        else:
            amax_x = torch.maximum(self.pos_max, self.neg_max).clamp(min=1e-5)
            amax_w = self._float_weight(weight).float().abs().amax(dim=0).clamp(min=1e-5)
            self.smooth = (amax_x.pow(alpha) / amax_w.pow(1 - alpha)).clamp(min=1e-5)
        self.pack(weight)
        s = self.smooth if self.smooth is not None else torch.ones_like(self.pos_max)
        pos, neg = self.pos_max / s, self.neg_max / s
        seg_pos = torch.stack([pos[a:b].max() for a, b in zip(self.k_bounds[:-1], self.k_bounds[1:])])
        seg_neg = torch.stack([neg[a:b].max() for a, b in zip(self.k_bounds[:-1], self.k_bounds[1:])])
        self.d_x, self.d_neg = Q.static_steps(torch.maximum(seg_pos, seg_neg), seg_pos, seg_neg, list(self.dual),
                                              self.config.format)

    def _sqnr(self, weight: Tensor, rows: Tensor) -> float:
        w = self._float_weight(weight).float()
        bias = self.bias_value()
        ref = rows @ w.t() + (bias if bias is not None else 0)
        out = quantized_linear(rows, self.packed, self.d_w, bias, self.d_x, self.d_neg, self.smooth,
                               self.k_bounds, self.dual, fmt=self.config.format)
        return Q.sqnr_db(ref, out)

    def graph_input(self, field: str) -> Tensor:
        """The tensor the quantized graph takes for `field` (placeholders of the right shape
        until calibration has frozen the steps)."""
        value = getattr(self, field)
        if value is None:   # one cached placeholder: no allocation per call
            shape = (self.packed.shape[0],) if field == "smooth" else (1, len(self.dual))
            value = self._placeholders.get(field)
            if value is None:
                value = self._placeholders[field] = torch.ones(shape, device=self.packed.device)
        return value

    def bias_value(self) -> Tensor | None:
        b = getattr(self, "bias", None)
        return b.detach().float() if b is not None else None

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        out = {"format": self.config.format, "weights": self.config.weights,
               "activations": self.config.activations,
               "weight_step": [float(self.d_w.min()), float(self.d_w.max())]}
        if self.frozen:
            out["act_step"] = [round(float(v), 6) for v in self.d_x.reshape(-1)]
            if any(self.dual):
                out["act_step_neg"] = [round(float(v), 6) for v in self.d_neg.reshape(-1)]
            out["sqnr_db"] = None if self.sqnr is None else round(self.sqnr, 2)
            if self.alpha is not None:
                out["smooth_alpha"] = self.alpha
        return out


class Registry:
    """QuantStates by weight tensor (weakly) and lowering (config, K bounds, DualScale flags):
    every graph that sees the tensor under the same options shares its state."""

    def __init__(self):
        self._by_key: dict[tuple, tuple[weakref.ref, QuantState]] = {}

    def get(self, weight: Tensor, lowering: tuple) -> QuantState | None:
        entry = self._by_key.get((id(weight), lowering))
        if entry is None or entry[0]() is not weight:
            return None
        return entry[1]

    def put(self, weight: Tensor, lowering: tuple, state: QuantState) -> None:
        key = (id(weight), lowering)
        self._by_key[key] = (weakref.ref(weight, lambda _r, k=key: self._by_key.pop(k, None)), state)

    def states_for(self, tensors) -> list[QuantState]:
        live = {id(t): t for t in tensors}
        seen, out = set(), []
        for (wid, _), (ref, state) in list(self._by_key.items()):
            if wid in live and ref() is live[wid] and id(state) not in seen:
                seen.add(id(state))
                out.append(state)
        return out


REGISTRY = Registry()
