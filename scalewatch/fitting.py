"""Fitting scaling laws to the team's pilot runs.

* :func:`fit_chinchilla` — Hoffmann et al.'s Approach 3 done right: the SUM of
  Huber losses (delta 1e-3) on log residuals of the log-sum-exp form. Global
  search by variable projection (for fixed alpha, beta the law is linear in
  E, A, B: a non-negative least-squares solve), then a trust-region solve of the
  exact summed-Huber objective from the best starts; bootstrap intervals.
  With ``tie_exponents=True`` the fit has alpha = beta (one exponent, four parameters), the form
  Muennighoff et al. 2023 and Gadre et al. 2024 fit; see :func:`fit_chinchilla`.
* :func:`approach1` (lower envelope per compute budget) and :func:`approach2`
  (IsoFLOP parabolas) give ``N_opt ∝ C**a`` with bootstrap intervals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares, nnls

from scalewatch.laws import ChinchillaLaw, DataConstrainedLaw, LawRecord, interval

HUBER_DELTA = 1e-3
_GRID = np.linspace(0.02, 2.0, 34)


class FitError(ValueError):
    """Input a law cannot be fitted to; the message is one line naming the problem."""


@dataclass
class RunSet:
    """Final points of pilot runs: parameters N, training tokens D, loss L (and unique tokens U)."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    U: np.ndarray | None = None
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.L)

    def subset(self, idx: np.ndarray) -> RunSet:
        return RunSet(self.N[idx], self.D[idx], self.L[idx], None if self.U is None else self.U[idx],
                      [self.names[i] for i in idx] if self.names else [])


def make_runs(N: ArrayLike, D: ArrayLike, L: ArrayLike, U: ArrayLike | None = None,
              names: list[str] | None = None, min_runs: int = 1) -> RunSet:
    """Validate pilot-run data; raise :class:`FitError` naming the bad rows.

    Duplicated rows raise a warning (they weigh double in the fit), not an error.

    Example:
        >>> make_runs([1e8, 2e8], [2e9, 4e9], [3.1, 2.9]).N
        array([1.e+08, 2.e+08])
    """
    arrays = {k: np.asarray(v, dtype=float).ravel() for k, v in (("N", N), ("D", D), ("loss", L))}
    n = len(arrays["loss"])
    names = names or [f"row {i + 1}" for i in range(n)]
    for key, arr in arrays.items():
        if len(arr) != n:
            raise FitError(f"{key} has {len(arr)} values but loss has {n}")
        bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
        if bad.size:
            rows = ", ".join(names[i] for i in bad[:5]) + (" ..." if bad.size > 5 else "")
            raise FitError(f"{key} must be positive and finite; bad at {rows}")
    u = None
    if U is not None:
        u = np.asarray(U, dtype=float).ravel()
        bad = np.flatnonzero(~np.isfinite(u) | (u <= 0))
        if bad.size:
            raise FitError(f"unique tokens must be positive and finite; bad at {', '.join(names[i] for i in bad[:5])}")
    if n < min_runs:
        raise FitError(f"{n} runs cannot determine {min_runs - 1} parameters; add runs (at least {min_runs})")
    key = np.stack([arrays["N"], arrays["D"], arrays["loss"]], axis=1)
    _, first, counts = np.unique(key, axis=0, return_index=True, return_counts=True)
    dups = [names[i] for i, c in zip(first, counts) if c > 1]
    if dups:
        warnings.warn(f"duplicated rows (same N, D and loss) count more than once in the fit: {', '.join(dups[:5])}",
                      stacklevel=2)
    return RunSet(arrays["N"], arrays["D"], arrays["loss"], u, list(names))


# --------------------------------------------------------------- Approach 3
def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                    delta: float = HUBER_DELTA) -> float:
    """Sum (not mean) of Huber losses of ``LSE(a - alpha·log N, b - beta·log D, e) - log L``."""
    a, b, e, alpha, beta = theta
    pred = np.logaddexp(np.logaddexp(a - alpha * logN, b - beta * logD), e)
    return float(np.sum(_huber(pred - logL, delta)))


def _residuals_and_jac(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray):
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    pred = m + np.log(s)
    w /= s
    jac = np.stack([w[0], w[1], w[2], -w[0] * logN, -w[1] * logD], axis=1)
    return pred - logL, jac


def _vp_starts(logN: np.ndarray, logD: np.ndarray, L: np.ndarray, k: int, tied: bool = False) -> list[np.ndarray]:
    """Variable projection over an (alpha, beta) grid (its diagonal when tied); the k best starting points."""
    if tied:
        al = be = np.linspace(_GRID[0], _GRID[-1], 4 * len(_GRID))
    else:
        al, be = np.meshgrid(_GRID, _GRID, indexing="ij")
        al, be = al.ravel(), be.ravel()
    x = np.exp(-al[:, None] * logN[None, :])  # N^-alpha  [G, n]
    y = np.exp(-be[:, None] * logD[None, :])
    inv = 1.0 / L
    # Relative residuals (E + A x + B y)/L - 1 ≈ log residuals: weighted linear least squares.
    X = np.stack([np.broadcast_to(inv, x.shape), x * inv, y * inv], axis=2)  # [G, n, 3]
    XtX = np.einsum("gni,gnj->gij", X, X)
    Xty = X.sum(axis=1)
    with np.errstate(all="ignore"):
        try:
            coef = np.linalg.solve(XtX + 1e-300 * np.eye(3), Xty[..., None])[..., 0]
        except np.linalg.LinAlgError:
            coef = np.full((len(al), 3), -1.0)
    bad = ~np.all(np.isfinite(coef) & (coef >= 0), axis=1)
    for g in np.flatnonzero(bad):
        coef[g], _ = nnls(X[g], np.ones(len(L)), maxiter=100)
    floor = 1e-9 * float(L.min())
    coef = np.maximum(coef, floor)
    with np.errstate(all="ignore"):
        pred = coef[:, :1] + coef[:, 1:2] * x + coef[:, 2:3] * y
        obj = _huber(np.log(pred) - np.log(L)[None, :], HUBER_DELTA).sum(axis=1)
    obj[~np.isfinite(obj)] = np.inf
    order = np.argsort(obj)[:k]
    return [np.array([math.log(coef[g, 1]), math.log(coef[g, 2]), math.log(coef[g, 0]), al[g], be[g]])
            for g in order]


