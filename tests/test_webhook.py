"""WebhookSink against a real local HTTP server: delivery, retries, timeouts, a dead port, a full queue.

Everything talks to 127.0.0.1 only, with short timeouts, so the file runs in a few seconds.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scalewatch.alerts import Alert, Finding
from scalewatch.config import ScaleWatchConfigError
from scalewatch.monitor import Monitor, Observation, Report, StageOutput
from scalewatch.webhook import ENV_VAR, WebhookSink, alert_text

SECRET = "T0SECRET/B0SECRET/xoxSECRETTOKEN"  # the part of a webhook URL that must never leak
HANG_MAX_S = 3.0  # a hanging handler answers after this at the latest (or when the test ends)


class Hook:
    """A local webhook endpoint; the first path segment picks the behaviour (ok, fail, hang, notfound, 429once)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[str] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: hanging handlers return at once
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                mode = self.path.strip("/").split("/")[0]
                with hook.lock:
                    hook.attempts[mode] = hook.attempts.get(mode, 0) + 1
                    n = hook.attempts[mode]
                if mode == "hang":
                    hook.release.wait(HANG_MAX_S)
                    status = 200
                elif mode == "fail":
                    status = 500
                elif mode == "notfound":
                    status = 404
                elif mode == "429once":
                    status = 429 if n == 1 else 200
                else:
                    status = 200
                if status == 200:
                    with hook.lock:
                        hook.bodies.append(json.loads(body))
                        hook.headers.append(self.headers.get("Content-Type", ""))
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client gave up (timeout): nothing to answer

            def log_message(self, *args: object) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}/{SECRET}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would route 127.0.0.1 elsewhere: tests talk to the local server only.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.stop()


