"""`scalewatch fit` and `scalewatch plan`: output, law files and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalewatch.cli import main
from scalewatch.laws import ChinchillaLaw, load_law, optimal_allocation

TRUE = ChinchillaLaw(E=1.9, A=300.0, B=1200.0, alpha=0.33, beta=0.31)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _csv(path: Path, rows, header="params,tokens,loss") -> Path:
    path.write_text(header + "\n" + "\n".join(",".join(str(x) for x in r) for r in rows) + "\n")
    return path


@pytest.fixture()
def sweep_csv(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    N = 10 ** rng.uniform(7, 9.5, 60)
    D = N * 10 ** rng.uniform(0.5, 2.2, 60)
    L = TRUE.predict(N, D) * np.exp(rng.normal(0, 0.005, 60))
    return _csv(tmp_path / "runs.csv", zip(N, D, L))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalewatch.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_fit_prints_a_table_and_writes_a_law_file(sweep_csv, tmp_path) -> None:
    out = tmp_path / "law.json"
    p = _run("fit", str(sweep_csv), "--out", str(out), "--bootstrap", "20")
    assert p.returncode == 0, p.stderr
    assert "alpha" in p.stdout and "95% CI" in p.stdout and "RMSE" in p.stdout
    law = load_law(out).law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)


def test_fit_json_is_machine_readable(sweep_csv) -> None:
    p = _run("fit", str(sweep_csv), "--json", "--bootstrap", "20")
    doc = json.loads(p.stdout)
    assert set(doc["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert doc["fit"]["n_runs"] == 60 and doc["fit"]["converged"] is True
    lo, hi = doc["ci95"]["beta"]
    assert lo < doc["params"]["beta"] < hi


@pytest.mark.slow
def test_fit_accepts_compute_in_place_of_tokens_and_json_runs(tmp_path) -> None:
    N = np.repeat(np.logspace(7, 9, 4), 4)
    D = np.tile(np.logspace(9, 11, 4), 4)
    L = TRUE.predict(N, D)
    csv = _csv(tmp_path / "c.csv", zip(N, 6 * N * D, L), header="N,compute,final_loss")
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"runs": [{"n_params": n, "D": d, "loss": l} for n, d, l in zip(N, D, L)]}))
    for f in (csv, js):
        doc = json.loads(_run("fit", str(f), "--json", "--bootstrap", "0").stdout)
        assert doc["params"]["alpha"] == pytest.approx(TRUE.alpha, rel=1e-3)


def test_fit_isoflop_method(tmp_path) -> None:
    rows = []
    for c in np.logspace(18, 20, 4):
        n0 = float(optimal_allocation(TRUE, c)[0])
        for n in n0 * np.logspace(-0.6, 0.6, 7):  # an IsoFLOP sweep bracketing the optimum
            rows.append((n, c / (6 * n), float(TRUE.predict(n, c / (6 * n)))))
    p = _run("fit", str(_csv(tmp_path / "iso.csv", rows)), "--method", "2", "--json", "--bootstrap", "10")
    doc = json.loads(p.stdout)
    assert doc["exponent_a"] == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.02)


@pytest.mark.parametrize("rows, header, match", [
    ([(1e8, 1e9, 3.0)] * 3, "params,tokens,loss", "at least 6"),
    ([(1e8, 1e9)], "params,tokens", "missing column"),
    ([(1e8, -1e9, 3.0)] + [(2e8, 1e9, 3.0)] * 6, "params,tokens,loss", "D must be positive.*runs.csv:2"),
    ([(1e8, 1e9, "nan")] * 7, "params,tokens,loss", "loss must be positive"),
    ([(1e8, 1e9 * (i + 1), 3.0 - 0.1 * i) for i in range(8)], "params,tokens,loss", "same N"),
])
def test_fit_bad_input_is_one_line_and_non_zero(tmp_path, rows, header, match) -> None:
    p = _run("fit", str(_csv(tmp_path / "runs.csv", rows, header)))
    assert p.returncode == 2
    err = [ln for ln in p.stderr.strip().splitlines() if "warning" not in ln]
    assert len(err) == 1 and err[0].startswith("scalewatch fit: error:")
    import re
    assert re.search(match, err[0]), err[0]


def test_fit_warns_about_duplicated_rows(tmp_path) -> None:
    N = np.repeat(np.logspace(7, 9, 3), 3)
    D = np.tile(np.logspace(9, 11, 3), 3)
    rows = list(zip(N, D, TRUE.predict(N, D)))
    p = _run("fit", str(_csv(tmp_path / "runs.csv", rows + rows[:1])), "--bootstrap", "0")
    assert "duplicated rows" in p.stderr and "runs.csv:2" in p.stderr


def test_fit_that_does_not_converge_exits_non_zero(sweep_csv, monkeypatch, capsys) -> None:
    import scalewatch.fitting as fitting

    real = fitting.fit_chinchilla

    def not_converged(*a, **k):
        res = real(*a, **k)
        res.converged, res.message = False, "maximum number of function evaluations exceeded"
        return res

    monkeypatch.setattr(fitting, "fit_chinchilla", not_converged)
    assert main(["fit", str(sweep_csv), "--bootstrap", "0"]) == 1
    assert "did not converge" in capsys.readouterr().err


def test_plan_default_law_is_labelled_and_warns() -> None:
    p = _run("plan", "--flops", "1e21", "--json")
    assert p.returncode == 0
    assert "mean nothing for your recipe" in p.stderr
    doc = json.loads(p.stdout)
    assert "Epoch AI refit" in doc["law"]
    co = doc["compute_optimal"]
    assert co["n_params"] == pytest.approx(2.8e9, rel=0.02) and co["tokens_per_param"] == pytest.approx(22, abs=0.5)


@pytest.mark.slow
def test_plan_with_fitted_law_has_intervals_and_all_questions(sweep_csv, tmp_path) -> None:
    law = tmp_path / "law.json"
    assert _run("fit", str(sweep_csv), "--out", str(law), "--bootstrap", "30").returncode == 0
    p = _run("plan", "--flops", "1e20", "--law", str(law), "--inference-tokens", "1e12",
             "--unique-tokens", "5e9", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    lo, hi = doc["compute_optimal"]["n_params_ci95"]
    assert lo < doc["compute_optimal"]["n_params"] < hi
    assert doc["inference_optimal"]["n_params"] < doc["compute_optimal"]["n_params"]
    assert doc["data_constrained"]["epochs"] > 1
    text = _run("plan", "--target-loss", "2.6", "--n-params", "1e9", "--law", str(law)).stdout
    assert "Tokens for loss 2.6" in text


@pytest.mark.parametrize("args, match", [
    (["plan"], "give --flops"),
    (["plan", "--flops", "-5"], "positive"),
    (["plan", "--target-loss", "1.0", "--n-params", "1e9"], "out of reach"),
    (["plan", "--flops", "1e20", "--law", "/nonexistent/law.json"], "cannot read law file"),
])
def test_plan_bad_input(args, match) -> None:
    p = _run(*args)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if "warning" not in ln]
    assert len(lines) == 1 and match in lines[0]


def test_plan_refuses_a_malformed_law_file(tmp_path) -> None:
    bad = tmp_path / "law.json"
    bad.write_text('{"schema": "scalewatch.law", "version": 7}')
    p = _run("plan", "--flops", "1e20", "--law", str(bad))
    assert p.returncode == 2 and "version 7 is not supported" in p.stderr


def test_plot_draws_an_image_or_names_the_missing_extra(sweep_csv, tmp_path) -> None:
    png = tmp_path / "fit.png"
    p = _run("fit", str(sweep_csv), "--plot", str(png), "--bootstrap", "0")
    if importlib.util.find_spec("matplotlib") is None:
        assert p.returncode == 2 and "pip install 'scalewatch[plot]'" in p.stderr
    else:
        assert p.returncode == 0 and png.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not beside the checkout")
def test_fit_on_real_gadre_data_with_filters() -> None:
    f = DATA / "gadre2024_overtraining" / "final_losses.csv"
    p = _run("fit", str(f), "--where", "dataset=c4_original", "--where",
             "val_data=training/eval_data/c4_val/shard-{0000000..0000010}.tar", "--json", "--bootstrap", "20")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["fit"]["n_runs"] == 34
    assert 0.15 < doc["params"]["alpha"] < 0.45 and doc["fit"]["r2_log"] > 0.95


@pytest.mark.slow
def test_fit_data_constrained_writes_a_law_plan_reads(tmp_path) -> None:
    from scalewatch.laws import DataConstrainedLaw

    true = DataConstrainedLaw(E=1.9, A=500.0, B=1500.0, alpha=0.35, beta=0.35, R_D=15.4, R_N=5.3)
    N, U, ep = (a.ravel() for a in np.meshgrid(np.logspace(7.5, 9.5, 4), np.logspace(9, 10.5, 3), [1, 2, 4, 8, 16, 40]))
    rows = zip(N, U * ep, U, true.predict(N, U * ep, unique=U))
    csv = _csv(tmp_path / "dc.csv", rows, header="params,tokens,unique_tokens,loss")
    out = tmp_path / "dc.json"
    p = _run("fit", str(csv), "--data-constrained", "--bootstrap", "5", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["family"] == "data_constrained" and doc["params"]["R_D"] == pytest.approx(15.4, rel=1e-3)
    plan = _run("plan", "--flops", "1e21", "--unique-tokens", "5e9", "--law", str(out), "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["data_constrained"]["epochs"] > 1
    bad = _run("fit", str(csv), "--base", str(out))
    assert bad.returncode == 2 and "--base is for --data-constrained" in bad.stderr


@pytest.mark.slow
def test_plan_reports_intervals_of_its_answer_from_the_bootstrap_laws(sweep_csv, tmp_path) -> None:
    law = tmp_path / "law.json"
    assert _run("fit", str(sweep_csv), "--out", str(law), "--bootstrap", "40").returncode == 0
    doc = json.loads(_run("plan", "--flops", "1e22", "--law", str(law), "--unique-tokens", "5e9", "--json").stdout)
    co = doc["compute_optimal"]
    assert doc["n_bootstrap_laws"] == 40 and doc["extrapolation_calibrated"] is True
    for key, ci in (("n_params", "n_params_ci95"), ("tokens", "tokens_ci95"), ("loss", "loss_ci95")):
        assert co[ci][0] < co[key] < co[ci][1], key
    assert co["decades_beyond_pilots"] > 0  # 1e22 FLOPs is past the pilots' compute
    dc = doc["data_constrained"]
    assert dc["loss_ci95"][0] < dc["loss"] < dc["loss_ci95"][1]
    text = _run("plan", "--flops", "1e22", "--law", str(law)).stdout
    assert "95% percentile over the file's 40 bootstrap laws" in text and "predicted loss" in text


@pytest.mark.slow
def test_plan_says_clearly_when_the_law_has_no_bootstrap_laws(sweep_csv, tmp_path) -> None:
    law = tmp_path / "law.json"
    assert _run("fit", str(sweep_csv), "--out", str(law), "--bootstrap", "0", "--no-calibrate").returncode == 0
    p = _run("plan", "--flops", "1e21", "--law", str(law), "--json")
    doc = json.loads(p.stdout)
    assert doc["compute_optimal"]["loss_ci95"] is None
    assert "has no bootstrap samples; refit with `scalewatch fit --bootstrap 200" in doc["interval_note"]


@pytest.mark.slow
def test_fit_tie_exponents_writes_a_tied_law_and_refuses_other_methods(sweep_csv, tmp_path) -> None:
    out = tmp_path / "tied.json"
    p = _run("fit", str(sweep_csv), "--tie-exponents", "--bootstrap", "20", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["params"]["alpha"] == doc["params"]["beta"] and doc["fit"]["tie_exponents"] is True
    assert doc["ci95"]["alpha"] == doc["ci95"]["beta"]
    rec = load_law(out)
    assert rec.law.alpha == rec.law.beta and rec.extrapolation_band() is not None
    plan = _run("plan", "--flops", "1e21", "--law", str(out), "--json")
    assert plan.returncode == 0, plan.stderr
    free = json.loads(_run("fit", str(sweep_csv), "--json", "--bootstrap", "10").stdout)
    check = free["extrapolation"]["mean_abs_log_error"]  # the same folds fitted both ways, for the hint
    assert set(check) == {"free", "tied"} and all(0 < v < 0.05 for v in check.values())
    assert "tie_exponents" not in free["fit"]
    bad = _run("fit", str(sweep_csv), "--tie-exponents", "--method", "2")
    assert bad.returncode == 2 and "drop --method 2 (or --tie-exponents)" in bad.stderr  # names the flag given


@pytest.mark.slow
def test_fit_data_constrained_two_stage_and_its_errors(tmp_path) -> None:
    from scalewatch.laws import DataConstrainedLaw

    true = DataConstrainedLaw(E=1.9, A=500.0, B=1500.0, alpha=0.35, beta=0.35, R_D=15.4, R_N=5.3)
    N = np.logspace(7, 9, 5)
    fn, ratio = (a.ravel() for a in np.meshgrid(N, [25, 50, 100, 200, 400]))
    rn, ur, ep = (a.ravel() for a in np.meshgrid(N, [25, 6.25], [2, 4, 8, 16, 40]))
    n, u = np.concatenate([fn, rn]), np.concatenate([fn * ratio, rn * ur])
    d = np.concatenate([fn * ratio, rn * ur * ep])
    csv = _csv(tmp_path / "dc.csv", zip(n, d, u, true.predict(n, d, unique=u)), header="params,tokens,unique_tokens,loss")
    p = _run("fit", str(csv), "--data-constrained", "--two-stage", "--tie-exponents", "--bootstrap", "0", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["params"]["R_D"] == pytest.approx(15.4, rel=1e-3) and doc["params"]["R_N"] == pytest.approx(5.3, rel=1e-3)
    assert "two stages" in doc["fit"]["method"]
    bad = _run("fit", str(csv), "--two-stage")
    assert bad.returncode == 2 and "--two-stage is for --data-constrained" in bad.stderr
    bad = _run("fit", str(csv), "--data-constrained", "--tie-exponents")
    assert bad.returncode == 2 and "add --two-stage" in bad.stderr
    base = tmp_path / "base.json"
    base.write_text("{}")
    # With --base, the fix offered is consistent: dropping the extra flag, not adding another.
    bad = _run("fit", str(csv), "--data-constrained", "--tie-exponents", "--base", str(base))
    assert bad.returncode == 2 and "drop --tie-exponents to use that base, or drop --base" in bad.stderr


# ------------------------------------------------------------ a new user's trial: one-line errors that name the fix
CURVES = Path(__file__).resolve().parents[1] / "examples" / "laws" / "curves"
OLMO = DATA / "olmo_ladder" / "loss_curves.csv"
GADRE = DATA / "gadre2024_overtraining" / "final_losses.csv"


def _runs_table(tmp_path: Path, names: list[str]) -> Path:
    """The example pilot curves in one CSV, a ``run`` column naming each (and a ``subset`` column)."""
    lines = ["subset,run,step,lr,loss,n_params"]
    for name in names:
        rows = (CURVES / f"{name}.csv").read_text().splitlines()[1:]
        lines += [f"pilots,{name},{r}" for r in rows]
    out = tmp_path / "table.csv"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_fit_curves_splits_a_table_of_runs_and_filters_it(tmp_path, capsys) -> None:
    from scalewatch.curves import read_curves

    names = ["L2_d64_constant_600", "L2_d64_cosine_600", "L3_d96_constant_600", "L3_d96_cosine_600"]
    table = _runs_table(tmp_path, names)
    curves = read_curves([table], run_column="run")
    assert [c.name for c in curves] == names
    assert [c.n_params for c in curves] == [read_curves([CURVES / f"{n}.csv"])[0].n_params for n in names]
    assert curves[2].n_params != curves[0].n_params  # n_params per run, from its own rows
    two = read_curves([table], where=["run=L2_d64_cosine_600"])
    assert len(two) == 1 and two[0].loss.tolist() == curves[1].loss.tolist()
    # Steps repeat: the error names the column that splits the file, not "sort the file".
    assert main(["fit", "--curves", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "several runs (column 'run' has 4 values): add --run-column run" in err
    assert main(["fit", "--curves", str(table), "--where", "run=L2_d64_cosine_60"]) == 2
    err = capsys.readouterr().err
    assert "no row has run='L2_d64_cosine_60'; run holds 'L2_d64_constant_600', 'L2_d64_cosine_600'" in err
    assert main(["fit", "--curves", str(table), "--run-column", "run", "--where", "subset=pilots"]) == 0
    assert "from 4 curves at 2 sizes" in capsys.readouterr().out
    assert main(["fit", str(table), "--run-column", "run"]) == 2
    assert "goes with --curves" in capsys.readouterr().err


def test_fit_curves_at_one_size_says_so(capsys) -> None:
    pilots = [str(CURVES / f"L2_d64_{k}_600.csv") for k in ("constant", "cosine")]
    assert main(["fit", "--curves", *pilots]) == 0
    out = capsys.readouterr().out
    assert "from 2 curves at one size (no N-dependence)" in out and "1 sizes" not in out and "form" not in out


@pytest.mark.skipif(not OLMO.exists(), reason="needs /work/shared/data")
def test_fit_curves_on_the_olmo_ladder_file(tmp_path, capsys) -> None:
    base = ["fit", "--curves", str(OLMO), "--loss-column", "eval/c4_en-validation/CrossEntropyLoss"]
    assert main(base) == 2  # 18 run names in 3 subsets: the pair splits the file
    assert "columns 'subset', 'run' have 36 combinations): add --run-column subset,run" in capsys.readouterr().err
    assert main([*base, "--where", "subset=peteish-moreeval"]) == 2
    assert "(column 'run' has 18 values): add --run-column run, or filter with --where" in capsys.readouterr().err
    assert main([*base, "--where", "subset=peteish-moreeval", "--where", "size=190M", "--run-column", "run",
                 "--out", str(tmp_path / "law.json")]) == 0
    assert "from 6 curves at one size" in capsys.readouterr().out


def test_fit_warns_when_rows_repeat_n_and_d_and_lists_values_a_filter_missed(tmp_path, capsys) -> None:
    rows = [(n, 20 * n, 3.0 - 0.1 * i + 0.01 * j) for i, n in enumerate((1e7, 2e7, 4e7, 8e7, 1.6e8))
            for j in range(2)]
    table = tmp_path / "runs.csv"
    table.write_text("params,tokens,loss,val_data\n" + "".join(f"{n},{d},{v},set{j % 2}\n"
                                                               for j, (n, d, v) in enumerate(rows)))
    assert main(["fit", str(table), "--bootstrap", "0", "--no-calibrate"]) in (0, 1)
    assert "10 rows but only 5 distinct (N, D): several runs share a size and token count" in capsys.readouterr().err
    assert main(["fit", str(table), "--where", "val_data=c4"]) == 2
    assert "no row has val_data='c4'; val_data holds 'set0', 'set1'" in capsys.readouterr().err


@pytest.mark.skipif(not GADRE.exists(), reason="needs /work/shared/data")
def test_fit_on_the_unfiltered_gadre_table_warns(capsys) -> None:
    assert main(["fit", str(GADRE), "--bootstrap", "0", "--no-calibrate", "--json"]) == 0
    assert "832 rows but only" in capsys.readouterr().err
    assert main(["fit", str(GADRE), "--where", "dataset=c4"]) == 2
    assert "dataset holds 'c4_original', 'rpj', 'rw_original'" in capsys.readouterr().err


def test_a_curve_law_where_a_chinchilla_law_is_needed(tmp_path, capsys) -> None:
    from scalewatch.laws import SCHEMA, SCHEMA_VERSION

    law = tmp_path / "curve_law.json"
    law.write_text(json.dumps({"schema": SCHEMA, "version": SCHEMA_VERSION, "family": "momentum_curve"}))
    assert main(["plan", "--law", str(law), "--flops", "1e21"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "curve_law.json is a curve law (L over steps): use it with `scalewatch predict" in err
    assert "unknown law family" not in err
    (tmp_path / "logs").mkdir()
    assert main(["watch", "--law", str(law), str(tmp_path / "logs")]) != 0
    assert "is a curve law (L over steps)" in capsys.readouterr().err
    assert main(["fit", str(law)]) == 2  # a law file given as runs
    assert "this is a law file, not runs" in capsys.readouterr().err


def test_fit_on_a_loss_curve_points_to_fit_curves_and_plot_fails_before_fitting(sweep_csv, monkeypatch,
                                                                                   capsys) -> None:
    assert main(["fit", str(CURVES / "L2_d64_cosine_600.csv")]) == 2
    assert "this looks like a loss curve (a step column): use `scalewatch fit --curves" in capsys.readouterr().err
    import scalewatch.fitting

    def boom(*a, **k):
        raise AssertionError("fitted before checking --plot")

    monkeypatch.setattr(scalewatch.fitting, "fit_chinchilla", boom)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(["fit", str(sweep_csv), "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_fit_curves_on_a_directory_without_event_files(tmp_path, capsys) -> None:
    assert main(["fit", "--curves", str(tmp_path)]) == 2
    assert f"{tmp_path}: no TensorBoard event files in this directory" in capsys.readouterr().err


def test_fit_reads_columns_by_other_names_or_the_names_given(tmp_path, capsys) -> None:
    """Tables from elsewhere: 'Model Size' matches model_size; any other name is given with --*-column."""
    N = np.repeat(np.logspace(7, 9, 4), 4)
    D = np.tile(np.logspace(9, 11, 4), 4)
    L = TRUE.predict(N, D)
    spaced = _csv(tmp_path / "spaced.csv", zip(N, D, 6 * N * D, L), header="Model Size,Training Tokens,Training FLOP,Loss")
    assert main(["fit", str(spaced), "--json", "--bootstrap", "0", "--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["alpha"] == pytest.approx(TRUE.alpha, rel=1e-3)
    odd = _csv(tmp_path / "odd.csv", zip(N, 6 * N * D, L), header="width_params,budget,val")
    assert main(["fit", str(odd), "--loss-column", "val"]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) N, D (or compute C)" in err and "--n-column" in err and "--flops-column" in err
    assert main(["fit", str(odd), "--loss-column", "val", "--n-column", "width_params", "--flops-column", "budget",
                 "--json", "--bootstrap", "0", "--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["beta"] == pytest.approx(TRUE.beta, rel=1e-3)
    assert main(["fit", str(odd), "--loss-column", "val", "--n-column", "width", "--flops-column", "budget"]) == 2
    assert "column 'width' not found" in capsys.readouterr().err
    assert main(["fit", "--curves", str(odd), "--flops-column", "budget"]) == 2
    assert "--flops-column name columns of a table of final losses" in capsys.readouterr().err
    tsv = tmp_path / "runs.tsv"  # a tab-separated table reads the same
    tsv.write_text(spaced.read_text().replace(",", "\t"))
    assert main(["fit", str(tsv), "--json", "--bootstrap", "0", "--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["alpha"] == pytest.approx(TRUE.alpha, rel=1e-3)
    assert main(["fit", "--curves", str(odd), "--n-column", "width_params"]) == 2  # taken: this file is no curve
    assert "no step column" in capsys.readouterr().err


def test_data_constrained_plan_interval_widens_with_the_distance_like_the_compute_optimal_one(sweep_csv, tmp_path,
                                                                                              capsys) -> None:
    law = tmp_path / "law.json"
    assert main(["fit", str(sweep_csv), "--out", str(law), "--bootstrap", "30"]) == 0
    capsys.readouterr()
    assert main(["plan", "--flops", "1e25", "--unique-tokens", "5e11", "--law", str(law), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    co, dc = doc["compute_optimal"], doc["data_constrained"]
    assert co["decades_beyond_pilots"] > 1  # far out: the extrapolation term dominates both intervals
    co_w = math.log(co["loss_ci95"][1] / co["loss_ci95"][0])
    dc_w = math.log(dc["loss_ci95"][1] / dc["loss_ci95"][0])
    assert dc_w > 0.7 * co_w and dc["loss_ci95"][0] < dc["loss"] < dc["loss_ci95"][1]
