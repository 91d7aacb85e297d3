"""A real TensorBoard server on a ScaleWatch run: its HTTP data API serves our scalars, the layout and the texts.

Routes, as the tensorboard package defines them (backend/application.py: ``/data/plugin/<plugin><route>``):
``scalars`` ``/tags`` and ``/scalars`` (plugins/scalar/scalars_plugin.py), ``custom_scalars`` ``/layout``
(plugins/custom_scalar/custom_scalars_plugin.py), ``text`` ``/tags`` and ``/text``
(plugins/text/text_plugin.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from test_health import _train

pytestmark = pytest.mark.slow

NAN_STEP = 40  # a NaN loss at this step: a critical `nonfinite` alert in the alert table at the next log point


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, route: str, **query: str):
    url = base + route + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture()
def server(tmp_path):
    """TensorBoard serving one ScaleWatch run; yields (base URL, run name); the server is always killed."""
    watch, _ = _train(tmp_path / "logs", nan_step=NAN_STEP, steps=80)
    assert any(a.kind == "nonfinite" for a in watch.monitor.alerts.recent)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
                             "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
                             "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # until it answers and has loaded the run (it reads the logs on a thread)
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                tags = _get(base, "/data/plugin/scalars/tags")
                if any("scalewatch/loss" in t for t in tags.values()):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the run within 90 s")
            time.sleep(0.5)
        (run,) = [r for r, t in tags.items() if "scalewatch/loss" in t]
        yield base, run
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_tensorboard_serves_our_tags_layout_and_texts(server) -> None:
    base, run = server
    tags = _get(base, "/data/plugin/scalars/tags")[run]
    for tag in ("scalewatch/loss", "scalewatch/tokens", "scalewatch/tokens_per_param", "scalewatch/loss_vs_tokens",
                "scalewatch/health/nonfinite", "scalewatch/health/spike"):
        assert tag in tags, sorted(tags)
    # the loss against tokens: TensorBoard's step is the token count (512 tokens a step here)
    points = _get(base, "/data/plugin/scalars/scalars", run=run, tag="scalewatch/loss_vs_tokens")
    assert [step for _, step, _ in points][:3] == [5120, 10240, 15360]
    health = _get(base, "/data/plugin/scalars/scalars", run=run, tag="scalewatch/health/nonfinite")
    assert {step: value for _, step, value in health}[NAN_STEP + 10] == 3.0  # critical
    # the custom-scalars dashboard, in reading order, health first
    layout = _get(base, "/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[0] == "scalewatch 1 health" and "scalewatch 3 tokens and compute" in titles, titles
    charts = {ch["title"]: ch for c in layout["category"] for ch in c["chart"]}
    assert charts["alerts by kind (0 ok, 1 info, 2 warning, 3 critical)"]["multiline"]["tag"] == ["^scalewatch/health/"]
    # the text tab: the conventions and the alert table, with the alert
    texts = _get(base, "/data/plugin/text/tags")[run]  # torch's add_text names them <tag>/text_summary
    assert {"scalewatch/conventions/text_summary", "scalewatch/alerts/text_summary"} <= set(texts), texts
    alerts = _get(base, "/data/plugin/text/text", run=run, tag="scalewatch/alerts/text_summary", markdown="false")
    latest = alerts[-1]["text"]
    assert "nonfinite" in latest and "critical" in latest and "FIRING" in latest
    conventions = _get(base, "/data/plugin/text/text", run=run, tag="scalewatch/conventions/text_summary")
    text = conventions[-1]["text"]  # as TensorBoard renders it: the formula a code span, not italics
    assert "N = 21,984" in text and "<code>6*N</code> per token" in text and "<em>" not in text
