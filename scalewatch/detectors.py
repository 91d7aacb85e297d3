"""Run-health detectors: Monitor stages that read the stream and return findings. Plain Python.

Each detector sees every observation (the live callback's, or a replay of logs) and the report the
forecasters built (``loss_pred`` and its band, the noise scale), and says, per kind, whether the
condition holds now. The Monitor's alert book turns that into firing/resolved alerts with
hysteresis and cooldown. Thresholds live in :class:`HealthConfig`; the README justifies each default
by a measurement (``benchmarks/detection.py``).

Kinds: ``nonfinite`` (critical), ``spike``, ``grad_spike``, ``divergence`` (critical), ``saturation``,
``off_curve``, ``undertrained``, ``overtrained`` (info), ``repeated_data``, ``batch_size`` (info).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scalewatch.alerts import Finding
from scalewatch.monitor import Observation, StageOutput

#: Chinchilla's compute-optimal tokens per parameter (Hoffmann et al. 2022), used without a law.
CHINCHILLA_TOKENS_PER_PARAM = 20.0
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class HealthConfig:
    """Detector thresholds. Every default is measured in ``benchmarks/detection.py`` (README: Run health).

    Attributes:
        warmup_points: log points a spike detector waits for before it judges (its baseline needs them).
        window: log points behind every detector's noise scale (a MAD over a few dozen changes is itself
            noisy, and an underestimate turns chance into an alert).
        spike_sigma: a loss spike is at least this many robust standard deviations above the baseline...
        spike_min_rel: ...and at least this fraction above it (a very smooth curve has a MAD near 0).
        grad_spike_sigma, grad_spike_min_rel: the same for the gradient norm (noisier: a spike is > 3x).
        divergence_rel: divergence when the last ``divergence_points`` interval losses all sit this
            fraction above the best (smoothed) loss so far.
        divergence_points: how many consecutive log points (a spike lasts one or two), the last not
            more than ``divergence_rel`` below the first (a loss climbing down fast is recovering).
        saturation_window: log points over which saturation compares the loss (and the LR) early and late.
        saturation_rise: the loss rose by this fraction over the window while the LR did not rise...
        saturation_min_gain: ...or the LR fell to ``saturation_lr_drop`` of its value (or lower) over the
            window and the loss improved by less than this fraction (a decaying LR always buys progress).
        off_curve_points: consecutive log points outside the predicted band before ``off_curve`` fires.
        undertrained_factor: warn when the projected tokens per parameter at the end of the run is below
            the compute-optimal ratio divided by this (N about twice too large for the compute).
        overtrained_factor: an info finding above the optimal ratio times this.
        max_epochs: more repetitions of the unique data than this is flagged (Muennighoff et al. 2023:
            up to about 4 epochs cost little).
        batch_factor: an info finding when the batch is this many times above or below B_crit...
        batch_points: ...for this many consecutive log points: a single reading of the noise scale (a
            noisy estimate) is not enough, two in a row raise it within 2 log intervals of the first reading.
        noise_sigma: divergence and saturation also need their change to exceed this many standard
            errors of the loss's log-to-log noise (measured on the recent points), so a noisy but
            healthy training loss does not trip them.
    """

    warmup_points: int = 8
    window: int = 128
    spike_sigma: float = 6.0
    spike_min_rel: float = 0.10
    grad_spike_sigma: float = 6.0
    grad_spike_min_rel: float = 2.0
    divergence_rel: float = 0.05
    divergence_points: int = 2
    saturation_window: int = 20
    saturation_rise: float = 0.01
    saturation_min_gain: float = 0.001
    saturation_lr_drop: float = 0.7
    off_curve_points: int = 4
    undertrained_factor: float = 4.0
    overtrained_factor: float = 5.0
    max_epochs: float = 4.0
    batch_factor: float = 3.0
    batch_points: int = 2
    noise_sigma: float = 5.0

    def __post_init__(self) -> None:
        from scalewatch.config import ScaleWatchConfigError

        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ScaleWatchConfigError(f"scalewatch: health threshold {name} must be a positive number, "
                                            f"got {value!r}")
            if name in _COUNTS and not isinstance(value, int):
                raise ScaleWatchConfigError(f"scalewatch: health threshold {name} counts log points: a whole "
                                            f"number, got {value!r}")
        if self.warmup_points > self.window:
            raise ScaleWatchConfigError(f"scalewatch: health threshold warmup_points ({self.warmup_points}) must "
                                        f"not exceed window ({self.window}), or the spike detectors never judge")
        if self.saturation_lr_drop >= 1:
            raise ScaleWatchConfigError(f"scalewatch: health threshold saturation_lr_drop is the LR's fraction left "
                                        f"(below 1), got {self.saturation_lr_drop!r}")


_COUNTS = ("warmup_points", "window", "divergence_points", "saturation_window", "off_curve_points", "batch_points")


def noise_scale(values: Sequence[float]) -> float:
    """Robust standard deviation of a series' point-to-point noise, its trend removed.

    From second differences (``x[i+1] - 2 x[i] + x[i-1]``, which cancel a locally straight trend,
    so a curve that bends does not count as noise): 1.4826 x their MAD / sqrt 6. Zero for fewer
    than 4 points.

    Example:
        >>> noise_scale([1.0, 2.0, 4.0, 7.0, 11.0]), round(noise_scale([3.0, 3.1, 2.9, 3.0, 3.05, 2.95]), 3)
        (0.0, 0.076)
    """
    if len(values) < 4:
        return 0.0
    d2 = [a - 2 * b + c for a, b, c in zip(values[:-2], values[1:-1], values[2:])]
    mid = statistics.median(d2)  # the curvature, common to all
    return _MAD_TO_SIGMA * statistics.median(abs(d - mid) for d in d2) / math.sqrt(6)


def robust_excess(value: float, recent: Sequence[float], sigma: float, min_rel: float) -> float | None:
    """How far ``value`` is above the recent past, in units of the alert threshold (> 1: a spike); None if unknown.

    The level is the median of the last three points, so a falling (warm-up) or rising curve is its
    own baseline; the noise is :func:`noise_scale` over ``recent`` (second differences), so a trend
    does not inflate it. The threshold is the larger of
    ``sigma`` x noise and ``min_rel`` x the level: a very smooth curve does not turn noise into spikes.

    Example:
        >>> round(robust_excess(5.0, [3.0, 3.1, 2.9, 3.0, 3.05], sigma=6, min_rel=0.1), 1)
        2.2
        >>> robust_excess(3.1, [3.0, 3.1, 2.9, 3.0, 3.05], sigma=6, min_rel=0.1) < 1
        True
        >>> falling = [6.0 - 0.2 * i for i in range(15)]          # warm-up: 6.0 ... 3.2
        >>> robust_excess(3.5, falling, sigma=6, min_rel=0.1) < 1 < robust_excess(4.0, falling, 6, 0.1)
        True
    """
    if len(recent) < 4 or not math.isfinite(value):
        return None
    level = statistics.median(recent[-3:])
    threshold = max(sigma * noise_scale(recent), min_rel * abs(level), 1e-12)
    return (value - level) / threshold


class _Detector:
    """Shared plumbing: a name, the kinds it reports, its (JSON-able) state."""

    name = "detector"
    kind = "detector"
    kinds: tuple[str, ...] = ()

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.cfg = config or HealthConfig()

    def state_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, deque) else v) for k, v in vars(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            current = getattr(self, k, None)
            setattr(self, k, deque(v, maxlen=current.maxlen) if isinstance(current, deque) else v)


class NonFiniteDetector(_Detector):
    """Critical at the first log point whose interval saw a NaN/Inf loss or gradient norm."""

    name = "nonfinite"
    kinds = ("nonfinite",)

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.first_step: int | None = None  # the log step of the episode's first bad interval
        self.first_from: int | None = None  # that interval's first step (the step after the previous log point)
        self.prev_step = 0  # the previous log point's step (counts start at step 0)

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        bad = not obs.all_finite or (obs.grad_norm_max is not None and not math.isfinite(obs.grad_norm_max)) \
            or obs.grad_nonfinite > 0
        since, self.prev_step = self.prev_step + 1, obs.step
        if not bad:
            self.first_step = self.first_from = None  # a later episode reports its own first interval
            return StageOutput(findings=[Finding("nonfinite", False, "critical", "losses and gradients finite again")])
        if self.first_step is None:
            self.first_step, self.first_from = obs.step, min(since, obs.step)
        first_from = self.first_from if self.first_from is not None else self.first_step
        # The detector sees log points: the NaN is somewhere in the interval since the previous one.
        where = (f"at step {self.first_step:,}" if first_from == self.first_step
                 else f"in steps {first_from:,}–{self.first_step:,}")
        still = f" (still at step {obs.step:,})" if obs.step != self.first_step else ""
        what = "loss" if not obs.all_finite else "gradient norm"
        return StageOutput(findings=[Finding(
            "nonfinite", True, "critical",
            f"non-finite {what} {where}{still} ({obs.nonfinite} NaN/Inf micro-batch losses so far): check the LR "
            "and warmup, fp16 loss scaling and the data of those steps; resume from the last finite checkpoint",
            values={"nonfinite_losses": float(obs.nonfinite), "first_step": float(self.first_step),
                    "interval_start": float(first_from)})])


class _SpikeDetector(_Detector):
    """A value against a robust baseline of its own recent past; the spiking values stay out of the baseline."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.recent: deque[float] = deque(maxlen=self.cfg.window)
        self.mode = "raw"  # what `recent` holds; a switch (e.g. the predicted curve ends) starts a new baseline

    def _judge(self, kind: str, value: float | None, sigma: float, min_rel: float, what: str,
               obs: Observation, scale: float = 1.0, relative: bool = False) -> list[Finding]:
        if value is None or not math.isfinite(value):
            return []
        excess = robust_excess(value, list(self.recent), sigma, min_rel) \
            if len(self.recent) >= self.cfg.warmup_points else None
        spiking = excess is not None and excess > 1.0
        if not spiking:
            self.recent.append(value)
        if excess is None:
            return []
        level = statistics.median(list(self.recent)[-3:])
        # Judged as a ratio to the predicted curve: said as one, since the prediction moves with the schedule
        # (the recent ratio times this step's prediction is a loss the run may never have shown).
        against = (f", {value:.3g}x the predicted {scale:.4g}, against a recent {level:.3g}x" if relative
                   else f" against a recent level of {level * scale:.4g}")
        return [Finding(kind, spiking, "warning",
                        f"{what} spike at step {obs.step:,}: {value * scale:.4g}{against} ({excess:.1f}x the alert "
                        "threshold); if it does not come back within a "
                        "few log points, lower the LR or skip the batches of that step",
                        values={"value": value * scale, "level": level * scale, "excess": excess})]


