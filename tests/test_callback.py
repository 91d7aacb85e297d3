"""ScaleWatch inside real Lightning training: exact counts, no host sync, bad input, resume."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import SyncSpy, TinyLM, VarLenDataset, loader, scalars, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from scalewatch import ScaleWatch, ScaleWatchConfigError


def _last(series: dict, tag: str) -> float:
    return series["scalewatch/" + tag][-1][1]


@pytest.mark.parametrize("accumulate", [1, 3])
def test_counts_are_exact_with_masks_accumulation_and_short_last_batch(tmp_path, accumulate) -> None:
    ds = VarLenDataset(n=43)  # batches of 4: the last one holds 3 samples
    watch = ScaleWatch(log_every_n_steps=2)
    model = TinyLM()
    t = trainer(tmp_path, [watch], max_epochs=2, accumulate_grad_batches=accumulate)
    t.fit(model, loader(ds, 4))

    assert watch.tokens == 2 * ds.true_tokens
    assert watch.samples == 2 * 43
    assert watch.n_params == 32 * 16 + 16 * 32 + 32
    assert watch.flops == 6 * watch.n_params * watch.tokens

    s = scalars(tmp_path / "tb" / "version_0")
    assert _last(s, "tokens") == watch.tokens  # small enough to be exact in float32
    assert _last(s, "samples") == 86
    assert _last(s, "tokens_per_param") == pytest.approx(watch.tokens / watch.n_params)
    assert _last(s, "n_params") == watch.n_params
    assert s["scalewatch/tokens"][-1][0] == t.global_step  # the tail of the run is flushed at the end
    # steps logged: every 2nd optimizer step, plus the final one
    steps = [step for step, _ in s["scalewatch/tokens"]]
    assert steps == sorted(set(steps)) and all(st % 2 == 0 or st == t.global_step for st in steps)
    assert "scalewatch/tokens_per_sec" in s and "scalewatch/flops_per_sec" in s
    assert "scalewatch/mfu" not in s  # no known peak FLOP/s on a CPU
    # the loss-vs-tokens series uses the token count as its x-axis
    assert s["scalewatch/loss_vs_tokens"][-1][0] == watch.tokens

    # The logged loss is the mean of the micro-batch losses of the interval, with Lightning's
    # division by accumulate_grad_batches undone.
    per_step = len(model.seen_losses)
    first_interval = model.seen_losses[: 2 * accumulate]
    assert s["scalewatch/loss"][0][1] == pytest.approx(sum(first_interval) / len(first_interval), rel=1e-5)
    assert per_step == 2 * 11
    if accumulate == 1:  # the end-of-run summary says the same numbers
        text = watch.summary()
        assert f"{watch.tokens:,} tokens" in text and f"N = {watch.n_params:,}" in text
        assert f"{watch.tokens / watch.n_params:.2f} tokens/param" in text and "~20 (Chinchilla" in text
        assert f"last training loss {s['scalewatch/loss'][-1][1]:.4g}" in text and "alerts:" in text


def test_attention_flops_use_each_batch_sequence_length(tmp_path) -> None:
    ds = VarLenDataset(n=8, seq_len=12)
    watch = ScaleWatch(flops="6N+attn", n_layer=2, d_model=16, log_every_n_steps=100)
    trainer(tmp_path, [watch], max_epochs=1).fit(TinyLM(), loader(ds, 4))
    assert watch.flops == 6 * watch.n_params * ds.true_tokens + 12 * 2 * 16 * 12 * ds.true_tokens


def test_measured_flops_mode_counts_forward_and_backward(tmp_path) -> None:
    ds = VarLenDataset(n=8)
    watch = ScaleWatch(flops="measured")
    trainer(tmp_path, [watch], max_epochs=1).fit(TinyLM(d=16), loader(ds, 4))
    # TinyLM's only matmul is the output Linear over all B*T positions: 2*d*V forward,
    # 2*d*V weight gradient (the embedding input needs a gradient too: another 2*d*V).
    # Per token POSITION the model ran (padding included), charged per training token: dividing by the
    # first batch's training tokens instead would charge its padding share to the whole run.
    assert watch.convention.per_token == pytest.approx(3 * 2 * 16 * 32)
    assert watch.flops == pytest.approx(3 * 2 * 16 * 32 * ds.true_tokens, rel=1e-12)
    assert "measured" in watch.describe()


class _TinyLSTM(TinyLM):
    """TinyLM with an LSTM between embedding and head: FlopCounterMode counts 0 FLOPs for nn.LSTM."""

    def __init__(self, d: int = 16) -> None:
        super().__init__(d=d)
        self.lstm = torch.nn.LSTM(d, d, batch_first=True)

    def training_step(self, batch, batch_idx):
        logits = self.out(self.lstm(self.emb(batch["input_ids"]))[0])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                 ignore_index=-100)


def test_measured_flops_far_below_6n_warn_once_that_the_counter_missed_layers(tmp_path, caplog) -> None:
    """New-user trial: a char-LSTM measured 98,304 FLOPs per token (the head only) against 6N = 299,520, silently."""
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        watch = ScaleWatch(flops="measured")
        trainer(tmp_path, [watch], max_epochs=1).fit(_TinyLSTM(), loader(VarLenDataset(n=8), 4))
    said = [r.getMessage() for r in caplog.records if "layers the FLOP counter cannot see" in r.getMessage()]
    assert len(said) == 1 and "nn.LSTM" in said[0] and "flops='6N'" in said[0]
    assert watch.convention.per_token == pytest.approx(3 * 2 * 16 * 32)  # still the measured count: a warning only
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scalewatch"):  # the same model without the LSTM: no warning
        trainer(tmp_path, [ScaleWatch(flops="measured")], max_epochs=1).fit(TinyLM(), loader(VarLenDataset(n=8), 4))
    assert not [r for r in caplog.records if "FLOP counter" in r.getMessage()]


def test_tokens_fn_overrides_counting(tmp_path) -> None:
    ds = VarLenDataset(n=8)
    watch = ScaleWatch(tokens_fn=lambda b: 1000)
    trainer(tmp_path, [watch], max_epochs=1).fit(TinyLM(), loader(ds, 4))
    assert watch.tokens == 2000 and watch.samples == 8


class _SpiedScaleWatch(ScaleWatch):
    """ScaleWatch whose per-batch hooks record the sync-prone calls they make."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.records: list[tuple[int, bool, list[str]]] = []  # (batch number, logged?, calls)

    def _spied(self, hook, *args) -> None:
        before = self._last_logged_step
        with SyncSpy() as spy:
            hook(*args)
        self.records.append((self.counter.seen_batches, self._last_logged_step != before, spy.calls))

    def on_train_batch_start(self, *args) -> None:
        self._spied(super().on_train_batch_start, *args)

    def on_train_batch_end(self, *args) -> None:
        self._spied(super().on_train_batch_end, *args)

    def on_before_optimizer_step(self, *args) -> None:  # the gradient norm of the health detectors
        self._spied(super().on_before_optimizer_step, *args)


