"""Forecasting a live run's final loss from its prefix, with a curve law as the prior.

:func:`forecast_final` does one forecast; :class:`CurvePlugin` is the monitor plugin that
compares each logged loss with the law's prediction for the run and keeps a forecast of where
the run will end (optionally on a worker thread). Plain numpy/scipy: nothing here knows Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from scalewatch.bands import EFFECTIVE_POINTS_PER_RUN
from scalewatch.curves import BAND_LEVEL, SKIP_FRACTION, CurveError, CurveLaw, check_schedule, schedule_features
from scalewatch.monitor import ForecastBand, StageOutput

# z of the two-sided 90% band (curves.BAND_LEVEL): turns the law's band half-width into a sd.
_Z90 = 1.645
# The stretch at the end of a prefix (a fraction of the run's steps) whose mean departure from the prefix fit is
# carried to the forecast, and the horizon (the same fraction of the run) over which that departure fades. The
# law's shape (alpha, C) is the pilots', and a run's loss can part from it late, e.g. flatten where the
# pilots still annealed: a fit through the whole prefix then forecasts, even at the last step, a loss the run
# is not at. Measured over the last 10% of the run, a departure is carried in full at the last step and by
# exp(-1) from 10% before the end; from 60% of the run, by exp(-4) (2%).
TAIL_FRACTION = 0.1
# The fewest points of that stretch a line is drawn through (fewer: the mean of the last 3).
TAIL_MIN_LINE = 5


@dataclass(frozen=True)
class ForecastSettings:
    """How much a forecast lets the run's prefix move the pilot law.

    The defaults were chosen on the OLMo ladder cosine runs and checked out of sample (settings
    chosen on two model sizes, forecasting the third) by ``benchmarks/forecast_accuracy.py``.

    Attributes:
        sigma_lnA: prior sd of ln A (the amplitude of the power-law term) around the pilot
            law: the prefix may move the amplitude by about 30%. The level (L0) has no
            setting: its prior sd is the law's own calibrated band at the final step. The
            benchmark compares 0.1, 0.3 and 1.0.

    Example:
        >>> ForecastSettings().sigma_lnA
        0.3
        >>> ForecastSettings(sigma_lnA=0)
        Traceback (most recent call last):
        ...
        ValueError: ForecastSettings.sigma_lnA must be a positive number, got 0
    """

    sigma_lnA: float = 0.3

    def __post_init__(self) -> None:
        if not (isinstance(self.sigma_lnA, (int, float)) and math.isfinite(self.sigma_lnA) and self.sigma_lnA > 0):
            raise ValueError(f"ForecastSettings.sigma_lnA must be a positive number, got {self.sigma_lnA!r}")


_DEFAULT = ForecastSettings()


@dataclass(frozen=True)
class Forecast:
    """Where the run will end: the final loss and its band, and how the prefix moved it."""

    step: int
    loss: float
    low: float
    high: float
    prior_loss: float
    prefix_points: int
    sd_rel: float = math.nan  # the posterior sd of the final loss, relative (see posterior_sd_rel)
    drop: float = math.nan  # the loss the prior still predicts to fall after the prefix, relative to the final
    weight: float = 1.0  # the prefix fit's weight against the prior (1: the prefix fit alone)
    fit_loss: float = math.nan  # the prefix fit's own final loss, before any blend with the prior
    prior_widen: float = 1.0  # how much wider the prior is than within the pilot sizes
    last_fraction: float = math.nan  # the prefix's last step / the final step


def forecast_final(law: CurveLaw, schedule: np.ndarray, prefix_steps: Sequence[int], prefix_loss: Sequence[float],
                   n_params: float | None = None, final_step: int | None = None,
                   settings: ForecastSettings | None = None) -> Forecast:
    """Forecast the final loss from the run's prefix, with the pilot law as the prior.

    The shape (alpha, C, and how they scale with N) comes from the pilot runs; the prefix
    updates the level (L0) and the amplitude (A) by a MAP fit whose priors have the law's
    calibrated width, and whose points count as much as the law's error at that step
    lets them. Milliseconds for hundreds of points. ``settings``: see :class:`ForecastSettings`.

    With a law whose calibration chose a blend (:attr:`ForecastCalibration.blend`), the
    forecast is ``prior + w * (prefix fit - prior)``: the prefix's weight ``w`` falls with the
    loss drop the prior still predicts after the prefix (a short prefix, early in a long fall,
    extrapolates far), by the amount that minimised the pilots' own replayed errors.

    Example:
        >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
        ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
        >>> sched = np.full(1001, 1e-3)
        >>> truth = law.predict(sched, steps=range(100, 501, 50)).loss + 0.02   # the run sits 0.02 higher
        >>> f = forecast_final(law, sched, range(100, 501, 50), truth)
        >>> f.prior_loss < f.loss < f.prior_loss + 0.03
        True
    """
    cal = law.forecast_band
    new = cal is not None and cal.prior_widening
    prepared = _features(law, schedule, final_step)  # once for the prefix fit, the off-band check and the reach
    fc = prefix_fit(law, schedule, prefix_steps, prefix_loss, n_params, final_step, settings, widen_prior_only=new,
                    prepared=prepared)
    if fc.prefix_points < 3:
        return fc
    end = fc.step
    if cal is not None:
        # Calibrated on the pilots' own prefixes (scalewatch.bands): the posterior width of this prefix
        # fit times the quantile of |error| / width that the replays needed at this prefix fraction.
        # Past the summed LR the pilots reached (a longer run than theirs) no replay measured the error:
        # widen as the predicted curve's band does there.
        n_out = law.n_outside(n_params)
        w = cal.blend_weight(fc.drop, fc.last_fraction, fc.prior_widen, n_out)
        # The blend was chosen on the pilots' replays: it leans on the prior because a pilot-like run ends near
        # it. A run whose recent losses sit farther from the law's band than any pilot replay did (the calibrated
        # distance q at this prefix fraction) is not pilot-like, and the prior says nothing of where it ends: from
        # q to 2q half-widths off, the weight goes over to the prefix fit alone, and the band to the one
        # calibrated on the prefix fit alone.
        sched, _, (S1, S2) = prepared
        q = cal.off_at(fc.last_fraction) or OFF_BAND_DEFAULT
        z = off_band(law, sched, prefix_steps, prefix_loss, n_params, end, (S1, S2))
        off = min(max((z - q) / q, 0.0), 1.0)
        w = w + (1.0 - w) * off
        final = fc.prior_loss + w * (fc.loss - fc.prior_loss)
        reach = 1.0 if law.reach is None else float(law.reach.factor(S1[end], sched[end] / sched.max()))
        blended = cal.blended_at(n_out)
        rel = cal.half_width(fc.sd_rel, fc.last_fraction, n_out, blended)
        if off > 0 and blended:
            rel = (1.0 - off) * rel + off * cal.half_width(fc.sd_rel, fc.last_fraction, n_out, blended=False)
        half = rel * reach * final
        return Forecast(end, final, final - half, final + half, fc.prior_loss, fc.prefix_points, fc.sd_rel,
                        fc.drop, w, fc.loss, fc.prior_widen, fc.last_fraction)
    # A law file from before the calibration: the law's band at the final step, never shrunk by how
    # well the prefix pinned the level, and spanning the prior too (an early prefix can pull hard in
    # the wrong direction).
    half = law.band_at(n_params, 1.0) * fc.loss
    return Forecast(end, fc.loss, min(fc.loss, fc.prior_loss) - half, max(fc.loss, fc.prior_loss) + half,
                    fc.prior_loss, fc.prefix_points, fc.sd_rel, fc.drop, 1.0, fc.loss, fc.prior_widen,
                    fc.last_fraction)


# The stretch of a prefix whose distance from the law's band decides whether a run is still pilot-like:
# its last quarter (a run that was off early and came back is pilot-like again), at least 3 points.
OFF_BAND_TAIL = 0.25
# Law files from before the calibrated distance (ForecastCalibration.off_by_fraction): pilot-like prefixes of
# the OLMo ladder and multipowerlaw runs sat up to 2.2 half-widths off from 40% of a run on (3.6 at 20%).
OFF_BAND_DEFAULT = 2.0


def off_band(law: CurveLaw, schedule: np.ndarray, prefix_steps: Sequence[int], prefix_loss: Sequence[float],
             n_params: float | None = None, final_step: int | None = None,
             features: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """How far the prefix's recent losses sit from the law's prediction, in half-widths of its 90% band:
    the median over the last :data:`OFF_BAND_TAIL` of the prefix's steps (at least 3 points) of
    ``|loss - pred| / half-width``; 0 with fewer than 3 usable points. Above 1 the run is off its curve
    (``off_curve`` watches the same residual point by point). ``features``: the schedule's ``(S1, S2)`` up
    to the final step, when the caller has them.

    Example:
        >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
        ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
        >>> sched = np.full(1001, 1e-3); st = list(range(200, 801, 50))
        >>> pred = law.predict(sched, steps=st).loss
        >>> off_band(law, sched, st, pred), round(off_band(law, sched, st, pred * 1.05), 1)
        (0.0, 5.0)
    """
    sched = check_schedule(schedule)
    end = len(sched) - 1 if final_step is None else int(final_step)
    st = np.asarray(prefix_steps, dtype=int)
    y = np.asarray(prefix_loss, dtype=float)
    ok = np.isfinite(y) & (st >= max(1, SKIP_FRACTION * end)) & (st <= min(end, len(sched) - 1))
    st, y = st[ok], y[ok]
    if len(st) < 3:
        return 0.0
    tail = st >= st.max() - OFF_BAND_TAIL * (st.max() - st.min())
    if tail.sum() < 3:
        tail = np.argsort(st)[-3:]
    S1, S2 = features if features is not None else schedule_features(sched[: end + 1], law.lam)
    s = st[tail]
    pred = law.at(n_params).loss(S1[s], S2[s])
    half = np.maximum(law.band_at(n_params, s / end, S1[s], sched[s] / sched.max()) * pred, 1e-12)
    return float(np.median(np.abs(y[tail] - pred) / half))


def _features(law: CurveLaw, schedule: np.ndarray, final_step: int | None
              ) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray]]:
    """``(checked schedule, final step, (S1, S2) up to it)``; :class:`CurveError` if the schedule stops short."""
    schedule = check_schedule(schedule)
    end = len(schedule) - 1 if final_step is None else int(final_step)
    if end >= len(schedule):
        raise CurveError(f"the schedule covers steps 0..{len(schedule) - 1}, not the final step {end}")
    return schedule, end, schedule_features(schedule[: end + 1], law.lam)


def prefix_fit(law: CurveLaw, schedule: np.ndarray, prefix_steps: Sequence[int], prefix_loss: Sequence[float],
               n_params: float | None = None, final_step: int | None = None,
               settings: ForecastSettings | None = None, widen_prior_only: bool = True,
               prepared: tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray]] | None = None) -> Forecast:
    """The uncalibrated prefix fit behind :func:`forecast_final`: its ``loss`` is the MAP final loss (no
    blend), ``low``/``high`` the law's band around it; ``sd_rel``, ``drop`` and ``prior_widen`` say how
    much the prefix told and how far it had to extrapolate. The replays that calibrate the band use it.

    ``widen_prior_only``: outside the pilot sizes the posterior width puts the law's extra width (its
    size widening) on the prior of the level and of ln A only, not on the prefix points' own error, so
    that a prefix that pins the level shrinks the band out of range too (the calibration then needs no
    blanket widening for the distance in N). False: as law files from before it (the in-range width,
    widened as a whole by the calibration). The MAP fit itself is the same either way: the level's prior
    and the points' error both at the law's width at N, as before. ``prepared``: :func:`_features` of this
    schedule and final step, when the caller has them.
    """
    cfg = _DEFAULT if settings is None else settings
    schedule, end, (S1, S2) = prepared if prepared is not None else _features(law, schedule, final_step)
    base = law.at(n_params)
    st = np.asarray(prefix_steps, dtype=int)
    y = np.asarray(prefix_loss, dtype=float)
    ok = np.isfinite(y) & (st >= 1) & (st <= end) & (st >= SKIP_FRACTION * end)
    st, y = st[ok], y[ok]
    band = law.band_at(n_params, 1.0)
    band0 = law.band_at(None, 1.0)  # within the pilot sizes
    widen = float(band / band0) if band0 > 0 else 1.0
    prior_final = float(base.loss(S1[end:end + 1], S2[end:end + 1])[0])
    if len(st) < 3:  # level and amplitude are two free numbers: fewer points than that leave the prior
        return Forecast(end, prior_final, prior_final * (1 - band), prior_final * (1 + band), prior_final, len(st),
                        prior_widen=widen)
    last = int(st.max())
    # The loss the prior says is still to fall after the prefix (relative): how far the prefix extrapolates.
    drop = float(base.loss(S1[last:last + 1], S2[last:last + 1])[0] - prior_final) / prior_final
    sigma_point = band / _Z90  # the law's relative error scale at one point
    sigma_level = band * prior_final / _Z90
    sigma_lnA = cfg.sigma_lnA

    def residuals(d: np.ndarray) -> np.ndarray:
        # Each logged point counts as one independent error (counting several neighbouring
        # points as one was tried on the OLMo runs and not kept).
        pred = base.L0 + d[0] + base.A * math.exp(d[1]) * np.power(S1[st], -base.alpha) - base.C * S2[st]
        data = (pred - y) / y / sigma_point
        return np.concatenate([data, [d[0] / sigma_level, d[1] / sigma_lnA]])

    fit = least_squares(residuals, np.zeros(2))
    d = fit.x
    amp_end = base.A * math.exp(d[1]) * S1[end] ** (-base.alpha)
    fitted = base.L0 + d[0] + base.A * math.exp(d[1]) * np.power(S1[st], -base.alpha) - base.C * S2[st]
    tail_off, tail_sd, carried = tail_departure(st, y, fitted, end)
    final = float(base.L0 + d[0] + amp_end - base.C * S2[end]) + tail_off
    # The posterior width on the law's error scale within the pilot sizes. Law files from before
    # widen_prior_only: the in-range priors (the calibration widens the band for the distance in N itself).
    sp0 = band0 / _Z90
    sd_rel = posterior_sd_rel(fit.fun[:-2] * sigma_point / sp0,
                              base.A * math.exp(d[1]) * np.power(S1[st], -base.alpha) / y / sp0, 1.0 / y / sp0,
                              amp_end, final, (st.max() - st.min()) / end,
                              sigma_level if widen_prior_only else sp0 * prior_final,
                              sigma_lnA * widen if widen_prior_only else sigma_lnA)
    # final = (1 - carried) * the fit's final + carried * (the run's own level at its last step, moved on by the
    # fit's shape): the fit's width for the first part, the departure's for the second.
    sd_rel = math.hypot((1.0 - carried) * sd_rel, tail_sd / final)
    return Forecast(end, final, final * (1 - band), final * (1 + band), prior_final, len(st), sd_rel, drop, 1.0,
                    final, widen, last / end)


def tail_departure(steps: np.ndarray, loss: np.ndarray, fitted: np.ndarray, final_step: int
                   ) -> tuple[float, float, float]:
    """Where the prefix's last :data:`TAIL_FRACTION` of the run sits against the prefix fit at its last step:
    ``(departure, its sd, carried)``, the departure and its sd already multiplied by ``carried`` =
    ``exp(-(final_step - last step) / (TAIL_FRACTION * final_step))``, the part of it kept at the final step.

    The departure is a straight line through ``loss - fit`` over that stretch, read at its last step (a run
    that flattens drifts away from the fit: the stretch's mean would lag it); with fewer than
    :data:`TAIL_MIN_LINE` points there, the mean of the last 3 points.

    Example:
        >>> st = np.arange(100, 1001, 10); fit = np.full(len(st), 2.0)
        >>> loss = fit + np.where(st > 900, 0.0003 * (st - 900), 0.0)   # parts from the fit over the last 10%
        >>> [round(v, 4) for v in tail_departure(st, loss, fit, 1000)]   # at the last step: carried in full
        [0.03, 0.0, 1.0]
        >>> round(tail_departure(st, loss, fit, 10000)[0], 4)           # 9,000 steps still to go: nothing carried
        0.0
    """
    if len(steps) < 3:
        return 0.0, 0.0, 0.0
    last = int(steps.max())
    carried = math.exp(-(final_step - last) / (TAIL_FRACTION * final_step))
    tail = np.flatnonzero(steps >= last - TAIL_FRACTION * final_step)
    if len(tail) >= TAIL_MIN_LINE:
        x = (steps[tail] - last) / max(TAIL_FRACTION * final_step, 1.0)
        r = loss[tail] - fitted[tail]
        X = np.column_stack([np.ones(len(x)), x])
        coef, *_ = np.linalg.lstsq(X, r, rcond=None)
        resid = r - X @ coef
        s2 = float(resid @ resid) / (len(r) - 2)
        var0 = s2 * float(np.linalg.pinv(X.T @ X)[0, 0])  # the line's variance at x = 0, the last step
        return float(coef[0]) * carried, math.sqrt(max(var0, 0.0)) * carried, carried
    r = loss[np.argsort(steps)[-3:]] - fitted[np.argsort(steps)[-3:]]
    return float(np.mean(r)) * carried, float(np.std(r, ddof=1) / math.sqrt(3)) * carried, carried


def posterior_sd_rel(resid: np.ndarray, d_amp: np.ndarray, d_level: np.ndarray, amp_end: float, final: float,
                     span: float, sigma_level: float, sigma_lnA: float) -> float:
    """The relative posterior sd of a prefix forecast's final loss (Laplace approximation), counting
    the prefix as ``EFFECTIVE_POINTS_PER_RUN * span`` independent points however densely it was
    logged, and inflated by the fit's reduced chi-square where the prefix disagrees with the law's shape.

    Args:
        resid: the prefix points' standardised residuals at the fit.
        d_amp, d_level: each point's standardised residual's derivative by ln A and by the level.
        amp_end: the power-law term at the final step (the derivative of the final loss by ln A).
        final: the forecast final loss.
        span: the prefix's span of steps / the final step.
        sigma_level, sigma_lnA: the prior sds of the level and of ln A.

    Example:
        >>> n = 100; ones = np.ones(n)
        >>> wide = posterior_sd_rel(np.zeros(n), 0.5 * ones, ones, 0.5, 3.0, 0.1, 0.03, 0.3)
        >>> narrow = posterior_sd_rel(np.zeros(n), 0.5 * ones, ones, 0.5, 3.0, 0.6, 0.03, 0.3)
        >>> narrow < wide
        True
    """
    n = len(resid)
    weight = min(1.0, EFFECTIVE_POINTS_PER_RUN * max(span, 0.0) / max(n, 1))
    J = np.vstack([np.column_stack([d_level, d_amp]) * math.sqrt(weight),
                   [[1.0 / sigma_level, 0.0], [0.0, 1.0 / sigma_lnA]]])
    cov = np.linalg.pinv(J.T @ J)
    g = np.array([1.0, amp_end])
    chi2 = float(np.mean(np.square(resid))) if n else 1.0
    return float(math.sqrt(max(g @ cov @ g, 0.0) * max(chi2, 1.0)) / final)


# ------------------------------------------------------------------ the monitor plugin
class CurvePlugin:
    """Monitor plugin: the live loss against the curve law's prediction for this run, and a forecast.

    Needs the run's per-step LR (``schedule``, index = step, covering the whole run) and N.
    Scalars: ``loss_pred``, ``loss_pred_low``, ``loss_pred_high`` (90% band at this step),
    ``loss_residual`` ((loss - pred) / half-width of the band: beyond +-1 the run is off its
    predicted curve), ``loss_forecast_final`` with ``_low`` / ``_high`` (the final loss
    forecast from the history so far with the law as prior; ``loss_forecast_at_step`` is the last
    step it saw) and ``loss_pred_final``. With ``background=True`` the forecast runs on a worker
    thread and each log point reports the latest finished one. ``settings``: see
    :class:`ForecastSettings`.

    Example:
        >>> from scalewatch.monitor import Monitor, Observation
        >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
        ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
        >>> m = Monitor(plugins=[CurvePlugin(law, np.full(1001, 1e-3))])
        >>> r = m.observe(Observation(step=400, tokens=0, samples=0, flops=0, loss=3.60))
        >>> round(r.scalars["loss_pred"], 3), round(r.scalars["loss_residual"], 2), r.forecasts["loss_pred"].at_step
        (3.579, 0.58, 400)
    """

    name = "curve"
    kind = "forecaster"

    def __init__(self, law: CurveLaw, schedule: np.ndarray | None = None, n_params: float | None = None,
                 background: bool = False, settings: ForecastSettings | None = None) -> None:
        self.law = law
        self.settings = settings
        self.n_params = n_params
        self.schedule: np.ndarray | None = None
        self._S: tuple[np.ndarray, np.ndarray] | None = None
        # In the background the forecast runs on a worker thread: the log step only hands it the
        # history and picks up the latest finished forecast (based on the history up to some
        # earlier log point, reported as loss_forecast_at_step).
        self.background = background
        self._executor: Any = None
        self._pending: Any = None
        self._history: tuple[Sequence[int], Sequence[float]] | None = None  # the newest history seen
        self._latest: dict[str, float] = {}
        self._reported_at: float | None = None  # loss_forecast_at_step of the forecast last handed out
        self.nonfinite_since: int | None = None  # the step from which the logged loss is non-finite (no forecast)
        if schedule is not None:
            self.set_schedule(schedule)

    def set_schedule(self, schedule: np.ndarray) -> None:
        """The run's per-step LR (index = step, covering the whole run); :class:`CurveError` if unusable."""
        schedule = check_schedule(schedule)
        self.schedule = schedule
        self._S = schedule_features(schedule, self.law.lam)

    def on_observation(self, obs: Any, monitor: Any) -> StageOutput:
        if self.schedule is None or self._S is None or obs.step < 1:
            return StageOutput()
        end = len(self.schedule) - 1
        if obs.step > end:
            return StageOutput()  # past the schedule: nothing to compare with (said once by the callback)
        S1, S2 = self._S
        model = self.law.at(self.n_params)
        pred = float(model.loss(S1[obs.step:obs.step + 1], S2[obs.step:obs.step + 1])[0])
        half = self.law.band_at(self.n_params, obs.step / end, float(S1[obs.step]),
                                float(self.schedule[obs.step] / self.schedule.max())) * pred
        pred_final = float(model.loss(S1[end:], S2[end:])[0])
        # the law's final loss with the high end of its band there: a run heading above it ends worse than its
        # pilots allow (what `saturation` compares the forecast with)
        high_final = pred_final * (1 + self.law.band_at(self.n_params, 1.0, float(S1[end]),
                                                        float(self.schedule[end] / self.schedule.max())))
        out = {"loss_pred_final": pred_final, "loss_pred_final_high": high_final} if _usable(pred_final) else {}
        if not (_usable(pred) and math.isfinite(half)):
            # A law taken far past its pilots (e.g. an LR many times theirs) can predict a loss <= 0: no loss is
            # that, so nothing is predicted or judged at this step (as `scalewatch predict` refuses it).
            self._withdraw(obs)  # a non-finite loss still withdraws the forecast
            return StageOutput(scalars=out)
        low = max(pred - half, 0.0)  # a loss is never below 0, however wide the band
        out |= {"loss_pred": pred, "loss_pred_low": low, "loss_pred_high": pred + half}
        # The residual (what off_curve watches) only where the law's band is calibrated: its fits and
        # held-out errors leave out each curve's first SKIP_FRACTION (the warmup and the fast early drop),
        # of this run and, where the law records it, below the smallest summed LR its fitted points had.
        s1_min = self.law.reach.s1_min if self.law.reach is not None else None
        calibrated = obs.step >= SKIP_FRACTION * end and (s1_min is None or S1[obs.step] >= s1_min)
        if math.isfinite(obs.loss) and calibrated:
            out["loss_residual"] = (obs.loss - pred) / half if half > 0 else math.nan
        hist = [(o.step, o.loss) for o in monitor.history if o.step >= 1 and math.isfinite(o.loss)]
        if self._withdraw(obs):
            hist = []
        if hist:
            steps, losses = zip(*hist, strict=True)
            self._history = (steps, losses)
            if self.background:
                self._collect(wait=False)
                if self._pending is None:
                    if self._executor is None:
                        from concurrent.futures import ThreadPoolExecutor

                        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalewatch-forecast")
                    self._pending = self._executor.submit(self._forecast, steps, losses)
            else:
                self._latest = self._forecast(steps, losses)
        out.update(self._latest)
        bands = [ForecastBand("loss_pred", pred, low, pred + half, BAND_LEVEL, obs.step)]
        if self._latest:
            self._reported_at = self._latest["loss_forecast_at_step"]
            bands.append(_final_band(self._latest))
        return StageOutput(scalars=out, forecasts=bands)

    def _withdraw(self, obs: Any) -> bool:
        """Whether this log point's loss is non-finite: then the run's forecast is withdrawn (it would rest on the
        run before the NaN, as if it had not happened) until a finite loss is logged again; ``nonfinite_since``
        keeps the first such step for the summary."""
        if math.isfinite(obs.loss):
            self.nonfinite_since = None
            return False
        if self.nonfinite_since is None:
            self.nonfinite_since = int(obs.step)
        self._latest = {}
        return True

    def _forecast(self, steps: Sequence[int], losses: Sequence[float]) -> dict[str, float]:
        assert self.schedule is not None
        fc = forecast_final(self.law, self.schedule, steps, losses, n_params=self.n_params, settings=self.settings)
        if not _usable(fc.loss):  # a law far past its pilots forecasting a loss <= 0: no forecast
            return {}
        return {"loss_forecast_final": fc.loss, "loss_forecast_final_low": max(fc.low, 0.0),
                "loss_forecast_final_high": fc.high, "loss_forecast_at_step": float(steps[-1])}

    def _collect(self, wait: bool) -> None:
        if self._pending is not None and (wait or self._pending.done()):
            try:
                # a forecast that finished after the loss went non-finite stays withdrawn
                latest = self._pending.result()
                self._latest = {} if self.nonfinite_since is not None else latest
            except Exception:  # a failed forecast must not reach the training loop
                self._latest = {}
            self._pending = None

    def finish(self) -> StageOutput:
        """Wait for the forecast in flight and stop the worker; returns the forecast from the newest
        history if it was not reported yet (else nothing).

        When the worker was still busy at the last log point, the newest history was never
        handed over: it is forecast here, so the run's last forecast always saw its last step.
        """
        self._collect(wait=True)
        if self._history is not None and self.schedule is not None and self.nonfinite_since is None and \
                self._latest.get("loss_forecast_at_step") != float(self._history[0][-1]):
            try:
                self._latest = self._forecast(*self._history)
            except Exception:  # a failed forecast must not reach the training loop
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if not self._latest or self._latest["loss_forecast_at_step"] == self._reported_at:
            return StageOutput()
        self._reported_at = self._latest["loss_forecast_at_step"]
        return StageOutput(scalars=dict(self._latest), forecasts=[_final_band(self._latest)])


def _usable(loss: float) -> bool:
    """A predicted or forecast loss that can be shown and judged: finite and above 0."""
    return math.isfinite(loss) and loss > 0


def _final_band(fc: dict[str, float]) -> ForecastBand:
    return ForecastBand("loss_forecast_final", fc["loss_forecast_final"], fc["loss_forecast_final_low"],
                        fc["loss_forecast_final_high"], BAND_LEVEL, int(fc["loss_forecast_at_step"]))


