"""The main job: train a small GPT byte-level on the Python standard library with ScaleWatch attached.

    python examples/train_tiny_gpt.py            # about 2 minutes on a 2-core CPU
    tensorboard --logdir runs                    # then open http://localhost:6006

The training script is an ordinary Lightning script; the only scalewatch line
is the callback in ``Trainer(callbacks=[...])``. By default it is given the laws
fitted on this model's own pilot runs (``examples/laws/``, made by
``examples/pilot_sweep.py``): a curve law, for the predicted loss curve with its
band and the final-loss forecast, and a Chinchilla law L(N, D), for the
compute-optimal allocation behind the ``undertrained`` alert. ``--no-law`` runs
without them. It ends with a summary of the run against those laws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402
from scalewatch.detectors import CHINCHILLA_TOKENS_PER_PARAM  # noqa: E402
from scalewatch.laws import optimal_allocation  # noqa: E402

LAWS = Path(__file__).resolve().parent / "laws"  # fitted on this model's pilot runs by pilot_sweep.py


def print_summary(watch: ScaleWatch, elapsed: float) -> None:
    """What the run spent and how it did against its laws, in a few lines."""
    s, n, tokens = watch.latest, watch.n_params, watch.tokens
    print("\nscalewatch summary")
    print(f"  spent:      {tokens:,} tokens, {watch.flops:.3g} FLOPs in {elapsed:.0f} s; N = {n:,}")
    print(f"  counted as: {watch.describe()}")
    law = watch.config.law
    if law is not None:  # the compute-optimal split of this run's compute (C = 6ND) under the pilots' law
        n_opt, d_opt = (float(x) for x in optimal_allocation(law, 6.0 * n * tokens))
        optimum = f"{d_opt / n_opt:.1f} at this compute by the pilots' law (N ~ {n_opt:,.0f}, D ~ {d_opt:,.0f})"
    else:
        optimum = f"~{CHINCHILLA_TOKENS_PER_PARAM:g} (Chinchilla's rule of thumb; no law given)"
    print(f"  allocation: {tokens / n:.2f} tokens/param; compute-optimal is {optimum}")
    loss = watch.monitor.last.loss
    if "loss_pred" in s:
        inside = s["loss_pred_low"] <= loss <= s["loss_pred_high"]
        print(f"  loss:       final train loss {loss:.3f} nats/byte; the pilots' curve law predicted "
              f"{s['loss_pred']:.3f} (90% band {s['loss_pred_low']:.3f}-{s['loss_pred_high']:.3f}): "
              f"{'inside' if inside else 'OUTSIDE'} the band")
    else:
        print(f"  loss:       final train loss {loss:.3f} nats/byte (no curve law: no prediction)")
    if "loss_forecast_final" in s:
        print(f"  forecast:   final loss {s['loss_forecast_final']:.3f} (90% band {s['loss_forecast_final_low']:.3f}-"
              f"{s['loss_forecast_final_high']:.3f}), from the run up to step {s['loss_forecast_at_step']:.0f} "
              "with the curve law as prior")
    if "gns/b_crit" in s:
        print(f"  noise:      B_simple = {s['gns/b_simple']:.1f} sequences = {s['gns/b_crit']:,.0f} tokens "
              f"(critical batch estimate, {watch.gns_method}) vs a batch of {s['gns/batch_tokens']:,.0f} tokens: "
              f"{s['gns/compute_factor']:.2f}x the minimum compute, {s['gns/steps_factor']:.2f}x the minimum steps")
    book = watch.monitor.alerts
    firing = book.firing()
    said = {(a.kind, a.key): a.message for a in book.recent if a.state == "firing"}  # the newest firing message
    print(f"  alerts:     {len(firing) or 'none'} firing at the end")
    for slot, severity in firing.items():
        print(f"    {slot[0]} ({severity}): {said.get(slot, '')}".rstrip(": "))
    print("  (the alert table, the conventions and the laws are in TensorBoard's text tab)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=2,
                   help="micro-batches per optimizer step (>1 gives the gradient noise scale for free)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--flops", default="6N+attn", help="6N, 6N+attn, measured, or FLOPs per token")
    p.add_argument("--logdir", default="runs")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--curve-law", default=str(LAWS / "curve_law.json"),
                   help="curve-law file: the predicted loss curve, its band and the final-loss forecast")
    p.add_argument("--law", default=str(LAWS / "chinchilla_law.json"),
                   help="Chinchilla law file: the compute-optimal tokens per parameter")
    p.add_argument("--no-law", action="store_true", help="run without either law (no prediction, no forecast; "
                                                         "the undertraining check falls back to ~20 tokens/param)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=4)
    train, val = make_loaders(cfg, args.batch_size, num_train=args.max_steps * args.batch_size * args.accumulate)
    module = TinyGPTModule(cfg, lr=args.lr, warmup_steps=min(40, args.max_steps // 10), max_steps=args.max_steps)

    flops = args.flops if args.flops in ("6N", "6N+attn", "measured") else float(args.flops)
    watch = ScaleWatch(flops=flops, curve_law=None if args.no_law else args.curve_law,
                       law=None if args.no_law else args.law)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        accelerator="auto",
        devices=1,
        accumulate_grad_batches=args.accumulate,
        callbacks=[watch],
        logger=TensorBoardLogger(args.logdir, name="tiny_gpt"),
        log_every_n_steps=args.log_every,
        val_check_interval=max(1, args.max_steps // 4),
        limit_val_batches=4,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    elapsed = time.perf_counter() - start

    print_summary(watch, elapsed)
    print(f"TensorBoard logs: {trainer.logger.log_dir}\n  view them with: tensorboard --logdir {args.logdir} "
          "--samples_per_plugin scalars=100000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
