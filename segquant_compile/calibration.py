"""calibrate(): run a segquant-compiled model in float with observers, then freeze static steps."""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from segquant_compile import distributed, registry
from segquant_compile.compiled import find
from segquant_compile.lowering.quantize import sqnr_db
from segquant_compile.weight_watch import FloatWeightsReleased


@dataclass
class CalibrationSummary:
    """What a calibrate() block saw: calls of the compiled model (a denoiser's calls, i.e. steps x
    prompts, not pipeline calls), their batch sizes, the activation rows one call gives a site, and
    the output SQNR of the last calibration call run again quantized, against its float output."""
    calls: int
    batch_sizes: dict[int, int] = field(default_factory=dict)   # batch size -> calls
    rows_per_call: tuple[int, int] | None = None               # (fewest, most) over the sites
    sites: int = 0
    output_sqnr_db: float | None = None

    def describe(self) -> str:
        batches = ", ".join(f"{b} ({n} call{'s' * (n != 1)})" for b, n in sorted(self.batch_sizes.items()))
        rows = (f"; {self.rows_per_call[0]}-{self.rows_per_call[1]} activation rows per call per site"
                if self.rows_per_call else "")
        sqnr = (f"; end-to-end output SQNR of the last calibration call, quantized vs float: "
                f"{self.output_sqnr_db:.1f} dB" if self.output_sqnr_db is not None else "")
        return f"calibration: {self.calls} call(s) of the compiled model, batch sizes {batches or '-'}" \
               f"{rows}; {self.sites} site(s) calibrated{sqnr}"


ALREADY_CALIBRATED = ("segquant: this model is already calibrated with these options; pass "
                      "calibrate(compiled, recalibrate=True) to collect new statistics")
ONLY_NEW_SITES = ("segquant: calibrating only the sites without steps (new or replaced weights); the others keep "
                  "theirs, though their inputs may have changed: calibrate(compiled, recalibrate=True) "
                  "recalibrates every site")


