"""Run health: each detector fires on its fault and stays quiet otherwise, on plain numbers and in real training.

The live scenarios train the example GPT byte-level on the standard library (1 layer, width 32,
context 32, batch 16: ~22k parameters, 512 tokens a step) for 300 steps, logging every 10, with a
fault injected at step 150.
"""

from __future__ import annotations

import json
import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import scalars
from lightning.pytorch.loggers import TensorBoardLogger
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders

from scalewatch import ScaleWatch, ScaleWatchConfigError
from scalewatch.detectors import (
    AllocationDetector,
    BatchSizeDetector,
    DivergenceDetector,
    GradNormSpikeDetector,
    HealthConfig,
    LossSpikeDetector,
    NonFiniteDetector,
    OffCurveDetector,
    SaturationDetector,
)
from scalewatch.laws import ChinchillaLaw
from scalewatch.monitor import Monitor, Observation

FAULT_STEP = 150
LOG_EVERY = 10


def _obs(step: int, loss: float, **kw) -> Observation:
    return Observation(step=step, tokens=512 * step, samples=16 * step, flops=0, loss=loss, **kw)


def _fired(monitor: Monitor, curve, **kw) -> list[tuple[str, str, int]]:
    out = []
    for step, loss in curve:
        out += [(a.kind, a.severity, a.step) for a in monitor.observe(_obs(step, loss, **kw)).alerts
                if a.state == "firing"]
    return out


def _healthy(n: int = 60) -> list[tuple[int, float]]:
    """A warm-up then power-law curve with a little deterministic noise, like a training loss."""
    return [(10 * i, 2.0 + 3.5 * (1 + i) ** -0.5 + 0.01 * math.sin(1.7 * i)) for i in range(1, n + 1)]


# ------------------------------------------------------------------ plain numbers
def test_spike_fires_on_the_max_loss_and_resolves_and_a_healthy_curve_is_quiet() -> None:
    m = Monitor(plugins=[LossSpikeDetector()], resolve_after=1)
    curve = _healthy()
    assert _fired(m, curve[:40]) == []
    step = curve[40][0]
    r = m.observe(_obs(step, curve[40][1], loss_max=curve[40][1] * 1.5))
    assert [(a.kind, a.state, a.step) for a in r.alerts] == [("spike", "firing", step)]
    assert "spike at step" in r.alerts[0].message and r.alerts[0].values["excess"] > 1
    r = m.observe(_obs(curve[41][0], curve[41][1], loss_max=curve[41][1] * 1.05))
    assert [(a.kind, a.state) for a in r.alerts] == [("spike", "resolved")]


def test_divergence_fires_on_a_sustained_rise_not_on_a_recovering_spike() -> None:
    curve = _healthy(40)
    m = Monitor(plugins=[DivergenceDetector()])
    rising = curve + [(410 + 10 * i, curve[-1][1] * (1 + 0.04 * (i + 1))) for i in range(8)]
    fired = _fired(m, rising)
    assert [(k, s) for k, s, _ in fired] == [("divergence", "critical")] and fired[0][2] <= 410 + 10 * 4
    m = Monitor(plugins=[DivergenceDetector()])
    base = curve[-1][1]
    spike_and_recover = curve + [(410, base * 1.4), (420, base * 1.15), (430, base * 1.02), (440, base)]
    assert _fired(m, spike_and_recover) == []


def test_nonfinite_is_critical_at_once_with_the_first_step() -> None:
    m = Monitor(plugins=[NonFiniteDetector()])
    assert _fired(m, _healthy(5)) == []
    r = m.observe(_obs(60, math.nan, all_finite=False, nonfinite=3))
    (a,) = r.alerts
    assert (a.kind, a.severity, a.values["first_step"]) == ("nonfinite", "critical", 60.0)
    assert m.observe(_obs(70, 2.0, grad_nonfinite=1)).alerts == []  # still firing (a gradient this time)


