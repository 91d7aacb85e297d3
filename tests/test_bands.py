"""Issue 14: forecast and prediction bands calibrated on the pilots themselves: coverage near nominal on
synthetic held-out runs, bands that shrink with the prefix, old law files, bad blocks, live tags."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_curves import cosine, synthetic, wsd

from scalewatch.bands import ForecastCalibration, ScheduleReach, calibrate_forecast, conformal_quantile
from scalewatch.curves import CurveLaw, fit_curves, forecast_final, load_curve_law, save_curve_law
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
