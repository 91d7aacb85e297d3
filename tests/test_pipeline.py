"""The Monitor as a pipeline, fed plain numbers (no Trainer): stage order, isolation, alerts, sinks, files."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest

from scalewatch.alerts import AlertBook, Finding
from scalewatch.config import ScaleWatchConfig, ScaleWatchConfigError, build_monitor
from scalewatch.monitor import ForecastBand, Monitor, Observation, StageOutput
from scalewatch.summary import run_summary


def _obs(step: int, loss: float = 3.0, **kw) -> Observation:
    return Observation(step=step, tokens=1000 * step, samples=10 * step, flops=6_000_000 * step, loss=loss,
                       time=0.5 * step, **kw)


class Band:
    """A forecaster: a fixed predicted band around 3.0."""

    name = "band"
    kind = "forecaster"

    def on_observation(self, obs, monitor):
        return StageOutput(scalars={"loss_pred": 3.0, "loss_pred_high": 3.3},
                           forecasts=[ForecastBand("loss_pred", 3.0, 2.7, 3.3, at_step=obs.step)])


class AboveBand:
    """A detector that reads the forecaster's band from the report in progress."""

    name = "above"
    kind = "detector"

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_observation(self, obs, monitor):
        high = monitor.report.scalars["loss_pred_high"]
        self.seen.append(high)
        return StageOutput(findings=[Finding("off_curve", obs.loss > high, "warning",
                                             f"loss {obs.loss:.2f} above the band's top {high:.2f}",
                                             values={"loss": obs.loss, "high": high})])


class Boom:
    name = "boom"

    def __init__(self, fail_at: set[int]) -> None:
        self.fail_at = fail_at

    def on_observation(self, obs, monitor):
        if obs.step in self.fail_at:
            raise RuntimeError("bad value")
        return {"boom/ok": 1.0}


class Collect:
    name = "collect"

    def __init__(self) -> None:
        self.reports = []

    def write(self, report) -> None:
        self.reports.append(report)


def test_detectors_run_after_forecasters_and_see_their_output() -> None:
    detector = AboveBand()
    sink = Collect()
    m = Monitor(plugins=[detector, Band()], sinks=[sink], run="r1", resolve_after=1)  # stages in the wrong order
    assert [s.name for s in m.stages] == ["band", "above"]
    r = m.observe(_obs(1, loss=3.1))
    assert detector.seen == [3.3] and r.alerts == [] and r.scalars["health/off_curve"] == 0
    assert r.forecasts["loss_pred"].high == 3.3
    r = m.observe(_obs(2, loss=3.5))
    (alert,) = r.alerts
    assert (alert.kind, alert.state, alert.severity, alert.step, alert.tokens, alert.run) == \
        ("off_curve", "firing", "warning", 2, 2000, "r1")
    assert r.scalars["health/off_curve"] == 2
    assert m.observe(_obs(3, loss=3.6)).alerts == []  # still firing: not said again
    r = m.observe(_obs(4, loss=3.0))
    assert [a.state for a in r.alerts] == ["resolved"] and r.scalars["health/off_curve"] == 0
    assert [len(x.alerts) for x in sink.reports] == [0, 1, 0, 1]


def test_a_failing_stage_becomes_an_internal_error_alert_and_the_log_point_survives(caplog) -> None:
    m = Monitor(n_params=100, plugins=[Boom({2, 3}), Band()], resolve_after=1)
    m.observe(_obs(1))
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        r = m.observe(_obs(2))
    assert r.scalars["tokens"] == 2000 and r.scalars["loss_pred"] == 3.0  # everything else is there
    assert "boom/ok" not in r.scalars
    (alert,) = r.alerts
    assert (alert.kind, alert.key, alert.state) == ("internal_error", "boom", "firing")
    assert "RuntimeError: bad value" in alert.message
    assert any("'boom' failed at step 2" in rec.getMessage() for rec in caplog.records)
    assert m.observe(_obs(3)).alerts == []  # still failing: one alert, not one per log point
    r = m.observe(_obs(4))
    assert [(a.kind, a.state) for a in r.alerts] == [("internal_error", "resolved")] and r.scalars["boom/ok"] == 1.0
    assert r"internal\_error" in m.texts["alerts"] and "boom" in m.texts["alerts"]  # Markdown-escaped
    assert len(m.history) == 4