class Session:
    def __init__(self, model: torch.nn.Module, steps: int | None, progress: bool, recalibrate: bool = False,
                 known=(), group=None, sites=None):
        self.group, self.shard = group, distributed.shard_of(group)
        self.sites = sites   # () -> {name: (state, bias)} of the model: states other ranks calibrated
        self.tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.steps = steps
        self.calls = 0
        self.open = True
        self.touched: dict[int, tuple] = {}    # id(state) -> (state, bias)
        # states first met in a call that another compile of the same weights and options had
        # calibrated already (states are shared by weight): reset with recalibrate, else kept
        self.recalibrate, self.known = recalibrate, {id(st) for st in known}
        self.kept: dict[int, object] = {}
        self.batch_sizes: Counter = Counter()
        self.last = None                        # (args, kwargs, float output) of the last call
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, desc="segquant calibration", unit="call", leave=False)

    def owns(self, weights) -> bool:
        return any(self.tensors.get(id(w)) is w for w in weights)

    def touch(self, states, biases) -> None:
        for st, b in zip(states, biases):
            if id(st) in self.touched or not st.calibrated_by_rows:
                continue
            if st.settled and self.recalibrate and id(st) not in self.known:
                st.reset_calibration()
                self.known.add(id(st))
            if st.settled:
                self.kept[id(st)] = st
            else:
                st.number_calls(self.shard)
                self.touched[id(st)] = (st, b)

    def after_call(self, _module, args, kwargs, output):
        self.calls += 1
        if self.open:
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
            self.batch_sizes[first.shape[0] if first is not None else 0] += 1
            # the inputs themselves, not copies: a copy changes strides (an expanded timestep has
            # stride 0) and the rerun would recompile on dynamo's stride guard
            self.last = (args, kwargs, _first_tensor(output))
        if self.bar is not None:
            self.bar.update(1)
        if self.steps is not None and self.calls >= self.steps and self.open:
            self.finish()

    def finish(self):
        self.open = False
        if self.group is not None:
            self._merge_over_group()
            self._freeze_over_group()
        elif self.calls and self.touched:
            freeze(self.touched.values())

    def fail(self, error: BaseException) -> None:
        """The block raised: no statistics stay, and the other ranks of the group learn of it."""
        for st, _ in self.touched.values():
            st.discard_statistics()
        tell_group = self.open and self.group is not None   # the exchange a finish would have made
        self.open = False
        if tell_group:
            with contextlib.suppress(RuntimeError):   # the block's own error is the one raised
                distributed.exchange(distributed.RankFailed(self.shard.rank, f"{type(error).__name__}: {error}"),
                                     self.group)

    def _freeze_over_group(self) -> None:
        """Each rank freezes a share of the sites (the freeze is a function of the merged
        statistics and the weights, the same on every rank), then every rank takes the others'
        records. The sites, largest first by K^2 N (GPTQ's work), are drawn one at a time from a
        queue the ranks share (distributed.WorkQueue), so the ranks finish together; where the
        group has no shared store, they are split in advance by that cost."""
        pairs = sorted(self.touched.values(), key=lambda sb: sb[0].name)
        cost = lambda st: st.site.in_features ** 2 * st.site.out_features   # noqa: E731
        order = sorted(pairs, key=lambda sb: -cost(sb[0]))
        store = distributed.WorkQueue.store_of(self.group)
        mine, records = [], {}
        try:
            if store is not None:
                queue = distributed.WorkQueue(store, next(registry.WORK_ROUNDS), len(order))
                while (i := queue.draw()) is not None:
                    order[i][0].freeze(order[i][1])
                    mine.append(order[i])
            else:
                load = [0] * self.shard.world
                for st, bias in order:
                    rank = load.index(min(load))
                    load[rank] += cost(st)
                    if rank == self.shard.rank:
                        mine.append((st, bias))
                freeze(mine)
            records = {st.name: distributed.record_skeleton(st.params) for st, _ in mine}
            payload = {name: skeleton for name, (skeleton, _) in records.items()}
        except Exception as e:
            payload = distributed.RankFailed(self.shard.rank, f"{type(e).__name__}: {e}")
        try:
            skeletons = distributed.by_rank(distributed.exchange(payload, self.group))
            by_name = {st.name: st for st, _ in pairs}
            if set(skeletons) != set(by_name):
                raise RuntimeError(f"segquant_compile.calibrate(): the ranks froze other sites than this rank "
                                   f"calibrated ({sorted(set(skeletons) ^ set(by_name))[:3]}): the ranks' models differ")
            self._take_records(skeletons, {name: tensors for name, (_, tensors) in records.items()}, by_name)
        finally:
            for st, _ in pairs:
                st.discard_statistics()

    def _take_records(self, skeletons: dict, frozen_here: dict, by_name: dict) -> None:
        """Each site's record broadcast by the rank that froze it, site by site in name order: its
        tensors as one byte buffer (on the GPU under NCCL), the rest from its skeleton.
        `frozen_here`: {name: the record's tensors} of the sites this rank froze."""
        for name in sorted(skeletons):
            src = next(r for r, s in enumerate(skeletons[name]) if s is not None)
            skeleton = skeletons[name][src]
            sent = frozen_here.get(name)
            try:
                tensors = distributed.broadcast_tensors(sent, distributed.record_specs(skeleton), src, self.group)
            except Exception as e:   # a rank that died, or the group's timeout
                raise RuntimeError(f"segquant_compile.calibrate(): taking {name}'s frozen record from rank {src} "
                                   f"failed ({type(e).__name__}: {e})") from e
            if name not in frozen_here:
                by_name[name].adopt_frozen(distributed.fill_record(skeleton, tensors))

    def _merge_over_group(self) -> None:
        """Every rank's statistics of every site reduced over the group into each state here: one
        exchange of what each rank holds (a summary per statistics set, named by the sites that
        share it), then the collectives of SiteStatistics.reduce_over, set by set in name order."""
        states = [st for st, _ in self.touched.values()]
        distributed.check_names(states)
        shared: dict[int, list] = {}   # sites reading one activation share one statistics set
        for st in states:
            shared.setdefault(id(st.stats), []).append(st)
        held = {tuple(sorted(st.name for st in group)): group[0].stats.summary() for group in shared.values()}
        try:
            sets = distributed.by_rank(distributed.exchange(held, self.group))
            named = [name for names in sets for name in names]
            if len(set(named)) != len(named):
                raise RuntimeError("segquant_compile.calibrate(): the ranks' sites share statistics differently: "
                                   "the ranks' models differ")
            by_name = {st.name: st for st in states}
            for names in sorted(sets):
                stats = self._statistics_of(names, by_name)
                try:
                    stats.reduce_over(self.group, sets[names], self.shard.rank)
                except Exception as e:   # a collective (a rank that died, the group's timeout) or a mismatch
                    raise RuntimeError(f"segquant_compile.calibrate(): reducing the statistics of {names[0]} over "
                                       f"the process group failed ({type(e).__name__}: {e}); no statistics were "
                                       f"kept") from e
                stats.with_ranges_on(by_name[names[0]].params.packed.device)
        except BaseException:
            for st, _ in self.touched.values():
                st.discard_statistics()
            raise

    def _statistics_of(self, names: tuple[str, ...], by_name: dict):
        """The one statistics set the sites `names` share here; sites only other ranks' calls
        reached join the calibration now (into `by_name` and the touched sites)."""
        missing = [name for name in names if name not in by_name]
        if missing:
            here = self.sites()
            for name in missing:
                if name not in here:
                    raise RuntimeError(f"segquant_compile.calibrate(): other ranks calibrated {name}, which "
                                       f"this rank's model does not have: the ranks' models differ")
                st, bias = here[name]
                st.number_calls(self.shard)
                self.touched[id(st)] = (st, bias)
                by_name[name] = st
        first = by_name[names[0]]
        for name in names[1:]:
            if not by_name[name].share_statistics(first):
                raise RuntimeError(f"segquant_compile.calibrate(): {name} holds statistics of its own here but "
                                   f"shares {names[0]}'s on another rank: the ranks' models differ")
        return first.stats


