"""The registries every layer reads: the weight formats (bits, grouping, packing, whether
activations stay float, the op and Triton kernel that run them) and the activation schemes of a K
segment (their codes in the GEMM ops). One table each, instead of string lists in many files."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import Enum


class Choice(str, Enum):
    """A member is its own string: options, saved manifests and reports hold the plain value, and
    code that compares with the string still agrees."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Scheme(Choice):
    """The activation scheme of one K segment (lowering/quantize.py has the arithmetic)."""
    SYMMETRIC = "symmetric"      # one step, q in [-127, 127]
    DUALSCALE = "dualscale"      # d_pos on [0, 127], d_neg on [-128, 0] (docs/design.md, DualScale)
    ASYMMETRIC = "asymmetric"    # one step and a zero point, q in [-128, 127]

    @property
    def code(self) -> int:
        """The scheme's int in the GEMM ops' `schemes` argument."""
        return _CODES[self]


_CODES = {Scheme.SYMMETRIC: 0, Scheme.DUALSCALE: 1, Scheme.ASYMMETRIC: 2}


@dataclass(frozen=True)
class FormatSpec:
    weight_bits: int
    grid: str                    # the 8-bit grid of activations and 8-bit weights: "int8" | "fp8"
    float_activations: bool     # weight-only: activations stay float, weights dequantized in the kernel
    grouped: bool                # weight steps per output channel and K group (group_size)
    values_per_byte: int         # packing of the weight grid
    op: str                      # the torch op of the site (lowering/ops.py)
    kernel: str                  # the Triton kernel family (autotune keys, codegen-check)
    conv: bool                   # conv2d sites lowered (segquant::conv2d); else kept float


def _from_spec(name: str) -> property:
    return property(lambda self: getattr(_SPECS[self], name), doc=f"FormatSpec.{name} of this format")


class Format(Choice):
    """The numbers a quantized site runs with (docs/options.md, Formats)."""
    INT8 = "int8"
    FP8 = "fp8"
    W4A8 = "w4a8"
    INT8_WEIGHT_ONLY = "int8-weight-only"
    INT4_WEIGHT_ONLY = "int4-weight-only"

    @property
    def spec(self) -> FormatSpec:
        return _SPECS[self]

    # the spec's fields most read, as the format's own (descriptors: not enum members)
    weight_bits = _from_spec("weight_bits")
    weight_only = _from_spec("float_activations")
    grouped = _from_spec("grouped")
    grid = _from_spec("grid")

    @property
    def integer(self) -> bool:
        """Integer weights (GPTQ rounds them); fp8 rounds by its cast."""
        return self is not Format.FP8


_SPECS = {
    Format.INT8: FormatSpec(8, "int8", False, False, 1, "segquant::gemm", "int8", True),
    Format.FP8: FormatSpec(8, "fp8", False, False, 1, "segquant::gemm", "fp8", False),
    Format.W4A8: FormatSpec(4, "int8", False, True, 2, "segquant::gemm_w4", "w4a8", False),
    Format.INT8_WEIGHT_ONLY: FormatSpec(8, "int8", True, False, 1, "segquant::gemm_weight_only", "weight-only", False),
    Format.INT4_WEIGHT_ONLY: FormatSpec(4, "int8", True, True, 2, "segquant::gemm_weight_only", "weight-only", False),
}
LOW_RANK_MARK = "+r"   # "w4a8+r32": a format with a low-rank branch of rank 32 (FormatChoice)
FLOAT = "float"   # a per-site format choice: the site stays float (named in the report)


@dataclass(frozen=True)
class FormatChoice:
    """A per-site format as options, sensitivity and allocation name it: a format, or a format with
    SVDQuant's low-rank branch of a rank ("w4a8+r32": lowering/low_rank.py)."""
    format: Format
    low_rank: int | None = None

    DESCRIBED: typing.ClassVar[str] = ("a format name (" + ", ".join(repr(f.value) for f in Format) +
                                       ") with an optional low-rank branch, e.g. 'w4a8+r32'")

    @classmethod
    def parse(cls, name) -> "FormatChoice":
        text = str(name)
        base, mark, rank = text.partition(LOW_RANK_MARK)
        if base in Format.values() and (not mark or (rank.isdigit() and int(rank) > 0)):
            return cls(Format(base), int(rank) if mark else None)
        raise ValueError(f"unknown format {text!r}; formats: {list(Format.values())}, each optionally with a "
                         f"low-rank branch of rank r as '<format>{LOW_RANK_MARK}<r>' (e.g. 'w4a8+r32')")

    @staticmethod
    def valid(name) -> bool:
        try:
            FormatChoice.parse(name)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return self.format.value + (f"{LOW_RANK_MARK}{self.low_rank}" if self.low_rank else "")
