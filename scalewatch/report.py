"""``scalewatch report RUN --out report.html``: one self-contained HTML page that tells a run's story.

The run is replayed through the same pipeline as ``scalewatch watch`` (:class:`~scalewatch.watch.Replayer`,
hence ``build_monitor``: the same forecasters and detectors), and a sink collects what each log point
produced. The page shows the loss against tokens with the predicted band and the final-loss forecast
(given a curve law), the tokens per parameter against the compute-optimal ratio, the noise scale
against the batch size, and an alert timeline; under each plot, a table of the numbers behind it.

The plots are inline SVG drawn here (no plotting library, nothing fetched: the file is the whole
page, and it opens offline). Every string that comes from the logs is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scalewatch.alerts import Alert
from scalewatch.curves import SPEC_TEMPLATE
from scalewatch.monitor import ForecastBand, History, Report
from scalewatch.tensorboard import Tags, no_loss_message
from scalewatch.watch import (Replayer, TableSource, WatchError, add_run_arguments, check_one_run, open_source,
                              replayer_kwargs, stderr_once, with_log_schedule, worst_state)

#: Colours (colour-blind-safe where it matters: the loss, the prediction and the severities differ in hue and dash).
COLORS = {"loss": "#1f5fa8", "pred": "#e07b00", "forecast": "#c0392b", "optimal": "#2a8a3e", "ratio": "#1f5fa8",
          "b_crit": "#7b3fa0", "batch": "#1f5fa8", "info": "#3b7dd8", "warning": "#e0a000", "critical": "#c0392b"}
SEVERITY_ORDER = ("info", "warning", "critical")
MAX_ALERTS = 10_000  # alert changes kept for the timeline; a flapping run says how many were left out


def esc(value: Any) -> str:
    """HTML text (and attribute value) for anything, quotes included: logs can hold any string.

    Example:
        >>> esc('<script>alert("x")</script> & co')
        '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co'
    """
    return html.escape(str(value), quote=True)


def fmt(x: Any, digits: int = 5) -> str:
    """A number for a table: integers with thousands separators, floats to ``digits`` significant digits.

    Example:
        >>> fmt(153600), fmt(2.76253628), fmt(None), fmt(float("nan")), fmt(1.5e-4)
        ('153,600', '2.7625', '–', 'NaN', '0.00015')
    """
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def short(x: float) -> str:
    """A tick label: SI suffixes from 1,000 on (tokens and batches read better as 150k, 1.2M).

    Example:
        >>> short(153600), short(2500), short(2.5), short(1.2e9), short(0.0003), short(-20000)
        ('154k', '2.5k', '2.5', '1.2G', '0.0003', '-20k')
    """
    a = abs(x)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


# ------------------------------------------------------------------ what the replay produced
@dataclass(frozen=True)
class Point:
    """The numbers of one log point the page plots (None where the run has no such number)."""

    step: int
    tokens: int
    loss: float
    lr: float | None = None
    tokens_per_param: float | None = None
    loss_pred: float | None = None
    loss_pred_low: float | None = None
    loss_pred_high: float | None = None
    loss_residual: float | None = None
    b_crit: float | None = None
    batch_tokens: float | None = None
    compute_factor: float | None = None
    steps_factor: float | None = None

    @classmethod
    def from_report(cls, report: Report) -> Point:
        """The point of one log point's report.

        Example:
            >>> Point.from_report(Report(step=10, tokens=5120, scalars={"loss": 3.2, "gns/b_crit": 9e3})).b_crit
            9000.0
        """
        s = report.scalars
        return cls(step=report.step, tokens=report.tokens, loss=s.get("loss", math.nan), lr=s.get("lr"),
                   tokens_per_param=s.get("tokens_per_param"), loss_pred=s.get("loss_pred"),
                   loss_pred_low=s.get("loss_pred_low"), loss_pred_high=s.get("loss_pred_high"),
                   loss_residual=s.get("loss_residual"), b_crit=s.get("gns/b_crit"),
                   batch_tokens=s.get("gns/batch_tokens"), compute_factor=s.get("gns/compute_factor"),
                   steps_factor=s.get("gns/steps_factor"))


class ReportCollector:
    """A Monitor sink that keeps what the page needs: the log points (bounded), every alert change, the forecast.

    The points go into a :class:`~scalewatch.monitor.History` (its thinning keeps old points
    log-spaced and recent ones dense), so a million-point log makes a page of a few thousand points.

    Example:
        >>> c = ReportCollector()
        >>> c.write(Report(step=10, tokens=100, scalars={"tokens": 100.0, "loss": 3.0}))
        >>> [(p.step, p.loss) for p in c.points]
        [(10, 3.0)]
    """

    name = "report"

    def __init__(self, capacity: int = 2048, max_alerts: int = MAX_ALERTS) -> None:
        self.points: History = History(capacity)
        self.alerts: list[Alert] = []
        self.alerts_left_out = 0
        self.max_alerts = max_alerts
        self.forecast: ForecastBand | None = None
        self.withdrawn_at: int | None = None  # where a non-finite loss withdrew the forecast
        self.pred_final: float | None = None

    def write(self, report: Report) -> None:
        if "tokens" in report.scalars:  # a log point (Monitor.finish() reports only what was still in flight)
            self.points.append(Point.from_report(report))  # type: ignore[arg-type]
        for a in report.alerts:
            if len(self.alerts) < self.max_alerts:
                self.alerts.append(a)
            else:
                self.alerts_left_out += 1
        if "loss_forecast_final" in report.forecasts:
            self.forecast = report.forecasts["loss_forecast_final"]
        elif "loss" in report.scalars and not math.isfinite(report.scalars["loss"]):
            if self.forecast is not None or self.withdrawn_at is None:
                self.withdrawn_at = report.step  # the first non-finite log point since the last forecast
            self.forecast = None  # the curve plugin withdrew it: a forecast from before a NaN is not the run's
        if "loss_pred_final" in report.scalars:
            self.pred_final = report.scalars["loss_pred_final"]


@dataclass
class RunData:
    """Everything the page shows about one replayed run."""

    run: str
    source: str
    points: list[Point]
    alerts: list[Alert]
    state: str
    log_points: int
    tags: Tags
    tags_found: list[str]
    n_params: int | None = None
    forecast: ForecastBand | None = None
    forecast_withdrawn_at: int | None = None  # the step from which a non-finite loss left no forecast
    pred_final: float | None = None
    final_step: int | None = None
    total_steps: int | None = None
    optimal_tokens_per_param: float = 20.0
    optimal_source: str = "Chinchilla's ~20 tokens per parameter"
    laws: str = ""
    alerts_left_out: int = 0
    firing_at_end: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cut_short(path: str | Path) -> list[str]:
    """The event files in ``path`` whose last record is incomplete (a writer killed mid-record, a copy cut short).

    TensorBoard's reader stops at such a record without a word (a live run may still finish it); a
    finished run's report should say that its end is missing. Walks the TFRecord framing only
    (8-byte length, 4-byte CRC, data, 4-byte CRC): one seek per record, no decoding.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "events.out.tfevents.1.x"), "wb").write((8).to_bytes(8, "little") + b"abc")
        >>> cut_short(d)
        ['events.out.tfevents.1.x']
    """
    p = Path(path)
    if not p.is_dir():
        return []
    out = []
    for f in sorted(p.glob("events.out.tfevents.*")):
        size, pos = f.stat().st_size, 0
        with f.open("rb") as fh:
            while pos < size:
                head = fh.read(8)
                if len(head) < 8:
                    break
                pos += 8 + 4 + int.from_bytes(head, "little") + 4
                fh.seek(pos)
        if pos != size:
            out.append(f.name)
    return out


def collect(path: str | Path, kwargs: dict[str, Any]) -> RunData:
    """Replay ``path`` through the watch pipeline (``kwargs``: :class:`Replayer`'s) and collect the page's data.

    Raises :class:`WatchError` with a one-line reason when the log cannot be read.

    Example:
        >>> import tempfile, os
        >>> from scalewatch.config import ScaleWatchConfig
        >>> csv = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> _ = open(csv, "w").write("step,loss\\n" + "".join(f"{s},{3 - s / 100}\\n" for s in range(1, 50)))
        >>> data = collect(csv, dict(config=ScaleWatchConfig(gns="off"), tokens_per_step=1000, n_params=100))
        >>> data.log_points, data.points[-1].tokens, data.state
        (49, 49000, 'ok')
    """
    from scalewatch.config import describe_laws
    from scalewatch.detectors import CHINCHILLA_TOKENS_PER_PARAM

    collector = ReportCollector()
    check_one_run(path, kwargs.get("where", ()), loss_tag=kwargs.get("loss_tag"))  # one run per page (--where)
    source = open_source(path, kwargs.get("where", ()))
    kwargs = with_log_schedule(path, kwargs)  # a curve law without --schedule: the log's own LR, if it has one
    rp = Replayer(**{**kwargs, "sinks": [*kwargs.get("sinks", []), collector]})
    try:
        for step, row in source.poll(final=True):
            rp.feed(step, row, source.tags)
    finally:
        if rp.monitor is not None:
            rp.monitor.finish()
            rp.monitor.close()
    short_files = cut_short(path)
    cut = f"{', '.join(short_files)} ends in an incomplete record (cut short?)" if short_files else ""
    if rp.observed == 0 and cut and not source.tags():
        raise WatchError(f"{path}: {cut}: no complete log point before the cut; nothing to report")
    not_a_log = source.not_a_log() if isinstance(source, TableSource) and rp.observed == 0 else None
    if not_a_log:
        raise WatchError(not_a_log)
    if rp.observed == 0:
        raise WatchError(no_loss_message(path, rp.loss_tag, source.tags()) + (f"; {cut}" if cut else ""))
    monitor = rp.monitor
    assert monitor is not None and rp.rows is not None
    config = rp.config
    points = list(collector.points)
    data = RunData(run=config.run_name, source=str(path), points=points, alerts=collector.alerts,
                   state=worst_state(monitor), log_points=rp.observed, tags=rp.rows.tags, tags_found=source.tags(),
                   n_params=monitor.n_params, forecast=collector.forecast, pred_final=collector.pred_final,
                   forecast_withdrawn_at=collector.withdrawn_at if collector.forecast is None else None,
                   total_steps=rp.total_steps, laws=describe_laws(config.curve_law, config.law),
                   alerts_left_out=collector.alerts_left_out, optimal_tokens_per_param=CHINCHILLA_TOKENS_PER_PARAM,
                   firing_at_end=list(monitor.alerts.firing()))
    if cut:
        data.notes.append(f"{cut}: this page shows the {rp.observed:,} log points before it.")
        print(f"scalewatch report: warning: {cut}; the report shows the {rp.observed:,} log points before it",
              file=sys.stderr)
    curve = next((p for p in monitor.plugins if getattr(p, "name", "") == "curve"), None)
    data.notes.extend(rp.notes)  # e.g. the schedule read from the log's own LR, or why there is none
    if curve is not None and getattr(curve, "schedule", None) is not None:
        data.final_step = len(curve.schedule) - 1
    elif config.curve_law is not None and not rp.notes:
        data.notes.append("A curve law was given but no usable --schedule (a step,lr CSV of the whole run, or a "
                          f"description such as {SPEC_TEMPLATE}): no predicted band and no forecast.")
    last = points[-1]
    if config.law is not None and data.n_params and last.tokens > 0 and last.step > 0:
        # The optimum depends on the compute: take the run's (projected to its planned end when known).
        from scalewatch.laws import optimal_allocation

        end_tokens = last.tokens / last.step * (data.total_steps or last.step)
        n_opt, d_opt = optimal_allocation(config.law, 6.0 * data.n_params * end_tokens)
        data.optimal_tokens_per_param = float(d_opt / n_opt)
        data.optimal_source = f"the given law at this run's compute ({6.0 * data.n_params * end_tokens:.3g} FLOPs)"
    return data


# ------------------------------------------------------------------ SVG charts
@dataclass
class Series:
    """A line (non-finite values break it)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str
    dash: str | None = None
    dots: bool = False


@dataclass
class Band:
    """A shaded band between ``lows`` and ``highs``."""

    label: str
    xs: Sequence[float]
    lows: Sequence[float | None]
    highs: Sequence[float | None]
    color: str


@dataclass
class Marker:
    """One point with an error bar (e.g. the final-loss forecast and its band)."""

    label: str
    x: float
    y: float
    low: float
    high: float
    color: str


@dataclass
class HLine:
    """A horizontal reference line (e.g. the compute-optimal ratio)."""

    label: str
    y: float
    color: str


@dataclass
class VLine:
    """A vertical mark at ``x`` (e.g. where an alert fired)."""

    label: str
    x: float
    color: str


@dataclass
class Chart:
    """What one plot shows; :func:`svg_chart` draws it."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    vlines: list[VLine] = field(default_factory=list)
    log_x: bool = False
    log_y: bool = False
    width: int = 1000
    height: int = 340


def _finite(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def nice_ticks(lo: float, hi: float, log: bool = False, target: int = 6) -> list[float]:
    """Tick values covering ``[lo, hi]``: multiples of 1, 2, 2.5 or 5 x 10^k, or decades on a log axis.

    Example:
        >>> nice_ticks(0.3, 2.9)
        [0.5, 1.0, 1.5, 2.0, 2.5]
        >>> nice_ticks(900, 2e7, log=True), nice_ticks(25, 1100, log=True)
        ([1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0], [50.0, 100.0, 200.0, 500.0, 1000.0])
    """
    if log:
        k0, k1 = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
        decades = [10.0 ** k for k in range(k0, k1 + 1)]
        if len(decades) >= 4:
            return decades
        # a short log axis: 1-2-5 steps, else too few labels to read a value off it
        more = sorted(m * 10.0 ** k for k in range(k0 - 1, k1 + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi)
        return more if len(more) >= 3 else nice_ticks(lo, hi, log=False, target=target)
    span = hi - lo
    if not span > 0:
        return [lo]
    mag = 10.0 ** math.floor(math.log10(span / target))

    def count(step: float) -> int:
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    step = min((m * mag for m in (1, 2, 2.5, 5, 10, 20)), key=lambda st: abs(count(st) - target))
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(k0, k1 + 1)]


def _extent(values: Iterable[float], log: bool, pad: float) -> tuple[float, float]:
    vals = [v for v in values if _finite(v, log)]
    lo, hi = min(vals), max(vals)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi - lo < 1e-12:  # one value: give it some room
        d = abs(hi) * 0.05 or 0.5
        lo, hi = lo - d, hi + d
    d = (hi - lo) * pad
    lo, hi = lo - d, hi + d
    return (10.0 ** lo, 10.0 ** hi) if log else (lo, hi)


def svg_chart(chart: Chart, chart_id: str) -> str:
    """An inline SVG line chart: axes with ticks, bands, lines, error-bar markers, reference lines, a legend.

    Returns "" when nothing in ``chart`` is finite (the caller says so in words instead).

    Example:
        >>> svg = svg_chart(Chart("loss", "step", "loss", [Series("loss", [1, 2, 3], [3.0, 2.5, 2.2], "#000")]), "c1")
        >>> svg.startswith("<svg") and "polyline" in svg and "<title>loss</title>" in svg
        True
        >>> svg_chart(Chart("empty", "x", "y", [Series("y", [1], [float("nan")], "#000")]), "c2")
        ''
    """
    xs = [x for s in chart.series for x, y in zip(s.xs, s.ys, strict=True) if _finite(y, chart.log_y)]
    xs += [x for b in chart.bands for x in b.xs] + [m.x for m in chart.markers]
    ys = [y for s in chart.series for y in s.ys] + [v for b in chart.bands for v in (*b.lows, *b.highs)]
    ys += [v for m in chart.markers for v in (m.low, m.high)] + [h.y for h in chart.hlines]
    if not any(_finite(x, chart.log_x) for x in xs) or not any(_finite(y, chart.log_y) for y in ys):
        return ""
    x0, x1 = _extent(xs, chart.log_x, 0.02)
    y0, y1 = _extent(ys, chart.log_y, 0.06)
    W, H = chart.width, chart.height
    left, right, bottom = 78, 24, 48
    legend, legend_rows = _legend(chart, left, 22, W - right)
    top = 20 + 20 * legend_rows
    H += 20 * (legend_rows - 1)  # the plot keeps its height under a legend of several rows
    pw, ph = W - left - right, H - top - bottom

    def frac(v: float, lo: float, hi: float, log: bool) -> float:
        return (math.log10(v / lo) / math.log10(hi / lo)) if log else (v - lo) / (hi - lo)

    def tx(x: float) -> float:
        return left + frac(x, x0, x1, chart.log_x) * pw

    def ty(y: float) -> float:
        return top + (1 - frac(y, y0, y1, chart.log_y)) * ph

    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="{esc(chart.title)}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{esc(chart.title)}</title>",
           f'<defs><clipPath id="{chart_id}-clip"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/>'
           "</clipPath></defs>",
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>']
    for t in nice_ticks(y0, y1, chart.log_y):
        y = ty(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">{esc(short(t))}</text>')
    for t in nice_ticks(x0, x1, chart.log_x, target=8):
        x = tx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 18}" class="tick" text-anchor="middle">{esc(short(t))}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{H - 8}" class="axis" text-anchor="middle">'
               f"{esc(chart.x_label + (' (log scale)' if chart.log_x else ''))}</text>")
    out.append(f'<text transform="translate(16 {top + ph / 2:.1f}) rotate(-90)" class="axis" text-anchor="middle">'
               f"{esc(chart.y_label + (' (log scale)' if chart.log_y else ''))}</text>")
    out.append(f'<g clip-path="url(#{chart_id}-clip)">')
    for b in chart.bands:
        runs3: list[list[tuple[float, float, float]]] = [[]]
        for x, lo, hi in zip(b.xs, b.lows, b.highs, strict=True):
            if _finite(x, chart.log_x) and _finite(lo, chart.log_y) and _finite(hi, chart.log_y):
                runs3[-1].append((x, lo, hi))  # type: ignore[arg-type]
            elif runs3[-1]:
                runs3.append([])  # where the prediction stops (e.g. past the schedule), so does the band
        for seg in (r for r in runs3 if len(r) > 1):
            pts = [f"{tx(x):.1f},{ty(hi):.1f}" for x, _, hi in seg] + \
                  [f"{tx(x):.1f},{ty(lo):.1f}" for x, lo, _ in reversed(seg)]
            out.append(f'<polygon points="{" ".join(pts)}" fill="{b.color}" fill-opacity="0.18" stroke="none"/>')
    for h in chart.hlines:
        y = ty(h.y)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{h.color}" '
                   'stroke-width="2" stroke-dasharray="8 5"/>')
    for v in chart.vlines:
        if _finite(v.x, chart.log_x) and x0 <= v.x <= x1:
            x = tx(v.x)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="{v.color}" '
                       f'stroke-width="1.5" stroke-dasharray="3 3"><title>{esc(v.label)}</title></line>')
    for s in chart.series:
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(s.xs, s.ys, strict=True):
            if _finite(x, chart.log_x) and _finite(y, chart.log_y):
                runs[-1].append((tx(x), ty(y)))  # type: ignore[arg-type]
            elif runs[-1]:
                runs.append([])  # a NaN breaks the line rather than bridging the gap
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for run in runs:
            if len(run) > 1:
                out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in run)}" fill="none" '
                           f'stroke="{s.color}" stroke-width="2"{dash} stroke-linejoin="round"/>')
            if s.dots or len(run) == 1:
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{s.color}"/>' for x, y in run]
    for m in chart.markers:
        x, y, lo, hi = tx(m.x), ty(m.y), ty(m.low), ty(m.high)
        out.append(f'<g stroke="{m.color}" stroke-width="2">'
                   f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{lo:.1f}" y2="{hi:.1f}"/>'
                   f'<line x1="{x - 7:.1f}" x2="{x + 7:.1f}" y1="{lo:.1f}" y2="{lo:.1f}"/>'
                   f'<line x1="{x - 7:.1f}" x2="{x + 7:.1f}" y1="{hi:.1f}" y2="{hi:.1f}"/></g>'
                   f'<path d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y:.1f} L{x:.1f},{y + 6:.1f} L{x - 6:.1f},{y:.1f} Z" '
                   f'fill="{m.color}"/>')
    out.append("</g>")
    out.append(legend)
    out.append("</svg>")
    return "".join(out)


def _vlegend(label: str) -> str:
    return label.split(":")[0]  # one legend entry per colour: "critical alert", not every alert's text


def _legend(chart: Chart, x: float, y: float, max_x: float) -> tuple[str, int]:
    """The legend from (x, y), wrapped into rows before ``max_x``; returns the SVG and the number of rows."""
    parts, x_start, rows = [], x, 1
    entries = [(s.label, s.color, s.dash, "line") for s in chart.series] + \
              [(b.label, b.color, None, "band") for b in chart.bands] + \
              [(m.label, m.color, None, "marker") for m in chart.markers] + \
              [(h.label, h.color, "8 5", "line") for h in chart.hlines] + \
              list({v.color: (_vlegend(v.label), v.color, "3 3", "line") for v in chart.vlines}.values())
    for label, color, dash, kind in entries:
        width = 28 + 6.6 * len(label)  # no text metrics in a static page: ~6.6 px per character at 12 px
        if x > x_start and x + width > max_x:
            x, y, rows = x_start, y + 20, rows + 1
        if kind == "band":
            parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="22" height="12" fill="{color}" fill-opacity="0.25"/>')
        elif kind == "marker":
            parts.append(f'<path d="M{x + 11:.1f},{y - 9} L{x + 17:.1f},{y - 3} L{x + 11:.1f},{y + 3} '
                         f'L{x + 5:.1f},{y - 3} Z" fill="{color}"/>')
        else:
            d = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(f'<line x1="{x:.1f}" x2="{x + 22:.1f}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" '
                         f'stroke-width="2.5"{d}/>')
        parts.append(f'<text x="{x + 28:.1f}" y="{y + 1}" class="legend">{esc(label)}</text>')
        x += width + 20
    return "".join(parts), rows


def svg_timeline(alerts: Sequence[Alert], first_step: int, last_step: int, width: int = 1000) -> str:
    """The alerts as a timeline: one row per kind, a bar from firing to resolved (to the end if still firing).

    Example:
        >>> a = [Alert("spike", "warning", "firing", 160, 0, "x"), Alert("spike", "warning", "resolved", 180, 0, "y")]
        >>> svg = svg_timeline(a, 10, 300)
        >>> svg.count("<rect class=\\"span\\""), ">spike<" in svg
        (1, True)
    """
    kinds = list(dict.fromkeys(f"{a.kind}{' / ' + a.key if a.key else ''}" for a in alerts))
    left, right, top, row_h = 170, 24, 16, 30
    pw = width - left - right
    H = top + row_h * len(kinds) + 44
    span = max(last_step - first_step, 1)

    def tx(step: float) -> float:
        return left + (min(max(step, first_step), last_step) - first_step) / span * pw

    out = [f'<svg class="chart" viewBox="0 0 {width} {H}" width="{width}" height="{H}" role="img" '
           f'aria-label="alert timeline" xmlns="http://www.w3.org/2000/svg"><title>alert timeline</title>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{row_h * len(kinds)}" class="plot"/>']
    for t in nice_ticks(first_step, last_step, target=8):
        x = tx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + row_h * len(kinds)}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{top + row_h * len(kinds) + 18}" class="tick" text-anchor="middle">'
                   f"{esc(short(t))}</text>")
    out.append(f'<text x="{left + pw / 2:.1f}" y="{H - 6}" class="axis" text-anchor="middle">step</text>')
    for i, name in enumerate(kinds):
        y = top + row_h * i
        out.append(f'<text x="{left - 10}" y="{y + row_h / 2 + 4:.1f}" class="tick" text-anchor="end">'
                   f"{esc(name)}</text>")
        mine = [a for a in alerts if f"{a.kind}{' / ' + a.key if a.key else ''}" == name]
        open_at: Alert | None = None
        dots = []
        for a in [*mine, None]:
            if open_at is not None and (a is None or a.state == "resolved" or a.severity != open_at.severity):
                end = a.step if a is not None else last_step
                x0, x1 = tx(open_at.step), tx(end)
                still = " (still firing at the end)" if a is None else ""
                tip = f"{open_at.severity} {open_at.kind}: steps {open_at.step:,}–{end:,}{still}"
                out.append(f'<rect class="span" x="{x0:.1f}" y="{y + 7}" width="{max(x1 - x0, 4):.1f}" '
                           f'height="{row_h - 14}" rx="3" fill="{COLORS[open_at.severity]}">'
                           f"<title>{esc(tip)}</title></rect>")
                open_at = None
            if a is not None and a.state == "firing":
                open_at = a
                dots.append(f'<circle cx="{tx(a.step):.1f}" cy="{y + row_h / 2:.1f}" r="5" '
                            f'fill="{COLORS[a.severity]}" stroke="#fff" stroke-width="1.5"/>')
        out += dots  # on top of the bars
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------ the page
def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str, caption: str = "",
          row_classes: Sequence[str] | None = None) -> str:
    r"""An HTML table (numbers right-aligned, every cell escaped) in a scrolling box.

    Example:
        >>> print(table(["step", "loss"], [[10, 3.25], [20, "<b>"]], "t").replace("<tr>", "\n<tr>"))
        <div class="scroll"><table id="t"><thead>
        <tr><th class="n">step</th><th class="n">loss</th></tr></thead><tbody>
        <tr><td class="n">10</td><td class="n">3.25</td></tr>
        <tr><td class="n">20</td><td>&lt;b&gt;</td></tr></tbody></table></div>
    """
    rows = list(rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    numeric = [not isinstance(c, str) for c in rows[0]] if rows else [False] * len(headers)
    head = "".join(f'<th class="n">{esc(h)}</th>' if n else f"<th>{esc(h)}</th>"
                   for h, n in zip(headers, numeric, strict=True))
    classes = iter(row_classes or ())
    body = "".join((f'<tr class="{esc(next(classes, ""))}">' if row_classes else "<tr>")
                   + "".join(f"<td>{esc(c)}</td>" if isinstance(c, str) else f'<td class="n">{fmt(c)}</td>'
                             for c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _none_line(text: str) -> str:
    return f'<p class="none">{esc(text)}</p>'


def _loss_section(d: RunData) -> str:
    pts = [p for p in d.points if math.isfinite(p.loss)]
    if not pts:
        return _none_line("No finite loss in this log: nothing to plot.")
    use_tokens = any(p.tokens > 0 for p in pts)
    xs = [float(p.tokens if use_tokens else p.step) for p in d.points]
    x_label = "tokens" if use_tokens else "step (no token count in the log: give --tokens-per-step)"
    chart = Chart("loss against " + ("tokens" if use_tokens else "step"), x_label, "training loss")
    has_pred = any(p.loss_pred is not None for p in d.points)
    if has_pred:
        chart.bands.append(Band("90% band of the prediction", xs, [p.loss_pred_low for p in d.points],
                                [p.loss_pred_high for p in d.points], COLORS["pred"]))
        chart.series.append(Series("predicted (curve law)", xs, [p.loss_pred for p in d.points], COLORS["pred"],
                                   dash="7 4"))
    chart.series.insert(0, Series("loss", xs, [p.loss for p in d.points], COLORS["loss"]))
    chart.vlines = [VLine(f"{a.severity} alert: {a.kind} at step {a.step:,}", float(a.tokens if use_tokens else a.step),
                          COLORS[a.severity]) for a in d.alerts if a.state == "firing"]
    notes = []
    fc = d.forecast
    if fc is not None and d.final_step is not None:
        last = d.points[-1]
        per_step = last.tokens / last.step if use_tokens and last.step > 0 else 1.0
        x_end = d.final_step * per_step if use_tokens else float(d.final_step)
        chart.markers.append(Marker(f"final-loss forecast (step {d.final_step:,})", x_end, fc.value, fc.low, fc.high,
                                    COLORS["forecast"]))
        notes.append(f"Final-loss forecast at step {d.final_step:,}: <b>{fmt(fc.value, 4)}</b> "
                     f"({int(round(fc.level * 100))}% band {fmt(fc.low, 4)}–{fmt(fc.high, 4)}), from the run up to "
                     f"step {fmt(fc.at_step)}" + (f"; the pilots alone predict {fmt(d.pred_final, 4)}."
                                                  if d.pred_final is not None else "."))
    elif d.forecast_withdrawn_at is not None:
        notes.append(esc(f"No final-loss forecast: the loss is non-finite from step {d.forecast_withdrawn_at:,} on "
                         "(a forecast from the run before it would not be this run's)."))
    elif not has_pred:
        notes.append(esc("No predicted band or forecast: give --curve-law (and --schedule, the run's step,lr CSV or "
                         f"a description such as {SPEC_TEMPLATE}, when the log has no LR), with --n-params if the "
                         "law was fitted on several sizes."))
    xmin = min(x for x in xs if x > 0) if any(x > 0 for x in xs) else 0.0
    chart.log_x = xmin > 0 and max(xs) / xmin > 50  # a long run: its early points would be squashed otherwise
    svg = svg_chart(chart, "loss")
    headers = ["step"] + (["tokens"] if use_tokens else []) + ["loss"] + (
        ["predicted", "band low", "band high", "residual (band units)"] if has_pred else [])
    rows = [[p.step] + ([p.tokens] if use_tokens else []) + [p.loss] + (
        [p.loss_pred, p.loss_pred_low, p.loss_pred_high, p.loss_residual] if has_pred else []) for p in d.points]
    return (svg + "".join(f'<p class="note">{n}</p>' for n in notes)
            + table(headers, rows, "loss-table", f"{len(rows):,} log points" + _thinned(d)))


def _thinned(d: RunData) -> str:
    return f" (of {d.log_points:,} read: older points thinned)" if d.log_points > len(d.points) else ""


def _ratio_section(d: RunData) -> str:
    if not d.n_params:
        return _none_line("No N in this log: give --n-params to compare the tokens per parameter with the "
                          "compute-optimal ratio.")
    pts = [p for p in d.points if p.tokens_per_param is not None and p.tokens > 0]
    if not pts:
        return _none_line("No token count in this log: give --tokens-per-step (or --tokens-tag) for the tokens "
                          "per parameter.")
    opt = d.optimal_tokens_per_param
    chart = Chart("tokens per parameter", "tokens", "tokens per parameter (D/N)",
                  [Series("tokens per parameter", [p.tokens for p in pts], [p.tokens_per_param for p in pts],
                          COLORS["ratio"])], hlines=[HLine(f"compute-optimal ≈ {opt:.3g}", opt, COLORS["optimal"])])
    last = pts[-1]
    lines = [f"N = {fmt(d.n_params)}; at step {last.step:,}: {fmt(last.tokens_per_param, 3)} tokens per parameter; "
             f"compute-optimal ≈ {opt:.3g} ({d.optimal_source})."]
    if d.total_steps and last.step > 0:
        end_tokens = last.tokens / last.step * d.total_steps
        end_ratio = end_tokens / d.n_params
        chart.markers.append(Marker(f"projected at step {d.total_steps:,}", end_tokens, end_ratio, end_ratio,
                                    end_ratio, COLORS["forecast"]))
        verdict = ("undertrained: a smaller model would reach a lower loss for this compute" if end_ratio < opt / 4
                   else "overtrained (fine if it buys cheaper inference)" if end_ratio > opt * 4 else
                   "within a factor 4 of the optimum")
        lines.append(f"Projected at the planned end (step {d.total_steps:,}): {end_ratio:.3g} tokens per parameter, "
                     f"{verdict}.")
    else:
        lines.append("Give --total-steps to project the ratio to the end of the run.")
    rows = [[p.step, p.tokens, p.tokens_per_param] for p in pts]
    return (svg_chart(chart, "ratio") + "".join(f'<p class="note">{esc(t)}</p>' for t in lines)
            + table(["step", "tokens", "tokens per parameter"], rows, "ratio-table"))


def _noise_section(d: RunData) -> str:
    pts = [p for p in d.points if p.b_crit is not None and math.isfinite(p.b_crit)]
    if not pts:
        return _none_line("No noise scale in this log: ScaleWatch logs it (scalewatch/gns/g2 and gns/trace) when it "
                          "can measure it, e.g. with gradient accumulation, DDP or gns=\"per_example\".")
    chart = Chart("critical batch against the batch", "step", "tokens per optimizer step",
                  [Series("critical batch B_crit (noise scale)", [p.step for p in pts], [p.b_crit for p in pts],
                          COLORS["b_crit"]),
                   Series("batch", [p.step for p in pts], [p.batch_tokens for p in pts], COLORS["batch"], dash="7 4")],
                  log_y=True)
    last = pts[-1]
    note = (f"At step {last.step:,}: batch {fmt(last.batch_tokens, 4)} tokens, "
            f"B_crit ≈ {fmt(last.b_crit, 4)} tokens: "
            f"this batch costs {fmt(last.compute_factor, 3)}× the minimum compute and {fmt(last.steps_factor, 3)}× "
            "the minimum number of steps (McCandlish et al. 2018).")
    rows = [[p.step, p.batch_tokens, p.b_crit, p.compute_factor, p.steps_factor] for p in pts]
    return (svg_chart(chart, "gns") + f'<p class="note">{esc(note)}</p>'
            + table(["step", "batch (tokens)", "B_crit (tokens)", "× min compute", "× min steps"], rows, "gns-table"))


def _alert_section(d: RunData) -> str:
    if not d.alerts:
        return _none_line(f"No alerts: every detector stayed quiet over the {d.log_points:,} log points.")
    svg = svg_timeline(d.alerts, d.points[0].step, d.points[-1].step)
    rows = [[a.step, a.tokens, a.state, a.severity, a.kind + (f" / {a.key}" if a.key else ""), a.message]
            for a in d.alerts]
    left_out = (f'<p class="note">{d.alerts_left_out:,} later alert changes left out (the first {len(d.alerts):,} '
                "are shown).</p>") if d.alerts_left_out else ""
    return svg + left_out + table(["step", "tokens", "state", "severity", "kind", "message"], rows, "alert-table",
                                  row_classes=[f"sev-{a.severity} {a.state}" for a in d.alerts])


def _summary(d: RunData) -> str:
    from scalewatch.data import param_label  # N as 1.3B (1,298,880,000), not 1.3G

    last = d.points[-1]
    fired = [a for a in d.alerts if a.state == "firing"]
    worst = max(fired, key=lambda a: SEVERITY_ORDER.index(a.severity), default=None)
    cards = [("end state", d.state.upper(), f"state-{d.state}"),
             ("worst alert", worst.severity.upper() if worst else "NONE", f"state-{worst.severity if worst else 'ok'}"),
             ("log points", fmt(d.log_points), ""), ("last step", fmt(last.step), ""),
             ("tokens", short(last.tokens) if last.tokens else "–", ""),
             # the card holds "1.3B"; the exact count is the card's tooltip (it does not fit beside it)
             ("N (parameters)", param_label(d.n_params).split(" (")[0] if d.n_params else "–", ""),
             ("tokens / parameter", fmt(last.tokens_per_param, 3) if last.tokens else "–", ""),
             ("last loss", fmt(last.loss, 4), "")]
    exact = {"N (parameters)": f"{d.n_params:,.0f} parameters" if d.n_params else ""}
    html_cards = '<div class="cards">' + "".join(
        f'<div class="card {cls}"' + (f' title="{esc(exact[k])}"' if exact.get(k) else "")
        + f'><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>'
        for k, v, cls in cards) + "</div>"
    if not fired:
        return html_cards + '<p class="note">No alert fired.</p>'
    # Still firing: only the latest firing alert of each (kind, key) at the end, listed first (an earlier one
    # of the same kind was resolved in between, as the timeline and the table show).
    firing_now = set(d.firing_at_end)
    latest = {(a.kind, a.key): i for i, a in enumerate(d.alerts) if a.state == "firing"}
    still = {i for slot, i in latest.items() if slot in firing_now}
    order = [i for i, a in enumerate(d.alerts) if i in still] + \
            [i for i, a in enumerate(d.alerts) if a.state == "firing" and i not in still]
    items = ", ".join(f'<span class="chip sev-{esc(d.alerts[i].severity)}">{esc(d.alerts[i].kind)}</span> '
                      f"{esc(d.alerts[i].severity)} at step {d.alerts[i].step:,}"
                      + (" (still firing)" if i in still else "") for i in order[:12])
    more = f" and {len(fired) - 12} more" if len(fired) > 12 else ""
    return html_cards + (f'<p class="note">{len(fired)} alert(s) fired: {items}{more}. '
                         '<a href="#alerts">Timeline</a></p>')


def _about(d: RunData) -> str:
    from scalewatch import __version__

    rows = [["source", d.source], ["loss tag", d.tags.loss or "–"], ["learning-rate tag", d.tags.lr or "–"],
            ["token-count tag", d.tags.tokens or "– (tokens = step × --tokens-per-step, or none)"],
            ["tags / columns found", ", ".join(d.tags_found[:40]) + (" …" if len(d.tags_found) > 40 else "")],
            ["laws", d.laws], ["made by", f"scalewatch {__version__} report, "
                               f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"]]
    return ('<table class="about">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
            + "</table>")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;
  background:#f4f6f9;margin:0}
main{max-width:1060px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:4px 0 2px} h2{font-size:17px;margin:0 0 8px}
.sub{color:#5a6375;margin:0 0 14px;word-break:break-all}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:14px 18px;margin:14px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(112px,1fr));gap:8px;margin:10px 0}
.card{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:8px 12px}
.card .k{font-size:11px;color:#5a6375;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:18px;font-weight:600}
.state-ok .v,.state-info .v{color:#2a8a3e} .state-warning .v{color:#b07d00} .state-critical .v{color:#c0392b}
.state-critical{border-color:#c0392b} .state-warning{border-color:#e0a000}
svg.chart{width:100%;height:auto;display:block}
svg .plot{fill:#fbfcfd;stroke:#c9d0db} svg .grid{stroke:#e6eaf0} svg .tick{font-size:12px;fill:#5a6375}
svg .axis{font-size:13px;fill:#1d2330} svg .legend{font-size:12px;fill:#1d2330}
.note{margin:6px 0} .none{color:#5a6375;font-style:italic;margin:4px 0}
.scroll{max-height:230px;overflow:auto;border:1px solid #e3e7ee;border-radius:6px;margin-top:8px}
table{border-collapse:collapse;min-width:50%;font-size:12.5px}
#alert-table{width:100%}
caption{caption-side:bottom;text-align:left;color:#5a6375;padding:4px 8px;font-size:12px}
th,td{padding:3px 10px;border-bottom:1px solid #eef1f5;text-align:left;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.chip{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;font-weight:600}
.chip.sev-info{background:#3b7dd8} .chip.sev-warning{background:#c99000} .chip.sev-critical{background:#c0392b}
tr.sev-critical.firing td:first-child{box-shadow:inset 4px 0 #c0392b}
tr.sev-warning.firing td:first-child{box-shadow:inset 4px 0 #e0a000}
tr.sev-info.firing td:first-child{box-shadow:inset 4px 0 #3b7dd8}
thead th{position:sticky;top:0;background:#eef2f7}
#alert-table td:last-child,#alert-table th:last-child{text-align:left;white-space:normal}
table.about{width:100%} table.about th{text-align:left;width:170px;color:#5a6375;font-weight:500}
table.about td{text-align:left;white-space:normal;word-break:break-word}
tr:nth-child(even) td{background:#fafbfc}
"""


def render_html(d: RunData) -> str:
    """The page: a summary, then one section per plot (each with its table), then where the numbers came from.

    Each section is drawn on its own: one that fails says so in its place, and the rest of the page is kept.

    Example:
        >>> d = RunData(run="<r>", source="x.csv", points=[Point(1, 10, 3.0), Point(2, 20, 2.9)], alerts=[],
        ...             state="ok", log_points=2, tags=Tags(loss="loss"), tags_found=["step", "loss"])
        >>> page = render_html(d)
        >>> page.startswith("<!doctype html>") and "&lt;r&gt;" in page and "<r>" not in page
        True
    """
    has_tokens = any(p.tokens for p in d.points)
    sections = [("Loss against tokens" if has_tokens else "Loss against steps", _loss_section),
                ("Tokens per parameter", _ratio_section),
                ("Noise scale against the batch size", _noise_section), ("Alerts", _alert_section)]
    body = []
    for title, make in sections:
        try:
            inner = make(d)
        except Exception as exc:  # noqa: BLE001 - one broken section must not cost the page
            inner = _none_line(f"This section could not be drawn ({type(exc).__name__}: {exc}).")
        anchor = title.split()[0].lower()
        body.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{inner}</section>')
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in d.notes)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>scalewatch report: {esc(d.run)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>scalewatch report: {esc(d.run)}</h1><p class=\"sub\">{esc(d.source)}</p>{_summary(d)}{notes}"
            + "".join(body) + f"<section><h2>About these numbers</h2>{_about(d)}</section></main></body></html>\n")


