"""Schedule-aware loss-curve laws: predict a run's whole loss curve from pilot runs and its LR schedule.

A point in the middle of a cosine run is not a point of L(N, D): the loss sits above it
until the learning rate anneals. The momentum law of Tissue et al. (2024, arXiv 2408.11029)
takes the schedule as input::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)
    S1(s) = sum of the LR up to step s (warmup counted at the peak LR)
    m_i = lam * m_{i-1} + (eta_{i-1} - eta_i),   S2(s) = sum of m_i up to s,   lam = 0.999

Fitted on a few pilot curves of a recipe (e.g. one cosine and one constant-LR run) it
predicts the curve under other schedules. Across model sizes each parameter is a linear
function of ``ln(N / n_ref)`` (L0, ln A, alpha, ln C), so pilot runs at two or more sizes
predict a new size. The prediction band is calibrated by leave-one-curve-out errors on the
pilot curves. Plain numpy/scipy: nothing here knows Lightning.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.signal import lfilter

from scalewatch.laws import SCHEMA, SCHEMA_VERSION, LawFileError, read_law_json, write_law_json
from scalewatch.laws import _finite_number as _finite

FAMILY = "momentum_curve"
LAMBDA = 0.999
PARAM_NAMES = ("L0", "lnA", "alpha", "lnC")
BAND_LEVEL = 0.90
# The band is never narrower than this (relative): curves measured on a finite evaluation set
# are not known better, and a law that fits its pilots perfectly is not perfect elsewhere.
BAND_FLOOR_REL = 0.002
# Stretches of a run (step / last step) with their own band width.
PROGRESS_EDGES = (0.0, 0.3, 0.6, 1.0)
# Points before this fraction of a curve's last step are left out of fits: the warmup and
# the first steep drop are not what the law describes (and not what a forecast is about).
SKIP_FRACTION = 0.1


# Forecast settings, chosen on the OLMo ladder cosine runs (benchmarks/forecast_accuracy.py):
_CORR_POINTS = 1.0  # prefix points per independent error (1: each logged point counts fully)
_SIGMA_LNA = 0.3  # prior sd of the amplitude's log around the pilot law
_BAND_FLOOR = 1.0  # the forecast band never shrinks below the prior band (shrinking cost coverage)


class CurveError(ValueError):
    """A loss curve or a schedule that cannot be used, with the reason and the fix."""


# ------------------------------------------------------------------ schedules
def per_step_lr(steps: Sequence[float], lr: Sequence[float], last_step: int | None = None) -> np.ndarray:
    """The LR at every step 0..last_step from logged ``(step, lr)`` points.

    Linear interpolation between points; before the LR first reaches its peak (warmup, or
    steps before the first logged point) the peak LR is used, as in Tissue et al. Past the
    last point the last LR is held.

    Example:
        >>> per_step_lr([2, 4, 6], [1.0, 1.0, 0.0]).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(lr, dtype=float)
    if s.ndim != 1 or s.shape != v.shape or len(s) == 0:
        raise CurveError("schedule: steps and lr must be 1-D sequences of the same, non-zero length")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(v))):
        raise CurveError("schedule: steps and lr must be finite numbers")
    if np.any(np.diff(s) <= 0):
        raise CurveError("schedule: steps must be strictly increasing; sort the file or drop duplicate steps")
    if not np.any(v > 0):
        raise CurveError("schedule: the learning rate is zero or negative throughout; a schedule needs positive LRs")
    end = int(s[-1]) if last_step is None else int(last_step)
    grid = np.arange(end + 1, dtype=float)
    full = np.interp(grid, s, v)
    peak_at = int(s[int(np.argmax(v))])
    full[: min(peak_at, end) + 1] = float(np.max(v))
    return np.clip(full, 0.0, None)


