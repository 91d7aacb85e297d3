"""A real multi-process run for the noise-scale DDP test: ``python gns_ddp_run.py OUT DEVICES ACCUM KIND``.

Each rank writes the callback's reduced noise-scale EMAs, the method it chose and the
exact B_simple of the problem (``torch.func``) to ``OUT/rank<R>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from gns_problems import Classifier, exact_b_simple, loader, make_data, make_model  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402

STEPS = 600
MICRO_BATCH = 8


def main() -> None:
    out, devices, accum, kind = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    data = make_data()
    net = make_model(kind)
    watch = ScaleWatch(tokens_fn=lambda b: b[0].shape[0], samples_fn=lambda b: b[0].shape[0], log_every_n_steps=50,
                       gns_decay=0.995)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        accumulate_grad_batches=accum, callbacks=[watch], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Classifier(net), loader(data, MICRO_BATCH))
    m_g2, m_tr, weight = watch._gns_host
    record = {"method": watch.gns_method, "comm_hook": watch._ddp_hook is not None, "g2": m_g2 / weight, "trace": m_tr / weight,
              "exact": exact_b_simple(net, data), "world_size": trainer.world_size,
              "global_step": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
