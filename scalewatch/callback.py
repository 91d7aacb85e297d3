"""``ScaleWatch``: the Lightning callback, a thin adapter around :class:`~scalewatch.monitor.Monitor`.

On every micro-batch it adds the batch's token and sample counts to
accumulators (Python ints where shapes give the count, device tensors where a
mask does) and the loss to a device tensor; nothing is read back to the host.
Once per log interval it reduces the accumulators across ranks in ONE
collective, turns them into an :class:`~scalewatch.monitor.Observation` and
logs what the monitor returns, on rank 0 only.
"""

from __future__ import annotations

import copy
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
    ScaleWatchConfigError,
    check_tokens_fn_result,
    count_batch,
    count_parameters,
    fixed_flops_per_token,
    infer_architecture,
    measured_flops_per_token,
    six_n,
    six_n_plus_attention,
)
from scalewatch.curves import (
    CurveError,
    CurveLaw,
    CurvePlugin,
    load_curve_law,
    schedule_from_csv,
)
from scalewatch.gns import NoiseScalePlugin
from scalewatch.gns_capture import (
    DDPCommHookCapture,
    DeviceNoiseEMA,
    ParamGradHooks,
    PerExampleNorms,
    grad_sq_norm,
)
from scalewatch.laws import LawFileError
from scalewatch.monitor import Monitor, Observation

log = logging.getLogger("scalewatch")

PREFIX = "scalewatch/"
_FLOP_MODES = ("6N", "6N+attn", "measured")
_PARAM_CONVENTIONS = ("total", "non_embedding")
_LOSS_KEYS = ("train_loss", "loss", "train/loss", "training_loss")
_STATE_VERSION = 1
_GNS_MODES = ("auto", "ddp", "accumulation", "per_example", "per_example_norm", "off")

# Per-step device values are only appended to lists (no kernel launch, no sync); past this many
# they are folded into running device sums, so that memory stays bounded for any log interval.
_MAX_PENDING = 1024


def _precision_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if "16" in precision:
        return torch.float16
    if "64" in precision:
        return torch.float64
    return torch.float32


