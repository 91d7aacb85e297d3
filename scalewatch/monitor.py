"""The framework-free core: observations in, scalars (and later alerts) out.

The Lightning callback, an offline ``watch`` over TensorBoard logs, or a plain
training loop all feed :class:`Observation` records to one :class:`Monitor`.
Forecasters and detectors plug in as :class:`Plugin` objects and see the same
stream and the same bounded history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


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
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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
            older = self._items[:half]
            thinned = older[::2]
            self._items = thinned + self._items[half:]

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


class Plugin(Protocol):
    """Anything that watches the stream: a forecaster, a detector.

    ``on_observation`` returns extra scalars to log (name -> value, without the
    ``scalewatch/`` prefix). Plugins with state implement ``state_dict`` /
    ``load_state_dict`` too.
    """

    name: str

    def on_observation(self, obs: Observation, monitor: Monitor) -> Mapping[str, float]: ...


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


class Monitor:
    """Consumes observations, keeps a bounded history, returns the scalars to log.

    Args:
        n_params: N under the run's convention, for ``tokens_per_param``.
        peak_flops: the peak FLOP/s of all devices together, for MFU; None when unknown.
        history_size: maximum number of observations kept.
        plugins: forecasters and detectors that see each observation.

    Example:
        >>> m = Monitor(n_params=1000)
        >>> m.start(Observation(step=0, tokens=0, samples=0, flops=0, time=0.0))
        >>> s = m.observe(Observation(step=10, tokens=20_000, samples=10, flops=6_000 * 20_000,
        ...                           loss=3.5, time=2.0))
        >>> s["tokens_per_param"], s["tokens_per_sec"]
        (20.0, 10000.0)
    """

    def __init__(
        self,
        n_params: int | None = None,
        peak_flops: float | None = None,
        history_size: int = 2048,
        plugins: Iterable[Plugin] = (),
    ) -> None:
        self.n_params = n_params
        self.peak_flops = peak_flops
        self.history = History(history_size)
        self.plugins: list[Plugin] = list(plugins)
        self._prev: Observation | None = None  # last observation of this session (for rates)

    def start(self, obs: Observation) -> None:
        """Mark where this session starts (counts restored on resume, time zero), for rates."""
        self._prev = obs

    @property
    def last(self) -> Observation | None:
        return self.history[-1] if len(self.history) else None

    def observe(self, obs: Observation) -> dict[str, float]:
        """Record an observation; return scalars (names without the ``scalewatch/`` prefix)."""
        scalars: dict[str, float] = {
            "tokens": float(obs.tokens),
            "samples": float(obs.samples),
            "flops": float(obs.flops),
            "loss": float(obs.loss),
            "nonfinite_losses": float(obs.nonfinite),
        }
        if self.n_params:
            scalars["n_params"] = float(self.n_params)
            scalars["tokens_per_param"] = obs.tokens / self.n_params
        if obs.lr is not None:
            scalars["lr"] = float(obs.lr)
        if self._prev is not None:
            r = rates_between(self._prev, obs)
            if r is not None:
                scalars["tokens_per_sec"] = r.tokens_per_sec
                scalars["samples_per_sec"] = r.samples_per_sec
                scalars["flops_per_sec"] = r.flops_per_sec
                if self.peak_flops:
                    scalars["mfu"] = r.flops_per_sec / self.peak_flops
        self._prev = obs
        self.history.append(obs)
        for plugin in self.plugins:
            for k, v in plugin.on_observation(obs, self).items():
                scalars[k] = float(v)
        return scalars

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history.state_dict(), "plugins": {}}
        for p in self.plugins:
            if hasattr(p, "state_dict"):
                state["plugins"][p.name] = p.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        for p in self.plugins:
            if p.name in state.get("plugins", {}) and hasattr(p, "load_state_dict"):
                p.load_state_dict(state["plugins"][p.name])
