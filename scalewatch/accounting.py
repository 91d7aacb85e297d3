"""Tokens, parameters and FLOPs: what a training run has really spent.

Everything here is called on the training step's hot path or once at set-up, so
the per-batch functions never read a device value back to the host: a count
that depends on tensor contents (an attention mask, ignored labels) stays a
device tensor; a count that follows from shapes is a Python ``int``.

Conventions (see ``docs`` in the README):

* **Tokens** are positions that carry loss: padding (``attention_mask == 0``)
  and ignored labels (``-100``) are not training tokens.
* **N** is the number of trainable parameters (Chinchilla's convention, all
  parameters including embeddings); the non-embedding count (Kaplan's) is
  available as :attr:`ParamCount.non_embedding`.
* **FLOPs** per token are ``6·N`` (2 forward, 4 backward per parameter) and,
  optionally, ``12·n_layer·d_model·T`` for attention over context ``T``
  (the PaLM / nanoGPT / torchtitan convention, no discount for causal masking).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from scalewatch.config import ScaleWatchConfigError  # noqa: F401  (re-exported: raised here, defined torch-free)

# Reading batches lives in scalewatch.batches; re-exported here, where it used to be.
from scalewatch.batches import (  # noqa: F401
    IGNORE_INDEX,
    BatchCount,
    Count,
    check_tokens_fn_result,
    count_batch,
    count_with,
)


@dataclass(frozen=True)
class ParamCount:
    """Trainable parameters of a module.

    Attributes:
        total: all trainable parameters, each shared tensor counted once (Chinchilla's N).
        embedding: those owned by ``nn.Embedding`` modules (token and position tables;
            a tied output head shares the token table and is counted here).
    """

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        """Kaplan's N: trainable parameters outside embedding tables."""
        return self.total - self.embedding


def global_numel(p: Tensor) -> int:
    """Elements of the WHOLE parameter, also where this rank holds only a shard of it.

    DTensor (FSDP2 ``fully_shard``, tensor parallel) reports its global size already; DeepSpeed
    ZeRO-3 keeps the full size in ``ds_numel`` beside the local partition; an FSDP1 ``FlatParameter``
    in ``_unpadded_unsharded_size``. Everything else is whole on every rank.

    Example:
        >>> global_numel(torch.zeros(3, 4))
        12
    """
    ds = getattr(p, "ds_numel", None)
    if isinstance(ds, int) and ds > 0:
        return ds
    flat = getattr(p, "_unpadded_unsharded_size", None)
    if flat is not None:
        return int(torch.Size(flat).numel())
    return int(p.numel())


def count_parameters(module: nn.Module) -> ParamCount:
    """Count trainable parameters, total and in embedding tables; whole sizes under sharding
    (:func:`global_numel`), so N is the model's, not this rank's shard.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> count_parameters(m)
        ParamCount(total=90, embedding=40)
    """
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += global_numel(p)
    embedding = 0
    counted: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            for p in sub.parameters(recurse=False):
                if p.requires_grad and id(p) not in counted:
                    counted.add(id(p))
                    embedding += global_numel(p)
    return ParamCount(total=total, embedding=embedding)


_LAYER_NAMES = ("n_layer", "n_layers", "num_layers", "num_hidden_layers")
_WIDTH_NAMES = ("n_embd", "d_model", "hidden_size", "dim", "n_embed")


def _find_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """Look for an architecture constant on the module, its ``config`` or ``hparams``."""
    holders: list[Any] = [module]
    for holder_name in ("config", "hparams", "model", "cfg"):
        holder = getattr(module, holder_name, None)
        if holder is not None:
            holders.append(holder)
            holders.append(getattr(holder, "config", None))
    for holder in holders:
        if holder is None:
            continue
        for name in names:
            value = holder.get(name) if isinstance(holder, Mapping) else getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def infer_architecture(module: nn.Module) -> tuple[int | None, int | None]:
    """Best-effort ``(n_layer, d_model)`` from common attribute names (nanoGPT, HF configs)."""
    return _find_attr(module, _LAYER_NAMES), _find_attr(module, _WIDTH_NAMES)


@dataclass(frozen=True)
class FlopConvention:
    """How FLOPs are charged for the tokens a run trains on.

    ``flops(tokens, tokens_x_seq_len) = per_token * tokens + attention_coeff * tokens_x_seq_len``
    where ``tokens_x_seq_len`` sums each batch's tokens times its sequence length.

    Attributes:
        per_token: FLOPs charged per token independent of context (``6·N``, a fixed number,
            or a measured value).
        attention_coeff: ``12·n_layer·d_model`` when the attention term is on, else 0.
        description: a human-readable statement of the convention, logged with the run; formulas and
            values are Markdown code spans (backticks), so TensorBoard's text tab shows them as typed.
    """

    per_token: float
    attention_coeff: int
    description: str

    def flops(self, tokens: int, tokens_x_seq_len: int) -> int:
        """Total FLOPs for these counts, as an exact Python ``int`` where possible."""
        base = self.per_token * tokens
        base = int(base) if float(self.per_token).is_integer() else int(round(base))
        return base + self.attention_coeff * tokens_x_seq_len

    def to_state(self) -> dict[str, Any]:
        """A plain dict for a checkpoint (:meth:`from_state` reads it back)."""
        return {"per_token": self.per_token, "attention_coeff": self.attention_coeff, "description": self.description}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FlopConvention:
        return cls(float(state["per_token"]), int(state["attention_coeff"]), str(state["description"]))

    def per_token_at(self, seq_len: int) -> float:
        """FLOPs per token at a given context length."""
        return self.per_token + self.attention_coeff * seq_len


def six_n(n_params: int, label: str = "N") -> FlopConvention:
    """The ``6·N`` convention.

    Example:
        >>> six_n(1000).flops(tokens=10, tokens_x_seq_len=0)
        60000
    """
    return FlopConvention(per_token=6 * n_params, attention_coeff=0,
                          description=f"`6*N` per token, `{label}={n_params:,}`")


def six_n_plus_attention(n_params: int, n_layer: int, d_model: int, label: str = "N") -> FlopConvention:
    """``6·N + 12·n_layer·d_model·T`` per token (PaLM / nanoGPT; causal masking not discounted).

    Example:
        >>> c = six_n_plus_attention(1000, n_layer=2, d_model=8)
        >>> c.per_token_at(seq_len=16)
        9072
    """
    return FlopConvention(
        per_token=6 * n_params,
        attention_coeff=12 * n_layer * d_model,
        description=(f"`6*N + 12*n_layer*d_model*T` per token (PaLM/nanoGPT convention, no causal discount), "
                     f"`{label}={n_params:,}`, `n_layer={n_layer}`, `d_model={d_model}`"),
    )


def fixed_flops_per_token(value: float) -> FlopConvention:
    """A fixed number of FLOPs per token given by the user."""
    return FlopConvention(per_token=float(value), attention_coeff=0,
                          description=f"fixed {value:.6g} FLOPs per token (user-given)")


def measured_flops_per_token(total_flops: int, positions: int) -> FlopConvention:
    """FLOPs per token measured by ``FlopCounterMode`` over one training batch (fwd+bwd).

    ``positions``: the token positions the model ran in that batch, padding included (``B·T``):
    dividing by the training tokens instead would charge the first batch's padding share to the
    whole run."""
    return FlopConvention(
        per_token=total_flops / max(positions, 1), attention_coeff=0,
        description=(f"measured: {total_flops:,} matmul FLOPs (torch FlopCounterMode, forward+backward) "
                     f"over the first batch's {positions:,} token positions, charged per training token"),
    )


def measured_shortfall(per_token: float, params: ParamCount | None, n_params: int | None) -> str | None:
    """One line when measured FLOPs per token are below half of 6N: the counter missed layers it cannot see.

    ``FlopCounterMode`` counts matmuls, convolutions and attention it recognises; ``nn.LSTM``/``nn.GRU`` (cuDNN
    or not) and fused or custom kernels count 0. N here is the non-embedding parameters (an embedding lookup
    does no matmul, so a large vocabulary alone puts a model below 6 x all its parameters); a user-given
    ``n_params`` where no count is known.

    Example:
        >>> print(measured_shortfall(98_304, ParamCount(total=49_920, embedding=8_192), None))
        scalewatch: flops='measured' counted 98,304 FLOPs per token, 0.39x 6N = 250,368 (N = 41,728 non-embedding parameters): if the model has layers the FLOP counter cannot see (nn.LSTM/nn.GRU, fused or custom kernels), FLOPs and MFU are undercounted: use flops='6N' (or flops=<FLOPs per token>); a sparse (mixture-of-experts) or partly frozen model is expected to measure below 6N: then keep 'measured'
        >>> measured_shortfall(3_072, ParamCount(total=1_056, embedding=512), None) is None  # 0.94x 6N
        True
    """
    n = params.non_embedding if params is not None and params.non_embedding > 0 else n_params
    if not n or per_token >= 0.5 * 6 * n:
        return None
    whose = " non-embedding parameters" if params is not None and params.non_embedding > 0 else ""
    return (f"scalewatch: flops='measured' counted {per_token:,.0f} FLOPs per token, {per_token / (6 * n):.2f}x "
            f"6N = {6 * n:,} (N = {n:,}{whose}): if the model has layers the FLOP counter cannot see (nn.LSTM/"
            "nn.GRU, fused or custom kernels), FLOPs and MFU are undercounted: use flops='6N' (or "
            "flops=<FLOPs per token>); a sparse (mixture-of-experts) or partly frozen model is expected to measure "
            "below 6N: then keep 'measured'")


class FirstBatchFlops:
    """``flops="measured"``: a ``FlopCounterMode`` entered before the first training batch and left after
    it, so that the user's own forward AND backward of that batch are what gets counted.

    Example:
        >>> lin = torch.nn.Linear(8, 4, bias=False)
        >>> counter = FirstBatchFlops()
        >>> lin(torch.randn(3, 8)).sum().backward()
        >>> counter.finish(positions=3).per_token
        128.0
    """

    def __init__(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def finish(self, positions: int) -> FlopConvention:
        """Leave the counter; the FLOPs per token position of that batch (``B·T``, padding included)."""
        self._mode.__exit__(None, None, None)
        return measured_flops_per_token(int(self._mode.get_total_flops()), int(positions))


def measure_flops(fn: Callable[[], Any]) -> int:
    """Count the matmul/conv/attention FLOPs that ``fn()`` runs (forward and any backward in it).

    ``FlopCounterMode`` counts 2 FLOPs per multiply-accumulate for matmul, conv and
    SDPA, nothing for elementwise ops, and ignores causal masking.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 4, bias=False)
        >>> # forward 2*3*8*4 = 192, weight gradient 192, no input gradient
        >>> measure_flops(lambda: lin(torch.randn(3, 8)).sum().backward())
        384
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------ what a configuration means for a module
def choose_n_params(params: ParamCount, n_params: int | None, convention: str) -> tuple[int, str]:
    """``(N, how it was counted)`` under the configuration; a module with nothing to count is an error.

    Example:
        >>> choose_n_params(ParamCount(total=90, embedding=40), None, "non_embedding")
        (50, 'N (non-embedding trainable parameters, Kaplan)')
    """
    if n_params is not None:
        return n_params, "N (user-given n_params)"
    if params.total == 0:
        raise ScaleWatchConfigError("scalewatch: the module has no trainable parameters; pass "
                                    "ScaleWatch(n_params=...) with the model's parameter count")
    if convention == "total":
        return params.total, "N (all trainable parameters, Chinchilla)"
    if params.non_embedding <= 0:
        raise ScaleWatchConfigError("scalewatch: the module has no non-embedding trainable parameters; use "
                                    "param_convention='total' or pass n_params=...")
    return params.non_embedding, "N (non-embedding trainable parameters, Kaplan)"


def choose_flop_convention(flops: str | float, n_params: int, module: nn.Module, n_layer: int | None = None,
                           d_model: int | None = None) -> FlopConvention | None:
    """The FLOP convention a ``flops=`` setting gives for this module; None for ``"measured"`` (first batch).

    Example:
        >>> choose_flop_convention("6N+attn", 1000, nn.Linear(2, 2), n_layer=2, d_model=8).attention_coeff
        192
    """
    if not isinstance(flops, str):
        return fixed_flops_per_token(float(flops))
    if flops == "6N":
        return six_n(n_params)
    if flops == "measured":
        return None
    if n_layer is None or d_model is None:
        found_layers, found_width = infer_architecture(module)
        n_layer, d_model = n_layer or found_layers, d_model or found_width
    if n_layer is None or d_model is None:
        raise ScaleWatchConfigError(
            "scalewatch: flops='6N+attn' needs the architecture; pass ScaleWatch(n_layer=..., d_model=...)")
    return six_n_plus_attention(n_params, n_layer, d_model)


def peak_flops_per_second(device: Any, precision: str, world_size: int, given: float | None = None) -> float | None:
    """Peak FLOP/s of all devices together, for MFU: ``given`` per device, else Lightning's table for the
    device and precision (None for CPUs and unknown devices)."""
    per_device = given
    if per_device is None:
        dtype = (torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision
                 else torch.float64 if "64" in precision else torch.float32)
        try:
            from lightning.fabric.utilities.throughput import get_available_flops

            per_device = get_available_flops(device, dtype)
        except Exception:  # an unknown device must not stop training
            per_device = None
    return float(per_device) * world_size if per_device else None


def describe_conventions(n_params: int | None, params: ParamCount | None, convention: FlopConvention | None,
                         flops_mode: str | float) -> str:
    """The conventions behind the logged counts, in words (TensorBoard's text tab).

    Example:
        >>> describe_conventions(90, ParamCount(90, 40), six_n(90), "6N").split(". Tokens")[0]
        'N = 90 (trainable: 90; non-embedding: 50). FLOPs: `6*N` per token, `N=90`'
    """
    n = f"N = {n_params:,}" if n_params else "N unknown"
    if params is not None:
        n += f" (trainable: {params.total:,}; non-embedding: {params.non_embedding:,})"
    flops = convention.description if convention else f"{flops_mode} (pending)"
    return f"{n}. FLOPs: {flops}. Tokens: positions carrying loss (mask/-100 excluded), summed over ranks."