def schedule_features(lr: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """``(S1, S2)`` at every step for a per-step LR array (index = step).

    Example:
        >>> S1, S2 = schedule_features(np.array([1.0, 1.0, 0.5, 0.5]), lam=0.5)
        >>> S1.tolist(), S2.tolist()
        ([1.0, 2.0, 2.5, 3.0], [0.0, 0.0, 0.5, 0.75])
    """
    lr = np.asarray(lr, dtype=float)
    drops = np.concatenate([[0.0], lr[:-1] - lr[1:]])
    momentum = lfilter([1.0], [1.0, -lam], drops)
    return np.cumsum(lr), np.cumsum(momentum)


# ------------------------------------------------------------------ curves
@dataclass
class Curve:
    """One run's loss curve: steps, the LR at those steps, the loss, and N if known."""

    name: str
    steps: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    n_params: float | None = None
    schedule: np.ndarray | None = None  # per-step LR, when known better than from the logged points

    def per_step_lr(self) -> np.ndarray:
        if self.schedule is not None:
            return self.schedule
        return per_step_lr(self.steps, self.lr)

    def features(self, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
        S1, S2 = schedule_features(self.per_step_lr(), lam)
        idx = self.steps.astype(int)
        return S1[idx], S2[idx]


def validate_curve(c: Curve) -> Curve:
    """Check a curve; raise :class:`CurveError` naming the problem (NaN losses are dropped with a warning)."""
    steps = np.asarray(c.steps, dtype=float)
    loss = np.asarray(c.loss, dtype=float)
    lr = np.asarray(c.lr, dtype=float)
    if not (len(steps) == len(loss) == len(lr)) or len(steps) < 3:
        raise CurveError(f"{c.name}: a curve needs at least 3 points with step, lr and loss")
    if np.any(np.diff(steps) <= 0):
        raise CurveError(f"{c.name}: steps are not increasing; sort the file and drop duplicate steps")
    bad = ~np.isfinite(loss)
    if bad.any():
        warnings.warn(f"{c.name}: {int(bad.sum())} non-finite losses dropped", stacklevel=2)
    if not np.any(lr > 0):
        raise CurveError(f"{c.name}: the learning rate is zero or negative throughout")
    if c.n_params is not None and not (c.n_params > 0):
        raise CurveError(f"{c.name}: n_params must be positive, got {c.n_params}")
    schedule = c.schedule if c.schedule is not None else per_step_lr(steps, lr)
    keep = ~bad
    if keep.sum() < 3:
        raise CurveError(f"{c.name}: fewer than 3 finite losses")
    return Curve(c.name, steps[keep].astype(int), lr[keep], loss[keep], c.n_params, schedule)


_STEP_KEYS = ("step", "_step", "global_step")
_LR_KEYS = ("lr", "learning_rate", "optim/learning_rate_group0")
_LOSS_KEYS = ("loss", "train_loss", "val_loss", "scalewatch/loss")
_N_KEYS = ("n_params", "params", "N", "n_params_final_json")


def _pick(header: Sequence[str], keys: Sequence[str], what: str, path: str, given: str | None) -> str:
    if given is not None:
        if given not in header:
            raise CurveError(f"{path}: no column {given!r} (columns: {', '.join(header)})")
        return given
    for k in keys:
        if k in header:
            return k
    raise CurveError(f"{path}: no {what} column (looked for {', '.join(keys)}); columns: {', '.join(header)}")


def read_curve_csv(path: str | Path, loss_column: str | None = None, n_params: float | None = None) -> Curve:
    """A CSV with columns ``step,lr,loss`` (optional ``n_params``; aliases accepted)."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise CurveError(f"{p}: cannot read ({exc.strerror})") from None
    sk = _pick(header, _STEP_KEYS, "step", str(p), None)
    lk = _pick(header, _LR_KEYS, "learning-rate", str(p), None)
    yk = _pick(header, _LOSS_KEYS, "loss", str(p), loss_column)
    nk = next((k for k in _N_KEYS if k in header), None)
    try:
        steps = np.array([float(r[sk]) for r in rows])
        lr = np.array([float(r[lk]) for r in rows])
        loss = np.array([float(r[yk]) if r[yk] not in ("", None) else math.nan for r in rows])
    except (TypeError, ValueError) as exc:
        raise CurveError(f"{p}: a value is not a number ({exc})") from None
    if n_params is None and nk is not None and rows and rows[0].get(nk):
        n_params = float(rows[0][nk])
    return validate_curve(Curve(str(p), steps, lr, loss, n_params))


def read_curve_tensorboard(path: str | Path, loss_tag: str | None = None, n_params: float | None = None) -> Curve:
    """A TensorBoard event directory: the loss tag (``scalewatch/loss`` by default) and ``scalewatch/lr``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags().get("scalars", [])
    lr_tag = next((t for t in ("scalewatch/lr", "lr", "lr-SGD", "lr-AdamW", "lr-Adam") if t in tags), None)
    y_tag = loss_tag or next((t for t in ("scalewatch/loss", "train_loss", "loss") if t in tags), None)
    if lr_tag is None or y_tag is None or y_tag not in tags:
        raise CurveError(f"{path}: TensorBoard logs need a loss tag and an LR tag (e.g. scalewatch/loss and "
                         f"scalewatch/lr, written by ScaleWatch); found {', '.join(tags) or 'no scalars'}")
    lr_events = {e.step: e.value for e in ea.Scalars(lr_tag)}
    pts = [(e.step, lr_events[e.step], e.value) for e in ea.Scalars(y_tag) if e.step in lr_events]
    if n_params is None and "scalewatch/n_params" in tags:
        n_params = float(ea.Scalars("scalewatch/n_params")[-1].value)
    arr = np.array(sorted(pts), dtype=float).reshape(-1, 3)
    return validate_curve(Curve(str(path), arr[:, 0], arr[:, 1], arr[:, 2], n_params))


def read_curves(paths: Sequence[str | Path], loss_column: str | None = None) -> list[Curve]:
    """CSV files and TensorBoard event directories, in order."""
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            out.append(read_curve_tensorboard(p, loss_column))
        elif p.exists():
            out.append(read_curve_csv(p, loss_column))
        else:
            raise CurveError(f"{p}: no such file or directory")
    return out


# ------------------------------------------------------------------ the law
@dataclass(frozen=True)
class MomentumLaw:
    """Tissue et al.'s law for one model size."""

    L0: float
    A: float
    alpha: float
    C: float
    lam: float = LAMBDA

    def loss(self, S1: np.ndarray, S2: np.ndarray) -> np.ndarray:
        return self.L0 + self.A * np.power(np.maximum(S1, 1e-30), -self.alpha) - self.C * S2


@dataclass(frozen=True)
class CurvePrediction:
    """The predicted loss at ``steps`` with a band (``low``, ``high``) at ``level``."""

    steps: np.ndarray
    loss: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float = BAND_LEVEL


@dataclass
class CurveLaw:
    """A momentum law shared across model sizes: each parameter linear in ``x = ln(N / n_ref)``.

    Attributes:
        coef: name -> (value at n_ref, slope per unit of x) for L0, lnA, alpha, lnC.
        n_ref: the reference size (geometric mean of the pilot sizes).
        lam: the momentum decay.
        band_rel: half-width of the 90% band, relative to the predicted loss (from
            held-out errors on the pilot curves).
        band_by_progress: ``(from, to, half-width)`` per stretch of the run (step / last
            step), where the held-out errors allow; ``band_rel`` elsewhere.
        n_range: smallest and largest pilot N (None for a single unknown size).
        fitted_on: provenance (curves, sizes, errors).
        conventions: loss name, N convention, step unit.
    """

    coef: dict[str, tuple[float, float]]
    n_ref: float
    lam: float = LAMBDA
    band_rel: float = 0.01
    band_by_progress: list[tuple[float, float, float]] = field(default_factory=list)
    n_range: tuple[float, float] | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)
    conventions: dict[str, str] = field(default_factory=dict)

    family = FAMILY

    def at(self, n_params: float | None = None) -> MomentumLaw:
        x = 0.0 if n_params is None or not self.n_ref else math.log(n_params / self.n_ref)
        v = {k: a + b * x for k, (a, b) in self.coef.items()}
        return MomentumLaw(L0=v["L0"], A=math.exp(v["lnA"]), alpha=v["alpha"], C=math.exp(v["lnC"]), lam=self.lam)

    def band_at(self, n_params: float | None, progress: float | np.ndarray | None = None) -> Any:
        """The relative band half-width at N and at ``progress`` = step / last step of the run.

        Wider outside the pilot sizes (extrapolation in N).
        """
        width: Any = self.band_rel
        if progress is not None and self.band_by_progress:
            prog = np.asarray(progress, dtype=float)
            width = np.full(prog.shape, self.band_rel)
            for lo, hi, w in self.band_by_progress:
                width = np.where((prog > lo) & (prog <= hi), w, width)
            width = np.where(prog <= self.band_by_progress[0][0], self.band_by_progress[0][2], width)
            width = width if width.ndim else float(width)
        if n_params is None or self.n_range is None:
            return width
        lo, hi = self.n_range
        out = max(math.log(lo / n_params), math.log(n_params / hi), 0.0)
        return width * (1.0 + out)

    def predict(self, schedule: np.ndarray, n_params: float | None = None,
                steps: Sequence[int] | None = None) -> CurvePrediction:
        """The loss at ``steps`` (default: every step after the first) of a run with this per-step LR.

        Example:
            >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
            ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
            >>> p = law.predict(np.full(101, 1e-3), steps=[100])
            >>> round(float(p.loss[0]), 4), round(float(p.high[0] - p.loss[0]), 4)
            (5.1466, 0.0515)
        """
        schedule = np.asarray(schedule, dtype=float)
        if schedule.ndim != 1 or len(schedule) < 2 or not np.all(np.isfinite(schedule)):
            raise CurveError("schedule: need the LR at every step as a 1-D array of finite numbers")
        if not np.any(schedule > 0):
            raise CurveError("schedule: the learning rate is zero or negative throughout")
        idx = np.arange(1, len(schedule)) if steps is None else np.asarray(steps, dtype=int)
        if len(idx) and (idx.max() >= len(schedule) or idx.min() < 0):
            raise CurveError(f"schedule covers steps 0..{len(schedule) - 1}, but step {int(idx.max())} was asked for; "
                             "give a schedule that covers the whole run")
        S1, S2 = schedule_features(schedule, self.lam)
        loss = self.at(n_params).loss(S1[idx], S2[idx])
        half = self.band_at(n_params, idx / (len(schedule) - 1)) * loss
        return CurvePrediction(idx, loss, loss - half, loss + half)

    # ------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "family": FAMILY,
            "params": {k: [float(a), float(b)] for k, (a, b) in self.coef.items()},
            "n_ref": float(self.n_ref),
            "lam": float(self.lam),
            "band": {"level": BAND_LEVEL, "relative_half_width": float(self.band_rel),
                     "by_progress": [[float(a), float(b), float(w)] for a, b, w in self.band_by_progress]},
            "n_range": None if self.n_range is None else [float(x) for x in self.n_range],
            "fitted_on": self.fitted_on,
            "conventions": dict(self.conventions),
        }

    @classmethod
    def from_json(cls, doc: Any, source: str = "law file") -> CurveLaw:
        if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA:
            raise LawFileError(f"{source}: not a scalewatch law file; write it with `scalewatch fit --curves --out`")
        if doc.get("version") != SCHEMA_VERSION:
            raise LawFileError(f"{source}: law file version {doc.get('version')!r} is not supported "
                               f"(this scalewatch reads version {SCHEMA_VERSION}); refit or upgrade scalewatch")
        if doc.get("family") != FAMILY:
            raise LawFileError(f"{source}: this is a {doc.get('family')!r} law, but a curve law is needed here; "
                               "fit one with `scalewatch fit --curves`")
        params = doc.get("params")
        if not isinstance(params, Mapping) or any(k not in params for k in PARAM_NAMES):
            raise LawFileError(f"{source}: 'params' must hold {list(PARAM_NAMES)}, each [value, slope]")
        coef = {}
        for k in PARAM_NAMES:
            v = params[k]
            if not (isinstance(v, Sequence) and len(v) == 2 and all(_finite(x) for x in v)):
                raise LawFileError(f"{source}: params.{k} must be [value at n_ref, slope per ln N], finite numbers")
            coef[k] = (float(v[0]), float(v[1]))
        band = doc.get("band") or {}
        n_ref, lam, width = doc.get("n_ref"), doc.get("lam", LAMBDA), band.get("relative_half_width")
        if not (_finite(n_ref) and n_ref > 0 and _finite(lam) and 0 < lam < 1 and _finite(width) and width >= 0):
            raise LawFileError(f"{source}: n_ref > 0, 0 < lam < 1 and band.relative_half_width >= 0 are required")
        n_range = doc.get("n_range")
        if n_range is not None and not (isinstance(n_range, Sequence) and len(n_range) == 2
                                        and all(_finite(x) and x > 0 for x in n_range)):
            raise LawFileError(f"{source}: n_range must be [smallest N, largest N] or null")
        conv = doc.get("conventions", {}) or {}
        by_progress = band.get("by_progress", []) or []
        if not (isinstance(by_progress, Sequence) and all(
                isinstance(r, Sequence) and len(r) == 3 and all(_finite(x) for x in r) for r in by_progress)):
            raise LawFileError(f"{source}: band.by_progress must be a list of [from, to, half-width]")
        return cls(coef=coef, n_ref=float(n_ref), lam=float(lam), band_rel=float(width),
                   band_by_progress=[(float(a), float(b), float(w)) for a, b, w in by_progress],
                   n_range=None if n_range is None else (float(n_range[0]), float(n_range[1])),
                   fitted_on=dict(doc.get("fitted_on", {}) or {}),
                   conventions={str(k): str(v) for k, v in conv.items()})