def test_nonfinite_names_the_interval_since_the_previous_log_point() -> None:
    """Logged every 10 steps, a NaN at step 151 is seen at the log point of step 160: the message says where
    it can be (steps 151–160), not only the log step; the structured values keep the log step and add the first."""
    m = Monitor(plugins=[NonFiniteDetector()])
    assert _fired(m, [(s, 3.0) for s in range(10, 160, 10)]) == []
    (a,) = m.observe(_obs(160, math.nan, all_finite=False, nonfinite=1)).alerts
    assert "non-finite loss in steps 151–160 (" in a.message and "first seen at step" not in a.message
    assert (a.values["first_step"], a.values["interval_start"]) == (160.0, 151.0)
    m = Monitor(plugins=[NonFiniteDetector()])  # logged every step: one step, said as one
    assert _fired(m, [(1, 3.0)]) == []
    (a,) = m.observe(_obs(2, math.nan, all_finite=False, nonfinite=1)).alerts
    assert "non-finite loss at step 2 (" in a.message and a.values["interval_start"] == 2.0


def test_batch_size_message_gives_b_crit_its_unit_and_does_not_repeat_the_step() -> None:
    from types import SimpleNamespace

    from scalewatch.detectors import BatchSizeDetector
    from scalewatch.monitor import Report

    det = BatchSizeDetector()
    monitor = SimpleNamespace(report=Report(step=600, tokens=0, scalars={
        "gns/compute_factor": 4.2, "gns/steps_factor": 1.1, "gns/b_crit": 73.5}))
    (f,) = det.on_observation(_obs(600, 3.0, batch_tokens=4096.0), monitor).findings
    assert "the critical batch (73.5 tokens)" in f.message and "(step" not in f.message, f.message


def test_grad_norm_spike() -> None:
    m = Monitor(plugins=[GradNormSpikeDetector()])
    fired = [a.kind for i in range(20) for a in m.observe(_obs(10 * i, 3.0, grad_norm_max=1.0 + 0.05 * (i % 3))).alerts]
    assert fired == []
    assert [a.kind for a in m.observe(_obs(200, 3.0, grad_norm_max=8.0)).alerts] == ["grad_spike"]


def test_saturation_is_schedule_aware() -> None:
    cfg = HealthConfig(saturation_window=8)
    flat = [(10 * i, 3.0) for i in range(1, 13)]
    # a plateau under a constant LR is not saturation
    assert _fired(Monitor(plugins=[SaturationDetector(cfg)]), flat, lr=1e-3) == []
    # a plateau while the LR decays is
    m = Monitor(plugins=[SaturationDetector(cfg)])
    fired = []
    for step, loss in flat:
        fired += [a.kind for a in m.observe(_obs(step, loss, lr=1e-3 * 0.9 ** (step / 10))).alerts]
    assert fired == ["saturation"]
    # a loss that climbs back up under a constant LR is
    rising = [(10 * i, 3.0 * (1 + 0.004 * i)) for i in range(1, 13)]
    assert [k for k, _, _ in _fired(Monitor(plugins=[SaturationDetector(cfg)]), rising, lr=1e-3)] == ["saturation"]


def test_off_curve_reads_the_forecasters_band() -> None:
    class Band:
        name, kind = "band", "forecaster"

        def __init__(self, calibrated_from: int = 0) -> None:
            self.calibrated_from = calibrated_from

        def on_observation(self, obs, monitor):
            out = {"loss_pred": 3.0, "loss_pred_low": 2.9, "loss_pred_high": 3.1}
            if obs.step >= self.calibrated_from:  # as CurvePlugin: a residual only where the band is calibrated
                out["loss_residual"] = (obs.loss - 3.0) / 0.1
            return out

    m = Monitor(plugins=[OffCurveDetector(), Band()])
    fired = _fired(m, [(10 * i, 3.3) for i in range(1, 6)])
    assert [(k, s) for k, s, _ in fired] == [("off_curve", "warning")] and fired[0][2] == 40  # 4 points outside
    m = Monitor(plugins=[OffCurveDetector(), Band()])
    assert [(k, s) for k, s, _ in _fired(m, [(10 * i, 2.7) for i in range(1, 6)])] == [("off_curve", "info")]
    # Before the stretch of the run where the law's band was calibrated (the fast early drop): not judged.
    m = Monitor(plugins=[OffCurveDetector(), Band(calibrated_from=30)])
    fired = _fired(m, [(10 * i, 3.3) for i in range(1, 8)])
    assert [(k, s, st) for k, s, st in fired] == [("off_curve", "warning", 60)]  # points 30, 40, 50, 60


