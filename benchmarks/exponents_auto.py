"""`--exponents auto` against the truth on synthetic pilots drawn from the Chinchilla form.

    python benchmarks/exponents_auto.py [--seeds 12] [--noise 0.001 0.003 0.01]

Pilots laid out as Gadre et al.'s: five sizes 10M-400M, token multipliers 5-80 (25 runs), the loss
multiplied by exp(normal(0, noise)). Targets 0.5-1.2 decades out: 1.4B at 20 and 80 tokens per
parameter, 6.9B at 20. For each true (alpha, beta) and noise level: how often auto (the rule of
`scalewatch fit --exponents auto`, :func:`scalewatch.extrapolation.choose_exponents`) picks tied,
and the mean |error| at the targets of the free fit, the tied fit, auto, and auto with no margin
(free whenever its held-out error is smaller at all). The real-data counterpart is
`extrapolation_coverage.py --exponents auto`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalewatch.extrapolation import compare_exponents  # noqa: E402
from scalewatch.fitting import fit_chinchilla, make_runs  # noqa: E402
from scalewatch.laws import ChinchillaLaw  # noqa: E402

EXPONENTS = [(0.34, 0.28), (0.33, 0.31), (0.353, 0.353), (0.45, 0.25), (0.28, 0.34)]
TARGET_N, TARGET_D = np.array([1.4e9, 6.9e9, 1.4e9]), np.array([2.8e10, 1.38e11, 1.12e11])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.001, 0.003, 0.01])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    N, M = (x.ravel() for x in np.meshgrid(np.logspace(7, 8.6, 5), [5, 10, 20, 40, 80]))
    D = N * M
    summary: dict[float, dict[str, list[float]]] = {}
    for alpha, beta in EXPONENTS:
        true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=alpha, beta=beta)
        truth = true.predict(TARGET_N, TARGET_D)
        for noise in args.noise:
            errs: dict[str, list[float]] = {"free": [], "tied": [], "auto": [], "no margin": []}
            tied_picks = 0
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                runs = make_runs(N, D, true.predict(N, D) * np.exp(rng.normal(0, noise, N.size)))
                choice = compare_exponents(runs)
                tied_picks += choice.form == "tied"
                e = {f: float(np.mean(np.abs(fit_chinchilla(runs, n_bootstrap=0, tie_exponents=f == "tied")
                                             .law.predict(TARGET_N, TARGET_D) / truth - 1)))
                     for f in ("free", "tied")}
                errs["free"].append(e["free"])
                errs["tied"].append(e["tied"])
                errs["auto"].append(e[choice.form])
                errs["no margin"].append(e["free" if choice.free_error < choice.tied_error else "tied"])
            m = {k: 100 * float(np.mean(v)) for k, v in errs.items()}
            for k, v in m.items():
                summary.setdefault(noise, {}).setdefault(k, []).append(v)
            print(f"alpha {alpha:.3f} beta {beta:.3f} noise {100 * noise:.1f}%: "
                  f"auto picks tied {tied_picks}/{args.seeds}; "
                  f"mean |error| free {m['free']:.2f}%, tied {m['tied']:.2f}%, auto {m['auto']:.2f}% "
                  f"(no margin {m['no margin']:.2f}%)", flush=True)
    print("\nmean over the exponent pairs:")
    for noise, cols in summary.items():
        print(f"  noise {100 * noise:.1f}%: " + ", ".join(f"{k} {np.mean(v):.2f}%" for k, v in cols.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