def save_curve_law(law: CurveLaw, path: str | Path) -> None:
    write_law_json(law.to_json(), path)


def load_curve_law(path: str | Path) -> CurveLaw:
    """Read a curve-law file; malformed or wrong-family files raise :class:`LawFileError`."""
    return CurveLaw.from_json(read_law_json(path, "`scalewatch fit --curves --out`"), source=str(path))


# ------------------------------------------------------------------ fitting
@dataclass
class _Prepared:
    name: str
    S1: np.ndarray
    S2: np.ndarray
    y: np.ndarray
    x: float  # ln(N / n_ref)
    frac: np.ndarray | None = None  # step / the curve's last step


def _prepare(curves: Sequence[Curve], lam: float, n_ref: float) -> list[_Prepared]:
    out = []
    for c in curves:
        S1, S2 = c.features(lam)
        keep = c.steps >= SKIP_FRACTION * c.steps.max()
        x = 0.0 if c.n_params is None else math.log(c.n_params / n_ref)
        out.append(_Prepared(c.name, S1[keep], S2[keep], c.loss[keep], x, c.steps[keep] / c.steps.max()))
    return out


def _unpack(theta: np.ndarray, multi: bool) -> dict[str, tuple[float, float]]:
    if multi:
        return {k: (float(theta[2 * i]), float(theta[2 * i + 1])) for i, k in enumerate(PARAM_NAMES)}
    return {k: (float(theta[i]), 0.0) for i, k in enumerate(PARAM_NAMES)}