def test_saturation_with_a_curve_law_when_the_forecast_drifts_above_the_prediction() -> None:
    class Forecast:
        """A curve law predicting 3.0 at the end; the forecast (made at every log point) says ``end``."""
        name, kind = "curve", "forecaster"

        def __init__(self, end, low_by=0.02) -> None:
            self.end, self.low_by = end, low_by

        def on_observation(self, obs, monitor):
            end = self.end(obs.step)
            return {"loss_pred_final": 3.0, "loss_forecast_final": end, "loss_forecast_final_low": end - self.low_by,
                    "loss_forecast_at_step": float(obs.step)}

    points = [(10 * i, 4.0 - 0.01 * i) for i in range(1, 9)]  # improving: the trend rule has nothing to say
    drifting = Forecast(lambda step: 3.0 + (0.1 if step >= 40 else 0.0))
    fired = _fired(Monitor(plugins=[SaturationDetector(), drifting]), points, lr=1e-3)
    assert [(k, s, st) for k, s, st in fired] == [("saturation", "warning", 70)]  # 4 forecasts in a row: 40..70
    m = Monitor(plugins=[SaturationDetector(), Forecast(lambda step: 3.0 + (0.1 if step >= 40 else 0.0))])
    (alert,) = [a for step, loss in points for a in m.observe(_obs(step, loss, lr=1e-3)).alerts]
    # the loss is still falling: the message says it improves too slowly, not that it stopped
    assert "improving more slowly than its law" in alert.message and "stopped improving" not in alert.message
    # The loss rising while the forecast drifts: it did stop improving, and the drift is said too.
    from types import SimpleNamespace

    det = SaturationDetector()
    findings = []
    for i in range(1, 31):  # up 5% over 30 log points, a little noise; forecasts above the law from step 40
        step, end = 10 * i, 3.0 + (0.1 if i >= 4 else 0.0)
        monitor = SimpleNamespace(report=SimpleNamespace(scalars={
            "loss_pred_final": 3.0, "loss_forecast_final": end, "loss_forecast_final_low": end - 0.02,
            "loss_forecast_at_step": float(step)}))
        findings += det.on_observation(_obs(step, 3.0 + 0.005 * i + 0.0005 * (i % 2), lr=1e-3), monitor).findings
    last = findings[-1]
    assert last.active and "stopped improving" in last.message and "law's prediction" in last.message
    assert "improving more slowly" not in last.message
    inside = Forecast(lambda step: 3.01)  # the band holds the prediction: no drift
    assert _fired(Monitor(plugins=[SaturationDetector(), inside]), points, lr=1e-3) == []


def test_allocation_with_and_without_a_law_and_repetition() -> None:
    m = Monitor(n_params=1_000_000, plugins=[AllocationDetector(total_steps=1000, unique_tokens=50_000)])
    r = m.observe(_obs(10, 3.0))  # 512 tokens a step: 512,000 tokens at the end, 0.5 tokens per parameter
    kinds = {a.kind: a for a in r.alerts}
    assert set(kinds) == {"undertrained", "repeated_data"}
    assert kinds["undertrained"].values["tokens_per_param_end"] == pytest.approx(0.512)
    assert kinds["repeated_data"].values["epochs"] == pytest.approx(10.24)
    law = ChinchillaLaw.epoch_refit()
    m = Monitor(n_params=1000, plugins=[AllocationDetector(total_steps=1000, law=law)])
    (a,) = m.observe(_obs(10, 3.0)).alerts  # 512 tokens per parameter: far past optimal
    assert (a.kind, a.severity) == ("overtrained", "info") and "the law predicts L=" in a.message
    assert a.values["optimal_tokens_per_param"] == pytest.approx(a.values["d_opt"] / a.values["n_opt"])
    quiet = Monitor(n_params=25_000, plugins=[AllocationDetector(total_steps=1000)])
    assert quiet.observe(_obs(10, 3.0)).alerts == []  # 20.5 tokens per parameter: compute-optimal


