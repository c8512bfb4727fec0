"""SiteStatistics: what calibration (or a dynamic site's first call) observes at one site. It only
accumulates, and two of the same site merge into what one observer of both call sets would hold, in
one process (`merge`) or over a process group (`reduce_over`: collectives, no rank receives
another's whole statistics): nothing here decides a step (site_params.py does that, from a
finished record).

Every quantity is a function of (call number, rows) that merges exactly or up to summation order:
- ranges: per-column positive and negative maxima, kept per call parity (even calls set
  SmoothQuant's held-out factors, odd calls score them: site_params.held_out);
- rows: a uniform sample of every row observed, by bottom-k sampling: each row gets a priority
  drawn from its call's number, and the `rows_kept` rows of smallest priority are kept. The sample
  does not depend on the order of calls, so two halves merge into the sample of the whole. Where a
  site keeps more rows than the searches read (GPTQ's rows at a site too wide to sum a Hessian),
  the rows beyond the first `rows_kept - rows_coded` by priority are held int8-coded (CodedRows)
  and serve GPTQ only. A row's rank among the kept only grows as rows enter, so a coded row is
  never wanted exactly again, and a row is coded from its exact values whichever process codes it:
  halves still merge into the whole, bit for bit;
- Hessians X^T X per K segment (GPTQ), summed where `sum_hessian` (else GPTQ fits the kept rows),
  kept as their upper triangle in row panels (HessianPanels: about half of K^2);
- counts of rows and calls.

Exact rows are kept in the activation's own dtype where it is 16-bit (they are the values the model
produced, so nothing is lost) and read as fp32.

Where they live: rows and Hessians stay on the device of the activations they come from while
the process's statistics there fit the `calibration_device_bytes` budget (DEVICE_BUDGET), so a
GPU calibration accumulates X^T X on the GPU and copies nothing per call; a site beyond the
budget keeps its statistics on the CPU (one K^2 copy per call, as the sum is made on the device)."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from segquant_compile.config import Run
from segquant_compile import distributed
from segquant_compile.distributed import SINGLE, Shard, TensorSpec
from segquant_compile.lowering.conv import channel_ranges, im2col_rows
from segquant_compile.lowering.gptq import segment_hessians
from segquant_compile.lowering.site_lowering import ConvGeometry

SAMPLE_ROWS = 512          # activation rows kept per site for SQNR and smoothing search
GPTQ_ROWS = 2048           # rows kept for a GPTQ site's Hessian where none is summed
# of those, the rows beyond SAMPLE_ROWS are int8 with one fp32 step per CODE_GROUP columns: GPTQ
# alone reads them, through the Hessian they make (bench/gptq_coded_rows.py measures the cost)
CODE_GROUP = 128
# GPTQ's Hessian X^T X is summed over every row where the widest K segment has at most this many
# columns (K^2 fp32 per segment: 64 MB at 4096); wider sites fit GPTQ_ROWS sampled rows
HESSIAN_MAX_K = 4096
PANEL_ROWS = 256           # rows of one Hessian panel: the upper triangle in K / 256 panels


DEVICE_BYTES = Run().calibration_device_bytes   # the option's default
CPU = torch.device("cpu")


class DeviceBudget:
    """The bytes of statistics each accelerator device holds in this process, reserved by each
    site's statistics when it first observes (the whole that it may grow to) and released when
    it is discarded. The CPU takes any amount."""

    def __init__(self):
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, device: torch.device, nbytes: int, limit: int) -> bool:
        if device.type == "cpu":
            return True
        with self._lock:
            used = self._used.get(str(device), 0)
            if used + nbytes > limit:
                return False
            self._used[str(device)] = used + nbytes
            return True

    def release(self, device: torch.device, nbytes: int) -> None:
        if device.type != "cpu" and nbytes:
            with self._lock:
                self._used[str(device)] = self._used.get(str(device), 0) - nbytes

    def used(self, device) -> int:
        return self._used.get(str(torch.device(device)), 0)


DEVICE_BUDGET = DeviceBudget()


class _Reservation:
    """What one SiteStatistics holds of DEVICE_BUDGET, released when it dies (a frozen site
    discards its statistics: calibration.freeze)."""

    def __init__(self, device: torch.device, nbytes: int):
        self.device, self.nbytes = device, nbytes

    def release(self) -> None:
        DEVICE_BUDGET.release(self.device, self.nbytes)
        self.nbytes = 0


@dataclass(frozen=True)
class StatisticsSpec:
    """What a site's statistics collect: its K segments, how many rows to keep, whether to sum
    GPTQ's Hessian, and a conv's geometry (its rows are im2col rows)."""
    k_bounds: tuple[int, ...]
    rows_kept: int
    sum_hessian: bool
    conv: ConvGeometry | None = None
    device_bytes: int = DEVICE_BYTES   # the budget of statistics on an accelerator (option calibration_device_bytes)
    rows_coded: int = 0                # of rows_kept, those held int8-coded for GPTQ (the last by priority)

    @property
    def rows_exact(self) -> int:
        return self.rows_kept - self.rows_coded

    @property
    def hessian_bytes(self) -> int:
        kb = self.k_bounds
        return 4 * sum(HessianPanels.numel(b - a) for a, b in zip(kb[:-1], kb[1:])) if self.sum_hessian else 0

    def row_bytes(self, element_bytes: int = 4, rows: int | None = None) -> int:
        """The first `rows` kept rows (by default all it may keep): the exact ones in the
        activation's dtype of `element_bytes` (2 where 16-bit, else 4), then the coded ones."""
        rows = self.rows_kept if rows is None else min(rows, self.rows_kept)
        exact = min(rows, self.rows_exact)
        k = self.k_bounds[-1]
        return element_bytes * exact * k + (rows - exact) * CodedRows.row_bytes(k)

    def call_bytes(self, rows: int, element_bytes: int = 4) -> int:
        """What one call's `observe` makes and frees beside the held statistics, at its peak, for
        `rows` GEMM rows in the activation's dtype of `element_bytes`: the fp32 rows (a copy
        unless the rows are an fp32 linear input's view; a conv's are SAMPLE_ROWS im2col rows),
        alive through the call, and the largest of its steps, each freed before the next: the
        negated copy the negative maxima are taken from (a conv's: of its input, about rows x
        channels); the largest Hessian panel's product; the reservoir's merge (the rows in the
        kept dtype (16-bit), the entering rows and their concatenation with those held; where rows
        are coded, the copies that code the rows ranked out of the exact ones)."""
        k = self.k_bounds[-1]
        m = min(rows, SAMPLE_ROWS) if self.conv is not None else rows
        entering = min(m, self.rows_kept)
        fp32_rows = 4 * m * k if self.conv is not None or element_bytes != 4 else 0
        negated = 4 * rows * (k // self.conv.taps if self.conv is not None else k)
        kept_copy = element_bytes * m * k if element_bytes != 4 else 0
        kb = self.k_bounds
        panel = 4 * max(min(PANEL_ROWS, b - a) * (b - a) for a, b in zip(kb[:-1], kb[1:])) if self.sum_hessian else 0
        if self.rows_coded:
            # the concatenation of exact and entering rows, then per coded row: its index copy (and
            # fp32 copy, 16-bit), the padded groups, the quotient and its rounding (fp32 each)
            coding = (element_bytes + (4 if element_bytes != 4 else 0) + 12) * k * min(entering, self.rows_coded)
            merge = element_bytes * k * (entering + self.rows_exact) + coding
        else:
            merge = element_bytes * k * (2 * entering + self.rows_kept)
        return fp32_rows + max(negated, panel, kept_copy + merge)

    @classmethod
    def for_site(cls, k_bounds, gptq_waits: bool, conv: ConvGeometry | None,
                 device_bytes: int = DEVICE_BYTES) -> "StatisticsSpec":
        """SAMPLE_ROWS for the SQNR, scheme and smoothing searches; where GPTQ waits for rows,
        GPTQ_ROWS when no Hessian is summed (those beyond SAMPLE_ROWS coded), else as many as fit
        in the memory GPTQ_ROWS took beside its K^2 (at least SAMPLE_ROWS)."""
        widest = max(b - a for a, b in zip(k_bounds[:-1], k_bounds[1:]))
        sums = gptq_waits and widest <= HESSIAN_MAX_K
        coded = 0
        if not gptq_waits:
            kept = SAMPLE_ROWS
        elif not sums:
            kept, coded = GPTQ_ROWS, GPTQ_ROWS - SAMPLE_ROWS
        else:
            kept = max(SAMPLE_ROWS, GPTQ_ROWS - k_bounds[-1])
        return cls(tuple(k_bounds), kept, sums, conv, device_bytes, coded)


class HessianPanels:
    """A symmetric K x K sum kept as its upper triangle: panel i holds rows [i*P, (i+1)*P) from
    column i*P on (P = PANEL_ROWS), (K^2 + K*P) / 2 numbers in all. Each call's X^T X is
    made panel by panel from the rows: only the upper panels are ever computed."""

    def __init__(self, panels: list[Tensor], k: int):
        self.panels, self.k = panels, k

    @staticmethod
    def numel(k: int) -> int:
        return sum(min(PANEL_ROWS, k - a) * (k - a) for a in range(0, k, PANEL_ROWS))

    @classmethod
    def of_rows(cls, rows: Tensor, device) -> "HessianPanels":
        """rows^T rows [R, K] -> K x K, only its upper panels made (about half the FLOPs of the
        full product, and no K x K transient)."""
        k = rows.shape[1]
        return cls([(rows[:, a:a + PANEL_ROWS].t() @ rows[:, a:]).to(device) for a in range(0, k, PANEL_ROWS)], k)

    @classmethod
    def zeros(cls, k: int, device) -> "HessianPanels":
        return cls([torch.zeros(min(PANEL_ROWS, k - a), k - a, device=device) for a in range(0, k, PANEL_ROWS)], k)

    def add_rows_(self, rows: Tensor) -> None:
        """Add rows^T rows, panel by panel (one panel's product at a time beside the sum)."""
        for a, p in zip(range(0, self.k, PANEL_ROWS), self.panels):
            p.add_((rows[:, a:a + PANEL_ROWS].t() @ rows[:, a:]).to(p.device))

    def merge_(self, other: "HessianPanels") -> None:
        for p, q in zip(self.panels, other.panels):
            p.add_(q.to(p.device))

    def full(self, device=None) -> Tensor:
        """The K x K matrix, its lower triangle mirrored from the upper."""
        device = device or self.panels[0].device
        out = torch.zeros(self.k, self.k, dtype=self.panels[0].dtype, device=device)
        for a, p in zip(range(0, self.k, PANEL_ROWS), self.panels):
            out[a:a + PANEL_ROWS, a:] = p
        upper = out.triu(1)
        return out.triu_().add_(upper.t())

    def to(self, device) -> "HessianPanels":
        return HessianPanels([p.to(device) for p in self.panels], self.k)

    @property
    def device(self) -> torch.device:
        return self.panels[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.panels)


class CodedRows:
    """Rows [n, K] held as int8 with one symmetric fp32 step per CODE_GROUP columns of each row
    (K padded to whole groups). Coding is a function of the row alone, so the same row codes the
    same anywhere."""

    def __init__(self, q: Tensor, steps: Tensor, k: int):
        self.q, self.steps, self.k = q, steps, k      # q [n, groups * CODE_GROUP] int8, steps [n, groups] fp32

    @staticmethod
    def row_bytes(k: int) -> int:
        groups = -(-k // CODE_GROUP)
        return groups * (CODE_GROUP + 4)

    @classmethod
    def encode(cls, rows: Tensor) -> "CodedRows":
        n, k = rows.shape
        g = rows.float()
        g = torch.nn.functional.pad(g, (0, (-k) % CODE_GROUP)).view(n, -1, CODE_GROUP)
        steps = g.abs().amax(dim=2) / 127
        q = torch.round(g / torch.where(steps > 0, steps, 1.0)[..., None]).clamp_(-127, 127)
        return cls(q.to(torch.int8).view(n, -1), steps, k)

    @classmethod
    def empty(cls, n: int, k: int, device) -> "CodedRows":
        groups = -(-k // CODE_GROUP)
        return cls(torch.zeros(n, groups * CODE_GROUP, dtype=torch.int8, device=device),
                   torch.zeros(n, groups, device=device), k)

    def put(self, index: Tensor, rows: "CodedRows") -> None:
        """Write `rows` at `index` (indices or a mask) of these."""
        self.q[index], self.steps[index] = rows.q, rows.steps

    def decode(self) -> Tensor:
        n = len(self.q)
        return (self.q.view(n, -1, CODE_GROUP).float() * self.steps[..., None]).view(n, -1)[:, :self.k]

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, index: Tensor) -> "CodedRows":
        return CodedRows(self.q[index], self.steps[index], self.k)

    @staticmethod
    def cat(parts: list["CodedRows"]) -> "CodedRows":
        return CodedRows(torch.cat([p.q for p in parts]), torch.cat([p.steps for p in parts]), parts[0].k)

    def to(self, device) -> "CodedRows":
        return CodedRows(self.q.to(device), self.steps.to(device), self.k)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.steps.numel()


@dataclass(frozen=True, eq=False)
class HeldSummary:
    """What one holder of a site's statistics tells the others before any tensor moves: enough for
    every holder to lay out the same collectives and choose the same merged row sample."""
    spec: StatisticsSpec
    parities: tuple[bool, bool]     # ranges held for even, odd calls
    has_hessians: bool
    row_dtype: torch.dtype | None   # of the exact kept rows; None where none is kept
    priority: Tensor                # every kept row's: the exact rows', then the coded ones' (float64, CPU)
    row_calls: Tensor
    rows_seen: int
    calls: int


_EMPTY_PRIORITY = torch.empty(0, dtype=torch.float64)
_EMPTY_CALLS = torch.empty(0, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class RowSample:
    """The merged row sample of several holders: the rows_kept rows of smallest priority among all
    they keep (ties in holder order), the first rows_exact of them exact, the rest coded. For each
    row: its holder and its index among that holder's kept rows (exact, then coded)."""
    priority: Tensor
    row_calls: Tensor
    owner: Tensor
    local: Tensor
    exact: int
    row_dtype: torch.dtype

    @classmethod
    def of(cls, summaries: list[HeldSummary | None], spec: StatisticsSpec, row_dtype: torch.dtype) -> "RowSample":
        parts = [(i, s) for i, s in enumerate(summaries) if s is not None]
        priority = torch.cat([_EMPTY_PRIORITY, *(s.priority for _, s in parts)])
        calls = torch.cat([_EMPTY_CALLS, *(s.row_calls for _, s in parts)])
        owner = torch.cat([_EMPTY_CALLS, *(torch.full((len(s.priority),), i) for i, s in parts)])
        local = torch.cat([_EMPTY_CALLS, *(torch.arange(len(s.priority)) for _, s in parts)])
        order = torch.sort(priority, stable=True).indices[:spec.rows_kept]
        return cls(priority[order], calls[order], owner[order], local[order], min(spec.rows_exact, len(order)),
                   row_dtype)

    def taken_from(self, holder: int) -> tuple[Tensor, Tensor]:
        """The holder's rows entering the sample exact, and coded: indices among its kept rows."""
        exact, coded = self.owner[:self.exact] == holder, self.owner[self.exact:] == holder
        return self.local[:self.exact][exact], self.local[self.exact:][coded]

    def places_of(self, holder: int) -> tuple[Tensor, Tensor]:
        """Where those rows go among the sample's exact, and coded, rows."""
        return ((self.owner[:self.exact] == holder).nonzero().flatten(),
                (self.owner[self.exact:] == holder).nonzero().flatten())


@dataclass(frozen=True, eq=False)
class RowParcel:
    """One holder's rows entering a merged sample, in the sample's order: exact [n, K] in the kept
    dtype, and coded. Sent between processes as one byte buffer (distributed.broadcast_tensors)."""
    exact: Tensor
    coded: CodedRows

    @staticmethod
    def empty(k: int, dtype: torch.dtype, device) -> "RowParcel":
        return RowParcel(torch.empty(0, k, dtype=dtype, device=device), CodedRows.empty(0, k, device))

    @staticmethod
    def specs(n_exact: int, n_coded: int, k: int, dtype: torch.dtype) -> list[TensorSpec]:
        """What a receiver knows of a parcel before it comes: its tensors' shapes and dtypes."""
        groups = -(-k // CODE_GROUP)
        return [TensorSpec.dense((n_exact, k), dtype), TensorSpec.dense((n_coded, groups * CODE_GROUP), torch.int8),
                TensorSpec.dense((n_coded, groups), torch.float32)]

    def tensors(self) -> list[Tensor]:
        return [self.exact, self.coded.q, self.coded.steps]

    @staticmethod
    def of_tensors(tensors: list[Tensor], k: int) -> "RowParcel":
        return RowParcel(tensors[0], CodedRows(tensors[1], tensors[2], k))


def _row_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kept rows' dtype: a 16-bit activation's own (exact), else fp32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _generator(call: int) -> torch.Generator:
    return torch.Generator().manual_seed(call)


class SiteStatistics:
    def __init__(self, spec: StatisticsSpec, shard: Shard = SINGLE):
        self.spec = spec
        self.shard = shard   # numbers this observer's calls within a calibration group
        self.parity_max: list[tuple[Tensor, Tensor] | None] = [None, None]   # (pos, neg) of even, odd calls
        self.kept: Tensor | None = None           # exact kept rows [<= rows_exact, K], the activation's dtype (16-bit) or fp32
        self.coded: CodedRows | None = None       # the kept rows beyond them (spec.rows_coded), GPTQ's only
        self.row_calls: Tensor | None = None      # the call each kept row came from: exact rows, then coded
        self._priority: Tensor | None = None      # each kept row's priority (bottom-k), ascending
        self.hessians: list[HessianPanels] | None = None   # per K segment
        self.rows_seen = 0
        self.calls = 0
        self.home: torch.device | None = None      # where rows and Hessians are kept (set by the first call)
        self._reservation: _Reservation | None = None
        self._lock = threading.Lock()

    def _place(self, device: torch.device, row_dtype: torch.dtype) -> None:
        """Keep rows and Hessians on `device` if DEVICE_BUDGET has room for all they may grow to,
        else on the CPU; decided once."""
        if self.home is not None:
            return
        spec = self.spec
        need = spec.hessian_bytes + spec.row_bytes(row_dtype.itemsize)
        if device.type != "cpu" and DEVICE_BUDGET.reserve(device, need, spec.device_bytes):
            self._reservation = _Reservation(device, need)
            weakref.finalize(self, self._reservation.release)
            self.home = device
        else:
            self.home = CPU

    # ------------------------------------------------------------------ observing
    def observe(self, x: Tensor, call: int | None = None, finite_only: bool = False) -> bool:
        """Add one call's activation (numbered `call`; by default the next local number). With
        `finite_only`, rows holding NaN/Inf are dropped (a first call deciding on its rows);
        else a non-finite range raises. False when no row was kept."""
        with self._lock:
            call = self.shard.call_number(self.calls) if call is None else call
            row_dtype = _row_dtype(x.dtype)
            self._place(x.device, row_dtype)
            x2, pos, neg = self._gemm_rows(x.detach(), call)
            if finite_only:
                x2 = x2[torch.isfinite(x2).all(dim=1)]
                if not len(x2):
                    return False
                pos, neg = x2.amax(dim=0).clamp(min=0), (-x2).amax(dim=0).clamp(min=0)
            if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
                raise FloatingPointError("NaN or Inf reached the calibration observer")
            self._add_ranges(call % 2, pos, neg)
            if self.spec.sum_hessian:
                self._add_hessians(x2)
            priority = torch.rand(len(x2), generator=_generator(call), dtype=torch.float64)
            self._keep(x2.to(row_dtype), priority, torch.full((len(x2),), call, dtype=torch.long))
            self.rows_seen += len(x2)
            self.calls += 1
            return True

    def _gemm_rows(self, x: Tensor, call: int) -> tuple[Tensor, Tensor, Tensor]:
        """GEMM rows of an activation, with per-K-column positive and negative maxima. A conv's
        rows are im2col rows of SAMPLE_ROWS random output pixels (never the whole matrix)."""
        conv = self.spec.conv
        if conv is None:
            x2 = x.reshape(-1, x.shape[-1]).float()
            return x2, x2.amax(dim=0).clamp(min=0), (-x2).amax(dim=0).clamp(min=0)
        ho, wo = conv.output_size(x.shape[2], x.shape[3])
        pixels = torch.randperm(x.shape[0] * ho * wo, generator=_generator(call))[:SAMPLE_ROWS].to(x.device)
        return (im2col_rows(x.float(), conv, pixels), *channel_ranges(x, conv))

    def _add_ranges(self, parity: int, pos: Tensor, neg: Tensor) -> None:
        held = self.parity_max[parity]
        self.parity_max[parity] = (pos, neg) if held is None else (torch.maximum(held[0], pos),
                                                                   torch.maximum(held[1], neg))

    def _add_hessians(self, x2: Tensor) -> None:
        """Add one call's X^T X per K segment to the panels (each panel made on the activations'
        device, then moved once)."""
        bounds = list(zip(self.spec.k_bounds[:-1], self.spec.k_bounds[1:]))
        if self.hessians is None:
            self.hessians = [HessianPanels.of_rows(x2[:, a:b], self.home) for a, b in bounds]
        else:
            for total, (a, b) in zip(self.hessians, bounds):
                total.add_rows_(x2[:, a:b])

    def _keep(self, x2: Tensor, priority: Tensor, calls: Tensor) -> None:
        """The rows_kept rows of smallest priority among those kept and these new exact rows `x2`,
        each part in priority order: the first rows_exact exact, the rest coded. A coded row ranked
        after rows_exact exact ones where it was coded, and they are all still candidates, so no
        coded row is ever wanted exactly."""
        spec = self.spec
        if len(priority) > spec.rows_kept:   # only the smallest new ones can enter
            keep = torch.topk(priority, spec.rows_kept, largest=False).indices
            x2, priority, calls = x2[keep.to(x2.device)], priority[keep], calls[keep]
        x2 = x2.to(self.home)
        n = 0 if self.kept is None else len(self.kept)
        if self.kept is not None:
            x2 = torch.cat([self.kept, x2.to(self.kept.dtype)])
            priority, calls = torch.cat([self._priority[:n], priority]), torch.cat([self.row_calls[:n], calls])
        held = self.coded is not None
        held_priority = self._priority[n:] if held else _EMPTY_PRIORITY
        held_calls = self.row_calls[n:] if held else _EMPTY_CALLS
        ranked = torch.sort(priority, stable=True).indices
        exact, demoted = ranked[:spec.rows_exact], ranked[spec.rows_exact:spec.rows_kept]
        # an index copies: the first rows may be a view of the activation, whose buffer the graph reuses
        self.kept = x2[exact.to(x2.device)]
        self._priority, self.row_calls = priority[exact], calls[exact]
        # the coded part: the rows ranked out of the exact ones now (coded here, once, from their
        # exact values) and those held coded, the rows_kept - rows_exact of smallest priority
        candidates = torch.cat([priority[demoted], held_priority])
        if len(exact) and len(candidates) and candidates.min() < self._priority[-1]:
            raise AssertionError("SiteStatistics: a coded row ranks among the exact ones")
        chosen = torch.sort(candidates, stable=True).indices[:spec.rows_kept - len(exact)]
        if not len(chosen):
            self.coded = None
            return
        new, old = chosen[chosen < len(demoted)], chosen[chosen >= len(demoted)]
        parts = [CodedRows.encode(x2[demoted[new].to(x2.device)].float())] if len(new) else []
        if len(old):
            parts.append(self.coded[(old - len(demoted)).to(self.home)])
        order = torch.cat([new, old])   # the candidates `parts` holds, in its order
        by_priority = torch.sort(candidates[order], stable=True).indices
        candidate_calls = torch.cat([calls[demoted], held_calls])
        self.coded = CodedRows.cat(parts)[by_priority.to(self.home)]
        self._priority = torch.cat([self._priority, candidates[order][by_priority]])
        self.row_calls = torch.cat([self.row_calls, candidate_calls[order][by_priority]])

    # ------------------------------------------------------------------ merging
    def summary(self) -> "HeldSummary":
        """What this holder tells the others before any tensor moves (distributed.py)."""
        with self._lock:
            return HeldSummary(self.spec, tuple(p is not None for p in self.parity_max), self.hessians is not None,
                               None if self.kept is None else self.kept.dtype,
                               _EMPTY_PRIORITY if self._priority is None else self._priority.cpu(),
                               _EMPTY_CALLS if self.row_calls is None else self.row_calls.cpu(),
                               self.rows_seen, self.calls)

    def merge(self, other: "SiteStatistics") -> None:
        """Add another observer's statistics of the same site in this process (other calls,
        numbered globally): `reduce_over`'s arithmetic with the two holders at hand."""
        summaries = [self.summary(), other.summary()]
        sample = self._merged_layout(summaries)
        with self._lock:
            for parity, held in enumerate(other.parity_max):
                if held is not None:
                    if not self.empty:
                        held = tuple(t.to(self._device()) for t in held)
                    self._add_ranges(parity, *held)
            if other.hessians is not None:
                for total, h in zip(self._hessians_to_reduce(), other.hessians):
                    total.merge_(h)
            self._take_rows(sample, [self._rows_for(sample, 0), other._rows_for(sample, 1)])
            self.rows_seen += other.rows_seen
            self.calls += other.calls

    def reduce_over(self, group, summaries: list["HeldSummary | None"], rank: int) -> None:
        """Make this holder the merged statistics of every rank of `group` (`summaries`: each rank's,
        in rank order, None where a rank holds none; this rank's is `summaries[rank]`): ranges by
        all-reduce MAX, Hessians by SUM, and the row sample of all ranks' rows, each row sent once by
        the rank holding it. Every rank calls it for the same sets in the same order."""
        import torch.distributed as dist
        sample = self._merged_layout(summaries)
        held = [s for s in summaries if s is not None]
        with self._lock:
            k = self.spec.k_bounds[-1]
            ranges = []
            for parity in (0, 1):
                if any(s.parities[parity] for s in held):
                    if self.parity_max[parity] is None:   # zeros: no clamped maximum is below them
                        self.parity_max[parity] = (torch.zeros(k, device=self.home), torch.zeros(k, device=self.home))
                    ranges += self.parity_max[parity]
            distributed.all_reduce_(ranges, dist.ReduceOp.MAX, group)
            if any(s.has_hessians for s in held):
                distributed.all_reduce_([p for h in self._hessians_to_reduce() for p in h.panels],
                                        dist.ReduceOp.SUM, group)
            parcels = []
            for src in range(len(summaries)):
                exact, coded = sample.taken_from(src)
                if not len(exact) and not len(coded):
                    parcels.append(RowParcel.empty(k, sample.row_dtype, self.home))
                    continue
                mine = self._rows_for(sample, src).tensors() if src == rank else None
                got = distributed.broadcast_tensors(mine, RowParcel.specs(len(exact), len(coded), k, sample.row_dtype),
                                                    src, group)
                parcels.append(RowParcel.of_tensors([t.to(self.home) for t in got], k))
            self._take_rows(sample, parcels)
            self.rows_seen = sum(s.rows_seen for s in held)
            self.calls = sum(s.calls for s in held)

    def _merged_layout(self, summaries: list["HeldSummary | None"]) -> "RowSample":
        """Check that every holder collected this site's statistics, place this one (statistics
        made only by merging others' stay on the CPU), and choose the merged row sample."""
        held = [s for s in summaries if s is not None]
        if any(s.spec != self.spec for s in held):
            raise ValueError("SiteStatistics.merge: statistics of different sites or segmentations")
        dtypes = {s.row_dtype for s in held if s.row_dtype is not None}
        if len(dtypes) > 1:
            raise ValueError(f"SiteStatistics.merge: rows kept in different dtypes {sorted(map(str, dtypes))}")
        row_dtype = dtypes.pop() if dtypes else torch.float32
        with self._lock:
            self._place(CPU, row_dtype)
        return RowSample.of(summaries, self.spec, row_dtype)

    def _hessians_to_reduce(self) -> list[HessianPanels]:
        """The Hessian sums to add others' into: zeros where this holder summed none."""
        if self.hessians is None:
            kb = self.spec.k_bounds
            self.hessians = [HessianPanels.zeros(b - a, self.home) for a, b in zip(kb[:-1], kb[1:])]
        return self.hessians

    def _rows_for(self, sample: "RowSample", holder: int) -> "RowParcel":
        """This holder's rows entering `sample`, in its order: the exact ones, then the coded ones
        (a row held exact here that the sample codes is coded from its exact values, as any holder
        would code it)."""
        exact, coded = sample.taken_from(holder)
        n = 0 if self.kept is None else len(self.kept)
        if len(exact) and int(exact.max()) >= n:
            raise AssertionError("SiteStatistics: a coded row ranks among the exact ones")
        k = self.spec.k_bounds[-1]
        rows = self.kept[exact.to(self.home)] if len(exact) else torch.empty(0, k, dtype=sample.row_dtype,
                                                                                 device=self.home)
        codes = CodedRows.empty(len(coded), k, self.home)
        here = coded < n
        if here.any():
            codes.put(here, CodedRows.encode(self.kept[coded[here].to(self.home)].float()))
        if (~here).any():
            codes.put(~here, self.coded[(coded[~here] - n).to(self.home)])
        return RowParcel(rows, codes)

    def _take_rows(self, sample: "RowSample", parcels: list["RowParcel"]) -> None:
        """Hold `sample`'s rows, put together from every holder's parcel."""
        if not len(sample.priority):
            return
        k = self.spec.k_bounds[-1]
        kept = torch.empty(sample.exact, k, dtype=sample.row_dtype, device=self.home)
        coded = CodedRows.empty(len(sample.priority) - sample.exact, k, self.home)
        for holder, parcel in enumerate(parcels):
            exact_at, coded_at = sample.places_of(holder)
            kept[exact_at.to(self.home)] = parcel.exact.to(self.home)
            if len(parcel.coded):
                coded.put(coded_at.to(self.home), parcel.coded.to(self.home))
        self.kept = kept if sample.exact else None
        self.coded = coded if len(coded) else None
        self._priority, self.row_calls = sample.priority, sample.row_calls

    def with_ranges_on(self, device) -> "SiteStatistics":
        """This object with its ranges on `device` (where the steps are computed); rows and
        Hessians stay where they are kept."""
        with self._lock:
            self.parity_max = [None if p is None else (p[0].to(device), p[1].to(device)) for p in self.parity_max]
        return self

    # ------------------------------------------------------------------ reading
    @property
    def rows(self) -> Tensor | None:
        """The exact kept rows as fp32 (a copy where they are kept 16-bit): what the searches read."""
        return None if self.kept is None else self.kept.float()

    @property
    def rows_held(self) -> int:
        """Every kept row, coded ones included (the rows GPTQ fits where no Hessian is summed)."""
        return 0 if self._priority is None else len(self._priority)

    def gptq_rows(self) -> Tensor | None:
        """Every kept row as fp32: the exact ones, then the coded ones decoded."""
        if self.kept is None or self.coded is None:
            return self.rows
        return torch.cat([self.kept.float(), self.coded.decode().to(self.kept.device)])

    @property
    def empty(self) -> bool:
        return self.parity_max == [None, None]

    def _device(self) -> torch.device:
        return next(p[0].device for p in self.parity_max if p is not None)

    def ranges(self) -> tuple[Tensor, Tensor]:
        """Per K column: the positive and negative maxima over every call."""
        held = [p for p in self.parity_max if p is not None]
        if len(held) == 1:
            return held[0]
        return torch.maximum(held[0][0], held[1][0]), torch.maximum(held[0][1], held[1][1])

    def held_out(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(positive and negative maxima of the even calls, the kept rows of the odd ones), or
        None with no odd call's row kept."""
        if self.parity_max[0] is None or self.kept is None:
            return None
        odd = self.row_calls[:len(self.kept)] % 2 == 1
        return (*self.parity_max[0], self.kept[odd.to(self.kept.device)].float()) if odd.any() else None

    def gptq_hessians(self, device) -> list[Tensor]:
        """GPTQ's Hessians per K segment: summed over every row observed where accumulated,
        else those of the kept rows."""
        if self.hessians is not None:
            return [h.full().to(device) for h in self.hessians]
        return [h.to(device) for h in segment_hessians(self.gptq_rows(), self.spec.k_bounds)]
