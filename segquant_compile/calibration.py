"""calibrate(): run a segquant-compiled model in float with observers, then freeze static steps."""
from __future__ import annotations

import contextlib

import torch

_ACTIVE: list["Session"] = []


def active() -> "Session | None":
    return _ACTIVE[-1] if _ACTIVE and _ACTIVE[-1].open else None


class Session:
    def __init__(self, model: torch.nn.Module, steps: int | None, progress: bool):
        self.tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.steps = steps
        self.calls = 0
        self.open = True
        self.touched: dict[int, tuple] = {}    # id(state) -> (state, bias)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, desc="segquant calibration", unit="call", leave=False)

    def owns(self, weights) -> bool:
        return any(self.tensors.get(id(w)) is w for w in weights)

    def touch(self, states, biases) -> None:
        for st, b in zip(states, biases):
            if not st.frozen:
                self.touched[id(st)] = (st, b)

    def after_call(self, *_):
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.steps is not None and self.calls >= self.steps and self.open:
            self.finish()

    def finish(self):
        self.open = False
        if self.calls and self.touched:
            states, biases = zip(*self.touched.values())
            freeze(states, biases)


def freeze(states, biases) -> None:
    for st, bias in zip(states, biases):
        st.bias = bias
        st.freeze()
        st.bias = None   # held only for the SQNR at freeze


@contextlib.contextmanager
def calibrate(compiled, progress: bool = True, recalibrate: bool = False):
    """Inside the block, calls of `compiled` run in float and record activation ranges; on exit
    (or after options['calibration_steps'] calls) the static steps freeze and the next call
    runs quantized. An exception inside the block discards what it collected."""
    from segquant_compile.compiled import find
    from segquant_compile.state import FloatWeightsReleased
    try:
        found = find(compiled)
    except TypeError as e:
        raise TypeError(f"segquant_compile.calibrate(): {e}; compile with "
                        f"options={{'activations': 'static'}}") from None
    config = found.config
    if config is not None and config.activations != "static":
        raise ValueError("segquant_compile.calibrate() collects static activation steps; compile with "
                         "options={'activations': 'static'} (dynamic activations need no calibration)")
    if _ACTIVE:
        raise RuntimeError("segquant_compile.calibrate() is already running (calibrating twice)")
    mine = found.quant_states
    released = [st.name for st in mine if st.released]
    if released:
        raise FloatWeightsReleased(
            f"segquant_compile.calibrate(): the float weights of {len(released)} site(s) were released "
            f"(options release_float_weights=True), e.g. {released[0]}: calibration needs them; compile the "
            f"float model again")
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
    session = Session(found.model, config.calibration_steps if config else None, progress)
    hook = compiled.register_forward_hook(session.after_call)
    _ACTIVE.append(session)
    try:
        yield session
    except BaseException:
        for st, _ in session.touched.values():   # leave no statistics behind
            st.discard_statistics()
        session.open = False
        raise
    finally:
        hook.remove()
        _ACTIVE.remove(session)
        if session.bar is not None:
            session.bar.close()
    if session.calls == 0:
        raise RuntimeError("segquant_compile.calibrate(): the block made no call of the compiled model")
    if not session.touched and not any(st.frozen for st in find(compiled).quant_states):
        raise RuntimeError("segquant_compile.calibrate(): no segquant graph ran inside the block; is the "
                           "model compiled with backend='segquant', does it have linear layers, and has dynamo "
                           "not fallen back to eager (torch._dynamo.config.recompile_limit reached)?")
    if session.open:
        session.finish()