@pytest.mark.parametrize("tokens_fn, max_pending", [(None, 1024), (lambda b: b["attention_mask"].sum(), 1024),
                                                     (None, 3)])
def test_no_host_sync_on_steps_that_do_not_log(tmp_path, monkeypatch, tokens_fn, max_pending) -> None:
    # max_pending=3 makes the callback fold its pending device values on quiet steps too
    monkeypatch.setattr("scalewatch.accumulators.MAX_PENDING", max_pending)
    ds = VarLenDataset(n=40)
    watch = _SpiedScaleWatch(log_every_n_steps=4, tokens_fn=tokens_fn)
    trainer(tmp_path, [watch], max_epochs=1, accumulate_grad_batches=2).fit(TinyLM(), loader(ds, 2))
    quiet = [calls for n, logged, calls in watch.records if not logged and n > 1]
    loud = [calls for n, logged, calls in watch.records if logged]
    assert len(quiet) >= 30
    assert all(calls == [] for calls in quiet), [c for c in quiet if c]
    # the spy does see the one read per log interval, so the silence above means something
    assert loud and all("tolist" in calls for calls in loud)
    if tokens_fn is None:
        assert watch.tokens == ds.true_tokens and watch.samples == 40


def test_nonfinite_loss_is_recorded_not_raised(tmp_path) -> None:
    class NaNAtStep3(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            # a NaN constant: the loss is NaN but the gradients stay finite
            return loss + float("nan") if batch_idx in (3, 4) else loss

    ds = VarLenDataset(n=24)
    watch = ScaleWatch(log_every_n_steps=1)
    trainer(tmp_path, [watch], max_epochs=1).fit(NaNAtStep3(), loader(ds, 2))
    s = scalars(tmp_path / "tb" / "version_0")
    losses = dict(s["scalewatch/loss"])
    assert math.isnan(losses[4]) and math.isnan(losses[5])
    assert math.isfinite(losses[3]) and math.isfinite(losses[6])
    assert watch.nonfinite == 2 and _last(s, "nonfinite_losses") == 2
    assert watch.tokens == ds.true_tokens  # counting went on


def test_loss_logged_by_the_module_is_used_when_training_step_returns_none(tmp_path) -> None:
    class Manual(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.log("train_loss", loss)

    ds = VarLenDataset(n=8)
    watch = ScaleWatch(log_every_n_steps=2)
    model = Manual()
    trainer(tmp_path, [watch], max_epochs=1).fit(model, loader(ds, 2))
    s = scalars(tmp_path / "tb" / "version_0")
    # The interval mean of what the module logged each batch (not the last value at the log step).
    logged = dict(s["scalewatch/loss"])
    assert logged[2] == pytest.approx(sum(model.seen_losses[0:2]) / 2, rel=1e-6)
    assert logged[4] == pytest.approx(sum(model.seen_losses[2:4]) / 2, rel=1e-6)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(n_params=0), "n_params"),
    (dict(n_params=-5), "n_params"),
    (dict(n_params=1.5e3 + 0.5), "n_params"),  # not a count
    (dict(flops="7N"), "flops"),
    (dict(flops=-1.0), "flops"),
    (dict(param_convention="kaplan"), "param_convention"),
])
def test_bad_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ScaleWatchConfigError, match=match):
        ScaleWatch(**kwargs)


