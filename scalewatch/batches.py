"""What one (micro-)batch contributes: training tokens, sequences and the attention context.

The one place that reads a batch. Called on the training step's hot path, so nothing here reads a
device value back to the host, except on the FIRST batch, where a layout that can only be told
apart by its values (a tuple ``(input_ids, attention_mask, labels)``) is checked once. A count that
depends on tensor contents (a mask, ignored labels, packed-sequence boundaries) stays a device
tensor; a count that follows from shapes is a Python ``int``.

Batch layouts and what is counted (the README has the same table):

=====================================================  ==========================================
layout                                                 tokens / sequences
=====================================================  ==========================================
``[B, T]`` integer tensor                              ``B·T`` / ``B``
dict with ``input_ids [B, T]``                         positions with ``attention_mask != 0`` and
                                                       ``labels != -100`` / ``B``
dict, packed (``position_ids`` restarting at 0, or     the same / the sequences in the pack
``cu_seq_lens_q`` / ``cu_seqlens``)
tuple/list ``(ids,)`` or ``(ids, other, ...)``         ``B·T`` / ``B`` (one ``[B, T]`` integer tensor)
tuple/list ``(ids, labels)``                           ``labels != -100`` / ``B``
tuple/list ``(ids, attention_mask, labels)``           ``mask != 0`` and ``labels != -100`` / ``B``
anything else                                          an error naming ``tokens_fn``
=====================================================  ==========================================

With ``shift_labels`` (a Hugging Face causal LM, which shifts its labels inside the model) the
counted positions are those of ``labels[:, 1:]``: each sequence of L labelled tokens trains L−1.
The attention context of a token is its sequence's padded length ``T``; in a packed batch, its own
sequence's length (the ``6N+attn`` FLOPs charge ``Σ L²`` per pack, not the pack's length squared).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from scalewatch.config import ScaleWatchConfigError

IGNORE_INDEX = -100

Count = Union[int, Tensor]
"""A count that is either known on the host (from shapes) or lives on the device."""

_PACKED_KEYS = ("cu_seq_lens_q", "cu_seqlens", "cu_seqlens_q")


@dataclass(frozen=True)
class BatchCount:
    """What one (micro-)batch contributes.

    Attributes:
        tokens: training tokens (positions that carry loss); ``int`` or a 0-d device tensor.
        samples: sequences in the batch; ``int``, or a 0-d device tensor for a batch packed by
            ``position_ids`` (0 where unknown).
        seq_len: the padded sequence length of the batch (its rows' length); 0 where unknown.
        attn: the sum over training tokens of the attention context each one is charged
            (``6N+attn``); None means ``tokens × seq_len``. Set for packed batches.
        positions: token positions the model processed (``B·T``, padding included), for
            ``flops="measured"``; 0 where unknown.
    """

    tokens: Count
    samples: Count
    seq_len: int
    attn: Count | None = None
    positions: int = 0


def is_int_tensor(x: Any) -> bool:
    """An integer tensor (not bool, not float): what token ids, labels and masks from collators are."""
    return isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _need(message: str) -> ScaleWatchConfigError:
    return ScaleWatchConfigError(f"scalewatch: {message}; pass ScaleWatch(tokens_fn=lambda batch: <number of "
                                 "training tokens>) to count them yourself")


def _ids_shape(ids: Tensor) -> tuple[int, int]:
    if ids.ndim != 2:
        raise _need(f"token ids must be shaped [batch, seq], got an integer tensor of shape {tuple(ids.shape)}"
                    + (" (a segmentation mask or class map is not token ids)" if ids.ndim > 2 else ""))
    return int(ids.shape[0]), int(ids.shape[1])


def _kept(ids: Tensor, mask: Tensor | None, labels: Tensor | None, shift: bool) -> Tensor | None:
    """The boolean map of training positions, or None when nothing masks any position."""
    keep = None
    if mask is not None:
        keep = mask.reshape(ids.shape) != 0
    if labels is not None:
        lab = labels != IGNORE_INDEX
        keep = lab if keep is None else keep & lab
    if shift and labels is not None and keep is not None:
        keep = keep[..., 1:]  # the model predicts labels[:, 1:] from the positions before them
    return keep


def _packed(batch: Mapping[str, Any], ids: Tensor, tokens: Count) -> tuple[Count, Count] | None:
    """``(sequences, attention sum)`` of a packed, padding-free batch; None when it is not packed."""
    cu = next((batch[k] for k in _PACKED_KEYS if is_int_tensor(batch.get(k))), None)
    positions = ids.numel()
    if cu is not None and cu.ndim == 1 and cu.numel() >= 2:
        lengths = (cu[1:] - cu[:-1]).double()
        sum_sq = lengths.square().sum()
        samples: Count = int(cu.numel()) - 1
    else:
        pos = batch.get("position_ids")
        # Padded batches carry position_ids too (0..T-1 per row): packing means one row holding
        # several sequences, i.e. the positions restart inside a row.
        if not is_int_tensor(pos) or pos.shape != ids.shape or ids.shape[0] != 1:
            return None
        # sum over a sequence of length L of (2p + 1), p = 0..L-1, is L²: no per-sequence lengths needed.
        sum_sq = (2 * pos.double() + 1).sum()
        samples = (pos == 0).sum()
    # Each training token is charged its sequence's length: sum L² / positions is the mean of that.
    attn = tokens * sum_sq / positions if isinstance(tokens, Tensor) else sum_sq * (tokens / positions)
    return samples, attn


def _mapping_count(batch: Mapping[str, Any], use_masks: bool, shift: bool) -> BatchCount:
    ids = batch.get("input_ids")
    if not is_int_tensor(ids):
        raise _need(f"the batch is a dict without an integer 'input_ids' tensor (keys: "
                    f"{sorted(map(str, batch.keys()))})")
    rows, seq_len = _ids_shape(ids)
    base = BatchCount(tokens=ids.numel(), samples=rows, seq_len=seq_len, positions=ids.numel())
    if not use_masks:
        return base
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    labels = labels if is_int_tensor(labels) and labels.shape == ids.shape else None
    keep = _kept(ids, mask if isinstance(mask, Tensor) else None, labels, shift)
    # Stays on the device: reading it here would stall the step.
    tokens: Count = keep.sum() if keep is not None else ids.numel()
    packed = _packed(batch, ids, tokens)
    if packed is not None:
        return BatchCount(tokens=tokens, samples=packed[0], seq_len=seq_len, attn=packed[1], positions=ids.numel())
    return BatchCount(tokens=tokens, samples=rows, seq_len=seq_len, positions=ids.numel())


def _sequence_count(batch: Sequence[Any], use_masks: bool, shift: bool, first: bool) -> BatchCount:
    for item in batch:
        if isinstance(item, Mapping) and "input_ids" in item:
            return _mapping_count(item, use_masks, shift)
    ints = [x for x in batch if is_int_tensor(x) and x.ndim >= 2]
    if not ints:
        raise _need(f"cannot find token ids (an integer [batch, seq] tensor) in a {type(batch).__name__} of "
                    f"{[type(x).__name__ for x in batch]}")
    ids = ints[0]
    rows, seq_len = _ids_shape(ids)
    base = BatchCount(tokens=ids.numel(), samples=rows, seq_len=seq_len, positions=ids.numel())
    same = [x for x in ints[1:] if x.shape == ids.shape]
    if len(same) > 2:
        raise _need(f"the batch holds {len(same) + 1} integer tensors of shape {tuple(ids.shape)} and which of "
                    "them is the mask or the labels is ambiguous")
    if not use_masks or not same:
        return base
    mask, labels = (None, same[0]) if len(same) == 1 else (same[0], same[1])
    if first and mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
        # One host read on the first batch only: a (ids, labels, mask) order would be counted wrong.
        raise _need(f"a tuple of three integer tensors of shape {tuple(ids.shape)} is read as (input_ids, "
                    "attention_mask, labels), but the second one is not a 0/1 mask")
    keep = _kept(ids, mask, labels, shift)
    assert keep is not None
    return BatchCount(tokens=keep.sum(), samples=rows, seq_len=seq_len, positions=ids.numel())


def count_batch(batch: Any, use_masks: bool = True, *, shift_labels: bool = False, first: bool = False
                ) -> BatchCount:
    """Count the training tokens and sequences of a batch, without a host sync (see the module's table).

    With ``use_masks=False`` only the shapes are read (sequences and length for a user's
    ``tokens_fn``), so no device work is launched. ``first``: the first batch of the run, where one
    host read is allowed to check a layout.

    Raises:
        ScaleWatchConfigError: the batch has no readable token ids, or its layout is ambiguous; the
            message names ``tokens_fn``.

    Example:
        >>> count_batch(torch.zeros(4, 16, dtype=torch.long)).tokens
        64
        >>> b = {"input_ids": torch.ones(2, 3, dtype=torch.long),
        ...      "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
        >>> int(count_batch(b).tokens), count_batch(b).samples
        (3, 2)
        >>> ids, labels = torch.ones(2, 4, dtype=torch.long), torch.tensor([[5, 6, -100, -100], [7, 8, 9, 1]])
        >>> int(count_batch((ids, labels)).tokens), int(count_batch((ids, labels), shift_labels=True).tokens)
        (6, 4)
    """
    if is_int_tensor(batch):
        rows, seq_len = _ids_shape(batch)
        return BatchCount(tokens=batch.numel(), samples=rows, seq_len=seq_len, positions=batch.numel())
    if isinstance(batch, Mapping):
        return _mapping_count(batch, use_masks, shift_labels)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return _sequence_count(batch, use_masks, shift_labels, first)
    raise _need(f"cannot find token ids in a batch of type {type(batch).__name__}")


def check_tokens_fn_result(value: Any, first_batch: bool) -> Count:
    """Validate what a user's ``tokens_fn`` returned; returns it as a count.

    Python numbers are checked every batch (free). A tensor is checked for its
    dtype every batch and for its sign only on the first batch, the one batch
    where a host read is allowed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise ScaleWatchConfigError(
            f"scalewatch: tokens_fn must return an int or an integer tensor, got {type(value).__name__} "
            f"({value!r}); return the number of training tokens in the batch")
    if isinstance(value, Tensor):
        if not is_int_tensor(value) or value.numel() != 1:
            raise ScaleWatchConfigError(
                f"scalewatch: tokens_fn returned a tensor of dtype {value.dtype} and shape {tuple(value.shape)}; "
                "return a single integer (for example mask.sum())")
        value = value.reshape(())
        if first_batch and int(value) < 0:
            raise ScaleWatchConfigError(
                f"scalewatch: tokens_fn returned a negative count ({int(value)}); return the number of tokens")
        return value
    if value < 0:
        raise ScaleWatchConfigError(
            f"scalewatch: tokens_fn returned a negative count ({value}); return the number of tokens")
    return value


def _batch_size(batch: Any) -> int:
    """Lightning's own inference of a batch's size (the first tensor's first dimension), 0 when none."""
    try:
        from lightning.pytorch.utilities.data import extract_batch_size

        return int(extract_batch_size(batch))
    except Exception:  # no tensor in the batch: the noise scale says once that the size is unknown
        return 0


def count_with(batch: Any, tokens_fn: Callable[[Any], Any] | None, samples_fn: Callable[[Any], int] | None,
               first: bool, needs_seq_len: bool = False, shift_labels: bool = False) -> BatchCount:
    """One micro-batch's counts, with the user's ``tokens_fn`` / ``samples_fn`` where given.

    Without ``samples_fn``, a batch whose layout is not understood gets its sequence count from
    Lightning's ``extract_batch_size``. ``needs_seq_len`` (``flops="6N+attn"`` without a fixed
    ``context_length``): the first batch must show its sequence length, else a
    :class:`ScaleWatchConfigError` names the fix.

    Example:
        >>> count_with(torch.zeros(4, 8, dtype=torch.long), lambda b: 30, None, first=True)
        BatchCount(tokens=30, samples=4, seq_len=8, attn=None, positions=32)
        >>> count_with({"pixels": torch.zeros(3, 2, 2)}, lambda b: 12, None, first=True).samples
        3
    """
    if tokens_fn is None:
        count = count_batch(batch, shift_labels=shift_labels, first=first)
    else:
        tokens = check_tokens_fn_result(tokens_fn(batch), first)
        try:
            shaped = count_batch(batch, use_masks=False)  # shapes only: tokens come from tokens_fn
            count = BatchCount(tokens=tokens, samples=shaped.samples, seq_len=shaped.seq_len,
                               positions=shaped.positions)
        except ScaleWatchConfigError:
            count = BatchCount(tokens=tokens, samples=_batch_size(batch), seq_len=0)
    if samples_fn is not None:
        count = BatchCount(tokens=count.tokens, samples=int(samples_fn(batch)), seq_len=count.seq_len,
                           attn=count.attn, positions=count.positions)
    if first and needs_seq_len and not count.seq_len:
        raise ScaleWatchConfigError("scalewatch: flops='6N+attn' cannot see a sequence length in the batch; "
                                    "pass ScaleWatch(context_length=...)")
    return count


def is_causal_lm(module: torch.nn.Module) -> bool:
    """Whether the module is (or wraps) a Hugging Face causal LM, which shifts its labels inside the model.

    Recognised by the class names ``*ForCausalLM`` / ``*LMHeadModel`` of a submodule with a ``config``
    (GPT-2, Llama, Mistral, ...), so that ``transformers`` need not be imported.

    Example:
        >>> is_causal_lm(torch.nn.Linear(2, 2))
        False
    """
    return any(type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(m, "config")
               for m in module.modules())
