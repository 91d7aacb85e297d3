"""The predicted curve inside real Lightning training: series, look-ahead schedule, layout, bad input."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from helpers import TinyLM, VarLenDataset, scalars, trainer

from scalewatch import ScaleWatch, ScaleWatchConfigError
from scalewatch.curves import CurveLaw, read_curve_tensorboard, schedule_features
from scalewatch.laws import ChinchillaLaw, LawRecord, save_law

STEPS = 24


def _lambda(step: int) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / STEPS, 1.0)))


class Scheduled(TinyLM):
    def configure_optimizers(self):  # type: ignore[override]
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


LAW = CurveLaw({"L0": (3.0, 0.0), "lnA": (math.log(0.05), 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(2.0), 0.0)},
               n_ref=1e3, band_rel=0.02)


def _fit(tmp_path, watch, seed=0):
    torch.manual_seed(seed)
    model = Scheduled()
    trainer(tmp_path, [watch], max_steps=STEPS, log_every_n_steps=4).fit(
        model, torch.utils.data.DataLoader(VarLenDataset(n=200), batch_size=4))
    return model


def test_predicted_series_follow_the_runs_own_schedule_without_touching_training(tmp_path) -> None:
    watch = ScaleWatch(curve_law=LAW, forecast_in_background=False)
    model = _fit(tmp_path / "with", watch)
    expected = np.array([0.05 * _lambda(s) for s in range(STEPS + 1)])
    assert watch.curve_plugin.schedule == pytest.approx(expected)  # read ahead from a copy of the scheduler
    plain = _fit(tmp_path / "without", ScaleWatch(gns="off"))
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # the look-ahead changed nothing in the run

    s = scalars(tmp_path / "with" / "tb" / "version_0")
    pred = LAW.predict(expected, steps=[4, 8, 12, 16, 20, 24])
    assert [v for _, v in s["scalewatch/loss_pred"]] == pytest.approx(pred.loss.tolist(), rel=1e-5)
    assert [v for _, v in s["scalewatch/loss_pred_high"]] == pytest.approx(pred.high.tolist(), rel=1e-5)
    losses = dict(s["scalewatch/loss"])
    for step, r in s["scalewatch/loss_residual"]:
        p = LAW.predict(expected, steps=[step])
        assert r == pytest.approx((losses[step] - p.loss[0]) / (p.high[0] - p.loss[0]), rel=1e-4)
    for tag in ("loss_forecast_final", "loss_forecast_final_low", "loss_forecast_final_high", "loss_pred_final"):
        assert len(s[f"scalewatch/{tag}"]) == 6
    low, fc, high = (s[f"scalewatch/loss_forecast_final{t}"][-1][1] for t in ("_low", "", "_high"))
    assert low < fc < high
    events = b"".join(p.read_bytes() for p in (tmp_path / "with" / "tb" / "version_0").glob("events.*"))
    assert b"custom_scalars" in events and b"loss vs predicted curve" in events
    # the run's own TensorBoard directory is a curve `scalewatch fit --curves` can read
    curve = read_curve_tensorboard(tmp_path / "with" / "tb" / "version_0")
    assert curve.steps.tolist() == [4, 8, 12, 16, 20, 24] and curve.n_params == watch.n_params
    assert curve.loss.tolist() == pytest.approx([losses[s] for s in curve.steps.tolist()])


def test_a_schedule_that_cannot_be_used_is_reported_and_training_goes_on(tmp_path, caplog) -> None:
    watch = ScaleWatch(curve_law=LAW, schedule=[0.0] * (STEPS + 1))
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        _fit(tmp_path, watch)
    assert any("zero or negative" in r.getMessage() for r in caplog.records)
    s = scalars(tmp_path / "tb" / "version_0")
    assert "scalewatch/loss_pred" not in s and len(s["scalewatch/loss"]) == 6


def test_short_schedule_warns_and_predicts_what_it_covers(tmp_path, caplog) -> None:
    watch = ScaleWatch(curve_law=LAW, schedule=lambda step: 0.05)
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        _fit(tmp_path, watch)
    assert len(watch.curve_plugin.schedule) == STEPS + 1
    watch2 = ScaleWatch(curve_law=LAW, schedule=[0.05] * 13)
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        _fit(tmp_path / "short", watch2)
    assert any("covers steps 0..12" in r.getMessage() for r in caplog.records)
    steps = [st for st, _ in scalars(tmp_path / "short" / "tb" / "version_0")["scalewatch/loss_pred"]]
    assert steps == [4, 8, 12]


def test_a_law_file_of_the_wrong_kind_fails_at_construction(tmp_path) -> None:
    save_law(LawRecord(ChinchillaLaw.epoch_refit()), tmp_path / "chinchilla.json")
    with pytest.raises(ScaleWatchConfigError, match="curve law is needed"):
        ScaleWatch(curve_law=tmp_path / "chinchilla.json")


def test_law_fitted_on_another_n_convention_or_loss_is_flagged(tmp_path, caplog) -> None:
    law = CurveLaw(dict(LAW.coef), n_ref=LAW.n_ref, band_rel=LAW.band_rel,
                   conventions={"n_params": "non_embedding", "loss": "eval/c4_en-validation/CrossEntropyLoss"})
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        _fit(tmp_path, ScaleWatch(curve_law=law))
    messages = [r.getMessage() for r in caplog.records]
    assert any("param_convention='non_embedding'" in m for m in messages)
    assert any("a held-out loss" in m and "c4_en-validation" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        _fit(tmp_path / "same", ScaleWatch(curve_law=LAW))  # a law without such conventions: silent on them
    said = [r.getMessage() for r in caplog.records if "curve law" in r.getMessage()]
    # (LAW is a one-size law with no recorded size: that, and only that, is said)
    assert len(said) == 1 and "fitted on curves of one model size, not recorded" in said[0]


def test_resumed_run_keeps_the_schedule_it_started_with(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = VarLenDataset(n=48)  # 12 steps per epoch: the checkpoint falls at step 12 of 24

    def run(logdir, watch, ckpt_path=None, **kw):
        torch.manual_seed(0)
        t = trainer(logdir, [watch, *kw.pop("extra", [])], max_steps=STEPS, log_every_n_steps=4, **kw)
        t.fit(Scheduled(), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)

    whole = ScaleWatch(curve_law=LAW)
    run(tmp_path / "whole", whole)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    run(tmp_path / "a", ScaleWatch(curve_law=LAW), max_epochs=1, enable_checkpointing=True, extra=[ckpt])
    resumed = ScaleWatch(curve_law=LAW)
    run(tmp_path / "b", resumed, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert resumed.curve_plugin.schedule == pytest.approx(whole.curve_plugin.schedule)  # not the LR at the resume step held backwards
    pred_whole = dict(scalars(tmp_path / "whole" / "tb" / "version_0")["scalewatch/loss_pred"])
    pred_resumed = dict(scalars(tmp_path / "b" / "tb" / "version_0")["scalewatch/loss_pred"])
    assert sorted(pred_resumed) == [16, 20, 24]
    assert [pred_resumed[s] for s in (16, 20, 24)] == pytest.approx([pred_whole[s] for s in (16, 20, 24)])


def test_background_forecast_reports_the_latest_finished_one_and_the_step_it_saw(tmp_path) -> None:
    from scalewatch.forecast import forecast_final

    watch = ScaleWatch(curve_law=LAW)  # forecast_in_background=True is the default
    _fit(tmp_path, watch)
    s = scalars(tmp_path / "tb" / "version_0")
    losses = dict(s["scalewatch/loss"])
    at_steps = dict(s["scalewatch/loss_forecast_at_step"])
    finals = dict(s["scalewatch/loss_forecast_final"])
    assert at_steps and max(at_steps.values()) == STEPS  # the last forecast saw the whole run
    for logged_at, based_on in at_steps.items():
        assert based_on <= logged_at
        steps = [st for st in sorted(losses) if st <= based_on]
        expected = forecast_final(LAW, watch.curve_plugin.schedule, steps, [losses[st] for st in steps], n_params=watch.n_params)
        assert finals[logged_at] == pytest.approx(expected.loss, rel=1e-4)
    assert watch.curve_plugin._executor is None  # the worker is gone after the fit


def test_last_forecast_sees_the_last_step_even_when_the_worker_lags(tmp_path, monkeypatch) -> None:
    import time

    import scalewatch.forecast as forecast

    fast = forecast.forecast_final

    def slow(*a, **k):
        time.sleep(0.3)  # longer than the training between two log points here
        return fast(*a, **k)

    monkeypatch.setattr(forecast, "forecast_final", slow)
    watch = ScaleWatch(curve_law=LAW)
    _fit(tmp_path, watch)
    assert watch.latest["loss_forecast_at_step"] == STEPS
    at_steps = [v for _, v in scalars(tmp_path / "tb" / "version_0")["scalewatch/loss_forecast_at_step"]]
    assert len(at_steps) < 6 and at_steps[-1] == STEPS  # the worker skipped log points, the end caught up


def test_a_schedule_described_in_words_is_the_one_the_callback_predicts_with(tmp_path) -> None:
    from scalewatch.curves import schedule_from_spec

    # The run's own cosine to 10% in words: the plugin's schedule is the same LR at every step as the scheduler's.
    watch = ScaleWatch(curve_law=LAW, schedule="cosine:peak=0.05,final=0.1", forecast_in_background=False)
    _fit(tmp_path, watch)
    expected = np.array([0.05 * _lambda(s) for s in range(STEPS + 1)])
    assert watch.curve_plugin.schedule == pytest.approx(expected)
    assert watch.curve_plugin.schedule == pytest.approx(schedule_from_spec("cosine:peak=0.05,final=0.1", STEPS))
    assert len(scalars(tmp_path / "tb" / "version_0")["scalewatch/loss_pred"]) == 6
    with pytest.raises(ScaleWatchConfigError, match="'warm=3' is not one of"):
        ScaleWatch(curve_law=LAW, schedule="cosine:warm=3")


@pytest.mark.parametrize("given", ["list", "spec"])
def test_summary_says_the_predicted_curve_stopped_where_a_short_schedule_ends(tmp_path, given) -> None:
    """A schedule ending before the run (a 13-entry LR list, or a description with total=12, in a 24-step run):
    the summary says the predicted curve stopped at step 12 because the schedule ended there, compares the loss
    with the prediction at that step, and says the forecast is for step 12, not the run's end."""
    schedule = [0.05] * 13 if given == "list" else "cosine:peak=0.05,warmup=0,final=0.1,total=12"
    watch = ScaleWatch(curve_law=LAW, schedule=schedule, forecast_in_background=given == "spec")
    _fit(tmp_path, watch)
    text = watch.summary()
    assert "no curve law" not in text
    (loss_line,) = [line for line in text.splitlines() if line.strip().startswith("loss:")]
    assert "stopped at step 12" in loss_line and "schedule ends" in loss_line and "step 24" in loss_line
    assert "the curve law predicted" in loss_line and "the band" in loss_line  # the comparison at step 12
    (forecast,) = [line for line in text.splitlines() if line.strip().startswith("forecast:")]
    assert "loss at step 12" in forecast and "not at the run's end, step 24" in forecast
    full = ScaleWatch(curve_law=LAW, forecast_in_background=False)  # the schedule covers the run: as before
    _fit(tmp_path / "full", full)
    text = full.summary()
    assert "stopped" not in text and "final loss" in text and "the curve law predicted" in text