def _model(coef: Mapping[str, tuple[float, float]], p: _Prepared) -> np.ndarray:
    v = {k: a + b * p.x for k, (a, b) in coef.items()}
    return v["L0"] + np.exp(v["lnA"]) * np.power(p.S1, -v["alpha"]) - np.exp(v["lnC"]) * p.S2


def _fit_coef(prepared: Sequence[_Prepared], multi: bool) -> tuple[dict[str, tuple[float, float]], float]:
    # Each curve weighs the same whatever its number of points; residuals are relative.
    n_mean = float(np.mean([len(p.y) for p in prepared]))
    weights = [math.sqrt(n_mean / len(p.y)) for p in prepared]

    def residuals(theta: np.ndarray) -> np.ndarray:
        coef = _unpack(theta, multi)
        return np.concatenate([w * (_model(coef, p) - p.y) / p.y for w, p in zip(weights, prepared, strict=True)])

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
    return _unpack(best.x, multi), float(best.cost)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w) / w.sum()
    return float(np.interp(q, cum, v))


@dataclass
class CurveFitResult:
    """A fitted :class:`CurveLaw` with how well it did on its own curves and on held-out ones."""

    law: CurveLaw
    in_sample: dict[str, float]  # curve -> mean |relative error|
    held_out: dict[str, float]  # curve -> mean |relative error| when left out of the fit


