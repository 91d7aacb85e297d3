"""Fitting a curve law (:class:`~scalewatch.curves.CurveLaw`) to pilot loss curves.

Least squares on relative residuals, each curve weighing the same; the 90% band comes from
errors on curves (or stretches of curves) left out of the fit. Plain numpy/scipy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeResult, least_squares

from scalewatch.bands import (
    REPLAY_FRACTIONS,
    Replay,
    SizeReach,
    calibrate_forecast,
    calibrate_reach,
    calibrate_size_reach,
    sharing_groups,
)
from scalewatch.curves import (
    BAND_FLOOR_REL,
    BAND_LEVEL,
    LAMBDA,
    PARAM_NAMES,
    PROGRESS_EDGES,
    SKIP_FRACTION,
    Curve,
    FORM_FLOOR,
    FORM_LINEAR,
    FORM_PARAMS,
    CurveError,
    CurveLaw,
    law_form,
    momentum_params,
)
from scalewatch.data import unit_warnings
from scalewatch.forecast import off_band, prefix_fit


# Forward-in-time replays: laws fitted on every curve's first part, cut at these fractions.
FORWARD_CUTS = (0.6, 0.8)
# More forward fits, for how the predicted curve's error grows past the pilots' summed LR only
# (ScheduleReach): the 60% fit extrapolates its S1 by at most 1/0.6 = 1.7x, too little to measure
# the band of a run two or three times longer than the pilots. A fit on the first third sees the
# same ratio of extrapolation as a law of full pilot curves predicting a run 3x their length.
REACH_CUTS = (1 / 3,)
# FORM_FLOOR's prior on the exponent of L0(N) = E + B*(N/n_ref)^-beta: the published Approach-3
# exponents of N (Hoffmann et al. 0.34, Besiroglu et al. 0.348, Muennighoff et al. 0.353); the sd covers
# what scalewatch's own Approach-3 fits find on ../shared/data (Gadre et al. C4 / RedPajama / RefinedWeb
# runs up to 411M: 0.19 / 0.32 / 0.14; the OLMo ladder's 15 cosine runs: 0.31). Two pilot sizes give two
# levels for three numbers (E, B, beta), so there the prior sets beta; three or more sizes move it as far
# as the curvature of their levels shows (see floor_through_levels).
BETA_PRIOR = (0.34, 0.1)
BETA_BOUNDS = (0.02, 2.0)
# How well one pilot size's long-training level is known, relative, in the second stage of the FORM_FLOOR
# fit: the part of it that differs from size to size. Refitting each OLMo size's level on four different
# subsets of its curves moves the levels by about 1% but nearly in step (a line in ln N); what is left,
# the second difference across the three sizes, has an sd of about 0.3%, i.e. about 0.1-0.2% per level.
# The same number as the band's floor (BAND_FLOOR_REL): a curve is not known better than that.
LEVEL_SD_REL = BAND_FLOOR_REL
# The form fit_curves gives a law of several sizes unless told otherwise (issue 12: the floor form, whose
# loss in N has Chinchilla's shape; FORM_LINEAR keeps lowering the level without limit as N grows).
DEFAULT_FORM = FORM_FLOOR


@dataclass
class _Prepared:
    name: str
    S1: np.ndarray
    S2: np.ndarray
    y: np.ndarray
    x: float  # ln(N / n_ref)
    frac: np.ndarray | None = None  # step / the curve's last step


def _lr_rel(c: Curve) -> np.ndarray:
    """The LR at each point _prepare keeps, relative to the run's peak LR."""
    lr = c.per_step_lr()
    keep = c.steps >= SKIP_FRACTION * c.steps.max()
    idx = np.clip(c.steps[keep].astype(int), 0, len(lr) - 1)
    return lr[idx] / max(float(lr.max()), 1e-300)


def _prepare(curves: Sequence[Curve], lam: float, n_ref: float) -> list[_Prepared]:
    out = []
    for c in curves:
        S1, S2 = c.features(lam)
        keep = c.steps >= SKIP_FRACTION * c.steps.max()
        x = 0.0 if c.n_params is None else math.log(c.n_params / n_ref)
        out.append(_Prepared(c.name, S1[keep], S2[keep], c.loss[keep], x, c.steps[keep] / c.steps.max()))
    return out


def _unpack(theta: np.ndarray, multi: bool, form: str = FORM_LINEAR) -> dict[str, tuple[float, float]]:
    if multi and form == FORM_FLOOR:  # E, lnB, beta (one value each), then value and slope of lnA, alpha, lnC
        out = {k: (float(theta[i]), 0.0) for i, k in enumerate(("E", "lnB", "beta"))}
        return out | {k: (float(theta[3 + 2 * i]), float(theta[4 + 2 * i])) for i, k in enumerate(PARAM_NAMES[1:])}
    if multi:
        return {k: (float(theta[2 * i]), float(theta[2 * i + 1])) for i, k in enumerate(PARAM_NAMES)}
    return {k: (float(theta[i]), 0.0) for i, k in enumerate(PARAM_NAMES)}