def test_a_broken_sink_loses_nothing_else_and_is_reported_once(caplog) -> None:
    class Down:
        name = "webhook"

        def write(self, report):
            raise ConnectionError("connection refused")

    good = Collect()
    m = Monitor(sinks=[Down(), good])
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        for s in range(1, 4):
            m.observe(_obs(s))
    assert len(good.reports) == 3
    assert sum("'webhook' sink failed" in r.getMessage() for r in caplog.records) == 1


def test_finish_sends_in_flight_results_through_the_sinks_once() -> None:
    class Late:
        name = "late"

        def __init__(self) -> None:
            self.pending = True

        def on_observation(self, obs, monitor):
            return {}

        def finish(self):
            out, self.pending = ({"late/final": 7.0} if self.pending else {}), False
            return out

    sink = Collect()
    m = Monitor(plugins=[Late()], sinks=[sink])
    m.observe(_obs(5))
    r = m.finish()
    assert r is not None and r.step == 5 and r.scalars == {"late/final": 7.0} and sink.reports[-1] is r
    assert m.finish() is None and len(sink.reports) == 2  # nothing new: nothing written


def test_texts_are_written_once_per_change() -> None:
    sink = Collect()
    m = Monitor(sinks=[sink])
    m.texts["conventions"] = "6N"
    m.observe(_obs(1))
    m.observe(_obs(2))
    m.texts["conventions"] = "measured"
    m.observe(_obs(3))
    assert [r.texts for r in sink.reports] == [{"conventions": "6N", "alerts": "No alerts."}, {},
                                               {"conventions": "measured"}]


def test_batch_size_is_derived_from_the_counts_between_observations() -> None:
    m = Monitor()
    m.start(_obs(0))
    m.observe(_obs(4))
    assert (m.last.batch_samples, m.last.batch_tokens) == (10.0, 1000.0)
    given = _obs(8, batch_samples=3.0, batch_tokens=30.0)
    m.observe(given)
    assert given.batch_samples == 3.0  # what the caller measured wins


def test_alert_state_survives_a_resume_and_resolves_after_it() -> None:
    m = Monitor(plugins=[Band(), AboveBand()], resolve_after=1)
    m.observe(_obs(1, loss=4.0))
    resumed = Monitor(plugins=[Band(), AboveBand()], resolve_after=1)
    resumed.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert resumed.observe(_obs(2, loss=4.0)).alerts == []  # firing before the checkpoint: not said twice
    assert [a.state for a in resumed.observe(_obs(3, loss=3.0)).alerts] == ["resolved"]


def test_jsonl_sink_writes_the_alert_contract(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    m = build_monitor(ScaleWatchConfig(gns="off", run_name="exp7", alerts_jsonl=path), n_params=100,
                      stages=[Band(), AboveBand()])
    for step, loss in ((1, 3.0), (2, 3.9), (3, 3.95), (4, 3.1), (5, 3.0)):
        m.observe(_obs(step, loss=loss))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(d["state"], d["step"]) for d in lines] == [("firing", 2), ("resolved", 5)]  # 2 healthy points
    for d in lines:
        assert {"time", "run", "kind", "severity", "state", "step", "tokens", "message"} <= set(d)
        assert d["run"] == "exp7" and d["kind"] == "off_curve" and isinstance(d["tokens"], int)
    assert lines[0]["data"]["loss"] == pytest.approx(3.9) and lines[0]["data"]["high"] == pytest.approx(3.3)
    with pytest.raises(ScaleWatchConfigError, match="alerts_jsonl.*directory must exist"):
        build_monitor(ScaleWatchConfig(alerts_jsonl=tmp_path / "missing" / "a.jsonl"))