@pytest.fixture
def dead_url() -> str:
    """A URL on a local port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/absent/{SECRET}"


def report(step: int = 3, kind: str = "nonfinite", severity: str = "critical", state: str = "firing",
           message: str = "NaN loss") -> Report:
    return Report(step=step, tokens=step * 10, alerts=[Alert(kind, severity, state, step, step * 10, message)])


def write_many(sink: WebhookSink, n: int) -> float:
    """Write n one-alert reports; return the seconds it took."""
    t0 = time.perf_counter()
    for i in range(n):
        sink.write(report(step=i + 1, message=f"alert {i}"))
    return time.perf_counter() - t0


def assert_secret_kept(sink: WebhookSink, caplog: pytest.LogCaptureFixture) -> None:
    for text in (caplog.text, repr(sink), str(vars(sink).get("_shown"))):
        assert SECRET not in text and "SECRET" not in text


# ------------------------------------------------------------------ delivery
def test_delivers_slack_payloads(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    sink = WebhookSink(hook.url("ok"), run="exp7", timeout=2.0)
    sink.write(Report(step=12_400, tokens=3_100_000_000, alerts=[
        Alert("divergence", "critical", "firing", 12_400, 3_100_000_000, "loss 3x the fit"),
        Alert("spike", "warning", "firing", 12_400, 3_100_000_000, "loss <2x> & more\nsecond line")]))
    sink.write(report(step=12_600, kind="divergence", state="resolved", message="back on track"))
    sink.write(Report(step=1, tokens=1))  # no alerts: nothing sent, no thread needed
    sink.close(timeout=5.0)

    assert (sink.delivered, sink.undelivered) == (3, 0)
    texts = [b["text"] for b in hook.bodies]
    assert [set(b) for b in hook.bodies] == [{"text"}] * 3
    assert hook.headers == ["application/json"] * 3
    assert texts[0] == ":rotating_light: CRITICAL divergence — run exp7, step 12,400 (3.1e9 tokens): loss 3x the fit"
    assert texts[1].startswith(":warning: WARNING spike") and "&lt;2x&gt; &amp; more second line" in texts[1]
    assert texts[2].startswith(":white_check_mark: resolved divergence") and "back on track" in texts[2]
    assert all("\n" not in t for t in texts)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_secret_kept(sink, caplog)


def test_nonfinite_alert_text_names_kind_severity_message(hook: Hook) -> None:
    sink = WebhookSink(hook.url("ok"), timeout=2.0)
    sink.write(report())
    sink.close(timeout=5.0)
    assert sink.delivered == 1
    text = hook.bodies[0]["text"]
    assert "nonfinite" in text and "CRITICAL" in text and "NaN loss" in text and "step 3" in text


def test_429_is_retried(hook: Hook) -> None:
    sink = WebhookSink(hook.url("429once"), timeout=2.0, retries=2, backoff=0.02)
    sink.write(report())
    sink.close(timeout=5.0)
    assert (sink.delivered, sink.undelivered, hook.attempts["429once"]) == (1, 0, 2)


# ------------------------------------------------------------------ failures
def test_server_error_is_retried_then_counted(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    retries, n = 2, 4
    sink = WebhookSink(hook.url("fail"), timeout=0.3, retries=retries, backoff=0.02)
    assert write_many(sink, n) < 0.1
    t0 = time.perf_counter()
    sink.close(timeout=5.0)
    assert time.perf_counter() - t0 < 5.0
    assert (sink.delivered, sink.undelivered, sink.dropped) == (0, n, 0)
    assert hook.attempts["fail"] == n * (retries + 1)
    burst = [r for r in caplog.records if "is not taking alerts" in r.getMessage()]
    assert len(burst) == 1 and "HTTP 500 after 3 attempts" in burst[0].getMessage()  # once per burst
    assert "127.0.0.1" in burst[0].getMessage()  # the host says which webhook, the path stays secret
    final = [r for r in caplog.records if "could not be delivered" in r.getMessage()]
    assert [r.getMessage() for r in final] == [
        f"scalewatch: {n} alert(s) could not be delivered to the webhook; they are in the JSON-lines file if one "
        "was set"]
    assert_secret_kept(sink, caplog)


def test_client_error_is_not_retried(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    sink = WebhookSink(hook.url("notfound"), timeout=0.3, retries=3, backoff=0.02)
    write_many(sink, 2)
    sink.close(timeout=5.0)
    assert (sink.delivered, sink.undelivered, hook.attempts["notfound"]) == (0, 2, 2)
    assert_secret_kept(sink, caplog)


def test_hanging_endpoint_never_blocks(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    sink = WebhookSink(hook.url("hang"), timeout=0.3, retries=3, backoff=0.05)
    assert write_many(sink, 20) < 0.1
    t0 = time.perf_counter()
    sink.close(timeout=0.5)
    assert time.perf_counter() - t0 < 0.5 + 0.25  # within its bound, whatever the request is doing
    assert (sink.delivered, sink.undelivered) == (0, 20)
    assert any("20 alert(s) could not be delivered" in r.getMessage() for r in caplog.records)
    assert_secret_kept(sink, caplog)


def test_absent_endpoint(dead_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    sink = WebhookSink(dead_url, timeout=0.3, retries=1, backoff=0.01)
    assert write_many(sink, 20) < 0.1
    t0 = time.perf_counter()
    sink.close(timeout=5.0)
    assert time.perf_counter() - t0 < 5.0
    assert (sink.delivered, sink.undelivered) == (0, 20)
    burst = [r for r in caplog.records if "is not taking alerts" in r.getMessage()]
    assert len(burst) == 1 and "ConnectionRefusedError after 2 attempts" in burst[0].getMessage()
    assert_secret_kept(sink, caplog)


def test_full_queue_drops_and_counts(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    sink = WebhookSink(hook.url("hang"), timeout=0.3, retries=0, max_queue=2)
    assert write_many(sink, 10) < 0.1
    # 2 wait in the queue, and the thread may already have taken 1 into a request: the rest are dropped.
    assert sink.dropped in (7, 8) and sink.undelivered == sink.dropped
    assert len([r for r in caplog.records if "queue of 2 is full" in r.getMessage()]) == 1
    t0 = time.perf_counter()
    sink.close(timeout=0.2)
    assert time.perf_counter() - t0 < 0.2 + 0.25
    assert (sink.delivered, sink.undelivered) == (0, 10)
    assert_secret_kept(sink, caplog)


# ------------------------------------------------------------------ lifecycle
def test_close_is_safe_twice_and_write_after_close_restarts(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalewatch")
    sink = WebhookSink(hook.url("ok"), timeout=2.0)
    sink.close()  # nothing written: nothing to do
    sink.write(report())
    sink.close(timeout=5.0)
    sink.close(timeout=5.0)
    sink.write(report(step=4))  # e.g. a second fit with the same callback
    worker = sink._worker
    assert worker is not None and worker.thread is not None
    sink.close(timeout=5.0)
    assert not worker.thread.is_alive()  # no thread outlives close() when the endpoint answers
    assert (sink.delivered, sink.undelivered, len(hook.bodies)) == (2, 0, 2)
    assert "could not be delivered" not in caplog.text


def test_in_a_monitor(hook: Hook) -> None:
    class Detector:
        name, kind = "nan_check", "detector"

        def on_observation(self, obs: Observation, monitor: Monitor) -> StageOutput:
            return StageOutput(findings=[Finding("nonfinite", obs.loss != obs.loss, "critical", "NaN loss")])

    sink = WebhookSink(hook.url("ok"), run="exp7", timeout=2.0)
    monitor = Monitor(plugins=[Detector()], sinks=[sink], run="exp7")
    sent = len(monitor.observe(Observation(step=5, tokens=50, samples=5, flops=0, loss=float("nan"))).alerts)
    for step in range(6, 10):  # a few healthy points: the alert book may want several before it resolves
        sent += len(monitor.observe(Observation(step=step, tokens=step * 10, samples=step, flops=0,
                                                loss=2.0)).alerts)
    monitor.close()
    sink.close(timeout=5.0)  # whether or not the Monitor closed it already
    assert sent == 2 and sink.delivered == 2
    assert hook.bodies[0]["text"].startswith(":rotating_light: CRITICAL nonfinite — run exp7, step 5")
    assert hook.bodies[1]["text"].startswith(":white_check_mark: resolved nonfinite (was critical) — run exp7")


def test_run_name_defaults_to_the_alerts_own() -> None:
    alert = Alert("spike", "info", "firing", 1, 1, "m", run="from-book")
    assert "run from-book," in alert_text(alert)
    assert alert_text(alert).startswith(":information_source: INFO spike")


# ------------------------------------------------------------------ configuration
def test_bad_scheme_is_a_config_error_without_the_url() -> None:
    with pytest.raises(ScaleWatchConfigError) as err:
        WebhookSink(f"ftp://hooks.example.com/{SECRET}")
    msg = str(err.value)
    assert "http:// or https://" in msg and "'ftp'" in msg and "\n" not in msg
    assert "SECRET" not in msg and "hooks.example.com" not in msg
    with pytest.raises(ScaleWatchConfigError, match="without a host"):
        WebhookSink(f"https:///{SECRET}")


def test_missing_url_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ScaleWatchConfigError, match=ENV_VAR) as err:
        WebhookSink()
    assert "\n" not in str(err.value)
    monkeypatch.setenv(ENV_VAR, f"https://hooks.slack.com/services/{SECRET}\n")
    sink = WebhookSink(run="exp7")
    assert repr(sink) == "WebhookSink(url='https://hooks.slack.com/…', run='exp7', delivered=0, undelivered=0)"
    monkeypatch.setenv(ENV_VAR, f"ftp://x/{SECRET}")
    with pytest.raises(ScaleWatchConfigError) as err:
        WebhookSink()
    assert "SECRET" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"max_queue": 0}, {"retries": -1}, {"backoff": -0.1},
                                    {"max_queue": True}])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ScaleWatchConfigError):
        WebhookSink("https://hooks.slack.com/services/x", **kwargs)