class LossSpikeDetector(_SpikeDetector):
    """The interval's largest micro-batch loss against its recent past (or the excess over the predicted
    curve when a curve law is given, so that the schedule's own drops are not part of the baseline)."""

    name = "spike"
    kinds = ("spike",)

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        value = obs.loss_max if math.isfinite(obs.loss_max) else obs.loss
        pred = _scalar(monitor, "loss_pred")
        mode = "raw" if pred is None else "relative"
        if mode != self.mode:  # ratios to the prediction and raw losses do not share a baseline
            self.recent.clear()
            self.mode = mode
        if pred is not None and math.isfinite(value):
            # Relative excess over the predicted curve: the baseline follows the schedule.
            findings = self._judge("spike", value / pred, self.cfg.spike_sigma, self.cfg.spike_min_rel, "loss", obs,
                                   scale=pred, relative=True)
        else:
            findings = self._judge("spike", value, self.cfg.spike_sigma, self.cfg.spike_min_rel, "loss", obs)
        return StageOutput(findings=findings)


class GradNormSpikeDetector(_SpikeDetector):
    """The interval's largest global gradient norm (before clipping) against its recent past."""

    name = "grad_spike"
    kinds = ("grad_spike",)

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        value = obs.grad_norm_max if obs.grad_norm_max is not None else obs.grad_norm
        return StageOutput(findings=self._judge("grad_spike", value, self.cfg.grad_spike_sigma,
                                                self.cfg.grad_spike_min_rel, "gradient-norm", obs))