def test_hysteresis_and_cooldown_keep_a_flapping_condition_to_one_page() -> None:
    book = AlertBook(resolve_after=2, cooldown=3)
    pattern = [True, False, True, False, False, True, True, False, False, False, False, True]
    events = []
    for step, active in enumerate(pattern):
        events += [(a.state, step) for a in book.update([Finding("spike", active, "warning")], step, step)]
    # fires at 0; the single healthy point at 1 does not resolve it; 3-4 resolve it at 4; the return
    # at 5-6 falls in the cooldown (log points 5, 6, 7); at 11 it may fire again
    assert events == [("firing", 0), ("resolved", 4), ("firing", 11)]


def test_alert_table_keeps_the_messages_out_of_its_columns() -> None:
    book = AlertBook()
    assert book.table() == "No alerts."
    book.update([Finding("spike", True, "warning", "loss spike: 3.1 vs 2.4 | recent")], 10, 5120)
    for step in (20, 30):
        book.update([Finding("spike", False, "warning")], step, step * 512)
    book.update([Finding("batch_size", True, "info", "the batch is 28x B_crit")], 40, 20480)
    head, rule, *rows = book.table().split("\n")
    assert head == "| # | state | severity | kind | step | tokens |"
    # Firing first (bold), then the recent changes, newest first; each message numbered below the table.
    assert rows[:4] == ["| 1 | **FIRING** | info | batch\\_size | 40 | 2.05e+04 |",
                        "| 2 | resolved | warning | spike | 30 | 1.54e+04 |",
                        "| 3 | firing | warning | spike | 10 | 5.12e+03 |", ""]
    assert rows[4] == "1. the batch is 28x B\\_crit" and rows[6] == "3. loss spike: 3.1 vs 2.4 / recent"


def test_alert_book_escalation_and_unknown_severity() -> None:
    book = AlertBook()
    assert [a.severity for a in book.update([Finding("divergence", True, "warning")], 1, 1)] == ["warning"]
    assert [a.severity for a in book.update([Finding("divergence", True, "critical")], 2, 2)] == ["critical"]
    assert book.health() == {"divergence": 3}
    with pytest.raises(ValueError, match="severity"):
        book.update([Finding("x", True, "fatal")], 3, 3)


def _summary_alerts(book: AlertBook) -> list[str]:
    """The alert lines of the end-of-run summary of a run whose alert book is ``book``."""
    monitor = SimpleNamespace(last=None, history=[], alerts=book)
    watch = SimpleNamespace(latest={}, n_params=0, tokens=0, flops=0.0, describe=lambda: "", curve_plugin=None,
                            monitor=monitor)
    lines = run_summary(watch).split("\n")
    return lines[next(i for i, x in enumerate(lines) if x.startswith("  alerts:")):]


def test_summary_lists_the_alerts_that_fired_and_resolved_worst_first() -> None:
    """A divergence that fired at 270 and resolved at 290 makes ``watch`` exit 2: the summary must say so too,
    not just 'none firing at the end' (new-user trial). The list survives a resume."""
    book = AlertBook(resolve_after=1, cooldown=0)
    timeline = {"spike": ((200, 230), "warning", "loss spike at step {}: 6.5; lower the LR"),
                "divergence": ((270,), "critical", "loss diverging since step 200: 2.32 -> 2.67; stop"),
                "batch_size": ((280,), "info", "the batch is 5x B_crit")}
    for step in range(200, 300, 10):
        book.update([Finding(kind, step in at, sev, msg.format(step)) for kind, (at, sev, msg) in timeline.items()],
                    step, step)
    assert book.firing() == {} and book.worst_fired == "critical"
    resumed = AlertBook()
    resumed.load_state_dict(json.loads(json.dumps(book.state_dict())))
    assert _summary_alerts(resumed) == [
        "  alerts:     none firing at the end",
        "  resolved:   4 alerts fired during the run and resolved since (worst: critical)",
        "    divergence (critical): fired at step 270, resolved at step 280: loss diverging since step 200: 2.32 -> 2.67",
        "    spike (warning): fired 2 times: steps 200-210, 230-240: loss spike at step 200: 6.5",
        "    batch_size (info): fired at step 280, resolved at step 290: the batch is 5x B_crit"]
    # info alerts give way to the criticals and warnings when there are many; those are always all listed
    from scalewatch.summary import alert_lines

    lines = alert_lines(book, most=3)
    assert lines[-1] == "    and 1 info alert more" and sum("(warning)" in x or "(critical)" in x for x in lines) == 2


