"""Intervals that widen with the distance from the pilots (issue 12, item 2, Chinchilla law).

A bootstrap interval measures how well the pilots pin the law down *where the pilots are*; far
from them the law's form itself is the larger risk, and the bootstrap does not see it. So the
pilots are asked how wrong the law gets when it extrapolates: refit without the largest model
sizes (leave-the-largest-N-out) and without the largest compute budgets
(leave-the-largest-compute-out), predict the runs left out, and record each miss against its
distance from the runs that were kept. The misses are modelled as normal in log loss with a
standard deviation that grows linearly in that distance,

    s(d)**2 = s0**2 + (k·d)**2,   d = max(0, log10 N/N_max, log10 C/C_max)   (decades, C = 6ND),

where ``s0`` is the fold's own bootstrap spread of the predicted log loss at that run (the
uncertainty a bootstrap interval already shows) and ``k`` (per decade) is the maximum-likelihood
fit over every held-out run: the part of the misses the bootstrap does not explain. The misses
of one fold are not independent (one fit made them all), so ``k`` rests on a handful of folds
and is itself uncertain; the interval uses the normal's z (Student's t on so few folds gave
bands too wide to use, e.g. +-40% at one decade on Gadre et al.'s C4 runs). A prediction's interval combines, in log space
and in quadrature, the bootstrap percentile interval and ``z·k·d``.

The same folds, refitted with alpha, beta free and with alpha = beta, say which form extrapolated
better on these pilots: :func:`compare_exponents`, the rule :func:`choose_exponents` (tied unless
free is clearly better) and :func:`fit_chinchilla_exponents` (``scalewatch fit --exponents auto``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from scalewatch.fitting import FitError, FitResult, RunSet, _group_by, fit_chinchilla
from scalewatch.laws import ChinchillaLaw, LawFileError


def distance_decades(N: ArrayLike, D: ArrayLike, N_max: float, C_max: float) -> np.ndarray:
    """Decades beyond the pilots: ``max(0, log10 N/N_max, log10 6ND/C_max)``.

    Example:
        >>> float(distance_decades(1e9, 2e10, N_max=1e8, C_max=1e19))
        1.0791812460476249
        >>> float(distance_decades(5e7, 1e9, N_max=1e8, C_max=1e19))  # inside: no distance
        0.0
    """
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return np.maximum(0.0, np.maximum(np.log10(N / N_max), np.log10(6.0 * N * D / C_max)))


@dataclass
class HeldOut:
    """One run predicted by a fold's fit: how far out it was and how much the fit missed (log loss)."""

    fold: str
    N: float
    D: float
    distance: float
    log_error: float  # log(predicted) - log(observed)
    s0: float  # the fold's bootstrap standard deviation of the predicted log loss here


