"""What segquant must hold process-wide, in one place: dynamo hands each backend call one graph and
reuses a graph for every instance of a block, so nothing else can tie a model to its quantized
state. Everything here is held weakly (it dies with the weights, runners or models it is about).

- STATES: the quantized state of each weight, by the weight tensor and a key (state_key);
- RUNNERS: every GraphRunner the backend returned (find() walks them);
- the active calibration session (calibrate() opens and closes it);
- SUMMARIES: each model's last calibration summary (report());
- RELEASED: weights whose float storage was freed (release_float_weights);
- WORK_ROUNDS: numbers the work queues a calibration group shares (distributed.WorkQueue's keys).

A leaf: it imports nothing from segquant_compile."""
from __future__ import annotations

import itertools
import threading
import weakref

from torch import Tensor


def state_key(lowering, source: str | None) -> tuple:
    """What a state is shared by: its lowering's numbers and where it came from (a loaded state
    is never mixed with one calibrated in this process)."""
    return lowering, source


class StateRegistry:
    """States by weight tensor (weakly) and state_key: every graph that sees the tensor under the
    same key shares its state; the entry dies with the weight."""

    def __init__(self):
        self._by_key: dict[tuple, tuple[weakref.ref, object]] = {}
        self._lock = threading.Lock()

    def get(self, weight: Tensor, key: tuple):
        entry = self._by_key.get((id(weight), key))
        if entry is None or entry[0]() is not weight:
            return None
        return entry[1]

    def put(self, weight: Tensor, key: tuple, state):
        """Store a fully built state; when another thread stored one first, keep and return that."""
        full = (id(weight), key)
        with self._lock:
            entry = self._by_key.get(full)
            if entry is not None and entry[0]() is weight:
                return entry[1]
            self._by_key[full] = (weakref.ref(weight, lambda _r, k=full: self._by_key.pop(k, None)), state)
        return state

    def states_for(self, tensors) -> list[tuple[Tensor, object]]:
        """(weight, state) for every state of these tensors."""
        live = {id(t): t for t in tensors}
        out = []
        for (wid, _), (ref, state) in list(self._by_key.items()):
            if wid in live and ref() is live[wid]:
                out.append((live[wid], state))
        return out


STATES = StateRegistry()
RUNNERS: weakref.WeakSet = weakref.WeakSet()
SUMMARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RELEASED: dict[int, weakref.ref] = {}   # by id, checked by identity
_SESSIONS: list = []                    # the calibration session open, if any
_INSTALLED: dict[str, object] = {}      # process-wide hooks, by name
WORK_ROUNDS = itertools.count(1)        # the same sequence on every rank: each runs the same calibrations


def is_released(t: Tensor) -> bool:
    ref = RELEASED.get(id(t))
    return ref is not None and ref() is t


def session_running() -> bool:
    return bool(_SESSIONS)


def open_session(session) -> None:
    if _SESSIONS:
        raise RuntimeError("segquant_compile.calibrate() is already running (calibrating twice)")
    _SESSIONS.append(session)


def close_session(session) -> None:
    if session in _SESSIONS:
        _SESSIONS.remove(session)


def active_session():
    """The open calibration session (one at a time), or None."""
    return _SESSIONS[-1] if _SESSIONS and _SESSIONS[-1].open else None


def install_once(name: str, install) -> None:
    """Run `install` (a global hook's registration) the first time `name` is asked for."""
    if name not in _INSTALLED:
        _INSTALLED[name] = install()
