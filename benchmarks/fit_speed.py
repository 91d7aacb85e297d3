"""Approach 3 fit speed on 250 noisy synthetic runs (issue 3 targets: fit <= 2 s; with 200 bootstraps <= 20 s).

    python benchmarks/fit_speed.py
"""

from __future__ import annotations

import sys
import time

import numpy as np

from scalewatch.fitting import fit_chinchilla, make_runs
from scalewatch.laws import ChinchillaLaw


def main() -> int:
    true = ChinchillaLaw.epoch_refit()
    rng = np.random.default_rng(0)
    N = 10 ** rng.uniform(7, 10, 250)
    D = N * 10 ** rng.uniform(0.3, 2.5, 250)
    L = true.predict(N, D) * np.exp(rng.normal(0, 0.01, 250))
    runs = make_runs(N, D, L)
    t = time.perf_counter()
    res = fit_chinchilla(runs, n_bootstrap=0)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    res_b = fit_chinchilla(runs, n_bootstrap=200)
    t_boot = time.perf_counter() - t
    print(f"250 runs: fit {t_fit:.3f} s (target <= 2 s, ratio to target {t_fit / 2:.3f}); "
          f"fit + 200 bootstrap resamples {t_boot:.2f} s (target <= 20 s, ratio {t_boot / 20:.3f})")
    print("fitted:", {k: round(v, 4) for k, v in res.law.params().items()}, "converged:", res.converged)
    print("truth: ", true.params())
    print("95% CI:", {k: (round(lo, 4), round(hi, 4)) for k, (lo, hi) in res_b.ci95.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
