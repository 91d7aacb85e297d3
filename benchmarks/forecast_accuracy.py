"""How well the curve law predicts and forecasts real loss curves (../shared/data).

    python benchmarks/forecast_accuracy.py [--data ../shared/data]

1. multipowerlaw (25M and 100M, 9 LR schedules each): fit on cosine_24000 + constant_24000,
   predict the other seven: mean relative error over each curve, error of its final point,
   and how often the 90% band holds the truth. Targets: mean <= 0.3%, worst final <= 1%.
2. OLMo ladder across sizes: fit on every 190M and 370M curve (cosine at 0.5-10x Chinchilla,
   constant, and the WSD cooldowns branched from it; c4_en validation loss), predict the
   760M curves. Targets: final-loss error <= 1.0% mean, <= 2.0% worst.
3. Prefix forecasts on the OLMo cosine runs: the law fitted without the forecast run is the
   prior; the run's first 20/40/60% updates it. Target: at least 2x lower mean final-loss
   error than a prefix-only fit (2.7%, 1.6%, 0.6%), 90% bands holding the truth >= 85%.
4. Prefix forecasts across sizes (issue 14): a law fitted on two OLMo sizes forecasts every
   curve of the third (190M+370M -> 760M, and the leave-one-size-out variants) from 20/40/60%,
   with coverage and sharpness by the distance in ln N from the pilot sizes (issue 12, item 2).
5. Late in a run (from 90% and from the last step), for 3. and for the multipowerlaw schedules: the forecast
   should be where the run is, with a band that still holds it (reported, no target).

Every band is reported with its coverage (target 85-95% for a 90% band: higher is a band too
wide to act on) and its sharpness, mean half-width / mean |error| (target <= 3; a Gaussian
90% band is about 2).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalewatch import curve_fit  # noqa: E402
from scalewatch.curve_fit import fit_curves  # noqa: E402
from scalewatch.curves import Curve, read_curve_csv, validate_curve  # noqa: E402
from scalewatch.forecast import ForecastSettings, forecast_final  # noqa: E402

OLMO_LOSS = "eval/c4_en-validation/CrossEntropyLoss"
MULTS = ("0.5", "1", "2", "5", "10")


def olmo_curves(path: Path) -> dict[str, list[Curve]]:
    """size -> [cosine 0.5..10xC, constant, WSD cooldowns]; cooldowns carry their constant prefix."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with path.open() as f:
        for r in csv.DictReader(f):
            runs[(r["subset"], r["run"])].append(r)

    def make(key, prefix=None) -> Curve:
        rows = sorted(runs[key], key=lambda r: float(r["_step"]))
        st = np.array([float(r["_step"]) for r in rows])
        lr = np.array([float(r["optim/learning_rate_group0"]) for r in rows])
        y = np.array([float(r[OLMO_LOSS]) for r in rows])
        if prefix is not None:
            m = prefix.steps < st[0]
            st, lr, y = np.r_[prefix.steps[m], st], np.r_[prefix.lr[m], lr], np.r_[prefix.loss[m], y]
        return validate_curve(Curve(f"{key[0].replace('peteish-moreeval', 'olmo')}/{key[1]}", st, lr, y,
                                    float(rows[0]["n_params_final_json"])))

    out = {}
    for size in ("190M", "370M", "760M"):
        cos = [make(("peteish-moreeval", f"{size}-{m}xC")) for m in MULTS]
        const = make(("peteish-moreeval-const", f"{size}-10xC"))
        decay = [make(("peteish-moreeval-decay", f"{size}-{m}xC"), prefix=const) for m in MULTS]
        out[size] = cos + [const] + decay
    return out


def coverage(pred, y) -> float:
    return float(np.mean((y >= pred.low) & (y <= pred.high)))


def sharpness(half_widths, errors) -> float:
    """Mean half-width of the band over mean |error| (both relative): <= 3 is the target."""
    return float(np.mean(half_widths) / max(np.mean(np.abs(errors)), 1e-12))


def band_line(errors, half_widths, inside) -> str:
    return (f"90% band holds the truth {np.mean(inside):.0%} of {len(inside)} (target 85-95%), "
            f"half-width {np.mean(half_widths):.2%} = {sharpness(half_widths, errors):.1f}x mean |error| (target <= 3)")


