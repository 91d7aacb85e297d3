"""Detection quality of the run-health detectors on real loss curves (../shared/data).

    python benchmarks/detection.py [--data ../shared/data] [--verbose]

1. False alarms: every healthy curve (multipowerlaw 25M/100M under 9 LR schedules, the OLMo ladder
   190M/370M/760M cosine, constant and WSD runs) is replayed through the same Monitor and detectors
   the callback uses. Target: zero warnings and zero criticals.
2. False alarms under training-loss noise: a healthy synthetic power law with 0.5-5% Gaussian noise
   per log point (real training losses are noisier than these eval curves).
3. Injected faults on those same curves, from the middle of each run: a one-point spike (loss
   x1.25), a slow divergence (+3% per log point), and a plateau (the loss frozen while the schedule
   goes on). Reports recall (the right kind fires) and the delay in log points.

These are evaluation-loss curves logged every 128 (multipowerlaw) or ~1,000 (OLMo) steps: smoother
than a training loss, so the false-alarm figure here is a floor; the live scenarios in
``tests/test_health.py`` cover training-loss noise.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalewatch.detectors import HealthConfig, default_detectors  # noqa: E402
from scalewatch.monitor import Monitor, Observation  # noqa: E402

OLMO_LOSS = "eval/c4_en-validation/CrossEntropyLoss"
FAULT_KIND = {"spike": "spike", "divergence": "divergence", "plateau": "saturation"}


def load_curves(root: Path) -> dict[str, tuple[float | None, list[Observation]]]:
    """name -> (N or None, observations)."""
    out: dict[str, tuple[float | None, list[Observation]]] = {}
    for path in sorted((root / "multipowerlaw").glob("*.csv")):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        n = 25e6 if "csv_25_" in path.name else 100e6
        out[f"mpl/{path.stem}"] = (n, [Observation(step=int(float(r["step"])), tokens=0, samples=0, flops=0,
                                                   loss=float(r["loss"]), lr=float(r["lr"])) for r in rows])
    runs: dict[str, list[dict]] = defaultdict(list)
    with (root / "olmo_ladder" / "loss_curves.csv").open() as f:
        for r in csv.DictReader(f):
            runs[f"olmo/{r['subset'].replace('peteish-moreeval', 'pm')}/{r['run']}"].append(r)
    for name, rows in sorted(runs.items()):
        rows.sort(key=lambda r: float(r["_step"]))
        obs = [Observation(step=int(float(r["_step"])), tokens=int(float(r["throughput/total_tokens"])), samples=0,
                           flops=int(float(r["throughput/total_training_Gflops"]) * 1e9), loss=float(r[OLMO_LOSS]),
                           lr=float(r["optim/learning_rate_group0"])) for r in rows if r[OLMO_LOSS]]
        out[name] = (float(rows[0]["n_params_final_json"]), obs)
    return out


def replay(n: float | None, obs: list[Observation], cfg: HealthConfig) -> tuple[list, float]:
    """Run a curve through a fresh Monitor with every detector; the alerts and the time per observation."""
    detectors = default_detectors(cfg, total_steps=obs[-1].step)
    monitor = Monitor(n_params=int(n) if n else None, plugins=detectors)
    alerts = []
    t = time.perf_counter()
    for o in obs:
        alerts += monitor.observe(Observation(**{**o.__dict__, "extra": {}})).alerts
    return alerts, (time.perf_counter() - t) / max(len(obs), 1)


def noisy_healthy(sd: float, seed: int, cosine: bool, n: int = 2000) -> list[Observation]:
    """A healthy run's training loss: a power law falling for good, with multiplicative Gaussian noise."""
    import random

    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        lr = 1e-3 * (0.5 * (1 + math.cos(math.pi * step / n)) if cosine else 1.0)
        loss = (2.0 + 5.0 * (step + 10) ** -0.3) * (1 + sd * rng.gauss(0, 1))
        out.append(Observation(step=step, tokens=step * 1000, samples=step, flops=0, loss=loss, loss_max=loss,
                               lr=lr))
    return out


def inject(obs: list[Observation], fault: str, at: int) -> list[Observation]:
    out = []
    for i, o in enumerate(obs):
        loss = o.loss
        if fault == "spike" and i == at:
            loss = o.loss * 1.25
        elif fault == "divergence" and i >= at:
            loss = o.loss * (1 + 0.03 * (i - at + 1))
        elif fault == "plateau" and i >= at:
            loss = obs[at].loss
        out.append(Observation(**{**o.__dict__, "loss": loss, "extra": {}}))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    cfg = HealthConfig()
    curves = load_curves(Path(args.data))
    print(f"== false alarms: {len(curves)} healthy real curves replayed through every detector")
    per_obs, loud = [], 0
    severities: Counter = Counter()
    for name, (n, obs) in curves.items():
        alerts, dt = replay(n, obs, cfg)
        per_obs.append(dt)
        firing = [a for a in alerts if a.state == "firing"]
        severities.update(a.severity for a in firing)
        serious = [a for a in firing if a.severity in ("warning", "critical")]
        loud += bool(serious)
        if serious or args.verbose:
            print(f"  {name:45s} {len(obs):4d} points: " +
                  (", ".join(f"{a.kind}/{a.severity}@{a.step}" for a in firing) or "quiet"))
    print(f"curves with a warning or critical: {loud} of {len(curves)}; firing alerts by severity: "
          f"{dict(severities) or 'none'}")
    print(f"detector time per observation (all detectors): median {sorted(per_obs)[len(per_obs) // 2] * 1e3:.3f} ms")

    print("== false alarms under training-loss noise: a healthy power law (2000 log points) with Gaussian "
          "noise per log point, constant and cosine LR, 5 seeds each")
    for sd in (0.005, 0.01, 0.02, 0.03, 0.05):
        fired: Counter = Counter()
        for seed in range(5):
            for cosine in (False, True):
                obs = noisy_healthy(sd, seed, cosine)
                fired.update(f"{a.kind}/{a.severity}" for a in replay(None, obs, cfg)[0] if a.state == "firing")
        print(f"  noise {sd:5.1%} per log point: {dict(fired) or 'quiet'} (10 runs)")

    print("== injected faults (from the middle of each curve): recall and delay in log points")
    for fault, kind in FAULT_KIND.items():
        hits, delays, eligible = 0, [], 0
        for name, (n, obs) in curves.items():
            at = len(obs) // 2
            if len(obs) < 30:
                continue
            if fault == "plateau":
                later = [o.lr for o in obs[at:] if o.lr is not None]
                if not later or min(later) > 0.5 * obs[at].lr:
                    continue  # the LR does not decay after the fault: a plateau is healthy there
            eligible += 1
            alerts, _ = replay(n, inject(obs, fault, at), cfg)
            first = next((a for a in alerts if a.kind == kind and a.state == "firing" and a.step >= obs[at].step),
                         None)
            if first is not None:
                hits += 1
                delays.append(next(i for i, o in enumerate(obs) if o.step == first.step) - at)
        mean_delay = sum(delays) / len(delays) if delays else math.nan
        print(f"  {fault:10s} -> {kind:10s}: recall {hits}/{eligible}; delay mean {mean_delay:.1f}, "
              f"max {max(delays) if delays else 'n/a'} log points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
