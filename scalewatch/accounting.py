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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from scalewatch.config import ScaleWatchConfigError  # noqa: F401  (re-exported: raised here, defined torch-free)

IGNORE_INDEX = -100

Count = Union[int, Tensor]
"""A count that is either known on the host (from shapes) or lives on the device."""


@dataclass(frozen=True)
class BatchCount:
    """What one (micro-)batch contributes.

    Attributes:
        tokens: training tokens (positions that carry loss); ``int`` or a 0-d device tensor.
        samples: sequences in the batch.
        seq_len: the sequence (context) length attention runs over, from the batch shape;
            0 where unknown.
    """

    tokens: Count
    samples: int
    seq_len: int


def _is_int_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _token_tensor_count(ids: Tensor) -> BatchCount:
    if ids.ndim < 2:
        raise ScaleWatchConfigError(
            f"scalewatch: token ids must be shaped [batch, seq], got shape {tuple(ids.shape)}; "
            "pass ScaleWatch(tokens_fn=lambda batch: ...) to count tokens yourself"
        )
    samples, seq_len = int(ids.shape[0]), int(ids.shape[1])
    return BatchCount(tokens=ids.numel(), samples=samples, seq_len=seq_len)


def _mapping_count(batch: Mapping[str, Any], use_masks: bool) -> BatchCount:
    ids = batch.get("input_ids")
    if not _is_int_tensor(ids):
        raise ScaleWatchConfigError(
            "scalewatch: the batch is a dict without an integer 'input_ids' tensor "
            f"(keys: {sorted(map(str, batch.keys()))}); pass ScaleWatch(tokens_fn=lambda batch: ...) "
            "to count tokens yourself"
        )
    base = _token_tensor_count(ids)
    if not use_masks:
        return base
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    counted: Tensor | None = None
    if isinstance(mask, Tensor):
        counted = mask.reshape(ids.shape) != 0
    if _is_int_tensor(labels) and labels.shape == ids.shape:
        keep = labels != IGNORE_INDEX
        counted = keep if counted is None else counted & keep
    if counted is None:
        return base
    # Stays on the device: reading it here would stall the step.
    return BatchCount(tokens=counted.sum(), samples=base.samples, seq_len=base.seq_len)


def count_batch(batch: Any, use_masks: bool = True) -> BatchCount:
    """Count the training tokens and samples of a batch, without a host sync.

    With ``use_masks=False`` only the shapes are read (samples and sequence length for a
    user's ``tokens_fn``), so no device work is launched.

    Understood layouts: a token-id tensor ``[B, T]``; a dict with ``input_ids``
    (positions where ``attention_mask`` is 0 or ``labels`` is -100 do not count);
    a tuple or list whose first integer tensor of rank >= 2 holds the token ids.

    Raises:
        ScaleWatchConfigError: the batch has no readable token ids; the message
            names ``tokens_fn``.

    Example:
        >>> import torch
        >>> count_batch(torch.zeros(4, 16, dtype=torch.long)).tokens
        64
        >>> b = {"input_ids": torch.ones(2, 3, dtype=torch.long),
        ...      "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
        >>> int(count_batch(b).tokens), count_batch(b).samples
        (3, 2)
    """
    if _is_int_tensor(batch):
        return _token_tensor_count(batch)
    if isinstance(batch, Mapping):
        return _mapping_count(batch, use_masks)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for item in batch:
            if _is_int_tensor(item) and item.ndim >= 2:
                return _token_tensor_count(item)
            if isinstance(item, Mapping) and "input_ids" in item:
                return _mapping_count(item, use_masks)
    raise ScaleWatchConfigError(
        f"scalewatch: cannot find token ids in a batch of type {type(batch).__name__}; "
        "pass ScaleWatch(tokens_fn=lambda batch: <number of training tokens>) to count them"
    )


def check_tokens_fn_result(value: Any, first_batch: bool) -> Count:
    """Validate what a user's ``tokens_fn`` returned; returns it as a count.

    Python numbers are checked every batch (free). A tensor is checked for its
    dtype every batch and for its sign only on the first batch, the one batch
    where a host read is allowed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise ScaleWatchConfigError(
            f"scalewatch: tokens_fn must return an int or an integer tensor, got {type(value).__name__} "
            f"({value!r}); return the number of training tokens in the batch"
        )
    if isinstance(value, Tensor):
        if not _is_int_tensor(value) or value.numel() != 1:
            raise ScaleWatchConfigError(
                f"scalewatch: tokens_fn returned a tensor of dtype {value.dtype} and shape {tuple(value.shape)}; "
                "return a single integer (for example mask.sum())"
            )
        value = value.reshape(())
        if first_batch and int(value) < 0:
            raise ScaleWatchConfigError(
                f"scalewatch: tokens_fn returned a negative count ({int(value)}); return the number of tokens"
            )
        return value
    if value < 0:
        raise ScaleWatchConfigError(
            f"scalewatch: tokens_fn returned a negative count ({value}); return the number of tokens"
        )
    return value


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


def count_parameters(module: nn.Module) -> ParamCount:
    """Count trainable parameters, total and in embedding tables.

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
            total += p.numel()
    embedding = 0
    counted: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            for p in sub.parameters(recurse=False):
                if p.requires_grad and id(p) not in counted:
                    counted.add(id(p))
                    embedding += p.numel()
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


def measured_flops_per_token(total_flops: int, tokens: int) -> FlopConvention:
    """FLOPs per token measured by ``FlopCounterMode`` over one training batch (fwd+bwd)."""
    return FlopConvention(
        per_token=total_flops / max(tokens, 1), attention_coeff=0,
        description=(f"measured: {total_flops:,} matmul FLOPs (torch FlopCounterMode, forward+backward) "
                     f"over the first batch of {tokens:,} tokens"),
    )


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


def count_with(batch: Any, tokens_fn: Callable[[Any], Any] | None, samples_fn: Callable[[Any], int] | None,
               first: bool) -> BatchCount:
    """One micro-batch's counts, with the user's ``tokens_fn`` / ``samples_fn`` where given.

    Example:
        >>> count_with(torch.zeros(4, 8, dtype=torch.long), lambda b: 30, None, first=True)
        BatchCount(tokens=30, samples=4, seq_len=8)
    """
    if tokens_fn is None:
        count = count_batch(batch)
    else:
        tokens = check_tokens_fn_result(tokens_fn(batch), first)
        try:
            shaped = count_batch(batch, use_masks=False)  # shapes only: tokens come from tokens_fn
            samples, seq_len = shaped.samples, shaped.seq_len
        except ScaleWatchConfigError:
            samples, seq_len = 0, 0
        count = BatchCount(tokens=tokens, samples=samples, seq_len=seq_len)
    if samples_fn is not None:
        count = BatchCount(tokens=count.tokens, samples=int(samples_fn(batch)), seq_len=count.seq_len)
    return count


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