def fit_curves(curves: Sequence[Curve], lam: float = LAMBDA, loss_name: str = "loss",
               n_convention: str = "total") -> CurveFitResult:
    """Fit a momentum law to pilot curves; parameters linear in ln N when there are several sizes.

    The 90% band comes from leave-one-curve-out: each curve is predicted by a fit on
    the others (with its size's other curves when there are several sizes), and the
    band is the 90th percentile of those relative errors, each curve weighing the same.
    """
    if len(curves) < 2:
        raise CurveError("fitting a curve law needs at least 2 curves of one recipe (e.g. a cosine and a "
                         "constant-LR run): one curve cannot separate the power law from the annealing term")
    sizes = sorted({c.n_params for c in curves if c.n_params is not None})
    if any(c.n_params is None for c in curves) and sizes:
        raise CurveError("some curves have n_params and some do not; give N for every curve (an n_params column)")
    multi = len(sizes) >= 2
    n_ref = math.exp(float(np.mean(np.log(sizes)))) if sizes else 1.0
    prepared = _prepare(curves, lam, n_ref)
    coef, _ = _fit_coef(prepared, multi)

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

    # (a) Leave one curve out, when the rest can still identify the law (>= 2 curves per fit).
    if len(prepared) >= 3:
        for i, p in enumerate(prepared):
            rest = [q for j, q in enumerate(prepared) if j != i]
            try:
                c_i, _ = _fit_coef(rest, multi and len({q.x for q in rest}) >= 2)
            except CurveError:
                continue
            e = mean_err(c_i, p)
            held_out[p.name] = float(e.mean())
            add(e, p.frac)
    # (b) Forward in time: fit every curve's first 60%, predict the rest (always possible).
    early = [_Prepared(p.name, p.S1[m], p.S2[m], p.y[m], p.x) for p in prepared
             for m in [np.arange(len(p.y)) < 0.6 * len(p.y)]]
    try:
        c_t, _ = _fit_coef(early, multi)
        for p in prepared:
            late = np.arange(len(p.y)) >= 0.6 * len(p.y)
            add(mean_err(c_t, _Prepared(p.name, p.S1[late], p.S2[late], p.y[late], p.x)), p.frac[late])
    except CurveError:
        pass
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
                   "band": "90th percentile of held-out relative errors: leave-one-curve-out (3+ curves) "
                           "and each curve's last 40% predicted from fits on the first 60%"},
        conventions={"loss": loss_name, "n_params": n_convention, "x_axis": "optimizer steps",
                     "law": "L0 + A*S1^-alpha - C*S2 (Tissue et al. 2024); params linear in ln(N/n_ref)"},
    )
    return CurveFitResult(law=law, in_sample=in_sample, held_out=held_out)


