"""The curve law's N-dependence on the OLMo ladder, both forms side by side (issue 12, item 1).

    python benchmarks/curve_law_in_n.py [--data ../shared/data]

1. Leave one size out: fit on two of 190M/370M/760M (all 11 curves of each, c4_en loss), predict
   the third size's curves from their LR schedules: final-loss error and points in the 90% band.
2. Fit on all three sizes and follow the implied final loss in N along the OLMo recipe (peak LR and
   steps scaled as power laws of N fitted to the three pilots, the 760M schedule's shape), next to
   an Approach-3 Chinchilla fit (scalewatch.fitting) of the same 15 cosine runs' final losses (with
   its bootstrap 95% interval of E and alpha); and each form's floor in N (the linear form has none)
   against Approach 3's E.
3. How much the floor form's prior on its N-exponent decides: sections 1-2 again for prior centres
   0.2 to 0.4 (sd 0.1).
4. multipowerlaw across sizes (25M and 100M): a joint fit on every curve of one size and the
   cosine_24000 + constant_24000 curves of the other predicts the other size's 7 other schedules
   (the same-size fit on its two curves alone: mean 0.20% / 0.18%, worst final 0.85% / 0.75%).
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

from scalewatch import curve_fit  # noqa: E402
from scalewatch.curve_fit import fit_curves  # noqa: E402
from scalewatch.curves import FORM_FLOOR, FORM_LINEAR, read_curve_csv  # noqa: E402
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


def recipe(curves, data: Path):
    """Approach 3 on the 15 cosine runs, the recipe's exponents and a function (law, N, multiple) -> final loss
    along it, with Approach 3's at the same N and tokens."""
    tokens: dict[str, float] = {}
    with (data / "olmo_ladder" / "loss_curves.csv").open() as f:
        for r in csv.DictReader(f):
            if r["subset"] == "peteish-moreeval":
                tokens[r["run"]] = max(tokens.get(r["run"], 0.0), float(r["throughput/total_tokens"]))
    cos = [c for s in curves for c in curves[s][:5]]
    chin = fit_chinchilla(make_runs([c.n_params for c in cos], [tokens[c.name.split("/")[1]] for c in cos],
                                    [c.loss[-1] for c in cos]), n_bootstrap=100, seed=0)
    n = np.array([curves[s][0].n_params for s in curves])
    lr_exp = np.polyfit(np.log(n), np.log([curves[s][0].per_step_lr().max() for s in curves]), 1)[0]
    step_exp = np.polyfit(np.log(n), np.log([curves[s][1].steps[-1] for s in curves]), 1)[0]

    def final(law, size: float, m: str) -> tuple[float, float]:
        base = curves["760M"][MULTS.index(m)]
        old = base.per_step_lr()
        k = size / base.n_params
        steps = int(round(len(old) * k**step_exp))
        sched = np.interp(np.arange(steps) * (len(old) - 1) / (steps - 1), np.arange(len(old)), old) * k**lr_exp
        d = tokens[f"760M-{m}xC"] * k
        a3 = chin.law.E + chin.law.A * size**-chin.law.alpha + chin.law.B * d**-chin.law.beta
        return float(law.predict(sched, size, [steps - 1]).loss[0]), float(a3)

    return chin, lr_exp, step_exp, final


def in_n(curves, data: Path) -> None:
    chin, lr_exp, step_exp, final = recipe(curves, data)
    S = np.array(chin.samples)
    e_ci, a_ci = np.percentile(S[:, 0], [2.5, 97.5]), np.percentile(S[:, 3], [2.5, 97.5])
    print(f"== all three sizes; Approach 3 on the 15 cosine runs' final losses: E={chin.law.E:.3f} A={chin.law.A:.4g} "
          f"alpha={chin.law.alpha:.3f} B={chin.law.B:.4g} beta={chin.law.beta:.3f} (bootstrap 95%: E {e_ci[0]:.2f}-"
          f"{e_ci[1]:.2f}, alpha {a_ci[0]:.2f}-{a_ci[1]:.2f}, {len(S)} resamples)")
    print(f"  OLMo recipe from the pilots: peak LR ~ N^{lr_exp:.3f}, steps ~ N^{step_exp:.3f}")
    laws = {f: fit_curves([c for s in curves for c in curves[s]], form=f, calibrate=False).law for f in FORMS}
    for f, law in laws.items():
        print(f"  {f}: " + ", ".join(f"{k}=({a:.4g}, {b:.4g})" for k, (a, b) in law.coef.items()))
    floor = laws[FORM_FLOOR].coef["E"][0]
    print(f"  floor in N: {FORM_FLOOR} E={floor:.3f} vs Approach 3 E={chin.law.E:.3f} "
          f"({'above' if floor >= chin.law.E else 'below'} it, "
          f"{'inside' if e_ci[0] <= floor <= e_ci[1] else 'OUTSIDE'} "
          f"its 95% interval); {FORM_LINEAR}: none (L0 falls "
          f"{-laws[FORM_LINEAR].coef['L0'][1]:.3f} per unit ln N)")
    for m in ("1", "10"):
        print(f"  {m}xC at the recipe: N, final loss {' / '.join(FORMS)} / Approach 3, each form vs Approach 3")
        for size in (1.9e8, 3.7e8, 7.6e8, 1.3e9, 3.2e9, 7e9, 3e10, 1e11):
            pred = [final(law, size, m) for law in laws.values()]
            a3 = pred[0][1]
            print(f"    {size:8.2g}: " + " / ".join(f"{v:.4f}" for v, _ in pred) + f" / {a3:.4f}   "
                  + "  ".join(f"{v / a3 - 1:+.2%}" for v, _ in pred))


