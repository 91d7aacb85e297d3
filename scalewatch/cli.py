"""The ``scalewatch`` command.

Every subcommand has ``--json`` for machine-readable output and exits non-zero
with a one-line reason on bad input (status 2) or a fit that did not converge
(status 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from scalewatch import __version__

RUN_COLUMNS_HELP = ("CSV/JSON columns (case-insensitive): N = params|n_params|N|parameters; "
                    "D = tokens|D|n_tokens|train_tokens (or C = compute|flops, D = C/6N); "
                    "loss = loss|L|final_loss|val_loss|eval_loss; optional unique_tokens, name")


DEFAULT_EXPONENTS = "free"  # `scalewatch fit --exponents` when not given: auto is not better on every set (README)


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def _param_table(params: dict[str, float], ci95: dict[str, tuple[float, float]]) -> list[str]:
    """A fitted law's parameters with their 95% bootstrap intervals, as printed by ``scalewatch fit``."""
    lines = [f"  {'param':<6} {'value':>12} {'95% CI (bootstrap)':>30}"]
    for k, v in params.items():
        lo, hi = ci95.get(k, (math.nan, math.nan))
        lines.append(f"  {k:<6} {_fmt(v):>12} {_fmt(lo):>14} – {_fmt(hi):<14}")
    return lines


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=float))
    else:
        print(text)


