"""Free, tied or auto exponents for the Chinchilla fit: the rule, the folds' evidence, the CLI and the law file."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from scalewatch.cli import main
from scalewatch.extrapolation import ExponentChoice, choose_exponents, compare_exponents, fit_chinchilla_exponents
from scalewatch.fitting import fit_chinchilla, make_runs
from scalewatch.laws import ChinchillaLaw, load_law

# Pilots as Gadre et al. lay them out: five sizes 10M-400M, five token multipliers each.
GRID_N, GRID_M = (a.ravel() for a in np.meshgrid(np.logspace(7, 8.6, 5), [5, 10, 20, 40, 80]))
TARGETS_N, TARGETS_D = np.array([1.4e9, 6.9e9, 1.4e9]), np.array([2.8e10, 1.38e11, 1.12e11])  # 0.5-1.2 decades out


def _pilots(law: ChinchillaLaw, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    D = GRID_N * GRID_M
    return make_runs(GRID_N, D, law.predict(GRID_N, D) * np.exp(rng.normal(0, noise, GRID_N.size)))


def _target_error(law: ChinchillaLaw, true: ChinchillaLaw) -> float:
    return float(np.mean(np.abs(law.predict(TARGETS_N, TARGETS_D) / true.predict(TARGETS_N, TARGETS_D) - 1)))


def test_rule_keeps_tied_on_a_draw_and_free_only_when_clearly_better() -> None:
    assert choose_exponents(0.010, 0.020) == "free"
    assert choose_exponents(0.0179, 0.020) == "free"  # just below 0.9x
    assert choose_exponents(0.0181, 0.020) == "tied"  # within a tenth: a draw, one parameter fewer
    assert choose_exponents(0.020, 0.020) == "tied"
    assert choose_exponents(0.030, 0.020) == "tied"
    assert choose_exponents(None, 0.02) == "free" and choose_exponents(math.nan, 0.02) == "free"  # no folds
    assert choose_exponents(0.019, 0.020, margin=1.0) == "free"


def test_auto_picks_tied_on_a_tied_law_where_free_extrapolates_worse() -> None:
    true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.353, beta=0.353)
    runs = _pilots(true, noise=0.01, seed=2)
    choice = compare_exponents(runs)
    assert choice.form == "tied" and choice.chosen_by == "auto"
    assert choice.tied_error < 0.9 * choice.free_error  # the folds say so clearly, not by a draw
    assert choice.n_folds >= 3 and choice.n_held_out >= 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = fit_chinchilla(runs, n_bootstrap=0).law
    fit = fit_chinchilla_exponents(runs, "auto", n_bootstrap=0)
    assert fit.tie_exponents and fit.law.alpha == fit.law.beta
    assert _target_error(fit.law, true) < _target_error(free, true)  # and the truth, 1.4B-6.9B, agrees
    assert fit.to_record().fitted_on["exponents"]["form"] == "tied"


def test_auto_picks_free_on_clearly_different_exponents_and_low_noise() -> None:
    true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.28, beta=0.34)
    runs = _pilots(true, noise=0.001, seed=0)
    fit = fit_chinchilla_exponents(runs, "auto", n_bootstrap=0)
    ev = fit.exponents
    assert ev["form"] == "free" and ev["chosen_by"] == "auto" and ev["free_error"] < 0.9 * ev["tied_error"]
    assert not fit.tie_exponents
    assert fit.law.alpha == pytest.approx(0.28, abs=0.01) and fit.law.beta == pytest.approx(0.34, abs=0.01)
    tied = fit_chinchilla(runs, n_bootstrap=0, tie_exponents=True).law
    assert _target_error(fit.law, true) < _target_error(tied, true)


def test_auto_is_free_when_the_pilots_are_too_few_for_the_folds() -> None:
    true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.353, beta=0.353)
    N, D = (a.ravel() for a in np.meshgrid([1e8, 3e8], np.logspace(9, 10.5, 4)))
    choice = compare_exponents(make_runs(N, D, true.predict(N, D)))
    assert choice == ExponentChoice(form="free", chosen_by="auto")
    assert "too few model sizes" in choice.reason() and choice.reason().startswith("exponents: free")
    given = compare_exponents(make_runs(N, D, true.predict(N, D)), "tied")
    assert given.form == "tied" and given.chosen_by == "given" and given.free_error is None


def test_a_given_form_is_kept_and_the_evidence_recorded_beside_it() -> None:
    runs = _pilots(ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.28, beta=0.34), noise=0.001, seed=0)
    choice = compare_exponents(runs, "tied")
    assert choice.form == "tied" and choice.auto_form == "free"
    assert "as asked" in choice.reason() and "--exponents auto would fit free" in choice.reason()
    with pytest.raises(ValueError, match="free, tied, auto"):
        compare_exponents(runs, "both")


def _csv(path, runs) -> str:
    rows = (f"{n},{d},{loss}" for n, d, loss in zip(runs.N, runs.D, runs.L))
    path.write_text("params,tokens,loss\n" + "\n".join(rows) + "\n")
    return str(path)


def test_cli_auto_says_which_form_and_why_in_one_line_and_the_law_file_records_it(tmp_path, capsys) -> None:
    runs = _pilots(ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.353, beta=0.353), noise=0.01, seed=2)
    data, out = _csv(tmp_path / "runs.csv", runs), tmp_path / "law.json"
    assert main(["fit", data, "--exponents", "auto", "--bootstrap", "10", "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "exponents:" in ln]
    assert len(lines) == 1
    assert lines[0].strip().startswith("exponents: tied (alpha = beta), auto: leave-the-largest-out error free ")
    assert "free not clearly smaller (needs < 0.9x tied)" in lines[0]
    rec = load_law(out)
    ev = rec.fitted_on["exponents"]
    assert ev["form"] == "tied" and ev["chosen_by"] == "auto" and rec.fitted_on["tie_exponents"] is True
    assert 0 < ev["tied_error"] < 0.9 * ev["free_error"] and ev["n_held_out"] >= 10
    assert rec.law.alpha == rec.law.beta and rec.extrapolation_band() is not None


def test_cli_auto_with_too_few_sizes_fits_free_and_says_so(tmp_path, capsys) -> None:
    true = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.3, beta=0.35)
    N, D = (a.ravel() for a in np.meshgrid([1e8, 3e8], np.logspace(9, 10.5, 4)))
    data = _csv(tmp_path / "runs.csv", make_runs(N, D, true.predict(N, D)))
    assert main(["fit", data, "--exponents", "auto", "--bootstrap", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fit"]["exponents"]["form"] == "free" and doc["fit"]["exponents"]["free_error"] is None
    assert "tie_exponents" not in doc["fit"]
    assert main(["fit", data, "--exponents", "auto", "--bootstrap", "0"]) == 0
    assert "exponents: free (alpha, beta), auto: too few model sizes" in capsys.readouterr().out


def test_cli_tie_exponents_is_an_alias_and_the_default_is_free(tmp_path, capsys) -> None:
    runs = _pilots(ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.28, beta=0.34), noise=0.001, seed=0)
    data = _csv(tmp_path / "runs.csv", runs)
    docs = {}
    for name, flags in (("alias", ["--tie-exponents"]), ("tied", ["--exponents", "tied"]), ("default", [])):
        assert main(["fit", data, "--bootstrap", "5", "--json", *flags]) == 0
        docs[name] = json.loads(capsys.readouterr().out)
    assert docs["alias"]["params"] == docs["tied"]["params"]
    assert docs["alias"]["fit"]["exponents"]["chosen_by"] == "given" and docs["alias"]["fit"]["tie_exponents"]
    assert docs["default"]["fit"]["exponents"]["form"] == "free"
    assert docs["default"]["fit"]["exponents"]["chosen_by"] == "default"
    assert main(["fit", data, "--bootstrap", "0", "--no-calibrate"]) == 0
    assert "exponents: free (alpha, beta), the default (--no-calibrate" in capsys.readouterr().out
    assert main(["fit", data, "--tie-exponents", "--exponents", "free"]) == 2
    assert "--tie-exponents is --exponents tied" in capsys.readouterr().err
    assert main(["fit", data, "--exponents", "auto", "--method", "2"]) == 2
    assert "drop --method 2 (or --exponents auto)" in capsys.readouterr().err
    assert main(["fit", data, "--exponents", "auto", "--data-constrained"]) == 2
    assert "--exponents auto chooses the form of the plain law" in capsys.readouterr().err
