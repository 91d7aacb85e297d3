"""A real multi-process run for the DDP test: ``python ddp_run.py OUT_DIR DEVICES [CKPT_IN] [CKPT_OUT]``.

With DEVICES > 1 Lightning's launcher starts the other ranks by re-running this
script. Every rank writes what its callback holds to ``OUT_DIR/rank<R>.json``;
rank 0 alone writes TensorBoard events under ``OUT_DIR/tb``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import TinyLM, VarLenDataset, loader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402

N_SAMPLES = 44  # per rank 22 under 2-process DDP: batches 4,4,4,4,4,2 (a short last batch)


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    ckpt_in = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    ckpt_out = sys.argv[4] if len(sys.argv) > 4 else None
    epochs = 2 if ckpt_out is None else 1
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = VarLenDataset(n=N_SAMPLES)
    watch = ScaleWatch(flops="6N+attn", n_layer=1, d_model=16, log_every_n_steps=4)
    callbacks = [watch]
    if ckpt_out:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_out, save_top_k=-1, every_n_epochs=1,
                                         save_on_train_epoch_end=True))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs, callbacks=callbacks, logger=TensorBoardLogger(str(out), name="tb", version=0),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(ckpt_out),
        log_every_n_steps=1,
    )
    # single process: batches of 8 = the global batch of 2 ranks x 4
    trainer.fit(TinyLM(), loader(ds, 4 if devices > 1 else 8), ckpt_path=ckpt_in)
    record = {"tokens": watch.tokens, "samples": watch.samples, "flops": watch.flops,
              "true_tokens_per_epoch": ds.true_tokens, "global_step": trainer.global_step,
              "world_size": trainer.world_size}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
