"""Small, real Lightning set-ups whose token counts are known exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

VOCAB = 32


class VarLenDataset(Dataset):
    """Padded sequences of random length with some labels ignored (-100).

    ``true_tokens`` is the exact number of positions that carry loss.
    """

    def __init__(self, n: int, seq_len: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq_len), generator=g)
        lengths = torch.randint(1, seq_len + 1, (n,), generator=g)
        self.mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        self.labels = torch.where(self.mask.bool(), torch.roll(self.ids, -1, 1), torch.full_like(self.ids, -100))
        self.labels[:, 0] = torch.where(torch.rand(n, generator=g) < 0.5, -100, self.labels[:, 0])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    @property
    def true_tokens(self) -> int:
        return int(((self.mask == 1) & (self.labels != -100)).sum())


class TinyLM(pl.LightningModule):
    """Embedding + linear language model taking dict batches."""

    def __init__(self, d: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.out = nn.Linear(d, VOCAB)
        self.lr = lr
        self.seen_losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.out(self.emb(batch["input_ids"]))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
        self.seen_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, logger=TensorBoardLogger(str(tmp_path), name="tb", version=0),
                    log_every_n_steps=1)
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log directory: tag -> [(step, value)]."""
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def loader(ds: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class SyncSpy:
    """Counts host-sync-prone tensor calls while it is active."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__repr__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._orig: dict[str, object] = {}

    def __enter__(self) -> SyncSpy:
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, __name=name, __orig=orig, **k):
                self.calls.append(__name)
                return __orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def run_ddp(kind: str, out, devices: int, *args: str) -> dict[int, dict]:
    """Run ``ddp_run.py KIND OUT DEVICES ARGS...`` as real processes; rank -> the record it wrote."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1")
    env.pop("MASTER_PORT", None)
    script = Path(__file__).resolve().parent / "ddp_run.py"
    proc = subprocess.run([sys.executable, str(script), kind, str(out), str(devices), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