def _tie_jac(J: np.ndarray) -> np.ndarray:
    """Jacobian in (a, b, e, eta) from the one in (a, b, e, alpha, beta) when alpha = beta = eta."""
    return np.concatenate([J[..., :3], J[..., 3:4] + J[..., 4:5]], axis=-1)


def _untie(x: np.ndarray) -> np.ndarray:
    """(a, b, e, eta) -> (a, b, e, eta, eta)."""
    return np.concatenate([x[..., :4], x[..., 3:4]], axis=-1)


def _local_fit(theta0: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float,
               tied: bool = False):
    if tied:
        return _local_fit_tied(theta0, logN, logD, logL, delta)
    # least_squares with loss="huber", f_scale=delta minimises 2 * sum(Huber_delta(r)): the exact
    # summed objective, solved by a trust-region Gauss-Newton method (robust to the bad conditioning
    # that makes L-BFGS stop early on this problem).
    def fun(th):
        return _residuals_and_jac(th, logN, logD, logL)[0]

    def jac(th):
        return _residuals_and_jac(th, logN, logD, logL)[1]

    lower = np.array([-np.inf, -np.inf, -np.inf, 0.0, 0.0])
    upper = np.array([np.inf, np.inf, np.inf, 5.0, 5.0])
    theta0 = np.clip(theta0, lower + 1e-9, upper - 1e-9)
    return least_squares(fun, theta0, jac=jac, loss="huber", f_scale=delta, method="trf",
                         bounds=(lower, upper), x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)


