"""Step-time overhead of ScaleWatch on the tiny GPT, measured side by side.

    python benchmarks/overhead.py [--rounds 6] [--steps 40] [--device cpu|cuda]

Trains the same model with and without the callback in alternating chunks (so
drift of the machine hits both alike) and prints the median step-time ratio, per round
(each round runs both arms back to back) and pooled.
A step's time is the period between consecutive ``on_train_batch_start`` calls,
so it includes every callback hook, the optimizer step and data loading.
Target (issue 2): median ratio <= 1.01 on the tiny GPT on CPU.

With ``--sync-debug`` on a CUDA device, every non-logging step runs under
``torch.cuda.set_sync_debug_mode("error")``: any host sync raises.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from tempfile import TemporaryDirectory

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from step_timing import (Comparison, StepTimer, add_common_args, apply_clock_and_threads, clock_line,
                         format_ratios, make_loaders, model_config, model_line, run_rounds, train)

from scalewatch import ScaleWatch


class SyncDebug(pl.Callback):
    """Turns on CUDA sync errors between batch start and the end of the step on quiet steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % self.every != 0 and trainer.global_step > 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


class TimedScaleWatch(ScaleWatch):
    """ScaleWatch that also records the wall time spent inside its per-batch hooks."""

    hook_seconds: list[float] = []

    def on_train_batch_start(self, *a) -> None:
        t = time.perf_counter()
        super().on_train_batch_start(*a)
        self._t_hook = time.perf_counter() - t

    def on_before_optimizer_step(self, *a) -> None:  # the health detectors' gradient norm, the noise scale
        t = time.perf_counter()
        super().on_before_optimizer_step(*a)
        self._t_hook += time.perf_counter() - t

    def on_train_batch_end(self, *a) -> None:
        t = time.perf_counter()
        logged = self._last_logged_step
        super().on_train_batch_end(*a)
        if self._last_logged_step == logged:  # quiet steps only
            TimedScaleWatch.hook_seconds.append(self._t_hook + time.perf_counter() - t)


class ToggledScaleWatch(TimedScaleWatch):
    """ScaleWatch whose per-batch hooks run only in alternate blocks of two optimizer steps.

    For the interleaved design: both arms share one run, one process and every drift of the
    machine. Counting is wrong in the off blocks, which is fine for timing.
    """

    @staticmethod
    def on_for(step: int) -> bool:
        return (step // 2) % 2 == 1

    def on_train_batch_start(self, trainer, *a) -> None:
        if self.on_for(trainer.global_step):
            super().on_train_batch_start(trainer, *a)

    def on_before_optimizer_step(self, trainer, *a) -> None:
        if self.on_for(trainer.global_step):
            super().on_before_optimizer_step(trainer, *a)

    def on_train_batch_end(self, trainer, *a) -> None:
        if self.on_for(trainer.global_step - 1 if trainer.global_step else 0):
            super().on_train_batch_end(trainer, *a)


def run_interleaved(args, cfg, loaders, logdir: str) -> tuple[list[float], list[float]]:
    timer = StepTimer("on_train_batch_start")
    steps = args.steps * args.rounds
    watch = ToggledScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every, detect=not args.no_detect)
    train(args, cfg, loaders[0], [watch, timer], steps, logger=TensorBoardLogger(logdir, name="bench"))
    # marks[i] is taken at the start of step i; the period to marks[i + 1] is step i plus the
    # next step's batch-start hooks, so only the first step of each 2-step block is clean.
    on, off = [], []
    for i in range(4, len(timer.marks) - 1):
        if i % 2 == 0 and (i + 1) % args.log_every != 0:
            (on if ToggledScaleWatch.on_for(i) else off).append(timer.marks[i + 1] - timer.marks[i])
    return on, off


def run_chunk(with_callback: bool, args, cfg, loaders, logdir: str) -> list[float]:
    timer = StepTimer("on_train_batch_start")
    # The timer goes last so that its batch-start mark follows every other callback's hook.
    callbacks: list[pl.Callback] = []
    if with_callback:
        callbacks.append(TimedScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every,
                                         detect=not args.no_detect))
    if args.sync_debug:
        callbacks.append(SyncDebug(args.log_every))
    callbacks.append(timer)
    train(args, cfg, loaders[0], callbacks, args.steps, logger=TensorBoardLogger(logdir, name="bench"))
    return timer.periods()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=40, log_help="log interval (default: Lightning's default, 50)")
    p.add_argument("--sync-debug", action="store_true")
    p.add_argument("--no-detect", action="store_true",
                   help="ScaleWatch(detect=False): no run-health detectors and no per-step gradient norm")
    p.add_argument("--interleaved", action="store_true",
                   help="one run, the callback's hooks on and off in alternate blocks of 2 steps (non-logging steps)")
    p.add_argument("--aa", action="store_true",
                   help="A/A run: both arms WITHOUT the callback, to show the measurement's own noise")
    args = p.parse_args()
    apply_clock_and_threads(args, p)

    cfg = model_config(args)
    if args.interleaved:
        loaders = make_loaders(cfg, args.batch_size, num_train=args.steps * args.rounds * args.batch_size)
        with TemporaryDirectory() as logdir:
            on, off = run_interleaved(args, cfg, loaders, logdir)
        c = Comparison(off, on)
        print(f"interleaved: one run of {args.steps * args.rounds} steps, hooks on/off in blocks of 2 "
              f"({len(on)} clean non-logging steps on, {len(off)} off); {clock_line(args)}")
        print(f"{c.medians('hooks off', 'on')}; pooled ratio {c.pooled:.4f}; median of paired ratios {c.paired:.4f}")
        hook = statistics.median(TimedScaleWatch.hook_seconds)
        print(f"time inside ScaleWatch's hooks on a non-logging step: median {hook * 1e6:.0f} us")
        return 0
    loaders = make_loaders(cfg, args.batch_size, num_train=args.steps * args.batch_size)
    with TemporaryDirectory() as logdir:
        off, on, round_ratios = run_rounds(
            args.rounds, lambda flag: run_chunk(flag and not args.aa, args, cfg, loaders, logdir))
    c = Comparison(off, on)
    mean_off, mean_on = statistics.fmean(off), statistics.fmean(on)
    print(f"{model_line(args, cfg)} batch={args.batch_size}; {len(on)} steps each way, log every {args.log_every}; "
          f"{clock_line(args)}")
    print(c.medians("without", "with ScaleWatch"))
    print(f"mean step (log steps included): without {mean_off * 1e3:.2f} ms, with {mean_on * 1e3:.2f} ms "
          f"(ratio {mean_on / mean_off:.4f})")
    if args.aa:
        print(f"A/A (no callback in either arm) median step-time ratio: pooled {c.pooled:.4f}, "
              f"median of per-round ratios {statistics.median(round_ratios):.4f}")
        return 0
    hook = statistics.median(TimedScaleWatch.hook_seconds)
    print(f"time inside ScaleWatch's hooks on a non-logging step: median {hook * 1e6:.0f} us "
          f"= {hook / c.med_off:.5f} of a step")
    print(f"per-round ratios: {format_ratios(round_ratios)}")
    print(f"pooled median step-time ratio (with / without): {c.pooled:.4f}")
    print(f"median step-time ratio (with / without), median over rounds: {statistics.median(round_ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
