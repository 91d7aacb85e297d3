"""Inputs and laws that look wrong are said to be wrong: N and D in millions or billions, a degenerate curve
law, a prediction below zero or far past the pilots, Approach 1 on a table it cannot use."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from scalewatch.bands import ScheduleReach
from scalewatch.cli import main
from scalewatch.curve_fit import fit_curves
from scalewatch.curves import Curve, CurveLaw, save_curve_law, schedule_features
from scalewatch.data import read_runs
from scalewatch.fitting import approach1, make_runs
from scalewatch.laws import ChinchillaLaw, optimal_allocation

TRUE = ChinchillaLaw(E=1.9, A=300.0, B=1200.0, alpha=0.33, beta=0.31)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "laws"


def _table(path: Path, N, D, header="params,tokens,loss") -> Path:
    L = TRUE.predict(np.asarray(N), np.asarray(D))
    path.write_text(header + "\n" + "".join(f"{float(n)!r},{float(d)!r},{float(l)!r}\n"
                                            for n, d, l in zip(N, D, L, strict=True)))
    return path


def _sweep(scale_n: float = 1.0, scale_d: float = 1.0):
    rng = np.random.default_rng(0)
    N = 10 ** rng.uniform(8, 10.5, 40)
    D = N * 10 ** rng.uniform(0.5, 2.0, 40)
    return N / scale_n, D / scale_d


def _units_said(text: str) -> list[str]:
    return [line for line in text.splitlines() if "look like" in line]


# ------------------------------------------------------------------ 1. units of N and D
def test_fit_warns_when_n_is_in_millions_and_d_in_billions_and_plan_says_its_answer_is_in_those_units(
        tmp_path, capsys) -> None:
    N, D = _sweep()
    counts = _table(tmp_path / "counts.csv", N, D)
    units = _table(tmp_path / "units.csv", N / 1e6, D / 1e9, header="Model Size (M),Training Tokens (B),loss")
    assert main(["fit", str(counts), "--bootstrap", "0", "--no-calibrate"]) == 0
    assert _units_said(capsys.readouterr().err) == []
    law = tmp_path / "law.json"
    assert main(["fit", str(units), "--n-column", "Model Size (M)", "--tokens-column", "Training Tokens (B)",
                 "--bootstrap", "0", "--no-calibrate", "--out", str(law)]) == 0
    n_line, d_line = _units_said(capsys.readouterr().err)
    assert n_line.startswith("scalewatch fit: warning: N values ") and "look like millions" in n_line
    assert "give N as a parameter count" in n_line
    assert "D values" in d_line and "look like billions or millions of tokens" in d_line
    assert main(["plan", "--flops", "1e21", "--law", str(law)]) == 0
    said = _units_said(capsys.readouterr().err)
    assert len(said) == 2 and all("this plan is in the pilots' units" in s for s in said)


def test_d_in_billions_with_n_as_counts_and_the_repos_own_pilots() -> None:
    from scalewatch.data import unit_warnings

    N, D = _sweep()
    # every run with fewer tokens than parameters (D in billions, N a count): said; some runs so: not
    assert unit_warnings((N.min(), N.max()), ((D / 1e9).min(), (D / 1e9).max()), every_d_below_n=True)
    assert unit_warnings((1.2e5, 1.3e6), (3e5, 2.5e6), every_d_below_n=False) == []
    with warnings.catch_warnings(record=True) as w:  # the repo's own pilots (124,672..1,298,880 parameters)
        warnings.simplefilter("always")
        read_runs([EXAMPLES / "pilots.csv"])
    assert not [x for x in w if "look like" in str(x.message)]


def test_read_runs_warns_on_d_in_millions(tmp_path) -> None:
    N, D = _sweep()
    path = _table(tmp_path / "d_in_m.csv", N, D / 1e6)  # the longest run 2.3e6 "tokens", below every N
    with pytest.warns(UserWarning, match="D values .* look like billions .*every run has fewer tokens than param"):
        read_runs([path])


def _curves_at(sizes, every=500):
    out = []
    for n in sizes:
        for kind, lr in (("cos", 1.5e-4 * (1 + np.cos(np.pi * np.arange(10001) / 10000)) + 1e-6),
                         ("const", np.full(10001, 3e-4))):
            S1, S2 = schedule_features(lr)
            st = np.arange(every, len(lr), every)
            level = 1.9 + 400 / (n if n > 1e3 else n * 1e9) ** 0.34
            out.append(Curve(f"{n}-{kind}", st, lr[st], level + 0.6 * S1[st] ** -0.5 - 0.4 * S2[st], n, lr))
    return out


def test_fit_curves_warns_when_n_params_look_like_billions() -> None:
    with pytest.warns(UserWarning, match=r"n_params: N values 0.07–1 look like billions"):
        fit_curves(_curves_at((0.07, 0.16, 1.0)), calibrate=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fit_curves(_curves_at((7e7, 1.6e8, 1e9)), calibrate=False)
    assert not [x for x in w if "look like" in str(x.message) or "poorly determined" in str(x.message)]


# ------------------------------------------------------------------ 2. a poorly determined curve law
def _short_log_curves() -> list[Curve]:
    """Two short noisy runs whose loss falls as a logarithm of the summed LR: the power law degenerates."""
    rng = np.random.default_rng(0)
    out = []
    for name, total in (("a", 300), ("b", 600)):
        s = np.arange(total + 1)
        w = max(1, int(0.01 * total))
        lr = np.where(s < w, 3e-3 * (s + 1) / w,
                      3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - w) / (total - w)))))
        S1, S2 = schedule_features(lr)
        st = np.arange(10, total + 1, 10)
        out.append(Curve(name, st, lr[st], 2.0 - 0.45 * np.log(S1[st]) - 0.3 * S2[st] + rng.normal(0, 0.03, len(st)),
                         None, lr))
    return out


def test_fit_curves_warns_on_a_law_whose_level_is_below_zero(tmp_path, capsys) -> None:
    with pytest.warns(UserWarning, match=r"poorly determined: L0=-[0-9.]+ is below 0.*runs of up to 600 steps"):
        fit = fit_curves(_short_log_curves(), calibrate=False)
    assert fit.law.at().L0 < 0


def _degenerate_law() -> CurveLaw:
    """The law of the new-user trial's 2 tiny Lightning runs (600 steps, peak LR 3e-3)."""
    return CurveLaw({"L0": (-25.68, 0.0), "lnA": (math.log(27.59), 0.0), "alpha": (0.0154, 0.0),
                     "lnC": (math.log(0.2549), 0.0)}, n_ref=1.0, band_rel=0.134,
                    reach=ScheduleReach(s1_max=0.9994, per_ln_s1=0.0, points=57, per_ln_s1_annealed=9.21))


