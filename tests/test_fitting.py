"""Law families, law files, fitting accuracy and planning numbers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from scalewatch.fitting import FitError, approach1, approach2, fit_chinchilla, huber_objective, make_runs
from scalewatch.laws import (
    ChinchillaLaw,
    DataConstrainedLaw,
    KaplanLaw,
    LawFileError,
    LawRecord,
    PlanningError,
    data_constrained_plan,
    inference_optimal,
    load_law,
    optimal_allocation,
    save_law,
    tokens_for_loss,
)

TRUE = ChinchillaLaw(E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366)


def _sweep(n: int = 250, noise: float = 0.0, seed: int = 1):
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 10, n)
    D = N * 10 ** rng.uniform(0, 2.5, n)
    L = TRUE.predict(N, D) * np.exp(rng.normal(0, noise, n)) if noise else TRUE.predict(N, D)
    return make_runs(N, D, L)


def test_noise_free_fit_recovers_every_parameter_to_1e_3() -> None:
    res = fit_chinchilla(_sweep(), n_bootstrap=0)
    assert res.converged
    for k, v in res.law.params().items():
        assert abs(v - TRUE.params()[k]) / TRUE.params()[k] <= 1e-3, k
    assert res.residuals.rmse < 1e-6


def test_noisy_fit_has_the_truth_inside_its_95_percent_intervals() -> None:
    res = fit_chinchilla(_sweep(noise=0.01, seed=3), n_bootstrap=100)
    for k, (lo, hi) in res.ci95.items():
        assert lo <= TRUE.params()[k] <= hi, (k, lo, hi)
        assert lo < res.law.params()[k] < hi
    assert 0.005 < res.residuals.rmse < 0.02  # close to the 1% noise put in


def test_objective_is_a_sum_not_a_mean() -> None:
    runs = _sweep(n=50, noise=0.05)
    theta = np.array([np.log(TRUE.A), np.log(TRUE.B), np.log(TRUE.E), TRUE.alpha, TRUE.beta])
    one = huber_objective(theta, np.log(runs.N[:25]), np.log(runs.D[:25]), np.log(runs.L[:25]))
    both = huber_objective(theta, np.log(runs.N), np.log(runs.D), np.log(runs.L))
    two = huber_objective(theta, np.log(runs.N[25:]), np.log(runs.D[25:]), np.log(runs.L[25:]))
    assert both == pytest.approx(one + two)


def _isoflop_sweep():
    rows = []
    for c in np.logspace(18, 21, 5):
        n0, _ = optimal_allocation(TRUE, c)
        for f in np.logspace(-0.8, 0.8, 9):
            rows.append((float(n0) * f, c / (6 * float(n0) * f)))
    N, D = map(np.array, zip(*rows))
    return make_runs(N, D, TRUE.predict(N, D))


def test_approach2_isoflop_recovers_the_allocation_exponent() -> None:
    fit = approach2(_isoflop_sweep(), n_bootstrap=30)
    a_true = TRUE.beta / (TRUE.alpha + TRUE.beta)
    assert fit.exponent == pytest.approx(a_true, abs=0.01)
    assert fit.ci95[0] <= a_true + 0.01 and fit.ci95[1] >= a_true - 0.01
    assert "IsoFLOP groups" in fit.method


def test_approach2_groups_budgets_read_off_a_plot_and_keeps_a_continuum_apart() -> None:
    """Budgets digitised from a figure (N and D each a few % off) are still 5 budgets, not 20 fragments."""
    from scalewatch.fitting import budget_groups

    exact = _isoflop_sweep()
    rng = np.random.default_rng(3)
    N = exact.N * np.exp(rng.normal(0, 0.03, len(exact)))
    D = exact.D * np.exp(rng.normal(0, 0.03, len(exact)))
    jittered = make_runs(N, D, TRUE.predict(N, D))
    assert len([g for g in budget_groups(6 * N * D, N) if len(g) >= 3]) == 5
    fit = approach2(jittered, n_bootstrap=0)
    assert len(fit.points) == 5 and fit.exponent == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.02)
    # computes spread evenly over three decades are no single budget: cut at 5% as before
    assert len(budget_groups(np.logspace(18, 21, 200), np.logspace(7, 9, 200))) > 30
    # exact budgets 1.2x apart, each with its sizes, stay apart
    C, sizes = np.repeat([1e19, 1.2e19, 1.44e19], 5), np.tile(np.logspace(8, 9, 5), 3)
    assert sorted(len(g) for g in budget_groups(C, sizes)) == [5, 5, 5]


def test_approach2_on_two_budgets_says_the_exponent_is_a_line_through_two_points() -> None:
    runs = _isoflop_sweep()
    C = 6 * runs.N * runs.D
    two = runs.subset(np.flatnonzero(C < 2e19))  # the 1e18 and 5.6e18 budgets
    with pytest.warns(UserWarning, match="only 2 compute budgets"):
        fit = approach2(two, n_bootstrap=0)
    assert len(fit.points) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        approach2(runs, n_bootstrap=0)  # five budgets: nothing to say


def test_approach1_envelope_on_per_size_curves() -> None:
    # Model sizes, each trained to many token counts (a Chinchilla-style grid).
    N = np.repeat(np.logspace(7, 10, 13), 25)
    D = np.tile(np.logspace(8, 12.5, 25), 13)
    fit = approach1(make_runs(N, D, TRUE.predict(N, D)), n_bootstrap=20)
    a_true = TRUE.beta / (TRUE.alpha + TRUE.beta)
    assert fit.exponent == pytest.approx(a_true, abs=0.05)
    assert fit.ci95[0] < fit.ci95[1]


@pytest.mark.parametrize("N, D, L, match", [
    ([1e8, -2e8], [1e9, 1e9], [3.0, 3.0], "N must be positive"),
    ([1e8, 2e8], [1e9, np.nan], [3.0, 3.0], "D must be positive"),
    ([1e8, 2e8], [1e9, 1e9], [3.0, 0.0], "loss must be positive.*row 2"),
])
def test_bad_values_are_named(N, D, L, match) -> None:
    with pytest.raises(FitError, match=match):
        make_runs(N, D, L)


def test_too_few_runs_and_a_single_model_size_are_refused() -> None:
    with pytest.raises(FitError, match="at least 6"):
        fit_chinchilla(make_runs([1e8, 2e8, 3e8], [1e9] * 3, [3.0, 2.9, 2.8]))
    N = np.full(10, 1e8)
    D = np.logspace(9, 11, 10)
    with pytest.raises(FitError, match="same N"):
        fit_chinchilla(make_runs(N, D, TRUE.predict(N, D)))


def test_duplicated_rows_warn() -> None:
    with pytest.warns(UserWarning, match="duplicated rows.*row 1"):
        make_runs([1e8, 1e8, 2e8], [1e9, 1e9, 1e9], [3.0, 3.0, 2.9])


# ------------------------------------------------------------------ law files
def test_law_file_round_trip_keeps_uncertainty_and_provenance(tmp_path) -> None:
    res = fit_chinchilla(_sweep(n=60, noise=0.01), n_bootstrap=10)
    path = tmp_path / "law.json"
    save_law(res.to_record(), path)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "scalewatch.law" and doc["version"] == 1 and doc["family"] == "chinchilla"
    assert doc["fitted_on"]["n_runs"] == 60 and "rmse_log" in doc["fitted_on"]
    assert doc["conventions"]["n_params"] == "total"
    back = load_law(path)
    assert back.law == res.law
    assert back.ci95 == {k: tuple(v) for k, v in res.ci95.items()}
    assert len(back.sample_laws()) == len(res.samples)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"schema": "other"}', "not a scalewatch law file"),
    ('{"schema": "scalewatch.law", "version": 99, "family": "chinchilla"}', "version 99"),
    ('{"schema": "scalewatch.law", "version": 1, "family": "mystery", "params": {}}', "unknown law family"),
    ('{"schema": "scalewatch.law", "version": 1, "family": "chinchilla", "params": {"E": 1}}', "missing"),
    ('{"schema": "scalewatch.law", "version": 1, "family": "chinchilla", '
     '"params": {"E": 1, "A": 1, "B": 1, "alpha": "x", "beta": 1}}', "finite numbers"),
])
def test_malformed_law_files_give_one_clear_error(tmp_path, content, match) -> None:
    p = tmp_path / "law.json"
    p.write_text(content)
    with pytest.raises(LawFileError, match=match) as info:
        load_law(p)
    assert "\n" not in str(info.value)


def test_wrong_family_is_refused(tmp_path) -> None:
    p = tmp_path / "k.json"
    save_law(LawRecord(KaplanLaw.published()), p)
    with pytest.raises(LawFileError, match="'kaplan' law, but a 'chinchilla'"):
        load_law(p, family="chinchilla")


# ------------------------------------------------------------------- planning
def test_epoch_refit_plan_at_1e21_flops() -> None:
    n, d = optimal_allocation(ChinchillaLaw.epoch_refit(), 1e21)
    assert float(n) == pytest.approx(2.8e9, rel=0.02)
    assert float(d / n) == pytest.approx(22, abs=0.5)
    assert float(6 * n * d) == pytest.approx(1e21)
    n19, d19 = optimal_allocation(ChinchillaLaw.epoch_refit(), 1e19)
    assert float(n19) == pytest.approx(2.6e8, rel=0.05) and float(d19 / n19) == pytest.approx(24, abs=1)


def test_compute_optimal_is_the_minimum_along_the_isoflop_curve() -> None:
    law = ChinchillaLaw.epoch_refit()
    n, _ = optimal_allocation(law, 1e20)
    grid = float(n) * np.logspace(-0.3, 0.3, 61)
    losses = law.predict(grid, 1e20 / (6 * grid))
    assert grid[np.argmin(losses)] == pytest.approx(float(n), rel=0.03)


def test_tokens_for_loss_inverts_the_law_and_refuses_unreachable_targets() -> None:
    law = ChinchillaLaw.epoch_refit()
    d = tokens_for_loss(law, 2.2, 5e9)
    assert float(law.predict(5e9, d)) == pytest.approx(2.2, rel=1e-12)
    with pytest.raises(PlanningError, match="out of reach"):
        tokens_for_loss(law, 1.9, 1e8)


def test_inference_aware_plan_prefers_a_smaller_longer_trained_model() -> None:
    law = ChinchillaLaw.epoch_refit()
    p = inference_optimal(law, 2.2, inference_tokens=1e13)
    assert p.n_params < p.chinchilla_n_params
    assert p.train_tokens / p.n_params > p.chinchilla_train_tokens / p.chinchilla_n_params
    assert p.total_flops < p.chinchilla_total_flops
    assert float(law.predict(p.n_params, p.train_tokens)) == pytest.approx(2.2, rel=1e-9)
    # no inference: the plan is the compute-optimal one
    p0 = inference_optimal(law, 2.2, inference_tokens=0.0)
    n_opt, _ = optimal_allocation(law, 6 * p0.n_params * p0.train_tokens)
    assert p0.n_params == pytest.approx(float(n_opt), rel=1e-3)


def test_data_constrained_law_and_plan() -> None:
    law = DataConstrainedLaw.published()
    # one epoch of unique data: identical to the base law
    assert float(law.predict(1e9, 2e10, unique=2e10)) == pytest.approx(float(law.base.predict(1e9, 2e10)))
    # 4 epochs of 5e9 unique tokens are worth over 90% of 2e10 fresh tokens; 40 epochs under 40%
    assert 0.9 < float(law.effective_tokens(2e10, 5e9)) / 2e10 < 1.0
    assert float(law.effective_tokens(2e11, 5e9)) / 2e11 < 0.4
    # a model far larger than the unique data supports gains less from its extra parameters
    assert float(law.effective_params(1e10, 5e9)) < 1e10
    p = data_constrained_plan(law, 1e22, unique_tokens=2e10)
    assert p.epochs > 1 and p.loss > p.unconstrained_loss
    assert 0 < p.value_of_next_epoch < 1
    plenty = data_constrained_plan(law, 1e22, unique_tokens=1e14)
    assert plenty.loss == pytest.approx(plenty.unconstrained_loss, rel=1e-6)


def test_kaplan_joint_form_reduces_to_its_limits() -> None:
    k = KaplanLaw.published()
    assert float(k.predict(1e9, 1e30)) == pytest.approx((k.N_c / 1e9) ** k.alpha_N, rel=1e-6)
    assert float(k.predict(1e30, 1e9)) == pytest.approx((k.D_c / 1e9) ** k.alpha_D, rel=1e-6)


def test_no_warnings_from_a_clean_fit() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_chinchilla(_sweep(n=40, noise=0.01), n_bootstrap=3)


# ------------------------------------------------- fast bootstrap (issue 12, item 3)
# Pre-change numbers: fit_chinchilla at commit 6611d32 (grid search repeated in every resample)
# on _noisy80() with n_bootstrap=60.
_OLD_POINT = {"E": 1.8484368245831415, "A": 665.2829023949558, "B": 1976.9112221251696,
              "alpha": 0.3694394003594957, "beta": 0.36273782085784506}
_OLD_CI = {"E": (1.784824450908433, 1.8682500448003618), "A": (337.48474496989417, 1193.7240683700384),
           "B": (1452.8799657983895, 2727.1140093416225), "alpha": (0.32407037035685515, 0.4041829747558695),
           "beta": (0.3461792945874722, 0.37996930888151087)}


def _noisy80():
    rng = np.random.default_rng(3)
    N = 10 ** rng.uniform(7, 10, 80)
    D = N * 10 ** rng.uniform(0, 2.5, 80)
    return make_runs(N, D, TRUE.predict(N, D) * np.exp(rng.normal(0, 0.01, 80)))


def test_point_estimate_is_the_pre_change_one_and_independent_of_the_bootstrap() -> None:
    with_boot = fit_chinchilla(_noisy80(), n_bootstrap=60)
    without = fit_chinchilla(_noisy80(), n_bootstrap=0)
    assert with_boot.law.params() == without.law.params()  # bit-identical
    for k, v in _OLD_POINT.items():
        assert with_boot.law.params()[k] == pytest.approx(v, rel=1e-12), k


def test_warm_started_bootstrap_intervals_match_the_pre_change_ones() -> None:
    # Same resamples (same seed); the old routine re-ran the global grid per resample. Tolerance:
    # 1e-5 relative on every interval end (measured: about 1e-8).
    res = fit_chinchilla(_noisy80(), n_bootstrap=60)
    for k, (lo, hi) in _OLD_CI.items():
        assert res.ci95[k][0] == pytest.approx(lo, rel=1e-5), k
        assert res.ci95[k][1] == pytest.approx(hi, rel=1e-5), k


def test_each_batched_resample_fit_is_the_per_resample_trust_region_fit() -> None:
    from scalewatch.fitting import _fit_theta, bootstrap_indices, bootstrap_thetas

    runs = _sweep(n=60, noise=0.02, seed=5)
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.L)
    theta = _fit_theta(logN, logD, runs.L, 1e-3).x
    resamples = bootstrap_indices(len(runs), 15, 1, logN, logD)
    fast = bootstrap_thetas(theta, logN, logD, logL, resamples)
    for row, idx in zip(fast, resamples):
        slow = _fit_theta(logN[idx], logD[idx], runs.L[idx], 1e-3, extra_starts=[theta], k=1).x
        assert np.allclose(row[3:], slow[3:], rtol=1e-5)  # exponents
        assert np.allclose(np.exp(row[:3]), np.exp(slow[:3]), rtol=1e-4)  # A, B, E


def test_bootstrap_of_240_runs_takes_well_under_the_old_time() -> None:
    import time

    runs = _sweep(n=240, noise=0.01, seed=2)
    t = time.perf_counter()
    res = fit_chinchilla(runs, n_bootstrap=200)
    elapsed = time.perf_counter() - t
    assert len(res.samples) == 200
    assert elapsed < 5.0  # 0.2-0.4 s measured on the shared 2-core machine; the old routine took 7-12 s


# ------------------------------------------------- data-constrained fitter (issue 12, item 4)
DC_TRUE = DataConstrainedLaw(E=1.9, A=500.0, B=1500.0, alpha=0.35, beta=0.35, R_D=15.4, R_N=5.3)


def _dc_sweep(noise: float = 0.0, seed: int = 0):
    N, U, epochs = (a.ravel() for a in np.meshgrid(np.logspace(7.5, 9.5, 5), np.logspace(9, 10.5, 4),
                                                   [0.5, 1, 2, 4, 8, 16, 40]))
    D = U * epochs
    rng = np.random.default_rng(seed)
    return make_runs(N, D, DC_TRUE.predict(N, D, unique=U) * np.exp(rng.normal(0, noise, N.size)), U=U)


def test_data_constrained_fit_recovers_r_stars_jointly() -> None:
    from scalewatch.fitting import fit_data_constrained

    exact = fit_data_constrained(_dc_sweep(), n_bootstrap=0)
    for k, v in DC_TRUE.params().items():
        assert exact.law.params()[k] == pytest.approx(v, rel=1e-3), k
    noisy = fit_data_constrained(_dc_sweep(noise=0.005, seed=1), n_bootstrap=30)
    assert noisy.law.R_D == pytest.approx(15.4, rel=0.25) and noisy.law.R_N == pytest.approx(5.3, rel=0.5)
    assert noisy.ci95["R_D"][0] <= 15.4 <= noisy.ci95["R_D"][1]
    assert noisy.ci95["R_N"][0] <= 5.3 <= noisy.ci95["R_N"][1]


def test_data_constrained_fit_with_a_fixed_base_fits_only_the_r_stars() -> None:
    from scalewatch.fitting import fit_data_constrained

    fit = fit_data_constrained(_dc_sweep(noise=0.003, seed=2), base=DC_TRUE.base, n_bootstrap=0)
    assert fit.base_fixed and fit.law.base == DC_TRUE.base
    assert fit.law.R_D == pytest.approx(15.4, rel=0.1) and fit.law.R_N == pytest.approx(5.3, rel=0.2)


def test_data_constrained_fit_refuses_data_without_unique_tokens_or_repetition() -> None:
    from scalewatch.fitting import fit_data_constrained

    runs = _dc_sweep()
    with pytest.raises(FitError, match="unique_tokens column"):
        fit_data_constrained(make_runs(runs.N, runs.D, runs.L))
    fresh = np.flatnonzero(runs.D <= runs.U)
    with pytest.raises(FitError, match="no run repeats its data"):
        fit_data_constrained(runs.subset(fresh))


# ------------------------------------------- alpha = beta tied, two-stage data-constrained (issue 12)
TIED_TRUE = ChinchillaLaw(E=1.869, A=520.8, B=1487.7, alpha=0.353, beta=0.353)  # Muennighoff et al.'s base


def _tied_sweep(n: int = 120, noise: float = 0.0, seed: int = 4):
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 9.5, n)
    D = N * 10 ** rng.uniform(0.5, 2.5, n)
    L = TIED_TRUE.predict(N, D) * (np.exp(rng.normal(0, noise, n)) if noise else 1.0)
    return make_runs(N, D, L)


def test_tied_fit_recovers_every_parameter_of_a_tied_law() -> None:
    res = fit_chinchilla(_tied_sweep(), n_bootstrap=0, tie_exponents=True)
    assert res.converged and res.tie_exponents
    assert res.law.alpha == res.law.beta
    for k, v in TIED_TRUE.params().items():
        assert abs(res.law.params()[k] - v) / v <= 1e-3, k
    assert res.residuals.rmse < 1e-6


def test_tied_fit_intervals_hold_the_truth_and_every_resample_is_tied() -> None:
    res = fit_chinchilla(_tied_sweep(noise=0.01, seed=7), n_bootstrap=60, tie_exponents=True)
    assert len(res.samples) == 60 and np.array_equal(res.samples[:, 3], res.samples[:, 4])
    for k, (lo, hi) in res.ci95.items():
        assert lo <= TIED_TRUE.params()[k] <= hi, (k, lo, hi)
    assert "alpha = beta tied" in res.method and res.to_record().fitted_on["tie_exponents"] is True


def test_tied_batched_resample_fits_are_the_per_resample_trust_region_fits() -> None:
    from scalewatch.fitting import _fit_theta, bootstrap_indices, bootstrap_thetas

    runs = _tied_sweep(n=60, noise=0.02, seed=5)
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.L)
    theta = _fit_theta(logN, logD, runs.L, 1e-3, tied=True).x
    resamples = bootstrap_indices(len(runs), 15, 1, logN, logD)
    fast = bootstrap_thetas(theta, logN, logD, logL, resamples, tied=True)
    for row, idx in zip(fast, resamples):
        slow = _fit_theta(logN[idx], logD[idx], runs.L[idx], 1e-3, extra_starts=[theta], k=1, tied=True).x
        assert row[3] == row[4] and slow[3] == slow[4]
        assert np.allclose(row[3:], slow[3:], rtol=1e-5)
        assert np.allclose(np.exp(row[:3]), np.exp(slow[:3]), rtol=1e-4)


def test_tied_fit_of_an_untied_law_lands_between_its_exponents_and_the_default_is_untouched() -> None:
    runs = _sweep(n=120, noise=0.0)
    tied = fit_chinchilla(runs, n_bootstrap=0, tie_exponents=True).law
    assert TRUE.alpha - 0.05 < tied.alpha == tied.beta < TRUE.beta + 0.05
    free = fit_chinchilla(runs, n_bootstrap=0)
    assert not free.tie_exponents and "tie_exponents" not in free.to_record().fitted_on
    assert free.law.alpha == pytest.approx(TRUE.alpha, rel=1e-3)


def test_tied_law_file_reads_back_as_a_plain_chinchilla_law(tmp_path) -> None:
    res = fit_chinchilla(_tied_sweep(noise=0.005), n_bootstrap=5, tie_exponents=True)
    save_law(res.to_record(), tmp_path / "tied.json")
    back = load_law(tmp_path / "tied.json")
    assert back.law == res.law and back.fitted_on["tie_exponents"] is True


def test_tied_fit_needs_five_runs_not_six() -> None:
    N, D = np.array([1e7, 3e7, 1e8, 3e8, 1e9]), np.array([3e9, 1e9, 4e9, 1e10, 3e10])
    runs = make_runs(N, D, TIED_TRUE.predict(N, D))
    assert fit_chinchilla(runs, n_bootstrap=0, tie_exponents=True).law.alpha == pytest.approx(0.353, rel=1e-3)
    with pytest.raises(FitError, match="5 parameters"):
        fit_chinchilla(runs, n_bootstrap=0)


def _two_stage_sweep(noise: float = 0.0, seed: int = 0):
    # Single-epoch runs at N <= N_opt(U) (25-400 tokens per parameter, where N' = N: the base law alone),
    # repeated runs of the same sizes on 25 and 6 tokens per parameter of unique data, 2-40 epochs.
    N = np.logspace(7, 9, 5)
    fresh_N, ratio = (a.ravel() for a in np.meshgrid(N, [25, 50, 100, 200, 400]))
    rep_N, u_ratio, epochs = (a.ravel() for a in np.meshgrid(N, [25, 6.25], [2, 4, 8, 16, 40]))
    n = np.concatenate([fresh_N, rep_N])
    u = np.concatenate([fresh_N * ratio, rep_N * u_ratio])
    d = np.concatenate([fresh_N * ratio, rep_N * u_ratio * epochs])
    rng = np.random.default_rng(seed)
    return make_runs(n, d, DC_TRUE.predict(n, d, unique=u) * np.exp(rng.normal(0, noise, n.size)), U=u)


@pytest.mark.slow
def test_two_stage_data_constrained_fit_recovers_base_and_r_stars() -> None:
    from scalewatch.fitting import fit_data_constrained

    exact = fit_data_constrained(_two_stage_sweep(), n_bootstrap=0, two_stage=True, tie_exponents=True)
    assert exact.two_stage and not exact.base_fixed and "two stages" in exact.method
    assert exact.to_record().fitted_on["two_stage"] is True
    for k, v in DC_TRUE.params().items():
        assert exact.law.params()[k] == pytest.approx(v, rel=1e-3), k
    noisy = fit_data_constrained(_two_stage_sweep(noise=0.003, seed=1), n_bootstrap=30, two_stage=True)
    assert noisy.law.R_D == pytest.approx(15.4, rel=0.3) and noisy.law.R_N == pytest.approx(5.3, rel=0.3)
    assert noisy.ci95["R_D"][0] <= 15.4 <= noisy.ci95["R_D"][1]
    assert noisy.ci95["R_N"][0] <= 5.3 <= noisy.ci95["R_N"][1]


def test_two_stage_needs_single_epoch_runs_for_its_base() -> None:
    from scalewatch.fitting import fit_data_constrained

    runs = _two_stage_sweep()
    repeated = runs.subset(np.flatnonzero(runs.D > runs.U))
    with pytest.raises(FitError, match="single-epoch runs"):
        fit_data_constrained(repeated, n_bootstrap=0, two_stage=True)
    with pytest.raises(FitError, match="drop them, or drop base"):  # options that would be ignored say so
        fit_data_constrained(runs, base=DC_TRUE.base, n_bootstrap=0, two_stage=True)
    with pytest.raises(FitError, match="pass two_stage=True"):
        fit_data_constrained(runs, n_bootstrap=0, tie_exponents=True)
