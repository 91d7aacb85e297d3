"""Counting right in training code nobody here wrote: Hugging Face collators and GPT-2, tuple batches,
packing, skipped steps, presets that keep the user's callbacks, reuse across fits, sharded models.

The collators and the GPT-2 are the real ones from ``transformers`` (a test-only dependency); the
tokenizer is built in memory (a word-level vocabulary), so nothing is downloaded.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import VOCAB, TinyLM, VarLenDataset, loader, scalars, trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader

from scalewatch import ScaleWatch, ScaleWatchConfigError
from scalewatch.accounting import count_parameters
from scalewatch.batches import count_batch

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _texts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id lists of random lengths 2..12."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _padding_collate():
    return transformers.DataCollatorForLanguageModeling(_tokenizer(), mlm=False)


class TupleLM(TinyLM):
    """TinyLM fed tuples ``(input_ids, attention_mask, labels)`` or ``(input_ids, labels)``."""

    def training_step(self, batch, batch_idx):
        ids, labels = batch[0], batch[-1]
        logits = self.out(self.emb(ids))
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("layout", ["ids_mask_labels", "ids_labels"])
def test_tuple_batches_from_a_padding_collate_count_only_trained_tokens(tmp_path, layout) -> None:
    collate = _padding_collate()
    texts = _texts(24)

    def as_tuple(examples):
        b = collate([{"input_ids": t} for t in examples])
        return (b["input_ids"], b["attention_mask"], b["labels"]) if layout == "ids_mask_labels" \
            else (b["input_ids"], b["labels"])

    watch = ScaleWatch()
    trainer(tmp_path, [watch], max_epochs=1).fit(TupleLM(), DataLoader(texts, batch_size=5, collate_fn=as_tuple))
    assert watch.tokens == sum(len(t) for t in texts)  # padding and -100 labels excluded (was +34%)
    assert watch.samples == 24


def test_integer_tensors_that_are_not_token_ids_are_refused_naming_tokens_fn() -> None:
    images, seg = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2, 8, 8))
    with pytest.raises(ScaleWatchConfigError, match="tokens_fn.*|segmentation"):
        count_batch((images, seg))
    ids, mask, labels = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), \
        torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
    with pytest.raises(ScaleWatchConfigError, match="not a 0/1 mask.*tokens_fn"):
        count_batch((ids, labels, mask), first=True)  # the order (ids, labels, mask) is not guessed
    assert int(count_batch((ids, mask, labels), first=True).tokens) == 6


def test_packed_batches_count_sequences_and_charge_each_its_own_length() -> None:
    texts = _texts(5)
    lengths = [len(t) for t in texts]
    for kw in ({}, {"return_flash_attn_kwargs": True}):  # position_ids only, or cu_seq_lens too
        b = transformers.DataCollatorWithFlattening(**kw)([{"input_ids": t} for t in texts])
        c = count_batch(b)
        assert int(c.samples) == 5  # sequences, not the one packed row
        tokens = sum(n - 1 for n in lengths)  # the collator ignores each sequence's first label
        assert int(c.tokens) == tokens
        # Attention charged per token at its own sequence's length (mean over the pack), not the pack's.
        assert float(c.attn) == pytest.approx(tokens * sum(n * n for n in lengths) / sum(lengths))
    padded = {"input_ids": torch.ones(2, 6, dtype=torch.long), "position_ids": torch.arange(6).repeat(2, 1)}
    assert count_batch(padded).samples == 2 and count_batch(padded).attn is None  # position_ids alone: not packed


class HFCausalLM(pl.LightningModule):
    """A real Hugging Face GPT-2 (Conv1D projections, labels shifted inside the model)."""

    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=1, eos_token_id=1)
        self.model = transformers.GPT2LMHeadModel(cfg)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_hugging_face_causal_lm_counts_the_shifted_labels_and_packed_sequences(tmp_path) -> None:
    texts = _texts(12)
    watch = ScaleWatch(flops="6N+attn")
    loader_ = DataLoader([{"input_ids": t} for t in texts], batch_size=4, collate_fn=_padding_collate())
    trainer(tmp_path, [watch], max_epochs=1).fit(HFCausalLM(), loader_)
    assert watch.tokens == sum(len(t) - 1 for t in texts)  # L labelled tokens train L - 1 predictions
    assert watch.samples == 12

    packed = ScaleWatch(flops="6N+attn")
    flat = DataLoader([{"input_ids": t} for t in texts], batch_size=4,
                      collate_fn=transformers.DataCollatorWithFlattening())
    trainer(tmp_path / "packed", [packed], max_epochs=1).fit(HFCausalLM(), flat)
    assert packed.tokens == watch.tokens and packed.samples == 12
    # 6N+attn: packed sequences pay attention for their own lengths only, like the padded run (whose
    # padded positions are charged too, so it is the larger of the two).
    attn_packed = packed.flops - 6 * packed.n_params * packed.tokens
    assert 0 < attn_packed < watch.flops - 6 * watch.n_params * watch.tokens


def test_per_example_noise_scale_covers_gpt2_conv1d_projections(tmp_path) -> None:
    from scalewatch.gns_capture import PerExampleNorms

    model = HFCausalLM()
    pe = PerExampleNorms(model)
    covered = pe.coverage()
    pe.remove()
    # Per GPT-2 block: c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D) and ln_1, ln_2; then ln_f. The
    # head is tied to the embedding, so it is left out (and says so in the share of parameters).
    assert covered.startswith("8 Conv1D, 5 LayerNorm: ") and "trainable parameters" in covered


def test_conv1d_per_example_norms_equal_brute_force() -> None:
    from transformers.pytorch_utils import Conv1D

    from scalewatch.gns_capture import PerExampleNorms

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv1D(4, 5), torch.nn.Tanh(), Conv1D(3, 4))
    x = torch.randn(6, 7, 5)
    pe = PerExampleNorms(net)
    net(x).square().sum().backward()
    pe.end_backward()
    total, batch, params = pe.take_step()
    pe.remove()
    exact = 0.0
    for i in range(6):
        net.zero_grad()
        net(x[i:i + 1]).square().sum().backward()
        exact += sum(float(p.grad.square().sum()) for p in net.parameters())
    assert batch == 6 and len(params) == 4
    assert float(total) == pytest.approx(exact, rel=1e-4)


def test_measured_flops_do_not_charge_the_first_batch_padding_to_the_run(tmp_path) -> None:
    ds = VarLenDataset(n=8)
    ds.mask[:4, 1:] = 0  # the first batch is mostly padding
    ds.labels[:4, 1:] = -100
    watch = ScaleWatch(flops="measured")
    trainer(tmp_path, [watch], max_epochs=1).fit(TinyLM(d=16), loader(ds, 4))
    assert watch.convention.per_token == pytest.approx(3 * 2 * 16 * VOCAB)  # per position, not x5


def test_one_instance_reused_across_fits_starts_each_fit_from_zero(tmp_path) -> None:
    ds = VarLenDataset(n=12)
    watch = ScaleWatch()
    for i in range(2):
        trainer(tmp_path / str(i), [watch], max_epochs=1).fit(TinyLM(), loader(ds, 4))
        assert watch.tokens == ds.true_tokens and watch.samples == 12


def test_batches_skipped_by_returning_none_are_not_counted(tmp_path) -> None:
    class Skipping(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx % 4 == 3 else loss

    ds = VarLenDataset(n=32)
    watch = ScaleWatch()
    trainer(tmp_path, [watch], max_epochs=1).fit(Skipping(), loader(ds, 2))
    kept = [i for i in range(16) if i % 4 != 3]
    expected = sum(int(((ds.mask[2 * i:2 * i + 2] == 1) & (ds.labels[2 * i:2 * i + 2] != -100)).sum()) for i in kept)
    assert watch.tokens == expected and watch.samples == 2 * len(kept)


def test_tokens_fn_on_a_batch_without_ids_gets_the_batch_size_from_lightning(tmp_path) -> None:
    class Features(TinyLM):
        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.out(batch["x"]), batch["y"])

    data = [{"x": torch.randn(16), "y": torch.randn(VOCAB)} for _ in range(24)]
    watch = ScaleWatch(tokens_fn=lambda b: 10 * len(b["x"]), log_every_n_steps=2)
    trainer(tmp_path, [watch], max_epochs=1, accumulate_grad_batches=2).fit(Features(), DataLoader(data,
                                                                                                  batch_size=3))
    assert watch.samples == 24 and watch.tokens == 240
    assert "scalewatch/gns/b_simple" in scalars(tmp_path / "tb" / "version_0")  # the batch size is known


def test_no_batch_size_series_without_a_noise_scale(tmp_path) -> None:
    trainer(tmp_path, [ScaleWatch()], max_epochs=1).fit(TinyLM(), loader(VarLenDataset(n=8), 2))
    tags = scalars(tmp_path / "tb" / "version_0")
    assert not [t for t in tags if t.startswith("scalewatch/gns/")]


def test_manual_optimization_message_names_manual_optimization(tmp_path, caplog) -> None:
    class Manual(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            if batch_idx % 2:
                self.optimizers().step()
                self.optimizers().zero_grad()
            return loss

    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        trainer(tmp_path, [ScaleWatch()], max_epochs=1).fit(Manual(), loader(VarLenDataset(n=8), 2))
    (message,) = [r.getMessage() for r in caplog.records if "noise scale" in r.getMessage()]
    assert "manual optimization" in message and "without gradient accumulation" not in message


@pytest.mark.slow
def test_lightning_cli_preset_keeps_the_users_callbacks(tmp_path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text(f"""trainer:
  max_steps: 2
  accelerator: cpu
  enable_progress_bar: false
  default_root_dir: {tmp_path / 'root'}
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {tmp_path / 'my_ckpts'}
""")
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "cli_script.py"), "fit", "--config", str(user),
                        "--config", str(ROOT / "callbacks" / "scalewatch.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("CALLBACKS")][0]
    assert "LearningRateMonitor" in line and "ScaleWatch" in line
    assert f"ModelCheckpoint:{tmp_path / 'my_ckpts'}" in line  # the user's checkpointing, not a default one
    assert list((tmp_path / "my_ckpts").glob("*.ckpt"))


@pytest.mark.slow
def test_sharded_model_counts_the_whole_model_on_every_rank(tmp_path) -> None:
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "fsdp_count.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = count_parameters(torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 7)))
    for rank in (0, 1):
        total, embedding, local = (int(x) for x in (tmp_path / f"rank{rank}.txt").read_text().split())
        assert (total, embedding) == (whole.total, whole.embedding) and local < whole.total