def _pack(coef: Mapping[str, tuple[float, float]], multi: bool, form: str) -> np.ndarray:
    if multi and form == FORM_FLOOR:
        return np.array([coef[k][0] for k in ("E", "lnB", "beta")] + [v for k in PARAM_NAMES[1:] for v in coef[k]])
    return np.array([v for k in PARAM_NAMES for v in coef[k]]) if multi else np.array([coef[k][0] for k in PARAM_NAMES])


def _model(coef: Mapping[str, tuple[float, float]], p: _Prepared) -> np.ndarray:
    L0, lnA, alpha, lnC = momentum_params(coef, p.x)
    return L0 + np.exp(lnA) * np.power(p.S1, -alpha) - np.exp(lnC) * p.S2


def _fit_coef(prepared: Sequence[_Prepared], multi: bool, start: Mapping[str, tuple[float, float]] | None = None,
              form: str = FORM_LINEAR) -> tuple[dict[str, tuple[float, float]], OptimizeResult]:
    """The best of a few least-squares starts, with scipy's result for it (convergence, message).

    ``start``: a law to start from (the full fit, for a refit without some curves): one start
    instead of four, and the usual starts only if it does not converge. ``form``: how the
    parameters depend on N when ``multi`` (:data:`FORM_FLOOR` in three stages, :func:`_fit_floor`);
    one size is always the plain momentum law.
    """
    if multi and form == FORM_FLOOR:
        return _fit_floor(prepared, start)
    # Each curve weighs the same whatever its number of points; residuals are relative.
    n_mean = float(np.mean([len(p.y) for p in prepared]))
    weights = [math.sqrt(n_mean / len(p.y)) for p in prepared]

    def residuals(theta: np.ndarray) -> np.ndarray:
        coef = _unpack(theta, multi)
        return np.concatenate([w * (_model(coef, p) - p.y) / p.y for w, p in zip(weights, prepared, strict=True)])

    if start is not None:
        x_mean = float(np.mean([p.x for p in prepared]))
        if law_form(start) == FORM_FLOOR:  # a linear-form refit started from a FORM_FLOOR law: its L0 as a line
            L0 = momentum_params(start, np.array([x_mean - 0.5, x_mean + 0.5]))[0]
            start = dict(start) | {"L0": (float(L0[0] + (L0[1] - L0[0]) * (0.5 - x_mean)), float(L0[1] - L0[0]))}
        theta0 = (np.array([v for k in PARAM_NAMES for v in start[k]]) if multi
                  else np.array([start[k][0] + start[k][1] * x_mean for k in PARAM_NAMES]))
        with np.errstate(all="ignore"):
            r = least_squares(residuals, theta0, loss="soft_l1", f_scale=1e-3, max_nfev=4000)
        if r.success and np.isfinite(r.cost):
            return _unpack(r.x, multi), r
    y_min = min(float(p.y.min()) for p in prepared)
    best = None
    for alpha in (0.3, 0.6):
        for ln_c in (math.log(0.3), math.log(30.0)):
            start = [0.8 * y_min, 0.0, alpha, ln_c]
            theta0 = np.array([v for s in start for v in (s, 0.0)]) if multi else np.array(start)
            with np.errstate(all="ignore"):
                r = least_squares(residuals, theta0, loss="soft_l1", f_scale=1e-3, max_nfev=4000)
            if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
                best = r
    if best is None:
        raise CurveError("the curve fit did not converge; check that the curves are loss vs step of one recipe")
    return _unpack(best.x, multi), best


def _levels(prepared: Sequence[_Prepared], start: Mapping[str, tuple[float, float]]
            ) -> tuple[np.ndarray, np.ndarray, OptimizeResult]:
    """Stage 1 of :func:`_fit_floor`: one long-training level L0 per pilot size (``xs``, sorted), with
    ln A, alpha and ln C linear in ln N as in the linear form, fitted to every curve at once; from ``start``."""
    xs = np.array(sorted({p.x for p in prepared}))
    k_of = [int(np.searchsorted(xs, p.x)) for p in prepared]
    n_mean = float(np.mean([len(p.y) for p in prepared]))
    weights = [math.sqrt(n_mean / len(p.y)) for p in prepared]
    K = len(xs)

    def residuals(theta: np.ndarray) -> np.ndarray:
        shape = {k: (float(theta[K + 2 * i]), float(theta[K + 2 * i + 1])) for i, k in enumerate(PARAM_NAMES[1:])}
        return np.concatenate([w * (_model(shape | {"L0": (float(theta[k]), 0.0)}, p) - p.y) / p.y
                               for w, p, k in zip(weights, prepared, k_of, strict=True)])

    # A level is a loss: not below 0 (from a start at the floor, unbounded levels can run off to -inf
    # with the schedule terms following them, as the linear form's L0 does on pilots with no floor in sight).
    L0 = np.maximum(np.broadcast_to(momentum_params(start, xs)[0], xs.shape), 1e-6)
    theta0 = np.concatenate([L0, [v for k in PARAM_NAMES[1:] for v in start[k]]])
    lo = np.concatenate([np.zeros(K), np.full(len(theta0) - K, -np.inf)])
    with np.errstate(all="ignore"):
        r = least_squares(residuals, theta0, bounds=(lo, np.inf), loss="soft_l1", f_scale=1e-3, max_nfev=4000)
    return xs, r.x[:K], r


