"""``ScaleWatch``: the Lightning callback, a thin adapter around :class:`~scalewatch.monitor.Monitor`.

On every micro-batch it adds the batch's token and sample counts to
accumulators (Python ints where shapes give the count, device tensors where a
mask does) and the loss to a device tensor; nothing is read back to the host.
Once per log interval it reduces the accumulators across ranks in ONE
collective, turns them into an :class:`~scalewatch.monitor.Observation` and
logs what the monitor returns, on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

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
from scalewatch.monitor import Monitor, Observation

log = logging.getLogger("scalewatch")

PREFIX = "scalewatch/"
_FLOP_MODES = ("6N", "6N+attn", "measured")
_PARAM_CONVENTIONS = ("total", "non_embedding")
_LOSS_KEYS = ("train_loss", "loss", "train/loss", "training_loss")
_STATE_VERSION = 1

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

        self.monitor = Monitor(history_size=history_size)
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
        self._t0 = time.perf_counter()
        self.monitor.start(self._observation(trainer, loss=math.nan))

    # --------------------------------------------------------------- hot path
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.flops_mode == "measured" and self.convention is None and self._flop_counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            # Entered here and left in on_train_batch_end so that the user's own
            # forward AND backward of this first batch are what gets counted.
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        first = self._seen_batches == 0
        self._seen_batches += 1
        count = self._count(batch, first)
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
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        values = vec.tolist()  # the one host read of the interval
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
            scalars = self.monitor.observe(obs)
            if trainer.is_global_zero:
                self._write(trainer, obs, scalars)
        except Exception as exc:  # monitoring must never crash the run
            log.warning("scalewatch: could not log step %d: %s: %s", trainer.global_step, type(exc).__name__, exc)

    def _write(self, trainer: Trainer, obs: Observation, scalars: Mapping[str, float]) -> None:
        metrics = {PREFIX + k: v for k, v in scalars.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=obs.step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if not self._conventions_written:
                    writer.add_text(PREFIX + "conventions", self.describe(), global_step=obs.step)
                # Series whose x-axis is the token count / compute, for loss-vs-tokens plots.
                writer.add_scalar(PREFIX + "loss_vs_tokens", obs.loss, global_step=obs.tokens)
                writer.add_scalar(PREFIX + "loss_vs_gflop", obs.loss, global_step=obs.flops // 10**9)
        self._conventions_written = True

    def describe(self) -> str:
        """The conventions behind the logged numbers, in words."""
        n = f"N = {self.n_params:,}" if self.n_params else "N unknown"
        if self.params is not None:
            n += f" (trainable: {self.params.total:,}; non-embedding: {self.params.non_embedding:,})"
        flops = self.convention.description if self.convention else f"FLOPs: {self.flops_mode} (pending)"
        return f"{n}. FLOPs: {flops}. Tokens: positions carrying loss (mask/-100 excluded), summed over ranks."

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
