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
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402
from scalewatch.gns_capture import DDPCommHookCapture, ParamGradHooks, PerExampleNorms  # noqa: E402

# Seconds spent inside the noise-scale code itself (autograd hooks included): a direct
# measurement that does not depend on the step-time noise of a shared machine.
GNS_SECONDS = [0.0]


def _timed(fn):
    @functools.wraps(fn)  # keeps the signature DDP inspects on a comm hook
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            GNS_SECONDS[0] += time.perf_counter() - t
    return wrapper


for _cls, _names in ((ParamGradHooks, ("_hook", "end_backward")), (DDPCommHookCapture, ("_hook", "end_backward")),
                     (PerExampleNorms, ("_forward_hook", "_on_grad", "end_backward")),
                     (ScaleWatch, ("_gns_step",))):
    for _name in _names:
        setattr(_cls, _name, _timed(getattr(_cls, _name)))


class StepTimer(pl.Callback):
    clock = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # timer only: both arms pay it alike
        self.marks.append(self.clock())

    def periods(self, skip: int = 3) -> list[float]:
        return [b - a for a, b in zip(self.marks[skip:], self.marks[skip + 1:], strict=False)]


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
        if self._capture is None:
            self._capture = self.watch._gns_capture  # the capture ScaleWatch chose
        on = step % 2 == 1
        if on and self.watch._gns_capture is None:
            if hasattr(self._capture, "reactivate"):
                self._capture.reactivate()  # a DDP comm hook stays registered: switch it back on
            else:
                self._capture.__init__(*self._init_args(pl_module))  # re-register its hooks
            self.watch._gns_capture = self._capture
        elif not on and self.watch._gns_capture is not None:
            self.watch._gns_capture.remove()
            self.watch._gns_capture = None
        if on:
            self.on_steps.add(step)

    def _init_args(self, pl_module):
        if isinstance(self._capture, PerExampleNorms):
            return (pl_module, "norm" if self.watch.gns_method == "per_example_norm" else "all")
        return (pl_module.parameters(),)


def run_interleaved(args, cfg, loader, on_mode: str) -> tuple[list[float], list[float], str | None, float]:
    torch.manual_seed(0)
    timer = StepTimer()
    watch = ScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every, gns=on_mode)
    accumulate = args.accumulate if args.method == "accumulation" else 1
    toggle = Toggle(watch, accumulate)
    ddp = args.method == "ddp"
    steps = args.steps * args.rounds
    trainer = pl.Trainer(
        max_steps=steps, accelerator=args.device, devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
        callbacks=[toggle, watch, timer], logger=False, log_every_n_steps=args.log_every,
        accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, precision=args.precision,
    )
    GNS_SECONDS[0] = 0.0
    trainer.fit(TinyGPTModule(cfg, max_steps=steps), loader)
    inside = GNS_SECONDS[0] / max(len(toggle.on_steps), 1)
    # marks[i] is taken at optimizer step i + 1; the period ending there is that step's
    periods = {i + 1: b - a for i, (a, b) in enumerate(zip(timer.marks, timer.marks[1:], strict=False), start=1)}
    on = [periods[s] for s in sorted(periods) if s > 4 and s in toggle.on_steps]
    off = [periods[s] for s in sorted(periods) if s > 4 and s not in toggle.on_steps]
    return on, off, watch.gns_method, inside


def run_chunk(gns: str, args, cfg, loader) -> tuple[list[float], str | None]:
    torch.manual_seed(0)
    timer = StepTimer()
    watch = ScaleWatch(flops="6N+attn", log_every_n_steps=args.log_every, gns=gns)
    ddp = args.method == "ddp"
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator=args.device, devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
        callbacks=[watch, timer], logger=False, log_every_n_steps=args.log_every,
        accumulate_grad_batches=args.accumulate if args.method == "accumulation" else 1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        precision=args.precision,
    )
    trainer.fit(TinyGPTModule(cfg, max_steps=args.steps), loader)
    return timer.periods(), watch.gns_method


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("accumulation", "per_example", "per_example_norm", "ddp"),
                   default="accumulation")
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (per rank)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time (CPU device only; robust to a noisy shared host)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--chunked", action="store_true", help="also run the chunked design (separate runs per arm)")
    args = p.parse_args()
    if args.clock == "cpu":
        StepTimer.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method == "ddp":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size,
                    n_head=max(1, args.n_embd // 64))
    per_step = args.batch_size * (args.accumulate if args.method == "accumulation" else 1)
    loader = make_loaders(cfg, args.batch_size,
                          num_train=args.steps * args.rounds * per_step * (2 if args.method == "ddp" else 1))[0]
    on_mode = args.method if args.method.startswith("per_example") else "auto"
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
    model = (f"device={args.device} precision={args.precision} model: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
             f"T={cfg.block_size} micro-batch={args.batch_size}"
             f"{f' x {args.accumulate}' if args.method == 'accumulation' else ''}"
             f"{' per rank, 2 ranks' if args.method == 'ddp' else ''}; clock={args.clock}, "
             f"threads={torch.get_num_threads()}")

    on, off, method, inside = run_interleaved(args, cfg, loader, on_mode)
    if rank0:
        pairs = [b / a for a, b in zip(off, on, strict=False)]
        med_off, med_on = statistics.median(off), statistics.median(on)
        print(f"method={method} {model}")
        print(f"interleaved, one run, capture toggled every step ({len(on)} steps on, {len(off)} off):")
        print(f"  median optimizer step: capture off {med_off * 1e3:.2f} ms, on {med_on * 1e3:.2f} ms; "
              f"pooled ratio {med_on / med_off:.4f}")
        print(f"  median of paired step-time ratios (on / off): {statistics.median(pairs):.4f}")
        print(f"  time inside the noise-scale code (hooks, folding, EMA update) per step: {inside * 1e3:.2f} ms "
              f"= {inside / med_off:.4f} of a step")
    if not args.chunked:
        return 0

    off_t: list[float] = []
    on_t: list[float] = []
    ratios: list[float] = []
    for r in range(args.rounds):
        medians = {}
        for mode in (("off", on_mode) if r % 2 == 0 else (on_mode, "off")):
            periods, _ = run_chunk(mode, args, cfg, loader)
            (off_t if mode == "off" else on_t).extend(periods)
            medians[mode] = statistics.median(periods)
        ratios.append(medians[on_mode] / medians["off"])
    if rank0:
        med_off, med_on = statistics.median(off_t), statistics.median(on_t)
        print(f"chunked, {args.rounds} rounds of separate runs ({len(on_t)} steps each way):")
        print(f"  median optimizer step: gns off {med_off * 1e3:.2f} ms, gns on {med_on * 1e3:.2f} ms; "
              f"pooled ratio {med_on / med_off:.4f}")
        print(f"  per-round ratios: {' '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