def test_batch_size_needs_a_sustained_measurement() -> None:
    class GNS:
        name, kind = "gns", "forecaster"

        def on_observation(self, obs, monitor):
            return {"gns/b_crit": 1000.0, "gns/compute_factor": 1 + obs.batch_tokens / 1000, "gns/steps_factor": 1.2}

    m = Monitor(plugins=[BatchSizeDetector(), GNS()])
    fired = _fired(m, [(10 * i, 3.0) for i in range(1, 8)], batch_tokens=8192.0)
    assert [(k, s, st) for k, s, st in fired] == [("batch_size", "info", 20)]  # the 2nd point that sees it
    m = Monitor(plugins=[BatchSizeDetector(HealthConfig(batch_points=5)), GNS()])
    fired = _fired(m, [(10 * i, 3.0) for i in range(1, 8)], batch_tokens=8192.0)
    assert [(k, s, st) for k, s, st in fired] == [("batch_size", "info", 50)]
    m = Monitor(plugins=[BatchSizeDetector(), GNS()])
    assert _fired(m, [(10 * i, 3.0) for i in range(1, 8)], batch_tokens=2000.0) == []  # 2x: within the factor 3


@pytest.mark.parametrize("kwargs", [dict(spike_sigma=-1), dict(window=0), dict(divergence_rel=float("inf"))])
def test_bad_thresholds_fail_at_construction(kwargs) -> None:
    with pytest.raises(ScaleWatchConfigError, match="threshold"):
        HealthConfig(**kwargs)
    with pytest.raises(ScaleWatchConfigError, match="threshold"):
        ScaleWatch(health=kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(stop_on="fatal"), "stop_on"), (dict(unique_tokens=-5), "unique"),
                                           (dict(webhook_url="ftp://example.invalid/x"), "http")])
def test_bad_alert_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ScaleWatchConfigError, match=match):
        ScaleWatch(**kwargs)


def test_detectors_cost_well_under_a_millisecond_per_observation() -> None:
    import time

    from scalewatch.detectors import default_detectors

    m = Monitor(n_params=20_000, plugins=default_detectors(total_steps=10_000))
    t = time.perf_counter()
    for step, loss in _healthy(500):
        m.observe(_obs(step, loss, loss_max=loss * 1.1, grad_norm_max=1.0, lr=1e-3))
    assert (time.perf_counter() - t) / 500 < 5e-3  # a loose bound for a shared CI machine; see the benchmark


# ------------------------------------------------------------------ real training with injected faults
class LRFault(pl.Callback):
    """Multiply the learning rate by ``factor`` for the steps in [start, stop)."""

    def __init__(self, start: int, stop: int, factor: float) -> None:
        self.start, self.stop, self.factor = start, stop, factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start <= trainer.global_step < self.stop:
            for g in trainer.optimizers[0].param_groups:
                g["lr"] = g["initial_lr"] * self.factor  # the scheduler resets it after every step


class NaNAt(TinyGPTModule):
    nan_step: int | None = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + float("nan") if self.trainer.global_step == self.nan_step else loss


def _train(tmp_path, fault=None, nan_step=None, n_layer=1, n_embd=32, batch=16, steps=300, lr=3e-3, accumulate=1,
           enable_checkpointing=False, **watch_kw) -> tuple[ScaleWatch, pl.Trainer]:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=n_layer, n_embd=n_embd, n_head=2)
    train, _ = make_loaders(cfg, batch, num_train=steps * batch * accumulate, max_bytes=600_000)
    model = NaNAt(cfg, lr=lr, warmup_steps=20, max_steps=steps)
    model.nan_step = nan_step
    watch = ScaleWatch(log_every_n_steps=LOG_EVERY, **watch_kw)
    extra = fault if isinstance(fault, list) else [fault] if fault else []
    t = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[watch, *extra],
                   logger=TensorBoardLogger(str(tmp_path), name="tb", version=0),
                   enable_checkpointing=enable_checkpointing,
                   enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate)
    t.fit(model, train)
    return watch, t


