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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("scalewatch")

SEVERITIES = ("info", "warning", "critical")
#: ``scalewatch/health/<kind>``: 0 ok, 1 info, 2 warning, 3 critical.
HEALTH_LEVEL = {"ok": 0, "info": 1, "warning": 2, "critical": 3}


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
        """The alert as one JSON object: the contract's fields, then the kind-specific numbers.

        Example:
            >>> a = Alert("spike", "warning", "firing", step=10, tokens=5120, message="loss 3x baseline",
            ...           time="2026-01-01T00:00:00+00:00", values={"ratio": 3.0})
            >>> sorted(a.to_json())
            ['kind', 'message', 'ratio', 'run', 'severity', 'state', 'step', 'time', 'tokens']
        """
        doc: dict[str, Any] = {"time": self.time, "run": self.run, "kind": self.kind, "severity": self.severity,
                               "state": self.state, "step": self.step, "tokens": self.tokens, "message": self.message}
        if self.key:
            doc["key"] = self.key
        for k, v in self.values.items():
            doc.setdefault(k, v if not isinstance(v, float) or math.isfinite(v) else str(v))
        return doc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AlertBook:
    """Alert lifecycle: one state per (kind, key); emits an :class:`Alert` only when it changes.

    Example:
        >>> book = AlertBook(run="demo")
        >>> [a.state for a in book.update([Finding("spike", True, message="x")], step=5, tokens=50)]
        ['firing']
        >>> book.update([Finding("spike", True, message="x")], step=6, tokens=60)   # still firing: silent
        []
        >>> [a.state for a in book.update([Finding("spike", False)], step=7, tokens=70)]
        ['resolved']
        >>> book.health()
        {'spike': 0}
    """

    def __init__(self, run: str = "run") -> None:
        self.run = run
        self._firing: dict[tuple[str, str], str] = {}  # (kind, key) -> severity
        self._kinds: set[str] = set()  # every kind seen, for health scalars that return to 0

    def update(self, findings: Iterable[Finding], step: int, tokens: int) -> list[Alert]:
        changed = []
        for f in findings:
            if f.severity not in SEVERITIES:
                raise ValueError(f"finding {f.kind!r}: severity must be one of {SEVERITIES}, got {f.severity!r}")
            self._kinds.add(f.kind)
            slot = (f.kind, f.key)
            was = self._firing.get(slot)
            if f.active and was != f.severity:
                self._firing[slot] = f.severity
                changed.append(self._alert(f, f.severity, "firing", step, tokens))
            elif not f.active and was is not None:
                del self._firing[slot]
                changed.append(self._alert(f, was, "resolved", step, tokens))
        return changed

    def _alert(self, f: Finding, severity: str, state: str, step: int, tokens: int) -> Alert:
        return Alert(kind=f.kind, severity=severity, state=state, step=int(step), tokens=int(tokens),
                     message=f.message, run=self.run, key=f.key, time=_now(), values=dict(f.values))

    def firing(self) -> dict[tuple[str, str], str]:
        """(kind, key) -> severity of every alert firing now."""
        return dict(self._firing)

    def health(self) -> dict[str, int]:
        """``kind -> level`` (0 ok .. 3 critical, the worst over keys) for every kind seen so far."""
        out = {k: 0 for k in sorted(self._kinds)}
        for (kind, _), sev in self._firing.items():
            out[kind] = max(out[kind], HEALTH_LEVEL[sev])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"firing": [[k, key, sev] for (k, key), sev in self._firing.items()], "kinds": sorted(self._kinds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._firing = {(str(k), str(key)): str(sev) for k, key, sev in state.get("firing", [])}
        self._kinds = {str(k) for k in state.get("kinds", [])}


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

    def write(self, report: Any) -> None:
        if not report.alerts:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for a in report.alerts:
                f.write(json.dumps(a.to_json()) + "\n")
