"""Chinchilla-law intervals far from the pilots: errors and coverage against distance (issue 12, item 2).

    python benchmarks/extrapolation_coverage.py [--bootstrap 200] [--exponents free|tied|auto] [--tie-exponents]

1. Gadre et al. 2024: fit the runs up to 411M, predict the 1.4B (1x and 4x/16x/32x Chinchilla
   tokens) and 6.9B (1x) runs, for each training set; C4-trained on c4_val is the issue's target
   (<= 1.5% error on each, with 95% intervals that contain the truth). Each training set is
   scored on its own validation set (paloma) and on C4 validation (Gadre et al.'s evaluation).
2. Nested leave-the-largest-out on every suitable set in ../shared/data: hold out the largest
   model size (then the two largest), fit and calibrate on the rest (the calibration only sees the
   kept runs), predict the held-out runs. Coverage of the 95% interval, bootstrap only and
   with the extrapolation term, by distance from the kept pilots (decades, max of N and 6ND).

``--exponents auto`` lets every fit choose alpha = beta or free from its own pilots' leave-the-
largest-out folds (scalewatch fit's rule, :func:`scalewatch.extrapolation.choose_exponents`) and
prints which it chose; ``--tie-exponents`` is ``--exponents tied``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalewatch.data import read_runs  # noqa: E402
from scalewatch.extrapolation import calibrate_extrapolation, compare_exponents, predict_with_interval  # noqa: E402
from scalewatch.fitting import RunSet, _group_by, fit_chinchilla, make_runs  # noqa: E402
from scalewatch.laws import ChinchillaLaw  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GADRE = DATA / "gadre2024_overtraining" / "final_losses.csv"
VAL = "val_data=training/eval_data/"
SETS = {
    "Gadre C4 -> c4_val": (GADRE, ["dataset=c4_original", VAL + "c4_val/shard-{0000000..0000010}.tar"]),
    "Gadre RedPajama -> paloma_redpajama": (GADRE, ["dataset=rpj", VAL + "val_tok_mult/paloma_redpajama/00000001.tar"]),
    "Gadre RefinedWeb -> paloma_refinedweb": (GADRE, ["dataset=rw_original",
                                                       VAL + "val_tok_mult/paloma_falcon-refinedweb/00000001.tar"]),
    "Gadre RedPajama -> c4_val": (GADRE, ["dataset=rpj", VAL + "c4_val/shard-{0000000..0000010}.tar"]),
    "Gadre RefinedWeb -> c4_val": (GADRE, ["dataset=rw_original", VAL + "c4_val/shard-{0000000..0000010}.tar"]),
}
BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 9.0))


FORM = "free"  # --exponents: free, tied (alpha = beta in every fit and calibration fold) or auto
PICKS: list[tuple[str, str]] = []  # (which fit, what auto chose and why)


def _form(runs: RunSet, label: str) -> bool:
    """Whether this fit ties alpha = beta (auto: decided on these runs' own folds, and recorded)."""
    if FORM != "auto":
        return FORM == "tied"
    choice = compare_exponents(runs)
    PICKS.append((label, choice.reason()))
    print(f"    [{label}] {choice.reason()}")
    return choice.form == "tied"


def _fit(runs: RunSet, n_bootstrap: int, label: str = ""):
    tie = _form(runs, label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_chinchilla(runs, n_bootstrap=n_bootstrap, tie_exponents=tie)
        band = calibrate_extrapolation(runs, tie_exponents=tie)
    return fit, [ChinchillaLaw(*row) for row in fit.samples], band


def gadre_targets(name: str, n_bootstrap: int) -> None:
    runs = read_runs([SETS[name][0]], where=SETS[name][1])
    pilots = runs.subset(np.flatnonzero(runs.N < 5e8))
    fit, samples, band = _fit(pilots, n_bootstrap, f"{name}, runs <= 411M")
    print(f"{name}: fit on {len(pilots)} runs <= 411M; calibration k = {band.k_per_decade:.4f} per decade "
          f"from {len(band.held_out)} held-out predictions")
    print(f"  {'target':<16} {'true':>7} {'pred':>7} {'error':>7} {'dist':>5}  {'bootstrap 95%':>17}  "
          f"{'calibrated 95%':>17}  holds")
    for i in np.flatnonzero(runs.N > 5e8):
        p = predict_with_interval(fit.law, samples, band, runs.N[i], runs.D[i])
        label = f"{runs.N[i] / 1e9:.1f}B {runs.D[i] / runs.N[i] / 20:.0f}x"
        print(f"  {label:<16} {runs.L[i]:7.4f} {p.loss:7.4f} {100 * (p.loss / runs.L[i] - 1):+6.2f}% {p.distance:5.2f}  "
              f"{p.bootstrap_low:7.4f}-{p.bootstrap_high:<7.4f}  {p.low:7.4f}-{p.high:<7.4f}  "
              f"boot {p.bootstrap_low <= runs.L[i] <= p.bootstrap_high}, calibrated {p.contains(runs.L[i])}")


def olmo_two_sizes() -> None:
    """OLMo ladder final losses (cosine runs, c4_en): fit 190M + 370M, predict 760M (too few sizes to calibrate)."""
    final: dict[str, tuple[float, float, float]] = {}
    with (DATA / "olmo_ladder" / "loss_curves.csv").open() as f:
        for r in csv.DictReader(f):
            if r["subset"] == "peteish-moreeval":
                t = float(r["throughput/total_tokens"])
                if t > final.get(r["run"], (0.0,))[0]:
                    final[r["run"]] = (t, float(r["n_params_final_json"]), float(r["eval/c4_en-validation/CrossEntropyLoss"]))
    D, N, L = (np.array(v) for v in zip(*final.values()))
    runs = make_runs(N, D, L)
    small, big = np.flatnonzero(N < 6e8), np.flatnonzero(N > 6e8)
    tie = _form(runs.subset(small), "OLMo 190M + 370M")
    if FORM == "auto":
        _form(runs, "OLMo all three sizes (not used for the prediction)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_chinchilla(runs.subset(small), n_bootstrap=0, tie_exponents=tie)
    err = 100 * (fit.law.predict(N[big], D[big]) / L[big] - 1)
    print(f"OLMo ladder final c4_en losses: fit {len(small)} cosine runs of 190M + 370M, predict the {len(big)} 760M "
          f"runs (0.5-10x): |error| mean {np.abs(err).mean():.2f}%, worst {np.abs(err).max():.2f}% "
          f"({' '.join(f'{e:+.2f}' for e in err[np.argsort(D[big])])})")


def nested(name: str, runs: RunSet, n_bootstrap: int, rows: list) -> None:
    sizes = _group_by(runs.N, 0.02)
    for n_out in (1, 2):
        if len(sizes) - n_out < 4:  # the calibration needs 3 sizes after its own hold-out
            continue
        keep, held = np.concatenate(sizes[:-n_out]), np.concatenate(sizes[-n_out:])
        fit, samples, band = _fit(runs.subset(keep), n_bootstrap, f"{name}, without the {n_out} largest")
        if band is None:
            continue
        errs = []
        for i in held:
            p = predict_with_interval(fit.law, samples, band, runs.N[i], runs.D[i])
            rows.append((name, p.distance, p.loss / runs.L[i] - 1, p.bootstrap_low <= runs.L[i] <= p.bootstrap_high,
                         p.contains(runs.L[i]), p.high / p.low))
            errs.append(abs(p.loss / runs.L[i] - 1))
        print(f"  {name}: hold out the {n_out} largest size(s) ({len(held)} runs, N >= {runs.N[held].min():.3g}); "
              f"k = {band.k_per_decade:.4f}/decade; |error| mean {100 * np.mean(errs):.2f}%, worst {100 * max(errs):.2f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--exponents", choices=("free", "tied", "auto"), default="free",
                    help="exponent form of every fit (scalewatch fit --exponents); default free")
    ap.add_argument("--tie-exponents", action="store_true", help="--exponents tied (scalewatch fit --tie-exponents)")
    args = ap.parse_args()
    global FORM
    FORM = "tied" if args.tie_exponents else args.exponents
    print(f"fits: {dict(free='alpha, beta free', tied='alpha = beta tied', auto='auto (each fit chooses)')[FORM]}")
    if FORM == "auto":
        print("\nauto on each whole set (every size):")
        for name, (path, where) in SETS.items():
            _form(read_runs([path], where=where), name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dbl = read_runs([DATA / "datablations" / "muennighoff2023_final_val_losses.csv"])
        _form(dbl.subset(np.flatnonzero(dbl.D <= dbl.U)), "datablations single-epoch")
        print()
    for name in SETS:
        gadre_targets(name, args.bootstrap)
    olmo_two_sizes()
    print("\nNested leave-the-largest-out:")
    rows: list = []
    for name, (path, where) in SETS.items():
        nested(name, read_runs([path], where=where), args.bootstrap, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 296 rows, 138 distinct (N, D): the repeated-data runs, filtered next
        dbl = read_runs([DATA / "datablations" / "muennighoff2023_final_val_losses.csv"])
    nested("datablations single-epoch", dbl.subset(np.flatnonzero(dbl.D <= dbl.U)), args.bootstrap, rows)
    print(f"\n  {'distance (decades)':<20} {'runs':>5} {'mean |err|':>10} {'bootstrap holds':>16} "
          f"{'calibrated holds':>17} {'median width':>13}")
    for lo, hi in BUCKETS:
        sel = [r for r in rows if lo <= r[1] < hi]
        if not sel:
            continue
        err = np.mean([abs(r[2]) for r in sel])
        boot, cal = np.mean([r[3] for r in sel]), np.mean([r[4] for r in sel])
        width = np.median([r[5] for r in sel]) - 1
        print(f"  {f'{lo:.2f}-{hi:.2f}':<20} {len(sel):>5} {100 * err:9.2f}% {100 * boot:15.0f}% {100 * cal:16.0f}% "
              f"{100 * width:12.1f}%")
    if PICKS:
        forms = [reason.split(",")[0].split(": ")[1].split(" ")[0] for _, reason in PICKS]
        print(f"\nauto chose tied in {forms.count('tied')} of {len(forms)} fits, free in {forms.count('free')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