def floor_through_levels(xs: Sequence[float], levels: Sequence[float], e_max: float,
                         prior: tuple[float, float] | None = None, level_sd_rel: float | None = None
                         ) -> tuple[float, float, float]:
    """Stage 2 of :func:`_fit_floor`: ``(E, ln B, beta)`` of the Chinchilla-shaped level E + B*exp(-beta*x)
    through per-size levels at ``xs = ln(N / n_ref)``.

    Weighted least squares, each level with relative sd ``level_sd_rel`` (default :data:`LEVEL_SD_REL`),
    plus the prior on beta (default :data:`BETA_PRIOR`) as one more residual; E in [0, e_max], B > 0, beta
    in :data:`BETA_BOUNDS`. Two levels fix E and B for any beta, so there beta is the prior's centre;
    three or more pull it to the curvature they show, as far as their sd allows.

    Example:
        >>> xs = np.log([0.5, 1.0, 2.0])
        >>> E, lnB, beta = floor_through_levels(xs, 2.0 + 1.2 * np.exp(-0.3 * xs), e_max=3.0, level_sd_rel=1e-5)
        >>> round(E, 3), round(math.exp(lnB), 3), round(beta, 3)
        (2.0, 1.2, 0.3)
        >>> round(floor_through_levels(xs[:2], [3.5, 3.3], e_max=3.0)[2], 3)  # two sizes: the prior's centre
        0.34
    """
    xs, lv = np.asarray(xs, dtype=float), np.asarray(levels, dtype=float)
    beta0, beta_sd = BETA_PRIOR if prior is None else prior
    level_sd_rel = LEVEL_SD_REL if level_sd_rel is None else level_sd_rel

    def residuals(t: np.ndarray) -> np.ndarray:
        misfit = (t[0] + np.exp(t[1] - t[2] * xs) - lv) / (level_sd_rel * lv)
        return np.concatenate([misfit, [(t[2] - beta0) / beta_sd]])

    lo, hi = [0.0, -np.inf, BETA_BOUNDS[0]], [e_max, np.inf, BETA_BOUNDS[1]]
    best = None
    for beta in (beta0, 0.1, 0.7):
        # E and B through the levels for this beta (linear), kept inside the bounds
        X = np.column_stack([np.ones_like(xs), np.exp(-beta * xs)])
        (E, B), *_ = np.linalg.lstsq(X, lv, rcond=None)
        E = min(max(float(E), 1e-6), e_max - 1e-6)
        B = max(float(np.mean((lv - E) * np.exp(beta * xs))), 1e-6)
        with np.errstate(all="ignore"):
            r = least_squares(residuals, [E, math.log(B), beta], bounds=(lo, hi))
        if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise CurveError("the floor in N could not be fitted through the pilot sizes' levels "
                         f"({', '.join(f'{v:.4g}' for v in lv)}); check the curves' n_params")
    return float(best.x[0]), float(best.x[1]), float(best.x[2])


def _fit_floor(prepared: Sequence[_Prepared], start: Mapping[str, tuple[float, float]] | None
               ) -> tuple[dict[str, tuple[float, float]], OptimizeResult]:
    """FORM_FLOOR in three stages, so that the N-exponent is regularised where it is decided:

    1. the long-training level of each pilot size, with the schedule terms (ln A, alpha, ln C) linear in
       ln N and fitted to every curve together (:func:`_levels`);
    2. the Chinchilla-shaped curve E + B*(N/n_ref)^-beta through those levels, with the prior
       :data:`BETA_PRIOR` on beta and each level known to :data:`LEVEL_SD_REL` (:func:`floor_through_levels`);
    3. every curve again with E and beta held: B, ln A, alpha, ln C.

    Fitted jointly instead, the schedule terms' slopes in ln N trade off against the level's curvature
    (three OLMo sizes then put E at 1.17 and beta at 0.15, far below an Approach-3 fit's 2.13, 0.31), and a
    prior on beta weighs as one point among thousands. ``start``: a law to warm-start from (either form).
    The result carries ``levels`` (each size's x = ln(N / n_ref) and its stage-1 level) for the law file.
    """
    if start is None:
        start, _ = _fit_coef(prepared, True, None, form=FORM_LINEAR)
    xs, levels, r1 = _levels(prepared, start)
    y_min = min(float(p.y.min()) for p in prepared)
    E, lnB, beta = floor_through_levels(xs, levels, e_max=y_min)
    n_mean = float(np.mean([len(p.y) for p in prepared]))
    weights = [math.sqrt(n_mean / len(p.y)) for p in prepared]
    held = {"E": (E, 0.0), "beta": (beta, 0.0)}

    def coef_of(theta: np.ndarray) -> dict[str, tuple[float, float]]:
        shape = {k: (float(theta[1 + 2 * i]), float(theta[2 + 2 * i])) for i, k in enumerate(PARAM_NAMES[1:])}
        return held | {"lnB": (float(theta[0]), 0.0)} | shape

    def residuals(theta: np.ndarray) -> np.ndarray:
        coef = coef_of(theta)
        return np.concatenate([w * (_model(coef, p) - p.y) / p.y for w, p in zip(weights, prepared, strict=True)])

    theta0 = np.concatenate([[lnB], r1.x[len(xs):]])  # B from stage 2, the schedule terms from stage 1
    with np.errstate(all="ignore"):
        r = least_squares(residuals, theta0, loss="soft_l1", f_scale=1e-3, max_nfev=4000)
    if not np.isfinite(r.cost):
        raise CurveError("the curve fit did not converge; check that the curves are loss vs step of one recipe")
    if not r1.success:  # the levels' fit stopping early matters as much as the last one's
        r.success, r.message = False, f"levels per size: {r1.message}"
    coef = coef_of(r.x)
    r.levels = [[float(x), float(v)] for x, v in zip(xs, levels, strict=True)]
    return {k: coef[k] for k in FORM_PARAMS[FORM_FLOOR]}, r


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w) / w.sum()
    return float(np.interp(q, cum, v))


