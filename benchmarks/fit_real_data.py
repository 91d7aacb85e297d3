"""Approach 3 on real public data, beside the published constants (issue 3).

    python benchmarks/fit_real_data.py [--bootstrap 200]

* datablations (Muennighoff et al. 2023): runs without repetition (tokens <= unique tokens).
  Published (their fit on all runs, with the data-constrained terms): E=1.869, A=520.8, B=1487.7,
  alpha=beta=0.353.
* Gadre et al. 2024 over-training grid, C4 validation loss of the models trained on C4.
  (Their paper fits a different parameterisation; Chinchilla's published MassiveText constants,
  E=1.69 A=406.4 B=410.7 alpha=0.34 beta=0.28, and Epoch's refit are printed for scale.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from scalewatch.data import read_runs
from scalewatch.fitting import approach1, approach2, fit_chinchilla, fit_data_constrained
from scalewatch.laws import DataConstrainedLaw

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _table(name: str, res, published: dict[str, float] | None) -> None:
    print(f"\n{name}: {res.n_runs} runs, N {res.N_range[0]:.3g}–{res.N_range[1]:.3g}, "
          f"D {res.D_range[0]:.3g}–{res.D_range[1]:.3g}")
    print(f"  {'param':<6} {'fitted':>10} {'95% CI':>24} {'published':>10}")
    for k, v in res.law.params().items():
        lo, hi = res.ci95.get(k, (float("nan"),) * 2)
        pub = f"{published[k]:.4g}" if published and k in published else ""
        print(f"  {k:<6} {v:>10.4g} {lo:>11.4g} – {hi:<10.4g} {pub:>10}")
    r = res.residuals
    print(f"  RMSE(log L) {r.rmse:.4f}  max|resid| {r.max_abs:.4f}  R² {r.r2:.4f}  converged={res.converged}")
    a = res.law.beta / (res.law.alpha + res.law.beta)
    print(f"  implied N_opt ∝ C^{a:.3f}")


def _fit_and_print(name: str, runs, n_bootstrap: int, published: dict[str, float]) -> None:
    t = time.perf_counter()
    res = fit_chinchilla(runs, n_bootstrap=n_bootstrap)
    print(f"\n[{name}: fit + {n_bootstrap} bootstraps in {time.perf_counter() - t:.1f} s]")
    _table(name, res, published)


def _rising(runs) -> np.ndarray:
    """Runs whose loss is above that of a run with the same N and U and fewer tokens (loss rose with repetition)."""
    out = []
    for i in range(len(runs)):
        same = np.isclose(runs.N, runs.N[i], rtol=0.02) & np.isclose(runs.U, runs.U[i], rtol=0.02) & (runs.D < runs.D[i])
        if same.any() and runs.L[same].min() < runs.L[i]:
            out.append(i)
    return np.array(out, dtype=int)


def data_constrained(n_bootstrap: int) -> None:
    """R*_D and R*_N on datablations beside Muennighoff et al.'s 15.4 and 5.3 (issue 12, item 4)."""
    runs = read_runs([DATA / "datablations" / "muennighoff2023_final_val_losses.csv"])
    kept = runs.subset(np.setdiff1d(np.arange(len(runs)), _rising(runs)))
    published = DataConstrainedLaw.published()
    print(f"\ndatablations, data-constrained law (published R*_D = {published.R_D}, R*_N = {published.R_N}):")
    for label, sub, base in (("all 296 runs, all 7 parameters", runs, None),
                             ("all 296 runs, base held at the published E, A, B, alpha=beta", runs, published.base),
                             (f"{len(kept)} runs (loss-rose-with-repetition runs dropped), all 7", kept, None),
                             (f"{len(kept)} runs, base held at the published", kept, published.base)):
        t = time.perf_counter()
        fit = fit_data_constrained(sub, base=base, n_bootstrap=n_bootstrap)
        rd, rn = fit.ci95.get("R_D", (float("nan"),) * 2), fit.ci95.get("R_N", (float("nan"),) * 2)
        print(f"  {label}: R*_D = {fit.law.R_D:.4g} (95% CI {rd[0]:.3g}-{rd[1]:.3g}), R*_N = {fit.law.R_N:.4g} "
              f"({rn[0]:.3g}-{rn[1]:.3g}); RMSE(log L) {fit.residuals.rmse:.3f}; {time.perf_counter() - t:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--dc-bootstrap", type=int, default=100, help="resamples for the data-constrained fits")
    args = p.parse_args()

    runs = read_runs([DATA / "datablations" / "muennighoff2023_final_val_losses.csv"])
    runs = runs.subset(np.flatnonzero(runs.D <= runs.U))  # single-epoch runs only
    _fit_and_print("datablations (Muennighoff et al. 2023), runs without repetition", runs, args.bootstrap,
                   {"E": 1.869, "A": 520.8, "B": 1487.7, "alpha": 0.353, "beta": 0.353})
    runs = read_runs([DATA / "gadre2024_overtraining" / "final_losses.csv"],
                     where=["dataset=c4_original", "val_data=training/eval_data/c4_val/shard-{0000000..0000010}.tar"])
    _fit_and_print("Gadre et al. 2024, trained and evaluated on C4", runs, args.bootstrap,
                   {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
    for fn in (approach1, approach2):
        try:
            pf = fn(runs, n_bootstrap=args.bootstrap)
            print(f"  {pf.method}: a = {pf.exponent:.3f} (95% CI {pf.ci95[0]:.3f}–{pf.ci95[1]:.3f}), "
                  f"{len(pf.points)} budgets")
        except ValueError as exc:
            print(f"  {fn.__name__}: {exc}")
    data_constrained(args.dc_bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
