"""ScaleWatch's throughput and MFU next to Lightning's ``ThroughputMonitor``, on the same runs.

    python benchmarks/mfu_compare.py [--rounds 3] [--steps 40]
    # the GPU check (GPT-2-small-sized: 12 layers x 768, T = 1024, bf16):
    python benchmarks/mfu_compare.py --device cuda --precision bf16-mixed --n-layer 12 --n-embd 768 \
        --block-size 1024 --batch-size 8 --steps 60 --log-every 20

Three arms on the example GPT, the same data and seed, in alternating rounds (the chunked design of
``step_timing.py``): no callback, ``ScaleWatch(flops="6N+attn")``, and ``ThroughputMonitor`` (given
the module's ``flops_per_batch`` from Fabric's ``measure_flops`` on a meta-device copy, as its docs
show). It prints each arm's median step time and ratio to the bare run, and the numbers both log in
one run with both attached: FLOP/s per device and MFU. They should agree to the difference between
the FLOP conventions (6N + 12·n_layer·d·T per token against measured matmul FLOPs, which also count
the LM head and the attention matmuls) and the time windows. On a CPU Lightning knows no peak FLOP/s,
so neither logs an MFU there; the FLOP/s still compare.

``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` on every batch to time it; ScaleWatch reads
the host clock only at log points and keeps its counts on the device. On a GPU the step-time ratios
show what that costs; on a CPU both are cheap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import Logger
from step_timing import (GPTConfig, StepTimer, add_common_args, apply_clock_and_threads, clock_line, make_loaders,
                         model_config, model_line, train)
from tiny_gpt import GPT, TinyGPTModule  # on the path through step_timing

from scalewatch import ScaleWatch


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``{name: [(step, value), ...]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    name = property(lambda self: "memory")
    version = property(lambda self: 0)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((int(step or 0), float(v)))

    def last(self, name: str) -> float | None:
        series = self.metrics.get(name)
        return series[-1][1] if series else None


def flops_per_batch(cfg: GPTConfig, batch_size: int) -> int:
    """Forward + backward FLOPs of one batch, measured on a meta-device copy (ThroughputMonitor's recipe)."""
    with torch.device("meta"):
        model = GPT(cfg)
        x = torch.zeros(batch_size, cfg.block_size, dtype=torch.long)
    return measure_flops(model, lambda: model(x), lambda out: out.float().sum())


def arm_callbacks(arm: str, args: argparse.Namespace) -> list[Any]:
    if arm == "scalewatch":
        return [ScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every)]
    if arm == "throughput":
        return [ThroughputMonitor(batch_size_fn=lambda b: b[0].size(0), length_fn=lambda b: b[0].numel(),
                                  window_size=args.log_every)]
    if arm == "both":
        return arm_callbacks("scalewatch", args) + arm_callbacks("throughput", args)
    return []


def run_arm(arm: str, args: argparse.Namespace, cfg: GPTConfig, loader: Any, fpb: int,
            logger: Logger | None = None) -> list[float]:
    timer = StepTimer("on_train_batch_start")  # last: its mark follows every other callback's hook
    trainer_kwargs = {"logger": logger} if logger is not None else {}
    _train_with_flops(args, cfg, loader, [*arm_callbacks(arm, args), timer], fpb, **trainer_kwargs)
    return timer.periods()


def _train_with_flops(args: argparse.Namespace, cfg: GPTConfig, loader: Any, callbacks: list[Any], fpb: int,
                      **kw: Any) -> None:
    # ThroughputMonitor reads ``pl_module.flops_per_batch``; setting it on the class reaches the module
    # that ``train`` builds without changing the example's code.
    TinyGPTModule.flops_per_batch = fpb
    try:
        train(args, cfg, loader, callbacks, args.steps, **kw)
    finally:
        del TinyGPTModule.flops_per_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=40, log_help="log interval and ThroughputMonitor's window (default 50)")
    p.set_defaults(rounds=3)
    args = p.parse_args()
    apply_clock_and_threads(args, p)
    if args.steps <= args.log_every:
        p.error(f"--steps ({args.steps}) must exceed --log-every ({args.log_every}): nothing is logged otherwise")

    cfg = model_config(args)
    loader, _ = make_loaders(cfg, args.batch_size, num_train=args.steps * args.batch_size)
    fpb = flops_per_batch(cfg, args.batch_size)
    arms = ("none", "scalewatch", "throughput")
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            times[arm].extend(run_arm(arm, args, cfg, loader, fpb))
    logger = MemoryLogger()
    run_arm("both", args, cfg, loader, fpb, logger=logger)

    print(f"{model_line(args, cfg)} batch={args.batch_size}; {args.rounds} rounds of {args.steps} steps per arm, "
          f"log every {args.log_every}; {clock_line(args)}")
    base = statistics.median(times["none"])
    for arm in arms:
        med = statistics.median(times[arm])
        print(f"  {arm:>11}: median step {med * 1e3:8.2f} ms, ratio to no callback {med / base:.4f}")
    tokens_per_batch = args.batch_size * cfg.block_size
    print(f"FLOPs per batch: ThroughputMonitor's measured {fpb:.4g} "
          f"({fpb / tokens_per_batch:.4g} per token); ScaleWatch's convention "
          f"{logger.last('scalewatch/flops') and logger.last('scalewatch/flops') / max(logger.last('scalewatch/tokens') or 1, 1):.4g} per token")
    sw_fps, tm_fps = logger.last("scalewatch/flops_per_sec"), logger.last("train/device/flops_per_sec")
    sw_mfu, tm_mfu = logger.last("scalewatch/mfu"), logger.last("train/device/mfu")
    print(f"last log point of the run with both: FLOP/s per device ScaleWatch {_fmt(sw_fps)}, "
          f"ThroughputMonitor {_fmt(tm_fps)}; MFU ScaleWatch {_fmt(sw_mfu)}, ThroughputMonitor {_fmt(tm_mfu)}")
    if sw_mfu is None and tm_mfu is None:
        print("  (no MFU from either: Lightning has no peak FLOP/s for this device; pass ScaleWatch(peak_flops=...))")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


if __name__ == "__main__":
    sys.exit(main())