def test_curve_law_predict_never_returns_low_above_high() -> None:
    lr = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.arange(60001) / 60000)))
    p = _degenerate_law().predict(lr, steps=list(range(3000, 60001, 3000)))
    assert (p.loss < 0).any()  # the law goes below zero
    assert np.all(p.low <= p.loss) and np.all(p.loss <= p.high)


def test_predict_refuses_steps_where_the_loss_goes_below_zero_and_says_how_far_past_the_pilots(
        tmp_path, capsys) -> None:
    law = tmp_path / "law.json"
    save_curve_law(_degenerate_law(), law)
    spec = "cosine:peak=3e-3,warmup=0.01,final=0.1,total=60000"
    assert main(["predict", "--law", str(law), "--schedule", spec, "--json"]) == 1
    out = capsys.readouterr()
    rows = json.loads(out.out)["points"]
    assert rows and all(0 <= r["low"] <= r["loss"] <= r["high"] for r in rows)
    assert rows[-1]["step"] < 24000  # the steps from the first loss below 0 on are left out
    err = out.err.strip().splitlines()
    assert len(err) == 2
    assert "goes past the pilots'" in err[0] and "99.9x theirs" in err[0] and "widened" in err[0]
    assert "should not be used this far beyond" in err[0]
    assert err[1].startswith("scalewatch predict: error: the law predicts a loss of -") and "left out" in err[1]


