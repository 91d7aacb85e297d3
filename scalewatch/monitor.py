"""The framework-free pipeline: observations in, a :class:`Report` (scalars, forecasts, alerts) out.

The Lightning callback, ``scalewatch watch`` over logs, or a plain training loop all feed
:class:`Observation` records to one :class:`Monitor`. Inside it, stages run in a fixed order::

    derived quantities (rates, batch size) -> forecasters -> detectors -> alert book -> sinks

Each stage sees the observation, the bounded :class:`History` and the report built so far
(``monitor.report``: a detector reads ``loss_pred`` and its band from it). Each is isolated: an
exception inside one becomes an ``internal_error`` alert and a log line, never a lost log point.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from scalewatch.alerts import SEVERITIES, Alert, AlertBook, Finding

log = logging.getLogger("scalewatch")

#: Stage kinds, in the order they run.
STAGE_KINDS = ("forecaster", "detector")


@dataclass
class Observation:
    """What the run looked like at one log point. Counts are global (all ranks) since the start.

    Attributes:
        step: optimizer steps taken.
        tokens: training tokens consumed.
        samples: sequences consumed.
        flops: model FLOPs spent (the run's FLOP convention).
        loss: mean training loss over the finite micro-batch losses since the previous
            observation; ``nan`` when none was finite or none was available.
        time: wall-clock seconds since this process started training (resets on resume).
        lr: learning rate of the first parameter group, if known.
        nonfinite: number of non-finite micro-batch losses since the start.
        loss_max: the largest finite micro-batch loss of the interval (``nan`` if unknown).
        all_finite: whether every micro-batch loss of the interval was finite.
        grad_norm: mean global gradient norm (before clipping) of the interval's steps, if measured.
        grad_norm_max: the largest finite one of the interval.
        grad_nonfinite: optimizer steps of the interval whose gradient norm was NaN/Inf (outside fp16
            loss scaling, where such steps are expected and skipped by the scaler).
        batch_samples, batch_tokens: the global batch of one optimizer step over the interval
            (filled by the Monitor from the counts when not given).
        gns_g2, gns_trace: the noise-scale EMAs (|G|^2 and tr(Sigma), per-sequence units), if measured.
        extra: any other named numbers (for plugins).
    """

    step: int
    tokens: int
    samples: int
    flops: int
    loss: float = math.nan
    time: float = math.nan
    lr: float | None = None
    nonfinite: int = 0
    loss_max: float = math.nan
    all_finite: bool = True
    grad_norm: float | None = None
    grad_norm_max: float | None = None
    grad_nonfinite: int = 0
    batch_samples: float | None = None
    batch_tokens: float | None = None
    gns_g2: float | None = None
    gns_trace: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class ForecastBand:
    """A predicted value with its band: ``name`` is the scalar it is logged as (e.g. ``loss_pred``)."""

    name: str
    value: float
    low: float
    high: float
    level: float = 0.90
    at_step: int | None = None


@dataclass
class Report:
    """What one log point produced: the scalars to log (names without the ``scalewatch/`` prefix), the
    forecasts with their bands, the alerts that changed state, texts to (re)write, and health levels."""

    step: int
    tokens: int
    scalars: dict[str, float] = field(default_factory=dict)
    forecasts: dict[str, ForecastBand] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    health: dict[str, int] = field(default_factory=dict)
    observation: Observation | None = None


@dataclass
class StageOutput:
    """What a stage may return instead of a plain mapping of scalars."""

    scalars: Mapping[str, float] = field(default_factory=dict)
    forecasts: Iterable[ForecastBand] = ()
    findings: Iterable[Finding] = ()


class Plugin(Protocol):
    """A stage: a forecaster or a detector.

    ``on_observation(obs, monitor)`` returns scalars to log (name -> value) or a
    :class:`StageOutput`. ``kind`` (``"forecaster"`` by default, or ``"detector"``) sets where it
    runs. Optional: ``state_dict`` / ``load_state_dict`` (resume), ``finish()`` returning the
    scalars of work still in flight at the end of training (e.g. a background forecast).
    """

    name: str

    def on_observation(self, obs: Observation, monitor: Monitor) -> Mapping[str, float] | StageOutput: ...


class Sink(Protocol):
    """Where reports go (TensorBoard, a log, a JSON-lines file, a webhook). Only rank 0 has sinks."""

    name: str

    def write(self, report: Report) -> None: ...


class History:
    """A bounded record of observations, denser for recent points.

    When full, the older half is thinned to every other point; repeated thinning
    leaves old points roughly log-spaced, so a million-step run costs the same
    memory as a thousand-step one. The first and the newest points are always kept.

    Example:
        >>> h = History(capacity=8)
        >>> for s in range(100): h.append(Observation(step=s, tokens=s, samples=s, flops=s))
        >>> len(h) <= 8, h[0].step, h[-1].step
        (True, 0, 99)
    """

    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 4:
            raise ValueError(f"History capacity must be at least 4, got {capacity}")
        self.capacity = capacity
        self._items: list[Observation] = []

    def append(self, obs: Observation) -> None:
        self._items.append(obs)
        if len(self._items) > self.capacity:
            half = len(self._items) // 2
            self._items = self._items[:half][::2] + self._items[half:]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Observation]:
        return iter(self._items)

    def __getitem__(self, i: int) -> Observation:
        return self._items[i]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [o.to_dict() for o in self._items]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity = int(state.get("capacity", self.capacity))
        self._items = [Observation.from_dict(d) for d in state.get("items", [])]


# ------------------------------------------------------------------ derived quantities
@dataclass
class Rates:
    """Throughput between two observations."""

    tokens_per_sec: float
    flops_per_sec: float
    samples_per_sec: float


def rates_between(prev: Observation, cur: Observation) -> Rates | None:
    """Throughput from two observations of one session; None when time did not advance."""
    dt = cur.time - prev.time
    if not (dt > 0) or math.isnan(dt):
        return None
    return Rates(
        tokens_per_sec=(cur.tokens - prev.tokens) / dt,
        flops_per_sec=(cur.flops - prev.flops) / dt,
        samples_per_sec=(cur.samples - prev.samples) / dt,
    )


def fill_batch_size(prev: Observation | None, obs: Observation) -> None:
    """Set ``obs.batch_samples`` / ``batch_tokens`` (per optimizer step) from the counts, unless given."""
    if prev is None:
        return
    steps = obs.step - prev.step
    if steps > 0 and obs.samples > prev.samples and obs.batch_samples is None:
        obs.batch_samples = (obs.samples - prev.samples) / steps
    if steps > 0 and obs.tokens > prev.tokens and obs.batch_tokens is None:
        obs.batch_tokens = (obs.tokens - prev.tokens) / steps


def base_scalars(obs: Observation, prev: Observation | None, n_params: int | None,
                 peak_flops: float | None) -> dict[str, float]:
    """Counts, tokens per parameter, rates and MFU at one observation."""
    scalars: dict[str, float] = {
        "tokens": float(obs.tokens),
        "samples": float(obs.samples),
        "flops": float(obs.flops),
        "loss": float(obs.loss),
        "nonfinite_losses": float(obs.nonfinite),
    }
    if n_params:
        scalars["n_params"] = float(n_params)
        scalars["tokens_per_param"] = obs.tokens / n_params
    if obs.lr is not None:
        scalars["lr"] = float(obs.lr)
    if math.isfinite(obs.loss_max):
        scalars["loss_max"] = float(obs.loss_max)
    if obs.grad_norm is not None:
        scalars["grad_norm"] = float(obs.grad_norm)
    if obs.grad_norm_max is not None and math.isfinite(obs.grad_norm_max):
        scalars["grad_norm_max"] = float(obs.grad_norm_max)
    r = rates_between(prev, obs) if prev is not None else None
    if r is not None:
        scalars["tokens_per_sec"] = r.tokens_per_sec
        scalars["samples_per_sec"] = r.samples_per_sec
        scalars["flops_per_sec"] = r.flops_per_sec
        if peak_flops:
            scalars["mfu"] = r.flops_per_sec / peak_flops
    return scalars


# ------------------------------------------------------------------ the pipeline
class Monitor:
    """Consumes observations, keeps a bounded history, runs the stages, returns a :class:`Report`.

    Args:
        n_params: N under the run's convention, for ``tokens_per_param``.
        peak_flops: the peak FLOP/s of all devices together, for MFU; None when unknown.
        history_size: maximum number of observations kept.
        plugins: forecasters and detectors (run forecasters first, then detectors, each group in
            the order given).
        sinks: where each report goes (rank 0 only in distributed runs).
        run: the run's name in alerts.
        resolve_after: consecutive healthy log points before a firing alert resolves (hysteresis).
        cooldown: log points after a resolution during which the same alert cannot fire again.

    Example:
        >>> m = Monitor(n_params=1000)
        >>> m.start(Observation(step=0, tokens=0, samples=0, flops=0, time=0.0))
        >>> r = m.observe(Observation(step=10, tokens=20_000, samples=10, flops=6_000 * 20_000,
        ...                           loss=3.5, time=2.0))
        >>> r.scalars["tokens_per_param"], r.scalars["tokens_per_sec"]
        (20.0, 10000.0)
    """

    def __init__(
        self,
        n_params: int | None = None,
        peak_flops: float | None = None,
        history_size: int = 2048,
        plugins: Iterable[Plugin] = (),
        sinks: Iterable[Sink] = (),
        run: str = "run",
        resolve_after: int = 2,
        cooldown: int = 5,
    ) -> None:
        self.n_params = n_params
        self.peak_flops = peak_flops
        self.history = History(history_size)
        self.plugins: list[Plugin] = list(plugins)
        self.sinks: list[Sink] = list(sinks)
        self.alerts = AlertBook(run=run, resolve_after=resolve_after, cooldown=cooldown)
        for p in self.plugins:
            self.alerts.know(getattr(p, "kinds", ()))
        self.texts: dict[str, str] = {}  # descriptions (conventions, methods) sinks write once per change
        self.report: Report | None = None  # the report of the observation being processed (or the last one)
        self._texts_sent: dict[str, str] = {}
        self._prev: Observation | None = None  # last observation of this session (for rates)
        self._failing: set[str] = set()  # stages whose last run raised
        self._broken_sinks: set[str] = set()

    @property
    def stages(self) -> list[Plugin]:
        """The plugins in the order they run: forecasters, then detectors."""
        return sorted(self.plugins, key=lambda p: STAGE_KINDS.index(getattr(p, "kind", "forecaster")))

    def start(self, obs: Observation) -> None:
        """Mark where this session starts (counts restored on resume, time zero), for rates."""
        self._prev = obs

    @property
    def last(self) -> Observation | None:
        return self.history[-1] if len(self.history) else None

    def observe(self, obs: Observation) -> Report:
        """Run one observation through every stage and the sinks; return its report."""
        fill_batch_size(self._prev, obs)
        report = Report(step=obs.step, tokens=obs.tokens, observation=obs,
                        scalars=base_scalars(obs, self._prev, self.n_params, self.peak_flops))
        self._prev = obs
        self.history.append(obs)
        self.report = report
        findings: list[Finding] = []
        for stage in self.stages:
            findings.extend(self._run_stage(stage, report, lambda s=stage: s.on_observation(obs, self)))
        self._finish_report(report, findings)
        return report

    def finish(self) -> Report | None:
        """End of training: collect what stages still had in flight (``finish()``), send it to the sinks.

        Returns the report, or None when no stage had anything new.
        """
        last = self.last
        if last is None:
            self._finish_stages()
            return None
        report = Report(step=last.step, tokens=last.tokens, observation=last)
        findings: list[Finding] = []
        for stage in self.stages:
            if hasattr(stage, "finish"):
                findings.extend(self._run_stage(stage, report, stage.finish))  # type: ignore[attr-defined]
        if not report.scalars and not findings:
            return None
        self.report = report
        self._finish_report(report, findings)
        return report

    def close(self) -> None:
        """Stop background work (no worker thread outlives the run) and close the sinks; safe to call twice."""
        self._finish_stages()
        for sink in self.sinks:
            if hasattr(sink, "close"):
                try:
                    sink.close()  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - monitoring must never crash the run
                    log.warning("scalewatch: the %r sink failed to close: %s", getattr(sink, "name", sink), exc)

    def _finish_stages(self) -> None:
        for stage in self.plugins:
            if hasattr(stage, "finish"):
                try:
                    stage.finish()  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - monitoring must never crash the run
                    log.warning("scalewatch: stage %r failed to finish: %s", stage.name, exc)

    def _run_stage(self, stage: Plugin, report: Report, call: Any) -> list[Finding]:
        name = getattr(stage, "name", type(stage).__name__)
        try:
            out = call()
            if isinstance(out, StageOutput):
                scalars = {k: float(v) for k, v in out.scalars.items()}
                forecasts = {f.name: f for f in out.forecasts}
                findings = list(out.findings)
                bad = [f for f in findings if f.severity not in SEVERITIES]
                if bad:
                    raise ValueError(f"finding {bad[0].kind!r} has severity {bad[0].severity!r}, not one of "
                                     f"{SEVERITIES}")
            else:
                scalars, forecasts, findings = {k: float(v) for k, v in (out or {}).items()}, {}, []
        except Exception as exc:  # noqa: BLE001 - one failing stage must not lose the log point
            log.warning("scalewatch: stage %r failed at step %d: %s: %s", name, report.step, type(exc).__name__, exc)
            self._failing.add(name)
            return [Finding("internal_error", True, "warning", key=name,
                            message=f"scalewatch's {name!r} stage failed: {type(exc).__name__}: {exc}; its numbers "
                                    "are missing at this step, training goes on")]
        found: list[Finding] = []
        if name in self._failing:
            self._failing.discard(name)
            found.append(Finding("internal_error", False, "warning", key=name, message=f"{name!r} stage works again"))
        report.scalars.update(scalars)
        report.forecasts.update(forecasts)
        return found + findings

    def _finish_report(self, report: Report, findings: list[Finding]) -> None:
        report.alerts = self.alerts.update(findings, report.step, report.tokens)
        report.health = self.alerts.health()
        if report.alerts or "alerts" not in self._texts_sent:
            self.texts["alerts"] = self.alerts.table()
        for kind, level in report.health.items():
            report.scalars[f"health/{kind}"] = float(level)
        report.texts = {k: v for k, v in self.texts.items() if self._texts_sent.get(k) != v}
        for sink in self.sinks:
            name = getattr(sink, "name", type(sink).__name__)
            try:
                sink.write(report)
            except Exception as exc:  # noqa: BLE001 - a sink that is down loses nothing else
                if name not in self._broken_sinks:
                    log.warning("scalewatch: the %r sink failed (said once; scalewatch keeps trying): %s: %s",
                                name, type(exc).__name__, exc)
                self._broken_sinks.add(name)
        self._texts_sent.update(report.texts)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history.state_dict(), "plugins": {},
                                 "alerts": self.alerts.state_dict()}
        for p in self.plugins:
            if hasattr(p, "state_dict"):
                state["plugins"][p.name] = p.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.alerts.load_state_dict(state.get("alerts", {}))
        for p in self.plugins:
            if p.name in state.get("plugins", {}) and hasattr(p, "load_state_dict"):
                p.load_state_dict(state["plugins"][p.name])