def _firing(watch: ScaleWatch) -> list[tuple[str, str, int]]:
    return [(a.kind, a.severity, a.step) for a in watch.monitor.alerts.recent if a.state == "firing"]


@pytest.mark.slow
def test_healthy_run_raises_nothing_and_writes_health_series_jsonl_and_table(tmp_path) -> None:
    watch, t = _train(tmp_path, alerts_jsonl=tmp_path / "alerts.jsonl")
    assert _firing(watch) == []
    s = scalars(tmp_path / "tb" / "version_0")
    for kind in ("nonfinite", "spike", "grad_spike", "divergence", "saturation", "undertrained", "batch_size"):
        series = s[f"scalewatch/health/{kind}"]
        assert len(series) == 30 and {v for _, v in series} == {0.0}  # every log point, all ok
    assert len(s["scalewatch/grad_norm"]) == 30 and all(v > 0 for _, v in s["scalewatch/grad_norm"])
    assert all(hi >= lo for (_, hi), (_, lo) in zip(s["scalewatch/loss_max"], s["scalewatch/loss"], strict=True))
    assert not (tmp_path / "alerts.jsonl").exists() or (tmp_path / "alerts.jsonl").read_text() == ""
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb" / "version_0").glob("events.*"))
    assert b"No alerts." in events and b"alerts by kind" in events  # the alert table and the Health layout


