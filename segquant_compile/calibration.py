"""calibrate(): run a segquant-compiled model in float with observers, then freeze static steps."""
from __future__ import annotations

import contextlib

import torch

_ACTIVE: list["Session"] = []


def active() -> "Session | None":
    return _ACTIVE[-1] if _ACTIVE and _ACTIVE[-1].open else None


class Session:
    def __init__(self, model: torch.nn.Module, steps: int | None, progress: bool):
        self.tensor_ids = {id(t) for t in (*model.parameters(), *model.buffers())}
        self.steps = steps
        self.calls = 0
        self.open = True
        self.states: dict[int, object] = {}
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, desc="segquant calibration", unit="call", leave=False)

    def owns(self, weight_ids) -> bool:
        return bool(weight_ids & self.tensor_ids)

    def touch(self, states) -> None:
        for st in states:
            self.states[id(st)] = st

    def after_call(self, *_):
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.steps is not None and self.calls >= self.steps and self.open:
            self.finish()

    def finish(self):
        self.open = False
        if self.calls and self.states:
            freeze(self.states.values())


def freeze(states) -> None:
    for st in states:
        weight = st._weight()
        if weight is None:
            raise RuntimeError(f"segquant: the weight of {st.name} is gone; nothing to calibrate")
        st.freeze(weight)


def compiled_options(compiled) -> tuple[str | None, dict | None]:
    """(backend name, options) of a torch.compile'd module; (None, None) when torch's internals
    do not say (their layout is not public: walk it defensively)."""
    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if obj is None:
            break
        name = getattr(obj, "compiler_name", None)
        if isinstance(name, str):
            return name, dict(getattr(obj, "kwargs", {}) or {}).get("options", {})
        obj = next((getattr(obj, a) for a in ("_torchdynamo_orig_backend", "_inner_convert", "compiler_fn")
                    if getattr(obj, a, None) not in (None, obj)), None)
    return None, None


@contextlib.contextmanager
def calibrate(compiled, progress: bool = True, recalibrate: bool = False):
    """Inside the block, calls of `compiled` run in float and record activation ranges; on exit
    (or after options['calibration_steps'] calls) the static steps freeze and the next call
    runs quantized."""
    from segquant_compile.config import QuantConfig
    from segquant_compile.state import REGISTRY
    model = getattr(compiled, "_orig_mod", None)
    if not isinstance(compiled, torch.nn.Module) or model is None:
        raise TypeError("segquant_compile.calibrate() takes a model compiled with "
                        "torch.compile(model, backend='segquant', options={'activations': 'static'})")
    backend, options = compiled_options(compiled)
    if backend is not None and backend != "segquant":
        raise TypeError(f"segquant_compile.calibrate(): the model is compiled with backend {backend!r}, "
                        f"not 'segquant'")
    config = QuantConfig.from_options(options) if backend is not None else None
    if config is not None and config.activations != "static":
        raise ValueError("segquant_compile.calibrate() collects static activation steps; compile with "
                         "options={'activations': 'static'} (dynamic activations need no calibration)")
    if _ACTIVE:
        raise RuntimeError("segquant_compile.calibrate() is already running (calibrating twice)")
    tensors = [*model.parameters(), *model.buffers()]
    mine = [st for st in REGISTRY.states_for(tensors) if config is None or st.config == config]
    if mine and all(st.frozen for st in mine) and not recalibrate:
        raise RuntimeError("segquant: this model is already calibrated with these options; pass "
                           "calibrate(compiled, recalibrate=True) to collect new statistics")
    if recalibrate:
        for st in mine:
            st.reset_calibration()
    elif any(st.frozen for st in mine):
        import warnings
        warnings.warn("segquant: calibrating only the sites without steps (new or replaced weights); the "
                      "others keep theirs, though their inputs may have changed: calibrate(compiled, "
                      "recalibrate=True) recalibrates every site", stacklevel=3)
    session = Session(model, config.calibration_steps if config else None, progress)
    hook = compiled.register_forward_hook(session.after_call)
    _ACTIVE.append(session)
    try:
        yield session
    finally:
        hook.remove()
        _ACTIVE.remove(session)
        if session.bar is not None:
            session.bar.close()
    if session.calls == 0:
        raise RuntimeError("segquant_compile.calibrate(): the block made no call of the compiled model")
    if not session.states:
        raise RuntimeError("segquant_compile.calibrate(): no segquant graph ran inside the block; is the "
                           "model compiled with backend='segquant', does it have linear layers, and has dynamo "
                           "not fallen back to eager (torch._dynamo.config.recompile_limit reached)?")
    if session.open:
        session.finish()
