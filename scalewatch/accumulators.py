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

# Per-step device values are only appended to lists (no kernel launch, no sync); past this many
# they are folded into running device sums, so that memory stays bounded for any log interval.
MAX_PENDING = 1024

# The folded device vector's slots. Sums are reduced by adding across ranks, LOSS_MAX by max.
SLOTS = ("tokens", "samples", "tokens_x_seq_len", "nonfinite", "loss_sum", "loss_count", "loss_max")
_I = {name: i for i, name in enumerate(SLOTS)}


@dataclass(frozen=True)
class Interval:
    """One log interval, summed over all ranks.

    Attributes:
        tokens, samples, tokens_x_seq_len: counts of the interval (exact ints).
        nonfinite: micro-batch losses that were NaN or infinite.
        loss_sum, loss_count: sum and number of the finite micro-batch losses (Lightning's division by
            ``accumulate_grad_batches`` undone).
        loss_max: the largest finite micro-batch loss (``nan`` when there was none).
        extra: the extra device values that rode along in the collective, summed over ranks.
    """

    tokens: int
    samples: int
    tokens_x_seq_len: int
    nonfinite: int
    loss_sum: float
    loss_count: float
    loss_max: float
    extra: tuple[float, ...] = ()

    def then(self, later: Interval) -> Interval:
        """This interval followed by ``later`` (e.g. a checkpoint's reduction, then the log step's)."""
        top = max((x.loss_max for x in (self, later) if x.loss_count), default=math.nan)
        return Interval(self.tokens + later.tokens, self.samples + later.samples,
                        self.tokens_x_seq_len + later.tokens_x_seq_len, self.nonfinite + later.nonfinite,
                        self.loss_sum + later.loss_sum, self.loss_count + later.loss_count, top, later.extra)

    @property
    def mean_loss(self) -> float:
        """Mean of the finite micro-batch losses; ``nan`` when there was none."""
        return self.loss_sum / self.loss_count if self.loss_count else math.nan


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
        self._pending_tokens: list[tuple[Tensor, int]] = []  # mask-derived (tokens, seq_len) per batch
        self._pending_losses: list[Tensor] = []  # detached 0-d losses, as Lightning returned them
        self._loss_scale = 1  # factor that undoes Lightning's division of the pending losses
        self._folded: Tensor | None = None  # float64[len(SLOTS)] on the device

    def add_count(self, count: BatchCount, seq_len: int) -> None:
        """Add one micro-batch's counts; ``seq_len`` is the attention context charged to its tokens."""
        if isinstance(count.tokens, Tensor):
            # Kept as a device tensor: reading it would stall the step.
            self._pending_tokens.append((count.tokens, seq_len))
            if len(self._pending_tokens) >= self.max_pending:
                self.fold()
        else:
            self._host[0] += count.tokens
            self._host[2] += count.tokens * seq_len
        self._host[1] += count.samples

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

    def fold(self) -> Tensor:
        """Fold the pending device values into the running device vector (kernels only, no sync)."""
        vec = self._folded
        if vec is None:
            vec = torch.cat((torch.zeros(len(SLOTS) - 1, dtype=torch.float64, device=self.device),
                             torch.full((1,), -math.inf, dtype=torch.float64, device=self.device)))
        zero = vec.new_zeros(())
        if self._pending_tokens:
            tokens = torch.stack([t.reshape(()) for t, _ in self._pending_tokens]).double()
            lens = torch.tensor([sl for _, sl in self._pending_tokens], dtype=torch.float64).to(self.device,
                                                                                                 non_blocking=True)
            vec = vec + torch.stack((tokens.sum(), zero, (tokens * lens).sum(), zero, zero, zero, zero))
        if self._pending_losses:
            losses = torch.stack([x.float() for x in self._pending_losses]).double()
            if self._loss_scale != 1:
                losses = losses * self._loss_scale
            finite = torch.isfinite(losses)
            sums = torch.stack((zero, zero, zero, (~finite).sum().double(), torch.where(finite, losses, zero).sum(),
                                finite.sum().double(), zero))
            top = torch.where(finite, losses, torch.full_like(losses, -math.inf)).max()
            vec = vec + sums
            vec = torch.cat((vec[:-1], torch.maximum(vec[-1:], top.reshape(1))))  # loss_max is the last slot
        self._pending_tokens, self._pending_losses = [], []
        self._folded = vec
        return vec

    def reduce(self, world_size: int, extra: Tensor | None = None) -> tuple[Interval, Tensor | None]:
        """Fold, reduce across ranks in ONE collective, read once; every rank must call it together.

        ``extra`` (a float64 device vector, e.g. the noise-scale EMAs) rides along in the same
        collective and comes back summed over ranks, as a device tensor and in ``Interval.extra``.
        """
        dev = self.fold()
        host = torch.tensor([*self._host, 0, 0, 0, 0], dtype=torch.float64).to(dev.device)
        # float64 is exact for any interval's counts below 2**53.
        vec = host + dev
        if extra is not None:
            vec = torch.cat((vec, extra.to(vec.device, torch.float64)))
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            vec = _gather_reduce(vec, world_size)
        values = vec.tolist()  # the one host read of the interval
        self._folded = None
        self._host = [0, 0, 0]
        n = len(SLOTS)
        loss_max = values[_I["loss_max"]]
        interval = Interval(*(int(round(v)) for v in values[:4]), loss_sum=values[4], loss_count=values[5],
                            loss_max=loss_max if math.isfinite(loss_max) else math.nan, extra=tuple(values[n:]))
        return interval, (vec[n:] if extra is not None else None)


def _gather_reduce(vec: Tensor, world_size: int) -> Tensor:
    """Sum every slot across ranks except ``loss_max`` (max), with one all-gather."""
    parts = [torch.empty_like(vec) for _ in range(world_size)]
    torch.distributed.all_gather(parts, vec)
    stacked = torch.stack(parts)
    out = stacked.sum(0)
    out[_I["loss_max"]] = stacked[:, _I["loss_max"]].max()
    return out