class DivergenceDetector(_Detector):
    """A sustained rise of the loss above its best so far: slow blow-ups that a spike rule misses.

    Fires when the last ``divergence_points`` interval losses all sit above the recent best (the lowest
    median of 5 consecutive points in the last ``window`` log points) by ``divergence_rel`` and by
    ``noise_sigma`` x the log-to-log noise,
    and the loss is not coming down fast (a spike it recovers from is the spike detector's).
    """

    name = "divergence"
    kinds = ("divergence",)

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.recent: deque[float] = deque(maxlen=self.cfg.divergence_points)
        self.best: float | None = None  # the lowest median-of-5 loss of the last `window` log points
        self.best_step = 0
        # The best of a recent window, not of all time: over a long noisy run the all-time minimum of a
        # noisy statistic drifts far below the loss's typical value, and healthy points then exceed it.
        self._bests: deque[tuple[int, float]] = deque(maxlen=self.cfg.window)
        self.last_healthy_step = 0
        self._smooth: deque[float] = deque(maxlen=5)  # "best" is the lowest median of 5: a noisy series'
        # running minimum of single points (or of 3) sits far below its typical value
        self._window: deque[float] = deque(maxlen=self.cfg.window)  # for the noise scale
        # step -> path of the newest checkpoint saved at or before it; set by the Lightning callback
        self.checkpoint_before: Callable[[int], str | None] | None = None

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        if not math.isfinite(obs.loss):
            return StageOutput()
        self.recent.append(obs.loss)
        self._smooth.append(obs.loss)
        self._window.append(obs.loss)
        # Above the best by a fraction, and by more than the log-to-log noise: a noisy plateau's dips set a
        # low "best" that healthy points exceed by chance.
        limit = math.inf if self.best is None else self.best + max(
            self.cfg.divergence_rel * self.best, self.cfg.noise_sigma * noise_scale(list(self._window)))
        # Sustained and not recovering: a spike the loss is climbing down from is not a divergence.
        rising = (len(self.recent) == self.recent.maxlen and all(x > limit for x in self.recent)
                  and self.recent[-1] >= (1 - self.cfg.divergence_rel) * self.recent[0])
        if obs.loss <= limit:
            self.last_healthy_step = obs.step
        if len(self._smooth) == self._smooth.maxlen and not rising:
            self._bests.append((obs.step, statistics.median(self._smooth)))
            self.best_step, self.best = min(self._bests, key=lambda b: b[1])
        if self.best is None:
            return StageOutput()
        ckpt = self.checkpoint_before(self.last_healthy_step) if rising and self.checkpoint_before else None
        where = f"the last healthy checkpoint: {ckpt}" if ckpt else \
            f"a checkpoint at or before step {self.last_healthy_step:,}"
        return StageOutput(findings=[Finding(
            "divergence", rising, "critical",
            f"loss diverging since step {self.last_healthy_step:,}: {self.best:.4g} (best, step {self.best_step:,}) "
            f"-> {obs.loss:.4g} at step {obs.step:,} (tokens {obs.tokens:.3g}); stop, lower the LR (or check the "
            f"fp16 loss scale) and resume from {where}",
            values={"best": self.best, "loss": obs.loss, "last_healthy_step": float(self.last_healthy_step)})])

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "checkpoint_before"}


