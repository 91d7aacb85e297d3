"""Per-interval accumulators on the device: counts and losses in named slots, one reduce per log interval.

On every micro-batch the callback adds the batch's token and sample counts (Python ints where
shapes give the count, device tensors where a mask does) and its loss (a device tensor). Nothing is
read back to the host until :meth:`IntervalAccumulator.reduce`, which folds everything into one
float64 vector, reduces it across ranks in ONE collective and reads it once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from scalewatch.accounting import BatchCount, FlopConvention
from scalewatch.monitor import Observation

# Per-step device values are only appended to lists (no kernel launch, no sync); past this many
# they are folded into running device sums, so that memory stays bounded for any log interval.
MAX_PENDING = 1024

# The folded device vectors' slots: sums are added across ranks, maxima take the max.
SUMS = ("tokens", "samples", "tokens_x_seq_len", "nonfinite", "loss_sum", "loss_count",
        "grad_norm_sum", "grad_norm_count", "grad_nonfinite")
MAXES = ("loss_max", "grad_norm_max")
_S = {name: i for i, name in enumerate(SUMS)}


@dataclass(frozen=True)
class Interval:
    """One log interval, reduced over all ranks.

    Attributes:
        tokens, samples, tokens_x_seq_len: counts of the interval (exact ints).
        nonfinite: micro-batch losses that were NaN or infinite.
        loss_sum, loss_count: sum and number of the finite micro-batch losses (Lightning's division by
            ``accumulate_grad_batches`` undone).
        loss_max: the largest finite micro-batch loss (``nan`` when there was none).
        grad_norm_sum, grad_norm_count, grad_norm_max: the finite global gradient norms of the
            interval's optimizer steps (every rank sees the same all-reduced gradient, so the sums
            are world-size multiples and only their ratio is meaningful).
        grad_nonfinite: steps whose gradient norm was not finite (summed over ranks: a flag).
        extra: the extra device values that rode along in the collective, summed over ranks.
    """

    tokens: int
    samples: int
    tokens_x_seq_len: int
    nonfinite: int
    loss_sum: float
    loss_count: float
    loss_max: float = math.nan
    grad_norm_sum: float = 0.0
    grad_norm_count: float = 0.0
    grad_norm_max: float = math.nan
    grad_nonfinite: int = 0
    extra: tuple[float, ...] = ()

    def then(self, later: Interval) -> Interval:
        """This interval followed by ``later`` (e.g. a checkpoint's reduction, then the log step's)."""
        def top(a: float, b: float) -> float:
            return max((x for x in (a, b) if math.isfinite(x)), default=math.nan)

        return Interval(self.tokens + later.tokens, self.samples + later.samples,
                        self.tokens_x_seq_len + later.tokens_x_seq_len, self.nonfinite + later.nonfinite,
                        self.loss_sum + later.loss_sum, self.loss_count + later.loss_count,
                        top(self.loss_max, later.loss_max), self.grad_norm_sum + later.grad_norm_sum,
                        self.grad_norm_count + later.grad_norm_count, top(self.grad_norm_max, later.grad_norm_max),
                        self.grad_nonfinite + later.grad_nonfinite, later.extra)

    @property
    def mean_loss(self) -> float:
        """Mean of the finite micro-batch losses; ``nan`` when there was none."""
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

    @property
    def mean_grad_norm(self) -> float | None:
        """Mean of the finite gradient norms; None when none was measured."""
        return self.grad_norm_sum / self.grad_norm_count if self.grad_norm_count else None


@dataclass
class Totals:
    """Global totals since the start of training (exact Python ints), restored on resume."""

    tokens: int = 0
    samples: int = 0
    tokens_x_seq_len: int = 0
    flops: int = 0
    nonfinite: int = 0

    def add(self, interval: Interval, convention: FlopConvention | None) -> None:
        self.tokens += interval.tokens
        self.samples += interval.samples
        self.tokens_x_seq_len += interval.tokens_x_seq_len
        self.nonfinite += interval.nonfinite
        if convention is not None:
            self.flops += convention.flops(interval.tokens, interval.tokens_x_seq_len)

    def observation(self, step: int, loss: float, time: float, lr: float | None, interval: Interval | None = None,
                    gns: tuple[float, float] | None = None) -> Observation:
        """The :class:`~scalewatch.monitor.Observation` of a log point: these totals, the interval's
        statistics (max loss, finiteness, gradient norms) and the noise-scale sums ``(|G|², tr Σ)``.

        Example:
            >>> Totals(tokens=64, samples=2).observation(step=1, loss=3.5, time=0.1, lr=1e-3).tokens
            64
        """
        i = interval
        return Observation(step=step, tokens=self.tokens, samples=self.samples, flops=self.flops, loss=loss,
                           time=time, lr=lr, nonfinite=self.nonfinite, loss_max=i.loss_max if i else math.nan,
                           all_finite=not i.nonfinite if i else True, grad_norm=i.mean_grad_norm if i else None,
                           grad_norm_max=i.grad_norm_max if i and i.grad_norm_count else None,
                           grad_nonfinite=i.grad_nonfinite if i else 0,
                           gns_g2=gns[0] if gns else None, gns_trace=gns[1] if gns else None)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("tokens", "samples", "tokens_x_seq_len", "flops", "nonfinite"):
            setattr(self, name, int(state[name]))


class IntervalAccumulator:
    """This rank's unreduced counts and losses of the current log interval.

    Example:
        >>> acc = IntervalAccumulator("cpu")
        >>> acc.add_count(BatchCount(tokens=torch.tensor(5), samples=2, seq_len=4), seq_len=4)
        >>> acc.add_loss(torch.tensor(1.5), scale=2)   # Lightning divided it by 2
        >>> acc.add_loss(torch.tensor(float("nan")), scale=2)
        >>> iv, _ = acc.reduce(world_size=1)
        >>> iv.tokens, iv.samples, iv.tokens_x_seq_len, iv.nonfinite, iv.loss_sum, iv.loss_max
        (5, 2, 20, 1, 3.0, 3.0)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.max_pending = MAX_PENDING
        self._host = [0, 0, 0]  # tokens, samples, tokens x seq_len known from shapes
        # Per batch with a device-side count: (tokens, seq_len, attention sum or None, samples).
        self._pending_tokens: list[tuple[Any, int, Any, Any]] = []
        self._pending_losses: list[Tensor] = []  # detached 0-d losses, as Lightning returned them
        self._pending_grads: list[Tensor] = []  # 0-d global gradient norms, one per optimizer step
        self._grads_scaled: list[bool] = []  # per norm: under fp16 loss scaling (non-finite is then expected)
        self._loss_scale = 1  # factor that undoes Lightning's division of the pending losses
        self._sums: Tensor | None = None  # float64[len(SUMS)] on the device
        self._maxes: Tensor | None = None  # float64[len(MAXES)] on the device

    def add_count(self, count: BatchCount, seq_len: int | None = None) -> None:
        """Add one micro-batch's counts. ``seq_len`` (a fixed attention context) is charged to every token
        when given; else the batch's own: ``count.attn`` where the batch knows it (packed), or its length."""
        attn = count.attn if seq_len is None else None
        seq_len = seq_len if seq_len is not None else count.seq_len
        if isinstance(count.tokens, Tensor) or isinstance(attn, Tensor) or isinstance(count.samples, Tensor):
            # Kept as device tensors: reading them would stall the step.
            self._pending_tokens.append((count.tokens, seq_len, attn, count.samples))
            if len(self._pending_tokens) >= self.max_pending:
                self.fold()
            return
        self._host[0] += count.tokens
        self._host[1] += count.samples
        self._host[2] += count.tokens * seq_len if attn is None else int(round(attn))

    def add_loss(self, loss: Tensor, scale: int) -> None:
        """Add one micro-batch loss that was divided by ``scale`` (undone when folding, not per batch)."""
        if scale != self._loss_scale:
            if self._pending_losses:
                self.fold()  # the pending losses were divided by the previous factor
            self._loss_scale = scale
        loss = loss.detach()
        self._pending_losses.append(loss if loss.ndim == 0 else loss.float().mean())
        if len(self._pending_losses) >= self.max_pending:
            self.fold()

    def add_grad_norm(self, norm: Tensor, loss_scaled: bool = False) -> None:
        """Add one optimizer step's global gradient norm (a 0-d device tensor).

        ``loss_scaled``: the step ran under fp16 dynamic loss scaling, where an overflowing (non-finite)
        gradient is routine and the scaler skips the step: it is left out, not counted as non-finite.
        """
        self._pending_grads.append(norm)
        self._grads_scaled.append(loss_scaled)
        if len(self._pending_grads) >= self.max_pending:
            self.fold()

    def fold(self) -> tuple[Tensor, Tensor]:
        """Fold the pending device values into the running device vectors (kernels only, no sync)."""
        if self._sums is None or self._maxes is None:
            self._sums = torch.zeros(len(SUMS), dtype=torch.float64, device=self.device)
            self._maxes = torch.full((len(MAXES),), -math.inf, dtype=torch.float64, device=self.device)
        sums, tops = [], []
        zero = self._sums.new_zeros(())
        ninf = torch.full((), -math.inf, dtype=torch.float64, device=self.device)
        if self._pending_tokens:
            sums += self._fold_counts()
        for name, pending in (("loss", self._pending_losses), ("grad_norm", self._pending_grads)):
            if not pending:
                continue
            values = torch.stack([x.float() for x in pending]).double()
            if name == "loss" and self._loss_scale != 1:
                values = values * self._loss_scale
            finite = torch.isfinite(values)
            bad = "nonfinite" if name == "loss" else "grad_nonfinite"
            flagged = ~finite
            if name == "grad_norm" and any(self._grads_scaled):
                scaled = torch.tensor(self._grads_scaled, dtype=torch.bool).to(self.device, non_blocking=True)
                flagged = flagged & ~scaled
            sums += [(bad, flagged.sum().double()), (f"{name}_sum", torch.where(finite, values, zero).sum()),
                     (f"{name}_count", finite.sum().double())]
            tops.append((f"{name}_max", torch.where(finite, values, ninf).max()))
        if sums:
            add = dict(sums)
            self._sums = self._sums + torch.stack([add.get(k, zero) for k in SUMS])
        if tops:
            top = dict(tops)
            self._maxes = torch.maximum(self._maxes, torch.stack([top.get(k, ninf) for k in MAXES]))
        self._pending_tokens, self._pending_losses, self._pending_grads, self._grads_scaled = [], [], [], []
        return self._sums, self._maxes

    def _fold_counts(self) -> list[tuple[str, Tensor]]:
        """The pending counts (device tensors and ints mixed) as device sums: one small copy per kind."""
        def dev(values: list[Any]) -> Tensor:
            if all(isinstance(v, Tensor) for v in values):
                return torch.stack([v.reshape(()).to(self.device, torch.float64) for v in values])
            ints = torch.tensor([0.0 if isinstance(v, Tensor) else float(v) for v in values], dtype=torch.float64)
            out = ints.to(self.device, non_blocking=True)
            dense = [(i, v) for i, v in enumerate(values) if isinstance(v, Tensor)]
            if dense:
                idx = torch.tensor([i for i, _ in dense]).to(self.device, non_blocking=True)
                out = out.index_add(0, idx, torch.stack([v.reshape(()).to(self.device, torch.float64)
                                                         for _, v in dense]))
            return out

        pending = self._pending_tokens
        tokens = dev([t for t, _, _, _ in pending])
        lens = dev([sl for _, sl, _, _ in pending])
        attn_given = [a is not None for _, _, a, _ in pending]
        attn = tokens * lens
        if any(attn_given):
            mask = torch.tensor(attn_given).to(self.device, non_blocking=True)
            attn = torch.where(mask, dev([a if a is not None else 0 for _, _, a, _ in pending]), attn)
        return [("tokens", tokens.sum()), ("samples", dev([s for _, _, _, s in pending]).sum()),
                ("tokens_x_seq_len", attn.sum())]

    def reduce(self, world_size: int, extra: Tensor | None = None) -> tuple[Interval, Tensor | None]:
        """Fold, reduce across ranks in ONE collective, read once; every rank must call it together.

        ``extra`` (a float64 device vector, e.g. the noise-scale EMAs) rides along in the same
        collective and comes back summed over ranks, as a device tensor and in ``Interval.extra``.
        """
        sums, maxes = self.fold()
        host = torch.tensor([*self._host] + [0] * (len(SUMS) - 3), dtype=torch.float64).to(sums.device)
        # float64 is exact for any interval's counts below 2**53. Layout: sums, extra, maxima.
        parts = [host + sums] + ([extra.to(sums.device, torch.float64)] if extra is not None else []) + [maxes]
        vec = torch.cat(parts)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            vec = _gather_reduce(vec, world_size, len(MAXES))
        values = vec.tolist()  # the one host read of the interval
        self._sums = self._maxes = None
        self._host = [0, 0, 0]
        n, m = len(SUMS), len(MAXES)
        named = dict(zip(SUMS, values[:n], strict=True))
        named.update({k: (v if math.isfinite(v) else math.nan) for k, v in zip(MAXES, values[-m:], strict=True)})
        for k in ("tokens", "samples", "tokens_x_seq_len", "nonfinite", "grad_nonfinite"):
            named[k] = int(round(named[k]))
        interval = Interval(**named, extra=tuple(values[n:-m]))
        return interval, (vec[n:-m] if extra is not None else None)


def _gather_reduce(vec: Tensor, world_size: int, n_max: int) -> Tensor:
    """Sum every slot across ranks except the last ``n_max`` (max), with one all-gather."""
    parts = [torch.empty_like(vec) for _ in range(world_size)]
    torch.distributed.all_gather(parts, vec)
    stacked = torch.stack(parts)
    return torch.cat((stacked[:, :-n_max].sum(0), stacked[:, -n_max:].amax(0)))
