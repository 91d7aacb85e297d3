"""Step-time cost of the gradient noise scale: ScaleWatch with the noise scale on vs off, side by side.

    python benchmarks/gns_overhead.py --method accumulation [--accumulate 4] [--rounds 6] [--steps 30] [--chunked]
    python benchmarks/gns_overhead.py --method per_example      # or per_example_norm
    python benchmarks/gns_overhead.py --method ddp          # 2 CPU processes (gloo), rank 0 prints

Both arms attach ScaleWatch; only the noise-scale capture differs, so the ratio is its own
cost. Two designs, both printed:

* interleaved (the figure of record): ONE training run whose capture is switched on and off
  every other optimizer step (hooks removed and re-registered), so both arms share the
  process, the allocator state and every drift of this shared machine; the ratio is the
  median of the paired (on, off) neighbours.
* chunked (``--rounds``): separate short runs with ``gns="off"`` and the method, alternating.
  On a shared VM its per-round ratios spread by several percent.

A step's time is the period between consecutive optimizer steps (all micro-batches, hooks,
the optimizer and data loading included). Also printed: the time spent inside the
noise-scale code itself. Targets (issue 4): ratio <= 1.02 for the DDP and accumulation
methods; per-example reported.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import lightning.pytorch as pl
from step_timing import (Comparison, StepTimer, add_common_args, apply_clock_and_threads, clock_line,
                         format_ratios, make_loaders, model_config, model_line, run_rounds, train)

from scalewatch import ScaleWatch
from scalewatch.gns_capture import DDPCommHookCapture, NoiseScaleTracker, ParamGradHooks, PerExampleNorms

# Seconds spent inside the noise-scale code itself (autograd hooks included): a direct
# measurement that does not depend on the step-time noise of a shared machine.
GNS_SECONDS = [0.0]


def _timed(fn, when=lambda *a, **k: True):
    @functools.wraps(fn)  # keeps the signature DDP inspects on a comm hook
    def wrapper(*a, **k):
        if not when(*a, **k):
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            GNS_SECONDS[0] += time.perf_counter() - t
    return wrapper


for _cls, _names in ((ParamGradHooks, ("_hook", "end_backward")), (DDPCommHookCapture, ("_hook", "end_backward")),
                     (PerExampleNorms, ("_forward_hook", "_on_grad", "end_backward"))):
    for _name in _names:
        setattr(_cls, _name, _timed(getattr(_cls, _name)))
# The per-optimizer-step maths, counted on steps with a capture installed (the off steps of the
# interleaved run only pass through it).
NoiseScaleTracker.step = _timed(NoiseScaleTracker.step, when=lambda tracker, *a, **k: tracker.capture is not None)


class Toggle(pl.Callback):
    """Switches the noise-scale capture on for odd optimizer steps and off for even ones."""

    def __init__(self, watch: ScaleWatch, accumulate: int) -> None:
        self.watch, self.accumulate = watch, accumulate
        self.on_steps: set[int] = set()
        self._capture = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % self.accumulate:
            return  # only at the first micro-batch of an optimizer step
        step = trainer.global_step + 1  # the step this micro-batch belongs to
        tracker = self.watch.noise_scale
        if self._capture is None:
            self._capture = tracker.capture  # the capture ScaleWatch chose
        on = step % 2 == 1
        if on and tracker.capture is None:
            if hasattr(self._capture, "reactivate"):
                self._capture.reactivate()  # a DDP comm hook stays registered: switch it back on
            else:
                self._capture.__init__(*self._init_args(pl_module))  # re-register its hooks
            tracker.capture = self._capture
        elif not on and tracker.capture is not None:
            tracker.remove()  # removes the capture's hooks and sets tracker.capture to None
        if on:
            self.on_steps.add(step)

    def _init_args(self, pl_module):
        if isinstance(self._capture, PerExampleNorms):
            return (pl_module, "norm" if self.watch.gns_method == "per_example_norm" else "all")
        return (pl_module.parameters(),)


def _trainer_kwargs(args) -> dict:
    ddp = args.method == "ddp"
    return {"devices": 2 if ddp else 1, "strategy": "ddp" if ddp else "auto",
            "accumulate_grad_batches": args.accumulate if args.method == "accumulation" else 1}


def run_interleaved(args, cfg, loader, on_mode: str) -> tuple[list[float], list[float], str | None, float]:
    timer = StepTimer("on_before_optimizer_step")
    watch = ScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every, gns=on_mode)
    kwargs = _trainer_kwargs(args)
    toggle = Toggle(watch, kwargs["accumulate_grad_batches"])
    GNS_SECONDS[0] = 0.0
    train(args, cfg, loader, [toggle, watch, timer], args.steps * args.rounds, **kwargs)
    inside = GNS_SECONDS[0] / max(len(toggle.on_steps), 1)
    # marks[i] is taken at optimizer step i + 1; the period ending there is that step's
    periods = {i + 1: b - a for i, (a, b) in enumerate(zip(timer.marks, timer.marks[1:], strict=False), start=1)}
    on = [periods[s] for s in sorted(periods) if s > 4 and s in toggle.on_steps]
    off = [periods[s] for s in sorted(periods) if s > 4 and s not in toggle.on_steps]
    return on, off, watch.gns_method, inside


def run_chunk(gns: str, args, cfg, loader) -> tuple[list[float], str | None]:
    timer = StepTimer("on_before_optimizer_step")
    watch = ScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every, gns=gns)
    train(args, cfg, loader, [watch, timer], args.steps, **_trainer_kwargs(args))
    return timer.periods(), watch.gns_method


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("accumulation", "per_example", "per_example_norm", "ddp"),
                   default="accumulation")
    p.add_argument("--accumulate", type=int, default=4)
    add_common_args(p, steps=30, batch_help="sequences per micro-batch (per rank)")
    p.add_argument("--chunked", action="store_true", help="also run the chunked design (separate runs per arm)")
    args = p.parse_args()
    apply_clock_and_threads(args, p)
    if args.method == "ddp":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    cfg = model_config(args)
    per_step = args.batch_size * (args.accumulate if args.method == "accumulation" else 1)
    loader = make_loaders(cfg, args.batch_size,
                          num_train=args.steps * args.rounds * per_step * (2 if args.method == "ddp" else 1))[0]
    on_mode = args.method if args.method.startswith("per_example") else "auto"
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
    model = (f"{model_line(args, cfg)} micro-batch={args.batch_size}"
             f"{f' x {args.accumulate}' if args.method == 'accumulation' else ''}"
             f"{' per rank, 2 ranks' if args.method == 'ddp' else ''}; {clock_line(args)}")

    on, off, method, inside = run_interleaved(args, cfg, loader, on_mode)
    if rank0:
        c = Comparison(off, on)
        print(f"method={method} {model}")
        print(f"interleaved, one run, capture toggled every step ({len(on)} steps on, {len(off)} off):")
        print(f"  {c.medians('capture off', 'on', step='optimizer step')}; pooled ratio {c.pooled:.4f}")
        print(f"  median of paired step-time ratios (on / off): {c.paired:.4f}")
        print(f"  time inside the noise-scale code (hooks, folding, EMA update) per step: {inside * 1e3:.2f} ms "
              f"= {inside / c.med_off:.4f} of a step")
    if not args.chunked:
        return 0

    off_t, on_t, ratios = run_rounds(args.rounds, lambda flag: run_chunk(on_mode if flag else "off", args, cfg,
                                                                         loader)[0])
    if rank0:
        c = Comparison(off_t, on_t)
        print(f"chunked, {args.rounds} rounds of separate runs ({len(on_t)} steps each way):")
        print(f"  {c.medians('gns off', 'gns on', step='optimizer step')}; pooled ratio {c.pooled:.4f}")
        print(f"  per-round ratios: {format_ratios(ratios)}; median {statistics.median(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