@dataclass
class ExtrapolationBand:
    """What a law file needs to widen a prediction's interval with its distance from the pilots.

    Attributes:
        k_per_decade: growth of the log-loss standard deviation per decade of distance.
        N_max, C_max: the pilots' largest N and compute (C = 6ND); distances start there.
        held_out: every calibration prediction (fold, N, D, distance, log error, fold RMSE).
        method: how it was calibrated, in words.

    Example:
        >>> band = ExtrapolationBand(k_per_decade=0.02, N_max=1e8, C_max=1e19)
        >>> round(band.extra_log_sd(1e9, 2e10), 4)  # 1.08 decades out
        0.0216
    """

    k_per_decade: float
    N_max: float
    C_max: float
    held_out: list[HeldOut] = field(default_factory=list)
    method: str = ("leave-the-largest-N-out and leave-the-largest-compute-out refits; log-loss misses modelled "
                   "as normal with sd**2 = s0**2 + (k*d)**2, k by maximum likelihood")

    @property
    def n_folds(self) -> int:
        return len({h.fold for h in self.held_out})

    @property
    def mean_abs_log_error(self) -> float:
        """Mean |log(predicted/observed)| over the held-out predictions (how well this law extrapolated)."""
        return float(np.mean([abs(h.log_error) for h in self.held_out])) if self.held_out else math.nan

    def quantile(self, level: float) -> float:
        """The two-sided normal multiplier for ``level`` (1.96 at 95%)."""
        return float(norm.ppf(1.0 - (1.0 - level) / 2.0))

    def distance(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        return distance_decades(N, D, self.N_max, self.C_max)

    def extra_log_sd(self, N: ArrayLike, D: ArrayLike) -> float | np.ndarray:
        out = self.k_per_decade * self.distance(N, D)
        return float(out) if np.ndim(out) == 0 else out

    def to_json(self) -> dict[str, Any]:
        return {"k_per_decade": self.k_per_decade, "N_max": self.N_max, "C_max": self.C_max,
                "distance": "max(0, log10 N/N_max, log10 6ND/C_max) decades", "method": self.method,
                "held_out": [asdict(h) for h in self.held_out]}

    @classmethod
    def from_json(cls, doc: Any, source: str = "law file") -> ExtrapolationBand:
        """Parse ``uncertainty.extrapolation``; a malformed block raises :class:`LawFileError`."""
        def bad(what: str) -> LawFileError:
            return LawFileError(f"{source}: uncertainty.extrapolation.{what}; refit with `scalewatch fit --out`")

        if not isinstance(doc, Mapping):
            raise bad("must be an object")
        vals = {}
        for key in ("k_per_decade", "N_max", "C_max"):
            v = doc.get(key)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise bad(f"{key} must be a non-negative number")
            vals[key] = float(v)
        if vals["N_max"] <= 0 or vals["C_max"] <= 0:
            raise bad("N_max and C_max must be positive")
        rows = doc.get("held_out", []) or []
        try:
            held = [HeldOut(**{k: (str(r[k]) if k == "fold" else float(r[k])) for k in HeldOut.__dataclass_fields__})
                    for r in rows]
        except (KeyError, TypeError, ValueError):
            raise bad("held_out rows need fold, N, D, distance, log_error, s0") from None
        return cls(**vals, held_out=held, method=str(doc.get("method", cls.method)))


def _folds(runs: RunSet, min_sizes: int, min_runs: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, kept indices, held-out indices) for each usable leave-the-largest-out split.

    At most five: the largest model size, then every size above N_max/10**0.5 and above
    N_max/10 (leave-the-largest-N-out), and every run above C_max/10**0.5 and above C_max/10
    (leave-the-largest-compute-out); the same split twice counts once.
    """
    C = 6.0 * runs.N * runs.D
    sizes = _group_by(runs.N, 0.02)
    largest = runs.N[sizes[-1]].min()
    candidates = [(f"N < {largest:.3g}", runs.N < largest)]
    candidates += [(f"N <= {runs.N.max() / 10**x:.3g}", runs.N <= runs.N.max() / 10**x) for x in (0.5, 1.0)]
    candidates += [(f"C <= {C.max() / 10**x:.3g}", C <= C.max() / 10**x) for x in (0.5, 1.0)]
    out, seen = [], set()
    for name, kept in candidates:
        keep, held = np.flatnonzero(kept), np.flatnonzero(~kept)
        key = keep.tobytes()
        if held.size == 0 or keep.size < min_runs or key in seen:
            continue
        if len(_group_by(runs.N[keep], 0.02)) < min_sizes:
            continue
        seen.add(key)
        out.append((name, keep, held))
    return out


def _robust_sd(values: np.ndarray) -> float:
    """Half the 16-84% range of the finite values (the sd for a normal, robust to wild resamples)."""
    v = values[np.isfinite(values)]
    return float(np.quantile(v, 0.84) - np.quantile(v, 0.16)) / 2.0 if v.size else 0.0


def _max_likelihood_k(d: np.ndarray, err: np.ndarray, s0: np.ndarray) -> float:
    """k maximising the normal likelihood of the misses ``err`` with variance ``s0**2 + (k·d)**2``."""
    def nll(log_k: float) -> float:
        var = s0**2 + (math.exp(log_k) * d) ** 2
        return float(np.sum(0.5 * np.log(var) + 0.5 * err**2 / var))

    res = minimize_scalar(nll, bounds=(math.log(1e-6), math.log(10.0)), method="bounded", options={"xatol": 1e-6})
    k = math.exp(res.x)
    return 0.0 if k < 1e-5 else k


def _sample_predictions(samples: np.ndarray, N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Predicted losses ``[n_samples, len(N)]`` of bootstrap rows ``E, A, B, alpha, beta``."""
    E, A, B, alpha, beta = (samples[:, i:i + 1] for i in range(5))
    with np.errstate(all="ignore"):
        return E + A / N[None, :] ** alpha + B / D[None, :] ** beta


def calibrate_extrapolation(runs: RunSet, min_sizes: int = 3, min_runs: int = 6, n_bootstrap: int = 100,
                            seed: int = 0, tie_exponents: bool = False) -> ExtrapolationBand | None:
    """Learn how fast the Chinchilla law's error grows away from these pilots; None if they cannot say.

    Each fold is fitted as the law itself is (``tie_exponents`` as in :func:`fit_chinchilla`).

    Needs at least ``min_sizes`` model sizes (and ``min_runs`` runs) left after holding out the
    largest size or the largest compute; with fewer there is nothing to calibrate on.

    Example:
        >>> true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.3)
        >>> N, D = (a.ravel() for a in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
        >>> from scalewatch.fitting import make_runs
        >>> band = calibrate_extrapolation(make_runs(N, D, true.predict(N, D)))
        >>> band.k_per_decade < 1e-3  # the law is exact here: extrapolating costs nothing
        True
    """
    rows: list[HeldOut] = []
    for name, keep, held in _folds(runs, min_sizes, min_runs):
        sub = runs.subset(keep)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_chinchilla(sub, n_bootstrap=n_bootstrap, seed=seed, tie_exponents=tie_exponents)
        except FitError:
            continue
        n_max, c_max = float(sub.N.max()), float((6.0 * sub.N * sub.D).max())
        pred = np.asarray(fit.law.predict(runs.N[held], runs.D[held]), dtype=float)
        d = distance_decades(runs.N[held], runs.D[held], n_max, c_max)
        logs = np.log(_sample_predictions(fit.samples, runs.N[held], runs.D[held]))
        spread = [_robust_sd(col) for col in logs.T] if len(fit.samples) else [0.0] * len(held)
        for i, p, dist, sd in zip(held, pred, d, spread):
            rows.append(HeldOut(fold=name, N=float(runs.N[i]), D=float(runs.D[i]), distance=float(dist),
                                log_error=float(math.log(p) - math.log(runs.L[i])), s0=sd))
    if not rows:
        return None
    d = np.array([r.distance for r in rows])
    err = np.array([r.log_error for r in rows])
    s0 = np.maximum(np.array([r.s0 for r in rows]), 1e-6)
    k = _max_likelihood_k(d, err, s0)
    return ExtrapolationBand(k_per_decade=k, N_max=float(runs.N.max()), C_max=float((6.0 * runs.N * runs.D).max()),
                             held_out=rows)


# ------------------------------------------------------------ which exponent form: free, tied or auto
EXPONENT_FORMS = ("free", "tied", "auto")
CLEAR_MARGIN = 0.9  # free must extrapolate with less than 0.9x the tied form's error to be chosen


def choose_exponents(free_error: float | None, tied_error: float | None, margin: float = CLEAR_MARGIN) -> str:
    """The exponent form ``"auto"`` fits, from the two forms' leave-the-largest-out errors.

    ``free_error`` and ``tied_error`` are the mean |log(predicted/observed)| over the same held-out
    runs, refitted with alpha, beta free and with alpha = beta. The tied form (four parameters) is
    kept unless the free one's error is clearly smaller: below ``margin`` (0.9) times the tied one's.
    A tenth of the error is about what one held-out run moves on real pilots (the folds are few and
    their misses correlated), so a smaller gap is a draw, and a draw goes to the form with fewer
    parameters, the form the literature fits (Muennighoff et al. 2023, Gadre et al. 2024) and the one
    that extrapolated better on 5 of 7 public checks (README, "On real data"). With no folds (an
    error missing or not finite) the pilots cannot say, and the choice is ``"free"``, the plain fit.

    Example:
        >>> choose_exponents(0.020, 0.050)  # free clearly better
        'free'
        >>> choose_exponents(0.048, 0.050)  # a draw: one parameter fewer
        'tied'
        >>> choose_exponents(0.050, 0.020)
        'tied'
        >>> choose_exponents(None, None)  # too few pilots for the folds
        'free'
    """
    if free_error is None or tied_error is None or not (math.isfinite(free_error) and math.isfinite(tied_error)):
        return "free"
    return "free" if free_error < margin * tied_error else "tied"


@dataclass
class ExponentChoice:
    """Which exponent form a Chinchilla fit used, and the evidence (``fitted_on.exponents`` in a law file).

    Attributes:
        form: ``"free"`` or ``"tied"`` (alpha = beta), the form fitted.
        chosen_by: ``"auto"`` (by :func:`choose_exponents`), ``"given"`` (asked for) or ``"default"``.
        free_error, tied_error: mean |log(predicted/observed)| of the leave-the-largest-out refits of
            each form over the same held-out runs; None where the pilots are too few for the folds.
        n_held_out, n_folds: how many held-out predictions and folds those means rest on.
    """

    form: str
    chosen_by: str
    free_error: float | None = None
    tied_error: float | None = None
    n_held_out: int = 0
    n_folds: int = 0

    @property
    def auto_form(self) -> str:
        """What ``"auto"`` picks on this evidence."""
        return choose_exponents(self.free_error, self.tied_error)

    @property
    def has_evidence(self) -> bool:
        return self.free_error is not None and self.tied_error is not None

    def reason(self) -> str:
        """One line: the form used and why."""
        name = "tied (alpha = beta)" if self.form == "tied" else "free (alpha, beta)"
        if not self.has_evidence:
            why = ("too few model sizes for leave-the-largest-out folds (needs 3 left after holding out the "
                   "largest), so the free fit" if self.chosen_by == "auto" else
                   f"{'as asked' if self.chosen_by == 'given' else 'the default'}; too few model sizes to compare "
                   "the forms on leave-the-largest-out folds")
            return f"exponents: {name}, {'auto: ' if self.chosen_by == 'auto' else ''}{why}"
        errs = (f"leave-the-largest-out error free {100 * self.free_error:.2f}% vs tied {100 * self.tied_error:.2f}% "
                f"(mean over {self.n_held_out} held-out runs, {self.n_folds} folds)")
        if self.chosen_by == "auto":
            rule = ("free clearly smaller (< 0.9x tied)" if self.form == "free"
                    else "free not clearly smaller (needs < 0.9x tied); one exponent fewer")
            return f"exponents: {name}, auto: {errs}: {rule}"
        how = "as asked" if self.chosen_by == "given" else "the default"
        return f"exponents: {name}, {how}; {errs}; --exponents auto would fit {self.auto_form}"

    def as_dict(self) -> dict[str, Any]:
        return {"form": self.form, "chosen_by": self.chosen_by,
                "rule": f"tied unless the free form's leave-the-largest-out error < {CLEAR_MARGIN} x the tied form's; "
                        "free when the pilots are too few for the folds",
                "free_error": self.free_error, "tied_error": self.tied_error,
                "n_held_out": self.n_held_out, "n_folds": self.n_folds}


def compare_exponents(runs: RunSet, form: str = "auto", min_sizes: int = 3, min_runs: int = 6,
                      seed: int = 0) -> ExponentChoice:
    """Refit the leave-the-largest-out folds of :func:`calibrate_extrapolation` both ways (point fits) and choose.

    ``form`` ``"auto"`` chooses by :func:`choose_exponents`; ``"free"`` or ``"tied"`` is kept and the
    evidence recorded beside it. The errors are compared over the held-out runs both forms predicted.

    Example:
        >>> true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.45, beta=0.25)  # far from tied
        >>> N, D = (a.ravel() for a in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
        >>> from scalewatch.fitting import make_runs
        >>> choice = compare_exponents(make_runs(N, D, true.predict(N, D)))
        >>> choice.form, choice.free_error < 1e-4 < choice.tied_error
        ('free', True)
    """
    if form not in EXPONENT_FORMS:
        raise ValueError(f"exponents must be one of {', '.join(EXPONENT_FORMS)}, not {form!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bands = {tie: calibrate_extrapolation(runs, min_sizes, min_runs, n_bootstrap=0, seed=seed, tie_exponents=tie)
                 for tie in (False, True)}
    chosen_by = "auto" if form == "auto" else "given"
    if bands[False] is None or bands[True] is None:
        return ExponentChoice(form="free" if form == "auto" else form, chosen_by=chosen_by)
    key = {tie: {(h.fold, h.N, h.D): abs(h.log_error) for h in band.held_out} for tie, band in bands.items()}
    common = sorted(set(key[False]) & set(key[True]))
    if not common:
        return ExponentChoice(form="free" if form == "auto" else form, chosen_by=chosen_by)
    free = float(np.mean([key[False][k] for k in common]))
    tied = float(np.mean([key[True][k] for k in common]))
    return ExponentChoice(form=choose_exponents(free, tied) if form == "auto" else form, chosen_by=chosen_by,
                          free_error=free, tied_error=tied, n_held_out=len(common),
                          n_folds=len({k[0] for k in common}))


def fit_chinchilla_exponents(runs: RunSet, exponents: str = "auto", n_bootstrap: int = 200, seed: int = 0,
                             **kwargs: Any) -> FitResult:
    """:func:`fit_chinchilla` with the exponent form ``"free"``, ``"tied"`` or ``"auto"`` (chosen by the folds).

    ``"auto"`` fits alpha = beta unless the free form extrapolated clearly better on the pilots'
    own leave-the-largest-out folds (:func:`compare_exponents`, :func:`choose_exponents`), and the
    free form where the pilots are too few for the folds. The result's ``exponents`` (the law
    file's ``fitted_on.exponents``) records the form and the two held-out errors.

    Example:
        >>> true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.45, beta=0.25)
        >>> N, D = (a.ravel() for a in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
        >>> from scalewatch.fitting import make_runs
        >>> fit = fit_chinchilla_exponents(make_runs(N, D, true.predict(N, D)), n_bootstrap=0)
        >>> fit.exponents["form"], round(fit.law.alpha, 3)
        ('free', 0.45)
    """
    choice = compare_exponents(runs, exponents, seed=seed)
    fit = fit_chinchilla(runs, n_bootstrap=n_bootstrap, seed=seed, tie_exponents=choice.form == "tied", **kwargs)
    fit.exponents = choice.as_dict()
    return fit


@dataclass
class Prediction:
    """A predicted loss with its interval and how far from the pilots it is."""

    loss: float
    low: float
    high: float
    level: float
    distance: float
    bootstrap_low: float
    bootstrap_high: float
    calibrated: bool  # whether the interval includes the extrapolation term

    def contains(self, loss: float) -> bool:
        return self.low <= loss <= self.high


def predict_with_interval(law: ChinchillaLaw, samples: Sequence[ChinchillaLaw], band: ExtrapolationBand | None,
                          N: float, D: float, level: float = 0.95) -> Prediction:
    """The law's loss at (N, D), with the bootstrap interval widened by the extrapolation term.

    Each side: ``log(pred/end) = sqrt(h_boot**2 + (z·k·d)**2)``, ``h_boot`` that side's distance of
    the bootstrap percentile from the prediction, in log loss.

    Example:
        >>> law = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.3)
        >>> band = ExtrapolationBand(k_per_decade=0.02, N_max=1e8, C_max=1e19)
        >>> near = predict_with_interval(law, [], band, 5e7, 1e9)
        >>> far = predict_with_interval(law, [], band, 1e10, 2e11)
        >>> near.high == near.loss, far.high > far.loss * 1.05
        (True, True)
    """
    with np.errstate(all="ignore"):
        vals = [float(s.predict(N, D)) for s in samples]
    return widened_interval(float(law.predict(N, D)), vals, band, N, D, level)


def widened_interval(pred: float, sample_values: Sequence[float], band: ExtrapolationBand | None, N: float, D: float,
                     level: float = 0.95) -> Prediction:
    """A predicted loss ``pred`` with the percentile interval of ``sample_values`` (the same quantity under each
    bootstrap law) widened by the extrapolation term at (N, D), as :func:`predict_with_interval` does; for a
    quantity other than the law's own L(N, D), e.g. a data-constrained plan's loss.

    Example:
        >>> band = ExtrapolationBand(k_per_decade=0.02, N_max=1e8, C_max=1e19)
        >>> p = widened_interval(2.0, [1.99, 2.0, 2.01], band, 1e10, 2e11)
        >>> p.bootstrap_high < 2.02 < p.high
        True
    """
    q = (1.0 - level) / 2.0
    vals = np.asarray(sample_values, dtype=float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    b_lo, b_hi = (float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))) if vals.size else (pred, pred)
    h_lo, h_hi = max(math.log(pred / b_lo), 0.0), max(math.log(b_hi / pred), 0.0)
    dist = float(band.distance(N, D)) if band is not None else float("nan")
    extra = band.quantile(level) * band.k_per_decade * dist if band is not None else 0.0
    return Prediction(loss=pred, low=pred * math.exp(-math.hypot(h_lo, extra)),
                      high=pred * math.exp(math.hypot(h_hi, extra)), level=level, distance=dist,
                      bootstrap_low=b_lo, bootstrap_high=b_hi, calibrated=band is not None)


__all__ = ["ExponentChoice", "ExtrapolationBand", "HeldOut", "Prediction", "calibrate_extrapolation",
           "choose_exponents", "compare_exponents", "distance_decades", "fit_chinchilla_exponents",
           "predict_with_interval", "widened_interval"]
