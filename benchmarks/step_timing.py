"""The step-time harness shared by ``overhead.py`` and ``gns_overhead.py``.

Both benchmarks train the tiny GPT of ``examples/tiny_gpt.py`` in two designs, an interleaved
one (one run, the thing measured switched on and off between neighbouring steps) and a chunked
one (separate short runs per arm, alternating in rounds), and compare step times. What they
share lives here: the step timer and its clock, the common command-line options, the Trainer,
the chunked rounds and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders  # noqa: E402

__all__ = ["Comparison", "GPTConfig", "StepTimer", "add_common_args", "apply_clock_and_threads", "clock_line",
           "format_ratios", "make_loaders", "model_config", "model_line", "run_rounds", "train"]


class StepTimer(pl.Callback):
    """Marks the clock at every call of one hook; a step's time is the period between two marks.

    Args:
        hook: ``"on_train_batch_start"`` (a period is one batch: every callback hook, the
            optimizer step and data loading) or ``"on_before_optimizer_step"`` (a period is one
            optimizer step: all its micro-batches included).
    """

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step")
    # "cpu" = process CPU time of all threads: immune to the host descheduling this VM
    # (steal time), which on a shared machine swamps a 1% effect in wall-clock time.
    clock = staticmethod(time.perf_counter)

    def __init__(self, hook: str = "on_train_batch_start") -> None:
        if hook not in self.HOOKS:
            raise ValueError(f"hook must be one of {self.HOOKS}, got {hook!r}")
        self.hook = hook
        self.marks: list[float] = []
        setattr(self, hook, self._mark)  # only the chosen hook marks; the other stays Callback's no-op

    def _mark(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # timer only: both arms pay it alike
        self.marks.append(self.clock())

    def periods(self, skip: int = 3) -> list[float]:
        """Periods between consecutive marks, the first ``skip`` marks (warm-up) left out."""
        return [b - a for a, b in zip(self.marks[skip:], self.marks[skip + 1:], strict=False)]


def add_common_args(p: argparse.ArgumentParser, *, steps: int, batch_help: str | None = None,
                    log_help: str | None = None) -> None:
    """The options both benchmarks take: the designs' size, the model, the device, the clock."""
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--log-every", type=int, default=50, help=log_help)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help=batch_help)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (CPU device only; robust to a noisy shared host)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def apply_clock_and_threads(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if args.clock == "cpu":
        if args.device != "cpu":
            p.error("--clock cpu measures host CPU time; use --clock wall on a GPU")
        StepTimer.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size,
                     n_head=max(1, args.n_embd // 64))


def model_line(args: argparse.Namespace, cfg: GPTConfig) -> str:
    return (f"device={args.device} precision={args.precision} model: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
            f"T={cfg.block_size}")


def clock_line(args: argparse.Namespace) -> str:
    return f"clock={args.clock}, threads={torch.get_num_threads()}"


def train(args: argparse.Namespace, cfg: GPTConfig, loader: Any, callbacks: list[pl.Callback], steps: int,
          **trainer_kwargs: Any) -> pl.Trainer:
    """Trains a fresh tiny GPT (seed 0) for ``steps`` optimizer steps with ``callbacks``, quietly."""
    torch.manual_seed(0)
    trainer_kwargs.setdefault("logger", False)
    trainer = pl.Trainer(
        max_steps=steps, accelerator=args.device, callbacks=callbacks, log_every_n_steps=args.log_every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        precision=args.precision, **{"devices": 1, **trainer_kwargs},
    )
    trainer.fit(TinyGPTModule(cfg, max_steps=steps), loader)
    return trainer


def run_rounds(rounds: int, run_arm: Callable[[bool], list[float]]) -> tuple[list[float], list[float], list[float]]:
    """The chunked design: per round, one run per arm (``run_arm(on)`` returns its step times),
    the order alternating between rounds. Returns ``(off, on, per-round ratios)``.

    Per-round ratios of the two arms' medians: a burst of load on the (shared) host slows one
    round, and the median over rounds is robust to it, unlike a ratio of pooled medians.
    """
    off: list[float] = []
    on: list[float] = []
    ratios: list[float] = []
    for r in range(rounds):
        medians = {}
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            periods = run_arm(flag)
            (on if flag else off).extend(periods)
            medians[flag] = statistics.median(periods)
        ratios.append(medians[True] / medians[False])
    return off, on, ratios


def format_ratios(ratios: Sequence[float]) -> str:
    return " ".join(f"{r:.3f}" for r in ratios)


@dataclass
class Comparison:
    """Step times of the two arms (seconds): medians, pooled ratio and, for the interleaved
    design (``off[i]`` and ``on[i]`` neighbours), the median of the paired ratios."""

    off: list[float]
    on: list[float]

    @property
    def med_off(self) -> float:
        return statistics.median(self.off)

    @property
    def med_on(self) -> float:
        return statistics.median(self.on)

    @property
    def pooled(self) -> float:
        """Ratio of the two arms' median step times (on / off)."""
        return self.med_on / self.med_off

    @property
    def paired(self) -> float:
        """Median of the ratios of paired neighbours (on / off)."""
        return statistics.median([b / a for a, b in zip(self.off, self.on, strict=False)])

    def medians(self, off_name: str, on_name: str, step: str = "step") -> str:
        return f"median {step}: {off_name} {self.med_off * 1e3:.2f} ms, {on_name} {self.med_on * 1e3:.2f} ms"
