"""Alerts: what detectors find, the book that turns findings into firing/resolved alerts, and alert sinks.

A detector (or the Monitor itself, for a stage that raised) returns :class:`Finding` records: "kind
K is active/inactive at this log point, with this severity and message". The :class:`AlertBook`
keeps one state per (kind, key) and emits an :class:`Alert` only when that state changes (it starts
firing, its severity changes, or it resolves), so sinks see each event once. Plain Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("scalewatch")

SEVERITIES = ("info", "warning", "critical")
#: ``scalewatch/health/<kind>``: 0 ok, 1 info, 2 warning, 3 critical.
HEALTH_LEVEL = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
#: Kinds that never stop a run under ``stop_on``: scalewatch's own errors and the planning findings.
NEVER_STOP = ("internal_error", "undertrained", "overtrained", "repeated_data", "batch_size")
#: Episodes an :class:`AlertBook` keeps for the end-of-run summary; past it the oldest resolved one of the
#: lowest severity goes first (memory stays bounded on a run whose spikes flap for days).
MAX_EPISODES = 100


@dataclass(frozen=True)
class Finding:
    """What one detector says about one kind of trouble at one log point.

    Attributes:
        kind: short stable identifier (``nonfinite``, ``spike``, ``internal_error``, ...).
        active: whether the condition holds now; ``False`` resolves a firing alert.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        message: what happened and what to do, in words.
        key: distinguishes several alerts of one kind (e.g. the stage that failed).
        values: kind-specific numbers carried into the alert.
    """

    kind: str
    active: bool
    severity: str = "warning"
    message: str = ""
    key: str = ""
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """One change of an alert's state, as sinks receive it (the JSON-lines contract)."""

    kind: str
    severity: str
    state: str  # "firing" | "resolved"
    step: int
    tokens: int
    message: str
    run: str = "run"
    key: str = ""
    time: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The alert as one JSON object: the contract's fields, and the kind-specific numbers under ``data``.

        Example:
            >>> a = Alert("spike", "warning", "firing", step=10, tokens=5120, message="loss 3x baseline",
            ...           time="2026-01-01T00:00:00+00:00", values={"ratio": 3.0})
            >>> sorted(a.to_json()), a.to_json()["data"]
            (['data', 'kind', 'message', 'run', 'severity', 'state', 'step', 'time', 'tokens'], {'ratio': 3.0})
        """
        doc: dict[str, Any] = {"time": self.time, "run": self.run, "kind": self.kind, "severity": self.severity,
                               "state": self.state, "step": self.step, "tokens": self.tokens, "message": self.message,
                               "data": {k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
                                        for k, v in self.values.items()}}
        if self.key:
            doc["key"] = self.key
        return doc


@dataclass
class Episode:
    """One stretch during which an alert fired: from the step it started firing to the step it resolved.

    Attributes:
        kind, key: the alert's slot.
        severity: the worst severity it reached.
        fired: the step it started firing.
        message: what it said when it fired (at that worst severity): its numbers are of that step.
        resolved: the step it resolved; None while it still fires.
    """

    kind: str
    key: str
    severity: str
    fired: int
    message: str
    resolved: int | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AlertBook:
    """Alert lifecycle: one state per (kind, key); emits an :class:`Alert` only when it changes.

    Hysteresis: a firing alert resolves only after ``resolve_after`` consecutive log points whose
    finding is inactive. Cooldown: after it resolves, the same (kind, key) cannot fire again for
    ``cooldown`` log points (a flapping condition pages once, not every other log point).

    Example:
        >>> book = AlertBook(run="demo", resolve_after=1, cooldown=0)
        >>> [a.state for a in book.update([Finding("spike", True, message="x")], step=5, tokens=50)]
        ['firing']
        >>> book.update([Finding("spike", True, message="x")], step=6, tokens=60)   # still firing: silent
        []
        >>> [a.state for a in book.update([Finding("spike", False)], step=7, tokens=70)]
        ['resolved']
        >>> book.health()
        {'spike': 0}
    """

    def __init__(self, run: str = "run", resolve_after: int = 2, cooldown: int = 5) -> None:
        self.run = run
        self.resolve_after = max(int(resolve_after), 1)
        self.cooldown = max(int(cooldown), 0)
        self._firing: dict[tuple[str, str], str] = {}  # (kind, key) -> severity
        self._quiet: dict[tuple[str, str], int] = {}  # firing slots: consecutive inactive findings so far
        self._cool: dict[tuple[str, str], int] = {}  # resolved slots: log points of cooldown left
        self._said: dict[tuple[str, str], str] = {}  # firing slots: the message they fired with
        # firing slots: (step, message) of their newest active finding. Detectors rewrite their message at every
        # log point (the batch's factor, the NaN count), so the one they fired with goes stale.
        self._latest: dict[tuple[str, str], tuple[int, str]] = {}
        #: every time an alert fired, resolved or not, oldest first (at most MAX_EPISODES): the end-of-run summary
        self.episodes: list[Episode] = []
        self._kinds: set[str] = set()  # every kind known, for health scalars that stay at 0
        self.recent: list[Alert] = []  # the last alerts, newest last, for the alert table
        #: the worst severity that fired since this book was made ("ok" if none): a NaN that recovered still counts
        self.worst_fired = "ok"

    def know(self, kinds: Iterable[str]) -> None:
        """Kinds to report in :meth:`health` from the start (0 until they fire)."""
        self._kinds.update(kinds)

    def update(self, findings: Iterable[Finding], step: int, tokens: int) -> list[Alert]:
        changed = []
        for slot in list(self._cool):
            self._cool[slot] -= 1
            if self._cool[slot] <= 0:
                del self._cool[slot]
        for f in findings:
            if f.severity not in SEVERITIES:
                raise ValueError(f"finding {f.kind!r}: severity must be one of {SEVERITIES}, got {f.severity!r}")
            self._kinds.add(f.kind)
            slot = (f.kind, f.key)
            was = self._firing.get(slot)
            if f.active:
                self._quiet[slot] = 0
                if was != f.severity and (was is not None or slot not in self._cool):
                    self._firing[slot] = f.severity
                    self._said[slot] = f.message
                    changed.append(self._alert(f, f.severity, "firing", step, tokens))
                    self._episode_fires(f, was, int(step))
                    if HEALTH_LEVEL[f.severity] > HEALTH_LEVEL[self.worst_fired]:
                        self.worst_fired = f.severity
                if slot in self._firing:
                    self._latest[slot] = (int(step), f.message)
            elif was is not None:
                self._quiet[slot] = self._quiet.get(slot, 0) + 1
                if self._quiet[slot] >= self.resolve_after:
                    del self._firing[slot], self._quiet[slot]
                    self._cool[slot] = self.cooldown
                    # The detector's words describe the condition; now healthy, say what was wrong.
                    was_said = self._said.pop(slot, "")
                    self._latest.pop(slot, None)
                    for ep in self._open(slot):
                        ep.resolved = int(step)
                    message = f"back to normal for {self.resolve_after} log point(s); was: {was_said}"
                    changed.append(self._alert(Finding(f.kind, False, was, message, f.key, dict(f.values)), was,
                                               "resolved", step, tokens))
        self.recent = (self.recent + changed)[-20:]
        return changed

    def _open(self, slot: tuple[str, str]) -> list[Episode]:
        """The episode of ``slot`` still firing, as a list of at most one."""
        return [e for e in self.episodes[::-1] if (e.kind, e.key) == slot and e.resolved is None][:1]

    def _episode_fires(self, f: Finding, was: str | None, step: int) -> None:
        """A new episode when ``f``'s slot starts firing; an escalation raises the open one's severity."""
        opened = self._open((f.kind, f.key)) if was is not None else []
        if not opened:
            self.episodes.append(Episode(f.kind, f.key, f.severity, step, f.message))
        elif HEALTH_LEVEL[f.severity] > HEALTH_LEVEL[opened[0].severity]:
            opened[0].severity, opened[0].message = f.severity, f.message
        while len(self.episodes) > MAX_EPISODES:
            done = [e for e in self.episodes if e.resolved is not None]
            if not done:
                break
            least = min(HEALTH_LEVEL[e.severity] for e in done)
            self.episodes.remove(next(e for e in done if HEALTH_LEVEL[e.severity] == least))

    def now_saying(self) -> dict[tuple[str, str], tuple[int, str]]:
        """(kind, key) -> (step, message) of each firing alert's newest finding: its numbers are of that step.

        Example:
            >>> book = AlertBook(resolve_after=1, cooldown=0)
            >>> _ = book.update([Finding("nonfinite", True, "critical", "1 NaN so far")], step=10, tokens=100)
            >>> _ = book.update([Finding("nonfinite", True, "critical", "5 NaN so far")], step=20, tokens=200)
            >>> book.now_saying()
            {('nonfinite', ''): (20, '5 NaN so far')}
        """
        return {slot: self._latest.get(slot, (-1, self._said.get(slot, ""))) for slot in self._firing}

    def _alert(self, f: Finding, severity: str, state: str, step: int, tokens: int) -> Alert:
        return Alert(kind=f.kind, severity=severity, state=state, step=int(step), tokens=int(tokens),
                     message=f.message, run=self.run, key=f.key, time=_now(), values=dict(f.values))

    def firing(self) -> dict[tuple[str, str], str]:
        """(kind, key) -> severity of every alert firing now."""
        return dict(self._firing)

    def reasons_to_stop(self, stop_on: str, fired_kinds: Iterable[str]) -> list[str]:
        """``"kind (severity)"`` of each firing alert that should stop the run under ``stop_on``.

        Only the run's own health stops it: not scalewatch's internal errors, not the planning
        findings (they fire at the first log point by design), and only kinds in ``fired_kinds``
        (those that fired in this session, not alerts restored from a checkpoint).

        Example:
            >>> book = AlertBook()
            >>> _ = book.update([Finding("divergence", True, "critical", "loss rising")], step=5, tokens=50)
            >>> book.reasons_to_stop("critical", {"divergence"})
            ['divergence (critical)']
        """
        level = HEALTH_LEVEL[stop_on]
        kinds = set(fired_kinds) - set(NEVER_STOP)
        return [f"{kind} ({sev})" for (kind, _), sev in self._firing.items()
                if HEALTH_LEVEL[sev] >= level and kind in kinds]

    def health(self) -> dict[str, int]:
        """``kind -> level`` (0 ok .. 3 critical, the worst over keys) for every kind known so far."""
        out = {k: 0 for k in sorted(self._kinds)}
        for (kind, _), sev in self._firing.items():
            out[kind] = max(out[kind], HEALTH_LEVEL[sev])
        return out

    def table(self) -> str:
        """A markdown table of the alerts firing now and the recent changes (TensorBoard's text tab)."""
        firing = [a for a in reversed(self.recent) if a.state == "firing"
                  and self._firing.get((a.kind, a.key)) == a.severity]
        # The messages go below the table, numbered: in a table column, a long message squeezes the
        # short columns until TensorBoard breaks their words ("sev-erit-y").
        lines = ["| # | state | severity | kind | step | tokens |", "|---|---|---|---|---|---|"]
        notes, seen = [], set()
        for i, a in enumerate(firing + [a for a in reversed(self.recent) if a not in firing], 1):
            now = "**FIRING**" if a in firing and (a.kind, a.key) not in seen else a.state
            seen.add((a.kind, a.key))
            cells = [_md(x) for x in (a.severity, a.kind, f"{a.step:,}", f"{a.tokens:.3g}")]
            lines.append(f"| {i} | {now} | " + " | ".join(cells) + " |")
            notes.append(f"{i}. {_md(a.message)}")
        return "\n".join([*lines, "", *notes]) if notes else "No alerts."

    def state_dict(self) -> dict[str, Any]:
        return {"firing": [[k, key, sev] for (k, key), sev in self._firing.items()], "kinds": sorted(self._kinds),
                "quiet": [[k, key, n] for (k, key), n in self._quiet.items()],
                "cool": [[k, key, n] for (k, key), n in self._cool.items()],
                "said": [[k, key, m] for (k, key), m in self._said.items()],
                "latest": [[k, key, st, m] for (k, key), (st, m) in self._latest.items()],
                "episodes": [asdict(e) for e in self.episodes],
                "recent": [a.to_json() for a in self.recent]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._firing = {(str(k), str(key)): str(sev) for k, key, sev in state.get("firing", [])}
        self._kinds = {str(k) for k in state.get("kinds", [])}
        self._quiet = {(str(k), str(key)): int(n) for k, key, n in state.get("quiet", [])}
        self._cool = {(str(k), str(key)): int(n) for k, key, n in state.get("cool", [])}
        self._said = {(str(k), str(key)): str(m) for k, key, m in state.get("said", [])}
        self._latest = {(str(k), str(key)): (int(st), str(m)) for k, key, st, m in state.get("latest", [])}
        self.episodes = [Episode(**e) for e in state.get("episodes", [])]
        self.recent = [Alert(kind=d["kind"], severity=d["severity"], state=d["state"], step=int(d["step"]),
                             tokens=int(d["tokens"]), message=d["message"], run=d.get("run", self.run),
                             key=d.get("key", ""), time=d.get("time", ""), values=dict(d.get("data", {})))
                       for d in state.get("recent", [])]
        if "episodes" not in state:
            # A checkpoint from before episodes were kept: each alert firing then opens one, from its newest firing
            # alert (step -1 when none is left), so that its resolution after the resume is still summarised.
            for slot, sev in self._firing.items():
                fired = [a for a in self.recent if (a.kind, a.key) == slot and a.state == "firing"]
                self.episodes.append(Episode(slot[0], slot[1], sev, fired[-1].step if fired else -1,
                                             self._said.get(slot, fired[-1].message if fired else "")))


def _md(text: str) -> str:
    """A Markdown table cell: no column breaks, ``*`` and ``_`` literal."""
    return text.replace("|", "/").replace("*", "\\*").replace("_", "\\_")


# ------------------------------------------------------------------ sinks
class LogSink:
    """Alerts as log lines on the ``scalewatch`` logger: firing at WARNING (CRITICAL when critical), resolved at INFO."""

    name = "log"

    def write(self, report: Any) -> None:
        for a in report.alerts:
            if a.state == "resolved":
                log.info("scalewatch: resolved %s at step %d: %s", a.kind, a.step, a.message)
            else:
                level = logging.CRITICAL if a.severity == "critical" else logging.WARNING
                log.log(level, "scalewatch: %s %s at step %d: %s", a.severity.upper(), a.kind, a.step, a.message)


class JsonlSink:
    """Alerts appended to a JSON-lines file, one object per line, flushed at once (a crash loses nothing).

    Example:
        >>> import tempfile, os
        >>> from scalewatch.monitor import Report
        >>> path = os.path.join(tempfile.mkdtemp(), "alerts.jsonl")
        >>> JsonlSink(path).write(Report(step=3, tokens=30, alerts=[Alert("nonfinite", "critical", "firing", 3, 30,
        ...                                                                "NaN loss")]))
        >>> json.loads(open(path).read())["kind"]
        'nonfinite'
    """

    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        parent = self.path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK) or (self.path.exists() and not os.access(
                self.path, os.W_OK)):
            from scalewatch.config import ScaleWatchConfigError

            raise ScaleWatchConfigError(f"scalewatch: alerts_jsonl: cannot write {self.path} (the directory must "
                                        "exist and be writable); create it or choose another path")

    def write(self, report: Any) -> None:
        if not report.alerts:
            return
        with self.path.open("a") as f:
            for a in report.alerts:
                f.write(json.dumps(a.to_json()) + "\n")
            f.flush()
            if any(a.severity == "critical" for a in report.alerts):
                os.fsync(f.fileno())  # a critical alert must survive the crash it may announce
