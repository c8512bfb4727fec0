"""Presets: the configurations users ask for, by name. As plain data (`options={"preset":
"w8a8-static", ...overrides}`) and as QuantConfig objects (`sq.compile(model, presets.W8A8_STATIC)`).
The objects are built with the shipped defaults when this module is imported."""
from __future__ import annotations

from segquant_compile.config import QuantConfig

# name -> the flat options it sets over the defaults
PRESETS: dict[str, dict] = {
    "w8a8-dynamic": {},                                  # the default: per-token steps, no calibration
    "w8a8-static": {"activations": "static"},            # per-segment steps from a calibration
    "fp8": {"format": "fp8"},                            # e4m3 weights and activations
    "w4a8": {"format": "w4a8"},                          # int4 weights in K groups, int8 activations
    "int4-weight-only": {"format": "int4-weight-only"},  # float activations: memory-bound small batches
    # per site int8, w4a8 or float from measured sensitivity; give "sensitivity" (and a budget of your own)
    "mixed": {"format": "auto", "budget": {"weight_bits": 6}},
}

W8A8_DYNAMIC = QuantConfig.from_flat(PRESETS["w8a8-dynamic"])
W8A8_STATIC = QuantConfig.from_flat(PRESETS["w8a8-static"])
FP8 = QuantConfig.from_flat(PRESETS["fp8"])
W4A8 = QuantConfig.from_flat(PRESETS["w4a8"])
INT4_WEIGHT_ONLY = QuantConfig.from_flat(PRESETS["int4-weight-only"])


def mixed(sensitivity: str, weight_bits: float | None = None, latency: float | None = None) -> QuantConfig:
    """Per-site formats from a saved sensitivity measurement under one budget: average weight bits
    (6 unless a budget is given) or GEMM time as a fraction of float."""
    if weight_bits is not None and latency is not None:
        raise ValueError("presets.mixed takes one budget: weight_bits or latency")
    budget = {"latency": latency} if latency is not None else {"weight_bits": weight_bits or 6}
    return QuantConfig.from_flat({**PRESETS["mixed"], "budget": budget, "sensitivity": sensitivity})