def test_nan_loss_is_critical_within_one_interval_and_stop_on_stops_the_run(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        watch, t = _train(tmp_path, nan_step=FAULT_STEP, stop_on="critical", alerts_jsonl=tmp_path / "a.jsonl")
    assert _firing(watch)[0] == ("nonfinite", "critical", FAULT_STEP + LOG_EVERY)
    assert t.global_step == FAULT_STEP + LOG_EVERY  # stopped cleanly at that log point
    (line,) = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (line["kind"], line["state"], line["step"], line["tokens"]) == ("nonfinite", "firing", 160, 160 * 512)
    assert "stopping training at step 160" in caplog.text and "CRITICAL nonfinite" in caplog.text


def test_lr_spike_is_a_spike_within_one_interval(tmp_path) -> None:
    watch, _ = _train(tmp_path, fault=LRFault(FAULT_STEP, FAULT_STEP + 3, 30.0))
    first = {k: st for k, _, st in reversed(_firing(watch))}
    assert first["spike"] == FAULT_STEP + LOG_EVERY and first["grad_spike"] == FAULT_STEP + LOG_EVERY
    assert all(st > FAULT_STEP for st in first.values())  # nothing before the fault


@pytest.mark.slow
def test_lr_raised_tenfold_is_a_divergence_naming_the_last_healthy_checkpoint(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=50, save_top_k=-1)
    watch, _ = _train(tmp_path, fault=[LRFault(FAULT_STEP, 10**9, 10.0), ckpt], lr=1e-2, enable_checkpointing=True)
    divergence = [(s, st) for k, s, st in _firing(watch) if k == "divergence"]
    assert divergence and divergence[0] == ("critical", FAULT_STEP + 2 * LOG_EVERY)  # within 2 log intervals
    (alert,) = [a for a in watch.monitor.alerts.recent if a.kind == "divergence" and a.state == "firing"][:1]
    assert f"last healthy checkpoint: {tmp_path / 'ckpt'}" in alert.message and "step=150.ckpt" in alert.message
    assert all(st > FAULT_STEP for _, _, st in _firing(watch))
    control, _ = _train(tmp_path / "control", lr=1e-2)  # the same run without the fault is quiet
    assert _firing(control) == []


def test_model_far_too_big_for_its_tokens_is_undertrained_at_the_first_log_point(tmp_path) -> None:
    watch, _ = _train(tmp_path, n_layer=4, n_embd=128, steps=40)
    (alert,) = [a for a in watch.monitor.alerts.recent if a.kind == "undertrained"]
    assert alert.step == LOG_EVERY and alert.severity == "warning"
    assert alert.values["tokens_per_param_end"] == pytest.approx(40 * 512 / watch.n_params)
    assert "compute-optimal 20" in alert.message


@pytest.mark.slow
def test_tiny_model_trained_far_past_optimal_is_an_info_not_a_warning(tmp_path) -> None:
    watch, _ = _train(tmp_path, n_embd=8, batch=32, steps=400)
    assert [(k, s) for k, s, _ in _firing(watch)] == [("overtrained", "info")]


@pytest.mark.slow
def test_batch_far_above_the_critical_batch_is_an_info(tmp_path) -> None:
    watch, _ = _train(tmp_path, batch=64, accumulate=2)
    fired = _firing(watch)
    # The noise scale is first measured at the first log point: raised at the second (2 intervals).
    assert [(k, s, st) for k, s, st in fired if k == "batch_size"] == [("batch_size", "info", 2 * LOG_EVERY)]
    assert not [f for f in fired if f[1] != "info" and f[0] not in ("overtrained",)]


@pytest.mark.slow
def test_an_alert_firing_at_a_checkpoint_survives_the_resume_without_firing_again(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    jsonl = tmp_path / "alerts.jsonl"
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=4, n_embd=128, n_head=2)  # far too big: undertrained at once
    train, _ = make_loaders(cfg, 16, num_train=40 * 16, max_bytes=600_000)

    def fit(max_steps, ckpt_path=None):
        watch = ScaleWatch(log_every_n_steps=LOG_EVERY, alerts_jsonl=jsonl)
        pl.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[watch, ckpt], logger=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(
            TinyGPTModule(cfg, max_steps=40), train, ckpt_path=ckpt_path)
        return watch

    first = fit(20)
    assert [k for (k, _) in first.monitor.alerts.firing()] == ["undertrained"]
    resumed = fit(40, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=20.ckpt"))
    assert [k for (k, _) in resumed.monitor.alerts.firing()] == ["undertrained"]  # not forgotten
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [(d["kind"], d["state"]) for d in lines] == [("undertrained", "firing")]  # and not said twice


@pytest.mark.slow  # the end-of-training flush waits for the retries (bounded)
def test_a_webhook_that_is_down_costs_nothing_and_loses_nothing(tmp_path) -> None:
    import socket
    import time

    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    watch, trainer = _train(tmp_path, nan_step=FAULT_STEP, webhook_url=f"http://127.0.0.1:{port}/hook",
                            alerts_jsonl=tmp_path / "a.jsonl")
    assert trainer.global_step == 300 and time.perf_counter() - t < 60
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(d["kind"], d["state"]) for d in lines] == [("nonfinite", "firing"), ("nonfinite", "resolved")]
    (sink,) = [s for s in watch.monitor.sinks if s.name == "webhook"]
    assert sink.undelivered == 2 and sink.delivered == 0  # both in the JSONL, neither delivered


@pytest.mark.parametrize("sd", [0.01, 0.03])
def test_a_noisy_but_healthy_training_loss_raises_nothing(sd) -> None:
    import random

    from scalewatch.detectors import default_detectors

    rng = random.Random(1)
    m = Monitor(plugins=default_detectors())
    for step in range(1, 1501):
        loss = (2.0 + 5.0 * (step + 10) ** -0.3) * (1 + sd * rng.gauss(0, 1))
        r = m.observe(_obs(step, loss, loss_max=loss, lr=1e-3 * (0.55 + 0.45 * math.cos(math.pi * step / 1500))))
        assert not [a for a in r.alerts if a.state == "firing"], (step, r.alerts)


def test_spike_baseline_restarts_when_the_prediction_stops() -> None:
    class Pred:
        name, kind = "pred", "forecaster"

        def on_observation(self, obs, monitor):
            return {"loss_pred": 3.0} if obs.step <= 200 else {}  # the schedule ends at step 200

    m = Monitor(plugins=[LossSpikeDetector(), Pred()], resolve_after=1)
    fired = _fired(m, [(10 * i, 3.0 + 0.01 * math.sin(i)) for i in range(1, 41)])
    assert fired == []  # ratios ~1 before, raw losses ~3 after: two baselines, no "spike"


@pytest.mark.parametrize("kwargs, match", [(dict(window=4), "warmup_points"), (dict(window=40.5), "whole number"),
                                           (dict(saturation_lr_drop=1.5), "below 1")])
def test_inconsistent_thresholds_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ScaleWatchConfigError, match=match):
        HealthConfig(**kwargs)