# ------------------------------------------------------------------ forecasting a live run
@dataclass(frozen=True)
class Forecast:
    """Where the run will end: the final loss and its band, and how the prefix moved it."""

    step: int
    loss: float
    low: float
    high: float
    prior_loss: float
    prefix_points: int


def forecast_final(law: CurveLaw, schedule: np.ndarray, prefix_steps: Sequence[int], prefix_loss: Sequence[float],
                   n_params: float | None = None, final_step: int | None = None) -> Forecast:
    """Forecast the final loss from the run's prefix, with the pilot law as the prior.

    The shape (alpha, C, and how they scale with N) comes from the pilot runs; the prefix
    updates the level (L0) and the amplitude (A) by a MAP fit whose priors have the law's
    calibrated width, and whose points count as much as the law's error at that step
    lets them. Milliseconds for hundreds of points.

    Example:
        >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
        ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
        >>> sched = np.full(1001, 1e-3)
        >>> truth = law.predict(sched, steps=range(100, 501, 50)).loss + 0.02   # the run sits 0.02 higher
        >>> f = forecast_final(law, sched, range(100, 501, 50), truth)
        >>> f.prior_loss < f.loss < f.prior_loss + 0.03
        True
    """
    schedule = np.asarray(schedule, dtype=float)
    end = len(schedule) - 1 if final_step is None else int(final_step)
    if end >= len(schedule):
        raise CurveError(f"the schedule covers steps 0..{len(schedule) - 1}, not the final step {end}")
    base = law.at(n_params)
    S1, S2 = schedule_features(schedule[: end + 1], law.lam)
    st = np.asarray(prefix_steps, dtype=int)
    y = np.asarray(prefix_loss, dtype=float)
    ok = np.isfinite(y) & (st >= 1) & (st <= end) & (st >= SKIP_FRACTION * end)
    st, y = st[ok], y[ok]
    band = law.band_at(n_params, 1.0)
    prior_final = float(base.loss(S1[end:end + 1], S2[end:end + 1])[0])
    if len(st) < 3:
        return Forecast(end, prior_final, prior_final * (1 - band), prior_final * (1 + band), prior_final, len(st))
    sigma_point = band / 1.645  # the law's relative error scale at one point
    sigma_level = band * prior_final / 1.645
    n_eff = max(len(st) / _CORR_POINTS, 1.0)

    def residuals(d: np.ndarray) -> np.ndarray:
        pred = base.L0 + d[0] + base.A * math.exp(d[1]) * np.power(S1[st], -base.alpha) - base.C * S2[st]
        data = (pred - y) / y / sigma_point / math.sqrt(len(st) / n_eff)
        return np.concatenate([data, [d[0] / sigma_level, d[1] / _SIGMA_LNA]])

    fit = least_squares(residuals, np.zeros(2))
    d = fit.x
    final = float(base.L0 + d[0] + base.A * math.exp(d[1]) * S1[end] ** (-base.alpha) - base.C * S2[end])
    # Band: the prior's, shrunk by how much the prefix pinned the level, never below a quarter.
    try:
        cov = np.linalg.inv(fit.jac.T @ fit.jac)
        level_sd = math.sqrt(max(cov[0, 0], 0.0)) * 1.0
    except np.linalg.LinAlgError:
        level_sd = sigma_level
    shrink = min(1.0, max(_BAND_FLOOR, level_sd / sigma_level))
    half = band * final * shrink
    # Where the prefix pulled the forecast away from the pilots, the band spans both: an early
    # prefix can pull hard in the wrong direction.
    return Forecast(end, final, min(final, prior_final) - half, max(final, prior_final) + half, prior_final, len(st))