def multipowerlaw_prefix(root: Path) -> None:
    """Forecasts on a second data set the settings were not chosen on (no target in the issue)."""
    print("== multipowerlaw: forecast each held-out schedule's final loss from its prefix "
          "(prior: the cosine_24000 + constant_24000 law of the same size)")
    errs: dict[float, list[float]] = {f: [] for f in FRACS + LATE_FRACS}
    inside: dict[float, list[bool]] = {f: [] for f in FRACS + LATE_FRACS}
    halfs: dict[float, list[float]] = {f: [] for f in FRACS + LATE_FRACS}
    prior = []
    for size in ("25", "100"):
        curves = {f.stem.split("__")[1]: read_curve_csv(f) for f in sorted(root.glob(f"csv_{size}__*.csv"))}
        law = fit_curves([curves["cosine_24000"], curves["constant_24000"]]).law
        for name, c in curves.items():
            if name in ("cosine_24000", "constant_24000"):
                continue
            end = int(c.steps[-1])
            for f in FRACS + LATE_FRACS:
                m = c.steps <= f * end
                fc = forecast_final(law, c.per_step_lr(), c.steps[m], c.loss[m])
                errs[f].append(abs(fc.loss - c.loss[-1]) / c.loss[-1])
                inside[f].append(fc.low <= c.loss[-1] <= fc.high)
                halfs[f].append((fc.high - fc.low) / 2 / fc.loss)
            prior.append(abs(fc.prior_loss - c.loss[-1]) / c.loss[-1])
    print(f"  prior alone: mean final-loss error {np.mean(prior):.2%}")
    for f in FRACS + LATE_FRACS:
        print(f"  from {f:.0%}: mean {np.mean(errs[f]):.2%} worst {np.max(errs[f]):.2%}; "
              + band_line(errs[f], halfs[f], inside[f]))


def multipowerlaw(root: Path) -> bool:
    print("== multipowerlaw: fit on cosine_24000 + constant_24000, predict the other schedules")
    ok = True
    for size in ("25", "100"):
        files = sorted(root.glob(f"csv_{size}__*.csv"))
        curves = {f.stem.split("__")[1]: read_curve_csv(f) for f in files}
        fit = fit_curves([curves["cosine_24000"], curves["constant_24000"]])
        law = fit.law
        means, finals, covs, halfs, errs = [], [], [], [], []
        for name, c in sorted(curves.items()):
            if name in ("cosine_24000", "constant_24000"):
                continue
            p = law.predict(c.per_step_lr(), steps=c.steps)
            rel = np.abs(p.loss - c.loss) / c.loss
            means.append(rel.mean())
            finals.append(rel[-1])
            covs.append(coverage(p, c.loss))
            halfs.append((p.high - p.loss) / p.loss)
            errs.append(rel)
            print(f"  {size:>3}M {name:20} mean {rel.mean():.3%}  final {(p.loss[-1] - c.loss[-1]) / c.loss[-1]:+.3%}"
                  f"  in 90% band {covs[-1]:.0%}, half-width {sharpness(halfs[-1], rel):.1f}x mean |error|")
        m, w = float(np.mean(means)), float(np.max(finals))
        ok &= m <= 0.003 and w <= 0.01
        print(f"  {size:>3}M: mean {m:.3%} (target <= 0.3%), worst final {w:.3%} (target <= 1%), "
              f"band +-{law.band_rel:.2%}, coverage {np.mean(covs):.0%} of points (target 85-95%), half-width "
              f"{sharpness(np.concatenate(halfs), np.concatenate(errs)):.1f}x mean |error| (target <= 3); "
              f"widening past the pilots' summed LR {getattr(getattr(law, 'reach', None), 'per_ln_s1', 0.0):.2f} per unit "
              f"ln S1 at the peak LR, {getattr(getattr(law, 'reach', None), 'per_ln_s1_annealed', None) or 0.0:.2f} "
              "annealed")
    return ok