def test_summary_with_a_curve_law_but_no_usable_schedule_says_so(tmp_path) -> None:
    watch = ScaleWatch(curve_law=LAW, schedule=[0.0] * (STEPS + 1))
    _fit(tmp_path, watch)
    text = watch.summary()
    assert "no curve law" not in text and "no usable LR schedule" in text


def test_a_law_predicting_a_loss_below_zero_predicts_nothing_there_and_bands_stop_at_zero() -> None:
    from scalewatch.forecast import CurvePlugin
    from scalewatch.monitor import Monitor, Observation

    # a law whose annealing term outgrows its level when the LR falls 1000-fold (far past any pilot)
    law = CurveLaw({"L0": (1.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(3000.0), 0.0)},
                   n_ref=1e3, band_rel=0.8)
    sched = np.r_[np.full(500, 1.0), np.full(501, 1e-3)]
    m = Monitor(plugins=[CurvePlugin(law, sched)])
    seen = {}
    for step in range(100, 1001, 100):
        r = m.observe(Observation(step=step, tokens=0, samples=0, flops=0, loss=1.2))
        seen[step] = r.scalars
    assert "loss_pred" in seen[400] and seen[400]["loss_pred_low"] >= 0.0  # a wide band stops at 0
    assert law.at().loss(*[f[600:601] for f in schedule_features(sched)])[0] < 0  # the law gives a loss < 0 here
    assert "loss_pred" not in seen[600] and "loss_residual" not in seen[600]  # nothing predicted, nothing judged
    assert all(v > 0 for s in seen.values() for k, v in s.items() if k.startswith("loss_forecast_final"))