def _loss_from_outputs(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if isinstance(loss, Tensor):
            return loss
    return None


# TensorBoard custom-scalars layout: the live loss inside the predicted band (a margin chart).
CURVE_LAYOUT = {
    "scalewatch": {
        "loss vs predicted curve (90% band)": [
            "Margin", [PREFIX + "loss", PREFIX + "loss_pred_low", PREFIX + "loss_pred_high"]],
        "final loss forecast (90% band)": [
            "Margin", [PREFIX + "loss_forecast_final", PREFIX + "loss_forecast_final_low",
                       PREFIX + "loss_forecast_final_high"]],
        "loss, predicted, forecast": [
            "Multiline", [PREFIX + "loss", PREFIX + "loss_pred", PREFIX + "loss_forecast_final"]],
    }
}


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


def choose_gns_method(mode: str, strategy: Any, world_size: int, accumulate_grad_batches: int,
                      automatic_optimization: bool) -> tuple[str | None, str | None]:
    """Which noise-scale capture applies: ``(method or None, message to say once or None)``.

    Only strategies where each rank holds whole gradients (single device, DDP) can
    compare a local gradient with the global one; sharded ones (FSDP, DeepSpeed,
    model parallel) cannot.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
        >>> choose_gns_method("auto", DDPStrategy(), 8, 4, True)
        ('ddp+accumulation', None)
        >>> choose_gns_method("auto", FSDPStrategy(), 8, 1, True)[0] is None
        True
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if mode == "off":
        return None, None
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return None, (f"off: the {type(strategy).__name__} strategy shards gradients or is not supported, so no "
                      "rank holds a whole local gradient to compare with the global one; the rest of scalewatch "
                      "keeps working")
    ddp = world_size > 1
    accumulation = accumulate_grad_batches > 1 and automatic_optimization
    free = "ddp+accumulation" if ddp and accumulation else "ddp" if ddp else "accumulation" if accumulation else None
    if mode == "auto":
        if free is None:
            return None, ("not measured: one device without gradient accumulation gives no second batch size for "
                          "free; ScaleWatch(gns='per_example') measures it from per-example gradient norms of the "
                          "Linear/LayerNorm layers, at extra compute")
        return free, None
    if mode in ("per_example", "per_example_norm"):
        if free is not None:
            return free, (f"{mode} applies to one device without accumulation; using the free '{free}' "
                          "method instead")
        return mode, None
    if free is None or mode not in free:
        return None, (f"gns={mode!r} cannot apply here (world size {world_size}, accumulate_grad_batches "
                      f"{accumulate_grad_batches}, automatic optimization {automatic_optimization}); use gns='auto'")
    return free, None


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
    ) -> None:
        if n_params is not None and (isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0):
            raise ScaleWatchConfigError(
                f"scalewatch: n_params must be a positive int, got {n_params!r}; "
                "leave it out to count the module's trainable parameters"
            )
        if param_convention not in _PARAM_CONVENTIONS:
            raise ScaleWatchConfigError(
                f"scalewatch: param_convention must be one of {_PARAM_CONVENTIONS}, got {param_convention!r}"
            )
        if isinstance(flops, str):
            if flops not in _FLOP_MODES:
                raise ScaleWatchConfigError(
                    f"scalewatch: flops must be one of {_FLOP_MODES} or a positive number of FLOPs per token, "
                    f"got {flops!r}"
                )
        elif isinstance(flops, bool) or not isinstance(flops, (int, float)) or not (flops > 0) or math.isinf(flops):
            raise ScaleWatchConfigError(
                f"scalewatch: flops must be one of {_FLOP_MODES} or a positive number of FLOPs per token, got {flops!r}"
            )
        for name, value in (("n_layer", n_layer), ("d_model", d_model), ("context_length", context_length),
                            ("log_every_n_steps", log_every_n_steps)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ScaleWatchConfigError(f"scalewatch: {name} must be a positive int, got {value!r}")
        if gns is None:
            gns = "off"
        if gns not in _GNS_MODES:
            raise ScaleWatchConfigError(f"scalewatch: gns must be one of {_GNS_MODES}, got {gns!r}")
        if isinstance(gns_decay, bool) or not isinstance(gns_decay, (int, float)) or not (0 < gns_decay < 1):
            raise ScaleWatchConfigError(f"scalewatch: gns_decay must be in (0, 1), e.g. 0.99, got {gns_decay!r}")
        if peak_flops is not None and not (peak_flops > 0):
            raise ScaleWatchConfigError(f"scalewatch: peak_flops must be positive FLOP/s, got {peak_flops!r}")

        self.tokens_fn = tokens_fn
        self.samples_fn = samples_fn
        self.n_params_override = n_params
        self.param_convention = param_convention
        self.flops_mode = flops
        self.n_layer = n_layer
        self.d_model = d_model
        self.context_length = context_length
        self.peak_flops_arg = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self.loss_key = loss_key

        self.gns_mode = gns
        self.gns_decay = float(gns_decay)
        if curve_law is not None and not isinstance(curve_law, CurveLaw):
            try:
                curve_law = load_curve_law(curve_law)
            except LawFileError as exc:
                raise ScaleWatchConfigError(f"scalewatch: curve_law: {exc}") from None
        self.curve_law: CurveLaw | None = curve_law
        self.schedule_arg = schedule
        self.schedule: Any = None  # per-step LR the prediction uses (numpy array), set when training starts
        self._schedule_saved: np.ndarray | None = None  # the schedule of this run, kept for resume

        plugins: list[Any] = [NoiseScalePlugin()] if gns != "off" else []
        self.curve_plugin = CurvePlugin(curve_law, background=forecast_in_background) \
            if curve_law is not None else None
        if self.curve_plugin is not None:
            plugins.append(self.curve_plugin)
        self.monitor = Monitor(history_size=history_size, plugins=plugins)
        self._layout_written = False
        self.params: ParamCount | None = None
        self.n_params: int | None = None
        self.convention: FlopConvention | None = None

        # Global totals since the start of training: exact Python ints, restored on resume.
        self.tokens = 0
        self.samples = 0
        self.tokens_x_seq_len = 0
        self.flops = 0
        self.nonfinite = 0
        self._last_logged_step = -1

        # Per-interval accumulators of THIS rank, not yet reduced.
        self._host = [0, 0, 0]  # tokens, samples, tokens x seq_len known from shapes
        self._device: torch.device | None = None  # set when training starts
        self._pending_tokens: list[tuple[Tensor, int]] = []  # mask-derived (tokens, seq_len) per batch
        self._pending_losses: list[Tensor] = []  # detached 0-d losses, as Lightning returned them
        self._loss_scale = 1  # factor that undoes Lightning's division of the pending losses
        self._folded: Tensor | None = None  # float64[5]: tokens, tokens x seq_len, non-finite, loss sum, n
        self._seen_batches = 0
        self._last_global_step = 0
        self._t0 = time.perf_counter()
        self._flop_counter: Any = None
        self._measure_tokens: int | Tensor = 0
        self._loss_source_warned = False
        self._conventions_written = False
        self._interval_loss = [0.0, 0.0]  # global (sum, count) of finite losses folded in at a checkpoint
        self._trainer: Trainer | None = None
        self._val_started: float | None = None
        self.latest: dict[str, float] = {}  # the scalars of the last log point (names without the prefix)
        self._batch_count: BatchCount | None = None
        self._interval_start = (0, 0, 0)  # step, samples, tokens at the previous log point

        # Gradient noise scale: which capture runs, its hooks, the device EMAs.
        self.gns_method: str | None = None
        self._gns_capture: ParamGradHooks | DDPCommHookCapture | PerExampleNorms | None = None
        self._gns_ema: DeviceNoiseEMA | None = None
        self._gns_sizes: list[int] = []  # samples of each micro-batch of the current step
        self._gns_host: tuple[float, float, float] | None = None  # reduced m_g2, m_trace, weight
        self._gns_restored: list[float] | None = None
        self._gns_warned: set[str] = set()
        self._gns_method_written = False
        self._ddp_hook: DDPCommHookCapture | None = None
        self._ddp_hook_model: Any = None

    # ------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return "ScaleWatch"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.params = count_parameters(pl_module)
        if self.n_params_override is not None:
            self.n_params = self.n_params_override
            n_label = "N (user-given n_params)"
        else:
            if self.params.total == 0:
                raise ScaleWatchConfigError(
                    "scalewatch: the module has no trainable parameters; pass ScaleWatch(n_params=...) "
                    "with the model's parameter count"
                )
            self.n_params = self.params.total if self.param_convention == "total" else self.params.non_embedding
            n_label = ("N (all trainable parameters, Chinchilla)" if self.param_convention == "total"
                       else "N (non-embedding trainable parameters, Kaplan)")
            if self.n_params <= 0:
                raise ScaleWatchConfigError(
                    "scalewatch: the module has no non-embedding trainable parameters; use "
                    "param_convention='total' or pass n_params=..."
                )
        self.convention = self._resolve_convention(pl_module, n_label)
        self.monitor.n_params = self.n_params
        if self.curve_plugin is not None and self.curve_law is not None:
            self.curve_plugin.n_params = self.n_params
            law_loss = self.curve_law.conventions.get("loss", "")
            if any(k in law_loss.lower() for k in ("val", "eval", "test")) and trainer.is_global_zero:
                log.warning("scalewatch: the curve law predicts %r, a held-out loss, but scalewatch compares it with "
                            "the training loss; expect an offset, or fit the law on training-loss curves (e.g. the "
                            "TensorBoard directories of earlier ScaleWatch runs)", law_loss)
            law_conv = self.curve_law.conventions.get("n_params")
            if law_conv and law_conv != self.param_convention and trainer.is_global_zero:
                log.warning("scalewatch: the curve law was fitted with N counted as %r, this run counts N as %r; "
                            "pass ScaleWatch(param_convention=%r) or refit", law_conv, self.param_convention, law_conv)
        self.monitor.peak_flops = self._resolve_peak_flops(trainer, pl_module)
        if trainer.is_global_zero:
            log.info("scalewatch: %s = %s; FLOPs: %s", n_label, f"{self.n_params:,}",
                     self.convention.description if self.convention else "measured on the first batch")

    def _resolve_convention(self, pl_module: LightningModule, n_label: str) -> FlopConvention | None:
        assert self.n_params is not None
        mode = self.flops_mode
        if not isinstance(mode, str):
            return fixed_flops_per_token(float(mode))
        if mode == "6N":
            return six_n(self.n_params)
        if mode == "measured":
            return None  # set after the first batch
        n_layer, d_model = self.n_layer, self.d_model
        if n_layer is None or d_model is None:
            found_layers, found_width = infer_architecture(pl_module)
            n_layer = n_layer or found_layers
            d_model = d_model or found_width
        if n_layer is None or d_model is None:
            raise ScaleWatchConfigError(
                "scalewatch: flops='6N+attn' needs the architecture; pass ScaleWatch(n_layer=..., d_model=...)"
            )
        return six_n_plus_attention(self.n_params, n_layer, d_model)

    def _resolve_peak_flops(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        per_device = self.peak_flops_arg
        if per_device is None:
            try:
                from lightning.fabric.utilities.throughput import get_available_flops

                per_device = get_available_flops(pl_module.device, _precision_dtype(str(trainer.precision)))
            except Exception:  # an unknown device must not stop training
                per_device = None
        return float(per_device) * trainer.world_size if per_device else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        self._device = device
        self._pending_tokens, self._pending_losses, self._folded = [], [], None
        self._host = [0, 0, 0]
        self._last_global_step = trainer.global_step
        self._interval_start = (trainer.global_step, self.samples, self.tokens)
        self._t0 = time.perf_counter()
        self.monitor.start(self._observation(trainer, loss=math.nan))
        self._setup_gns(trainer, pl_module)
        self._setup_schedule(trainer)

    # ------------------------------------------------------- predicted curve
    def _total_steps(self, trainer: Trainer) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def _setup_schedule(self, trainer: Trainer) -> None:
        if self.curve_plugin is None:
            return
        try:
            total = self._total_steps(trainer)
            schedule = self._resolve_schedule(trainer, total)
            if len(schedule) - 1 < total and trainer.is_global_zero:
                log.warning("scalewatch: the LR schedule covers steps 0..%d but the run goes to step %d; the "
                            "predicted curve stops at step %d", len(schedule) - 1, total, len(schedule) - 1)
            self.curve_plugin.set_schedule(schedule)
            self.schedule = self.curve_plugin.schedule
            self._schedule_saved = self.schedule
        except Exception as exc:
            # A schedule we cannot read (a bad file, an endless run, a scheduler that cannot be
            # copied) must not stop the run: no prediction, everything else works.
            self.curve_plugin.schedule = None
            if trainer.is_global_zero:
                log.warning("scalewatch: no predicted curve: %s", exc)

    def _resolve_schedule(self, trainer: Trainer, total: int) -> Any:
        arg = self.schedule_arg
        if isinstance(arg, (str, Path)):
            return schedule_from_csv(arg)
        if callable(arg):
            return np.array([float(arg(s)) for s in range(total + 1)])
        if arg is not None:
            return np.asarray(arg, dtype=float)
        if self._schedule_saved is not None:
            return self._schedule_saved  # resumed: the schedule seen at the start
        return lookahead_schedule(trainer, total)

    # --------------------------------------------------------------- hot path
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Counted before the step so that the noise-scale capture knows each micro-batch's size.
        self._batch_count = self._count(batch, self._seen_batches == 0)
        if self._gns_capture is not None:
            self._gns_sizes.append(self._batch_count.samples)
        if self.flops_mode == "measured" and self.convention is None and self._flop_counter is None:
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
        self._add_count(count)
        loss = _loss_from_outputs(outputs)
        if loss is not None:
            # Lightning hands back loss / accumulate_grad_batches; undone when folding, not per batch.
            self._add_loss(loss, trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
        if self._flop_counter is not None:
            self._finish_flop_measurement(count)

        if trainer.global_step != self._last_global_step:  # an optimizer step happened
            self._last_global_step = trainer.global_step
            if trainer.global_step % self._log_every(trainer) == 0:
                self._log(trainer, pl_module, loss_seen=loss is not None)

    def _count(self, batch: Any, first: bool) -> BatchCount:
        if self.tokens_fn is None:
            count = count_batch(batch)
        else:
            tokens = check_tokens_fn_result(self.tokens_fn(batch), first)
            try:
                shaped = count_batch(batch, use_masks=False)  # shapes only: tokens come from tokens_fn
                samples, seq_len = shaped.samples, shaped.seq_len
            except ScaleWatchConfigError:
                samples, seq_len = 0, 0
            count = BatchCount(tokens=tokens, samples=samples, seq_len=seq_len)
        if self.samples_fn is not None:
            count = BatchCount(tokens=count.tokens, samples=int(self.samples_fn(batch)), seq_len=count.seq_len)
        if first and isinstance(self.convention, FlopConvention) and self.convention.attention_coeff \
                and not (self.context_length or count.seq_len):
            raise ScaleWatchConfigError(
                "scalewatch: flops='6N+attn' cannot see a sequence length in the batch; "
                "pass ScaleWatch(context_length=...)"
            )
        return count

    def _add_count(self, count: BatchCount) -> None:
        seq_len = self.context_length or count.seq_len
        if isinstance(count.tokens, Tensor):
            # Kept as a device tensor: reading it would stall the step.
            self._pending_tokens.append((count.tokens, seq_len))
            if len(self._pending_tokens) >= _MAX_PENDING:
                self._fold()
        else:
            self._host[0] += count.tokens
            self._host[2] += count.tokens * seq_len
        self._host[1] += count.samples

    def _add_loss(self, loss: Tensor, scale: int) -> None:
        if scale != self._loss_scale:
            if self._pending_losses:
                self._fold()  # the pending losses were divided by the previous factor
            self._loss_scale = scale
        loss = loss.detach()
        self._pending_losses.append(loss if loss.ndim == 0 else loss.float().mean())
        if len(self._pending_losses) >= _MAX_PENDING:
            self._fold()

    def _fold(self) -> Tensor:
        """Sum the pending device values into one float64[5] device vector (kernels, no sync)."""
        device = self._device
        vec = torch.zeros(5, dtype=torch.float64, device=device) if self._folded is None else self._folded
        if self._pending_tokens:
            tokens = torch.stack([t.reshape(()) for t, _ in self._pending_tokens]).double()
            lens = torch.tensor([sl for _, sl in self._pending_tokens], dtype=torch.float64).to(device,
                                                                                                 non_blocking=True)
            vec = vec + torch.stack((tokens.sum(), (tokens * lens).sum(), tokens.new_zeros(()),
                                     tokens.new_zeros(()), tokens.new_zeros(())))
        if self._pending_losses:
            losses = torch.stack([x.float() for x in self._pending_losses]).double()
            if self._loss_scale != 1:
                losses = losses * self._loss_scale
            finite = torch.isfinite(losses)
            zero = losses.new_zeros(())
            vec = vec + torch.stack((zero, zero, (~finite).sum().double(),
                                     torch.where(finite, losses, zero).sum(), finite.sum().double()))
        self._pending_tokens, self._pending_losses = [], []
        self._folded = vec
        return vec

    def _finish_flop_measurement(self, count: BatchCount) -> None:
        counter, self._flop_counter = self._flop_counter, None
        counter.__exit__(None, None, None)
        tokens = int(count.tokens)  # first batch only: one host read is fine here
        self.convention = measured_flops_per_token(int(counter.get_total_flops()), tokens)
        log.info("scalewatch: FLOPs: %s", self.convention.description)

    def _log_every(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)

    # ------------------------------------------------------ gradient noise scale
    def _gns_note(self, trainer: Trainer, key: str, message: str) -> None:
        """Say a noise-scale message once per run (rank 0)."""
        if key not in self._gns_warned:
            self._gns_warned.add(key)
            if trainer.is_global_zero:
                log.warning("scalewatch: gradient noise scale: %s", message)

    def _choose_gns_method(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        method, message = choose_gns_method(self.gns_mode, trainer.strategy, trainer.world_size,
                                            trainer.accumulate_grad_batches, pl_module.automatic_optimization)
        if message is not None:
            self._gns_note(trainer, "method", message)
        return method

    def _setup_gns(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_gns_hooks()
        self._gns_sizes = []
        if self.gns_mode == "off":
            return
        method = self._choose_gns_method(trainer, pl_module)
        if method is None:
            return
        if method in ("per_example", "per_example_norm"):
            layers = "all" if method == "per_example" else "norm"
            capture: ParamGradHooks | DDPCommHookCapture | PerExampleNorms = PerExampleNorms(pl_module, layers=layers)
            if capture.n_modules == 0:
                capture.remove()
                kinds = "Linear, LayerNorm or RMSNorm" if layers == "all" else "LayerNorm or RMSNorm"
                self._gns_note(trainer, "no_linear", f"{method} found no {kinds} layer with its own trainable "
                               "weights; use gradient accumulation or DDP for a free estimate")
                return
        elif method == "ddp":
            capture = self._ddp_capture(trainer, pl_module)
        else:
            capture = ParamGradHooks(pl_module.parameters())
        self.gns_method = method
        self._gns_capture = capture
        self._gns_ema = DeviceNoiseEMA(self.gns_decay, device=self._device or "cpu")
        self._apply_gns_restored()
        if trainer.is_global_zero:
            log.info("scalewatch: gradient noise scale from %s", self._gns_description())

    def _ddp_capture(self, trainer: Trainer, pl_module: LightningModule) -> ParamGradHooks | DDPCommHookCapture:
        """A DDP communication hook (one norm per bucket); per-parameter hooks if one cannot be registered."""
        model = getattr(trainer.strategy, "model", None)
        if self._ddp_hook is not None and self._ddp_hook_model is model:
            self._ddp_hook.reactivate()  # registered on this very model by an earlier setup
            return self._ddp_hook
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            try:
                self._ddp_hook = DDPCommHookCapture(model, pl_module.parameters(),
                                                    getattr(trainer.strategy, "process_group", None))
                self._ddp_hook_model = model
                return self._ddp_hook
            except RuntimeError as exc:  # e.g. the run already registered its own comm hook
                self._gns_note(trainer, "comm_hook", f"no DDP communication hook ({exc}); using per-parameter "
                               "hooks, which cost one norm per parameter")
        return ParamGradHooks(pl_module.parameters())

    def _gns_description(self) -> str:
        return {
            "ddp": "each rank's local gradient before the all-reduce (a DDP communication hook) vs the global "
                   "gradient",
            "accumulation": "each micro-batch's gradient vs the accumulated step gradient",
            "ddp+accumulation": "each rank's micro-batch gradients vs the global step gradient",
            "per_example": "per-example gradient norms of Linear/LayerNorm/RMSNorm weights vs their batch gradient",
            "per_example_norm": "per-example gradient norms of LayerNorm/RMSNorm weights only (Gray et al.) vs "
                                "their batch gradient",
        }.get(self.gns_method or "", "not measured")

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._gns_capture is not None:
            self._gns_capture.end_backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Before gradient clipping (Lightning clips after this hook) and after AMP unscaling.
        sizes, self._gns_sizes = self._gns_sizes, []
        if self._gns_capture is None or self._gns_ema is None:
            return
        try:
            self._gns_step(trainer, pl_module, optimizer, sizes)
        except Exception as exc:  # monitoring must never crash the run; the state stays, updates stop
            self._gns_note(trainer, "error", f"stopped after {type(exc).__name__}: {exc}")
            self._remove_gns_hooks()

    def _gns_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any, sizes: list[int]) -> None:
        assert self._gns_capture is not None and self._gns_ema is not None
        if isinstance(self._gns_capture, PerExampleNorms):
            per_example, batch, params = self._gns_capture.take_step()
            for message in self._gns_capture.warnings:
                self._gns_note(trainer, message, message)
            self._gns_capture.warnings = []
            if per_example is None or batch < 2:
                return
            big = grad_sq_norm(params)
            if big is None:
                return
            # Example i's own gradient is B x its contribution to the batch-mean gradient.
            small, b_small, b_big = per_example * batch, 1, batch
        else:
            total, backwards = self._gns_capture.take_step()
            if total is None or backwards == 0:
                return
            if not pl_module.automatic_optimization and backwards > 1:
                self._gns_note(trainer, "manual", "skipped: several backwards per step under manual optimization, "
                               "and how their losses were scaled is unknown")
                return
            if len(set(sizes[-backwards:])) != 1 or len(sizes) < backwards:
                return  # unequal micro-batches (a short last batch): the two-size estimator does not apply
            big = grad_sq_norm(self._gns_capture.params)
            if big is None:
                return
            # Lightning divides each micro-batch loss by accumulate_grad_batches (k); the step's
            # gradient is then (n/k) x the mean of the n micro-batch gradients.
            k = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            small = total * (k * k / backwards)
            big = big * (k / backwards) ** 2
            b_small = sizes[-1]
            if b_small <= 0:
                self._gns_note(trainer, "samples", "skipped: the batch size in sequences is unknown; pass "
                               "ScaleWatch(samples_fn=lambda batch: <number of sequences>)")
                return
            b_big = b_small * backwards * trainer.world_size
            if b_big <= b_small:
                return
        scale = self._amp_scale(trainer, pl_module, optimizer)
        if scale is not None:
            small = small / scale.double().square()  # hook gradients carry the loss scale, .grad does not
        self._gns_ema.update(small, big, b_small, b_big)

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

    def _remove_gns_hooks(self) -> None:
        if self._gns_capture is not None:
            self._gns_capture.remove()
        self._gns_capture = None

    # -------------------------------------------------------- log interval
    def _reduce_pending(self, trainer: Trainer) -> None:
        """Fold this rank's unreduced counts of all ranks into the global totals (ONE collective).

        The interval's global loss sum and count go to ``_interval_loss``.
        Every rank must call this at the same point.
        """
        if self._device is None:
            return
        dev = self._fold()  # tokens, tokens x seq_len, non-finite, loss sum, loss count
        host = torch.tensor([self._host[0], self._host[1], self._host[2], 0, 0, 0],
                            dtype=torch.float64).to(dev.device)
        # Layout: tokens, samples, tokens x seq_len, non-finite, loss sum, loss count.
        # float64 is exact for any interval's counts below 2**53.
        vec = host + torch.stack((dev[0], dev.new_zeros(()), dev[1], dev[2], dev[3], dev[4]))
        if self._gns_ema is not None:
            # The noise-scale EMAs ride along in the same collective (every rank has them or none).
            vec = torch.cat((vec, self._gns_ema.state.to(vec.device)))
        world = trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        if self._gns_ema is not None:
            # Averaging the ranks' EMAs is exact: the estimators are linear in each rank's small norm.
            self._gns_ema.state = vec[6:9] / world
        values = vec.tolist()  # the one host read of the interval
        if self._gns_ema is not None:
            self._gns_host = (values[6] / world, values[7] / world, values[8] / world)
        self._folded = None
        self._host = [0, 0, 0]
        d_tokens, d_samples, d_tok_len, d_nonfinite = (int(round(v)) for v in values[:4])
        self.tokens += d_tokens
        self.samples += d_samples
        self.tokens_x_seq_len += d_tok_len
        self.nonfinite += d_nonfinite
        if self.convention is not None:
            self.flops += self.convention.flops(d_tokens, d_tok_len)
        self._interval_loss[0] += values[4]
        self._interval_loss[1] += values[5]

    def _observation(self, trainer: Trainer, loss: float) -> Observation:
        lr = None
        if trainer.optimizers:
            groups = trainer.optimizers[0].param_groups
            if groups and isinstance(groups[0].get("lr"), (int, float)):
                lr = float(groups[0]["lr"])
        return Observation(step=trainer.global_step, tokens=self.tokens, samples=self.samples, flops=self.flops,
                           loss=loss, time=time.perf_counter() - self._t0, lr=lr, nonfinite=self.nonfinite)

    def _fallback_loss(self, trainer: Trainer) -> float:
        keys = (self.loss_key,) if self.loss_key else _LOSS_KEYS
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if isinstance(value, Tensor) and value.numel() == 1:
                return float(value)
            if isinstance(value, (int, float)):
                return float(value)
        if not self._loss_source_warned and trainer.is_global_zero:
            log.warning("scalewatch: no training loss found (training_step returned none and no %s was logged); "
                        "pass ScaleWatch(loss_key=...) to name it", " / ".join(keys))
            self._loss_source_warned = True
        return math.nan

    def _log(self, trainer: Trainer, pl_module: LightningModule, loss_seen: bool) -> None:
        self._reduce_pending(trainer)
        (loss_sum, loss_n), self._interval_loss = self._interval_loss, [0.0, 0.0]
        self._last_logged_step = trainer.global_step
        try:
            if loss_n > 0:
                loss = loss_sum / loss_n
            elif loss_seen:
                loss = math.nan  # every loss of the interval was non-finite: record, never raise
            else:
                loss = self._fallback_loss(trainer)
            obs = self._observation(trainer, loss)
            self._add_interval_extras(trainer, obs)
            scalars = self.monitor.observe(obs)
            self.latest = scalars
            if trainer.is_global_zero:
                self._write(trainer, obs, scalars)
        except Exception as exc:  # monitoring must never crash the run
            log.warning("scalewatch: could not log step %d: %s: %s", trainer.global_step, type(exc).__name__, exc)

    def _add_interval_extras(self, trainer: Trainer, obs: Observation) -> None:
        """Batch size of the interval and the noise-scale EMAs, for the monitor's plugins."""
        step0, samples0, tokens0 = self._interval_start
        self._interval_start = (obs.step, obs.samples, obs.tokens)
        steps = obs.step - step0
        if steps > 0 and obs.samples > samples0:
            obs.extra["batch_samples"] = (obs.samples - samples0) / steps
            obs.extra["batch_tokens"] = (obs.tokens - tokens0) / steps
        if self._gns_host is not None and self._gns_host[2] > 0:
            m_g2, m_tr, weight = self._gns_host
            obs.extra["gns/g2"] = m_g2 / weight
            obs.extra["gns/trace"] = m_tr / weight

    def _write(self, trainer: Trainer, obs: Observation, scalars: Mapping[str, float]) -> None:
        metrics = {PREFIX + k: v for k, v in scalars.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=obs.step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if not self._conventions_written:
                    writer.add_text(PREFIX + "conventions", self.describe(), global_step=obs.step)
                if self.curve_plugin is not None and not self._layout_written and hasattr(writer, "add_custom_scalars"):
                    writer.add_custom_scalars(CURVE_LAYOUT)
                    self._layout_written = True
                if not self._gns_method_written and self.gns_mode != "off":
                    writer.add_text(PREFIX + "gns/method", f"{self.gns_method or 'none'}: {self._gns_description()}",
                                    global_step=obs.step)
                # Series whose x-axis is the token count / compute, for loss-vs-tokens plots.
                writer.add_scalar(PREFIX + "loss_vs_tokens", obs.loss, global_step=obs.tokens)
                writer.add_scalar(PREFIX + "loss_vs_gflop", obs.loss, global_step=obs.flops // 10**9)
        self._conventions_written = True
        self._gns_method_written = True

    def describe(self) -> str:
        """The conventions behind the logged numbers, in words."""
        n = f"N = {self.n_params:,}" if self.n_params else "N unknown"
        if self.params is not None:
            n += f" (trainable: {self.params.total:,}; non-embedding: {self.params.non_embedding:,})"
        flops = self.convention.description if self.convention else f"FLOPs: {self.flops_mode} (pending)"
        gns = f" Gradient noise scale: {self.gns_method or 'none'} ({self._gns_description()})." \
            if self.gns_mode != "off" else ""
        return (f"{n}. FLOPs: {flops}. Tokens: positions carrying loss (mask/-100 excluded), summed over ranks."
                + gns)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation inside a training epoch is not training time: keep it out of the rates.
        if self._val_started is not None and self._device is not None:
            self._t0 += time.perf_counter() - self._val_started
        self._val_started = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # All ranks reach here together: flush the tail of the run as a last log point.
        if self._last_logged_step != trainer.global_step and self._device is not None:
            self._log(trainer, pl_module, loss_seen=False)
        self._remove_gns_hooks()
        if self.curve_plugin is not None:
            self._write_final_forecast(trainer)

    def _write_final_forecast(self, trainer: Trainer) -> None:
        """Log the forecast still in flight at the end, at the last step."""
        assert self.curve_plugin is not None
        try:
            latest = self.curve_plugin.finish()
            if latest and trainer.is_global_zero and self.latest.get("loss_forecast_at_step") != \
                    latest.get("loss_forecast_at_step"):
                self.latest.update(latest)
                for logger in trainer.loggers:
                    logger.log_metrics({PREFIX + k: v for k, v in latest.items()}, step=trainer.global_step)
        except Exception as exc:  # monitoring must never crash the run
            log.warning("scalewatch: could not write the final forecast: %s", exc)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_gns_hooks()  # also after an exception, so the hooks never outlive the fit
        if self.curve_plugin is not None:
            self.curve_plugin.finish()  # no worker thread outlives the fit

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is dumped: fold the unreduced counts in first,
        # so that nothing a rank counted is lost with the checkpoint (only rank 0's copy is saved).
        if self._device is not None and self._trainer is not None:
            self._reduce_pending(self._trainer)
        return {
            "version": _STATE_VERSION,
            "tokens": self.tokens,
            "samples": self.samples,
            "tokens_x_seq_len": self.tokens_x_seq_len,
            "flops": self.flops,
            "nonfinite": self.nonfinite,
            "n_params": self.n_params,
            "flop_convention": None if self.convention is None else {
                "per_token": self.convention.per_token,
                "attention_coeff": self.convention.attention_coeff,
                "description": self.convention.description,
            },
            "monitor": self.monitor.state_dict(),
            "curve_schedule": None if self._schedule_saved is None else self._schedule_saved.tolist(),
            "gns": None if self._gns_ema is None and self._gns_restored is None else {
                "method": self.gns_method,
                "decay": self.gns_decay,
                # Reduced over ranks just above: the same on every rank.
                "state": self._gns_ema.state.tolist() if self._gns_ema is not None else self._gns_restored,
            },
        }

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument but must reduce across ranks

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            log.warning("scalewatch: checkpoint state version %r is not %d; counts start from zero", version,
                        _STATE_VERSION)
            return
        self.tokens = int(state_dict["tokens"])
        self.samples = int(state_dict["samples"])
        self.tokens_x_seq_len = int(state_dict["tokens_x_seq_len"])
        self.flops = int(state_dict["flops"])
        self.nonfinite = int(state_dict["nonfinite"])
        conv = state_dict.get("flop_convention")
        if conv is not None and self.flops_mode == "measured":
            # A measured convention is kept across resumes so the FLOP series stays consistent.
            self.convention = FlopConvention(float(conv["per_token"]), int(conv["attention_coeff"]),
                                             str(conv["description"]))
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
        saved = state_dict.get("curve_schedule")
        if isinstance(saved, list) and saved:
            self._schedule_saved = np.asarray(saved, dtype=float)
        gns = state_dict.get("gns")
        if gns and gns.get("state") is not None and len(gns["state"]) == 3:
            self._gns_restored = [float(v) for v in gns["state"]]  # applied when training starts
            self._apply_gns_restored()

    def _apply_gns_restored(self) -> None:
        if self._gns_ema is not None and self._gns_restored is not None:
            self._gns_ema.state = torch.tensor(self._gns_restored, dtype=torch.float64,
                                               device=self._gns_ema.state.device)