# ------------------------------------------------------------------------ fit
def _cmd_fit(args: argparse.Namespace) -> int:
    from scalewatch.data import read_runs
    from scalewatch.fitting import FitError, approach1, approach2, fit_chinchilla
    from scalewatch.laws import save_law

    if args.tie_exponents and args.exponents not in (None, "tied"):
        raise CLIError(f"--tie-exponents is --exponents tied; give one of --tie-exponents and "
                       f"--exponents {args.exponents}")
    if args.tie_exponents:
        args.exponents = "tied"
    flag = "--tie-exponents" if args.tie_exponents else f"--exponents {args.exponents}"
    args.exponents_flag = flag
    if args.exponents in ("tied", "auto") and (args.curves or args.method != 3):
        given = "--curves" if args.curves else f"--method {args.method}"
        what = "ties alpha = beta" if args.exponents == "tied" else "chooses alpha = beta or free"
        raise CLIError(f"{flag} {what} in Approach 3's law L(N, D); drop {given} (or {flag})")
    if args.exponents == "auto" and args.data_constrained:
        raise CLIError("--exponents auto chooses the form of the plain law L(N, D); with --data-constrained use "
                       "--exponents tied (with --two-stage) or leave it out")
    args.tie_exponents = args.exponents == "tied"  # the data-constrained fit's --two-stage base
    if args.two_stage and not args.data_constrained:
        raise CLIError("--two-stage is for --data-constrained fits; add --data-constrained or drop --two-stage")
    if args.run_column and not args.curves:
        raise CLIError("--run-column splits a loss-curve CSV into runs; it goes with --curves")
    named = [f"--{k}-column" for k in ("tokens", "flops") if getattr(args, f"{k}_column")]
    if named and args.curves:
        raise CLIError(f"{', '.join(named)} name columns of a table of final losses (RUNS); loss curves take "
                       "--loss-column, --n-column and --run-column")
    if args.lr_schedule and not args.curves:
        raise CLIError("--lr-schedule describes the LR of loss curves; it goes with --curves")
    if args.plot and not args.curves:  # before the fit, not after minutes of bootstrap
        _check_matplotlib()
    if args.curves:
        if args.runs:
            raise CLIError("give either RUNS (final points, a law L(N, D)) or --curves FILES (loss curves), not both")
        return _cmd_fit_curves(args)
    if not args.runs:
        raise CLIError("give one or more CSV/JSON files of pilot runs")
    if args.data_constrained:
        return _cmd_fit_data_constrained(args)
    if args.base:
        raise CLIError("--base is for --data-constrained fits; add --data-constrained or drop --base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = read_runs(args.runs, loss_column=args.loss_column, where=args.where, columns=_columns(args))
            choice = None
            if args.method == 3:
                choice = _exponent_choice(args, runs)
                result = fit_chinchilla(runs, n_bootstrap=args.bootstrap, seed=args.seed,
                                        tie_exponents=choice.form == "tied")
                if choice.has_evidence or choice.chosen_by == "auto":
                    result.exponents = choice.as_dict()
            else:
                result = (approach1 if args.method == 1 else approach2)(runs, n_bootstrap=args.bootstrap,
                                                                        seed=args.seed)
        except FitError as exc:
            raise CLIError(str(exc)) from None
    for w in caught:
        print(f"scalewatch fit: warning: {w.message}", file=sys.stderr)

    if args.method != 3:
        if args.out:
            raise CLIError("--out writes a law L(N, D); use --method 3 for a law file")
        payload = {"method": args.method, "n_runs": len(runs), **result.as_dict()}
        text = (f"{result.method}\n"
                f"  N_opt ∝ C^a:  a = {result.exponent:.4f}  (95% CI {result.ci95[0]:.4f} – {result.ci95[1]:.4f})\n"
                f"  D_opt ∝ C^b:  b = {result.d_exponent:.4f}\n"
                f"  from {len(result.points)} compute budgets over {len(runs)} runs")
        _emit(args, payload, text)
        _maybe_plot(args, runs, None, result)
        return 0

    record = result.to_record()
    band = None
    if args.calibrate:
        from scalewatch.extrapolation import calibrate_extrapolation

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            band = calibrate_extrapolation(runs, n_bootstrap=min(args.bootstrap, 100), seed=args.seed,
                                           tie_exponents=result.tie_exponents)
        if band is not None:
            record.extrapolation = band.to_json()
    if args.n_convention:
        record.law.conventions["n_params"] = args.n_convention
    if args.loss_name:
        record.law.conventions["loss"] = args.loss_name
    params = result.law.params()
    payload = {"family": "chinchilla", "params": params, "ci95": {k: list(v) for k, v in result.ci95.items()},
               "fit": record.fitted_on, "conventions": record.law.conventions}
    lines = [f"Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta, fitted on {result.n_runs} runs "
             f"(N {_fmt(result.N_range[0])}–{_fmt(result.N_range[1])}, D {_fmt(result.D_range[0])}–"
             f"{_fmt(result.D_range[1])})",
             *_param_table(params, result.ci95)]
    r = result.residuals
    lines.append(f"  fit quality: RMSE(log L) {r.rmse:.4f}, max |resid| {r.max_abs:.4f}, R² {r.r2:.4f}; "
                 f"optimiser: {result.message}")
    if band is not None:
        lines.append(f"  extrapolation: the log-loss sd grows by {band.k_per_decade:.4f} per decade beyond N "
                     f"{_fmt(band.N_max)} or C {_fmt(band.C_max)} (from {len(band.held_out)} leave-the-largest-out "
                     "predictions); `scalewatch plan` widens its intervals by it")
        payload["extrapolation"] = {"k_per_decade": band.k_per_decade, "N_max": band.N_max, "C_max": band.C_max,
                                    "n_held_out": len(band.held_out)}
        if choice.has_evidence:
            payload["extrapolation"]["mean_abs_log_error"] = {"free": choice.free_error, "tied": choice.tied_error}
    elif args.calibrate:
        lines.append("  extrapolation: not calibrated (needs 3 model sizes left after holding out the largest); "
                     "intervals far from the pilots are bootstrap-only and too narrow")
    # Which exponent form was fitted and why, in one line (the evidence is also in fitted_on.exponents).
    # Without --no-calibrate the choice says itself why (too few sizes, or the folds' errors).
    lines.append("  " + (choice.reason() if args.calibrate or choice.chosen_by == "auto" else
                         f"exponents: {'tied (alpha = beta)' if choice.form == 'tied' else 'free (alpha, beta)'}, "
                         f"{'as asked (' + args.exponents_flag + '; ' if args.exponents else 'the default ('}"
                         "--no-calibrate: the forms were not compared)"))
    if args.out:
        save_law(record, args.out)
        lines.append(f"  law written to {args.out}")
    _emit(args, payload, "\n".join(lines))
    _maybe_plot(args, runs, result.law, None)
    if not result.converged:
        print(f"scalewatch fit: error: the fit did not converge ({result.message})", file=sys.stderr)
        return 1
    return 0


def _exponent_choice(args: argparse.Namespace, runs):
    """The exponent form to fit (``--exponents``, default :data:`DEFAULT_EXPONENTS`) and the folds' evidence.

    ``auto`` always refits the leave-the-largest-out folds both ways (point fits: cheap); a form asked
    for is compared as well when the calibration runs, so the output and the law file show both errors.
    """
    from scalewatch.extrapolation import ExponentChoice, compare_exponents

    form = args.exponents or DEFAULT_EXPONENTS
    by = "given" if args.exponents else "default"
    if form == "auto" or args.calibrate:
        choice = compare_exponents(runs, form, seed=args.seed)
        if form != "auto":
            choice.chosen_by = by
        return choice
    return ExponentChoice(form=form, chosen_by=by)


def _cmd_fit_data_constrained(args: argparse.Namespace) -> int:
    from scalewatch.data import read_runs
    from scalewatch.fitting import FitError, fit_data_constrained
    from scalewatch.laws import LawFileError, load_law, save_law

    if args.method != 3:
        raise CLIError("--data-constrained fits the law L(N, D, U); drop --method")
    if args.base and (args.two_stage or args.tie_exponents):
        extra = "--two-stage" if args.two_stage else args.exponents_flag
        raise CLIError(f"--base holds E, A, B, alpha, beta at the given law, so {extra} has nothing to fit; "
                       f"drop {extra} to use that base, or drop --base to fit the base here")
    if args.tie_exponents and not args.two_stage:
        raise CLIError(f"with --data-constrained, {args.exponents_flag} applies to the --two-stage base fit; "
                       "add --two-stage")
    base = None
    if args.base:
        try:
            base = load_law(args.base, family="chinchilla").law
        except LawFileError as exc:
            raise CLIError(str(exc)) from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = read_runs(args.runs, loss_column=args.loss_column, where=args.where, columns=_columns(args))
            result = fit_data_constrained(runs, base=base, n_bootstrap=args.bootstrap, seed=args.seed,
                                          two_stage=args.two_stage, tie_exponents=args.tie_exponents)
        except FitError as exc:
            raise CLIError(str(exc)) from None
    for w in caught:
        print(f"scalewatch fit: warning: {w.message}", file=sys.stderr)
    record = result.to_record()
    if args.n_convention:
        record.law.conventions["n_params"] = args.n_convention
    if args.loss_name:
        record.law.conventions["loss"] = args.loss_name
    params = result.law.params()
    lines = [f"Data-constrained law (Muennighoff et al. 2023) fitted on {result.n_runs} runs "
             f"({result.n_repeated} repeat their data)" + (f"; E, A, B, alpha, beta held at {args.base}" if base else "")
             + ("; two stages: the base fitted on the single-epoch runs"
                + (" with alpha = beta" if args.tie_exponents else "") + ", then held" if result.two_stage else ""),
             *_param_table(params, result.ci95)]
    r = result.residuals
    lines.append(f"  R_D, R_N: Muennighoff et al.'s R*_D, R*_N (decay constants of repeated data and excess parameters); "
                 f"fit quality: RMSE(log L) "
                 f"{r.rmse:.4f}, max |resid| {r.max_abs:.4f}; optimiser: {result.message}")
    if args.out:
        save_law(record, args.out)
        lines.append(f"  law written to {args.out}")
    payload = {"family": "data_constrained", "params": params, "ci95": {k: list(v) for k, v in result.ci95.items()},
               "fit": record.fitted_on, "conventions": record.law.conventions}
    _emit(args, payload, "\n".join(lines))
    if not result.converged:
        print(f"scalewatch fit: error: the fit did not converge ({result.message})", file=sys.stderr)
        return 1
    return 0


def _columns(args: argparse.Namespace) -> dict[str, str | None]:
    """The columns named on the command line, by quantity (for :func:`scalewatch.data.read_runs`)."""
    return {"N": args.n_column, "D": args.tokens_column, "C": args.flops_column}


def _cmd_fit_curves(args: argparse.Namespace) -> int:
    import numpy as np

    from scalewatch.curve_fit import fit_curves
    from scalewatch.curves import CurveError, read_curves, save_curve_law

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            curves = read_curves(args.curves, loss_column=args.loss_column, where=args.where,
                                 run_column=args.run_column, schedule=args.lr_schedule, n_column=args.n_column)
            result = fit_curves(curves, loss_name=args.loss_name or args.loss_column or "loss",
                                n_convention=args.n_convention or "total", form=args.curve_form)
        except CurveError as exc:
            raise CLIError(str(exc)) from None
    for w in caught:
        print(f"scalewatch fit: warning: {w.message}", file=sys.stderr)
    law = result.law
    if args.out:
        save_curve_law(law, args.out)
    sizes = law.fitted_on.get("sizes") or []
    payload = {"family": law.family, "params": {k: list(v) for k, v in law.coef.items()}, "n_ref": law.n_ref,
               "band_rel_90": law.band_rel, "in_sample_mean_rel_error": result.in_sample,
               "held_out_mean_rel_error": result.held_out, "sizes": sizes, "out": args.out,
               "converged": result.converged, "message": result.message, "form": law.form}
    lines = [f"curve law (Tissue et al. momentum law) from {len(curves)} curve{'s' * (len(curves) != 1)}"
             + (f" at {len(sizes)} sizes, form {law.form}" if len(sizes) >= 2 else
                " at one size (no N-dependence)" if sizes else "")]
    if len(sizes) >= 2 and "E" in law.coef:  # the floor form: the loss in N levels off at E
        lines.append(f"  long-training level in N: L0 = {law.coef['E'][0]:.4g} + {math.exp(law.coef['lnB'][0]):.4g}"
                     f"*(N/{law.n_ref:.4g})^-{law.coef['beta'][0]:.3f} (floor E = {law.coef['E'][0]:.4g})")
    for n in (sizes or [None]):
        m = law.at(n)
        lines.append(f"  {'N=' + _fmt(n) if n else 'one size'}: L0={m.L0:.4f} A={m.A:.4g} alpha={m.alpha:.4f} "
                     f"C={m.C:.4g} (lambda={law.lam})")
    lines.append(f"  fit error: mean {np.mean(list(result.in_sample.values())):.3%} per curve; "
                 f"90% band +-{law.band_rel:.2%} (from held-out errors)")
    if args.out:
        lines.append(f"law file written to {args.out}")
    _emit(args, payload, "\n".join(lines))
    if not result.converged:  # the law is still usable (best of several starts); say so, do not fail
        print(f"scalewatch fit: warning: {result.message}", file=sys.stderr)
    return 0


def _check_matplotlib() -> None:
    """A one-line :class:`CLIError` when ``--plot`` cannot be drawn, said before any work (not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'scalewatch[plot]' (or drop --plot)") from None


def printed_steps(last: int, points: int) -> list[int]:
    """The ``points`` steps ``predict`` prints for a schedule ending at step ``last``: evenly spaced, the last
    one ``last`` (step 0, before any training, has no loss to predict); every step 1..last when fewer.

    Example:
        >>> printed_steps(1000, 3), printed_steps(1000, 1), printed_steps(4, 21)
        ([333, 667, 1000], [1000], [1, 2, 3, 4])
        >>> len(printed_steps(143_000, 21))
        21
    """
    return sorted({max(1, round(last * k / points)) for k in range(1, points + 1)})


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from scalewatch.curves import CurveError, load_curve_law, schedule_from_arg
    from scalewatch.laws import LawFileError

    if args.points < 1:
        raise CLIError(f"--points must be at least 1, got {args.points}")
    if args.plot:
        _check_matplotlib()
    try:
        law = load_curve_law(args.law)
    except LawFileError as exc:
        raise CLIError(str(exc)) from None
    if args.n_params is not None and not args.n_params > 0:
        raise CLIError(f"--n-params must be positive, got {args.n_params}")
    if law.n_range is not None and args.n_params is None:
        raise CLIError("this law was fitted on several sizes: give --n-params N for the run to predict")
    try:
        schedule = schedule_from_arg(args.schedule, None)  # a spec without total= says to give it
        rows = printed_steps(len(schedule) - 1, args.points)
        pred = law.predict(schedule, n_params=args.n_params, steps=rows)
    except CurveError as exc:
        raise CLIError(str(exc)) from None
    if law.n_range is None and args.n_params is not None:
        from scalewatch.config import size_warning

        said = size_warning(law, args.n_params)
        if said:
            print(f"scalewatch predict: warning: {said}", file=sys.stderr)
    if args.n_params is not None and law.n_range is not None:
        lo, hi = law.n_range
        if not lo <= args.n_params <= hi:
            r = law.size_reach
            # A law of 2 sizes has no size_reach either (nothing to measure it with): only a file of 3+ sizes
            # without one predates the measurement.
            sizes = law.fitted_on.get("sizes")
            n_sizes = len(sizes) if isinstance(sizes, list) and sizes else None
            how = ("by 1 + the distance in ln N (this law file predates that measurement: refit it with "
                   "`scalewatch fit --curves` to measure it, with 3+ pilot sizes)"
                   if r is None and (n_sizes is None or n_sizes >= 3) else
                   "by 1 + the distance in ln N (not measured: leaving a size out needs 3+ pilot sizes"
                   + (f"; this law has {n_sizes})" if n_sizes and n_sizes < 3 else ")")
                   if r is None or not r.points else
                   f"by {r.per_ln_n:.2f} per unit ln N, measured by leaving the largest and smallest size out up "
                   f"to {r.n_out_max:.2f} in ln N (at least 1 per unit further out)")
            print(f"scalewatch predict: warning: N={_fmt(args.n_params)} is outside the pilot sizes "
                  f"{_fmt(lo)}..{_fmt(hi)}; the band is widened for the extrapolation {how}", file=sys.stderr)
    from scalewatch.data import unit_warnings

    for said in unit_warnings(law.n_range):  # a law fitted with N in billions predicts nonsense at a real N
        print(f"scalewatch predict: warning: the law's pilot sizes: {said} when fitting it", file=sys.stderr)
    # A predicted loss at or below 0 is impossible: refuse those steps (clamping would print a made-up 0), keep
    # the steps before them, exit 1. A band reaching below 0 is cut at 0: a loss is never below it, so the cut
    # band still holds every loss the uncut one allowed.
    bad = np.flatnonzero(~(pred.loss > 0))
    keep = slice(None) if not len(bad) else slice(0, int(bad[0]))
    rows_out = [{"step": int(s), "loss": float(v), "low": max(float(lo_), 0.0), "high": float(hi_)}
                for s, v, lo_, hi_ in zip(pred.steps[keep], pred.loss[keep], pred.low[keep], pred.high[keep],
                                          strict=True)]
    said = _reach_note(law, schedule, pred, keep, args.n_params)
    if said:
        print(f"scalewatch predict: warning: {said}", file=sys.stderr)
    if len(bad):
        m = law.at(args.n_params)
        print(f"scalewatch predict: error: the law predicts a loss of {float(pred.loss[bad[0]]):.4g} (at or below 0) "
              f"from step {int(pred.steps[bad[0]])} on (its level L0={m.L0:.4g}, alpha={m.alpha:.3g}): those steps are "
              "left out; this schedule is beyond what the law can predict: refit it on longer or more pilot curves",
              file=sys.stderr)
    text = [f"predicted loss ({law.conventions.get('loss', 'loss')}), {int(pred.level * 100)}% band:",
            f"{'step':>10} {'loss':>9} {'low':>9} {'high':>9}"]
    text += [f"{r['step']:>10} {r['loss']:9.4f} {r['low']:9.4f} {r['high']:9.4f}" for r in rows_out]
    _emit(args, {"law": args.law, "n_params": args.n_params, "level": pred.level, "points": rows_out,
                 **({"left_out_from_step": int(pred.steps[bad[0]])} if len(bad) else {})}, "\n".join(text))
    if args.plot:  # matplotlib is there: checked before the work
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        shown = [[r[k] for r in rows_out] for k in ("step", "loss", "low", "high")]  # the steps printed
        ax.fill_between(shown[0], shown[2], shown[3], alpha=0.3, label=f"{int(pred.level * 100)}% band")
        ax.plot(shown[0], shown[1], label="predicted")
        ax.set_xlabel("step")
        ax.set_ylabel(law.conventions.get("loss", "loss"))
        ax.legend()
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    return 1 if len(bad) else 0


# Past this widening of the band (x its width at the pilots' summed LR), or where the band reaches +-100% of the
# loss, a prediction says little: `predict` adds that a law fitted on the pilots' lengths should not be used this
# far beyond them. 5x: multipowerlaw's constant-LR run 3x longer than its pilots widens 3.1x and its band still
# holds the truth at 2x its error (README), so it is not flagged; the trial's 600-step law asked for 6,000 steps
# widens 20x, to +-270%.
REACH_TOO_FAR = 5.0


def _reach_note(law: Any, schedule: Any, pred: Any, keep: slice, n_params: float | None) -> str | None:
    """One line when the schedule's summed LR goes past the pilots' (the law's ScheduleReach): from which step,
    how far, and how much the band widened for it up to the last printed step (``keep``), or that it was not."""
    import numpy as np

    from scalewatch.curves import schedule_features

    reach = law.reach
    if reach is None:  # files from before ScheduleReach: the pilots' summed LR is not recorded
        return None
    s1_max = reach.s1_max
    S1, _ = schedule_features(schedule, law.lam)
    past = np.flatnonzero(S1 > s1_max)
    if not len(past):
        return None
    ratio = float(S1[-1] / s1_max)
    head = (f"the schedule's summed LR goes past the pilots' ({s1_max:.4g}) from step {int(past[0])}, to "
            f"{ratio:.3g}x theirs at step {len(schedule) - 1}")
    if reach.per_ln_s1 == 0 and not reach.per_ln_s1_annealed:
        return head + ("; the band is NOT widened for it (this law file measured no widening: its pilots' held-out "
                       "points never went past the fits' summed LR)")
    # every step up to the last one printed (a step refused for a loss <= 0 is not judged)
    printed = np.asarray(pred.steps, dtype=int)[keep]
    if not len(printed):
        return head
    steps = np.arange(1, int(printed[-1]) + 1)
    lr_rel = schedule[steps] / schedule.max()
    factor = np.asarray(reach.factor(S1[steps], lr_rel), dtype=float)
    k = int(np.argmax(factor))
    rates = (f"{reach.per_ln_s1:.3g} per unit ln S1 at the peak LR"
             + (f", {reach.per_ln_s1_annealed:.3g} annealed" if reach.per_ln_s1_annealed is not None else "")
             + f", from {reach.points} held-out pilot points")
    rel = float(law.band_at(n_params, steps[k] / (len(schedule) - 1), float(S1[steps[k]]), float(lr_rel[k])))
    note = (f"{head}; the band is widened for it (ScheduleReach: {rates}), up to {factor[k]:.3g}x at step "
            f"{int(steps[k])}, to +-{rel:.1%} of the loss")
    if factor[k] > REACH_TOO_FAR or rel >= 1:
        note += ("; a law fitted on the pilots' lengths should not be used this far beyond them: fit it on pilot "
                 "curves as long as this run")
    return note


def _maybe_plot(args: argparse.Namespace, runs: Any, law: Any, power: Any) -> None:
    if not args.plot:
        return
    from scalewatch.plotting import plot_fit

    try:
        plot_fit(runs, law, args.plot, power=power)
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'scalewatch[plot]'") from None
    print(f"plot written to {args.plot}", file=sys.stderr)


# ----------------------------------------------------------------------- plan
def _cmd_plan(args: argparse.Namespace) -> int:
    from scalewatch.laws import (
        ChinchillaLaw,
        DataConstrainedLaw,
        LawFileError,
        LawRecord,
        PlanningError,
        data_constrained_plan,
        inference_optimal,
        interval,
        load_law,
        optimal_allocation,
        tokens_for_loss,
    )

    if args.flops is None and args.target_loss is None:
        raise CLIError("give --flops C (compute-optimal plan) or --target-loss L with --n-params N")
    for name in ("flops", "inference_tokens", "unique_tokens", "n_params", "target_loss"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise CLIError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    if args.law:
        try:
            record = load_law(args.law)
        except LawFileError as exc:
            raise CLIError(str(exc)) from None
        label = f"law from {args.law}"
    else:
        record = LawRecord(ChinchillaLaw.epoch_refit())
        label = "built-in default: Epoch AI refit of Chinchilla (Besiroglu et al. 2024)"
        print("scalewatch plan: warning: no --law given; using the built-in Chinchilla refit. Its absolute losses "
              "are for MassiveText and mean nothing for your recipe; fit your own with `scalewatch fit`.",
              file=sys.stderr)
    law = record.law
    samples = record.sample_laws()
    band = record.extrapolation_band() if law.family == "chinchilla" else None
    if args.law:
        from scalewatch.data import unit_warnings

        fitted = record.fitted_on or {}
        n_range, d_range = fitted.get("N_range"), fitted.get("D_range")
        ok = lambda r: isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)  # noqa: E731
        for said in unit_warnings(n_range if ok(n_range) else None, d_range if ok(d_range) else None):
            print(f"scalewatch plan: warning: the law's pilot runs: {said}, and refit the law; this plan is in the "
                  "pilots' units, not parameters, tokens and FLOPs", file=sys.stderr)
    payload: dict[str, Any] = {"law": label, "params": law.params(), "n_bootstrap_laws": len(samples),
                               "extrapolation_calibrated": band is not None}
    lines = [f"Law: {label}", "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in law.params().items())]
    if samples:
        lines.append(f"  intervals: 95% percentile over the file's {len(samples)} bootstrap laws"
                     + ("; the predicted loss's also widened for the distance from the pilots" if band is not None
                        else ""))
    else:
        note = (f"no intervals: {args.law or 'the built-in law'} has no bootstrap samples"
                + ("; refit with `scalewatch fit --bootstrap 200 --out LAW`" if args.law else ""))
        payload["interval_note"] = note
        lines.append(f"  {note}")

    def over_samples(fn) -> tuple[list[float] | None, int]:
        """95% percentile interval of fn(sample law) over the bootstrap laws; and how many could not answer."""
        if not samples:
            return None, 0
        vals, failed = [], 0
        for s_law in samples:
            try:
                vals.append(float(fn(s_law)))
            except (PlanningError, ValueError, OverflowError, ZeroDivisionError):
                failed += 1
        return (list(interval(vals)) if vals else None), failed

    def ci_txt(ci: list[float] | None) -> str:
        return f" [{_fmt(ci[0])}–{_fmt(ci[1])}]" if ci else ""

    try:
        if args.flops is not None:
            n, d = (float(x) for x in optimal_allocation(law, args.flops))
            loss = float(law.predict(n, d))
            ci_n, _ = over_samples(lambda s: optimal_allocation(s, args.flops)[0])
            ci_d, _ = over_samples(lambda s: optimal_allocation(s, args.flops)[1])
            ci_loss, distance = None, None
            if samples and law.family == "chinchilla":
                from scalewatch.extrapolation import predict_with_interval

                pred = predict_with_interval(law, samples, band, n, d)
                ci_loss = [pred.low, pred.high]
                distance = pred.distance if band is not None else None
            elif samples:
                ci_loss, _ = over_samples(lambda s: s.predict(n, d))
            payload["compute_optimal"] = {"flops": args.flops, "n_params": n, "tokens": d, "tokens_per_param": d / n,
                                          "loss": loss, "n_params_ci95": ci_n, "tokens_ci95": ci_d,
                                          "loss_ci95": ci_loss, "decades_beyond_pilots": distance}
            lines.append(f"Compute-optimal for C = {_fmt(args.flops)} FLOPs (C = 6ND): N = {_fmt(n)}{ci_txt(ci_n)}, "
                         f"D = {_fmt(d)}{ci_txt(ci_d)}, D/N = {d / n:.1f}, predicted loss {loss:.4f}"
                         + (f" [{ci_loss[0]:.4f}–{ci_loss[1]:.4f}]" if ci_loss else "")
                         + (f"; {distance:.2f} decades beyond the pilots" if distance else ""))
            if args.inference_tokens:
                target = args.target_loss or loss
                p = inference_optimal(law, target, args.inference_tokens)
                ci_ni, fail_i = over_samples(lambda s: inference_optimal(s, target, args.inference_tokens).n_params)
                ci_di, _ = over_samples(lambda s: inference_optimal(s, target, args.inference_tokens).train_tokens)
                payload["inference_optimal"] = {**p.__dict__, "target_loss": target,
                                                "inference_tokens": args.inference_tokens,
                                                "total_flops": p.total_flops, "n_params_ci95": ci_ni,
                                                "train_tokens_ci95": ci_di, "bootstrap_laws_that_cannot_reach": fail_i}
                lines.append(f"Inference-aware (Sardana & Frankle) at loss {target:.4f} serving "
                             f"{_fmt(args.inference_tokens)} tokens: N = {_fmt(p.n_params)}{ci_txt(ci_ni)}, "
                             f"D = {_fmt(p.train_tokens)}{ci_txt(ci_di)} "
                             f"({p.train_tokens / p.n_params:.0f} tokens/param); lifetime FLOPs {_fmt(p.total_flops)} "
                             f"vs {_fmt(p.chinchilla_total_flops)} for the Chinchilla-optimal model "
                             f"({100 * (1 - p.total_flops / p.chinchilla_total_flops):.1f}% saved)")
            if args.unique_tokens:
                p = data_constrained_plan(law, args.flops, args.unique_tokens)
                plans = [data_constrained_plan(s, args.flops, args.unique_tokens) for s in samples]
                ci_nd = list(interval([q.n_params for q in plans])) if plans else None
                ci_dd = list(interval([q.train_tokens for q in plans])) if plans else None
                ci_ld = list(interval([q.loss for q in plans])) if plans else None
                if plans and band is not None:  # as far from the pilots as the compute-optimal answer: widened alike
                    from scalewatch.extrapolation import widened_interval

                    w = widened_interval(p.loss, [q.loss for q in plans], band, p.n_params, p.train_tokens)
                    ci_ld = [w.low, w.high]
                payload["data_constrained"] = {**p.__dict__, "n_params_ci95": ci_nd, "train_tokens_ci95": ci_dd,
                                               "loss_ci95": ci_ld}
                lines.append(f"Data-constrained (Muennighoff et al.) with U = {_fmt(args.unique_tokens)} unique tokens: "
                             f"N = {_fmt(p.n_params)}{ci_txt(ci_nd)}, D = {_fmt(p.train_tokens)}{ci_txt(ci_dd)} = "
                             f"{p.epochs:.2f} epochs, predicted loss {p.loss:.4f}"
                             + (f" [{ci_ld[0]:.4f}–{ci_ld[1]:.4f}]" if ci_ld else "")
                             + f" (vs {p.unconstrained_loss:.4f} with unlimited data); "
                             f"one more epoch is worth {100 * p.value_of_next_epoch:.0f}% of fresh data; repeating "
                             f"is worth it up to about {p.worthwhile_epochs:.0f} epochs"
                             + ("" if isinstance(law, DataConstrainedLaw) else
                                "; R*_D = 15.4, R*_N = 5.3 are Muennighoff et al.'s published values (this law has "
                                "none: fit your own with scalewatch fit --data-constrained)"))
        if args.target_loss is not None and args.n_params is not None:
            d = float(tokens_for_loss(law, args.target_loss, args.n_params))
            ci_t, fail_t = over_samples(lambda s: tokens_for_loss(s, args.target_loss, args.n_params))
            # How far (N, D) lies beyond the pilots, as for --flops (needs the calibration's N_max, C_max)
            far = float(band.distance(args.n_params, d)) if band is not None else None
            payload["tokens_for_loss"] = {"target_loss": args.target_loss, "n_params": args.n_params, "tokens": d,
                                          "flops": 6 * args.n_params * d, "tokens_ci95": ci_t,
                                          "bootstrap_laws_that_cannot_reach": fail_t, "decades_beyond_pilots": far}
            lines.append(f"Tokens for loss {args.target_loss} at N = {_fmt(args.n_params)}: D = {_fmt(d)}{ci_txt(ci_t)} "
                         f"({d / args.n_params:.1f} tokens/param, {_fmt(6 * args.n_params * d)} FLOPs)"
                         + (f"; {fail_t} of {len(samples)} bootstrap laws cannot reach it at this N" if fail_t else "")
                         + (f"; {far:.2f} decades beyond the pilots" if far else ""))
        elif args.target_loss is not None and args.flops is None:
            raise CLIError("--target-loss needs --n-params N (tokens needed) or --flops with --inference-tokens")
    except PlanningError as exc:
        raise CLIError(str(exc)) from None
    _emit(args, payload, "\n".join(lines))
    return 0


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalewatch",
        description="Watch LLM training runs against the scaling laws they are supposed to follow.",
    )
    parser.add_argument("--version", action="version", version=f"scalewatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser("fit", help="fit a scaling law to pilot runs", description=RUN_COLUMNS_HELP)
    fit.add_argument("runs", nargs="*", metavar="RUNS", help="CSV or JSON files of pilot runs")
    fit.add_argument("--method", type=int, choices=(1, 2, 3), default=3,
                     help="3: L(N, D) by Huber fit (default); 1: lower envelope; 2: IsoFLOP parabolas")
    fit.add_argument("--out", help="write the law file (JSON) here")
    fit.add_argument("--plot", help="draw the data and the fit to this image (needs matplotlib)")
    fit.add_argument("--json", action="store_true", help="machine-readable output")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals (default 200)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--data-constrained", action="store_true",
                     help="fit Muennighoff et al.'s data-constrained law (R*_D, R*_N); needs a unique_tokens column")
    fit.add_argument("--base", metavar="LAW",
                     help="with --data-constrained: hold E, A, B, alpha, beta at this Chinchilla law file, fit R*s only")
    fit.add_argument("--two-stage", action="store_true",
                     help="with --data-constrained: Muennighoff et al.'s procedure, a Chinchilla base fitted on the "
                          "single-epoch runs first, then R*_D, R*_N with it held fixed (default: all 7 jointly)")
    fit.add_argument("--exponents", choices=("free", "tied", "auto"), default=None,
                     help="Approach 3's exponents: free (alpha, beta), tied (alpha = beta: one exponent; Muennighoff "
                          "et al. 2023, Gadre et al. 2024) or auto: tied unless the free form's leave-the-largest-out "
                          "error on these pilots is below 0.9x the tied form's, free when the pilots are too few for "
                          f"those folds (default {DEFAULT_EXPONENTS})")
    fit.add_argument("--tie-exponents", action="store_true",
                     help="--exponents tied (also the --two-stage base of --data-constrained fits)")
    fit.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                     help="skip the leave-the-largest-out calibration that widens intervals away from the pilots")
    fit.add_argument("--loss-column", help="name of the loss column if not a standard alias")
    fit.add_argument("--n-column", help="name of the model-size (N) column if not a standard alias (params, ...); "
                     "also with --curves")
    fit.add_argument("--tokens-column", help="name of the training-tokens (D) column if not a standard alias")
    fit.add_argument("--flops-column", help="name of the compute column (FLOPs; D = C / 6N) if there is no tokens column")
    fit.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                     help="keep only rows where COL equals VALUE (repeatable; runs and --curves CSVs)")
    fit.add_argument("--n-convention", choices=("total", "non_embedding"),
                     help="how N was counted in the runs (recorded in the law file)")
    fit.add_argument("--loss-name", help="what the loss is (recorded in the law file), e.g. 'c4 val nats/token'")
    fit.add_argument("--curves", nargs="+", metavar="FILE",
                     help="fit a schedule-aware curve law instead: loss-curve CSVs (step,lr,loss[,n_params]) "
                          "or TensorBoard event directories")
    fit.add_argument("--run-column", metavar="COL[,COL]",
                     help="with --curves: the CSV holds several runs; one curve per value of this column (or of "
                          "these columns), named by it, each with its own n_params column value")
    fit.add_argument("--lr-schedule", metavar="SPEC",
                     help="with --curves whose logs have no LR: describe the schedule of every run, e.g. "
                          "cosine:peak=6e-4,warmup=0.01,final=0.1 (kinds constant, cosine, linear, wsd; warmup and "
                          "decay in steps or as a fraction of the run; each run ends at its own last step unless "
                          "total= is given); used instead of an LR column where there is one")
    fit.add_argument("--curve-form", choices=("linear_ln_n", "power_floor_l0"), default=None,
                     help="with --curves at several sizes: the long-training level E + B*N^-beta with a floor E "
                          "(power_floor_l0, the default) or each parameter linear in ln N (linear_ln_n, the form "
                          "before issue 12: no floor in N)")
    fit.set_defaults(func=_cmd_fit)

    pred = sub.add_parser("predict", help="predict a run's loss curve from a curve law and its LR schedule")
    pred.add_argument("--law", required=True, help="curve-law file from `scalewatch fit --curves --out`")
    pred.add_argument("--schedule", required=True,
                      help="CSV with columns step,lr covering the whole run, or a description with total= "
                           "(e.g. cosine:peak=6e-4,warmup=2000,final=0.1,total=143000)")
    pred.add_argument("--n-params", type=float, help="N of the run (needed for laws fitted on several sizes)")
    pred.add_argument("--points", type=int, default=21, help="how many steps to print, evenly spaced up to the "
                      "schedule's last step (default 21; every step of a shorter schedule)")
    pred.add_argument("--plot", help="draw the predicted curve and band to this image (needs matplotlib)")
    pred.add_argument("--json", action="store_true", help="machine-readable output")
    pred.set_defaults(func=_cmd_predict)

    plan = sub.add_parser("plan", help="compute-optimal, inference-aware and data-constrained plans")
    plan.add_argument("--flops", type=float, help="training compute budget C in FLOPs")
    plan.add_argument("--law", help="law file from `scalewatch fit --out` (default: built-in Chinchilla refit)")
    plan.add_argument("--inference-tokens", type=float, help="tokens to be served over the model's life")
    plan.add_argument("--unique-tokens", type=float, help="unique training tokens available")
    plan.add_argument("--target-loss", type=float, help="loss to reach")
    plan.add_argument("--n-params", type=float, help="model size for --target-loss")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    from scalewatch import report, watch

    watch.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scalewatch`` console script.

    Example:
        >>> main(["plan", "--flops", "1e21", "--json"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"scalewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # watch's and report's WatchError: 3 (1 and 2 are the health of the watched run)
        from scalewatch.watch import WatchError

        if not isinstance(exc, WatchError):
            raise
        print(f"scalewatch {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # `scalewatch predict ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
