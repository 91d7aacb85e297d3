"""``ScaleWatch``: the Lightning callback, a thin adapter around :class:`~scalewatch.monitor.Monitor`.

On every micro-batch it adds the batch's counts and loss to an
:class:`~scalewatch.accumulators.IntervalAccumulator` (nothing is read back to the host); once per
log interval it reduces them across ranks in ONE collective, turns them into an
:class:`~scalewatch.monitor.Observation` and hands it to the Monitor, whose sinks (rank 0 only)
write the report to the trainer's loggers. Everything else (the pipeline, the noise-scale maths,
the forecasts, the TensorBoard layout) lives outside this file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from scalewatch.accounting import (
    BatchCount,
    FlopConvention,
    ParamCount,
    choose_flop_convention,
    choose_n_params,
    count_parameters,
    count_with,
    describe_conventions,
    measured_flops_per_token,
    peak_flops_per_second,
)
from scalewatch.accumulators import Interval, IntervalAccumulator, Totals
from scalewatch.alerts import HEALTH_LEVEL, LogSink
from scalewatch.config import (
    ScaleWatchConfig,
    ScaleWatchConfigError,
    build_monitor,
    curve_law_warnings,
    describe_laws,
)
from scalewatch.curves import CurveError, CurveLaw, schedule_from_arg
from scalewatch.detectors import AllocationDetector, DivergenceDetector, HealthConfig
from scalewatch.forecast import CurvePlugin
from scalewatch.gns_capture import NoiseScaleTracker, PerExampleNorms, choose_gns_method, grad_sq_norm
from scalewatch.monitor import Observation, Report
from scalewatch.tensorboard import PREFIX, TensorBoardExtras

__all__ = ["ScaleWatch", "choose_gns_method", "lookahead_schedule"]

log = logging.getLogger("scalewatch")

_LOSS_KEYS = ("train_loss", "loss", "train/loss", "training_loss")
_NEVER_STOP = ("internal_error", "undertrained", "overtrained", "repeated_data", "batch_size")
_STATE_VERSION = 1


def _loss_from_outputs(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if isinstance(loss, Tensor):
            return loss
    return None


def lookahead_schedule(trainer: Trainer, total: int) -> Any:
    """The LR of the first parameter group at every step 0..total, by stepping a COPY of the scheduler.

    The copy runs on a stand-in optimizer with the same parameter groups but one tiny
    parameter each, so neither the model, the real optimizer nor the real scheduler is
    touched. Without a scheduler the LR is constant.
    """
    if not trainer.optimizers:
        raise CurveError("no optimizer to read the learning rate from; pass ScaleWatch(schedule=...)")
    opt = trainer.optimizers[0]
    lr0 = float(opt.param_groups[0]["lr"])
    configs = [c for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is opt]
    if not configs:
        return np.full(total + 1, lr0)
    cfg = configs[0]
    stand_in = torch.optim.SGD([{**{k: v for k, v in g.items() if k != "params"},
                                 "params": [torch.zeros(1, requires_grad=True)]} for g in opt.param_groups], lr=lr0)
    sched = copy.deepcopy(cfg.scheduler, memo={id(opt): stand_in})
    every = max(int(cfg.frequency or 1), 1)
    if cfg.interval == "epoch":
        every *= max(int(trainer.num_training_batches // max(trainer.accumulate_grad_batches, 1)), 1)
    start = trainer.global_step
    lrs = np.empty(total + 1)
    lrs[: start + 1] = lr0  # before the start of this session (a resume without a saved schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": it is a copy
        for step in range(start + 1, total + 1):
            if step % every == 0:
                sched.step()
            lrs[step] = float(stand_in.param_groups[0]["lr"])
    return lrs


def checkpoint_at_or_before(trainer: Trainer, step: int) -> str | None:
    """The newest checkpoint file the run's ModelCheckpoint callbacks saved at or before ``step``
    (read from the ``step=N`` in Lightning's file names), for the divergence alert's message."""
    import re

    best: tuple[int, str] | None = None
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None)
        for path in Path(folder).glob("*.ckpt") if folder and Path(folder).is_dir() else ():
            m = re.search(r"step=(\d+)", path.name)
            if m and int(m.group(1)) <= step and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), str(path))
    return best[1] if best else None


def _total_steps(trainer: Trainer) -> int | None:
    """The run's planned optimizer steps, None when it is endless or unknown."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # e.g. a dataloader without a length
        return None
    return int(total) if total is not None and math.isfinite(total) else None


class LoggerSink:
    """Sends each report to the trainer's loggers (``log_metrics``); TensorBoard loggers also get the
    texts, the custom-scalars layout and the loss-vs-tokens / loss-vs-GFLOP series."""

    name = "loggers"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.extras = TensorBoardExtras()

    def write(self, report: Report) -> None:
        metrics = {PREFIX + k: v for k, v in report.scalars.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=report.step)
            if isinstance(logger, TensorBoardLogger):
                self.extras.write(logger.experiment, report)


class ScaleWatch(Callback):
    r"""Count the tokens and compute a run really spends and log them against the loss.

    Attach it to an existing ``Trainer``; nothing else changes::

        trainer = Trainer(callbacks=[ScaleWatch()])

    Logged every ``log_every_n_steps`` optimizer steps (all counts global across
    ranks and since the start of training, resume included), under ``scalewatch/``:
    ``tokens``, ``samples``, ``flops``, ``n_params``, ``tokens_per_param``,
    ``tokens_per_sec``, ``samples_per_sec``, ``flops_per_sec``, ``mfu`` (when the
    peak FLOP/s is known), ``loss`` (mean of the finite micro-batch training losses
    since the previous log point), ``nonfinite_losses``, ``lr``; and, to TensorBoard,
    ``loss_vs_tokens`` (x-axis: tokens) and ``loss_vs_gflop`` (x-axis: GFLOP).

    Args:
        tokens_fn: ``tokens_fn(batch) -> int | integer tensor`` overrides token counting
            (default: read ``[B, T]`` ids, a dict with ``input_ids`` / ``attention_mask`` /
            ``labels``, or a tuple holding the ids).
        samples_fn: ``samples_fn(batch) -> int`` overrides the sequence count.
        n_params: N to use instead of counting the module's trainable parameters.
        param_convention: ``"total"`` (Chinchilla: all trainable parameters) or
            ``"non_embedding"`` (Kaplan).
        flops: ``"6N"`` (default), ``"6N+attn"`` (adds ``12·n_layer·d_model·T``, the
            PaLM/nanoGPT convention, T = the batch's sequence length or ``context_length``),
            ``"measured"`` (``torch.utils.flop_counter.FlopCounterMode`` over the first
            training batch, forward and backward), or a number of FLOPs per token.
        n_layer, d_model: architecture for ``"6N+attn"``; inferred from common attribute
            names (``n_layer``, ``num_hidden_layers``, ``n_embd``, ``hidden_size``, ... on the
            module or its ``config``/``hparams``) when not given.
        context_length: fixed attention context for ``"6N+attn"`` instead of the batch's.
        peak_flops: peak FLOP/s of ONE device, for MFU; default: Lightning's table for the
            device and precision (none for CPUs, then MFU is not logged).
        log_every_n_steps: optimizer steps between log points (default: the trainer's).
        loss_key: name under which the module logs its training loss, used when
            ``training_step`` returns no loss (default: tries ``train_loss``, ``loss``, ...).
        history_size: observations kept in the bounded history.
        gns: gradient noise scale capture. ``"auto"`` (default) uses what the training
            already computes: under DDP each rank's local gradient before the all-reduce
            against the global one, under gradient accumulation each micro-batch's gradient
            against the step's; with neither it says so once and logs no noise scale.
            ``"per_example"`` (single device, no accumulation, opt-in: extra compute, about
            +30% step time on the example GPT on CPU) takes per-example gradient norms of the
            Linear/LayerNorm/RMSNorm weights; ``"per_example_norm"`` of the LayerNorm/RMSNorm
            weights only (Gray et al.: they track the whole model's noise scale), far cheaper.
            ``"ddp"`` / ``"accumulation"`` insist on one method; ``"off"`` disables it.
            Logged under ``scalewatch/gns/``: ``b_simple`` (sequences), ``b_simple_tokens``,
            ``b_crit`` (tokens), ``batch_size``, ``batch_tokens``, ``steps_factor``,
            ``compute_factor``, ``g2``, ``trace`` and ``b_crit_kaplan_ref``.
        gns_decay: EMA decay per optimizer step of the noise-scale estimates.
        curve_law: a curve-law file from ``scalewatch fit --curves --out`` (or a
            :class:`~scalewatch.curves.CurveLaw`): logs ``loss_pred`` with ``loss_pred_low`` /
            ``loss_pred_high`` (90% band), ``loss_residual`` (in units of the band's
            half-width), ``loss_forecast_final`` with its band, and a TensorBoard
            custom-scalars chart of the live loss inside the predicted band.
        schedule: the run's LR per optimizer step for the prediction (a sequence, a
            ``step,lr`` CSV path, or ``fn(step) -> lr``). Default: the configured LR
            scheduler evaluated ahead on a copy (training state untouched).
        forecast_in_background: run the final-loss forecast (a small fit, milliseconds) on a
            worker thread, off the training loop; each log point then reports the latest
            finished forecast and the step it was based on (``loss_forecast_at_step``).
        alerts_jsonl: also append every alert (firing / resolved) to this JSON-lines file.
        detect: run the run-health detectors (non-finite values, loss and gradient-norm spikes,
            divergence, saturation, off-curve, under/over-training, batch size); see the README.
        health: their thresholds (:class:`~scalewatch.detectors.HealthConfig`).
        law: a Chinchilla law file (``scalewatch fit --out``) for the compute-optimal tokens per
            parameter and the losses in the ``undertrained`` alert (default: about 20 tokens/param).
        unique_tokens: distinct tokens in the training data, to flag more than ~4 epochs of repetition.
        stop_on: ``"critical"`` (or ``"warning"``) stops training cleanly, all ranks together, once an
            alert of that severity fires.
        webhook_url: a Slack-compatible webhook for alerts (default: ``SCALEWATCH_WEBHOOK_URL``); sent
            from a background thread, never written anywhere.
        run_name: the run's name in alerts.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from scalewatch import ScaleWatch
        >>> trainer = Trainer(max_steps=10, callbacks=[ScaleWatch(flops="6N+attn")],
        ...                   enable_progress_bar=False, logger=False)
    """

    def __init__(
        self,
        *,
        tokens_fn: Callable[[Any], int | Tensor] | None = None,
        samples_fn: Callable[[Any], int] | None = None,
        n_params: int | None = None,
        param_convention: str = "total",
        flops: str | float = "6N",
        n_layer: int | None = None,
        d_model: int | None = None,
        context_length: int | None = None,
        peak_flops: float | None = None,
        log_every_n_steps: int | None = None,
        loss_key: str | None = None,
        history_size: int = 2048,
        gns: str | None = "auto",
        gns_decay: float = 0.99,
        curve_law: str | Path | CurveLaw | None = None,
        schedule: Sequence[float] | str | Path | Callable[[int], float] | None = None,
        forecast_in_background: bool = True,
        alerts_jsonl: str | Path | None = None,
        detect: bool = True,
        health: HealthConfig | None = None,
        law: str | Path | None = None,
        unique_tokens: float | None = None,
        stop_on: str | None = None,
        webhook_url: str | None = None,
        run_name: str = "run",
    ) -> None:
        self.config = ScaleWatchConfig(
            tokens_fn=tokens_fn, samples_fn=samples_fn, n_params=n_params, param_convention=param_convention,
            flops=flops, n_layer=n_layer, d_model=d_model, context_length=context_length, peak_flops=peak_flops,
            log_every_n_steps=log_every_n_steps, loss_key=loss_key, history_size=history_size,
            gns="off" if gns is None else gns, gns_decay=gns_decay, curve_law=curve_law, schedule=schedule,
            forecast_in_background=forecast_in_background, alerts_jsonl=alerts_jsonl, detect=detect, health=health,
            law=law, unique_tokens=unique_tokens, stop_on=stop_on, webhook_url=webhook_url, run_name=run_name)
        # The schedule is read when training starts (the trainer knows the run's length and scheduler).
        self.monitor = build_monitor(dataclasses.replace(self.config, schedule=None))
        self._own_sinks = list(self.monitor.sinks)  # JSONL, webhook: the trainer's sinks are added per fit
        self._stop_kinds: set[str] = set()
        self._gns_shares_norm = False  # set when training starts  # alerts that fired in this session (stop_on considers only these)
        self.noise_scale = NoiseScaleTracker(
            self.config.gns_decay, note=lambda key, msg: self._note("gns_" + key, "gradient noise scale: " + msg))
        self.params: ParamCount | None = None
        self.n_params: int | None = None
        self.convention: FlopConvention | None = None
        self.totals = Totals()  # global totals since the start of training, restored on resume
        self.latest: dict[str, float] = {}  # the scalars of the last log point, on rank 0 (detection runs there)
        self._acc: IntervalAccumulator | None = None  # this rank's unreduced interval; set when training starts
        self._carried: Interval | None = None  # reduced at a checkpoint, not yet logged
        self._schedule_saved: np.ndarray | None = None  # the schedule of this run, kept for resume
        self._batch_count: BatchCount | None = None
        self._flop_counter: Any = None
        self._seen_batches = 0
        self._last_global_step = 0
        self._last_logged_step = -1
        self._t0 = time.perf_counter()
        self._val_started: float | None = None
        self._trainer: Trainer | None = None
        self._said: set[str] = set()

    # ------------------------------------------------------------------ read-only views
    @property
    def state_key(self) -> str:
        return "ScaleWatch"

    # The constructor's settings, as they were attributes before the configuration record existed.
    flops_mode = property(lambda self: self.config.flops)
    gns_mode = property(lambda self: self.config.gns)
    gns_decay = property(lambda self: self.config.gns_decay)
    param_convention = property(lambda self: self.config.param_convention)
    tokens = property(lambda self: self.totals.tokens, doc="Training tokens so far, all ranks, resumes included.")
    samples = property(lambda self: self.totals.samples, doc="Sequences so far, all ranks.")
    flops = property(lambda self: self.totals.flops, doc="Model FLOPs so far (the run's convention).")
    nonfinite = property(lambda self: self.totals.nonfinite, doc="Non-finite micro-batch losses so far.")
    tokens_x_seq_len = property(lambda self: self.totals.tokens_x_seq_len)
    gns_method = property(lambda self: self.noise_scale.method, doc="The noise-scale capture in use, or None.")

    @property
    def curve_plugin(self) -> CurvePlugin | None:
        """The curve-law forecaster of the monitor, when a curve law was given."""
        return next((p for p in self.monitor.plugins if isinstance(p, CurvePlugin)), None)

    def _note(self, key: str, message: str) -> None:
        """Say a message once per run (rank 0)."""
        if key not in self._said:
            self._said.add(key)
            if self._trainer is None or self._trainer.is_global_zero:
                log.warning("scalewatch: %s", message)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        cfg = self.config
        self.params = count_parameters(pl_module)
        self.n_params, n_label = choose_n_params(self.params, cfg.n_params, cfg.param_convention)
        self.convention = choose_flop_convention(cfg.flops, self.n_params, pl_module, cfg.n_layer, cfg.d_model)
        self.monitor.n_params = self.n_params
        self.monitor.peak_flops = peak_flops_per_second(pl_module.device, str(trainer.precision), trainer.world_size,
                                                        cfg.peak_flops)
        self.monitor.sinks = [LoggerSink(trainer), LogSink(), *self._own_sinks] if trainer.is_global_zero else []
        if self.curve_plugin is not None:
            self.curve_plugin.n_params = self.n_params
            for message in curve_law_warnings(self.curve_plugin.law, cfg.param_convention):
                self._note(message, message)
        if trainer.is_global_zero:
            log.info("scalewatch: %s = %s; FLOPs: %s", n_label, f"{self.n_params:,}",
                     self.convention.description if self.convention else "measured on the first batch")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument but must reduce across ranks

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._acc = IntervalAccumulator(pl_module.device)
        self._last_global_step = trainer.global_step
        self._t0 = time.perf_counter()
        self.monitor.start(self._observation(trainer, loss=math.nan))
        self._start_gns(trainer, pl_module)
        self._setup_schedule(trainer)
        for plugin in self.monitor.plugins:
            if isinstance(plugin, AllocationDetector):
                plugin.total_steps = _total_steps(trainer)
            if isinstance(plugin, DivergenceDetector):
                plugin.checkpoint_before = lambda step: checkpoint_at_or_before(trainer, step)

    def _start_gns(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.noise_scale.remove()
        method, message = choose_gns_method(self.config.gns, trainer.strategy, trainer.world_size,
                                            trainer.accumulate_grad_batches, pl_module.automatic_optimization)
        if message is not None:
            self._note("gns_method", f"gradient noise scale: {message}")
        if method is not None and self.noise_scale.start(method, pl_module, pl_module.device,
                                                 getattr(trainer.strategy, "model", None),
                                                 getattr(trainer.strategy, "process_group", None)):
            if trainer.is_global_zero:
                log.info("scalewatch: gradient noise scale from %s", self.noise_scale.description)
        # The noise scale's big-batch norm is the squared norm of .grad over the capture's parameters:
        # when those are the optimizer's, the gradient-norm detector has just read it; no second read.
        capture = self.noise_scale.capture
        trained = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
                   if p.requires_grad}
        self._gns_shares_norm = (capture is not None and not isinstance(capture, PerExampleNorms)
                                 and len(trainer.optimizers) == 1 and {id(p) for p in capture.params} == trained)

    # ------------------------------------------------------------------ predicted curve
    def _setup_schedule(self, trainer: Trainer) -> None:
        plugin = self.curve_plugin
        if plugin is None:
            return
        try:
            total = _total_steps(trainer)
            if total is None:
                raise CurveError("the run's length is unknown (no max_steps, no finite epochs)")
            schedule = schedule_from_arg(self.config.schedule, total)
            if schedule is None:  # read ahead from the run's own scheduler; on resume, the schedule seen at the start
                schedule = self._schedule_saved if self._schedule_saved is not None else lookahead_schedule(trainer,
                                                                                                            total)
            if len(schedule) - 1 < total:
                self._note("schedule_short", f"the LR schedule covers steps 0..{len(schedule) - 1} but the run goes "
                           f"to step {total}; the predicted curve stops at step {len(schedule) - 1}")
            plugin.set_schedule(schedule)
            self._schedule_saved = plugin.schedule
        except Exception as exc:
            # A schedule we cannot read (a bad file, an endless run, a scheduler that cannot be
            # copied) must not stop the run: no prediction, everything else works.
            plugin.schedule = None
            self._note("schedule", f"no predicted curve: {exc}")

    # ------------------------------------------------------------------ hot path
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Counted before the step so that the noise-scale capture knows each micro-batch's size.
        self._batch_count = self._count(batch, self._seen_batches == 0)
        self.noise_scale.add_batch(self._batch_count.samples)
        if self.config.flops == "measured" and self.convention is None and self._flop_counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            # Entered here and left in on_train_batch_end so that the user's own
            # forward AND backward of this first batch are what gets counted.
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = self._batch_count if self._batch_count is not None else self._count(batch, self._seen_batches == 0)
        self._batch_count = None
        self._seen_batches += 1
        assert self._acc is not None
        self._acc.add_count(count, self.config.context_length or count.seq_len)
        loss = _loss_from_outputs(outputs)
        if loss is not None:
            # Lightning hands back loss / accumulate_grad_batches; undone when folding, not per batch.
            self._acc.add_loss(loss, trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
        if self._flop_counter is not None:
            counter, self._flop_counter = self._flop_counter, None
            counter.__exit__(None, None, None)
            # First batch only: one host read of its token count is fine here.
            self.convention = measured_flops_per_token(int(counter.get_total_flops()), int(count.tokens))
            log.info("scalewatch: FLOPs: %s", self.convention.description)
        if trainer.global_step != self._last_global_step:  # an optimizer step happened
            self._last_global_step = trainer.global_step
            every = self.config.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
            if trainer.global_step % every == 0:
                self._log(trainer, loss_seen=loss is not None)

    def _count(self, batch: Any, first: bool) -> BatchCount:
        cfg = self.config
        count = count_with(batch, cfg.tokens_fn, cfg.samples_fn, first)
        if first and self.convention is not None and self.convention.attention_coeff \
                and not (cfg.context_length or count.seq_len):
            raise ScaleWatchConfigError("scalewatch: flops='6N+attn' cannot see a sequence length in the batch; "
                                        "pass ScaleWatch(context_length=...)")
        return count

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.noise_scale.end_backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Before gradient clipping (Lightning clips after this hook) and after AMP unscaling.
        sq = None
        try:
            if self.config.detect and self._acc is not None:
                sq = self._add_grad_norm(trainer, optimizer)
        except Exception as exc:  # monitoring must never crash the run
            self._note("grad_norm", f"gradient norm not measured: {type(exc).__name__}: {exc}")
        try:
            automatic = pl_module.automatic_optimization
            self.noise_scale.step(trainer.accumulate_grad_batches if automatic else 1, automatic, trainer.world_size,
                                  self._amp_scale(trainer, pl_module, optimizer),
                                  big_sq=sq if self._gns_shares_norm else None)
        except Exception as exc:  # monitoring must never crash the run; the state stays, updates stop
            self._note("gns_error", f"gradient noise scale: stopped after {type(exc).__name__}: {exc}")
            self.noise_scale.remove()

    def _add_grad_norm(self, trainer: Trainer, optimizer: Any) -> Tensor | None:
        """The global gradient norm before clipping: one fused foreach kernel, kept on the device.

        Returns the squared norm of ``.grad`` as read (the noise scale reuses it)."""
        assert self._acc is not None
        sq = grad_sq_norm([p for group in optimizer.param_groups for p in group["params"]])
        if sq is None:
            return None
        norm = sq.sqrt()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        raw = getattr(optimizer, "_optimizer", optimizer)
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, Tensor) and getattr(raw, "_step_supports_amp_scaling", False):
            norm = norm / scale.to(norm.device, norm.dtype)  # such optimizers unscale inside step(): undo here
        self._acc.add_grad_norm(norm, loss_scaled=scaler is not None)
        return sq

    @staticmethod
    def _amp_scale(trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> Tensor | None:
        """The fp16 loss scale (device tensor) when the hooks saw scaled gradients but ``.grad`` is unscaled."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        if not isinstance(scale, Tensor) or not pl_module.automatic_optimization:
            return None  # manual optimization: Lightning does not unscale before this hook
        raw = getattr(optimizer, "_optimizer", optimizer)
        if getattr(raw, "_step_supports_amp_scaling", False):
            return None  # such optimizers unscale inside step(): .grad is still scaled here
        return scale

    # ------------------------------------------------------------------ log interval
    def _reduce(self, trainer: Trainer) -> None:
        """Fold every rank's unreduced counts into the global totals (ONE collective; all ranks call it)."""
        if self._acc is None:
            return
        ema = self.noise_scale.ema  # its EMAs ride along in the same collective (every rank has them or none)
        interval, extra = self._acc.reduce(trainer.world_size, ema.state if ema is not None else None)
        if extra is not None:
            self.noise_scale.set_reduced(extra, interval.extra, trainer.world_size)
        self.totals.add(interval, self.convention)
        self._carried = interval if self._carried is None else self._carried.then(interval)

    def _observation(self, trainer: Trainer, loss: float, interval: Interval | None = None) -> Observation:
        lr = None
        if trainer.optimizers:
            groups = trainer.optimizers[0].param_groups
            if groups and isinstance(groups[0].get("lr"), (int, float)):
                lr = float(groups[0]["lr"])
        gns = self.noise_scale.estimates()
        t = self.totals
        return Observation(step=trainer.global_step, tokens=t.tokens, samples=t.samples, flops=t.flops, loss=loss,
                           time=time.perf_counter() - self._t0, lr=lr, nonfinite=t.nonfinite,
                           loss_max=interval.loss_max if interval else math.nan,
                           all_finite=not interval.nonfinite if interval else True,
                           grad_norm=interval.mean_grad_norm if interval else None,
                           grad_norm_max=interval.grad_norm_max if interval and interval.grad_norm_count else None,
                           grad_nonfinite=interval.grad_nonfinite if interval else 0,
                           gns_g2=gns[0] if gns else None, gns_trace=gns[1] if gns else None)

    def _fallback_loss(self, trainer: Trainer) -> float:
        keys = (self.config.loss_key,) if self.config.loss_key else _LOSS_KEYS
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if isinstance(value, Tensor) and value.numel() == 1:
                return float(value)
            if isinstance(value, (int, float)):
                return float(value)
        self._note("loss_source", f"no training loss found (training_step returned none and no {' / '.join(keys)} "
                   "was logged); pass ScaleWatch(loss_key=...) to name it")
        return math.nan

    def _log(self, trainer: Trainer, loss_seen: bool) -> None:
        self._reduce(trainer)
        interval, self._carried = self._carried, None
        self._last_logged_step = trainer.global_step
        try:
            assert interval is not None
            loss = interval.mean_loss
            if not interval.loss_count and not loss_seen:
                loss = self._fallback_loss(trainer)  # else every loss was non-finite: record, never raise
            obs = self._observation(trainer, loss, interval)
            self.monitor.texts["conventions"] = self.describe()
            self.monitor.texts["laws"] = describe_laws(self.config.curve_law, self.config.law)
            if self.config.gns != "off":
                self.monitor.texts["gns/method"] = f"{self.noise_scale.method or 'none'}: {self.noise_scale.description}"
            if trainer.is_global_zero:  # detection runs once, on the reduced observation
                report = self.monitor.observe(obs)
                self.latest = report.scalars
                self._stop_kinds.update(a.kind for a in report.alerts if a.state == "firing")
        except Exception as exc:  # monitoring must never crash the run
            log.warning("scalewatch: could not log step %d: %s: %s", trainer.global_step, type(exc).__name__, exc)
        if self.config.stop_on is not None:
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: Trainer) -> None:
        """``stop_on``: rank 0 decides, every rank stops at the same step (one broadcast per log point)."""
        level = HEALTH_LEVEL[self.config.stop_on or "critical"]
        # Only the run's own health stops it: not scalewatch's internal errors, not the planning
        # findings (they fire at the first log point by design), not alerts restored from a checkpoint.
        firing = [f"{kind} ({sev})" for (kind, _), sev in self.monitor.alerts.firing().items()
                  if HEALTH_LEVEL[sev] >= level and kind in self._stop_kinds and kind not in _NEVER_STOP] \
            if trainer.is_global_zero else []
        stop = bool(firing)
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning("scalewatch: stopping training at step %d (stop_on=%r): %s", trainer.global_step,
                            self.config.stop_on, ", ".join(firing))

    def describe(self) -> str:
        """The conventions behind the logged numbers, in words."""
        text = describe_conventions(self.n_params, self.params, self.convention, self.config.flops)
        if self.config.gns == "off":
            return text
        return text + f" Gradient noise scale: {self.noise_scale.method or 'none'} ({self.noise_scale.description})."

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation inside a training epoch is not training time: keep it out of the rates.
        if self._val_started is not None and self._acc is not None:
            self._t0 += time.perf_counter() - self._val_started
        self._val_started = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # All ranks reach here together: flush the tail of the run as a last log point.
        if self._last_logged_step != trainer.global_step and self._acc is not None:
            self._log(trainer, loss_seen=False)
        self.noise_scale.remove()
        try:
            final = self.monitor.finish()  # e.g. the forecast still in flight, from the newest history
            if final is not None:
                self.latest.update(final.scalars)
        except Exception as exc:  # monitoring must never crash the run
            log.warning("scalewatch: could not finish: %s", exc)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.noise_scale.remove()  # also after an exception, so the hooks never outlive the fit
        self.monitor.close()  # no worker thread outlives the fit

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is dumped: fold the unreduced counts in first,
        # so that nothing a rank counted is lost with the checkpoint (only rank 0's copy is saved).
        if self._acc is not None and self._trainer is not None:
            self._reduce(self._trainer)
        conv = self.convention
        gns_state = self.noise_scale.state_dict()
        return {
            "version": _STATE_VERSION,
            **self.totals.state_dict(),
            "n_params": self.n_params,
            "flop_convention": None if conv is None else {
                "per_token": conv.per_token, "attention_coeff": conv.attention_coeff, "description": conv.description},
            "monitor": self.monitor.state_dict(),
            "curve_schedule": None if self._schedule_saved is None else self._schedule_saved.tolist(),
            # Reduced over ranks just above: the same on every rank.
            "gns": None if gns_state is None else {"method": self.noise_scale.method, "decay": self.noise_scale.decay,
                                                   "state": gns_state},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            log.warning("scalewatch: checkpoint state version %r is not %d; counts start from zero", version,
                        _STATE_VERSION)
            return
        self.totals.load_state_dict(state_dict)
        conv = state_dict.get("flop_convention")
        if conv is not None and self.config.flops == "measured":
            # A measured convention is kept across resumes so the FLOP series stays consistent.
            self.convention = FlopConvention(float(conv["per_token"]), int(conv["attention_coeff"]),
                                             str(conv["description"]))
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
        saved = state_dict.get("curve_schedule")
        if isinstance(saved, list) and saved:
            self._schedule_saved = np.asarray(saved, dtype=float)
        gns = state_dict.get("gns")
        if gns:
            self.noise_scale.load_state_dict(gns.get("state"))  # applied when training starts