def olmo_sizes(curves: dict[str, list[Curve]]) -> bool:
    print("== OLMo ladder: fit on 190M + 370M curves, predict 760M")
    t = time.perf_counter()
    fit = fit_curves(curves["190M"] + curves["370M"])
    print(f"  fit on {len(curves['190M']) + len(curves['370M'])} curves in {time.perf_counter() - t:.1f} s; "
          f"band +-{fit.law.band_rel:.2%}")
    errs, covs, pt_err, pt_half = [], [], [], []
    for c in curves["760M"]:
        p = fit.law.predict(c.per_step_lr(), n_params=c.n_params, steps=c.steps)
        e = (p.loss[-1] - c.loss[-1]) / c.loss[-1]
        errs.append(abs(e))
        covs.append(coverage(p, c.loss))
        pt_err.append(np.abs(p.loss - c.loss) / c.loss)
        pt_half.append((p.high - p.loss) / p.loss)
        print(f"  {c.name:24} final {e:+.2%}  mean {np.mean(np.abs(p.loss - c.loss) / c.loss):.2%}  "
              f"in band {covs[-1]:.0%}")
    m, w = float(np.mean(errs)), float(np.max(errs))
    print(f"  760M final-loss error: mean {m:.2%} (target <= 1.0%), worst {w:.2%} (target <= 2.0%); "
          f"band coverage {np.mean(covs):.0%} of points, half-width "
          f"{sharpness(np.concatenate(pt_half), np.concatenate(pt_err)):.1f}x mean |error| of points")
    return m <= 0.01 and w <= 0.02


FRACS = (0.2, 0.4, 0.6)
# Late in a run (no target in the issue; the forecast there should be where the run is, with a band that still
# holds it): reported for the same runs, not scored.
LATE_FRACS = (0.9, 1.0)
BASELINE = {0.2: 0.027, 0.4: 0.016, 0.6: 0.006}  # prefix-only fits (science.md, 25 OLMo runs)
# The forecast settings tried when choosing them out of sample (ForecastSettings' fields).
GRID = [ForecastSettings(sigma_lnA=a) for a in (0.1, 0.3, 1.0)]


def _forecast_all(cases, settings: ForecastSettings | None = None, fracs=FRACS
                  ) -> dict[float, list[tuple[float, bool, float]]]:
    """(relative error, truth inside the band, relative half-width) per prefix fraction, for every (run, law) case."""
    out: dict[float, list[tuple[float, bool, float]]] = {f: [] for f in fracs}
    for target, law in cases:
        sched = target.per_step_lr()
        end = int(target.steps[-1])
        for f in fracs:
            m = target.steps <= f * end
            fc = forecast_final(law, sched, target.steps[m], target.loss[m], n_params=target.n_params,
                                settings=settings)
            out[f].append((abs(fc.loss - target.loss[-1]) / target.loss[-1], fc.low <= target.loss[-1] <= fc.high,
                           (fc.high - fc.low) / 2 / fc.loss))
    return out


def _score(res) -> float:
    return sum(np.mean([r[0] for r in res[f]]) / (BASELINE[f] / 2)
               + 10 * max(0.0, 0.85 - np.mean([r[1] for r in res[f]])) for f in FRACS)


def prefix_forecasts(curves: dict[str, list[Curve]]) -> bool:
    print("== OLMo cosine runs: forecast the final loss from a prefix, priors from the other runs")
    cases = []  # (run, law fitted without it)
    for cs in curves.values():
        for target in cs[:5]:  # the cosine runs
            # leave the run out, and the cooldown branched at the same multiple (it shares its prefix)
            mult = target.name.split("/")[1]
            others = [c for s2 in curves.values() for c in s2
                      if c.name != target.name and not (c.name.startswith("olmo-decay") and c.name.endswith(mult))]
            cases.append((target, fit_curves(others).law))
    t = time.perf_counter()
    res = _forecast_all(cases)
    per_forecast = (time.perf_counter() - t) / (len(cases) * len(FRACS))
    prior = [abs(law.predict(r.per_step_lr(), r.n_params, [int(r.steps[-1])]).loss[0] - r.loss[-1]) / r.loss[-1]
             for r, law in cases]
    print(f"  prior alone (law without the run): mean final-loss error {np.mean(prior):.2%}")

    def report(title: str, res) -> bool:
        print(f"  {title}")
        ok = True
        for f in FRACS:
            errs = [r[0] for r in res[f]]
            cov = float(np.mean([r[1] for r in res[f]]))
            ok &= np.mean(errs) <= BASELINE[f] / 2 and cov >= 0.85
            print(f"    from {f:.0%}: mean {np.mean(errs):.2%} worst {np.max(errs):.2%} "
                  f"(target <= {BASELINE[f] / 2:.2%}); " + band_line(errs, [r[2] for r in res[f]], [r[1] for r in res[f]]))
        return ok

    ok = report("library defaults (chosen on these 15 runs: in-sample for the settings):", res)
    late = _forecast_all(cases, fracs=LATE_FRACS)
    for f in LATE_FRACS:
        errs = [r[0] for r in late[f]]
        print(f"    late, from {f:.0%}: mean {np.mean(errs):.2%} worst {np.max(errs):.2%}; "
              + band_line(errs, [r[2] for r in late[f]], [r[1] for r in late[f]]))
    # Out of sample for the settings too: choose them on two sizes, forecast the third.
    pooled: dict[float, list[tuple[float, bool, float]]] = {f: [] for f in FRACS}
    chosen = {}
    for size in curves:
        train = [(r, law) for r, law in cases if f"/{size}-" not in r.name]
        test = [(r, law) for r, law in cases if f"/{size}-" in r.name]
        best = min(GRID, key=lambda g: _score(_forecast_all(train, g)))
        chosen[size] = best
        held = _forecast_all(test, best)
        for f in FRACS:
            pooled[f].extend(held[f])
    report("settings chosen on the other two sizes, forecasting the third (out of sample): "
           + ", ".join(f"{k}: sigma_lnA={v.sigma_lnA}" for k, v in chosen.items()), pooled)
    print(f"  forecast time: {per_forecast * 1e3:.1f} ms each")
    return ok