@dataclass
class CurveFitResult:
    """A fitted :class:`CurveLaw` with how well it did on its own curves and on held-out ones.

    Attributes:
        law: the fitted law.
        in_sample: curve -> mean |relative error| under the law.
        held_out: curve -> mean |relative error| when left out of the fit (3+ curves).
        converged: whether scipy reported convergence for every least-squares fit made: the
            law's own, and the held-out fits its band comes from.
        message: ``"converged"``, or which fits did not and scipy's reason.
    """

    law: CurveLaw
    in_sample: dict[str, float]
    held_out: dict[str, float]
    converged: bool
    message: str


def fit_curves(curves: Sequence[Curve], lam: float = LAMBDA, loss_name: str = "loss",
               n_convention: str = "total", calibrate: bool = True, form: str | None = None) -> CurveFitResult:
    """Fit a momentum law to pilot curves; with several sizes its parameters depend on N as ``form`` says.

    ``form`` (several sizes only): :data:`~scalewatch.curves.FORM_FLOOR` (L0 = E + B·N^-beta with a floor E,
    Chinchilla's shape in N; ln A, alpha, ln C linear in ln N) or :data:`~scalewatch.curves.FORM_LINEAR` (every
    parameter linear in ln N, L0 included: no floor); None: :data:`DEFAULT_FORM` (the floor form).

    The predicted curve's 90% band comes from leave-one-curve-out: each curve (with the curves
    branched from the same run, which share its prefix) is predicted by a fit on the others, and
    the band is the 90th percentile of those relative errors, each curve weighing the same;
    it widens where a run's summed LR goes past the pilots' (:class:`~scalewatch.bands.ScheduleReach`).
    With ``calibrate`` the final-loss forecast's band is calibrated too, by replaying every
    pilot's own prefixes (:func:`_forecast_replays`, :class:`~scalewatch.bands.ForecastCalibration`).

    Example:
        >>> from scalewatch.curves import schedule_features
        >>> def curve(name, lr):  # a run that follows L = 2.5 + 0.6 S1^-0.7 - 0.5 S2 exactly
        ...     S1, S2 = schedule_features(lr)
        ...     st = np.arange(100, len(lr), 100)
        ...     return Curve(name, st, lr[st], 2.5 + 0.6 * S1[st] ** -0.7 - 0.5 * S2[st], None, lr)
        >>> cosine = 1.5e-4 * (1 + np.cos(np.pi * np.arange(10001) / 10000)) + 1e-6
        >>> fit = fit_curves([curve("cos", cosine), curve("const", np.full(10001, 3e-4))])
        >>> m = fit.law.at()
        >>> fit.converged, round(m.L0, 3), round(m.alpha, 3)
        (True, 2.5, 0.7)
    """
    if len(curves) < 2:
        raise CurveError("fitting a curve law needs at least 2 curves of one recipe (e.g. a cosine and a "
                         "constant-LR run): one curve cannot separate the power law from the annealing term")
    sizes = sorted({c.n_params for c in curves if c.n_params is not None})
    if any(c.n_params is None for c in curves) and sizes:
        raise CurveError("some curves have n_params and some do not; give N for every curve (an n_params column)")
    multi = len(sizes) >= 2
    form = DEFAULT_FORM if form is None else form
    if form not in FORM_PARAMS:
        raise CurveError(f"unknown curve-law form {form!r}; choose one of {', '.join(FORM_PARAMS)}")
    n_ref = math.exp(float(np.mean(np.log(sizes)))) if sizes else 1.0
    prepared = _prepare(curves, lam, n_ref)
    coef, main = _fit_coef(prepared, multi, form=form)
    # Every least-squares fit made, by what it was, for CurveFitResult.converged / .message:
    # the held-out fits set the band, so one that stopped early matters too.
    fits: list[tuple[str, OptimizeResult | None]] = [("the law's fit", main)]

    def mean_err(c: dict[str, tuple[float, float]], p: _Prepared) -> np.ndarray:
        return np.abs(_model(c, p) - p.y) / p.y

    in_sample = {p.name: float(mean_err(coef, p).mean()) for p in prepared}
    held_out: dict[str, float] = {}
    errs, wts, fracs = [], [], []

    def add(e: np.ndarray, frac: np.ndarray) -> None:
        if len(e) and np.all(np.isfinite(e)):
            errs.append(e)
            wts.append(np.full(len(e), 1.0 / len(e)))
            fracs.append(frac)

    # (a) Leave one curve out, when the rest can still identify the law (>= 2 curves per fit); curves
    # branched from one run (same first points) leave together, or the fit has seen the prefix.
    groups = sharing_groups([list(zip(c.steps.tolist(), c.loss.tolist(), strict=True)) for c in curves])
    left_out: dict[int, dict[str, tuple[float, float]]] = {}  # group -> the law fitted without it
    if len(prepared) >= 3:
        for g in sorted(set(groups)):
            rest = [q for j, q in enumerate(prepared) if groups[j] != g]
            what = "the fit without " + ", ".join(p.name for j, p in enumerate(prepared) if groups[j] == g)
            if len(rest) < 2:
                continue
            c_g = _held_out_fit(rest, multi and len({q.x for q in rest}) >= 2, coef, form, what, fits)
            if c_g is None:
                continue
            left_out[g] = c_g
            for j, p in enumerate(prepared):
                if groups[j] == g:
                    e = mean_err(c_g, p)
                    held_out[p.name] = float(e.mean())
                    add(e, p.frac)
    # (b) Forward in time: fit every curve's first 60%, predict the rest (always possible).
    early = [_Prepared(p.name, p.S1[m], p.S2[m], p.y[m], p.x) for p in prepared
             for m in [np.arange(len(p.y)) < 0.6 * len(p.y)]]
    c_t: dict[str, tuple[float, float]] | None = None
    # (|error|, progress, ln(S1 / the fit's largest S1)) of each late stretch, for ScheduleReach
    late_points: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    lr_rel = [_lr_rel(c) for c in curves]  # each kept point's LR / its run's peak: how far it has annealed
    try:
        c_t, r_t = _fit_coef(early, multi, start=coef if law_form(coef) == FORM_FLOOR else None, form=form)
        fits.append(("the fit on the first 60% of each curve", r_t))
        for p, r in zip(prepared, lr_rel, strict=True):
            late = np.arange(len(p.y)) >= 0.6 * len(p.y)
            e = mean_err(c_t, _Prepared(p.name, p.S1[late], p.S2[late], p.y[late], p.x))
            add(e, p.frac[late])
            late_points.append((e, p.frac[late], np.log(p.S1[late] / max(float(q.S1.max()) for q in early)),
                                r[late]))
    except CurveError:
        fits.append(("the fit on the first 60% of each curve", None))
    for cut in REACH_CUTS:
        part = [_Prepared(p.name, p.S1[m], p.S2[m], p.y[m], p.x) for p in prepared
                for m in [np.arange(len(p.y)) < cut * len(p.y)]]
        if min(len(q.y) for q in part) < 3:
            continue
        c_r = _held_out_fit(part, multi, coef, form, f"the fit on the first {cut:.0%} of each curve", fits)
        if c_r is None:
            continue
        s1_fit = max(float(q.S1.max()) for q in part)
        for p, r in zip(prepared, lr_rel, strict=True):
            late = np.arange(len(p.y)) >= cut * len(p.y)
            e = mean_err(c_r, _Prepared(p.name, p.S1[late], p.S2[late], p.y[late], p.x))
            if np.all(np.isfinite(e)):
                late_points.append((e, p.frac[late], np.log(p.S1[late] / s1_fit), r[late]))
    by_progress: list[tuple[float, float, float]] = []
    if errs:
        e_all, w_all, f_all = np.concatenate(errs), np.concatenate(wts), np.concatenate(fracs)
        band = max(_weighted_quantile(e_all, w_all, BAND_LEVEL), BAND_FLOOR_REL)
        # The error is larger early in a run than near its end: one width per stretch of the run.
        for lo, hi in zip(PROGRESS_EDGES[:-1], PROGRESS_EDGES[1:], strict=True):
            m = (f_all > lo) & (f_all <= hi)
            if m.sum() >= 10:
                by_progress.append((lo, hi, max(_weighted_quantile(e_all[m], w_all[m], BAND_LEVEL),
                                                BAND_FLOOR_REL)))
    else:
        band = max(3 * max(in_sample.values()), BAND_FLOOR_REL)
    law = CurveLaw(
        coef=coef, n_ref=n_ref, lam=lam, band_rel=band, band_by_progress=by_progress,
        n_range=(sizes[0], sizes[-1]) if sizes else None,
        fitted_on={"curves": [c.name for c in curves], "sizes": sizes, "n_points": int(sum(len(p.y) for p in prepared)),
                   "in_sample_mean_rel_error": in_sample, "held_out_mean_rel_error": held_out,
                   "band": "90th percentile of held-out relative errors: leave-one-curve-out (3+ curves; curves "
                           "branched from one run leave together) and each curve's last 40% predicted from fits "
                           "on the first 60%"},
        conventions={"loss": loss_name, "n_params": n_convention, "x_axis": "optimizer steps",
                     "law": "L0 + A*S1^-alpha - C*S2 (Tissue et al. 2024); " + (
                         "L0 = E + B*(N/n_ref)^-beta, lnA, alpha, lnC linear in ln(N/n_ref)"
                         if law_form(coef) == FORM_FLOOR else "params linear in ln(N/n_ref)")},
    )
    if "levels" in main:  # FORM_FLOOR: what its floor in N rests on
        law.fitted_on["floor_fit"] = {
            "levels": [{"n_params": n_ref * math.exp(x), "L0": v} for x, v in main["levels"]],
            "beta_prior": list(BETA_PRIOR), "level_sd_rel": LEVEL_SD_REL,
            "how": "stage 1: one long-training level per size (lnA, alpha, lnC linear in ln N); stage 2: "
                   "E + B*(N/n_ref)^-beta through the levels with the prior on beta; stage 3: the curves "
                   "again with E and beta held"}
    if late_points:
        # Points past the summed LR that the forward fits saw show how the error grows past the pilots'.
        e_l, f_l, b_l, r_l = (np.concatenate(v) for v in zip(*late_points, strict=True))
        law.reach = calibrate_reach(e_l, law.band_at(None, f_l), b_l,
                                    s1_max=max(float(p.S1.max()) for p in prepared), level=BAND_LEVEL, lr_rel=r_l)
        law.reach.s1_min = min(float(p.S1.min()) for p in prepared)  # where the fitted points begin
    # (c) Leave the largest (and the smallest) size out, 3+ sizes: a law of the other sizes, of the kind
    # the pilots' own is, predicting a size outside them measures how the band must grow with the distance
    # in N (issue 12). With two sizes the law left would have no N-dependence at all: its misses (the
    # level of one size carried to the other) say nothing of a law of two sizes, and the unmeasured
    # rule (1 + distance in ln N) stays.
    size_out = _size_out_fits(prepared, [c.n_params for c in curves], coef, form, fits) if len(sizes) >= 3 else {}
    if size_out:
        law.size_reach = _calibrate_size_reach(law, prepared, [c.n_params for c in curves], size_out)
    if calibrate:
        replays = _forecast_replays(curves, groups, law, left_out, c_t, multi, prepared, fits, size_out)
        law.forecast_band = calibrate_forecast(replays, BAND_LEVEL, prior_widening=True)
    failed = [f"{what} ({'no finite fit' if r is None else r.message})" for what, r in fits
              if r is None or not r.success]
    message = (f"all {len(fits)} least-squares fits converged" if not failed else
               f"{len(failed)} of {len(fits)} least-squares fits did not converge: " + "; ".join(failed))
    law.fitted_on.update(converged=not failed, message=message)  # provenance in the law file, as fit --out does
    for said in unit_warnings((sizes[0], sizes[-1]) if sizes else None):  # n_params in millions or billions?
        warnings.warn(f"n_params: {said}", stacklevel=2)
    said = implausible_law(law, curves)
    if said:
        warnings.warn(said, stacklevel=2)
    return CurveFitResult(law=law, in_sample=in_sample, held_out=held_out, converged=not failed, message=message)


