"""What the callback reads from and writes to a Lightning ``Trainer``, as small functions.

Kept out of :mod:`scalewatch.callback` so that the callback stays a thin adapter (hooks in, one
:class:`~scalewatch.monitor.Observation` out) and each of these can be tested on its own: the loss a
``training_step`` returned, the LR, the run's planned length and LR schedule (read ahead on a copy of
the scheduler), the gradient norm as the optimizer sees it under AMP, the checkpoint to go back to,
and the sink that writes reports to the trainer's loggers.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from scalewatch.curves import CurveError, schedule_from_arg
from scalewatch.detectors import AllocationDetector, DivergenceDetector
from scalewatch.gns_capture import NoiseScaleTracker, PerExampleNorms, choose_gns_method, grad_sq_norm
from scalewatch.monitor import Report
from scalewatch.tensorboard import PREFIX, TensorBoardExtras

__all__ = ["LoggerSink", "checkpoint_at_or_before", "current_lr", "fallback_loss", "grad_norm_before_clipping",
           "logged_step_loss", "loss_from_outputs", "lookahead_schedule", "install_schedule", "run_schedule", "start_noise_scale", "stop_together", "total_steps",
           "wire_detectors"]

log = logging.getLogger("scalewatch")

LOSS_KEYS = ("train_loss", "loss", "train/loss", "training_loss")


def loss_keys(loss_key: str | None) -> tuple[str, ...]:
    """The metric names a module's own training loss is looked for under: ``loss_key``, else the common ones."""
    return (loss_key,) if loss_key else LOSS_KEYS


def loss_from_outputs(outputs: Any) -> Tensor | None:
    """The loss tensor a ``training_step`` returned (a tensor, or a mapping's ``"loss"``), else None.

    Example:
        >>> float(loss_from_outputs({"loss": torch.tensor(2.5)}))
        2.5
        >>> loss_from_outputs(None) is None
        True
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if isinstance(loss, Tensor):
            return loss
    return None


def fallback_loss(trainer: Trainer, loss_key: str | None) -> float | None:
    """The training loss the module logged itself (``callback_metrics``), for steps that returned none.

    None when no such metric exists (the caller says so once)."""
    for key in loss_keys(loss_key):
        value = trainer.callback_metrics.get(key)
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def logged_step_loss(trainer: Trainer, loss_key: str | None) -> Tensor | None:
    """The training loss the module has ``self.log``-ged in this step, as the device tensor Lightning keeps.

    For manual optimization, where ``training_step`` often returns nothing: read per batch, it gives
    the interval mean the callback promises, where ``callback_metrics`` at the log step would give
    the last value only (and reading ``callback_metrics`` every batch converts progress-bar values
    to numbers: a host sync). Lightning's result collection is private, so any change there returns
    None and the caller falls back to ``callback_metrics`` at the log step.
    """
    try:
        results = trainer._results
        if not results:
            return None
        keys = loss_keys(loss_key)
        for _, metric in results.valid_items():
            value = getattr(metric, "_forward_cache", None)
            if metric.meta.name in keys and metric.meta.on_step and isinstance(value, Tensor) and value.numel() == 1:
                return value
    except Exception:  # a Lightning version with another layout
        return None
    return None


def current_lr(trainer: Trainer) -> float | None:
    """The LR of the first optimizer's first parameter group (what the schedule-aware stages compare)."""
    if not trainer.optimizers:
        return None
    groups = trainer.optimizers[0].param_groups
    return float(groups[0]["lr"]) if groups and isinstance(groups[0].get("lr"), (int, float)) else None


def total_steps(trainer: Trainer) -> int | None:
    """The run's planned optimizer steps, None when it is endless or unknown."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # e.g. a dataloader without a length
        return None
    return int(total) if total is not None and math.isfinite(total) else None


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


def run_schedule(trainer: Trainer, given: Any, saved: np.ndarray | None) -> tuple[np.ndarray, str | None]:
    """The LR per optimizer step for the predicted curve, and a note when it does not cover the run.

    ``given`` is ``ScaleWatch(schedule=...)``; without it, the schedule saved in the checkpoint (a
    resumed run keeps the one seen at its start), else the run's own scheduler read ahead on a copy.
    Raises :class:`~scalewatch.curves.CurveError` when the run's length is unknown.
    """
    total = total_steps(trainer)
    if total is None:
        raise CurveError("the run's length is unknown (no max_steps, no finite epochs)")
    schedule = schedule_from_arg(given, total)
    if schedule is None and saved is not None and len(saved) - 1 < total:
        # Resumed with a longer run than the saved schedule covers (a larger max_steps): the steps run so far
        # keep the LR they had, the rest is read ahead from the scheduler as it is now.
        ahead = lookahead_schedule(trainer, total)
        schedule = np.concatenate([np.asarray(saved, dtype=float), ahead[len(saved):]])
    elif schedule is None:
        schedule = saved if saved is not None else lookahead_schedule(trainer, total)
    schedule = np.asarray(schedule, dtype=float)
    note = None
    if len(schedule) - 1 < total:
        note = (f"the LR schedule covers steps 0..{len(schedule) - 1} but the run goes to step {total}; "
                f"the predicted curve stops at step {len(schedule) - 1}")
    return schedule, note


def install_schedule(plugin: Any, trainer: Trainer, given: Any, saved: np.ndarray | None) -> tuple[str, str] | None:
    """Give the curve-law forecaster this run's LR per step; returns ``(key, note)`` to say once, or None.

    A schedule that cannot be read (a bad file, an endless run, a scheduler that cannot be copied)
    must not stop the run: the plugin then has no schedule (no predicted curve), all else works."""
    try:
        schedule, note = run_schedule(trainer, given, saved)
        plugin.set_schedule(schedule)
        return None if note is None else ("schedule_short", note)
    except Exception as exc:
        plugin.schedule = None
        return "schedule", f"no predicted curve: {exc}"


def wire_detectors(plugins: Any, trainer: Trainer) -> None:
    """Tell the detectors what only the trainer knows: the planned length and where checkpoints are."""
    for plugin in plugins:
        if isinstance(plugin, AllocationDetector):
            plugin.total_steps = total_steps(trainer)
        if isinstance(plugin, DivergenceDetector):
            plugin.checkpoint_before = lambda step: checkpoint_at_or_before(trainer, step)


def stop_together(trainer: Trainer, stop: bool) -> bool:
    """Rank 0's decision to stop, the same on every rank (one broadcast; a no-op on one process)."""
    return bool(trainer.strategy.broadcast(stop, src=0)) if trainer.world_size > 1 else stop


