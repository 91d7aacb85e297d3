"""``ScaleWatch``: the Lightning callback, a thin adapter around :class:`~scalewatch.monitor.Monitor`.

On every micro-batch a :class:`~scalewatch.counting.RunCounter` adds the batch's counts and loss on
the device (nothing is read back to the host); once per log interval it reduces them across ranks
in ONE collective, the callback turns them into an :class:`~scalewatch.monitor.Observation` and hands
it to the Monitor, whose sinks (rank 0 only) write the report to the trainer's loggers. Everything
else (the pipeline, the noise-scale maths, the forecasts, the TensorBoard layout, what is read from
the trainer) lives outside this file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from scalewatch.accounting import FlopConvention, ParamCount, count_parameters, peak_flops_per_second
from scalewatch.accumulators import Interval, Totals
from scalewatch.alerts import LogSink
from scalewatch.batches import is_causal_lm
from scalewatch.config import ScaleWatchConfig, build_monitor, curve_law_warnings, describe_laws
from scalewatch.counting import RunCounter
from scalewatch.curves import CurveLaw
from scalewatch.detectors import HealthConfig
from scalewatch.forecast import CurvePlugin
from scalewatch.gns_capture import NoiseScaleTracker, choose_gns_method  # noqa: F401  (re-exported)
from scalewatch.lightning_io import (
    LoggerSink,
    amp_scale,
    current_lr,
    fallback_loss,
    grad_norm_before_clipping,
    install_schedule,
    logged_step_loss,
    lookahead_schedule,
    logger_run_name,
    loss_from_outputs,
    loss_keys,
    start_noise_scale,
    stop_together,
    wire_detectors,
)
from scalewatch.monitor import Observation
from scalewatch.summary import run_summary

__all__ = ["ScaleWatch", "choose_gns_method", "lookahead_schedule"]

log = logging.getLogger("scalewatch")

_STATE_VERSION = 1


class ScaleWatch(Callback):
    r"""Count the tokens and compute a run really spends and log them against the loss.

    Attach it to an existing ``Trainer``; nothing else changes::

        trainer = Trainer(callbacks=[ScaleWatch()])

    Every ``log_every_n_steps`` optimizer steps it logs, under ``scalewatch/``, the global counts
    (all ranks, resumes included: ``tokens``, ``flops``, ``tokens_per_param``, rates, ``mfu``), the
    interval's mean training ``loss``, the gradient norm and noise scale, the predicted curve and
    forecast when a curve law is given, and ``health/<kind>`` for the alerts
    (:mod:`scalewatch.tensorboard` lists every tag).

    Every argument is a field of :class:`~scalewatch.config.ScaleWatchConfig`, documented there
    and validated when the callback is made (a bad value raises ``ScaleWatchConfigError`` naming
    the fix). The ones most runs set: ``flops`` (``"6N"``, ``"6N+attn"``, ``"measured"``),
    ``tokens_fn`` for batches it cannot read, ``curve_law`` / ``law`` (files from
    ``scalewatch fit``) for the predicted curve, forecast and allocation alerts, ``alerts_jsonl``,
    ``webhook_url`` and ``stop_on`` for the alerts.

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
        run_name: str | None = None,
    ) -> None:
        # None: the run is named at setup from the trainer's logger (tiny_gpt/version_0), else "run"
        self._run_name_given = run_name is not None
        run_name = "run" if run_name is None else run_name
        self.config = ScaleWatchConfig(
            tokens_fn=tokens_fn, samples_fn=samples_fn, n_params=n_params, param_convention=param_convention,
            flops=flops, n_layer=n_layer, d_model=d_model, context_length=context_length, peak_flops=peak_flops,
            log_every_n_steps=log_every_n_steps, loss_key=loss_key, history_size=history_size,
            gns="off" if gns is None else gns, gns_decay=gns_decay, curve_law=curve_law, schedule=schedule,
            forecast_in_background=forecast_in_background, alerts_jsonl=alerts_jsonl, detect=detect, health=health,
            law=law, unique_tokens=unique_tokens, stop_on=stop_on, webhook_url=webhook_url, run_name=run_name)
        self._fits = 0
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Everything one fit accumulates; a second ``fit`` with the same instance starts from here again
        (a resumed fit then restores its checkpoint's state on top)."""
        # The schedule is read when training starts (the trainer knows the run's length and scheduler).
        self.monitor = build_monitor(dataclasses.replace(self.config, schedule=None))
        self._own_sinks = list(self.monitor.sinks)  # JSONL, webhook: the trainer's sinks are added per fit
        self._stop_kinds: set[str] = set()  # alerts that fired in this session (stop_on considers only these)
        self._gns_shares_norm = False  # set when training starts
        self.noise_scale = NoiseScaleTracker(
            self.config.gns_decay, note=lambda key, msg: self._note("gns_" + key, "gradient noise scale: " + msg))
        self.counter = RunCounter(self.config)
        self.latest: dict[str, float] = {}  # the scalars of the last log point, on rank 0 (detection runs there)
        self._schedule_saved: np.ndarray | None = None  # the schedule of this run, kept for resume
        self._last_logged_loss: Tensor | None = None  # manual optimization: the last self.log-ged loss taken
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

    totals: Totals = property(lambda self: self.counter.totals, doc="Global totals since the start of training.")
    tokens = property(lambda self: self.totals.tokens, doc="Training tokens so far, all ranks, resumes included.")
    samples = property(lambda self: self.totals.samples, doc="Sequences so far, all ranks.")
    flops = property(lambda self: self.totals.flops, doc="Model FLOPs so far (the run's convention).")
    nonfinite = property(lambda self: self.totals.nonfinite, doc="Non-finite micro-batch losses so far.")
    n_params: int | None = property(lambda self: self.counter.n_params, doc="The parameter count used for 6N.")
    params: ParamCount | None = property(lambda self: self.counter.params, doc="Every parameter count.")
    convention: FlopConvention | None = property(lambda self: self.counter.convention, doc="FLOPs per token.")
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
        if self._fits:  # the same instance in a second fit (a notebook, a sweep): nothing carries over
            self.monitor.close()
            self._fresh_state()
        self._fits += 1
        self._trainer = trainer
        # Unnamed, every run of a sweep would be "run" in the alerts JSONL and the webhook. Rank 0 only: it
        # alone writes alerts, and a logger such as MLflow's reaches its server to know its name.
        if not self._run_name_given and trainer.is_global_zero:
            self.monitor.alerts.run = logger_run_name(trainer) or self.config.run_name
        self.counter.shift_labels = is_causal_lm(pl_module)
        self.monitor.sinks = [LoggerSink(trainer), LogSink(), *self._own_sinks] if trainer.is_global_zero else []
        # Counted here, before the strategy shards or wraps the module. A model built in configure_model
        # (which runs after this hook) has no parameters yet: counted at fit start instead, whole sizes.
        if count_parameters(pl_module).total or self.config.n_params:
            self._count_model(trainer, pl_module)

    def _count_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        label = self.counter.count_model(pl_module)
        self.monitor.n_params = n = self.counter.n_params
        self.monitor.peak_flops = peak_flops_per_second(pl_module.device, str(trainer.precision), trainer.world_size,
                                                        self.config.peak_flops)
        if self.curve_plugin is not None:
            self.curve_plugin.n_params = n
            for message in curve_law_warnings(self.curve_plugin.law, self.config.param_convention, n):
                self._note(message, message)
        if trainer.is_global_zero:
            conv = self.counter.convention
            log.info("scalewatch: %s = %s; FLOPs: %s", label, f"{n:,}",
                     conv.description if conv else "measured on the first batch")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument but must reduce across ranks
        if self.counter.n_params is None:
            self._count_model(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.counter.start(pl_module.device)
        self._last_global_step = trainer.global_step
        self._t0 = time.perf_counter()
        self.monitor.start(self._observation(trainer, loss=math.nan))
        message, self._gns_shares_norm = start_noise_scale(self.noise_scale, self.config.gns, trainer, pl_module)
        if message is not None:
            self._note("gns_method", f"gradient noise scale: {message}")
        if self.curve_plugin is not None:
            note = install_schedule(self.curve_plugin, trainer, self.config.schedule, self._schedule_saved)
            if self.curve_plugin.schedule is not None:  # kept for resume
                self._schedule_saved = self.curve_plugin.schedule
            if note is not None:
                self._note(*note)
        wire_detectors(self.monitor.plugins, trainer)

    # ------------------------------------------------------------------ hot path
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Counted before the step so that the noise-scale capture knows each micro-batch's size.
        self.noise_scale.add_batch(self.counter.before_batch(batch).samples)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = self.counter.pending(batch)
        automatic = pl_module.automatic_optimization
        loss = loss_from_outputs(outputs)
        if loss is None and automatic:  # training_step returned None (outputs {}): Lightning skipped the batch
            self.noise_scale.drop_batch()
            return
        divisor = trainer.accumulate_grad_batches if automatic else 1  # Lightning hands back loss / accumulate
        if loss is None:  # manual optimization: the loss the module self.log-ged in this step
            logged = logged_step_loss(trainer, self.config.loss_key)
            if logged is not None and logged is not self._last_logged_loss:  # a new self.log call, not a stale one
                self._last_logged_loss = loss = logged
        self.counter.add(count, loss, divisor)
        if trainer.global_step != self._last_global_step:  # an optimizer step happened
            self._last_global_step = trainer.global_step
            every = self.config.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
            if trainer.global_step % every == 0:
                self._log(trainer, loss_seen=loss is not None)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.noise_scale.end_backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Before gradient clipping (Lightning clips after this hook) and after AMP unscaling.
        sq, acc = None, self.counter.acc
        try:
            measured = grad_norm_before_clipping(trainer, optimizer) if self.config.detect and acc else None
            if measured is not None:
                norm, sq, loss_scaled = measured
                acc.add_grad_norm(norm, loss_scaled=loss_scaled)  # type: ignore[union-attr]
        except Exception as exc:  # monitoring must never crash the run
            self._note("grad_norm", f"gradient norm not measured: {type(exc).__name__}: {exc}")
        try:
            automatic = pl_module.automatic_optimization
            self.noise_scale.step(trainer.accumulate_grad_batches if automatic else 1, automatic, trainer.world_size,
                                  amp_scale(trainer, pl_module, optimizer),
                                  big_sq=sq if self._gns_shares_norm else None)
        except Exception as exc:  # monitoring must never crash the run; the state stays, updates stop
            self._note("gns_error", f"gradient noise scale: stopped after {type(exc).__name__}: {exc}")
            self.noise_scale.remove()

    # ------------------------------------------------------------------ log interval
    def _reduce(self, trainer: Trainer) -> None:
        """Fold every rank's unreduced counts into the global totals (ONE collective; all ranks call it)."""
        ema = self.noise_scale.ema  # its EMAs ride along in the same collective (every rank has them or none)
        interval, summed = self.counter.reduce(trainer.world_size, ema.state if ema is not None else None)
        if summed is not None and interval is not None:
            self.noise_scale.set_reduced(summed, interval.extra, trainer.world_size)

    def _observation(self, trainer: Trainer, loss: float, interval: Interval | None = None) -> Observation:
        return self.totals.observation(trainer.global_step, loss, time.perf_counter() - self._t0, current_lr(trainer),
                                       interval, self.noise_scale.estimates())

    def _log(self, trainer: Trainer, loss_seen: bool) -> None:
        self._reduce(trainer)
        interval = self.counter.take_interval()
        self._last_logged_step = trainer.global_step
        try:
            assert interval is not None
            loss = interval.mean_loss
            if not interval.loss_count and not loss_seen:  # else every loss was non-finite: record, never raise
                loss = fallback_loss(trainer, self.config.loss_key)
                if loss is None:
                    self._note("loss_source", f"no training loss found (training_step returned none and no "
                               f"{' / '.join(loss_keys(self.config.loss_key))} was logged); pass "
                               "ScaleWatch(loss_key=...) to name it")
            obs = self._observation(trainer, math.nan if loss is None else loss, interval)
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
        if self.config.stop_on is not None:  # rank 0 decides, every rank stops at the same step
            firing = self.monitor.alerts.reasons_to_stop(self.config.stop_on, self._stop_kinds) \
                if trainer.is_global_zero else []
            if stop_together(trainer, bool(firing)) and not trainer.should_stop:
                trainer.should_stop = True
                if trainer.is_global_zero:
                    log.warning("scalewatch: stopping training at step %d (stop_on=%r): %s", trainer.global_step,
                                self.config.stop_on, ", ".join(firing))

    def describe(self) -> str:
        """The conventions behind the logged numbers, in words."""
        if self.config.gns == "off":
            return self.counter.describe()
        return self.counter.describe() + f" Gradient noise scale: {self.noise_scale.method or 'none'} " \
                                         f"({self.noise_scale.description})."

    def summary(self) -> str:
        """What the run spent and how it did against its laws, in a few lines (rank 0 holds the alerts).

        Example (after ``trainer.fit``): ``print(watch.summary())``.
        """
        last = self.monitor.last
        return run_summary(self, last.time if last is not None else None)  # training time, validation excluded

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation inside a training epoch is not training time: keep it out of the rates.
        if self._val_started is not None and self.counter.acc is not None:
            self._t0 += time.perf_counter() - self._val_started
        self._val_started = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # All ranks reach here together: flush the tail of the run as a last log point.
        if self._last_logged_step != trainer.global_step and self.counter.acc is not None:
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
        if self.counter.acc is not None and self._trainer is not None:
            self._reduce(self._trainer)
        return {
            "version": _STATE_VERSION,
            **self.counter.state_dict(),
            "monitor": self.monitor.state_dict(),
            "curve_schedule": None if self._schedule_saved is None else self._schedule_saved.tolist(),
            "gns": self.noise_scale.state_dict(),  # reduced over ranks just above: the same on every rank
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            log.warning("scalewatch: checkpoint state version %r is not %d; counts start from zero", version,
                        _STATE_VERSION)
            return
        self.counter.load_state_dict(state_dict)
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
        saved = state_dict.get("curve_schedule")
        if isinstance(saved, list) and saved:
            self._schedule_saved = np.asarray(saved, dtype=float)
        self.noise_scale.load_state_dict(state_dict.get("gns"))  # applied when training starts