# ------------------------------------------------------------------ the monitor plugin
class CurvePlugin:
    """Monitor plugin: the live loss against the curve law's prediction for this run, and a forecast.

    Needs the run's per-step LR (``schedule``, index = step, covering the whole run) and N.
    Scalars: ``loss_pred``, ``loss_pred_low``, ``loss_pred_high`` (90% band at this step),
    ``loss_residual`` ((loss - pred) / half-width of the band: beyond +-1 the run is off its
    predicted curve), ``loss_forecast_final`` with ``_low`` / ``_high`` (the final loss
    forecast from the history so far with the law as prior; ``loss_forecast_at_step`` is the last
    step it saw) and ``loss_pred_final``. With ``background=True`` the forecast runs on a worker
    thread and each log point reports the latest finished one.

    Example:
        >>> from scalewatch.monitor import Monitor, Observation
        >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
        ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
        >>> m = Monitor(plugins=[CurvePlugin(law, np.full(1001, 1e-3))])
        >>> s = m.observe(Observation(step=400, tokens=0, samples=0, flops=0, loss=3.60))
        >>> round(s["loss_pred"], 3), round(s["loss_residual"], 2)
        (3.579, 0.58)
    """

    name = "curve"

    def __init__(self, law: CurveLaw, schedule: np.ndarray | None = None, n_params: float | None = None,
                 background: bool = False) -> None:
        self.law = law
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
        if schedule is not None:
            self.set_schedule(schedule)

    def set_schedule(self, schedule: np.ndarray) -> None:
        schedule = np.asarray(schedule, dtype=float)
        if schedule.ndim != 1 or len(schedule) < 2 or not np.all(np.isfinite(schedule)):
            raise CurveError("schedule: need the LR at every step as a 1-D array of finite numbers")
        if not np.any(schedule > 0):
            raise CurveError("schedule: the learning rate is zero or negative throughout")
        self.schedule = schedule
        self._S = schedule_features(schedule, self.law.lam)

    def on_observation(self, obs: Any, monitor: Any) -> dict[str, float]:
        if self.schedule is None or self._S is None or obs.step < 1:
            return {}
        end = len(self.schedule) - 1
        if obs.step > end:
            return {}  # past the schedule: nothing to compare with (said once by the callback)
        S1, S2 = self._S
        model = self.law.at(self.n_params)
        pred = float(model.loss(S1[obs.step:obs.step + 1], S2[obs.step:obs.step + 1])[0])
        half = self.law.band_at(self.n_params, obs.step / end) * pred
        out = {"loss_pred": pred, "loss_pred_low": pred - half, "loss_pred_high": pred + half,
               "loss_pred_final": float(model.loss(S1[end:], S2[end:])[0])}
        if math.isfinite(obs.loss):
            out["loss_residual"] = (obs.loss - pred) / half if half > 0 else math.nan
        hist = [(o.step, o.loss) for o in monitor.history if o.step >= 1 and math.isfinite(o.loss)]
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
        return out

    def _forecast(self, steps: Sequence[int], losses: Sequence[float]) -> dict[str, float]:
        assert self.schedule is not None
        fc = forecast_final(self.law, self.schedule, steps, losses, n_params=self.n_params)
        return {"loss_forecast_final": fc.loss, "loss_forecast_final_low": fc.low,
                "loss_forecast_final_high": fc.high, "loss_forecast_at_step": float(steps[-1])}

    def _collect(self, wait: bool) -> None:
        if self._pending is not None and (wait or self._pending.done()):
            try:
                self._latest = self._pending.result()
            except Exception:  # a failed forecast must not reach the training loop
                self._latest = {}
            self._pending = None

    def finish(self) -> dict[str, float]:
        """Wait for the forecast in flight and stop the worker; returns the forecast from the newest history.

        When the worker was still busy at the last log point, the newest history was never
        handed over: it is forecast here, so the run's last forecast always saw its last step.
        """
        self._collect(wait=True)
        if self._history is not None and self.schedule is not None and \
                self._latest.get("loss_forecast_at_step") != float(self._history[0][-1]):
            try:
                self._latest = self._forecast(*self._history)
            except Exception:  # a failed forecast must not reach the training loop
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return dict(self._latest)


def schedule_from_csv(path: str | Path) -> np.ndarray:
    """A per-step LR array from a ``step,lr`` CSV."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise CurveError(f"{p}: cannot read ({exc.strerror})") from None
    if not rows or "step" not in rows[0] or "lr" not in rows[0]:
        raise CurveError(f"{p}: a schedule CSV needs columns step,lr")
    try:
        return per_step_lr([float(r["step"]) for r in rows], [float(r["lr"]) for r in rows])
    except ValueError as exc:
        raise CurveError(f"{p}: {exc}") from None