def test_a_firing_alert_shows_its_newest_message_and_the_step_of_its_numbers() -> None:
    """The detectors rewrite their message at every log point; the summary showed the one the alert fired with
    (the batch 16.7x B_crit at step 20, beside a noise line at 5.9x; '10 NaN/Inf ... so far' beside a count of
    250)."""
    book = AlertBook(resolve_after=2, cooldown=0)
    for step, count in ((20, 10), (40, 130), (60, 250)):
        book.update([Finding("nonfinite", True, "critical", f"non-finite loss ({count} NaN/Inf losses so far)")],
                    step, step)
    book.update([Finding("nonfinite", False, "critical")], 70, 70)  # one healthy point: still firing
    resumed = AlertBook()
    resumed.load_state_dict(json.loads(json.dumps(book.state_dict())))
    assert _summary_alerts(resumed) == ["  alerts:     1 firing at the end",
                                    "    nonfinite (critical) since step 20; at step 60: non-finite loss "
                                    "(250 NaN/Inf losses so far)"]


def test_config_is_validated_once_and_the_error_imports_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from scalewatch import ScaleWatchConfigError, ScaleWatchConfig; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    with pytest.raises(ScaleWatchConfigError, match="history_size"):
        ScaleWatchConfig(history_size=2)
    with pytest.raises(ScaleWatchConfigError, match="gns_decay"):
        ScaleWatchConfig(gns_decay=1.5)
    assert ScaleWatchConfig(gns=None).gns == "off"


def test_nonfinite_and_interval_statistics_reach_the_scalars() -> None:
    r = Monitor().observe(_obs(3, loss=math.nan, loss_max=5.5, all_finite=False, nonfinite=2, grad_norm=0.7))
    assert math.isnan(r.scalars["loss"]) and r.scalars["loss_max"] == 5.5
    assert r.scalars["nonfinite_losses"] == 2 and r.scalars["grad_norm"] == 0.7


def test_build_monitor_gives_a_plain_loop_the_curve_law_with_its_schedule(tmp_path, caplog) -> None:
    from scalewatch.curves import CurveLaw

    law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(100.0), 0.0)},
                   n_ref=1e8, band_rel=0.01)
    (tmp_path / "lr.csv").write_text("step,lr\n" + "".join(f"{s},0.001\n" for s in range(1001)))
    cfg = ScaleWatchConfig(gns="off", curve_law=law, schedule=tmp_path / "lr.csv", forecast_in_background=False)
    r = build_monitor(cfg, n_params=int(1e8)).observe(_obs(400, loss=3.60))
    assert r.scalars["loss_pred"] == pytest.approx(law.predict([1e-3] * 1001, steps=[400]).loss[0])
    assert r.forecasts["loss_pred"].low < r.forecasts["loss_pred"].value < r.forecasts["loss_pred"].high
    assert "loss_forecast_final" in r.forecasts
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        m = build_monitor(ScaleWatchConfig(curve_law=law, schedule=[0.0, 0.0, 0.0]))
    assert "no predicted curve" in caplog.text and "zero or negative" in caplog.text
    assert "loss_pred" not in m.observe(_obs(2)).scalars  # the rest works


def test_an_alert_firing_in_a_checkpoint_from_before_episodes_is_summarised_when_it_resolves() -> None:
    book = AlertBook(resolve_after=1, cooldown=0)
    book.update([Finding("nonfinite", True, "critical", "non-finite loss at step 10")], 10, 10)
    old = json.loads(json.dumps(book.state_dict()))
    for k in ("episodes", "latest"):  # what a checkpoint written before them holds
        old.pop(k, None)
    resumed = AlertBook(resolve_after=1, cooldown=0)
    resumed.load_state_dict(old)
    resumed.update([Finding("nonfinite", False, "critical")], 30, 30)
    lines = _summary_alerts(resumed)
    assert lines[0] == "  alerts:     none firing at the end"
    assert any("nonfinite (critical): fired at step 10, resolved at step 30" in x for x in lines), lines