@pytest.mark.slow
def test_stop_on_warning_ignores_planning_findings_and_refits_do_not_pile_up_sinks(tmp_path, caplog) -> None:
    # far too big for its tokens: `undertrained` (a warning) fires at once, but it is a plan, not a fault
    watch, t = _train(tmp_path, n_layer=4, n_embd=128, steps=40, stop_on="warning")
    assert [k for k, _, _ in _firing(watch)] == ["undertrained"] and t.global_step == 40
    names = [s.name for s in watch.monitor.sinks]
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=1, n_embd=32, n_head=2)
    train, _ = make_loaders(cfg, 16, num_train=20 * 16, max_bytes=600_000)
    pl.Trainer(max_steps=20, accelerator="cpu", callbacks=[watch], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(TinyGPTModule(cfg, max_steps=20), train)
    assert [s.name for s in watch.monitor.sinks] == names  # the same sinks, not a second set


def test_gradient_norm_is_float32_and_survives_fp16_overflow() -> None:
    from scalewatch.gns_capture import grad_norm

    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), 40000.0, dtype=torch.float16)  # the norm, 80000, overflows float16
    norm = grad_norm([p])
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(80000.0)


def test_a_stage_with_a_bad_finding_becomes_an_internal_error() -> None:
    from scalewatch.alerts import Finding
    from scalewatch.monitor import StageOutput

    class Bad:
        name, kind = "bad", "detector"

        def on_observation(self, obs, monitor):
            return StageOutput(scalars={"bad/x": 1.0}, findings=[Finding("x", True, "fatal")])

    r = Monitor(plugins=[Bad()]).observe(_obs(10, 3.0))
    assert [(a.kind, a.key) for a in r.alerts] == [("internal_error", "bad")] and "bad/x" not in r.scalars
    assert "severity 'fatal'" in r.alerts[0].message


def test_a_spike_judged_against_the_predicted_curve_is_said_as_a_ratio_to_it() -> None:
    class Pred:  # the prediction falls 5x at step 300 (the schedule's LR jumps): ratios, not levels, are judged
        name, kind = "pred", "forecaster"

        def on_observation(self, obs, monitor):
            return {"loss_pred": 3.0 if obs.step < 300 else 0.6}

    m = Monitor(plugins=[LossSpikeDetector(), Pred()], resolve_after=1)
    fired = _fired(m, [(10 * i, 3.0 + 0.01 * math.sin(i)) for i in range(1, 30)])
    assert fired == []
    r = m.observe(_obs(300, 3.0, loss_max=3.0))
    msg = [a.message for a in r.alerts if a.state == "firing"][0]
    # the loss against its prediction now (5x) and the recent ratio (1x): not "a recent level of 0.6", a loss
    # this run never showed
    assert "5x the predicted 0.6, against a recent 1x" in msg and "recent level" not in msg


def test_a_loss_that_rose_after_the_lr_was_raised_is_not_saturation() -> None:
    m = Monitor(plugins=[SaturationDetector()], resolve_after=1)
    curve = _healthy(40)
    for i, (step, loss) in enumerate(curve):  # a healthy start, then the LR x1000 for one log point and a rise
        lr = 1e-3 * (1000 if i == 30 else 1)
        m.observe(_obs(step, loss * (1 + 0.5 * (i >= 30)), lr=lr))
    assert not [a for a in m.alerts.recent if a.kind == "saturation"]
    m2 = Monitor(plugins=[SaturationDetector()], resolve_after=1)  # the same rise at a steady LR: saturation
    for i, (step, loss) in enumerate(curve):
        m2.observe(_obs(step, loss * (1 + 0.5 * (i >= 30)), lr=1e-3))
    assert [a.kind for a in m2.alerts.recent if a.state == "firing"] == ["saturation"]