def test_predict_says_when_a_schedule_goes_past_the_pilots_summed_lr(tmp_path, capsys) -> None:
    good = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(100.0), 0.0)},
                    n_ref=1e8, band_rel=0.01, reach=ScheduleReach(s1_max=3.0, per_ln_s1=0.5, points=40,
                                                                 per_ln_s1_annealed=1.0))
    law = tmp_path / "law.json"
    save_curve_law(good, law)
    inside = tmp_path / "inside.csv"
    inside.write_text("step,lr\n0,1e-3\n2000,1e-3\n")  # summed LR 2 < 3: within the pilots
    assert main(["predict", "--law", str(law), "--schedule", str(inside)]) == 0
    assert capsys.readouterr().err == ""
    longer = tmp_path / "longer.csv"
    longer.write_text("step,lr\n0,1e-3\n6000,1e-3\n")  # summed LR 6: 2x the pilots'
    assert main(["predict", "--law", str(law), "--schedule", str(longer)]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "from step 3000" in line and "2x theirs at step 6000" in line
    assert re.search(r"up to 1\.35x at step 6000", line)  # 1 + 0.5 ln 2 at the peak LR
    assert "should not be used" not in line


# ------------------------------------------------------------------ 4. Approach 1, plan --target-loss, report's N
def test_approach1_warns_on_one_run_per_size_and_budget() -> None:
    rows = []
    for c in np.logspace(18, 20, 4):
        n0 = float(optimal_allocation(TRUE, c)[0])
        for n in n0 * np.logspace(-0.6, 0.6, 7):  # an IsoFLOP sweep: one run per (N, budget)
            rows.append((n, c / (6 * n)))
    N, D = (np.array(v) for v in zip(*rows, strict=True))
    with pytest.warns(UserWarning, match="approach 1 needs several runs per model size"):
        try:
            approach1(make_runs(N, D, TRUE.predict(N, D)), n_bootstrap=0)
        except Exception:  # noqa: BLE001 - the warning comes first, whatever the envelope makes of it
            pass
    N = np.repeat(np.logspace(7, 10, 13), 25)  # each size trained to many token counts
    D = np.tile(np.logspace(8, 12.5, 25), 13)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        approach1(make_runs(N, D, TRUE.predict(N, D)), n_bootstrap=0)
    assert not [x for x in w if "approach 1" in str(x.message)]


def test_plan_target_loss_says_how_far_beyond_the_pilots(tmp_path, capsys) -> None:
    N, D = _sweep()
    law = tmp_path / "law.json"
    assert main(["fit", str(_table(tmp_path / "runs.csv", N, D)), "--bootstrap", "20", "--out", str(law)]) == 0
    capsys.readouterr()
    assert main(["plan", "--target-loss", "2.1", "--n-params", "7e11", "--law", str(law), "--json"]) == 0
    far = json.loads(capsys.readouterr().out)["tokens_for_loss"]["decades_beyond_pilots"]
    assert far > 1
    assert main(["plan", "--target-loss", "2.1", "--n-params", "7e11", "--law", str(law)]) == 0
    assert f"{far:.2f} decades beyond the pilots" in capsys.readouterr().out


def test_report_summary_writes_n_as_a_parameter_count_not_si() -> None:
    from scalewatch.report import Point, RunData, _summary
    from scalewatch.tensorboard import Tags

    d = RunData(run="r", source="x", points=[Point(600, 0, 3.0)], alerts=[], state="ok", log_points=60,
                tags=Tags(loss="loss"), tags_found=["loss"], firing_at_end=[], n_params=1e9)
    html = _summary(d)
    text = re.sub(r"<[^>]+>", " ", html)
    # the card shows 1B (the exact count would overflow it) and carries the count as its tooltip
    assert re.search(r">\s*1B\s*<", html) and "1G" not in text and 'title="1,000,000,000 parameters"' in html


def test_curves_of_two_sizes_fitted_as_one_say_to_give_n() -> None:
    from test_curves import TRUE, cosine, synthetic

    curves = [synthetic(f"{k}{i}", make(), dict(TRUE, L0=L0))
              for i, L0 in enumerate((2.5, 4.0)) for k, make in (("cos", lambda: cosine(3000)),
                                                                  ("const", lambda: np.full(3001, 3e-4)))]
    with pytest.warns(UserWarning, match="several model sizes, give each its N"):
        fit_curves(curves, calibrate=False)