# What makes a fitted curve law implausible (fit_curves warns, never fails: the law is still written).
# alpha below DEGENERATE_ALPHA with A above DEGENERATE_A_PER_LOSS x the pilots' largest loss: A*S1^-alpha is then
# about A - A*alpha*ln S1, a logarithm the pilots cannot tell from a level, and the law's level L0 is set by
# cancelling a huge A (the 2-curve fit of a tiny Lightning run: alpha 0.015, A 27.6, L0 -25.7). A band wider
# than WIDE_BAND_REL: the held-out pilots missed by more than that, 6x the multipowerlaw laws' 1.7%.
DEGENERATE_ALPHA = 0.05
DEGENERATE_A_PER_LOSS = 3.0
WIDE_BAND_REL = 0.10


def levels_not_falling(law: CurveLaw) -> str | None:
    """The floor form's N-dependence, when its stage-1 levels (``fitted_on.floor_fit``) do not fall with N.

    Two sizes whose long-training levels rise with N (a mislabelled N, or pilots stopped before their level
    shows) leave stage 2 nothing to draw E + B*N^-beta through but B ~ 0: the law then predicts every size's
    loss at the same level, silently.

    Example:
        >>> law = CurveLaw({"E": (0.85, 0.0), "lnB": (-27.7, 0.0), "beta": (0.34, 0.0), "lnA": (0.2, 0.0),
        ...                 "alpha": (0.28, 0.0), "lnC": (-2.8, 0.0)}, n_ref=8.6e4, band_rel=0.02,
        ...                fitted_on={"floor_fit": {"levels": [{"n_params": 49920, "L0": 0.755},
        ...                                                    {"n_params": 148736, "L0": 1.028}]}})
        >>> print(levels_not_falling(law))  # doctest: +NORMALIZE_WHITESPACE
        the pilots' long-training level does not fall with N (L0 0.755 at N=4.99e+04, 1.028 at N=1.49e+05): the
        law carries no N-dependence beyond the fitted sizes; check each size's N, or give more sizes
    """
    levels = sorted((float(lv["n_params"]), float(lv["L0"]))
                    for lv in (law.fitted_on.get("floor_fit") or {}).get("levels", []))
    if len(levels) < 2 or levels[-1][1] < levels[0][1]:
        return None
    said = ", ".join(f"{v:.4g} at N={n:.3g}" for n, v in levels)
    return (f"the pilots' long-training level does not fall with N (L0 {said}): the law carries no N-dependence "
            "beyond the fitted sizes; check each size's N, or give more sizes")