def test_n_params_written_as_a_float_is_taken_as_the_count() -> None:
    assert ScaleWatch(n_params=1e9).config.n_params == 1_000_000_000


def test_unreadable_batch_fails_at_first_batch_naming_tokens_fn(tmp_path) -> None:
    class FloatBatches(TinyLM):
        def training_step(self, batch, batch_idx):
            return self.out.weight.sum() * 0 + batch.sum()

    data = [torch.randn(4, 16) for _ in range(3)]
    t = trainer(tmp_path, [ScaleWatch()], max_epochs=1)
    with pytest.raises(ScaleWatchConfigError, match="tokens_fn"):
        t.fit(FloatBatches(), torch.utils.data.DataLoader(data, batch_size=None))
    assert t.global_step == 0  # it stopped at the first batch, before training on it


@pytest.mark.parametrize("fn, match", [(lambda b: 12.5, "tokens_fn"), (lambda b: -3, "negative"),
                                       (lambda b: torch.tensor(-3), "negative")])
def test_bad_tokens_fn_fails_at_first_batch(tmp_path, fn, match) -> None:
    t = trainer(tmp_path, [ScaleWatch(tokens_fn=fn)], max_epochs=1)
    with pytest.raises(ScaleWatchConfigError, match=match):
        t.fit(TinyLM(), loader(VarLenDataset(n=8), 4))


def test_module_without_trainable_parameters_needs_n_params(tmp_path) -> None:
    class Frozen(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.requires_grad_(False)
            self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    t = trainer(tmp_path, [ScaleWatch()], max_epochs=1)
    with pytest.raises(ScaleWatchConfigError, match="n_params"):
        t.fit(Frozen(), loader(VarLenDataset(n=8), 4))


def test_attention_flops_without_architecture_names_the_arguments(tmp_path) -> None:
    t = trainer(tmp_path, [ScaleWatch(flops="6N+attn")], max_epochs=1)
    with pytest.raises(ScaleWatchConfigError, match="n_layer=.*d_model="):
        t.fit(TinyLM(), loader(VarLenDataset(n=8), 4))


# --------------------------------------------------------------------- resume
def test_resume_from_mid_run_checkpoint_ends_with_uninterrupted_totals(tmp_path) -> None:
    ds = VarLenDataset(n=20)  # 5 batches of 4 per epoch, different token counts each

    def run(logdir, callbacks, **kw):
        torch.manual_seed(0)
        t = trainer(logdir, callbacks, **kw)
        return t

    full = ScaleWatch(flops="6N+attn", n_layer=1, d_model=16, log_every_n_steps=100)
    run(tmp_path / "full", [full], max_epochs=3).fit(TinyLM(), loader(ds, 4))

    # First leg: one epoch; the checkpoint is written mid-run, while counts are still
    # unreduced on the device (no log point has happened yet).
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    first = ScaleWatch(flops="6N+attn", n_layer=1, d_model=16, log_every_n_steps=100)
    run(tmp_path / "a", [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(TinyLM(), loader(ds, 4))
    path = next((tmp_path / "ckpt").glob("*.ckpt"))

    second = ScaleWatch(flops="6N+attn", n_layer=1, d_model=16, log_every_n_steps=100)
    t = run(tmp_path / "b", [second], max_epochs=3)
    t.fit(TinyLM(), loader(ds, 4), ckpt_path=str(path))

    assert second.tokens == full.tokens == 3 * ds.true_tokens
    assert second.samples == full.samples == 60
    assert second.flops == full.flops
    assert len(second.monitor.history) == len(full.monitor.history)
    s = scalars(tmp_path / "b" / "tb" / "version_0")
    assert _last(s, "tokens") == full.tokens


def test_alerts_are_named_after_the_logger_unless_run_name_is_given(tmp_path) -> None:
    """The alerts JSONL of a sweep: each run under its logger's name/version, not all "run"."""
    import json

    from lightning.pytorch.loggers import CSVLogger

    ds = VarLenDataset(n=43)  # ~0.5 tokens per parameter: undertrained fires at the first log point

    def runs(name: str, **kw) -> set[str]:
        jsonl = tmp_path / f"{name}.jsonl"
        watch = ScaleWatch(log_every_n_steps=2, alerts_jsonl=jsonl, gns="off", **kw)
        trainer(tmp_path, [watch], max_epochs=1, **({} if name == "tb" else {"logger": CSVLogger(
            str(tmp_path), name="tiny_gpt")} if name == "csv" else {"logger": False})).fit(TinyLM(), loader(ds, 4))
        return {json.loads(line)["run"] for line in jsonl.read_text().splitlines()}

    assert runs("tb") == {"tb/version_0"}  # helpers.trainer: TensorBoardLogger(name="tb", version=0)
    assert runs("csv") == {"tiny_gpt/version_0"}
    assert runs("none") == {"run"}  # no logger
    assert runs("given", run_name="exp7") == {"exp7"}
