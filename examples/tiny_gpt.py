"""A small GPT trained byte-level on the Python standard library's own source files.

Real text that needs no download. Used by the main example, the tests and the
benchmarks. The attention is written with two explicit matmuls (not SDPA) so
that ``torch.utils.flop_counter.FlopCounterMode`` sees its FLOPs on every device.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 128  # context length T
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder; the output head shares the token embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def stdlib_bytes(max_bytes: int = 4_000_000) -> bytes:
    """The standard library's ``.py`` files, concatenated in sorted order (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            out += path.read_bytes()
        except OSError:
            continue
        if len(out) >= max_bytes:
            break
    if len(out) < 10_000:
        raise RuntimeError(f"found only {len(out)} bytes of standard-library source under {root}")
    return bytes(out[:max_bytes])


class ByteWindows(Dataset):
    """Deterministic windows of ``block_size + 1`` bytes: (input ids, next-byte targets)."""

    def __init__(self, data: torch.Tensor, block_size: int, num_samples: int, seed: int = 0) -> None:
        self.data, self.block_size = data, block_size
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - block_size - 1, (num_samples,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.data[s : s + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


#: LR schedules of :class:`TinyGPTModule`: the main job's cosine, and the constant LR its pilot sweep adds
#: (a curve law needs curves under two schedules to tell the power law from the annealing term).
SCHEDULES = ("cosine", "constant")


class TinyGPTModule(pl.LightningModule):
    """The LightningModule a user already has: nothing in it knows about scalewatch."""

    def __init__(self, cfg: GPTConfig | None = None, lr: float = 1e-3, warmup_steps: int = 20,
                 max_steps: int = 1000, schedule: str = "cosine") -> None:
        super().__init__()
        cfg = cfg or GPTConfig()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters({"lr": lr, "warmup_steps": warmup_steps, "max_steps": max_steps,
                                   "schedule": schedule, **asdict(cfg)})
        self.model = GPT(cfg)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)))

    def configure_optimizers(self):  # type: ignore[override]
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=0.1, betas=(0.9, 0.95))

        def schedule(step: int) -> float:  # linear warmup, then cosine to 10% of peak (or constant at the peak)
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.schedule == "constant":
                return 1.0
            t = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_loaders(cfg: GPTConfig, batch_size: int, num_train: int, num_val: int = 64,
                 max_bytes: int = 4_000_000) -> tuple[DataLoader, DataLoader]:
    """Train on the first 95% of the bytes, validate on the last 5%."""
    data = torch.frombuffer(bytearray(stdlib_bytes(max_bytes)), dtype=torch.uint8)
    split = int(0.95 * len(data))
    train = ByteWindows(data[:split], cfg.block_size, num_train, seed=0)
    val = ByteWindows(data[split:], cfg.block_size, num_val, seed=1)
    return (DataLoader(train, batch_size=batch_size, shuffle=False),
            DataLoader(val, batch_size=batch_size, shuffle=False))
