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

LAWS = Path(__file__).resolve().parent / "laws"  # fitted on this model's pilot runs by pilot_sweep.py


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

    print("\n" + watch.summary())
    print(f"  (wall time of trainer.fit, validation included: {elapsed:.0f} s; the alert table, the conventions "
          "and the laws are in TensorBoard's text tab)")
    print(f"TensorBoard logs: {trainer.logger.log_dir}\n  view them with: tensorboard --logdir {args.logdir} "
          "--samples_per_plugin scalars=100000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
