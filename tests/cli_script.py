"""A LightningCLI training script, as users write them, for the preset test (run as a subprocess)."""

from __future__ import annotations

import lightning.pytorch as pl
from helpers import TinyLM, VarLenDataset, loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(VarLenDataset(n=8), 2)


class Model(TinyLM):
    def __init__(self, d: int = 16) -> None:
        super().__init__(d=d)


if __name__ == "__main__":
    cli = LightningCLI(Model, Data, save_config_kwargs={"overwrite": True})
    print("CALLBACKS", " ".join(f"{type(c).__name__}:{c.dirpath}" if isinstance(c, ModelCheckpoint)
                                else type(c).__name__ for c in cli.trainer.callbacks))