def freeze(states_and_biases) -> None:
    """Freeze every site, then free its statistics (sites reading one activation share them): a
    frozen site decides nothing more from rows, and FLUX.1-dev's kept rows alone are GBs."""
    pairs = list(states_and_biases)
    for st, bias in pairs:
        st.freeze(bias)
    for st, _ in pairs:
        st.discard_statistics()


def _first_tensor(out):
    """The main output: a tensor, the first of a tuple, or the first field of a diffusers output."""
    if isinstance(out, dict):
        out = next(iter(out.values()), None)
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out.detach().clone() if isinstance(out, torch.Tensor) else None


def summarize(compiled, session: Session) -> CalibrationSummary:
    """The summary of a finished session; runs the last call again, quantized (one extra call)."""
    found = find(compiled)
    rows = [st.site.rows for st in found.quant_states if st.site.rows]
    summary = CalibrationSummary(session.calls, dict(session.batch_sizes),
                                 (min(rows), max(rows)) if rows else None, len(session.touched))
    if session.last is not None and session.last[2] is not None:
        args, kwargs, ref = session.last
        with torch.no_grad():
            out = _first_tensor(compiled(*args, **kwargs))
        if out is not None and out.shape == ref.shape:
            summary.output_sqnr_db = sqnr_db(ref.float(), out.float())
    session.last = None
    # by model, weakly: a graph (and its runner) serves every instance of a class, a summary one model
    registry.SUMMARIES[found.model] = summary
    return summary


@contextlib.contextmanager
def calibrate(compiled, progress: bool = True, recalibrate: bool = False, group=None):
    """Inside the block, calls of `compiled` run in float and record activation ranges; on exit
    (or after options['calibration_steps'] calls) the static steps freeze and the next call
    runs quantized. An exception inside the block discards what it collected.

    Under torch.distributed (a `group`, or the default group when initialised with several
    processes) each rank calls its share of the inputs (`inputs[rank::world]`) and on exit the
    statistics are merged over the group: every rank freezes the same parameters (distributed.py)."""
    try:
        found = find(compiled)
    except TypeError as e:
        raise TypeError(f"segquant_compile.calibrate(): {e}; compile with "
                        f"options={{'activations': 'static'}}") from None
    config = found.config
    if config is not None and config.activations != "static" and config.smooth is None and (
            config.weight_rounding == "rtn" or config.only_fp8):
        raise ValueError("segquant_compile.calibrate() collects static activation steps, GPTQ's rows and "
                         "SmoothQuant's ranges; compile with options={'activations': 'static'}, weight_rounding "
                         "'gptq' or 'auto' with integer weights, or 'smooth' (dynamic activations with weights "
                         "rounded to nearest or fp8 and no smoothing need no calibration)")
    if registry.session_running():
        raise RuntimeError("segquant_compile.calibrate() is already running (calibrating twice)")
    mine = found.quant_states
    released = [st.name for st in mine if st.released]
    if released:
        raise FloatWeightsReleased(
            f"segquant_compile.calibrate(): the float weights of {len(released)} site(s) were released "
            f"(options release_float_weights=True), e.g. {released[0]}: calibration needs them; compile the "
            f"float model again")
    mine = [st for st in mine if st.calibrated_by_rows]
    if mine and all(st.settled for st in mine) and not recalibrate:
        raise RuntimeError(ALREADY_CALIBRATED)
    if recalibrate:
        for st in mine:
            st.reset_calibration()
    elif any(st.settled for st in mine):
        warnings.warn(ONLY_NEW_SITES, stacklevel=3)
    group = distributed.calibration_group(group)

    def sites():
        seen = find(compiled)
        return {row.state.name: (row.state, row.bias) for row in seen.rows if row.state is not None}
    session = Session(found.model, config.calibration_steps if config else None, progress, recalibrate, mine,
                      group, sites)
    registry.open_session(session)
    hook = compiled.register_forward_hook(session.after_call, with_kwargs=True)
    try:
        yield session
        if session.calls == 0 and group is not None:
            raise RuntimeError("segquant_compile.calibrate(): the block made no call of the compiled model on "
                               f"rank {session.shard.rank}")
    except BaseException as e:
        session.fail(e)   # leaves no statistics behind, and tells the other ranks
        raise
    finally:
        hook.remove()
        registry.close_session(session)
        if session.bar is not None:
            session.bar.close()
    if session.calls == 0:
        raise RuntimeError("segquant_compile.calibrate(): the block made no call of the compiled model")
    # states a compile before this one calibrated (same weights, same options), first met in a call
    late = [st for k, st in session.kept.items() if k not in session.known]
    if late and not session.touched:
        raise RuntimeError(ALREADY_CALIBRATED + " (by an earlier compile of the same weights)")
    if late and not any(st.settled for st in mine):
        warnings.warn(ONLY_NEW_SITES, stacklevel=3)
    if not session.touched and not any(st.settled for st in find(compiled).quant_states):
        raise RuntimeError("segquant_compile.calibrate(): no segquant graph ran inside the block; is the "
                           "model compiled with backend='segquant', does it have linear layers, and has dynamo "
                           "not fallen back to eager (torch._dynamo.config.recompile_limit reached)?")
    if session.open:
        session.finish()
    session.summary = summarize(compiled, session)
