"""The curve law's N-dependence on the OLMo ladder, both forms side by side (issue 12, item 1).

    python benchmarks/curve_law_in_n.py [--data ../shared/data]

1. Leave one size out: fit on two of 190M/370M/760M (all 11 curves of each, c4_en loss), predict
   the third size's curves from their LR schedules: final-loss error and points in the 90% band.
2. Fit on all three sizes and follow the implied final loss in N along the OLMo recipe (peak LR and
   steps scaled as power laws of N fitted to the three pilots, the 760M schedule's shape), next to
   an Approach-3 Chinchilla fit (scalewatch.fitting) of the same 15 cosine runs' final losses; and
   each form's floor in N (the linear form has none) against Approach 3's E.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forecast_accuracy import MULTS, olmo_curves  # noqa: E402

from scalewatch.curve_fit import fit_curves  # noqa: E402
from scalewatch.curves import FORM_FLOOR, FORM_LINEAR  # noqa: E402
from scalewatch.fitting import fit_chinchilla, make_runs  # noqa: E402

FORMS = (FORM_LINEAR, FORM_FLOOR)


def leave_one_size_out(curves) -> None:
    print("== fit on two sizes, predict the third from its schedules (final-loss error; points in the 90% band)")
    for train, test in ((("190M", "370M"), "760M"), (("370M", "760M"), "190M"), (("190M", "760M"), "370M")):
        for form in FORMS:
            t = time.perf_counter()
            fit = fit_curves([c for s in train for c in curves[s]], form=form, calibrate=False)
            errs, cov = [], []
            for c in curves[test]:
                p = fit.law.predict(c.per_step_lr(), n_params=c.n_params, steps=c.steps)
                errs.append((p.loss[-1] - c.loss[-1]) / c.loss[-1])
                cov.append(np.mean((c.loss >= p.low) & (c.loss <= p.high)))
            e = np.array(errs)
            print(f"  {' + '.join(train)} -> {test} {form:15} mean {np.abs(e).mean():.2%} worst {np.abs(e).max():.2%} "
                  f"bias {e.mean():+.2%}; in band {np.mean(cov):.0%}; fit {time.perf_counter() - t:.1f} s")


def in_n(curves, data: Path) -> None:
    tokens: dict[str, float] = {}
    with (data / "olmo_ladder" / "loss_curves.csv").open() as f:
        for r in csv.DictReader(f):
            if r["subset"] == "peteish-moreeval":
                tokens[r["run"]] = max(tokens.get(r["run"], 0.0), float(r["throughput/total_tokens"]))
    cos = [c for s in curves for c in curves[s][:5]]
    chin = fit_chinchilla(make_runs([c.n_params for c in cos], [tokens[c.name.split("/")[1]] for c in cos],
                                    [c.loss[-1] for c in cos]), n_bootstrap=0).law
    print(f"== all three sizes; Approach 3 on the 15 cosine runs' final losses: E={chin.E:.3f} A={chin.A:.4g} "
          f"alpha={chin.alpha:.3f} B={chin.B:.4g} beta={chin.beta:.3f}")
    n = np.array([curves[s][0].n_params for s in curves])
    lr_exp = np.polyfit(np.log(n), np.log([curves[s][0].per_step_lr().max() for s in curves]), 1)[0]
    step_exp = np.polyfit(np.log(n), np.log([curves[s][1].steps[-1] for s in curves]), 1)[0]
    print(f"  OLMo recipe from the pilots: peak LR ~ N^{lr_exp:.3f}, steps ~ N^{step_exp:.3f}")
    laws = {f: fit_curves([c for s in curves for c in curves[s]], form=f, calibrate=False).law for f in FORMS}
    for f, law in laws.items():
        print(f"  {f}: " + ", ".join(f"{k}=({a:.4g}, {b:.4g})" for k, (a, b) in law.coef.items()))
    floor = laws[FORM_FLOOR].coef["E"][0]
    print(f"  floor in N: {FORM_FLOOR} E={floor:.3f} vs Approach 3 E={chin.E:.3f} "
          f"({'above' if floor >= chin.E else 'BELOW'}); {FORM_LINEAR}: none (L0 falls "
          f"{-laws[FORM_LINEAR].coef['L0'][1]:.3f} per unit ln N)")
    ref = curves["760M"]
    for m in ("1", "10"):
        base = ref[MULTS.index(m)]
        old = base.per_step_lr()
        print(f"  {m}xC at the recipe: N, final loss {' / '.join(FORMS)} / Approach 3, each form vs Approach 3")
        for size in (1.9e8, 3.7e8, 7.6e8, 1.3e9, 3.2e9, 7e9, 3e10, 1e11):
            k = size / base.n_params
            steps = int(round(len(old) * k**step_exp))
            sched = np.interp(np.arange(steps) * (len(old) - 1) / (steps - 1), np.arange(len(old)), old) * k**lr_exp
            d = tokens[f"760M-{m}xC"] * k
            pred = [law.predict(sched, size, [steps - 1]).loss[0] for law in laws.values()]
            a3 = chin.E + chin.A * size**-chin.alpha + chin.B * d**-chin.beta
            print(f"    {size:8.2g}: " + " / ".join(f"{v:.4f}" for v in pred) + f" / {a3:.4f}   "
                  + "  ".join(f"{v / a3 - 1:+.2%}" for v in pred))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    curves = olmo_curves(Path(args.data) / "olmo_ladder" / "loss_curves.csv")
    leave_one_size_out(curves)
    in_n(curves, Path(args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