def implausible_law(law: CurveLaw, curves: Sequence[Curve]) -> str | None:
    """One line saying why a fitted curve law should not be trusted, and what to do; None when nothing is wrong.

    Checked at every pilot size: a long-training level L0 below 0 (the predicted loss goes negative on a
    long enough run), alpha near 0 with a huge A (the power law degenerating into a logarithm), a 90%
    band wider than :data:`WIDE_BAND_REL`, and (the floor form) levels per size that do not fall with N
    (:func:`levels_not_falling`).

    Example:
        >>> c = Curve("a", np.array([100, 200]), np.full(2, 1e-3), np.array([3.0, 2.9]), None, np.full(201, 1e-3))
        >>> law = CurveLaw({"L0": (-25.7, 0.0), "lnA": (math.log(27.6), 0.0), "alpha": (0.015, 0.0),
        ...                 "lnC": (0.0, 0.0)}, n_ref=1.0, band_rel=0.134)
        >>> print(implausible_law(law, [c]))  # doctest: +NORMALIZE_WHITESPACE
        the curve law is poorly determined: L0=-25.7 is below 0 (the predicted loss goes negative on a long enough
        run); alpha=0.015 with A=27.6: the power law has degenerated into a logarithm; the 90% band is +-13.4% (over
        10%): fit it on longer or more pilot curves, and do not use a law fitted on runs of up to 200 steps far beyond
        that length
    """
    sizes = law.fitted_on.get("sizes") or [None]
    top = max((float(np.max(c.loss)) for c in curves if len(c.loss)), default=0.0)
    reasons: list[str] = []
    for n in sizes:
        m = law.at(n)
        at = f" at N={n:.3g}" if n is not None and len(sizes) > 1 else ""
        if m.L0 < 0 and not any(r.startswith("L0=") for r in reasons):
            reasons.append(f"L0={m.L0:.4g}{at} is below 0 (the predicted loss goes negative on a long enough run)")
        if m.alpha < DEGENERATE_ALPHA and m.A > DEGENERATE_A_PER_LOSS * top \
                and not any(r.startswith("alpha=") for r in reasons):
            reasons.append(f"alpha={m.alpha:.3g} with A={m.A:.4g}{at}: the power law has degenerated into a logarithm")
    if law.band_rel > WIDE_BAND_REL:
        reasons.append(f"the 90% band is +-{law.band_rel:.1%} (over {WIDE_BAND_REL:.0%})")
    flat = levels_not_falling(law)
    if flat:
        reasons.append(flat)
    if not reasons:
        return None
    longest = max((int(np.max(c.steps)) for c in curves if len(c.steps)), default=0)
    # Curves of several model sizes fitted as one (no N known) misfit each other in just these ways.
    sizes_hint = ("; if these curves are of several model sizes, give each its N (an n_params column, or "
                  "--n-column)" if len(curves) > 2 and all(c.n_params is None for c in curves) else "")
    return (f"the curve law is poorly determined: {'; '.join(reasons)}: fit it on longer or more pilot curves, and "
            f"do not use a law fitted on runs of up to {longest} steps far beyond that length{sizes_hint}")


