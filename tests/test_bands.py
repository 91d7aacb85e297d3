"""Issue 14: forecast and prediction bands calibrated on the pilots themselves: coverage near nominal on
synthetic held-out runs, bands that shrink with the prefix, old law files, bad blocks, live tags."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_curves import cosine, synthetic, wsd

from scalewatch.bands import ForecastCalibration, ScheduleReach, calibrate_forecast, conformal_quantile
from scalewatch.curves import FORM_LINEAR, CurveLaw, fit_curves, forecast_final, load_curve_law, save_curve_law
from scalewatch.laws import LawFileError

TRUE = {"L0": 2.5, "A": 0.6, "alpha": 0.7, "C": 0.5}
NOISE = 0.003  # relative sd of each logged point
OFFSET = 0.01  # relative sd of a run's level around the recipe's


def noisy(name: str, schedule: np.ndarray, rng: np.random.Generator, every: int = 100):
    """A run of the recipe: its own level (sd OFFSET) and noisy points (sd NOISE), both known."""
    c = synthetic(name, schedule, dict(TRUE, L0=TRUE["L0"] * (1 + OFFSET * rng.standard_normal())), every=every)
    c.loss = c.loss * (1 + NOISE * rng.standard_normal(len(c.loss)))
    return c


SCHEDULES = {"cos": lambda: cosine(12000), "const": lambda: np.full(12001, 3e-4), "wsd": lambda: wsd(12000, 9600),
             "cos2": lambda: cosine(12000, peak=2e-4)}


@pytest.fixture(scope="module")
def calibrated() -> CurveLaw:
    rng = np.random.default_rng(0)
    pilots = [noisy(f"{k}{i}", make(), rng) for i in range(2) for k, make in SCHEDULES.items()]
    return fit_curves(pilots).law


def test_forecast_band_holds_about_90_percent_of_held_out_runs_and_shrinks_with_the_prefix(calibrated) -> None:
    cal = calibrated.forecast_band
    assert cal is not None and cal.replays >= 50 and cal.curves == 8  # rests on the pilots' own replays
    rng = np.random.default_rng(1)
    inside, half, err = {0.2: [], 0.6: []}, {0.2: [], 0.6: []}, {0.2: [], 0.6: []}
    for i in range(30):
        run = noisy(f"run{i}", list(SCHEDULES.values())[i % 4](), rng)
        end = int(run.steps[-1])
        for f in (0.2, 0.6):  # the truth is the last logged point, noise and all, as in the replays
            m = run.steps <= f * end
            fc = forecast_final(calibrated, run.schedule, run.steps[m], run.loss[m])
            y = float(run.loss[-1])
            inside[f].append(fc.low <= y <= fc.high)
            half[f].append((fc.high - fc.loss) / fc.loss)
            err[f].append(abs(fc.loss - y) / y)
    coverage = np.mean(inside[0.2] + inside[0.6])
    assert 0.8 <= coverage <= 0.99  # a 90% band: neither blind nor uninformative
    assert np.mean(half[0.6]) < np.mean(half[0.2])  # the band shrinks as the prefix grows
    assert np.mean(half[0.6]) <= 4 * np.mean(err[0.6])  # and stays near the error it has to cover


def test_calibration_scales_with_the_noise_it_was_measured_on() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for scale in (1.0, 3.0):
        pilots = []
        for i in range(2):
            for k, make in SCHEDULES.items():
                c = synthetic(f"{k}{i}", make(), TRUE)
                c.loss = c.loss * (1 + scale * NOISE * rng.standard_normal(len(c.loss)))
                pilots.append(c)
        law = fit_curves(pilots).law
        run = synthetic("run", cosine(12000), TRUE)
        m = run.steps <= 0.5 * 12000
        fc = forecast_final(law, run.schedule, run.steps[m], run.loss[m])
        widths.append((fc.high - fc.loss) / fc.loss)
    assert 1.5 < widths[1] / widths[0] < 6  # three times the noise: a band about three times as wide


def test_calibration_survives_the_file_and_old_files_load_with_the_old_band(calibrated, tmp_path) -> None:
    save_curve_law(calibrated, tmp_path / "law.json")
    again = load_curve_law(tmp_path / "law.json")
    assert again.forecast_band == calibrated.forecast_band and again.reach == calibrated.reach
    doc = json.loads((tmp_path / "law.json").read_text())
    assert doc["forecast_band"]["replays"] == calibrated.forecast_band.replays
    # A file from before issue 14: neither block. It loads, and its forecast keeps the old band
    # (the law's own at the final step, spanning the prior).
    del doc["forecast_band"], doc["band"]["beyond_pilots"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = load_curve_law(tmp_path / "old.json")
    assert old.forecast_band is None and old.reach is None
    run = synthetic("run", cosine(12000), dict(TRUE, L0=2.55))
    m = run.steps <= 6000
    fc = forecast_final(old, run.schedule, run.steps[m], run.loss[m])
    assert fc.high - fc.low >= 2 * old.band_at(None, 1.0) * fc.loss * 0.999
    assert fc.low <= min(fc.loss, fc.prior_loss) and fc.high >= max(fc.loss, fc.prior_loss)
    for block, bad, match in (("forecast_band", {"by_fraction": [[0.2, -1, 3]]}, "forecast_band.by_fraction"),
                              ("forecast_band", {"by_fraction": [[0.6, 2, 3], [0.2, 2, 3]]}, "sorted"),
                              ("forecast_band", [1, 2], "forecast_band must be an object"),
                              ("beyond_pilots", {"s1_max": 0}, "beyond_pilots")):
        d = json.loads((tmp_path / "law.json").read_text())
        (d["band"] if block == "beyond_pilots" else d)[block] = bad
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(LawFileError, match=match) as exc:
            load_curve_law(tmp_path / "bad.json")
        assert "\n" not in str(exc.value)


def test_predicted_band_widens_past_the_pilots_summed_lr() -> None:
    law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0), "lnC": (0.0, 0.0)}, n_ref=1.0,
                   band_rel=0.01, reach=ScheduleReach(s1_max=0.1, per_ln_s1=1.0))
    p = law.predict(np.full(301, 1e-3), steps=[50, 100, 300])  # S1 = 0.051, 0.101, 0.301
    rel = (p.high - p.loss) / p.loss
    assert rel[0] == pytest.approx(0.01) and rel[1] == pytest.approx(0.01, rel=0.02)
    assert rel[2] == pytest.approx(0.01 * (1 + math.log(0.301 / 0.1)), rel=1e-6)


def test_live_plugin_keeps_its_tags_with_a_calibrated_law(calibrated) -> None:
    from scalewatch.forecast import CurvePlugin
    from scalewatch.monitor import Monitor, Observation

    sched = cosine(12000)
    m = Monitor(plugins=[CurvePlugin(calibrated, sched)])
    run = synthetic("run", sched, TRUE)
    for s, y in zip(run.steps[:40], run.loss[:40], strict=True):
        r = m.observe(Observation(step=int(s), tokens=0, samples=0, flops=0, loss=float(y)))
    assert set(r.scalars) >= {"loss_pred", "loss_pred_low", "loss_pred_high", "loss_pred_final", "loss_residual",
                              "loss_forecast_final", "loss_forecast_final_low", "loss_forecast_final_high",
                              "loss_forecast_at_step"}
    assert r.scalars["loss_forecast_final_low"] < r.scalars["loss_forecast_final"] < r.scalars["loss_forecast_final_high"]


def test_conformal_quantile_and_calibration_records() -> None:
    assert conformal_quantile(np.arange(1, 100), 0.9) == 90.0
    assert calibrate_forecast([]) is None
    cal = ForecastCalibration([(0.2, 3.0, 10), (0.8, 1.0, 10)], per_ln_n=0.5)
    assert cal.quantile_at(0.1) == 3.0 and cal.quantile_at(0.5) == pytest.approx(2.0)
    assert cal.half_width(0.01, 0.8, n_out=2.0) == pytest.approx(0.02)
    assert cal.half_width(1e-6, 0.8) == cal.floor_rel


def _family(sizes, curvature: float):
    """Curves of a recipe at several sizes whose level is linear in ln N plus ``curvature * x**2``."""
    def params(n):
        x = math.log(n / 1e8)
        return {"L0": 2.6 - 0.15 * x + curvature * x * x, "A": 0.6 * math.exp(0.1 * x), "alpha": 0.7 - 0.02 * x,
                "C": 0.5}
    return [synthetic(f"{n:.0e}-{k}", make(), params(n), n) for n in sizes
            for k, make in (("cos", lambda: cosine(12000)), ("const", lambda: np.full(12001, 3e-4)),
                            ("wsd", lambda: wsd(12000, 9600)))], params


def test_band_growth_outside_the_pilot_sizes_is_measured_by_leaving_the_largest_size_out() -> None:
    from scalewatch.bands import SizeReach, widening

    sizes = (5e7, 1e8, 2e8)
    exact, _ = _family(sizes, 0.0)
    curved, params = _family(sizes, 0.03)  # the level bends in ln N: a law linear in ln N misses outside
    # The linear form on purpose: the family is built linear in ln N, so one law fits exactly and the
    # other misses outside the pilots, which is what the size-out replays must measure.
    law_exact = fit_curves(exact, calibrate=False, form=FORM_LINEAR).law
    law_curved = fit_curves(curved, calibrate=False, form=FORM_LINEAR).law
    for law in (law_exact, law_curved):  # measured at the distance of one size step, ln 2
        assert law.size_reach is not None and law.size_reach.points > 0
        assert law.size_reach.n_out_max == pytest.approx(math.log(2), rel=1e-6)
    assert law_curved.size_reach.per_ln_n > law_exact.size_reach.per_ln_n + 0.5  # the bend shows in the replays
    # The curved family's band at 2x the largest pilot N holds that size's truth (it grew with distance)...
    target = synthetic("4e8", cosine(12000), params(4e8), 4e8)
    steps = target.steps[target.steps >= 1200]  # past the first 10%, which no fit looks at
    p = law_curved.predict(target.schedule, n_params=4e8, steps=steps)
    y = target.loss[target.steps >= 1200]
    assert np.mean((y >= p.low) & (y <= p.high)) >= 0.9
    # ... and past the measured distance the band never grows slower than the unmeasured rule.
    r = law_exact.size_reach
    far = math.log(8.0)
    assert r.factor(far) - r.factor(r.n_out_max) >= (far - r.n_out_max) * 1.0 - 1e-9
    assert widening(far, 0.1) == pytest.approx(1 + 0.1 * far)  # files without n_out_max: as before
    # Two sizes cannot measure it: the law left would have no N-dependence. The old rule stays.
    two = fit_curves(_family((5e7, 2e8), 0.0)[0], calibrate=False).law
    assert two.size_reach is None and two.band_at(4e8) == pytest.approx(two.band_at(1e8) * (1 + math.log(2)))
    assert SizeReach.from_json(SizeReach(0.3, 10, 0.7).to_json(), "x") == SizeReach(0.3, 10, 0.7)


def test_size_reach_survives_the_file_and_predict_says_which_rule_widened(tmp_path, capsys) -> None:
    from scalewatch.cli import main as cli

    law = fit_curves(_family((5e7, 1e8, 2e8), 0.03)[0], calibrate=False).law
    save_curve_law(law, tmp_path / "law.json")
    again = load_curve_law(tmp_path / "law.json")
    assert again.size_reach == law.size_reach and again.band_at(4e8) == pytest.approx(law.band_at(4e8))
    doc = json.loads((tmp_path / "law.json").read_text())
    assert doc["band"]["beyond_sizes"]["points"] == law.size_reach.points
    del doc["band"]["beyond_sizes"]  # a file from before: the (1 + distance) rule
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = load_curve_law(tmp_path / "old.json")
    assert old.size_reach is None and old.band_at(4e8) == pytest.approx(old.band_at(1e8) * (1 + math.log(2)))
    sched = cosine(12000)
    (tmp_path / "s.csv").write_text("step,lr\n" + "".join(f"{s},{sched[s]}\n" for s in range(0, 12001, 100)))
    for name, says in (("law.json", "measured by leaving the largest"), ("old.json", "predates that measurement")):
        assert cli(["predict", "--law", str(tmp_path / name), "--schedule", str(tmp_path / "s.csv"),
                    "--n-params", "4e8"]) == 0
        err = capsys.readouterr().err
        assert "outside the pilot sizes" in err and says in err
    two = fit_curves(_family((5e7, 1e8), 0.03)[0], calibrate=False).law  # two sizes: nothing to measure with
    assert two.size_reach is None
    save_curve_law(two, tmp_path / "two.json")
    assert cli(["predict", "--law", str(tmp_path / "two.json"), "--schedule", str(tmp_path / "s.csv"),
                "--n-params", "4e8"]) == 0
    err = capsys.readouterr().err
    assert "not measured: leaving a size out needs 3+ pilot sizes; this law has 2" in err and "predates" not in err
    doc["band"]["beyond_sizes"] = {"per_ln_n": -1}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(LawFileError, match="beyond_sizes"):
        load_curve_law(tmp_path / "bad.json")


def test_forecast_band_rests_on_leave_out_replays_when_there_are_any(calibrated) -> None:
    cal = calibrated.forecast_band
    assert "leave-out" in cal.method and "forward" not in cal.method
    two = fit_curves([noisy("cos", cosine(12000), np.random.default_rng(3)),
                      noisy("const", np.full(12001, 3e-4), np.random.default_rng(4))]).law
    assert "forward" in two.forecast_band.method  # two curves: the forward replays are all there is


def test_predicted_band_past_the_pilots_summed_lr_holds_a_run_three_times_longer() -> None:
    rng = np.random.default_rng(5)
    pilots = [noisy(f"{k}{i}", make(), rng) for i in range(2) for k, make in SCHEDULES.items()]
    law = fit_curves(pilots, calibrate=False).law
    assert law.reach is not None and law.reach.per_ln_s1 > 0
    inside, flat, half, err = [], [], [], []
    for i in range(12):  # constant-LR runs three times as long as the pilots
        run = noisy(f"long{i}", np.full(36001, 3e-4), rng, every=300)
        p = law.predict(run.schedule, steps=run.steps)
        far = run.steps > 12000
        inside.append(np.mean(((run.loss >= p.low) & (run.loss <= p.high))[far]))
        w = law.band_at(None, run.steps / 36000)[far] * p.loss[far]  # the band without the widening
        flat.append(np.mean(np.abs(run.loss[far] - p.loss[far]) <= w))
        half.append(np.mean(((p.high - p.loss) / p.loss)[far]))
        err.append(np.mean((np.abs(p.loss - run.loss) / run.loss)[far]))
    assert np.mean(inside) >= 0.8 and np.mean(inside) > np.mean(flat)
    assert np.mean(half) <= 4 * np.mean(err)  # not a blanket: about as wide as the error it holds


# ------------------------------------------------------------------ issue 14, second round: the blend and
# the prior-only widening outside the pilot sizes


def bumped(name: str, schedule: np.ndarray, rng: np.random.Generator, offset: float, transient: float,
           params=None, n_params=None):
    """A run of the recipe: its own level (relative sd ``offset``), noisy points (sd NOISE) and an early
    transient the law has no term for (up to ``transient`` in loss, either sign, dying out over the first
    fifth of the run, e.g. a slow warm-up recovery): it pulls an early prefix fit the wrong way."""
    p = params or TRUE
    c = synthetic(name, schedule, dict(p, L0=p["L0"] * (1 + offset * rng.standard_normal())), n_params)
    c.loss = (c.loss + transient * rng.uniform(-1, 1) * np.exp(-c.steps / 2000.0)) \
        * (1 + NOISE * rng.standard_normal(len(c.loss)))
    return c


def test_blend_is_never_worse_than_the_prior_or_the_prefix_fit_alone_in_replay() -> None:
    from scalewatch.bands import Replay, choose_blend

    rng = np.random.default_rng(7)
    for _ in range(50):  # any replays: both ends of the family are candidates
        rs = [Replay("c", 0.2, float(e), 0.01, 0.0, "leave-out", float(p), float(d))
              for e, p, d in zip(rng.normal(0, 0.02, 20), rng.normal(0, 0.01, 20), rng.uniform(0, 0.2, 20),
                                 strict=True)]
        _, blend, fit, prior = choose_blend(rs, one_se=False)
        assert blend <= min(fit, prior) + 1e-12
        # The one-standard-error rule gives up at most one standard error of the paired differences for a
        # blend nearer the prefix fit alone: never systematically worse than either end.
        scale, blend_1se, _, _ = choose_blend(rs)
        for end in (None, 0.0):
            diff = np.array([abs(r.blended(scale)) - abs(r.blended(end)) for r in rs])
            assert blend_1se >= blend - 1e-12 and diff.mean() <= 2 * diff.std(ddof=1) / math.sqrt(len(rs)) + 1e-12


def test_without_leave_out_replays_the_blend_keeps_the_prior_unless_the_prefix_helps_beyond_noise() -> None:
    from scalewatch.bands import Replay, calibrate_forecast, choose_blend

    rng = np.random.default_rng(3)
    # The prefix fit and the prior are equally good on these replays (the same error distribution, paired noise).
    prior = rng.normal(0, 0.004, 40)
    fit = prior + rng.normal(0, 0.001, 40)
    rs = [Replay("c%d" % i, 0.4, float(e), 0.004, 0.0, "forward", float(p), 0.05)
          for i, (e, p) in enumerate(zip(fit, prior, strict=True))]
    assert choose_blend(rs)[0] is None  # the usual rule: the end nearest the prefix fit (the prefix fit alone)
    assert choose_blend(rs, toward_prior=True)[0] == 0.0  # from the other end: the prior alone
    cal = calibrate_forecast(rs, prior_widening=True)
    assert [v for _, v, _ in cal.blend] == [0.0]
    # With leave-out replays among them, the usual rule (they can show the prefix's harm themselves).
    cal = calibrate_forecast([Replay(r.curve, r.fraction, r.rel_error, r.sd_rel, 0.0, "leave-out", r.prior_rel_error,
                                     r.drop) for r in rs], prior_widening=True)
    assert [v for _, v, _ in cal.blend] == [choose_blend(rs)[0]]
    # Where the prefix clearly helps, the prior-ward rule takes it too.
    helped = [Replay(r.curve, r.fraction, r.rel_error * 0.1, r.sd_rel, 0.0, "forward", r.prior_rel_error + 0.01,
                     r.drop) for r in rs]
    scale = calibrate_forecast(helped, prior_widening=True).blend[0][1]
    assert scale is None or scale > 0.05


# (offset, transient): the prior is good and an early transient misleads the prefix; or the runs' levels
# differ (a poor prior) and the prefix is the only evidence of a run's own level.
MISLEADING, INFORMATIVE = (0.002, 0.3), (0.02, 0.0)


@pytest.mark.parametrize("offset, transient", [MISLEADING, INFORMATIVE])
def test_blended_forecast_of_held_out_runs_is_no_worse_than_prior_or_prefix_fit(offset, transient) -> None:
    from scalewatch.forecast import prefix_fit

    rng = np.random.default_rng(7)
    pilots = [bumped(f"{k}{i}", make(), rng, offset, transient) for i in range(2) for k, make in SCHEDULES.items()]
    law = fit_curves(pilots).law
    cal = law.forecast_band
    assert cal.blend is not None and len(cal.blend) == len(cal.by_fraction)
    assert cal.blend_errors[0] <= min(cal.blend_errors[1:]) * 1.05  # on the pilots' own replays
    err = {(f, k): [] for f in (0.2, 0.8) for k in ("blend", "fit", "prior")}
    inside = []
    for i in range(16):  # runs the law never saw: truth known
        run = bumped(f"run{i}", list(SCHEDULES.values())[i % 4](), rng, offset, transient)
        end, y = int(run.steps[-1]), float(run.loss[-1])
        for f in (0.2, 0.8):
            m = run.steps <= f * end
            fc = forecast_final(law, run.schedule, run.steps[m], run.loss[m])
            raw = prefix_fit(law, run.schedule, run.steps[m], run.loss[m])
            assert raw.loss == pytest.approx(fc.fit_loss) and 0 <= fc.weight <= 1
            inside.append(fc.low <= y <= fc.high)
            for k, v in (("blend", fc.loss), ("fit", raw.loss), ("prior", fc.prior_loss)):
                err[(f, k)].append(abs(v - y) / y)
    mean = {k: float(np.mean(v)) for k, v in err.items()}
    for f in (0.2, 0.8):
        assert mean[(f, "blend")] <= 1.1 * min(mean[(f, "fit")], mean[(f, "prior")])
    if (offset, transient) == MISLEADING:  # the prior carries the early forecast: the prefix fit misses 2x more
        assert cal.blend[0][1] is not None and mean[(0.2, "blend")] < 0.6 * mean[(0.2, "fit")]
    else:  # the prefix carries it: no weight taken from it
        assert all(v is None for _, v, _ in cal.blend) and mean[(0.8, "blend")] < 0.5 * mean[(0.8, "prior")]
    assert 0.8 <= np.mean(inside) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(5e7, 2e8), (5e7, 1e8, 2e8)])
def test_band_outside_the_pilot_sizes_holds_the_truth_and_shrinks_with_the_prefix(sizes) -> None:
    rng = np.random.default_rng(9)
    params = _family((5e7,), 0.0)[1]
    pilots = [bumped(f"{n:.0e}-{k}{i}", make(), rng, OFFSET, 0.0, params(n), n) for n in sizes for i in range(2)
              for k, make in SCHEDULES.items()]
    # The linear form, which this family (level linear in ln N) follows: the test is of the band's
    # mechanics out of range. With the floor form (the default) the same family is misspecified and two
    # sizes give 82% here (measured when the floor form became the default), below this test's 85%.
    law = fit_curves(pilots, form=FORM_LINEAR).law
    cal = law.forecast_band
    if len(sizes) == 2:  # nothing measures how far a prefix corrects a law extrapolated in N: the blanket rule,
        # and outside the sizes no blend (the in-range replays say nothing of a prior extrapolated in N)
        assert not cal.prior_widening and cal.per_ln_n == 1.0 and cal.per_ln_n_replays == 0
        assert cal.blend_far is None and not cal.blended_at(1.0) and cal.blend_weight(0.2, 0.2, 2.0, n_out=1.0) == 1.0
    else:  # size-out replays: the N-widening is on the prior, the band by what those replays needed beyond it,
        # and the blend outside the sizes is chosen on them
        assert cal.prior_widening and cal.per_ln_n_replays > 0 and "prior widens" in cal.method
        assert cal.blend_far is not None and cal.blended_at(1.0)
        again = type(cal).from_json(json.loads(json.dumps(cal.to_json())), "x")
        assert again.blend_far == cal.blend_far and again.prior_widening and again.by_fraction_fit == cal.by_fraction_fit
    half, inside = {}, []
    for n in (1e8, 8e8):  # inside, and ln 4 beyond the largest pilot
        for i in range(16):
            run = bumped(f"run{i}", list(SCHEDULES.values())[i % 4](), rng, OFFSET, 0.0, params(n), n)
            for f in (0.2, 0.5, 0.9):
                m = run.steps <= f * 12000
                fc = forecast_final(law, run.schedule, run.steps[m], run.loss[m], n_params=n)
                half.setdefault((n, f), []).append((fc.high - fc.loss) / fc.loss)
                inside.append(fc.low <= run.loss[-1] <= fc.high)
    half = {k: float(np.mean(v)) for k, v in half.items()}
    assert np.mean(inside) >= 0.85  # the shape a prefix cannot fix (alpha, C extrapolated in N) stays covered
    assert half[(8e8, 0.9)] < half[(8e8, 0.5)] < half[(8e8, 0.2)]  # the band shrinks with the evidence
    assert half[(8e8, 0.2)] > half[(1e8, 0.2)]  # and is wider out of range than in it
    if len(sizes) == 3:  # the prior's widening fades as the prefix pins the level: it shrinks faster out of range
        assert half[(8e8, 0.2)] / half[(8e8, 0.9)] > 1.5 * half[(1e8, 0.2)] / half[(1e8, 0.9)]


def test_blend_survives_the_file_and_older_calibrations_forecast_with_the_prefix_fit_alone(
        tmp_path) -> None:
    rng = np.random.default_rng(10)
    pilots = [bumped(f"{k}{i}", make(), rng, *MISLEADING) for i in range(2) for k, make in SCHEDULES.items()]
    law = fit_curves(pilots).law
    save_curve_law(law, tmp_path / "law.json")
    again = load_curve_law(tmp_path / "law.json")
    assert again.forecast_band.blend == law.forecast_band.blend and again.forecast_band.blend_errors is not None
    run = bumped("run", cosine(12000), rng, *MISLEADING)
    m = run.steps <= 2400
    a, b = (forecast_final(x, run.schedule, run.steps[m], run.loss[m]) for x in (law, again))
    assert (a.loss, a.low, a.high) == pytest.approx((b.loss, b.low, b.high))
    doc = json.loads((tmp_path / "law.json").read_text())
    for k in ("prior_widening", "blend", "blend_mean_abs_error"):  # a calibration from before them
        doc["forecast_band"].pop(k, None)
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = load_curve_law(tmp_path / "old.json")
    assert not old.forecast_band.prior_widening and old.forecast_band.blend is None
    fc = forecast_final(old, run.schedule, run.steps[m], run.loss[m])
    assert fc.weight == 1.0 and fc.loss == pytest.approx(fc.fit_loss)  # the prefix fit alone, as before
    doc["forecast_band"]["blend"] = [[0.2, -1, 3]]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(LawFileError, match="blend"):
        load_curve_law(tmp_path / "bad.json")


def test_widening_past_the_pilots_summed_lr_depends_on_how_far_the_schedule_has_annealed(tmp_path) -> None:
    from scalewatch.bands import calibrate_reach

    # Held-out points past the fit's S1: those still at the peak LR missed by 3x their band, annealed ones
    # by 1.5x (the pilots' anneals pin the annealing term): each group sets its own slope.
    rng = np.random.default_rng(11)
    beyond = rng.uniform(0.1, 1.0, 400)
    lr_rel = np.r_[np.ones(200), np.full(200, 0.1)]
    err = np.r_[np.full(200, 0.03), np.full(200, 0.015)] * rng.uniform(0.2, 1.0, 400)
    r = calibrate_reach(err, np.full(400, 0.01), beyond, s1_max=7.2, lr_rel=lr_rel)
    pooled = calibrate_reach(err, np.full(400, 0.01), beyond, s1_max=7.2)
    assert r.per_ln_s1_annealed is not None and r.per_ln_s1_annealed < pooled.per_ln_s1 <= r.per_ln_s1
    s1 = 7.2 * math.e
    assert r.factor(s1, 0.1) < r.factor(s1, 1.0)  # the same S1, a cooled-down run: a narrower band
    assert pooled.factor(s1, 0.1) == pooled.factor(s1, 1.0)  # files from before: the LR does not matter
    assert ScheduleReach.from_json(r.to_json(), "x") == r
    # A law fitted on pilots that anneal (cosine, WSD) and some that do not (constant) measures both.
    law = fit_curves([noisy(f"{k}{i}", make(), np.random.default_rng(i)) for i in range(2)
                      for k, make in SCHEDULES.items()], calibrate=False).law
    assert law.reach.per_ln_s1_annealed is not None
    long_cos, long_const = cosine(36000), np.full(36001, 3e-4)
    p_cos = law.predict(long_cos, steps=[36000])
    p_const = law.predict(long_const, steps=[36000])
    s1_cos, s1_const = float(long_cos.sum()), float(long_const.sum())
    assert (p_cos.high[0] - p_cos.loss[0]) / p_cos.loss[0] == pytest.approx(
        law.band_at(None, 1.0) * law.reach.factor(s1_cos, long_cos[-1] / long_cos.max()), rel=0.02)
    assert (p_const.high[0] - p_const.loss[0]) / p_const.loss[0] == pytest.approx(
        law.band_at(None, 1.0) * law.reach.factor(s1_const, 1.0), rel=0.02)


def test_a_run_off_the_pilots_band_is_forecast_from_its_own_prefix_not_the_prior() -> None:
    """The blend leans on the prior because pilot-like runs end near it. A run that left the law's band (here
    5% worse from 20% of the run on) is not pilot-like: the forecast follows its prefix and its band holds
    where it ends, while a pilot-like run keeps the calibrated blend."""
    from scalewatch.forecast import off_band

    rng = np.random.default_rng(7)
    pilots = [bumped(f"{k}{i}", make(), rng, *MISLEADING) for i in range(2) for k, make in SCHEDULES.items()]
    law = fit_curves(pilots).law
    cal = law.forecast_band
    assert cal.off_by_fraction and all(q >= 1.0 and n > 0 for _, q, n in cal.off_by_fraction)
    sched = cosine(12000)
    run = bumped("worse", sched, rng, 0.0, 0.0)
    run.loss = run.loss * (1 + 0.05 * np.clip((run.steps - 1200) / 1200, 0, 1))
    truth = float(run.loss[-1])
    m = run.steps <= 0.6 * 12000
    assert off_band(law, sched, run.steps[m], run.loss[m]) > 2 * cal.off_at(0.6)
    fc = forecast_final(law, sched, run.steps[m], run.loss[m])
    assert fc.weight == 1.0 and fc.loss == pytest.approx(fc.fit_loss)
    assert fc.low <= truth <= fc.high and abs(fc.prior_loss - truth) > 3 * (fc.high - fc.loss)
    ok = bumped("ok", sched, rng, *MISLEADING)
    m = ok.steps <= 0.2 * 12000
    assert off_band(law, sched, ok.steps[m], ok.loss[m]) < cal.off_at(0.2)
    fc = forecast_final(law, sched, ok.steps[m], ok.loss[m])
    assert fc.weight == pytest.approx(cal.blend_weight(fc.drop, fc.last_fraction, fc.prior_widen))
    assert fc.weight < 1.0
    # and the calibration's distances survive the law file
    assert CurveLaw.from_json(json.loads(json.dumps(law.to_json()))).forecast_band.off_by_fraction == \
        cal.off_by_fraction


def test_a_run_that_parts_from_its_law_near_the_end_is_forecast_where_it_is(calibrated, monkeypatch) -> None:
    """A run that follows the law and then flattens over its last 10% (+1.5% by its end, where the pilots
    still annealed): at its last step the forecast is the loss the run is at, not the law's shape through the
    whole prefix; from 60% of the run the late departure is unknown and the forecast is unchanged."""
    import scalewatch.forecast as fcm

    rng = np.random.default_rng(11)
    run = noisy("late", cosine(12000), rng)
    late = run.steps > 0.9 * 12000
    run.loss = run.loss * (1 + np.where(late, 0.015 * (run.steps - 0.9 * 12000) / 1200, 0.0))
    recent = float(np.mean(run.loss[-3:]))
    end = forecast_final(calibrated, run.schedule, run.steps, run.loss)
    assert abs(end.loss - recent) / recent < 0.005
    assert end.low <= recent <= end.high
    early = run.steps <= 0.6 * 12000
    at60 = forecast_final(calibrated, run.schedule, run.steps[early], run.loss[early]).loss
    monkeypatch.setattr(fcm, "tail_departure", lambda *a: (0.0, 0.0, 0.0))
    without = forecast_final(calibrated, run.schedule, run.steps, run.loss)
    assert abs(without.loss - recent) / recent > 0.008  # the fit through the whole prefix is not where the run is
    assert abs(forecast_final(calibrated, run.schedule, run.steps[early], run.loss[early]).loss - at60) < 1e-3 * at60
