"""One fit's counting: the model's size and FLOP convention, each micro-batch's tokens on the device,
the interval reduced once per log point, and the global totals that go through the checkpoint.

Torch only, no Lightning: the callback hands it batches and losses, a plain training loop can too.

Example:
    >>> import torch
    >>> from scalewatch.config import ScaleWatchConfig
    >>> counter = RunCounter(ScaleWatchConfig())
    >>> _ = counter.count_model(torch.nn.Linear(4, 4))
    >>> counter.start("cpu")
    >>> counter.add(counter.before_batch(torch.zeros(2, 8, dtype=torch.long)), torch.tensor(3.0), 1)
    >>> _ = counter.reduce(world_size=1)
    >>> interval = counter.take_interval()
    >>> counter.totals.tokens, counter.totals.flops, interval.mean_loss
    (16, 1920, 3.0)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from scalewatch.accounting import (
    BatchCount,
    FirstBatchFlops,
    FlopConvention,
    ParamCount,
    choose_flop_convention,
    choose_n_params,
    count_parameters,
    count_with,
    describe_conventions,
    measured_shortfall,
)
from scalewatch.accumulators import Interval, IntervalAccumulator, Totals
from scalewatch.config import ScaleWatchConfig

log = logging.getLogger("scalewatch")


class RunCounter:
    """Tokens, samples and FLOPs of one fit: counted per micro-batch on the device, never read back
    until :meth:`take_interval` reduces them (one collective) at a log point or a checkpoint."""

    def __init__(self, config: ScaleWatchConfig) -> None:
        self.cfg = config
        self.params: ParamCount | None = None
        self.n_params: int | None = None
        self.convention: FlopConvention | None = None  # None with flops="measured" until the first batch
        self.totals = Totals()  # global totals since the start of training, restored on resume
        self.acc: IntervalAccumulator | None = None  # this rank's unreduced interval; set when training starts
        self.carried: Interval | None = None  # reduced at a checkpoint, not yet logged
        self.seen_batches = 0
        self.shift_labels = False  # a causal LM that shifts its labels inside
        self._pending: BatchCount | None = None  # counted before the step, added after it
        self._flop_counter: FirstBatchFlops | None = None

    def count_model(self, module: torch.nn.Module) -> str:
        """Count the parameters and choose the FLOP convention; returns the label of the count used."""
        cfg = self.cfg
        self.params = count_parameters(module)
        self.n_params, label = choose_n_params(self.params, cfg.n_params, cfg.param_convention)
        self.convention = choose_flop_convention(cfg.flops, self.n_params, module, cfg.n_layer, cfg.d_model)
        return label

    def start(self, device: torch.device | str) -> None:
        self.acc = IntervalAccumulator(device)

    def before_batch(self, batch: Any) -> BatchCount:
        """Count a micro-batch before its step (the noise-scale capture needs its size during backward)."""
        self._pending = self._count(batch)
        if self.cfg.flops == "measured" and self.convention is None and self._flop_counter is None:
            self._flop_counter = FirstBatchFlops()  # left in add(): it sees forward AND backward
        return self._pending

    def pending(self, batch: Any) -> BatchCount:
        """The count taken before this batch's step (or taken now, for a loop that skipped that call)."""
        count, self._pending = self._pending, None
        return count if count is not None else self._count(batch)

    def _count(self, batch: Any) -> BatchCount:
        cfg = self.cfg
        needs_seq_len = bool(self.convention and self.convention.attention_coeff and not cfg.context_length)
        return count_with(batch, cfg.tokens_fn, cfg.samples_fn, self.seen_batches == 0, needs_seq_len,
                          self.shift_labels)

    def add(self, count: BatchCount, loss: Tensor | None, divisor: int) -> None:
        """Add a trained micro-batch; ``loss`` was divided by ``divisor`` (gradient accumulation)."""
        assert self.acc is not None, "start() first"
        self.seen_batches += 1
        self.acc.add_count(count, self.cfg.context_length)
        if loss is not None:
            self.acc.add_loss(loss, divisor)
        if self._flop_counter is not None:
            # FLOPs of the positions the model ran (padding included), charged per training token.
            self.convention = self._flop_counter.finish(count.positions or int(count.tokens))
            self._flop_counter = None
            log.info("scalewatch: FLOPs: %s", self.convention.description)
            short = measured_shortfall(self.convention.per_token, self.params, self.n_params)
            if short:  # measured once per fit (the first batch), so said once
                log.warning(short)

    def reduce(self, world_size: int, extra: Tensor | None = None) -> tuple[Interval | None, Tensor | None]:
        """Fold every rank's unreduced counts into the totals (ONE collective; all ranks call it).
        ``extra`` rides along in the same collective and comes back summed."""
        if self.acc is None:
            return None, None
        interval, summed = self.acc.reduce(world_size, extra)
        self.totals.add(interval, self.convention)
        self.carried = interval if self.carried is None else self.carried.then(interval)
        return interval, summed

    def take_interval(self) -> Interval | None:
        """Everything reduced since the last log point (a checkpoint's reduce included)."""
        interval, self.carried = self.carried, None
        return interval

    def describe(self) -> str:
        return describe_conventions(self.n_params, self.params, self.convention, self.cfg.flops)

    def state_dict(self) -> dict[str, Any]:
        return {**self.totals.state_dict(), "n_params": self.n_params,
                "flop_convention": None if self.convention is None else self.convention.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.load_state_dict(state)
        conv = state.get("flop_convention")
        if conv is not None and self.cfg.flops == "measured":
            # A measured convention is kept across resumes so the FLOP series stays consistent.
            self.convention = FlopConvention.from_state(conv)
