"""A site's life: the decisions its rows must still make (`Decision`), and where that leaves it
(`Phase`). QuantState holds one set of pending decisions; everything else is read from it."""
from __future__ import annotations

from enum import Enum

from segquant_compile.lowering.site_lowering import Rounding, SiteLowering


class Decision(Enum):
    """What a site's numbers still wait for (QuantState.pending)."""
    STEPS = "static activation steps"
    ROUNDING = "GPTQ rounding"
    SMOOTHING = "SmoothQuant factors"
    SCHEMES = "measured schemes"


class Phase(Enum):
    AWAITING_CALIBRATION = "awaiting calibration"   # cannot run quantized before a calibration
    AWAITING_FIRST_CALL = "awaiting its first call"  # dynamic: its first call's rows decide, then it runs
    READY = "ready"


def initial_decisions(lowering: SiteLowering) -> frozenset[Decision]:
    """What a site's rows must decide before its numbers are final, under its lowering."""
    pending = set()
    if lowering.static:
        pending.add(Decision.STEPS)
    if lowering.gptq:
        pending.add(Decision.ROUNDING)
    if lowering.smooth is not None:
        pending.add(Decision.SMOOTHING)
    if lowering.auto:
        pending.add(Decision.SCHEMES)
    return frozenset(pending)


def phase(pending: frozenset[Decision], lowering: SiteLowering) -> Phase:
    """Static steps and GPTQ on calibration rows wait for a calibration; a dynamic site's other
    decisions wait for its first call."""
    if not pending:
        return Phase.READY
    if lowering.static or lowering.rounding is Rounding.GPTQ:
        return Phase.AWAITING_CALIBRATION
    return Phase.AWAITING_FIRST_CALL


# decisions that set numbers the site runs with (the schemes only choose among kernels' codes)
NUMBERS = frozenset({Decision.STEPS, Decision.ROUNDING, Decision.SMOOTHING})
