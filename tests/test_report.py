"""`scalewatch report`: one HTML page per run, its numbers checked against the logs, and the page opened in Chromium.

The ScaleWatch run is the run-health scenario of tests/test_health.py (the example GPT, 300 steps,
LR x30 for three steps at step 150), with two micro-batches per step so that the noise scale is
measured and logged too.
"""

from __future__ import annotations

import json
import re
import math
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import MULTIPOWERLAW
from helpers import scalars
from test_health import FAULT_STEP, LRFault, _train
from torch.utils.tensorboard import SummaryWriter

from scalewatch.cli import main

WIDTH, HEIGHT = 1600, 1200


class Tables(HTMLParser):
    """Every ``<table id=...>`` of a page: id -> (header cells, rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, tuple[list[str], list[list[str]]]] = {}
        self._id: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id"):
            self._id = dict(attrs)["id"]
            self.tables[self._id] = ([], [])
        elif self._id and tag == "thead":
            self._in_head = True
        elif self._id and tag == "tr":
            self._row = []
        elif self._id and tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if self._id is None:
            return
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            head, rows = self.tables[self._id]
            (head.extend(self._row) if self._in_head else rows.append(self._row))
        elif tag == "thead":
            self._in_head = False
        elif tag == "table":
            self._id = None


def tables(page: str) -> dict[str, list[dict[str, str]]]:
    """id -> rows as {header: cell text}."""
    p = Tables()
    p.feed(page)
    return {k: [dict(zip(head, r, strict=True)) for r in rows] for k, (head, rows) in p.tables.items()}


def num(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(scope="module")
def sw_run(tmp_path_factory):
    """A real ScaleWatch run with a known fault: (the live callback, its TensorBoard directory)."""
    root = tmp_path_factory.mktemp("report_run")
    live, _ = _train(root, fault=LRFault(FAULT_STEP, FAULT_STEP + 3, 30.0), accumulate=2)
    return live, root / "tb" / "version_0"


@pytest.fixture(scope="module")
def sw_report(sw_run, tmp_path_factory):
    live, logdir = sw_run
    out = tmp_path_factory.mktemp("report_out") / "report.html"
    assert main(["report", str(logdir), "--out", str(out), "--total-steps", "300"]) == 0
    return out


@pytest.mark.slow
def test_report_on_a_scalewatch_run_shows_the_live_alerts_and_the_logged_numbers(sw_run, sw_report) -> None:
    live, logdir = sw_run
    page = sw_report.read_text()
    t = tables(page)
    logged = scalars(logdir)
    # the alert timeline's table: the alerts the live callback raised, the injected spike among them
    replayed = [(int(num(r["step"])), r["state"], r["severity"], r["kind"]) for r in t["alert-table"]]
    assert (FAULT_STEP + 10, "firing", "warning", "spike") in replayed
    assert sorted(replayed) == sorted((a.step, a.state, a.severity, a.kind) for a in live.monitor.alerts.recent)
    assert page.count('<rect class="span"') >= len({k for _, _, _, k in replayed})  # a bar per alert episode
    # the numbers behind each plot are the logged ones
    loss = dict(logged["scalewatch/loss"])
    tokens = dict(logged["scalewatch/tokens"])
    rows = t["loss-table"]
    assert [int(num(r["step"])) for r in rows] == sorted(loss)
    for r in rows:
        step = int(num(r["step"]))
        assert num(r["tokens"]) == tokens[step] and num(r["loss"]) == pytest.approx(loss[step], rel=1e-4)
    ratio = dict(logged["scalewatch/tokens_per_param"])
    assert all(num(r["tokens per parameter"]) == pytest.approx(ratio[int(num(r["step"]))], rel=1e-4)
               for r in t["ratio-table"])
    b_crit = dict(logged["scalewatch/gns/b_crit"])  # recomputed from the logged EMAs by the replay
    assert len(t["gns-table"]) == len(b_crit) > 0
    assert all(num(r["B_crit (tokens)"]) == pytest.approx(b_crit[int(num(r["step"]))], rel=1e-4)
               for r in t["gns-table"])
    assert "projected at step 300" in page and "compute-optimal ≈ 20" in page
    # self-contained: nothing fetched, nothing run
    assert "<script" not in page and " src=" not in page and "https://" not in page
    assert page.count("<svg") == 4  # loss, tokens per parameter, noise scale, timeline


def test_report_on_a_real_curve_with_a_curve_law_shows_the_band_and_the_forecast(tmp_path, capsys,
                                                                                  mpl25_curve_law) -> None:
    from scalewatch.curves import load_curve_law, read_curve_csv

    law = mpl25_curve_law
    run = MULTIPOWERLAW / "csv_25__wsd_20000_24000.csv"  # another schedule of the same recipe
    out = tmp_path / "wsd.html"
    assert main(["report", str(run), "--out", str(out), "--curve-law", str(law), "--schedule", str(run),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    page = out.read_text()
    rows = tables(page)["loss-table"]
    curve = read_curve_csv(run)
    assert [int(num(r["step"])) for r in rows] == list(curve.steps)
    assert [num(r["loss"]) for r in rows] == pytest.approx(list(curve.loss), rel=1e-4)
    pred = load_curve_law(law).predict(curve.per_step_lr(), steps=curve.steps)
    assert [num(r["predicted"]) for r in rows] == pytest.approx(list(pred.loss), rel=1e-4)
    assert [num(r["band low"]) for r in rows] == pytest.approx(list(pred.low), rel=1e-4)
    # the forecast at the end of the schedule, from the whole run: close to where the run ended, inside its band
    last = float(curve.loss[-1])
    assert abs(summary["forecast"] - last) / last < 0.01
    assert f"Final-loss forecast at step {int(curve.steps[-1]):,}" in page
    # no N, no token count, no noise scale: one line each, no empty plot
    assert "No N in this log: give --n-params" in page and "No noise scale in this log" in page
    assert page.count("<svg") == 1 + (1 if tables(page).get("alert-table") else 0)


def test_every_string_from_the_logs_is_escaped(tmp_path) -> None:
    evil = '<img src=x onerror="alert(1)">'
    path = tmp_path / "run.csv"
    path.write_text(f"step,loss,{evil}\n" + "".join(f"{s},{2 + 3 / math.sqrt(s)},1\n" for s in range(1, 80))
                    + "".join(f"{s},nan,1\n" for s in range(80, 85)))  # NaN: a nonfinite alert with a message
    out = tmp_path / "r.html"
    assert main(["report", str(path), "--out", str(out), "--run-name", f"</title>{evil}"]) == 0
    page = out.read_text()
    assert "<img" not in page and "onerror=\"" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page  # shown, as text (tags found, the run name)
    assert tables(page)["alert-table"][0]["kind"] == "nonfinite"


def _foreign(path: Path, tag: str) -> None:
    with SummaryWriter(str(path)) as w:
        for s in range(1, 20):
            w.add_scalar(tag, 1.0 / s, s)


@pytest.mark.parametrize("make, match", [
    (lambda d: d.mkdir() or d, "no TensorBoard event files"),
    (lambda d: _foreign(d, "accuracy") or d, "tags/columns: accuracy"),
    (lambda d: (d.with_suffix(".csv").write_text("step,accuracy\n1,0.5\n2,0.6\n"), d.with_suffix(".csv"))[1],
     "tags/columns: step, accuracy; name it with --loss-tag"),
    (lambda d: d / "missing", "no such file"),
    (lambda d: _foreign(d, "loss") or [f.write_bytes(f.read_bytes()[:30]) for f in d.glob("events*")] and d,
     "ends in an incomplete record"),
])
def test_bad_input_gets_one_line_exit_3_and_no_page(tmp_path, capsys, make, match) -> None:
    path = make(tmp_path / "run")
    out = tmp_path / "report.html"
    assert main(["report", str(path), "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalewatch report: error:") and match in err[0], err
    assert not out.exists()


def test_a_truncated_event_file_keeps_what_was_read_and_says_so(tmp_path, capsys) -> None:
    _foreign(tmp_path / "run", "loss")
    (f,) = (tmp_path / "run").glob("events*")
    f.write_bytes(f.read_bytes()[:-20])  # the last record cut in half
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "run"), "--out", str(out), "--tokens-per-step", "100"]) == 0
    assert "ends in an incomplete record" in capsys.readouterr().err
    page = out.read_text()
    assert [num(r["step"]) for r in tables(page)["loss-table"]] == list(range(1, 19))  # 18 of 19 points
    assert "ends in an incomplete record" in page


# ------------------------------------------------------------------ headless Chromium
def png_pixels(path: Path) -> np.ndarray:
    """An 8-bit RGB(A) PNG as a (height, width, channels) array: the standard library's zlib, no imaging package."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    w, h, depth, color, _, _, interlace = head
    assert depth == 8 and color in (2, 6) and interlace == 0, head
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.int32)
    prev = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):  # undo the per-row PNG filters
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = (np.cumsum(line.reshape(w, bpp), axis=0) % 256).reshape(-1)
        elif f == 2:
            cur = (line + prev) % 256
        else:
            cur = np.zeros_like(line)
            for i in range(w * bpp):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b, c = int(prev[i]), int(prev[i - bpp]) if i >= bpp else 0
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (line[i] + pred) % 256
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp).astype(np.uint8)


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(sw_report, tmp_path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (CI installs Debian's `chromium` in .ci/run)")
    shot = tmp_path / "report.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},{HEIGHT}"]
    proc = subprocess.run([*common, f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                           sw_report.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    # The page has no script: any console message (an error, a resource that failed to load) is a fault.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    px = png_pixels(shot)
    assert px.shape[:2] == (HEIGHT, WIDTH)
    rgb = px[..., :3].astype(float)
    assert rgb.std() > 10  # not blank (a page with one heading and a line: 5; this page: 21)
    background = np.all(np.abs(rgb - [244, 246, 249]) < 4, axis=-1).mean()
    assert background < 0.6  # the sections cover most of the window

    def share(color: str) -> float:  # pixels within a small distance of a colour the page draws with
        target = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        return float(np.all(np.abs(rgb - target) < 30, axis=-1).mean())

    assert share("#1f5fa8") > 5e-4  # the loss line (and the cards' text is not this blue)
    assert share("#c0392b") > 1e-4  # the critical divergence: its card, chip and mark on the loss plot
    dom = subprocess.run([*common, "--dump-dom", sw_report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and dom.stdout.count("<svg") == 4 and 'id="alert-table"' in dom.stdout


def test_summary_marks_the_latest_firing_alert_of_a_kind_not_an_earlier_resolved_one() -> None:
    """batch_size raised at step 20, resolved at 190, raised again at 600 and still firing at the end: the
    summary says the one of step 600 is still firing (the table and the timeline say so too)."""
    from scalewatch.alerts import AlertBook, Finding
    from scalewatch.report import Point, RunData, _summary
    from scalewatch.tensorboard import Tags

    book = AlertBook(resolve_after=2, cooldown=5)
    alerts = []
    for step in range(10, 610, 10):
        active = step in (20, 30) or step >= 600 or 40 <= step < 180  # quiet at 180 and 190: resolved at 190
        alerts += book.update([Finding("batch_size", active, "info", "batch far above B_crit")], step, 0)
    assert [(a.state, a.step) for a in alerts] == [("firing", 20), ("resolved", 190), ("firing", 600)]
    d = RunData(run="r", source="x", points=[Point(600, 0, 3.0)], alerts=alerts, state="info", log_points=60,
                tags=Tags(loss="loss"), tags_found=["loss"], firing_at_end=list(book.firing()))
    text = re.sub(r"<[^>]+>", "", _summary(d))
    assert "batch_size info at step 600 (still firing)" in text, text
    assert "batch_size info at step 20 (still firing)" not in text and "batch_size info at step 20" in text


def test_report_with_a_curve_law_and_no_schedule_uses_the_logs_lr(tmp_path, capsys, mpl25_curve_law) -> None:
    law = mpl25_curve_law
    run = MULTIPOWERLAW / "csv_25__wsd_20000_24000.csv"  # step,lr,loss: the LR at every log point
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "own.html"), "--curve-law", str(law)]) == 0
    assert capsys.readouterr().err.count("the schedule is the log's own 'lr'") == 1
    assert main(["report", str(run), "--out", str(tmp_path / "given.html"), "--curve-law", str(law),
                 "--schedule", str(run)]) == 0
    own, given = (tables((tmp_path / f).read_text())["loss-table"] for f in ("own.html", "given.html"))
    assert own == given and num(own[-1]["predicted"]) > 0


def test_a_run_whose_loss_went_non_finite_gets_no_forecast_and_the_page_says_why(tmp_path, capsys,
                                                                                mpl25_curve_law) -> None:
    rows = (MULTIPOWERLAW / "csv_25__wsd_20000_24000.csv").read_text().strip().splitlines()
    run = tmp_path / "nanend.csv"
    cut = len(rows) - 5  # the last 5 log points NaN
    run.write_text("\n".join(rows[:cut] + [",".join(r.split(",")[:2] + ["nan"]) for r in rows[cut:]]) + "\n")
    out = tmp_path / "nan.html"
    assert main(["report", str(run), "--out", str(out), "--curve-law", str(mpl25_curve_law), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    page = out.read_text()
    first_nan = int(rows[cut].split(",")[0])
    assert summary["forecast"] is None and "Final-loss forecast at step" not in page
    assert f"No final-loss forecast: the loss is non-finite from step {first_nan:,} on" in page
