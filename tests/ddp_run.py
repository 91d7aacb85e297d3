"""Real multi-process runs for the DDP tests: ``python ddp_run.py KIND OUT DEVICES [ARGS...]``.

With DEVICES > 1 Lightning's launcher starts the other ranks by re-running this script.
Every rank writes what its callback holds to ``OUT/rank<R>.json``.

* ``counts OUT DEVICES [CKPT_IN|-] [CKPT_OUT]``: the exact-count run; rank 0 alone writes
  TensorBoard events under ``OUT/tb``.
* ``gns OUT DEVICES ACCUM PROBLEM``: the noise-scale run; each rank writes the reduced EMAs, the
  method chosen and the exact B_simple of the problem (``torch.func``).
* ``health OUT DEVICES``: a NaN loss with ``stop_on="critical"``; each rank writes where it stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402

N_SAMPLES = 44  # per rank 22 under 2-process DDP: batches 4,4,4,4,4,2 (a short last batch)
GNS_STEPS = 600
GNS_MICRO_BATCH = 8


def _trainer(devices: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, **kw)


def counts(out: Path, devices: int, args: list[str]) -> dict:
    from helpers import TinyLM, VarLenDataset, loader

    ckpt_in = args[0] if args and args[0] != "-" else None
    ckpt_out = args[1] if len(args) > 1 else None
    torch.manual_seed(0)
    ds = VarLenDataset(n=N_SAMPLES)
    watch = ScaleWatch(flops="6N+attn", n_layer=1, d_model=16, log_every_n_steps=4)
    callbacks: list = [watch]
    if ckpt_out:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_out, save_top_k=-1, every_n_epochs=1,
                                         save_on_train_epoch_end=True))
    trainer = _trainer(devices, callbacks, max_epochs=2 if ckpt_out is None else 1, log_every_n_steps=1,
                       logger=TensorBoardLogger(str(out), name="tb", version=0), enable_checkpointing=bool(ckpt_out))
    # single process: batches of 8 = the global batch of 2 ranks x 4
    trainer.fit(TinyLM(), loader(ds, 4 if devices > 1 else 8), ckpt_path=ckpt_in)
    return {"tokens": watch.tokens, "samples": watch.samples, "flops": watch.flops,
            "true_tokens_per_epoch": ds.true_tokens, "global_step": trainer.global_step,
            "world_size": trainer.world_size, "rank": trainer.global_rank}


def gns(out: Path, devices: int, args: list[str]) -> dict:
    from gns_problems import Classifier, exact_b_simple, loader, make_data, make_model

    accum, kind = int(args[0]), args[1]
    data = make_data()
    net = make_model(kind)
    watch = ScaleWatch(tokens_fn=lambda b: b[0].shape[0], samples_fn=lambda b: b[0].shape[0], log_every_n_steps=50,
                       gns_decay=0.995)
    trainer = _trainer(devices, [watch], max_steps=GNS_STEPS, accumulate_grad_batches=accum, logger=False,
                       enable_checkpointing=False)
    trainer.fit(Classifier(net), loader(data, GNS_MICRO_BATCH))
    g2, trace = watch.noise_scale.estimates()
    return {"method": watch.gns_method, "comm_hook": watch.noise_scale.ddp_hook is not None, "g2": g2, "trace": trace,
            "exact": exact_b_simple(net, data), "world_size": trainer.world_size,
            "global_step": trainer.global_step, "rank": trainer.global_rank}


def health(out: Path, devices: int, args: list[str]) -> dict:
    """A NaN loss at step 6 with ``stop_on="critical"``: every rank must stop at the same log point."""
    from helpers import TinyLM, VarLenDataset, loader

    class NaNAt6(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + float("nan") if self.trainer.global_step == 6 else loss

    torch.manual_seed(0)
    watch = ScaleWatch(log_every_n_steps=4, stop_on="critical", alerts_jsonl=out / "alerts.jsonl")
    trainer = _trainer(devices, [watch], max_steps=40, log_every_n_steps=1, enable_checkpointing=False,
                       logger=TensorBoardLogger(str(out), name="tb", version=0))
    trainer.fit(NaNAt6(), loader(VarLenDataset(n=400), 4))
    return {"global_step": trainer.global_step, "rank": trainer.global_rank, "world_size": trainer.world_size,
            "firing": sorted(k for k, _ in watch.monitor.alerts.firing())}


def main() -> None:
    kind, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    record = {"counts": counts, "gns": gns, "health": health}[kind](out, devices, sys.argv[4:])
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