def prior_sensitivity(curves, data: Path) -> None:
    print(f"== {FORM_FLOOR}: how much the prior on beta decides (sd {curve_fit.BETA_PRIOR[1]}; "
          f"the library's centre {curve_fit.BETA_PRIOR[0]})")
    _, _, _, final = recipe(curves, data)
    saved = curve_fit.BETA_PRIOR
    try:
        for centre in (0.2, 0.28, 0.34, 0.4):
            curve_fit.BETA_PRIOR = (centre, saved[1])
            row = []
            for train, test in ((("190M", "370M"), "760M"), (("370M", "760M"), "190M"), (("190M", "760M"), "370M")):
                law = fit_curves([c for s in train for c in curves[s]], form=FORM_FLOOR, calibrate=False).law
                e = np.array([(law.predict(c.per_step_lr(), c.n_params, [int(c.steps[-1])]).loss[0] - c.loss[-1])
                              / c.loss[-1] for c in curves[test]])
                row.append(f"->{test} {np.abs(e).mean():.2%} ({e.mean():+.2%})")
            law = fit_curves([c for s in curves for c in curves[s]], form=FORM_FLOOR, calibrate=False).law
            far = [v / a3 - 1 for v, a3 in (final(law, n, m) for m in ("1", "10") for n in (3.2e9, 1e11))]
            print(f"  centre {centre:.2f}: two sizes: {', '.join(row)}; three sizes: beta {law.coef['beta'][0]:.3f}, "
                  f"E {law.coef['E'][0]:.3f}, vs Approach 3 at 3.2e9 / 1e11: 1xC {far[0]:+.1%} / {far[1]:+.1%}, "
                  f"10xC {far[2]:+.1%} / {far[3]:+.1%}")
    finally:
        curve_fit.BETA_PRIOR = saved


def multipowerlaw_across_sizes(root: Path) -> None:
    print("== multipowerlaw across sizes: every curve of one size + cosine_24000 and constant_24000 of the other "
          "predict the other's 7 other schedules (mean error of each curve; worst final-point error)")
    cs = {size: {f.stem.split("__")[1]: read_curve_csv(f, n_params=float(size) * 1e6)
                 for f in sorted(root.glob(f"csv_{size}__*.csv"))} for size in ("25", "100")}
    pilots = ("cosine_24000", "constant_24000")
    for full, sparse in (("25", "100"), ("100", "25")):
        train = list(cs[full].values()) + [cs[sparse][k] for k in pilots]
        for form in (*FORMS, "same size only"):
            law = (fit_curves([cs[sparse][k] for k in pilots], calibrate=False).law if form == "same size only"
                   else fit_curves(train, form=form, calibrate=False).law)
            means, finals = [], []
            for name, c in cs[sparse].items():
                if name in pilots:
                    continue
                p = law.predict(c.per_step_lr(), n_params=c.n_params, steps=c.steps)
                rel = np.abs(p.loss - c.loss) / c.loss
                means.append(rel.mean())
                finals.append(rel[-1])
            print(f"  {full}M all + {sparse}M two -> {sparse}M  {form:15} mean {np.mean(means):.3%} "
                  f"worst final {np.max(finals):.3%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    curves = olmo_curves(Path(args.data) / "olmo_ladder" / "loss_curves.csv")
    leave_one_size_out(curves)
    in_n(curves, Path(args.data))
    prior_sensitivity(curves, Path(args.data))
    multipowerlaw_across_sizes(Path(args.data) / "multipowerlaw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