def _forecast_replays(curves: Sequence[Curve], groups: Sequence[int], law: CurveLaw,
                      left_out: Mapping[int, dict[str, tuple[float, float]]],
                      forward: dict[str, tuple[float, float]] | None, multi: bool,
                      prepared: Sequence[_Prepared], fits: list[tuple[str, OptimizeResult | None]],
                      size_out: Mapping[float, tuple[dict[str, tuple[float, float]], tuple[float, float]]]
                      ) -> list[Replay]:
    """Every pilot curve's final loss forecast from its own prefixes by laws that did not see it.

    Three kinds, as the pilots allow: ``leave-out`` (the law without the curve and its branches,
    3+ curves), ``forward`` (laws fitted on every curve's first 60 and 80%, each forecasting
    from every prefix fraction: the only kind with 2 curves; the prefix up to the cut was in the fit,
    the rest and the final loss were not; prefixes past the cut calibrate the band late in a run), and ``size-out`` (the law without the smallest or the
    largest model size, 3+ sizes: these measure how the error grows outside the pilot sizes). Each forecast
    uses the full law's band for its priors, as a live forecast does.
    """
    def replay(c: Curve, coef: Mapping[str, tuple[float, float]], n_range: tuple[float, float] | None,
               kind: str, fractions: Sequence[float]) -> list[Replay]:
        sub = CurveLaw(dict(coef), law.n_ref, law.lam, law.band_rel, law.band_by_progress, n_range,
                       size_reach=law.size_reach)
        sched, end, truth = c.per_step_lr(), int(c.steps[-1]), float(c.loss[-1])
        out = []
        for f in fractions:
            m = c.steps <= f * end
            if m.sum() < 3:
                continue
            fc = prefix_fit(sub, sched, c.steps[m], c.loss[m], n_params=c.n_params, final_step=end)
            out.append(Replay(c.name, f, (fc.loss - truth) / truth, fc.sd_rel, sub.n_outside(c.n_params), kind,
                              (fc.prior_loss - truth) / truth, fc.drop, fc.prior_widen,
                              off_band(sub, sched, c.steps[m], c.loss[m], c.n_params, end)))
        return out

    replays: list[Replay] = []
    for j, c in enumerate(curves):
        if groups[j] in left_out:
            replays += replay(c, left_out[groups[j]], law.n_range, "leave-out", REPLAY_FRACTIONS)
    # Forward in time, cut at several points: with two pilot curves these are the only replays, and one
    # cut gives too few of them for a 90% quantile. The 60% cut is the fit the band already made. With
    # leave-out replays the calibration does not use them (the law saw the curve's prefix): not made.
    for cut in FORWARD_CUTS if not replays else ():
        coef_t: Mapping[str, tuple[float, float]] | None = forward if cut == 0.6 else None
        if coef_t is None:
            early = [_Prepared(p.name, p.S1[m], p.S2[m], p.y[m], p.x) for p in prepared
                     for m in [np.arange(len(p.y)) < cut * len(p.y)]]
            try:
                coef_t, r_t = _fit_coef(early, multi, start=law.coef, form=law.form)
                fits.append((f"the fit on the first {cut:.0%} of each curve", r_t))
            except CurveError:
                fits.append((f"the fit on the first {cut:.0%} of each curve", None))
                continue
        for c in curves:
            replays += replay(c, coef_t, law.n_range, "forward", REPLAY_FRACTIONS)
    for n, (coef, n_range) in size_out.items():
        for c in curves:
            if c.n_params == n:
                replays += replay(c, coef, n_range, "size-out", REPLAY_FRACTIONS)
    return [r for r in replays if math.isfinite(r.rel_error) and math.isfinite(r.sd_rel) and r.sd_rel > 0]