def _local_fit_tied(theta0: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """:func:`_local_fit` with alpha = beta: solved in (a, b, e, eta); ``.x`` is returned untied (5 values)."""
    def fun(th):
        return _residuals_and_jac(_untie(th), logN, logD, logL)[0]

    def jac(th):
        return _tie_jac(_residuals_and_jac(_untie(th), logN, logD, logL)[1])

    lower = np.array([-np.inf, -np.inf, -np.inf, 0.0])
    upper = np.array([np.inf, np.inf, np.inf, 5.0])
    start = np.asarray(theta0, dtype=float)[:4].copy()
    start[3] = 0.5 * (theta0[3] + theta0[4])
    start = np.clip(start, lower + 1e-9, upper - 1e-9)
    res = least_squares(fun, start, jac=jac, loss="huber", f_scale=delta, method="trf", bounds=(lower, upper),
                        x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)
    res.x = _untie(res.x)
    return res


def _fit_theta(logN, logD, L, delta: float, extra_starts=(), k: int = 4, tied: bool = False):
    logL = np.log(L)
    starts = _vp_starts(logN, logD, L, k, tied) + [np.asarray(s) for s in extra_starts]
    best = None
    for s in starts:
        res = _local_fit(s, logN, logD, logL, delta, tied)
        if best is None or res.cost < best.cost:
            best = res
    return best


# ------------------------------------------------------------ bootstrap
_LOWER = np.array([-np.inf, -np.inf, -np.inf, 0.0, 0.0])
_UPPER = np.array([np.inf, np.inf, np.inf, 5.0, 5.0])


def bootstrap_indices(n: int, n_bootstrap: int, seed: int, logN: np.ndarray, logD: np.ndarray) -> list[np.ndarray]:
    """Resampled row indices, skipping resamples with a single N or a single D (exponent undetermined).

    The random stream is the one :func:`fit_chinchilla` has always used, so a seed gives the same
    resamples as before.

    Example:
        >>> idx = bootstrap_indices(4, 3, 0, np.log([1., 2., 3., 4.]), np.log([4., 3., 2., 1.]))
        >>> len(idx), idx[0].shape
        (3, (4,))
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        if np.unique(logN[idx]).size < 2 or np.unique(logD[idx]).size < 2:
            continue
        out.append(idx)
    return out


def _batch_residuals(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray):
    """Log residuals ``[B, n]`` and their Jacobian ``[B, n, 5]`` for B parameter vectors at once."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    t0, t1 = a - alpha * logN, b - beta * logD
    t2 = np.broadcast_to(e, t0.shape)
    m = np.maximum(np.maximum(t0, t1), t2)
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(t2 - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - logL
    w0, w1, w2 = w0 / s, w1 / s, w2 / s
    return r, np.stack([w0, w1, w2, -w0 * logN, -w1 * logD], axis=2)


def _batch_objective(r: np.ndarray, weights: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        f = (weights * _huber(r, delta)).sum(axis=1)
    return np.where(np.isfinite(f), f, np.inf)


def _batch_huber_lm(theta0: np.ndarray, weights: np.ndarray, logN: np.ndarray, logD: np.ndarray,
                    logL: np.ndarray, delta: float, max_iter: int = 500,
                    tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``sum_i w_bi·Huber(r_i(theta_b))`` for every row b of ``weights`` together.

    Levenberg-Marquardt on the exact Gauss-Newton model of the Huber sum (curvature from the
    residuals inside the quadratic zone, as scipy's ``least_squares(loss="huber")`` uses), damped
    along the diagonal of the reweighted (IRLS) curvature, which stays positive when few residuals
    are inside the zone. All resamples share the runs, so one einsum does every resample's
    normal equations. With ``tied`` the steps are taken in (a, b, e, eta), alpha = beta = eta.
    Returns the solutions (always 5 values a row) and which rows converged.
    """
    B = weights.shape[0]
    th = np.tile(np.asarray(theta0, dtype=float), (B, 1))
    r, J = _batch_residuals(th, logN, logD, logL)
    F = _batch_objective(r, weights, delta)
    lam = np.full(B, 1e-3)
    active = np.ones(B, dtype=bool)
    converged = np.zeros(B, dtype=bool)
    eye = np.eye(4 if tied else 5)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        w, ra, Ja = weights[idx], r[idx], J[idx]
        if tied:
            Ja = _tie_jac(Ja)
        absr = np.abs(ra)
        grad = np.einsum("bn,bni->bi", w * np.clip(ra, -delta, delta), Ja)
        hess = np.einsum("bn,bni,bnj->bij", w * (absr <= delta), Ja, Ja)
        irls = w * np.minimum(1.0, delta / np.maximum(absr, 1e-300))
        damp = np.einsum("bn,bni->bi", irls, Ja * Ja) + 1e-300
        system = hess + (lam[idx, None] * damp)[:, :, None] * eye
        with np.errstate(all="ignore"):
            try:
                step = -np.linalg.solve(system, grad[..., None])[..., 0]
            except np.linalg.LinAlgError:  # a singular system in the batch: solve one by one
                step = np.stack([np.linalg.lstsq(A, -g, rcond=None)[0] for A, g in zip(system, grad)])
            if tied:
                step = _untie(step)
            trial = np.clip(th[idx] + step, _LOWER, _UPPER)
            r_new, J_new = _batch_residuals(trial, logN, logD, logL)
        F_new = _batch_objective(r_new, w, delta)
        ok = np.isfinite(step).all(axis=1) & (F_new < F[idx])
        rel_gain = (F[idx] - F_new) / np.maximum(F[idx], 1e-300)
        acc = idx[ok]
        th[acc], r[acc], J[acc], F[acc] = trial[ok], r_new[ok], J_new[ok], F_new[ok]
        lam[idx] = np.where(ok, lam[idx] / 3.0, lam[idx] * 4.0)
        done = (ok & (rel_gain < 1e-13)) | (lam[idx] > 1e10)
        converged[idx[done]] = True
        active[idx[done]] = False
    return th, converged


def bootstrap_thetas(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                     resamples: list[np.ndarray], delta: float = HUBER_DELTA, chunk_cells: int = 2_000_000,
                     tied: bool = False) -> np.ndarray:
    """Refit every resample from the full-data solution ``theta``; ``[len(resamples), 5]`` thetas.

    A resample is the same runs with integer weights (how often each was drawn), so the fits are
    solved together by :func:`_batch_huber_lm` (in chunks of ``chunk_cells`` resample x run cells
    to bound memory). The global grid search is not repeated per resample: the full-data optimum is
    the start. A resample the batched solver did not settle falls back to scipy's trust-region
    solve from the same start.

    Example:
        >>> true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.3)
        >>> N, D = (a.ravel() for a in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
        >>> lN, lD, lL = np.log(N), np.log(D), np.log(true.predict(N, D))
        >>> th = np.array([math.log(400.0), math.log(1500.0), math.log(1.8), 0.34, 0.3])
        >>> out = bootstrap_thetas(th, lN, lD, lL, bootstrap_indices(25, 4, 0, lN, lD))
        >>> out.shape, bool(np.allclose(out[:, 3], 0.34))
        ((4, 5), True)
    """
    n = len(logL)
    if not resamples:
        return np.empty((0, 5))
    weights = np.stack([np.bincount(idx, minlength=n) for idx in resamples]).astype(float)
    out = np.empty((len(resamples), 5))
    step = max(1, chunk_cells // max(n, 1))
    for lo in range(0, len(resamples), step):
        th, ok = _batch_huber_lm(theta, weights[lo:lo + step], logN, logD, logL, delta, tied=tied)
        for j in np.flatnonzero(~ok):
            idx = resamples[lo + j]
            th[j] = _local_fit(theta, logN[idx], logD[idx], logL[idx], delta, tied).x
        out[lo:lo + step] = th
    return out


@dataclass
class ResidualStats:
    """Fit quality on log residuals (predicted minus observed log loss)."""

    rmse: float
    mean: float
    max_abs: float
    r2: float
    huber_sum: float

    def as_dict(self) -> dict[str, float]:
        return {"rmse_log": self.rmse, "mean_log": self.mean, "max_abs_log": self.max_abs, "r2_log": self.r2,
                "huber_sum": self.huber_sum}


@dataclass
class FitResult:
    """A fitted law with its uncertainty and fit quality (``scipy.optimize``-style result).

    Attributes:
        law: the best-fit law.
        ci95: 95% bootstrap percentile interval per parameter.
        samples: bootstrap parameter vectors ``[n_boot, 5]`` in ``E, A, B, alpha, beta`` order.
        residuals: log-residual statistics on the fitted runs.
        converged: whether the optimiser reported convergence.
        message: the optimiser's message.
        n_runs: runs fitted.
        N_range, D_range: extent of the data.
        method: what was done.
        tie_exponents: whether alpha = beta was imposed.
        exponents: which exponent form was fitted and why (``form``, ``chosen_by``, the two forms'
            leave-the-largest-out errors), when it was chosen (see
            :func:`scalewatch.extrapolation.fit_chinchilla_exponents`); written to ``fitted_on.exponents``.
    """

    law: ChinchillaLaw
    ci95: dict[str, tuple[float, float]]
    samples: np.ndarray
    residuals: ResidualStats
    converged: bool
    message: str
    n_runs: int
    N_range: tuple[float, float]
    D_range: tuple[float, float]
    method: str
    tie_exponents: bool = False
    exponents: dict[str, Any] | None = None  # which form and why, when chosen by the CLI or exponents="auto"

    def to_record(self, conventions: dict[str, str] | None = None) -> LawRecord:
        law = self.law if conventions is None else ChinchillaLaw(**self.law.params(), conventions=conventions)
        return LawRecord(
            law=law, ci95=self.ci95, samples=[list(map(float, r)) for r in self.samples],
            fitted_on={"n_runs": self.n_runs, "N_range": list(self.N_range), "D_range": list(self.D_range),
                       "method": self.method, **({"tie_exponents": True} if self.tie_exponents else {}),
                       **({"exponents": self.exponents} if self.exponents else {}),
                       "converged": self.converged, "message": self.message,
                       **self.residuals.as_dict()},
        )


def _theta_to_params(theta: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([math.exp(e), math.exp(a), math.exp(b), alpha, beta])


def fit_chinchilla(runs: RunSet, n_bootstrap: int = 200, delta: float = HUBER_DELTA, seed: int = 0,
                   tie_exponents: bool = False) -> FitResult:
    """Fit ``L = E + A/N**alpha + B/D**beta`` to pilot runs (Approach 3), with bootstrap intervals.

    ``tie_exponents=True`` fits alpha = beta (E, A, B and one exponent), the form Muennighoff et al.
    2023 fitted for their published law and Gadre et al. 2024 build their over-training law on
    (for a fixed tokens-per-parameter ratio it makes the loss a pure power law in compute). One
    exponent fewer to pin down: it pays off when predicting sizes or budgets well beyond the pilots
    (see the README's benchmark), at some cost in fit near them when the true exponents differ.
    The law file still stores alpha and beta (equal); ``fitted_on.tie_exponents`` says it was tied.
    To let the pilots choose (``exponents="auto"``), see
    :func:`scalewatch.extrapolation.fit_chinchilla_exponents`.

    Example:
        >>> import numpy as np
        >>> true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.3)
        >>> N, D = np.meshgrid(np.logspace(7, 9, 6), np.logspace(9, 11, 6))
        >>> runs = make_runs(N.ravel(), D.ravel(), true.predict(N.ravel(), D.ravel()))
        >>> round(fit_chinchilla(runs, n_bootstrap=0).law.alpha, 4)
        0.34
        >>> tied = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.33, beta=0.33)
        >>> runs = make_runs(N.ravel(), D.ravel(), tied.predict(N.ravel(), D.ravel()))
        >>> fit = fit_chinchilla(runs, n_bootstrap=0, tie_exponents=True).law
        >>> round(fit.alpha, 4), fit.alpha == fit.beta
        (0.33, True)
    """
    n_params = 4 if tie_exponents else 5
    if len(runs) < n_params + 1:
        raise FitError(f"{len(runs)} runs cannot determine the {n_params} parameters of L(N, D); add runs "
                       f"(at least {n_params + 1})")
    for name, arr in (("N", runs.N), ("D", runs.D)):
        if np.unique(np.round(np.log(arr), 9)).size < 2:
            raise FitError(f"all runs have the same {name} = {arr[0]:.4g}; vary {name} across runs to fit its exponent")
    logN, logD = np.log(runs.N), np.log(runs.D)
    best = _fit_theta(logN, logD, runs.L, delta, tied=tie_exponents)
    theta = best.x
    params = _theta_to_params(theta)
    law = ChinchillaLaw(*(float(p) for p in params))
    logL = np.log(runs.L)
    r = _residuals_and_jac(theta, logN, logD, logL)[0]
    ss_tot = float(np.sum((logL - logL.mean()) ** 2))
    stats = ResidualStats(rmse=float(np.sqrt(np.mean(r * r))), mean=float(np.mean(r)),
                          max_abs=float(np.max(np.abs(r))),
                          r2=1.0 - float(np.sum(r * r)) / ss_tot if ss_tot > 0 else math.nan,
                          huber_sum=huber_objective(theta, logN, logD, logL, delta))

    n = len(runs)
    resamples = bootstrap_indices(n, n_bootstrap, seed, logN, logD)
    thetas = bootstrap_thetas(theta, logN, logD, logL, resamples, delta, tied=tie_exponents)
    with np.errstate(over="ignore"):
        samples = [p for p in map(_theta_to_params, thetas) if np.all(np.isfinite(p))]
    samples_arr = np.array(samples) if samples else np.empty((0, 5))
    ci = {name: interval(samples_arr[:, i]) for i, name in enumerate(ChinchillaLaw.param_names)} if samples else {}
    converged = bool(best.success) and best.status > 0
    return FitResult(law=law, ci95=ci, samples=samples_arr, residuals=stats, converged=converged,
                     message=str(best.message), n_runs=n,
                     N_range=(float(runs.N.min()), float(runs.N.max())),
                     D_range=(float(runs.D.min()), float(runs.D.max())),
                     tie_exponents=tie_exponents,
                     method=(f"approach 3{', alpha = beta tied' if tie_exponents else ''}: sum of Huber(delta={delta:g}) on log residuals, variable-projection grid "
                             f"+ trust-region refinement; {len(samples)} bootstrap resamples, each warm-started from "
                             "the full-data fit"))


# ------------------------------------------------------- Approaches 1 and 2
@dataclass
class PowerLawFit:
    """``N_opt = k·C**a`` (and ``D_opt ∝ C**(1-a)`` under C = 6ND) with a 95% interval on ``a``."""

    exponent: float
    ci95: tuple[float, float]
    coefficient: float
    points: list[tuple[float, float]]  # (C, N_opt) used in the regression
    method: str

    @property
    def d_exponent(self) -> float:
        return 1.0 - self.exponent

    def n_opt(self, flops: float) -> float:
        return self.coefficient * flops**self.exponent

    def as_dict(self) -> dict[str, Any]:
        return {"exponent_a": self.exponent, "ci95": list(self.ci95), "d_exponent_b": self.d_exponent,
                "coefficient": self.coefficient, "n_points": len(self.points), "method": self.method}


def _group_by(values: np.ndarray, rel_tol: float) -> list[np.ndarray]:
    order = np.argsort(values)
    groups: list[list[int]] = []
    for i in order:
        if groups and values[i] <= values[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def _profiles(runs: RunSet, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loss of each model size at each compute budget, interpolated along its runs in log D.

    Each run is treated as the end point of a schedule-complete run, so the points of one
    N trace that size's loss against D. Returns (sizes [m], losses [len(budgets), m], nan
    where the budget is outside the size's runs).
    """
    groups = _group_by(runs.N, 0.02)
    sizes = np.array([float(np.exp(np.mean(np.log(runs.N[g])))) for g in groups])
    out = np.full((len(budgets), len(groups)), np.nan)
    for j, g in enumerate(groups):
        if len(g) < 2:
            continue
        order = np.argsort(runs.D[g])
        ld, ll = np.log(runs.D[g][order]), np.log(runs.L[g][order])
        ld, keep = np.unique(ld, return_index=True)
        ll = ll[keep]
        if ld.size < 2:
            continue
        target = np.log(budgets / (6.0 * sizes[j]))
        inside = (target >= ld[0]) & (target <= ld[-1])
        out[inside, j] = np.exp(np.interp(target[inside], ld, ll))
    return sizes, out


# IsoFLOP budgets: runs within 5% of each other's compute are one budget. Budgets read off a figure or rounded
# in a table (a few % apart within one budget) leave that in pieces: neighbouring groups closer than
# ISOFLOP_GAP decades are merged where no model size is in both (one budget trains each size once; distinct
# budgets of one design reuse the sizes) and the result spans at most ISOFLOP_MAX_SPAN decades.
ISOFLOP_GAP = 0.1
ISOFLOP_MAX_SPAN = 0.3


def budget_groups(C: np.ndarray, N: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of the runs at each IsoFLOP budget, in increasing compute (see :data:`ISOFLOP_GAP`); without ``N``
    every 5% group is a budget.

    Example:
        >>> C = np.array([1.0e19, 1.06e19, 0.95e19, 3.0e19, 2.8e19, 3.1e19])   # two budgets, jittered
        >>> N = np.array([1e8, 2e8, 4e8, 1e8, 2e8, 4e8])
        >>> [sorted(g.tolist()) for g in budget_groups(C, N)]
        [[0, 1, 2], [3, 4, 5]]
        >>> C = np.repeat([1e19, 1.2e19, 1.44e19], 3); N = np.tile([1e8, 2e8, 4e8], 3)   # exact, 1.2x apart
        >>> len(budget_groups(C, N))
        3
    """
    C = np.asarray(C, dtype=float)
    groups = _group_by(C, 0.05)
    if N is None or not groups:
        return groups
    logc, logn = np.log10(C), np.log(np.asarray(N, dtype=float))

    def shares_size(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.any(np.abs(logn[a][:, None] - logn[b][None, :]) < math.log(1.05)))

    out = [groups[0]]
    for g in groups[1:]:
        prev = out[-1]
        merged = np.concatenate([prev, g])
        if logc[g].min() - logc[prev].max() <= ISOFLOP_GAP and not shares_size(prev, g) \
                and logc[merged].max() - logc[merged].min() <= ISOFLOP_MAX_SPAN:
            out[-1] = merged
        else:
            out.append(g)
    return out


def _isoflop_groups(runs: RunSet) -> list[np.ndarray]:
    C = 6 * runs.N * runs.D
    return [g for g in budget_groups(C, runs.N) if np.unique(np.round(np.log(runs.N[g]), 6)).size >= 3]


def _budgets(runs: RunSet, per_decade: int = 4) -> np.ndarray:
    C = 6 * runs.N * runs.D
    lo, hi = np.log10(C.min()), np.log10(C.max())
    return np.logspace(lo, hi, max(int((hi - lo) * per_decade) + 1, 3))


def _regress(points: list[tuple[float, float]]) -> tuple[float, float]:
    c, n = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    a, b = np.polyfit(c, n, 1)
    return float(a), float(math.exp(b))


def _bootstrap_exponent(runs: RunSet, estimate, n_bootstrap: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(runs), len(runs))
        try:
            pts = estimate(runs.subset(idx))
            if len(pts) >= 2:
                vals.append(_regress(pts)[0])
        except (FitError, ValueError, np.linalg.LinAlgError):
            continue
    return interval(vals)


def _envelope_points(runs: RunSet) -> list[tuple[float, float]]:
    budgets = _budgets(runs)
    sizes, losses = _profiles(runs, budgets)
    pts = []
    for i, c in enumerate(budgets):
        row = losses[i]
        ok = np.isfinite(row)
        if ok.sum() < 3:
            continue
        j = int(np.nanargmin(row))
        covered = np.flatnonzero(ok)
        # A minimum at the edge of the sizes that reach this budget is censored, not an optimum.
        if j in (covered[0], covered[-1]):
            continue
        pts.append((float(c), float(sizes[j])))
    if len(pts) >= 2:
        return pts
    # No size has runs at several D (an IsoFLOP design): the envelope is the best run per budget.
    pts = []
    for g in _isoflop_groups(runs):
        order = np.argsort(runs.N[g])
        j = int(np.argmin(runs.L[g][order]))
        if 0 < j < len(g) - 1:
            pts.append((float(np.exp(np.mean(np.log(6 * runs.N[g] * runs.D[g])))), float(runs.N[g][order][j])))
    return pts


def approach1(runs: RunSet, n_bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Approach 1: the lower envelope of loss over model sizes at each compute budget.

    Each size's runs are interpolated in log D to the budget; the size with the lowest
    loss is N_opt(C); ``log N_opt`` is regressed on ``log C``.
    """
    # Approach 1 traces each size's loss along its own runs at several token counts (Hoffmann et al.: each
    # size's training curves). A table of about one run per (N, budget), such as IsoFLOP profiles, gives a size
    # a point or two: the envelope then rests on coarse interpolations (the digitised Chinchilla IsoFLOP runs,
    # a median of 2 token counts per size: a = 0.13, CI 0.04-0.90) and its exponent means little. A median below
    # 4 token counts per size says so (the fit still runs); per-size sweeps have more (datablations: 7).
    groups = _group_by(runs.N, 0.02)
    per_size = float(np.median([np.unique(np.round(np.log(runs.D[g]), 6)).size for g in groups]))
    if per_size < 4:
        warnings.warn(f"approach 1 needs several runs per model size spanning the compute budgets (each size's loss "
                      f"against D); these {len(groups)} sizes have a median of {per_size:g} token counts each, so its "
                      "exponent means little here: for one run per (N, budget) use --method 2 (IsoFLOP parabolas) "
                      "or 3", stacklevel=2)
    pts = _envelope_points(runs)
    if len(pts) < 2:
        raise FitError("approach 1 needs compute budgets reached by at least 3 model sizes with an interior "
                       "minimum; add runs that bracket the optimum")
    a, k = _regress(pts)
    ci = _bootstrap_exponent(runs, _envelope_points, n_bootstrap, seed)
    return PowerLawFit(exponent=a, ci95=ci, coefficient=k, points=pts,
                       method="approach 1: lower envelope of interpolated loss per compute budget")


def _parabola_vertex(logn: np.ndarray, loss: np.ndarray) -> float | None:
    if np.unique(logn).size < 3:
        return None
    c2, c1, _ = np.polyfit(logn, loss, 2)
    if c2 <= 0:
        return None
    v = -c1 / (2 * c2)
    span = logn.max() - logn.min()
    if v < logn.min() - 0.25 * span or v > logn.max() + 0.25 * span:
        return None
    return float(v)


def _isoflop_points(runs: RunSet) -> tuple[list[tuple[float, float]], str]:
    groups = _isoflop_groups(runs)
    pts: list[tuple[float, float]] = []
    if len(groups) >= 2:
        for g in groups:
            v = _parabola_vertex(np.log(runs.N[g]), runs.L[g])
            if v is not None:
                pts.append((float(np.exp(np.mean(np.log(6 * runs.N[g] * runs.D[g])))), math.exp(v)))
        return pts, "IsoFLOP groups of runs"
    budgets = _budgets(runs)
    sizes, losses = _profiles(runs, budgets)
    for i, c in enumerate(budgets):
        ok = np.isfinite(losses[i])
        if ok.sum() < 3:
            continue
        v = _parabola_vertex(np.log(sizes[ok]), losses[i][ok])
        if v is not None:
            pts.append((float(c), math.exp(v)))
    return pts, "IsoFLOP profiles interpolated from each size's runs"


def approach2(runs: RunSet, n_bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Approach 2: a parabola of loss against log N at each compute budget; its minimum is N_opt(C).

    Uses the runs' own IsoFLOP groups (:func:`budget_groups`, at least 3 sizes) when
    there are two or more; otherwise IsoFLOP profiles interpolated from each size's runs.
    """
    pts, how = _isoflop_points(runs)
    if len(pts) < 2:
        raise FitError("approach 2 needs at least 2 compute budgets with 3 or more model sizes whose losses "
                       "curve upward around a minimum; add runs that bracket the optimum")
    if len(pts) < 3:  # a line through two points: its slope has no check, and the bootstrap interval is lopsided
        warnings.warn(f"approach 2 found only {len(pts)} compute budgets with 3+ model sizes around a minimum: the "
                      "exponent is a line through them; add runs at more budgets (or use Approach 3, the default)",
                      stacklevel=2)
    a, k = _regress(pts)
    ci = _bootstrap_exponent(runs, lambda r: _isoflop_points(r)[0], n_bootstrap, seed)
    return PowerLawFit(exponent=a, ci95=ci, coefficient=k, points=pts, method=f"approach 2: {how}")


# ------------------------------------------------------ data-constrained law
_DC_NAMES = DataConstrainedLaw.param_names  # E, A, B, alpha, beta, R_D, R_N


def _dc_law(theta: np.ndarray, base: ChinchillaLaw | None) -> DataConstrainedLaw:
    """theta = (a, b, e, alpha, beta, log R_D, log R_N), or (log R_D, log R_N) with a fixed base."""
    if base is not None:
        return DataConstrainedLaw(base.E, base.A, base.B, base.alpha, base.beta,
                                  R_D=math.exp(theta[0]), R_N=math.exp(theta[1]))
    a, b, e, alpha, beta, rd, rn = theta
    return DataConstrainedLaw(math.exp(e), math.exp(a), math.exp(b), alpha, beta, R_D=math.exp(rd), R_N=math.exp(rn))


def _dc_residuals(theta: np.ndarray, runs: RunSet, base: ChinchillaLaw | None) -> np.ndarray:
    law = _dc_law(theta, base)
    with np.errstate(all="ignore"):
        n_eff = law.effective_params(runs.N, runs.U)
        d_eff = law.effective_tokens(runs.D, runs.U)
        t = np.stack([math.log(law.A) - law.alpha * np.log(n_eff), math.log(law.B) - law.beta * np.log(d_eff),
                      np.full(len(runs), math.log(law.E))])
        r = np.logaddexp(np.logaddexp(t[0], t[1]), t[2]) - np.log(runs.L)
    return np.where(np.isfinite(r), r, 1e3)


def _dc_local(theta0: np.ndarray, runs: RunSet, base: ChinchillaLaw | None, delta: float):
    lo_r, hi_r = math.log(1e-2), math.log(1e4)
    if base is None:
        lower = np.array([-np.inf, -np.inf, -np.inf, 0.0, 0.0, lo_r, lo_r])
        upper = np.array([np.inf, np.inf, np.inf, 5.0, 5.0, hi_r, hi_r])
    else:
        lower, upper = np.array([lo_r, lo_r]), np.array([hi_r, hi_r])
    theta0 = np.clip(theta0, lower + 1e-9, upper - 1e-9)
    return least_squares(_dc_residuals, theta0, args=(runs, base), loss="huber", f_scale=delta, method="trf",
                         bounds=(lower, upper), x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=3000)


@dataclass
class DataConstrainedFit:
    """A fitted :class:`~scalewatch.laws.DataConstrainedLaw` with bootstrap intervals.

    Attributes:
        law: the best fit (R_D and R_N are Muennighoff et al.'s R*_D and R*_N).
        ci95: 95% bootstrap percentile interval per parameter.
        samples: bootstrap rows ``[n_boot, 7]`` in ``E, A, B, alpha, beta, R_D, R_N`` order.
        residuals: log-residual statistics on the fitted runs.
        base_fixed: whether E, A, B, alpha, beta were given by the caller (only R*_D, R*_N fitted).
        two_stage: whether the base was fitted here first, on the single-epoch runs, then held fixed.
    """

    law: DataConstrainedLaw
    ci95: dict[str, tuple[float, float]]
    samples: np.ndarray
    residuals: ResidualStats
    converged: bool
    message: str
    n_runs: int
    n_repeated: int
    base_fixed: bool
    method: str
    two_stage: bool = False

    def to_record(self) -> LawRecord:
        return LawRecord(law=self.law, ci95=self.ci95, samples=[list(map(float, r)) for r in self.samples],
                         fitted_on={"n_runs": self.n_runs, "n_repeated_runs": self.n_repeated,
                                    "base_fixed": self.base_fixed, "method": self.method,
                                    **({"two_stage": True} if self.two_stage else {}),
                                    "converged": self.converged, "message": self.message,
                                    **self.residuals.as_dict()})


def _single_epoch(runs: RunSet) -> RunSet:
    """The runs that see each token at most once (tokens <= unique tokens): the data-constrained law's base."""
    return runs.subset(np.flatnonzero(runs.D <= runs.U * (1 + 1e-9)))


def _can_fit_base(runs: RunSet, tie_exponents: bool) -> bool:
    """Enough runs for a Chinchilla fit (one more than its parameters), at 2+ sizes and 2+ token counts."""
    return len(runs) >= (5 if tie_exponents else 6) and np.unique(runs.N).size >= 2 and np.unique(runs.D).size >= 2


def _fit_base(runs: RunSet, delta: float, tie_exponents: bool) -> ChinchillaLaw:
    """Stage one of the two-stage fit: a point fit of the base law (its warnings are the fitter's own business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_chinchilla(runs, n_bootstrap=0, delta=delta, tie_exponents=tie_exponents).law


def fit_data_constrained(runs: RunSet, base: ChinchillaLaw | None = None, n_bootstrap: int = 200,
                         delta: float = HUBER_DELTA, seed: int = 0, two_stage: bool = False,
                         tie_exponents: bool = False) -> DataConstrainedFit:
    """Fit Muennighoff et al.'s data-constrained law (R*_D, R*_N) to runs with unique-token counts.

    Same objective as :func:`fit_chinchilla` (sum of Huber losses on log residuals) on the law of
    effective data ``D'`` and effective parameters ``N'``. With ``base``, E, A, B, alpha, beta
    are held at it and only R*_D, R*_N are fitted (Muennighoff et al.'s procedure: their base came
    from single-epoch C4 runs); without, all seven are fitted jointly, starting from a Chinchilla
    fit of the runs that do not repeat data. Starts for R*_D, R*_N: a 4x4 grid over 1..50.

    ``two_stage=True`` (no ``base``) is Muennighoff et al.'s two-step procedure done on these runs:
    first a Chinchilla fit (:func:`fit_chinchilla`, ``tie_exponents`` as given; the paper's base
    had alpha = beta) of the runs that see each token at most once, then R*_D, R*_N with that base
    held fixed. Each bootstrap resample repeats both stages, so the intervals carry the base's
    uncertainty too (about 20 ms a resample more).

    Example:
        >>> true = DataConstrainedLaw(E=1.9, A=500.0, B=1500.0, alpha=0.35, beta=0.35, R_D=15.0, R_N=5.0)
        >>> N, U, ep = (a.ravel() for a in np.meshgrid(np.logspace(7.5, 9, 4), np.logspace(9, 10, 3), [1, 4, 16, 40]))
        >>> runs = make_runs(N, U * ep, true.predict(N, U * ep, unique=U), U=U)
        >>> fit = fit_data_constrained(runs, n_bootstrap=0)
        >>> round(fit.law.R_D, 2), round(fit.law.R_N, 2)
        (15.0, 5.0)
    """
    if runs.U is None:
        raise FitError("a data-constrained fit needs unique tokens per run; add a unique_tokens column")
    if base is not None and (two_stage or tie_exponents):
        raise FitError("a given base holds E, A, B, alpha, beta, so two_stage / tie_exponents have nothing to fit; "
                       "drop them, or drop base")
    if tie_exponents and not two_stage:
        raise FitError("tie_exponents applies to the two-stage base fit; pass two_stage=True")
    stage_one = ""
    if two_stage:
        fresh = _single_epoch(runs)
        if not _can_fit_base(fresh, tie_exponents):
            raise FitError(f"a two-stage fit needs single-epoch runs (tokens <= unique_tokens) at 2+ sizes and 2+ "
                           f"token counts for its base law; {len(fresh)} found")
        base = _fit_base(fresh, delta, tie_exponents)
        stage_one = (f"two stages: base fitted on the {len(fresh)} single-epoch runs"
                     f"{' (alpha = beta tied)' if tie_exponents else ''}, then ")
    repeated = int(np.sum(runs.D > runs.U * (1 + 1e-9)))
    if repeated == 0:
        raise FitError("no run repeats its data (tokens > unique_tokens); add repeated-data runs to fit R*_D")
    n_free = 2 if base is not None else 7
    if len(runs) < n_free + 1:
        raise FitError(f"{len(runs)} runs cannot determine {n_free} parameters; add runs (at least {n_free + 1})")
    grid = [(math.log(rd), math.log(rn)) for rd in (1.0, 5.0, 15.0, 50.0) for rn in (1.0, 5.0, 15.0, 50.0)]
    if base is None:
        fresh = runs.subset(np.flatnonzero(runs.D <= runs.U))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start_law = fit_chinchilla(fresh if _can_fit_base(fresh, False) else runs, n_bootstrap=0).law
        head = [math.log(start_law.A), math.log(start_law.B), math.log(start_law.E), start_law.alpha, start_law.beta]
        starts = [np.array(head + list(g)) for g in grid]
    else:
        starts = [np.array(g) for g in grid]
    best = min((_dc_local(s, runs, base, delta) for s in starts), key=lambda r: r.cost)
    law = _dc_law(best.x, base)
    r = _dc_residuals(best.x, runs, base)
    logL = np.log(runs.L)
    ss_tot = float(np.sum((logL - logL.mean()) ** 2))
    stats = ResidualStats(rmse=float(np.sqrt(np.mean(r * r))), mean=float(np.mean(r)), max_abs=float(np.max(np.abs(r))),
                          r2=1.0 - float(np.sum(r * r)) / ss_tot if ss_tot > 0 else math.nan,
                          huber_sum=float(np.sum(_huber(r, delta))))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(runs), len(runs))
        sub = runs.subset(idx)
        if not np.any(sub.D > sub.U) or np.unique(sub.N).size < 2:
            continue
        base_b = base
        if stage_one:  # both stages again on the resample, so the base's uncertainty is in the intervals
            fresh_b = _single_epoch(sub)
            if not _can_fit_base(fresh_b, tie_exponents):
                continue
            base_b = _fit_base(fresh_b, delta, tie_exponents)
        fit_b = _dc_local(best.x, sub, base_b, delta)  # warm start from the full-data fit
        rows.append([float(v) for v in _dc_law(fit_b.x, base_b).params().values()])
    samples = np.array(rows) if rows else np.empty((0, 7))
    ci = {k: interval(samples[:, i]) for i, k in enumerate(_DC_NAMES)} if rows else {}
    what = "R*_D and R*_N with E, A, B, alpha, beta held at the given base law" if base is not None else \
        "all seven parameters jointly"
    if stage_one:
        what = stage_one + "R*_D and R*_N with that base held fixed"
    return DataConstrainedFit(law=law, ci95=ci, samples=samples, residuals=stats,
                              converged=bool(best.success) and best.status > 0, message=str(best.message),
                              n_runs=len(runs), n_repeated=repeated, base_fixed=base is not None and not stage_one,
                              two_stage=bool(stage_one),
                              method=(f"data-constrained (Muennighoff et al. 2023): {what}; sum of Huber(delta={delta:g}) "
                                      f"on log residuals, trust-region from a 4x4 grid of R* starts; {len(rows)} "
                                      "bootstrap resamples warm-started from the full-data fit"))