def write_report(path: str | Path, out: str | Path, kwargs: dict[str, Any]) -> RunData:
    """Replay ``path``, render the page and write it to ``out`` (whole or not at all); return the data."""
    data = collect(path, kwargs)
    page = render_html(data)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees half a page
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WatchError(f"cannot write {out} ({exc.strerror}); choose another --out") from None
    return data


# ------------------------------------------------------------------ command line
def add_parser(sub: Any) -> None:
    """The ``report`` subcommand's arguments (the run-reading flags are ``watch``'s)."""
    r = sub.add_parser("report", help="one self-contained HTML page for a run: loss vs prediction, tokens per "
                                      "parameter, noise scale, alerts", description=__doc__)
    r.add_argument("path", metavar="RUN", help="a TensorBoard event directory, or a CSV/JSONL file")
    r.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    add_run_arguments(r)
    r.add_argument("--json", action="store_true", help="print a JSON summary instead of a line")
    r.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    """``scalewatch report``: 0 when the page is written (whatever the run's health), 3 on bad input."""
    kwargs = replayer_kwargs(args, args.path, [])
    kwargs["say"] = stderr_once("report")
    try:
        data = write_report(args.path, args.out, kwargs)
    except WatchError:
        raise
    except Exception as exc:  # a failure of report itself: one line and exit 3, never a traceback
        raise WatchError(f"could not make the report: {type(exc).__name__}: {exc}") from None
    summary = {"out": str(args.out), "run": data.run, "log_points": data.log_points, "state": data.state,
               "alerts": len(data.alerts), "forecast": data.forecast.value if data.forecast else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"scalewatch report: {args.out} written ({data.log_points:,} log points, {len(data.alerts)} alert "
              f"changes, state at the end: {data.state})", file=sys.stderr)
    return 0
