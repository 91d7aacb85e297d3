"""Token, parameter and FLOP accounting on plain tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalewatch.accounting import (
    ScaleWatchConfigError,
    check_tokens_fn_result,
    count_batch,
    count_parameters,
    six_n,
    six_n_plus_attention,
)


def test_plain_token_tensor_counts_every_position() -> None:
    c = count_batch(torch.zeros(5, 7, dtype=torch.long))
    assert (c.tokens, c.samples, c.seq_len) == (35, 5, 7)
    assert isinstance(c.tokens, int)  # shape-derived: no device tensor, no sync


def test_attention_mask_and_ignored_labels_do_not_count() -> None:
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, 5, 5], [5, 5, -100, -100]])
    assert int(count_batch({"input_ids": ids, "attention_mask": mask}).tokens) == 5
    assert int(count_batch({"input_ids": ids, "labels": labels}).tokens) == 5
    # both: position counts only where mask == 1 AND label != -100
    c = count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert int(c.tokens) == 4 and c.samples == 2 and c.seq_len == 4
    assert isinstance(c.tokens, torch.Tensor)  # stays on the device
    shapes = count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, use_masks=False)
    assert (shapes.tokens, shapes.samples, shapes.seq_len) == (8, 2, 4)  # shapes only, no device work


def test_tuple_and_list_batches_use_the_token_id_tensor() -> None:
    x = torch.zeros(3, 6, dtype=torch.long)
    y = torch.zeros(3, 6, dtype=torch.long)
    assert count_batch((x, y)).tokens == 18
    assert count_batch([torch.randn(3), x]).tokens == 18
    assert int(count_batch([{"input_ids": x, "attention_mask": torch.ones(3, 6)}]).tokens) == 18


@pytest.mark.parametrize("batch", [
    torch.randn(4, 8),                      # floats are not token ids
    {"pixels": torch.zeros(2, 3)},          # no input_ids
    ("text",),
    torch.zeros(8, dtype=torch.long),       # 1-D: which axis is the batch?
    42,
])
def test_unreadable_batch_names_tokens_fn(batch) -> None:
    with pytest.raises(ScaleWatchConfigError, match="tokens_fn"):
        count_batch(batch)


def test_tokens_fn_results_are_checked() -> None:
    assert check_tokens_fn_result(12, first_batch=True) == 12
    assert int(check_tokens_fn_result(torch.tensor(3), first_batch=True)) == 3
    for bad in (3.5, True, "12", torch.tensor(2.0), torch.tensor([1, 2])):
        with pytest.raises(ScaleWatchConfigError, match="tokens_fn"):
            check_tokens_fn_result(bad, first_batch=True)
    with pytest.raises(ScaleWatchConfigError, match="negative"):
        check_tokens_fn_result(-1, first_batch=False)
    with pytest.raises(ScaleWatchConfigError, match="negative"):
        check_tokens_fn_result(torch.tensor(-4), first_batch=True)


def test_parameter_count_with_tied_head_and_frozen_layer() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one tensor, counted once
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    m = nn.Sequential(emb, nn.Linear(4, 4), frozen, head)
    pc = count_parameters(m)
    assert pc.total == 40 + 20
    assert pc.embedding == 40
    assert pc.non_embedding == 20


def test_flop_conventions_are_exact_integers() -> None:
    assert six_n(1_000_003).flops(tokens=10**12, tokens_x_seq_len=0) == 6 * 1_000_003 * 10**12
    conv = six_n_plus_attention(100, n_layer=3, d_model=8)
    # 6N per token plus 12*L*d per token per context position
    assert conv.flops(tokens=10, tokens_x_seq_len=10 * 16) == 6 * 100 * 10 + 12 * 3 * 8 * 160
    assert conv.per_token_at(16) == 600 + 12 * 3 * 8 * 16