class SaturationDetector(_Detector):
    """The run stopped improving where its schedule says it should still improve.

    Without a curve law, compares the median loss (and LR) of the first and last quarter of a window
    of log points: a loss that rose while the LR did not rise, or an LR that fell by 30% or more while
    the loss did not improve. A plateau under a constant LR is not saturation. With a curve law, also:
    the final-loss forecast drifts above the law's band for the end of the run (even the low end of the
    forecast's band lies above the high end of the law's) for ``off_curve_points`` forecasts in a row.
    """

    name = "saturation"
    kinds = ("saturation",)

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.points: deque[tuple[float, float | None]] = deque(maxlen=self.cfg.saturation_window)
        self._noise: deque[float] = deque(maxlen=self.cfg.window)
        self.drifting = 0  # consecutive new forecasts whose whole band sits above the predicted final loss
        self._forecast_at: float | None = None

    def _drift(self, monitor: Any) -> str | None:
        """Why the forecast says the run will end above its law, or None."""
        fc, low, pred, at = (_scalar(monitor, k) for k in ("loss_forecast_final", "loss_forecast_final_low",
                                                           "loss_pred_final", "loss_forecast_at_step"))
        if fc is None or low is None or pred is None or at is None:
            return None
        # Above the law's band, not its point: late in a run the forecast's band is narrower than the law's, and a
        # run ending within the law's own error is as good as its pilots (streams without the band's high end, the
        # point, as before).
        high = _scalar(monitor, "loss_pred_final_high") or pred
        if at != self._forecast_at:  # only a new forecast counts: the same one re-reported is no evidence
            self._forecast_at = at
            self.drifting = self.drifting + 1 if low > high else 0
        if self.drifting < self.cfg.off_curve_points:
            return None
        return (f"the final-loss forecast {fc:.4g} (low end {low:.4g}) has stayed above the law's prediction "
                f"{pred:.4g} (the high end of its 90% band {high:.4g}) for the end of the run over {self.drifting} "
                "forecasts")

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        if not math.isfinite(obs.loss):
            return StageOutput()
        drift = self._drift(monitor)
        self.points.append((obs.loss, obs.lr))
        self._noise.append(obs.loss)
        change, lr_ratio, rising, stalled = 0.0, 1.0, False, False
        if len(self.points) == self.points.maxlen:
            change, lr_ratio, rising, stalled = self._trend()
        elif drift is None:
            return StageOutput()
        if drift is not None and not (rising or stalled):  # still improving, more slowly than the law says
            message = (f"the run is improving more slowly than its law at step {obs.step:,}: {drift}; it is heading "
                       "for a worse end than its pilots: check the LR schedule and data against theirs, and stop "
                       "early or change the plan if it keeps drifting")
        else:
            why = (f"the loss rose {change:+.2%} over the last {len(self.points)} log points while the LR did not "
                   "rise" if rising else f"the LR fell to {lr_ratio:.0%} over the last {len(self.points)} log points "
                   f"but the loss changed only {change:+.2%}") + (f"; {drift}" if drift is not None else "")
            message = (f"the run stopped improving at step {obs.step:,}: {why}; a smaller model trained this long, or "
                       "the LR schedule, is at its limit: stop early or change the plan")
        return StageOutput(findings=[Finding(
            "saturation", rising or stalled or drift is not None, "warning", message,
            values={"change": change, "lr_ratio": lr_ratio, "forecast_drift": float(self.drifting)})])

    def _trend(self) -> tuple[float, float, bool, bool]:
        """``(relative change, LR ratio, rising, stalled)`` of the window's first and last quarters."""
        q = max(len(self.points) // 4, 1)
        early = statistics.median(x for x, _ in list(self.points)[:q])
        late = statistics.median(x for x, _ in list(self.points)[-q:])
        lrs = [lr for _, lr in self.points]
        change = (late - early) / abs(early)
        # The difference of two medians of q points has a standard error of about 1.77 sigma / sqrt(q):
        # a change smaller than a few of those is noise, not a trend.
        se = 1.77 * noise_scale(list(self._noise)) / math.sqrt(q) / abs(early)
        known = all(lr is not None for lr in lrs)
        lr_ratio = (statistics.median(lrs[-q:]) / statistics.median(lrs[:q])  # type: ignore[type-var]
                    if known and statistics.median(lrs[:q]) > 0 else 1.0)  # type: ignore[type-var, operator]
        # "while the LR did not rise" anywhere in the window: a loss that rose after the LR was raised (a restart,
        # a blow-up) is the LR's doing (spike and divergence say so), not a model at its limit
        lr_rose = known and statistics.median(lrs[:q]) > 0 and \
            max(lrs) / statistics.median(lrs[:q]) > 1.01  # type: ignore[type-var, operator, arg-type]
        rising = change > max(self.cfg.saturation_rise, self.cfg.noise_sigma * se) and lr_ratio <= 1.01 \
            and not lr_rose
        stalled = (known and lr_ratio <= self.cfg.saturation_lr_drop
                   and -change + self.cfg.noise_sigma * se < self.cfg.saturation_min_gain)
        return change, lr_ratio, rising, stalled


class OffCurveDetector(_Detector):
    """With a curve law: the loss outside its predicted band for a sustained stretch."""

    name = "off_curve"
    kinds = ("off_curve",)

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.above = 0
        self.below = 0

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        pred, high, low = (_scalar(monitor, k) for k in ("loss_pred", "loss_pred_high", "loss_pred_low"))
        # No residual: before the stretch of the run where the law's band is calibrated (or no loss).
        if pred is None or high is None or low is None or _scalar(monitor, "loss_residual") is None:
            return StageOutput()
        self.above = self.above + 1 if obs.loss > high else 0
        self.below = self.below + 1 if obs.loss < low else 0
        n = self.cfg.off_curve_points
        side, severity = ("above", "warning") if self.above >= n else ("below", "info")
        active = self.above >= n or self.below >= n
        return StageOutput(findings=[Finding(
            "off_curve", active, severity,
            f"loss {side} its predicted 90% band for {max(self.above, self.below)} log points: {obs.loss:.4g} vs "
            f"predicted {pred:.4g} [{low:.4g}, {high:.4g}] at step {obs.step:,}"
            + ("; the run is doing worse than its pilots said: check data, LR and the law's conventions"
               if side == "above" else "; better than predicted: the law may be too pessimistic for this recipe"),
            values={"loss": obs.loss, "pred": pred, "low": low, "high": high})])


class AllocationDetector(_Detector):
    """Tokens per parameter projected to the end of the run against the compute-optimal ratio.

    Args:
        total_steps: the run's planned optimizer steps (the callback sets it from the trainer).
        law: a Chinchilla-style law (``predict(N, D)``) for the optimal ratio and the losses; else 20.
        unique_tokens: distinct tokens in the training data, to flag repetition.
    """

    name = "allocation"
    kinds = ("undertrained", "overtrained", "repeated_data")

    def __init__(self, config: HealthConfig | None = None, total_steps: int | None = None, law: Any = None,
                 unique_tokens: float | None = None) -> None:
        super().__init__(config)
        self.total_steps = total_steps
        self.law = law
        self.unique_tokens = unique_tokens

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything here is configuration, read again on resume

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        n = getattr(monitor, "n_params", None)
        # The planned length goes into the log too, so an offline replay (`scalewatch watch`) can project.
        planned = {"total_steps": float(self.total_steps)} if self.total_steps else {}
        if not n or not self.total_steps or obs.step < 1 or obs.tokens <= 0:
            return StageOutput(scalars=planned)
        d_end = obs.tokens / obs.step * self.total_steps
        ratio = d_end / n
        flops = 6.0 * n * d_end
        opt_ratio, n_opt, d_opt, losses = CHINCHILLA_TOKENS_PER_PARAM, None, None, ""
        source = "Chinchilla's ~20 tokens per parameter"
        if self.law is not None:
            from scalewatch.laws import optimal_allocation

            n_opt_a, d_opt_a = optimal_allocation(self.law, flops)
            n_opt, d_opt = float(n_opt_a), float(d_opt_a)
            opt_ratio = d_opt / n_opt
            source = "the given law"
            losses = (f"; the law predicts L={float(self.law.predict(n, d_end)):.4g} for this allocation vs "
                      f"L={float(self.law.predict(n_opt, d_opt)):.4g} at the optimum")
        else:
            n_opt = math.sqrt(flops / (6.0 * opt_ratio))
            d_opt = opt_ratio * n_opt
        values = {"tokens_per_param_end": ratio, "optimal_tokens_per_param": opt_ratio, "n_opt": n_opt,
                  "d_opt": d_opt, "flops_end": flops}
        plan = (f"projected {ratio:.3g} tokens per parameter at step {self.total_steps:,} (N={n:.3g}, D={d_end:.3g}, "
                f"C=6ND={flops:.3g} FLOPs, the laws' convention) vs the compute-optimal {opt_ratio:.3g} from "
                f"{source}: N~{n_opt:.3g}, D~{d_opt:.3g}{losses}")
        findings = [
            Finding("undertrained", ratio < opt_ratio / self.cfg.undertrained_factor, "warning",
                    f"model too big for its token budget: {plan}; a smaller model (or more tokens) reaches a lower "
                    "loss for the same compute", values=values),
            Finding("overtrained", ratio > opt_ratio * self.cfg.overtrained_factor, "info",
                    f"trained well past compute-optimal: {plan}; fine if you are buying cheaper inference",
                    values=values)]
        if self.unique_tokens:
            epochs = d_end / self.unique_tokens
            findings.append(Finding(
                "repeated_data", epochs > self.cfg.max_epochs, "warning",
                f"the run will see its unique data {epochs:.1f} times by step {self.total_steps:,}; beyond about "
                f"{self.cfg.max_epochs:g} epochs repeated tokens are worth much less (Muennighoff et al. 2023): "
                "add data or stop earlier", values={"epochs": epochs, "unique_tokens": float(self.unique_tokens)}))
        return StageOutput(scalars=planned, findings=findings)


class BatchSizeDetector(_Detector):
    """Where the noise scale is measured: the batch far above B_crit (compute wasted) or below (steps wasted)."""

    name = "batch_size"
    kinds = ("batch_size",)

    def __init__(self, config: HealthConfig | None = None) -> None:
        super().__init__(config)
        self.streak = 0

    def on_observation(self, obs: Observation, monitor: Any) -> StageOutput:
        compute, steps = _scalar(monitor, "gns/compute_factor"), _scalar(monitor, "gns/steps_factor")
        b_crit, batch = _scalar(monitor, "gns/b_crit"), obs.batch_tokens
        if compute is None or steps is None or not b_crit or not batch:
            return StageOutput()
        f = self.cfg.batch_factor
        off = batch / b_crit > f or b_crit / batch > f
        self.streak = self.streak + 1 if off else 0
        big = batch > b_crit
        what = (f"the batch ({batch:.3g} tokens) is {batch / b_crit:.1f}x the critical batch ({b_crit:.3g} tokens): "
                f"it costs {compute:.2f}x the minimum compute; a smaller batch (or a larger model) would reach the "
                "same loss cheaper now, but B_crit grows as the loss falls (about 2x per 13% drop, Kaplan et al.): "
                "early in a run this is expected, act if it persists" if big else
                f"the batch ({batch:.3g} tokens) is {b_crit / batch:.1f}x below the critical batch ({b_crit:.3g} "
                f"tokens): it takes {steps:.2f}x the minimum steps; a larger batch would finish sooner at little "
                "extra compute")
        return StageOutput(findings=[Finding("batch_size", self.streak >= self.cfg.batch_points, "info", what,
                                             values={"batch_tokens": batch, "b_crit": b_crit,
                                                     "compute_factor": compute, "steps_factor": steps})])


def _scalar(monitor: Any, name: str) -> float | None:
    report = getattr(monitor, "report", None)
    value = report.scalars.get(name) if report is not None else None
    return value if value is not None and math.isfinite(value) else None


def default_detectors(config: HealthConfig | None = None, total_steps: int | None = None, law: Any = None,
                      unique_tokens: float | None = None) -> list[Any]:
    """Every detector, with one set of thresholds.

    Example:
        >>> [d.name for d in default_detectors()]
        ['nonfinite', 'spike', 'grad_spike', 'divergence', 'saturation', 'off_curve', 'allocation', 'batch_size']
    """
    cfg = config or HealthConfig()
    return [NonFiniteDetector(cfg), LossSpikeDetector(cfg), GradNormSpikeDetector(cfg), DivergenceDetector(cfg),
            SaturationDetector(cfg), OffCurveDetector(cfg), AllocationDetector(cfg, total_steps, law, unique_tokens),
            BatchSizeDetector(cfg)]


def all_kinds(detectors: Iterable[Any]) -> list[str]:
    return [k for d in detectors for k in getattr(d, "kinds", ())]
