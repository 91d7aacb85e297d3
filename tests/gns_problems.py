"""Problems whose gradient noise scale is known exactly: per-example gradients by ``torch.func``.

A fixed finite data set is the population: G is the mean of the per-example
gradients, Sigma their (population) covariance, B_simple = tr(Sigma) / |G|^2.
The learning rate is zero, so the weights never move and the exact value at the
current weights is the value for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

N_EXAMPLES = 8192
D_IN = 8
N_CLASSES = 3


def make_data(seed: int = 0, n: int = N_EXAMPLES) -> TensorDataset:
    """Classification data from a noisy random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    teacher = torch.randn(D_IN, N_CLASSES, generator=g)
    logits = x @ teacher + 1.5 * torch.randn(n, N_CLASSES, generator=g)
    return TensorDataset(x, logits.argmax(1))


def make_model(kind: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "logistic":
        return nn.Sequential(nn.Linear(D_IN, N_CLASSES))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(D_IN, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, N_CLASSES))
    raise ValueError(kind)


def exact_b_simple(model: nn.Module, data: TensorDataset, params: Iterable[str] | None = None) -> float:
    """tr(Sigma)/|G|^2 over the data set, from exact per-example gradients (``torch.func``)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        names = [n for n in names if n in set(params)]
    weights = {n: p.detach() for n, p in model.named_parameters()}
    x, y = data.tensors

    def loss_one(w: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        full = dict(weights)
        full.update(w)
        out = torch.func.functional_call(model, full, (xi[None],))
        return F.cross_entropy(out, yi[None])

    chosen = {n: weights[n] for n in names}
    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(chosen, x, y)
    flat = torch.cat([grads[n].reshape(len(x), -1) for n in names], 1).double()
    mean = flat.mean(0)
    trace = (flat - mean).square().sum(1).mean()
    return float(trace / mean.square().sum())


class Classifier(pl.LightningModule):
    """Mean cross-entropy over the batch, SGD at a zero learning rate: the weights stay put."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader(data: TensorDataset, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))
