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
from pathlib import Path
from tempfile import TemporaryDirectory

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402


class StepTimer(pl.Callback):
    # "cpu" = process CPU time of all threads: immune to the host descheduling this VM
    # (steal time), which on a shared machine swamps a 1% effect in wall-clock time.
    clock = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # timer only: both variants pay it alike
        self.starts.append(self.clock())

    def periods(self, skip: int = 3) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1:])]


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

    def on_train_batch_end(self, trainer, *a) -> None:
        if self.on_for(trainer.global_step - 1 if trainer.global_step else 0):
            super().on_train_batch_end(trainer, *a)


def run_interleaved(args, cfg, loaders, logdir: str) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    timer = StepTimer()
    steps = args.steps * args.rounds
    watch = ToggledScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every)
    trainer = pl.Trainer(
        max_steps=steps, accelerator=args.device, devices=1, callbacks=[watch, timer],
        logger=TensorBoardLogger(logdir, name="bench"), log_every_n_steps=args.log_every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        precision=args.precision,
    )
    trainer.fit(TinyGPTModule(cfg, max_steps=steps), loaders[0])
    # starts[i] is taken at the start of step i; the period to starts[i + 1] is step i plus the
    # next step's batch-start hooks, so only the first step of each 2-step block is clean.
    on, off = [], []
    for i in range(4, len(timer.starts) - 1):
        if i % 2 == 0 and (i + 1) % args.log_every != 0:
            (on if ToggledScaleWatch.on_for(i) else off).append(timer.starts[i + 1] - timer.starts[i])
    return on, off


def run_chunk(with_callback: bool, args, cfg, loaders, logdir: str) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer()
    # The timer goes last so that its batch-start mark follows every other callback's hook.
    callbacks: list[pl.Callback] = []
    if with_callback:
        callbacks.append(TimedScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every))
    if args.sync_debug:
        callbacks.append(SyncDebug(args.log_every))
    callbacks.append(timer)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator=args.device, devices=1, callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name="bench"), log_every_n_steps=args.log_every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        precision=args.precision,
    )
    trainer.fit(TinyGPTModule(cfg, max_steps=args.steps), loaders[0])
    return timer.periods()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=50, help="log interval (default: Lightning's default, 50)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sync-debug", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (CPU device only; robust to a noisy host)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--interleaved", action="store_true",
                   help="one run, the callback's hooks on and off in alternate blocks of 2 steps (non-logging steps)")
    p.add_argument("--aa", action="store_true",
                   help="A/A run: both arms WITHOUT the callback, to show the measurement's own noise")
    args = p.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            p.error("--clock cpu measures host CPU time; use --clock wall on a GPU")
        StepTimer.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size,
                    n_head=max(1, args.n_embd // 64))
    if args.interleaved:
        loaders = make_loaders(cfg, args.batch_size, num_train=args.steps * args.rounds * args.batch_size)
        with TemporaryDirectory() as logdir:
            on, off = run_interleaved(args, cfg, loaders, logdir)
        pairs = [b / a for a, b in zip(off, on, strict=False)]
        print(f"interleaved: one run of {args.steps * args.rounds} steps, hooks on/off in blocks of 2 "
              f"({len(on)} clean non-logging steps on, {len(off)} off); clock={args.clock}, "
              f"threads={torch.get_num_threads()}")
        print(f"median step: hooks off {statistics.median(off) * 1e3:.2f} ms, on {statistics.median(on) * 1e3:.2f} ms; "
              f"pooled ratio {statistics.median(on) / statistics.median(off):.4f}; "
              f"median of paired ratios {statistics.median(pairs):.4f}")
        hook = statistics.median(TimedScaleWatch.hook_seconds)
        print(f"time inside ScaleWatch's hooks on a non-logging step: median {hook * 1e6:.0f} us")
        return 0
    loaders = make_loaders(cfg, args.batch_size, num_train=args.steps * args.batch_size)
    off: list[float] = []
    on: list[float] = []
    # Per-round ratios of the two arms' medians: a burst of load on the (shared) host slows one
    # round, and the median over rounds is robust to it, unlike a ratio of pooled medians.
    round_ratios: list[float] = []
    with TemporaryDirectory() as logdir:
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for flag in order:
                periods = run_chunk(flag and not args.aa, args, cfg, loaders, logdir)
                (on if flag else off).extend(periods)
                if flag:
                    med_round_on = statistics.median(periods)
                else:
                    med_round_off = statistics.median(periods)
            round_ratios.append(med_round_on / med_round_off)
    med_off, med_on = statistics.median(off), statistics.median(on)
    mean_off, mean_on = statistics.fmean(off), statistics.fmean(on)
    print(f"device={args.device} precision={args.precision} model: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
          f"T={cfg.block_size} batch={args.batch_size}; {len(on)} steps each way, log every {args.log_every}; "
          f"clock={args.clock}, threads={torch.get_num_threads()}")
    print(f"median step: without {med_off * 1e3:.2f} ms, with ScaleWatch {med_on * 1e3:.2f} ms")
    print(f"mean step (log steps included): without {mean_off * 1e3:.2f} ms, with {mean_on * 1e3:.2f} ms "
          f"(ratio {mean_on / mean_off:.4f})")
    if args.aa:
        print(f"A/A (no callback in either arm) median step-time ratio: pooled {med_on / med_off:.4f}, "
              f"median of per-round ratios {statistics.median(round_ratios):.4f}")
        return 0
    hook = statistics.median(TimedScaleWatch.hook_seconds)
    print(f"time inside ScaleWatch's hooks on a non-logging step: median {hook * 1e6:.0f} us "
          f"= {hook / med_off:.5f} of a step")
    print(f"per-round ratios: {' '.join(f'{r:.3f}' for r in round_ratios)}")
    print(f"pooled median step-time ratio (with / without): {med_on / med_off:.4f}")
    print(f"median step-time ratio (with / without), median over rounds: {statistics.median(round_ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