def cross_size_forecasts(curves: dict[str, list[Curve]]) -> None:
    """Issue 14's benchmark: a law on two sizes forecasts every curve of the third from its prefix."""
    print("== OLMo ladder: a law fitted on two sizes forecasts the third size's final loss from its prefix")
    by_distance: dict[float, list[tuple[float, bool, float]]] = defaultdict(list)  # ln N outside the pilots -> forecasts
    for held in ("760M", "190M", "370M"):
        t = time.perf_counter()
        law = fit_curves([c for size, cs in curves.items() if size != held for c in cs]).law
        took = time.perf_counter() - t
        cal = getattr(law, "forecast_band", None)  # None: a library from before issue 14
        print(f"  fit on {' + '.join(s for s in curves if s != held)} in {took:.1f} s "
              f"(band calibrated on {cal.replays if cal else 0} replays), forecasting {held}:")
        for which, targets in (("cosine", curves[held][:5]), ("all", curves[held])):
            for f in FRACS:
                errs, inside, halfs = [], [], []
                for c in targets:
                    end = int(c.steps[-1])
                    m = c.steps <= f * end
                    fc = forecast_final(law, c.per_step_lr(), c.steps[m], c.loss[m], n_params=c.n_params,
                                        final_step=end)
                    errs.append(abs(fc.loss - c.loss[-1]) / c.loss[-1])
                    inside.append(fc.low <= c.loss[-1] <= fc.high)
                    halfs.append((fc.high - fc.low) / 2 / fc.loss)
                    if which == "all":
                        by_distance[round(law.n_outside(c.n_params), 2)].append((errs[-1], inside[-1], halfs[-1]))
                print(f"    {which:6} from {f:.0%}: mean {np.mean(errs):.2%} worst {np.max(errs):.2%}; "
                      + band_line(errs, halfs, inside))
    print("  by distance in ln N outside the pilot sizes (all curves, 20/40/60% pooled):")
    for d, rows in sorted(by_distance.items()):
        e, i, h = (np.array(v) for v in zip(*rows, strict=True))
        print(f"    {d:.2f}: mean error {e.mean():.2%}; " + band_line(e, h, i))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--form", default=None, help="the cross-size curve-law form to fit (linear_ln_n or "
                   "power_floor_l0; default: the library's); same-size fits are the same in either")
    args = p.parse_args()
    if args.form:
        curve_fit.DEFAULT_FORM = args.form
    print(f"curve-law form across sizes: {curve_fit.DEFAULT_FORM}")
    root = Path(args.data)
    warnings.simplefilter("ignore")
    results = {"multipowerlaw": multipowerlaw(root / "multipowerlaw")}
    curves = olmo_curves(root / "olmo_ladder" / "loss_curves.csv")
    results["olmo sizes"] = olmo_sizes(curves)
    results["prefix"] = prefix_forecasts(curves)
    cross_size_forecasts(curves)
    multipowerlaw_prefix(root / "multipowerlaw")
    print("targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