def checkpoint_at_or_before(trainer: Trainer, step: int) -> str | None:
    """The newest checkpoint file the run's ModelCheckpoint callbacks saved at or before ``step``
    (read from the ``step=N`` in Lightning's file names), for the divergence alert's message."""
    best: tuple[int, str] | None = None
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None)
        for path in Path(folder).glob("*.ckpt") if folder and Path(folder).is_dir() else ():
            m = re.search(r"step=(\d+)", path.name)
            if m and int(m.group(1)) <= step and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), str(path))
    return best[1] if best else None


def _steps_unscale_inside(optimizer: Any) -> bool:
    """Optimizers with ``_step_supports_amp_scaling`` unscale inside ``step()``: ``.grad`` is still scaled."""
    return bool(getattr(getattr(optimizer, "_optimizer", optimizer), "_step_supports_amp_scaling", False))


def _loss_scale(trainer: Trainer) -> Tensor | None:
    scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def grad_norm_before_clipping(trainer: Trainer, optimizer: Any) -> tuple[Tensor, Tensor, bool] | None:
    """``(norm, squared norm of .grad as read, loss_scaled)`` in ``on_before_optimizer_step``, on the device.

    One fused foreach kernel; the norm is of the true (unscaled) gradient, the squared norm is of
    ``.grad`` as it is (the noise scale reuses it). None when no parameter has a gradient.
    """
    sq = grad_sq_norm([p for group in optimizer.param_groups for p in group["params"]])
    if sq is None:
        return None
    norm = sq.sqrt()
    scale = _loss_scale(trainer)
    if scale is not None and _steps_unscale_inside(optimizer):
        norm = norm / scale.to(norm.device, norm.dtype)
    return norm, sq, getattr(trainer.precision_plugin, "scaler", None) is not None


def amp_scale(trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> Tensor | None:
    """The fp16 loss scale (device tensor) when the hooks saw scaled gradients but ``.grad`` is unscaled."""
    scale = _loss_scale(trainer)
    if scale is None or not pl_module.automatic_optimization:
        return None  # manual optimization: Lightning does not unscale before this hook
    return None if _steps_unscale_inside(optimizer) else scale


def start_noise_scale(tracker: NoiseScaleTracker, mode: str, trainer: Trainer, pl_module: LightningModule
                      ) -> tuple[str | None, bool]:
    """Start the noise-scale capture that ``mode`` and the run allow.

    Returns ``(a message to say once when it cannot run as asked, whether the capture's big-batch
    norm is the optimizer's gradient norm)``; in the latter case the gradient-norm detector's read is
    reused, not repeated.
    """
    tracker.remove()
    method, message = choose_gns_method(mode, trainer.strategy, trainer.world_size,
                                        trainer.accumulate_grad_batches, pl_module.automatic_optimization)
    if method is not None and tracker.start(method, pl_module, pl_module.device,
                                            getattr(trainer.strategy, "model", None),
                                            getattr(trainer.strategy, "process_group", None)):
        if trainer.is_global_zero:
            log.info("scalewatch: gradient noise scale from %s", tracker.description)
    return message, capture_is_optimizer_params(tracker.capture, trainer)


def capture_is_optimizer_params(capture: Any, trainer: Trainer) -> bool:
    """Whether the noise-scale capture covers exactly the parameters the (single) optimizer trains,
    so that its big-batch norm is the gradient-norm detector's and need not be read twice."""
    if capture is None or isinstance(capture, PerExampleNorms) or len(trainer.optimizers) != 1:
        return False
    trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"] if p.requires_grad}
    return {id(p) for p in capture.params} == trained


def logger_run_name(trainer: Trainer) -> str | None:
    """The run's name as the trainer's first logger names it: ``name/version_N`` (TensorBoard, CSV: the
    folder under the save dir), ``name/id`` (a logger whose version is a string); None without a logger.

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> logger = CSVLogger("/tmp/scalewatch-doc", name="tiny_gpt", version=0)
        >>> logger_run_name(SimpleNamespace(loggers=[logger])), logger_run_name(SimpleNamespace(loggers=[]))
        ('tiny_gpt/version_0', None)
    """
    loggers = list(getattr(trainer, "loggers", None) or [])
    if not loggers:
        return None
    try:  # a third-party logger's name or version may need a connection, or raise: the name is not worth it
        name, version = loggers[0].name, loggers[0].version
    except Exception:  # noqa: BLE001 - monitoring must never crash the run
        return None
    version = f"version_{version}" if isinstance(version, int) else version
    return "/".join(str(p) for p in (name, version) if p not in (None, "")) or None


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
