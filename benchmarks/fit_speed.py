"""Approach 3 fit speed, with the old bootstrap timed beside the new one in the same run (issue 12, item 3).

    python benchmarks/fit_speed.py [--repeats 3] [--bootstrap 200]

Cases: 240 and 250 noisy synthetic runs (Epoch's 240-point Chinchilla set is held out, so the
240-run case of the issue is reproduced in size on synthetic data), and the real sets in
../shared/data (Gadre et al. C4, 34 runs; datablations, all 296 runs fitted as plain L(N, D)).

"old": what fit_chinchilla did before: per resample, the 34x34 variable-projection grid again,
then the trust-region solve from its best start and from the full-data fit (kept here only, to
measure against). "new": fit_chinchilla today: every resample warm-started from the full-data
fit and solved together. Both use the same resamples (same seed). Printed per case: the median
wall time of each over the repeats, the ratio, whether the point estimates are identical, and the
largest difference between the two 95% intervals' end points, relative to the interval's width.
The machine is shared (2 cores): timings are noisy, hence the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalewatch.data import read_runs  # noqa: E402
from scalewatch.fitting import (  # noqa: E402
    HUBER_DELTA,
    RunSet,
    _fit_theta,
    _theta_to_params,
    bootstrap_indices,
    fit_chinchilla,
    make_runs,
)
from scalewatch.laws import ChinchillaLaw, interval  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GADRE_C4 = ["dataset=c4_original", "val_data=training/eval_data/c4_val/shard-{0000000..0000010}.tar"]


def synthetic(n: int, seed: int = 0) -> RunSet:
    true = ChinchillaLaw.epoch_refit()
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 10, n)
    D = N * 10 ** rng.uniform(0.3, 2.5, n)
    return make_runs(N, D, true.predict(N, D) * np.exp(rng.normal(0, 0.01, n)))


def old_fit(runs: RunSet, n_bootstrap: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pre-change routine: the global grid again for every resample."""
    logN, logD = np.log(runs.N), np.log(runs.D)
    theta = _fit_theta(logN, logD, runs.L, HUBER_DELTA).x
    samples = [_theta_to_params(_fit_theta(logN[i], logD[i], runs.L[i], HUBER_DELTA, extra_starts=[theta], k=1).x)
               for i in bootstrap_indices(len(runs), n_bootstrap, seed, logN, logD)]
    return _theta_to_params(theta), np.array(samples)


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def cases() -> dict[str, RunSet]:
    out = {"synthetic 240": synthetic(240), "synthetic 250": synthetic(250)}
    if DATA.exists():
        out["Gadre C4 (34)"] = read_runs([DATA / "gadre2024_overtraining" / "final_losses.csv"], where=GADRE_C4)
        out["datablations (296)"] = read_runs([DATA / "datablations" / "muennighoff2023_final_val_losses.csv"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--only", help="run only the cases whose name contains this")
    args = p.parse_args()
    names = ("E", "A", "B", "alpha", "beta")
    print(f"{'case':<20} {'old s':>7} {'new s':>7} {'ratio':>6}  identical point  max CI end shift (x width)")
    for name, runs in cases().items():
        if args.only and args.only not in name:
            continue
        t_old, (p_old, s_old) = _timed(lambda r=runs: old_fit(r, args.bootstrap), args.repeats)
        t_new, res = _timed(lambda r=runs: fit_chinchilla(r, n_bootstrap=args.bootstrap), args.repeats)
        p_new = np.array([res.law.params()[k] for k in names])
        shifts = {}
        for j, k in enumerate(names):
            lo_o, hi_o = interval(s_old[:, j])
            lo_n, hi_n = res.ci95[k]
            shifts[k] = max(abs(lo_o - lo_n), abs(hi_o - hi_n)) / (hi_o - lo_o)
        worst = max(shifts, key=shifts.get)
        print(f"{name:<20} {t_old:7.2f} {t_new:7.3f} {t_old / t_new:6.1f}  {bool(np.array_equal(p_old, p_new))!s:<15}  "
              f"{shifts[worst]:.3f} ({worst}); " + " ".join(f"{k} {v:.3f}" for k, v in shifts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
