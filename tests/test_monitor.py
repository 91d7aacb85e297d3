"""The framework-free monitor: bounded history, rates, state round trip."""

from __future__ import annotations

import math

import pytest

from scalewatch.monitor import History, Monitor, Observation


def _obs(step: int, **kw) -> Observation:
    return Observation(step=step, tokens=1000 * step, samples=10 * step, flops=6_000_000 * step,
                       loss=kw.pop("loss", 5.0 / (1 + step)), time=0.5 * step, **kw)


def test_history_stays_bounded_and_keeps_first_and_recent_points() -> None:
    h = History(capacity=64)
    for s in range(100_000):
        h.append(_obs(s))
    assert len(h) <= 64
    steps = [o.step for o in h]
    assert steps[0] == 0 and steps[-1] == 99_999
    assert steps == sorted(steps)
    # denser for recent points: the newest quarter spans far fewer steps than the oldest quarter
    q = len(steps) // 4
    assert steps[-1] - steps[-q] < (steps[q] - steps[0]) / 4


def test_monitor_scalars_rates_and_mfu() -> None:
    m = Monitor(n_params=1000, peak_flops=24e6)
    m.start(_obs(0))
    s = m.observe(_obs(4, lr=1e-3)).scalars
    assert s["tokens"] == 4000 and s["tokens_per_param"] == 4.0
    assert s["tokens_per_sec"] == pytest.approx(4000 / 2.0)
    assert s["flops_per_sec"] == pytest.approx(24e6 / 2.0)
    assert s["mfu"] == pytest.approx(0.5)
    assert s["lr"] == 1e-3


def test_monitor_without_time_gives_no_rates_and_nan_loss_passes_through() -> None:
    m = Monitor(n_params=10)
    s = m.observe(Observation(step=1, tokens=5, samples=1, flops=300, loss=math.nan)).scalars
    assert "tokens_per_sec" not in s and math.isnan(s["loss"])


def test_plugins_see_observations_and_their_state_survives() -> None:
    class Counter:
        name = "counter"

        def __init__(self) -> None:
            self.n = 0

        def on_observation(self, obs, monitor):
            self.n += 1
            return {"counter/n": self.n}

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, st):
            self.n = st["n"]

    m = Monitor(plugins=[Counter()])
    for s in range(3):
        out = m.observe(_obs(s)).scalars
    assert out["counter/n"] == 3
    fresh = Monitor(plugins=[Counter()])
    fresh.load_state_dict(m.state_dict())
    assert fresh.plugins[0].n == 3 and [o.step for o in fresh.history] == [0, 1, 2]