def test_after_a_non_finite_loss_the_forecast_is_withdrawn_and_comes_back_with_finite_losses() -> None:
    from scalewatch.forecast import CurvePlugin
    from scalewatch.monitor import Monitor, Observation

    sched = np.full(1001, 1e-3)
    plugin = CurvePlugin(LAW, sched)
    m = Monitor(plugins=[plugin])
    truth = LAW.predict(sched, steps=range(100, 1001, 100)).loss
    for step, y in zip(range(100, 600, 100), truth, strict=False):
        r = m.observe(Observation(step=step, tokens=0, samples=0, flops=0, loss=float(y)))
    assert "loss_forecast_final" in r.scalars
    r = m.observe(Observation(step=600, tokens=0, samples=0, flops=0, loss=math.nan))
    assert "loss_forecast_final" not in r.scalars and plugin.nonfinite_since == 600
    assert plugin.finish().scalars == {}  # not forecast again at the end from the run before the NaN
    r = m.observe(Observation(step=700, tokens=0, samples=0, flops=0, loss=float(truth[6])))
    assert "loss_forecast_final" in r.scalars and plugin.nonfinite_since is None


def test_resumed_with_a_larger_max_steps_the_schedule_is_read_ahead_again(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = VarLenDataset(n=48)  # 12 steps per epoch

    def run(logdir, watch, max_steps, ckpt_path=None, extra=()):
        torch.manual_seed(0)
        t = trainer(logdir, [watch, *extra], max_steps=max_steps, log_every_n_steps=4, enable_checkpointing=bool(extra))
        t.fit(Scheduled(), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)

    whole = ScaleWatch(curve_law=LAW)
    run(tmp_path / "whole", whole, STEPS)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    run(tmp_path / "a", ScaleWatch(curve_law=LAW), 12, extra=[ckpt])  # planned 12 steps, then extended to 24
    resumed = ScaleWatch(curve_law=LAW)
    run(tmp_path / "b", resumed, STEPS, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert len(resumed.curve_plugin.schedule) == STEPS + 1
    assert resumed.curve_plugin.schedule == pytest.approx(whole.curve_plugin.schedule)
    assert sorted(dict(scalars(tmp_path / "b" / "tb" / "version_0")["scalewatch/loss_pred"])) == [16, 20, 24]