def _held_out_fit(parts: Sequence[_Prepared], multi: bool, coef: Mapping[str, tuple[float, float]], form: str,
                  label: str, fits: list[tuple[str, OptimizeResult | None]]) -> dict[str, tuple[float, float]] | None:
    """One fit of the band's calibration, warm-started from the full fit; recorded in ``fits`` under
    ``label`` (with None when it failed, which leaves that evidence out rather than stopping the fit)."""
    try:
        c, r = _fit_coef(parts, multi, start=coef, form=form)
    except CurveError:
        fits.append((label, None))
        return None
    fits.append((label, r))
    return c


def _size_out_fits(prepared: Sequence[_Prepared], n_params: Sequence[float | None],
                   coef: Mapping[str, tuple[float, float]], form: str, fits: list[tuple[str, OptimizeResult | None]]
                   ) -> dict[float, tuple[dict[str, tuple[float, float]], tuple[float, float]]]:
    """The law without the smallest and without the largest size (each fitted on 2+ other sizes):
    size -> (its coefficients, the sizes it was fitted on)."""
    sizes = sorted({n for n in n_params if n is not None})
    out = {}
    for n in (sizes[0], sizes[-1]):
        rest = [p for p, m in zip(prepared, n_params, strict=True) if m != n]
        left = sorted({m for m in n_params if m is not None and m != n})
        if len(left) < 2:
            continue
        c = _held_out_fit(rest, True, coef, form, f"the fit without N={n:.3g}", fits)
        if c is not None:
            out[n] = (c, (left[0], left[-1]))
    return out


def _calibrate_size_reach(law: CurveLaw, prepared: Sequence[_Prepared], n_params: Sequence[float | None],
                          size_out: Mapping[float, tuple[dict[str, tuple[float, float]], tuple[float, float]]]
                          ) -> SizeReach:
    """:class:`~scalewatch.bands.SizeReach` from the left-out sizes' curves as their size-out laws predict them."""
    errs, widths, dists, weights = [], [], [], []
    for n, (c, (lo, hi)) in size_out.items():
        d = max(math.log(lo / n), math.log(n / hi), 0.0)
        for p, m in zip(prepared, n_params, strict=True):
            if m != n or d <= 0:
                continue
            e = np.abs(_model(c, p) - p.y) / p.y
            if not np.all(np.isfinite(e)):
                continue
            errs.append(e)
            widths.append(np.asarray(law.band_at(None, p.frac), dtype=float) * np.ones_like(e))
            dists.append(np.full(len(e), d))
            weights.append(np.full(len(e), 1.0 / len(e)))
    if not errs:
        return SizeReach()
    return calibrate_size_reach(np.concatenate(errs), np.concatenate(widths), np.concatenate(dists),
                                np.concatenate(weights), level=BAND_LEVEL)
