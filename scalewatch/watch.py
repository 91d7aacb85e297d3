"""``scalewatch watch``: replay a finished run, or follow a live one, through the same Monitor and detectors.

Inputs are streamed, so memory stays flat on a long log: TensorBoard event directories
(ScaleWatch's own, or any trainer's: the loss tag is found among common names or given), or CSV /
JSON-lines files with ``step,loss[,lr,tokens]``. The alerts go to the same sinks as the callback's
(console, JSON lines, webhook) and to a TensorBoard run of its own, written beside the watched one.
The exit status is the worst alert that fired during the replay, even one resolved since (a NaN the
run recovered from still pages): 0 healthy (or info only), 1 warning, 2 critical, 3 bad input.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalewatch.alerts import HEALTH_LEVEL
from scalewatch.config import ScaleWatchConfig, ScaleWatchConfigError, build_monitor, size_warning
from scalewatch.curves import SPEC_TEMPLATE, no_event_files
from scalewatch.data import no_rows_left, parse_where, pick_column
from scalewatch.monitor import Monitor, Observation, Report
from scalewatch.tensorboard import LOSS_TAGS, LR_TAGS, EventSource, RowConverter, find_tag, no_loss_message, tag

_CHUNK = 1 << 20  # bytes read at a time from a CSV/JSONL log

#: Exit status by the worst alert that fired during the replay.
EXIT_CODES = {"ok": 0, "info": 0, "warning": 1, "critical": 2}


class WatchError(ValueError):
    """An input ``watch`` cannot read, with the reason and the fix."""


# ------------------------------------------------------------------ sources: rows of (step, {name: value})
class TableSource:
    """A CSV (header row) or JSON-lines file, read incrementally; a half-written last line waits for more."""

    def __init__(self, path: Path, where: Sequence[str] = ()) -> None:
        self.path = path
        self.filters = parse_where(where, error=WatchError)  # --where COL=VALUE: the rows of one run
        self._combos: dict[tuple[str, ...], None] = {}  # the filter columns' values seen (for no_rows_left)
        self.last_cells: dict[str, Any] = {}  # the cells of the row poll() yielded last (before conversion)
        self._offset = 0
        self._header: list[str] | None = None
        self._delimiter = ","
        self._seen: set[str] = set()
        self.jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
        self.rows = 0  # lines that were log points
        self.skipped = 0  # lines that are not JSON (a JSON-lines log)
        self._skipped_said = 0
        self.quiet = False  # True: say nothing on stderr (a first pass that reads the LR schedule)

    def poll(self, final: bool = False) -> Iterator[tuple[int, dict[str, float]]]:
        """The complete lines appended since the last poll, read 1 MiB at a time (memory stays flat)."""
        try:
            f = self.path.open("rb")
        except OSError as exc:
            raise WatchError(f"{self.path}: cannot read ({exc.strerror})") from None
        with f:
            if self.path.stat().st_size < self._offset:  # rewritten (e.g. a CSV logger adding a column)
                print(f"scalewatch watch: {self.path.name} was rewritten; reading it again", file=sys.stderr)
                self._offset, self._header = 0, None
            start, read, buf = self._offset, 0, b""
            f.seek(start)
            while True:
                data = f.read(_CHUNK)
                read += len(data)
                at_end = len(data) < _CHUNK
                lines = (buf + data).split(b"\n")
                buf = lines.pop()  # after the last newline: a line still being written (or empty)
                if final and at_end and buf.strip():
                    lines.append(buf)
                    buf = b""
                self._offset = start + read - len(buf)  # a partial line is read again next time
                for raw in lines:
                    text = raw.decode("utf-8", errors="replace").strip()
                    if text:
                        row = self._parse(text)
                        if row is not None:
                            yield row
                if at_end:
                    self._say_skipped()
                    return

    def _say_skipped(self) -> None:
        """Lines that are not JSON, said once per poll with their count (none said before a first log point:
        a file with no log point at all gets the error of :meth:`not_a_log` instead)."""
        new = self.skipped - self._skipped_said
        if new and self.rows and not self.quiet:
            print(f"scalewatch watch: {self.path.name}: skipped {new:,} line{'s' if new > 1 else ''} that "
                  f"{'are' if new > 1 else 'is'} not JSON", file=sys.stderr)
            self._skipped_said = self.skipped

    def not_a_log(self) -> str | None:
        """Why a file with no log point at all is not a JSON-lines log, or None (e.g. a log without a loss)."""
        if not self.jsonl or self.rows:
            return None
        try:
            if self.path.stat().st_size < 64 << 20:
                json.loads(self.path.read_text(encoding="utf-8", errors="replace"))
                return (f"{self.path}: {self.path.name} is one JSON document, not a JSONL log of scalars (one "
                        "JSON object per line with a step): give a TensorBoard directory, a CSV or a JSONL log")
        except (OSError, ValueError):
            pass
        if self.skipped:
            return (f"{self.path}: none of its {self.skipped:,} lines is a JSON object with a step: give a "
                    "TensorBoard directory, a CSV or a JSONL log (one JSON object per line with a step)")
        return None

    def _parse(self, text: str) -> tuple[int, dict[str, float]] | None:
        if self.jsonl:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                self.skipped += 1  # said once with the count, at the end of the poll
                return None
            cells = {str(k): v for k, v in doc.items()} if isinstance(doc, Mapping) else {}
        else:
            if self._header is None:
                from scalewatch.data import table_delimiter

                self._delimiter = table_delimiter(text)  # a TSV, or a semicolon-separated export, is read too
            values = next(csv.reader([text], delimiter=self._delimiter))
            if self._header is None:
                self._header = [values[0].lstrip("\ufeff"), *values[1:]] if values else values  # a byte-order mark
                missing = [k for k, _ in self.filters if k not in self._header]
                if missing:
                    raise WatchError(f"{self.path}: --where column {missing[0]!r} not found; columns are "
                                     f"{', '.join(self._header)}")
                return None
            cells = dict(zip(self._header, values, strict=False))
        if self.filters:
            combo = tuple(str(cells.get(k)) for k, _ in self.filters)
            if len(self._combos) < 1000 and any(k in cells for k, _ in self.filters):  # not a metadata line
                self._combos.setdefault(combo, None)
            if any(c != v for c, (_, v) in zip(combo, self.filters, strict=True)):
                return None  # another run's row (--where)
        self._seen.update(cells)
        key = pick_column(list(cells), ("step", "_step", "global_step", "iteration"))
        if key is None:
            if self.jsonl:
                return None  # a metadata line (e.g. the run's config): not a log point
            raise WatchError(f"{self.path}: no step column (columns: {', '.join(cells)}); name it 'step'")
        numbers = {}
        for k, v in cells.items():
            try:
                numbers[k] = float(v)
            except (TypeError, ValueError):
                continue
        if key not in numbers or not math.isfinite(numbers[key]):
            return None
        self.rows += 1
        self.last_cells = cells
        return int(numbers.pop(key)), numbers

    def no_rows_left(self) -> str | None:
        """Why ``--where`` kept no row (:func:`scalewatch.data.no_rows_left`), or None when it kept some or
        there is none."""
        if not self.filters or self.rows or not self._combos:
            return None
        seen = [dict(zip([k for k, _ in self.filters], combo, strict=True)) for combo in self._combos]
        return f"{self.path}: {no_rows_left(seen, self.filters)}"

    def tags(self) -> list[str]:
        return list(self._header or sorted(self._seen))


def open_source(path: str | Path, where: Sequence[str] = ()) -> EventSource | TableSource:
    """The log at ``path``: a TensorBoard event directory, or a CSV / JSON-lines table (``where``: its rows
    of one run, ``COL=VALUE`` each; a TensorBoard directory holds one run)."""
    p = Path(path)
    if p.is_dir():
        if where:
            raise WatchError(f"{p}: --where selects the rows of one run in a CSV/JSONL table; a TensorBoard "
                             "directory holds one run (give the run's own directory)")
        missing = no_event_files(p)
        if missing:
            raise WatchError(missing)
        return EventSource(p)
    if p.is_file():
        return TableSource(p, where)
    raise WatchError(f"{p}: no such file or directory")


def check_one_run(path: str | Path, where: Sequence[str] = (), final: bool = True, loss_tag: str | None = None
                  ) -> None:
    """Raise :class:`WatchError` when a CSV/JSONL table holds several runs, or ``where`` keeps none of its rows.

    A first pass over the table (the lines complete now; memory stays small: each column's values are kept
    as small codes only while it has at most 64 distinct values, as a run's name does). Only the rows with
    the loss the replay reads count (``loss_tag``, else the first common name, as :class:`Replayer` picks it):
    a Lightning CSVLogger file puts ``train_loss`` at step 9 on a row after ScaleWatch's step-10 row, steps
    that go back but are never replayed. Steps that go backwards are several runs where a column (or a pair,
    e.g. ``model`` and ``seed``) with a value in every row splits the rows into runs whose steps each increase
    (:func:`scalewatch.curves.find_run_split`); the error names the column(s) and ``--where``. Steps that go
    back with no such column are one run resumed from a checkpoint (a step logged again after the restart):
    replayed as they come, as before. A TensorBoard directory is one run.
    """
    from array import array

    from scalewatch.curves import _MAX_RUN_VALUES, describe_split, find_run_split

    source = open_source(path, where)
    if not isinstance(source, TableSource):
        return
    source.quiet = True
    steps = array("d")
    codes: dict[str, array] = {}
    values: dict[str, dict[str, int]] = {}
    dropped: set[str] = set()
    back, prev = None, None
    loss: str | None = None
    for step, row in source.poll(final=final):
        loss = loss or find_tag(sorted({*row, *source.tags()}), LOSS_TAGS, loss_tag)
        if loss is not None and loss not in row:
            continue  # a row of other metrics: the replay skips it
        n = len(steps)
        for k, v in source.last_cells.items():
            if k in dropped:
                continue
            if v is None or not str(v).strip():  # a blank cell: a metric, never the name of a run
                dropped.add(k)
                codes.pop(k, None)
                values.pop(k, None)
                continue
            seen = values.setdefault(k, {})
            code = seen.setdefault(str(v), len(seen))
            if len(seen) > _MAX_RUN_VALUES:
                dropped.add(k)
                codes.pop(k, None)
                values.pop(k, None)
                continue
            if k not in codes and n:  # a key first seen here: missing from the rows before, no run's name
                dropped.add(k)
                values.pop(k, None)
                continue
            codes.setdefault(k, array("H")).append(code)
        for k in [k for k, col in codes.items() if len(col) == n]:  # a key this row does not have (JSON lines)
            dropped.add(k)
            codes.pop(k)
            values.pop(k, None)
        if back is None and prev is not None and step <= prev:
            back = (prev, step)
        prev = step
        steps.append(step)
    if source.rows == 0 and source.no_rows_left():
        raise WatchError(source.no_rows_left())
    if back is None:
        return
    found = find_run_split(steps, codes)
    if found is None:
        return  # one run resumed (or a log out of order): replayed as it comes
    cols, k = found
    names = {c: {code: v for v, code in values[c].items()} for c in cols}
    first = " ".join(f"--where {c}={names[c].get(codes[c][0], '')}" for c in cols)
    raise WatchError(f"{path}: the steps go backwards (step {back[1]:,} after {back[0]:,}): "
                     + ("after --where, " if where else "")
                     + f"the table holds several runs ({describe_split(cols, k)}); "
                     + (f"add {first}" if where else f"pick one with {first}"))


# ------------------------------------------------------------------ rows -> observations
def _row_n_params(row: Mapping[str, float]) -> int | None:
    """N from a log row: the callback's ``scalewatch/n_params``, or a table's own ``n_params`` / ``params``
    column (any case), the names ``fit --curves`` reads.

    Example:
        >>> _row_n_params({"step": 10, "loss": 3.0, "N_Params": 1e9}), _row_n_params({"loss": 3.0}) is None
        (1000000000, True)
    """
    if tag("n_params") in row:
        return int(row[tag("n_params")])
    col = pick_column(list(row), ("n_params", "params"))
    value = row.get(col) if col else None
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


@dataclass
class Replayer:
    """Turns rows into Observations and feeds them to a Monitor, built at the first row (when N is known)."""

    config: ScaleWatchConfig
    loss_tag: str | None = None
    lr_tag: str | None = None
    tokens_tag: str | None = None
    tokens_per_step: float | None = None
    n_params: int | None = None
    total_steps: int | None = None
    sinks: list[Any] = field(default_factory=list)
    #: what to say once, on stderr by the CLI, when the first log point arrives (none on bad input)
    notes: list[str] = field(default_factory=list)
    say: Callable[[str], None] | None = None
    monitor: Monitor | None = None
    observed: int = 0
    rows: RowConverter | None = None
    #: ``--where COL=VALUE`` filters: the rows of one run in a table of several (applied by the source)
    where: Sequence[str] = ()

    def feed(self, step: int, row: Mapping[str, float], known: Callable[[], Sequence[str]] | None = None
             ) -> Report | None:
        """One row of the log; ``known()``: every tag the source has read, for the choice of the loss tag."""
        if self.rows is None:
            self.rows = RowConverter(self.loss_tag, self.lr_tag, self.tokens_tag, self.tokens_per_step)
        if not self.rows.has_loss(row, known):
            return None  # a step without a loss (e.g. only the LR was logged)
        if self.monitor is None:
            n = self.n_params or _row_n_params(row)
            law = self.config.curve_law
            if n is None and law is not None and law.n_range is not None:
                lo, hi = law.n_range
                raise WatchError(f"the curve law was fitted on several model sizes ({lo:.3g}..{hi:.3g}) and the log "
                                 "carries no N (scalewatch/n_params or an n_params column): give --n-params N")
            if self.total_steps is None and tag("total_steps") in row:  # logged by the live callback
                self.total_steps = int(row[tag("total_steps")])
            self.monitor = build_monitor(self.config, n_params=n, total_steps=self.total_steps, sinks=self.sinks)
            if self.say is not None:
                for note in self.notes + ([NO_TOTAL_STEPS] if self.total_steps is None and self.config.detect else []):
                    self.say(note)
                size = size_warning(self.config.curve_law, n) if self.config.curve_law is not None else None
                if size:
                    self.say(size)
            # Counts in a log start from zero at step 0, as the live callback's Monitor.start() sees them:
            # so the first point already has its batch size (and the noise scale its B_crit), like live.
            self.monitor.start(Observation(step=0, tokens=0, samples=0, flops=0))
        obs = self.rows.observation(step, row, self.monitor.n_params)
        self.observed += 1
        return self.monitor.observe(obs)


NO_TOTAL_STEPS = ("no --total-steps: the undertrained / overtrained / repeated_data checks are off (they project "
                  "to the planned end)")


def log_schedule(source: EventSource | TableSource, lr_tag: str | None = None
                 ) -> tuple[Any, str | None, tuple[int, int]]:
    """The LR at every step, interpolated from the log's own LR (``scalewatch/lr``, an ``lr`` column...).

    Returns ``(per-step LR or None, the tag, (first, last) logged step)``; reads the whole log (a first pass).
    """
    import numpy as np

    from scalewatch.curves import CurveError, per_step_lr

    from scalewatch.data import _norm  # the names as find_tag matches them: "Learning Rate" is learning_rate

    wanted = {_norm(a) for a in (*LR_TAGS, *([lr_tag] if lr_tag else []))}
    rows: dict[int, dict[str, float]] = {}
    for step, row in source.poll(final=True):
        values = {k: v for k, v in row.items() if _norm(k) in wanted and math.isfinite(v)}
        if values:
            rows.setdefault(step, {}).update(values)
    name = find_tag(sorted({k for r in rows.values() for k in r}), LR_TAGS, lr_tag)
    points = sorted((s, r[name]) for s, r in rows.items() if name in r) if name else []
    if len(points) < 2:
        return None, name, (0, 0)
    try:
        steps, lrs = zip(*points, strict=True)
        return np.asarray(per_step_lr(steps, lrs)), name, (points[0][0], points[-1][0])
    except CurveError:
        return None, name, (0, 0)


def with_log_schedule(path: str | Path, kwargs: Mapping[str, Any], follow: bool = False) -> dict[str, Any]:
    """``kwargs`` for :class:`Replayer`, with a curve law but no schedule: the log's own LR as the schedule.

    The predicted curve needs the LR at every step of the run; a finished log that has the LR at each log
    point gives it. Says so (a note), or why there is no predicted curve.
    """
    cfg: ScaleWatchConfig = kwargs["config"]
    if cfg.curve_law is None or cfg.schedule is not None:
        return dict(kwargs)
    source = open_source(path, kwargs.get("where", ()))
    if isinstance(source, TableSource):
        source.quiet = True  # the replay says what it skipped
    schedule, name, (first, last) = log_schedule(source, kwargs.get("lr_tag"))
    if schedule is None:
        lr_tag = kwargs.get("lr_tag")
        tags = [t for t in source.tags() if t != lr_tag]
        shown = ", ".join(tags[:12]) + (f" (+{len(tags) - 12} more)" if len(tags) > 12 else "")
        why = (f"only a few {name!r} points" if name else
               f"no LR tag {lr_tag!r}" if lr_tag else f"no LR tag or column among {shown or 'none'}")
        note = (f"--curve-law without --schedule, and the log has no LR per step ({why}): no predicted curve; "
                + ("" if name else "name the LR with --lr-tag, or ")
                + f"give --schedule step,lr.csv or a description such as {SPEC_TEMPLATE}")
        return {**kwargs, "notes": [*kwargs.get("notes", []), note]}
    total = kwargs.get("total_steps")
    note = (f"--curve-law without --schedule: the schedule is the log's own {name!r} (steps {first:,}–{last:,}, "
            "interpolated between log points)"
            + ("; with --follow, only the steps logged so far: give --schedule step,lr.csv for the whole run"
               if follow else "")
            + (f"; the forecast is of step {last:,} (the last logged step), not of the run's end at --total-steps "
               f"{total:,}: give --schedule step,lr.csv or a description such as "
               f"cosine:peak=...,warmup=...,final=...,total={total} for the whole run"
               if total and total > last and not follow else ""))
    return {**kwargs, "config": dataclasses.replace(cfg, schedule=schedule),
            "notes": [*kwargs.get("notes", []), note]}


def worst_fired(monitor: Monitor | None) -> str:
    """``"critical"``, ``"warning"``, ``"info"`` or ``"ok"``: the worst alert that fired, resolved since or not."""
    return "ok" if monitor is None else monitor.alerts.worst_fired


def worst_state(monitor: Monitor | None) -> str:
    """``"critical"``, ``"warning"``, ``"info"`` or ``"ok"``: the worst alert firing now."""
    if monitor is None:
        return "ok"
    levels = [HEALTH_LEVEL[s] for s in monitor.alerts.firing().values()]
    return {0: "ok", 1: "info", 2: "warning", 3: "critical"}[max(levels, default=0)]


class ConsoleSink:
    """Alerts on standard output: a readable line each, or the JSON-lines contract with ``as_json``."""

    name = "console"

    def __init__(self, as_json: bool = False, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream

    def write(self, report: Report) -> None:
        out = self.stream or sys.stdout
        for a in report.alerts:
            if self.as_json:
                print(json.dumps(a.to_json()), file=out, flush=True)
            else:
                label = "resolved" if a.state == "resolved" else a.severity.upper()
                tokens = f"{a.tokens:10.3g}" if a.tokens else f"{'–':>10}"  # 0: the log has no token count
                print(f"{label:9s} {a.kind:14s} step {a.step:>10,}  tokens {tokens}  {a.message}", file=out,
                      flush=True)


#: How the name of every event file watch writes ends: a re-run replaces exactly these files, nothing else
#: (TensorBoard would otherwise show the old and the new replay as one run, every point twice).
WATCH_EVENTS_SUFFIX = ".scalewatch-watch"


def watch_suffix(path: str | Path) -> str:
    """The ending of the event files a ``watch`` of ``path`` writes: :data:`WATCH_EVENTS_SUFFIX` and a short hash
    of the path, so that a re-run replaces its own replay of that log and nothing else.

    Example:
        >>> watch_suffix("/runs/a.csv") == watch_suffix("/runs/a.csv") != watch_suffix("/runs/b.csv")
        True
    """
    return f"{WATCH_EVENTS_SUFFIX}-{hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]}"


def previous_output(target: Path, suffix: str = WATCH_EVENTS_SUFFIX) -> list[Path]:
    """The event files an earlier ``watch`` wrote in ``target`` (their names end in ``suffix``, see :func:`watch_suffix`).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name in ("events.out.tfevents.1.host.2.0.scalewatch-watch-ab12cd34", "events.out.tfevents.1.host.3.0"):
        ...     _ = (d / name).write_text("")
        >>> [p.name for p in previous_output(d, "-ab12cd34")], previous_output(d, "-00000000"), previous_output(d / "x")
        (['events.out.tfevents.1.host.2.0.scalewatch-watch-ab12cd34'], [], [])
    """
    return sorted(target.glob(f"events.out.tfevents.*{suffix}")) if target.is_dir() else []


class _LazyTensorBoard:
    """watch's own TensorBoard run, created at the first report: bad input leaves no directory behind, and
    the previous replay's event files there (``replaces``) are removed only then, with one line on stderr."""

    name = "tensorboard"

    def __init__(self, target: Path, replaces: Sequence[Path] = (), suffix: str = WATCH_EVENTS_SUFFIX) -> None:
        self.target = target
        self.replaces = list(replaces)
        self.suffix = suffix
        self._writer: Any = None
        self._sink: Any = None

    def write(self, report: Report) -> None:
        if self._sink is None:
            from torch.utils.tensorboard import SummaryWriter

            from scalewatch.tensorboard import TensorBoardSink

            self._replace_previous()
            self._writer = SummaryWriter(str(self.target), filename_suffix=self.suffix)
            self._sink = TensorBoardSink(self._writer)
        self._sink.write(report)

    def _replace_previous(self) -> None:
        removed = 0
        for f in self.replaces:
            try:
                f.unlink()
                removed += 1
            except FileNotFoundError:  # another path of this invocation with the same target removed it
                pass
        # event files of someone else (or of a scalewatch before the suffix): kept, but they share the run
        kept = [f for f in self.target.glob("events.out.tfevents.*") if not f.name.endswith(self.suffix)]
        said = ([f"replacing the previous watch output ({removed} event file{'s' * (removed > 1)})"] if removed else []
                ) + ([f"keeping {len(kept)} event file{'s' * (len(kept) > 1)} there that this watch did not write "
                      "(another log's replay, or someone else's: TensorBoard shows them in the same run)"]
                     if kept else [])
        if said:
            print(f"scalewatch watch: {self.target}: {'; '.join(said)}", file=sys.stderr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tb_targets(paths: list[str | Path], tb_out: str | Path) -> list[Path]:
    """Where each watched path's own TensorBoard run goes; never into (or around) a watched path."""
    base = Path(tb_out).resolve()
    watched = [Path(p).resolve() for p in paths]
    targets = [base / (w.stem or "run") if len(paths) > 1 else base for w in watched]
    for t in targets:
        for w in watched:
            if t == w or w in t.parents or t in w.parents:
                raise WatchError(f"--tb-out {t} would write into or around the watched {w}; choose another directory")
    return targets


def watch(paths: list[str | Path], replayer_kwargs: Mapping[str, Any], follow: bool = False, poll: float = 5.0,
          idle: float = 600.0, tb_out: str | Path | None = None, on_report: Any = None) -> list[Monitor | None]:
    """Replay (and with ``follow``, keep polling) each path; return each path's Monitor.

    Several paths are watched one after the other (``follow`` applies to the last one).
    """
    if not (poll > 0 and math.isfinite(poll) and idle > 0):
        raise WatchError(f"--poll and --idle must be positive seconds, got {poll} and {idle}")
    targets = tb_targets(paths, tb_out) if tb_out is not None else [None] * len(paths)
    # listed before any path is replayed: a target two paths share keeps what this invocation writes
    suffixes = [watch_suffix(p) for p in paths]
    previous = {(t, x): previous_output(t, x) for t, x in zip(targets, suffixes, strict=True) if t is not None}
    monitors: list[Monitor | None] = []
    where = replayer_kwargs.get("where", ())
    for i, (path, target) in enumerate(zip(paths, targets, strict=True)):
        following = follow and i == len(paths) - 1
        # a table of several runs: say so before any alert
        check_one_run(path, where, final=not following, loss_tag=replayer_kwargs.get("loss_tag"))
        source = open_source(path, where)
        kwargs = with_log_schedule(path, replayer_kwargs, follow=following)
        sinks = list(kwargs.get("sinks", []))
        writer = _LazyTensorBoard(target, previous[(target, suffixes[i])], suffixes[i]) if target is not None else None
        if writer is not None:
            sinks.append(writer)
        rp = Replayer(**{**kwargs, "sinks": sinks})
        last_new = time.monotonic()
        try:
            while True:
                got = False
                for step, row in source.poll(final=not following):
                    got = True
                    report = rp.feed(step, row, source.tags)
                    if report is not None and on_report is not None:
                        on_report(report)
                if got:
                    last_new = time.monotonic()
                if not following or time.monotonic() - last_new > idle:
                    break
                time.sleep(poll)
            if following:  # the run went idle: what is left is complete
                for step, row in source.poll(final=True):
                    rp.feed(step, row, source.tags)
        except KeyboardInterrupt:
            pass
        finally:
            if rp.monitor is not None:
                rp.monitor.finish()
                rp.monitor.close()
            if writer is not None:
                writer.close()
        if rp.observed == 0:
            not_a_log = source.not_a_log() if isinstance(source, TableSource) else None
            if not_a_log:
                raise WatchError(not_a_log)
            found = find_tag(source.tags(), LOSS_TAGS, rp.loss_tag)
            if found:  # the column is there, no row has a value in it: an empty (or just started) log
                raise WatchError(f"{path}: the loss {found!r} is there but no row has a value yet: an empty log?")
            raise WatchError(no_loss_message(path, rp.loss_tag, source.tags()))
        monitors.append(rp.monitor)
    return monitors


def add_run_arguments(parser: Any) -> None:
    """The arguments ``watch`` and ``report`` share: how to read the run, and the laws to hold it against."""
    parser.add_argument("--loss-tag", help="the loss tag or column, if not a common name")
    parser.add_argument("--lr-tag", help="the learning-rate tag or column")
    parser.add_argument("--tokens-tag", help="the cumulative token-count tag or column")
    parser.add_argument("--tokens-per-step", type=float,
                        help="tokens per optimizer step, when the log has no token count")
    parser.add_argument("--n-params", type=float, help="N, when the log does not carry scalewatch/n_params")
    parser.add_argument("--total-steps", type=int, help="the run's planned steps (for the undertrained / "
                        "overtrained / repeated_data checks, which project to the planned end; off without it)")
    parser.add_argument("--law", help="Chinchilla law file (`scalewatch fit --out`)")
    parser.add_argument("--curve-law", help="curve-law file (`scalewatch fit --curves --out`); the LR schedule is "
                        "--schedule, else the log's own LR per log point")
    parser.add_argument("--schedule", help="step,lr CSV of the whole run, or a description such as "
                        "cosine:peak=3e-4,warmup=2000,final=0.1,total=50000, for the curve law (default: the LR the "
                        "log has)")
    parser.add_argument("--unique-tokens", type=float, help="unique tokens in the training data")
    parser.add_argument("--run-name", help="the run's name in alerts (default: the path's name)")
    parser.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                        help="a CSV/JSONL table of several runs: keep the rows where COL equals VALUE (repeatable, "
                             "e.g. --where model=pythia-70m --where seed=0)")


def stderr_once(command: str) -> Callable[[str], None]:
    """A ``say`` for :class:`Replayer`: each note once on stderr (several paths share the notes)."""
    said: set[str] = set()

    def say(note: str) -> None:
        if note not in said:
            said.add(note)
            print(f"scalewatch {command}: {note}", file=sys.stderr)

    return say


def replayer_kwargs(args: Any, path: str | Path, sinks: list[Any], **config: Any) -> dict[str, Any]:
    """The :class:`Replayer` arguments the shared flags ask for (``config``: more ScaleWatchConfig fields).

    The noise-scale stage is on: a ScaleWatch log carries its EMAs (``gns/g2``, ``gns/trace``), so a
    replay recomputes the critical batch and the batch-size check as the live callback did.
    """
    try:
        cfg = ScaleWatchConfig(gns="auto", curve_law=args.curve_law, schedule=args.schedule, law=args.law,
                               unique_tokens=args.unique_tokens, run_name=args.run_name or Path(path).resolve().name,
                               forecast_in_background=False, **config)
    except ScaleWatchConfigError as exc:
        raise WatchError(str(exc).removeprefix("scalewatch: ")) from None
    for name in ("n_params", "tokens_per_step", "unique_tokens"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise WatchError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return dict(config=cfg, loss_tag=args.loss_tag, lr_tag=args.lr_tag, tokens_tag=args.tokens_tag,
                tokens_per_step=args.tokens_per_step, n_params=int(args.n_params) if args.n_params else None,
                total_steps=args.total_steps, sinks=sinks, where=tuple(getattr(args, "where", None) or ()))


def add_parser(sub: Any) -> None:
    """The ``watch`` subcommand's arguments."""
    w = sub.add_parser("watch", help="replay or follow a run's logs through the detectors; exit 0/1/2 by health",
                       description=__doc__)
    w.add_argument("paths", nargs="+", metavar="PATH", help="TensorBoard event directories, or CSV/JSONL files")
    w.add_argument("--follow", action="store_true", help="keep polling for new events until the run goes idle")
    w.add_argument("--poll", type=float, default=5.0, help="seconds between polls with --follow (default 5)")
    w.add_argument("--idle", type=float, default=600.0, help="stop after this many seconds without new events")
    add_run_arguments(w)
    w.add_argument("--jsonl", help="also append the alerts to this JSON-lines file")
    w.add_argument("--webhook", help="Slack-compatible webhook for the alerts (default: SCALEWATCH_WEBHOOK_URL)")
    w.add_argument("--tb-out", help="TensorBoard directory for watch's own run (default: beside a watched event "
                   "directory; none for a CSV/JSONL unless given)")
    w.add_argument("--no-tb", action="store_true", help="write no TensorBoard run")
    w.add_argument("--json", action="store_true", help="print the alerts as JSON lines")
    w.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    kwargs = replayer_kwargs(args, args.paths[-1], [ConsoleSink(as_json=args.json)], alerts_jsonl=args.jsonl,
                             webhook_url=args.webhook)
    kwargs["say"] = stderr_once("watch")
    tb_out = None
    last = Path(args.paths[-1]).resolve()
    # Beside a watched TensorBoard run by default (its own run, never inside); a CSV or JSONL log (often
    # in a shared, read-only data folder) gets one only when asked for with --tb-out.
    if not args.no_tb and (args.tb_out or last.is_dir()):
        tb_out = args.tb_out or str(last.parent / f"{last.stem or 'run'}-scalewatch-watch")
    try:
        monitors = watch(args.paths, kwargs, follow=args.follow, poll=args.poll, idle=args.idle, tb_out=tb_out)
    except (WatchError, ScaleWatchConfigError):
        raise
    except Exception as exc:  # exit 1 and 2 mean the run's health: a failure of watch itself must not read so
        raise WatchError(f"could not read the logs: {type(exc).__name__}: {exc}") from None
    order = ["ok", "info", "warning", "critical"].index
    state = max((worst_state(m) for m in monitors), key=order)  # the worst over every path
    fired = max((worst_fired(m) for m in monitors), key=order)
    if not args.json:
        n = sum(len(m.history) for m in monitors if m)
        still = sorted({f"{kind} ({sev})" for m in monitors if m for (kind, _), sev in m.alerts.firing().items()})
        print(f"scalewatch watch: {n} log points kept; state at the end: {state}"
              + (f" ({', '.join(still)} still firing)" if still else "")
              + f"; worst alert fired: {fired if fired != 'ok' else 'none'} (exit {EXIT_CODES[fired]})"
              + (f"; TensorBoard: {tb_out}" if tb_out else ""), file=sys.stderr)
    return EXIT_CODES[fired]
