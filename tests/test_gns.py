"""Gradient noise scale: the estimator, each capture method against exact per-example gradients, resume, bad input."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from gns_problems import Classifier, exact_b_simple, loader, make_data, make_model
from helpers import SyncSpy, TinyLM, VarLenDataset, run_ddp, scalars, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F

from scalewatch import ScaleWatch, ScaleWatchConfigError
from scalewatch.callback import choose_gns_method
from scalewatch.gns import b_simple_from, batch_tradeoff, kaplan_b_crit, unbiased_estimates
from scalewatch.gns_capture import DeviceNoiseEMA, ParamGradHooks, PerExampleNorms

def _by_rows(batch):
    return batch[0].shape[0]


DECAY = 0.995  # EMA over ~200 steps: settles to a few % of the truth in 600 steps (5 seeds: within 6%)


def _watch(**kw) -> ScaleWatch:
    # classification batches carry no token ids: one "token" per example
    kw.setdefault("gns_decay", DECAY)
    return ScaleWatch(tokens_fn=_by_rows, samples_fn=_by_rows, log_every_n_steps=50, **kw)


def _estimate(watch: ScaleWatch) -> float:
    m_g2, m_tr, _ = watch.noise_scale.reduced
    return m_tr / m_g2


def _fit(watch: ScaleWatch, kind: str, accumulate: int, micro_batch: int, steps: int = 600, **kw) -> pl.Trainer:
    torch.set_num_threads(1)
    t = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[watch], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", **kw)
    t.fit(Classifier(make_model(kind)), loader(make_data(), micro_batch))
    return t


@pytest.fixture(scope="module")
def exact() -> dict[str, float]:
    data = make_data()
    return {kind: exact_b_simple(make_model(kind), data) for kind in ("logistic", "mlp")}


# ------------------------------------------------------------------ estimator maths
def test_two_batch_estimators_are_unbiased_on_gaussian_gradients() -> None:
    # per-example gradients g_i = G + noise with covariance Sigma: E[estimate] = truth
    gen = torch.Generator().manual_seed(0)
    d, b_small, k, trials = 20, 4, 8, 4000
    G = torch.linspace(-1, 1, d, dtype=torch.float64) * 0.3
    scales = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    per_example = G + scales * torch.randn(trials, k, b_small, d, generator=gen, dtype=torch.float64)
    small_grads = per_example.mean(2)  # [trials, k, d]
    small_sq = small_grads.square().sum(-1).mean(1)
    big_sq = small_grads.mean(1).square().sum(-1)
    g2, tr = unbiased_estimates(small_sq, big_sq, b_small, b_small * k)
    assert float(g2.mean()) == pytest.approx(float(G.square().sum()), rel=0.05)
    assert float(tr.mean()) == pytest.approx(float(scales.square().sum()), rel=0.02)
    assert float((g2 < 0).double().mean()) > 0  # single steps do go negative: hence EMAs, not ratios


def test_ema_divides_the_averages_and_skips_nonfinite_steps() -> None:
    ema = DeviceNoiseEMA(decay=0.5)
    steps = [(5.0, 2.0), (3.0, 0.5), (float("nan"), 1.0), (4.0, 1.5), (float("inf"), 1.0)]
    for small, big in steps:
        ema.update(torch.tensor(small), torch.tensor(big), 1, 4)
    m_g2, m_tr, weight = ema.state.tolist()
    assert weight == pytest.approx(1 - 0.5**3)  # three finite steps moved the bias correction, two did not
    ests = [unbiased_estimates(s, b, 1, 4) for s, b in steps if math.isfinite(s)]
    w = [0.25, 0.5, 1.0]  # decay 0.5: weights of the three finite steps, oldest first
    g2 = sum(wi * e[0] for wi, e in zip(w, ests, strict=True)) / sum(w)
    tr = sum(wi * e[1] for wi, e in zip(w, ests, strict=True)) / sum(w)
    assert m_g2 / weight == pytest.approx(g2) and m_tr / weight == pytest.approx(tr)
    assert b_simple_from(m_g2 / weight, m_tr / weight) == pytest.approx(tr / g2)
    ratios = sum(wi * e[1] / e[0] for wi, e in zip(w, ests, strict=True)) / sum(w)
    assert tr / g2 != pytest.approx(ratios)  # not an average of ratios


def test_clamping_and_reference_numbers() -> None:
    assert b_simple_from(-1.0, 2.0) == pytest.approx(1e9)  # |G|^2 estimated <= 0: noise dominates, capped
    assert b_simple_from(1.0, -2.0) == 0.0
    assert math.isnan(b_simple_from(float("nan"), 1.0))
    # Kaplan: B_crit roughly doubles for every 13% drop in loss
    assert kaplan_b_crit(3.0 * 0.87) / kaplan_b_crit(3.0) == pytest.approx(2.0, rel=0.05)
    t = batch_tradeoff(batch=256, b_crit=256)
    assert (t.steps_factor, t.compute_factor) == (2.0, 2.0)  # at B = B_crit: 2x steps and 2x examples


# ------------------------------------------------------------------ capture primitives
def test_param_hooks_give_each_micro_batch_gradient_norm_without_copies() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    xs = [torch.randn(3, 5) for _ in range(3)]
    expected = 0.0
    for x in xs:
        grads = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
        expected += sum(float(g.square().sum()) for g in grads)
    hooks = ParamGradHooks(net.parameters())
    for x in xs:
        net(x).square().mean().backward()
        hooks.end_backward()
    total, n = hooks.take_step()
    hooks.remove()
    assert n == 3 and float(total) == pytest.approx(expected, rel=1e-5)


def _per_example_sq_norms(net: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_one(p, xi):
        full = dict(params)
        full.update(p)
        return torch.func.functional_call(net, full, (xi[None],)).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))({n: params[n] for n in names}, x)
    return sum(grads[n].reshape(len(x), -1).square().sum(1) for n in names)


@pytest.mark.parametrize("shape, layers", [
    ((6, 5), "linear"),              # 2-D inputs: |a|^2 |delta|^2
    ((6, 3, 5), "linear"),           # short sequences: ghost-norm Gram form
    ((6, 40, 5), "linear"),          # long sequences: per-example bmm
    ((6, 7, 5), "layernorm"),
    ((6, 7, 5), "rmsnorm"),
])
def test_per_example_norms_equal_torch_func(shape, layers) -> None:
    torch.manual_seed(0)
    if layers == "linear":
        net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    elif layers == "layernorm":
        net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    else:
        net = nn.Sequential(nn.Linear(5, 4), nn.RMSNorm(4), nn.Linear(4, 3))
    for p in net.parameters():  # non-trivial norm weights
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(*shape)
    pe = PerExampleNorms(net)
    net(x).square().sum().backward()
    pe.end_backward()
    total, batch, params = pe.take_step()
    pe.remove()
    names = [n for n, p in net.named_parameters()]
    exact = _per_example_sq_norms(net, x, names)
    assert batch == shape[0] and len(params) == len(names)
    assert float(total) == pytest.approx(float(exact.sum()), rel=1e-4)


def test_per_example_leaves_out_tied_and_reused_layers() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: its gradient also has an embedding part

        def forward(self, ids):
            return self.head(self.mid(self.mid(self.emb(ids))))  # mid runs twice

    net = Tied()
    pe = PerExampleNorms(net)
    assert pe.n_modules == 1  # only mid: the head's only weight is tied
    net(torch.randint(0, 10, (3, 5))).sum().backward()
    pe.end_backward()
    total, batch, params = pe.take_step()
    pe.remove()
    assert total is None and any("ran 2 times" in w for w in pe.warnings)


# ------------------------------------------------------------------ accuracy in real training
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_accumulation_method_matches_exact_noise_scale(kind, exact) -> None:
    watch = _watch()
    _fit(watch, kind, accumulate=4, micro_batch=8)
    assert watch.gns_method == "accumulation"
    assert _estimate(watch) == pytest.approx(exact[kind], rel=0.10)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_per_example_method_matches_exact_noise_scale(kind, exact) -> None:
    watch = _watch(gns="per_example")
    _fit(watch, kind, accumulate=1, micro_batch=32)
    assert watch.gns_method == "per_example"
    assert _estimate(watch) == pytest.approx(exact[kind], rel=0.10)


def test_layernorm_only_per_example_matches_exact_noise_scale_of_those_weights() -> None:
    net = make_model("mlp")
    exact = exact_b_simple(net, make_data(), params=["1.weight", "1.bias"])  # the LayerNorm's
    watch = _watch(gns="per_example_norm")
    _fit(watch, "mlp", accumulate=1, micro_batch=32)
    assert watch.gns_method == "per_example_norm"
    assert _estimate(watch) == pytest.approx(exact, rel=0.10)


@pytest.mark.parametrize("method, accumulate, micro_batch", [("accumulation", 4, 8), ("per_example", 1, 32)])
def test_fp16_loss_scale_is_divided_out(method, accumulate, micro_batch) -> None:
    plain = _watch(gns="per_example" if method == "per_example" else "auto")
    _fit(plain, "mlp", accumulate, micro_batch, steps=100)
    scaled = _watch(gns="per_example" if method == "per_example" else "auto")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**9)
    t = _fit(scaled, "mlp", accumulate, micro_batch, steps=100, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert float(t.precision_plugin.scaler._scale) == 1024.0  # the scale really was in play
    assert _estimate(scaled) == pytest.approx(_estimate(plain), rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate, kind, method", [(1, "mlp", "ddp"), (2, "logistic", "ddp+accumulation")])
def test_two_process_ddp_matches_exact_noise_scale(tmp_path, accumulate, kind, method) -> None:
    ranks = run_ddp("gns", tmp_path, 2, str(accumulate), kind)
    assert sorted(ranks) == [0, 1]
    r0, r1 = ranks[0], ranks[1]
    assert r0["world_size"] == 2 and r0["method"] == method
    assert r0["comm_hook"] == (method == "ddp")  # a DDP comm hook without accumulation, param hooks with it
    assert (r0["g2"], r0["trace"]) == (r1["g2"], r1["trace"])  # every rank holds the global EMAs
    assert r0["trace"] / r0["g2"] == pytest.approx(r0["exact"], rel=0.10)


# ------------------------------------------------------------------ what gets logged, no sync, resume
def test_logged_series_in_sequences_and_tokens(tmp_path) -> None:
    ds = VarLenDataset(n=64, seq_len=12)
    watch = ScaleWatch(log_every_n_steps=4)
    trainer(tmp_path, [watch], max_epochs=2, accumulate_grad_batches=2).fit(
        TinyLM(), torch.utils.data.DataLoader(ds, batch_size=4))
    s = scalars(tmp_path / "tb" / "version_0")
    last = {tag: series[-1][1] for tag, series in s.items()}
    assert watch.gns_method == "accumulation"
    assert last["scalewatch/gns/batch_size"] == 8.0  # 2 micro-batches of 4 sequences
    tokens_per_seq = last["scalewatch/gns/batch_tokens"] / last["scalewatch/gns/batch_size"]
    assert 1 < tokens_per_seq < 12  # masked and -100 positions do not count
    assert last["scalewatch/gns/b_simple_tokens"] == pytest.approx(last["scalewatch/gns/b_simple"] * tokens_per_seq,
                                                                    rel=1e-5)
    assert last["scalewatch/gns/b_crit"] == pytest.approx(last["scalewatch/gns/b_simple_tokens"], rel=1e-6)
    assert last["scalewatch/gns/b_crit_kaplan_ref"] == pytest.approx(kaplan_b_crit(last["scalewatch/loss"]), rel=1e-4)
    assert last["scalewatch/gns/compute_factor"] == pytest.approx(1 + 8 / last["scalewatch/gns/b_simple"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    ea.Reload()
    assert "scalewatch/gns/method/text_summary" in ea.Tags()["tensors"]


class _SpiedGNS(ScaleWatch):
    """Records the sync-prone tensor calls made in every noise-scale hook, autograd hooks included."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.records: list[tuple[int, list[str]]] = []  # (optimizer step, calls)

    def _spied(self, fn, *args):
        with SyncSpy() as spy:
            out = fn(*args)
        step = self._trainer.global_step if self._trainer else -1
        self.records.append((step, spy.calls))
        return out

    def on_after_backward(self, *args) -> None:
        self._spied(super().on_after_backward, *args)

    def on_before_optimizer_step(self, *args) -> None:
        self._spied(super().on_before_optimizer_step, *args)

    def on_train_batch_start(self, *args) -> None:
        self._spied(super().on_train_batch_start, *args)


@pytest.mark.parametrize("gns, accumulate", [("auto", 3), ("per_example", 1)])
def test_no_host_sync_in_noise_scale_capture(tmp_path, monkeypatch, gns, accumulate) -> None:
    watch = _SpiedGNS(gns=gns, log_every_n_steps=5)
    # the autograd-side hooks too
    for cls, name in ((ParamGradHooks, "_hook"), (PerExampleNorms, "_on_grad"), (PerExampleNorms, "_forward_hook")):
        orig = getattr(cls, name)

        def wrapped(self, *a, __orig=orig):
            return watch._spied(__orig, self, *a)

        monkeypatch.setattr(cls, name, wrapped)
    ds = VarLenDataset(n=60)
    trainer(tmp_path, [watch], max_epochs=1, accumulate_grad_batches=accumulate, log_every_n_steps=5).fit(
        TinyLM(), torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True))
    assert watch.gns_method == ("accumulation" if gns == "auto" else "per_example")
    assert len(watch.records) > 40
    assert [calls for _, calls in watch.records if calls] == []
    assert watch.noise_scale.reduced is not None and watch.noise_scale.reduced[2] > 0  # it did measure


def test_noise_scale_state_survives_resume(tmp_path) -> None:
    """Resumed at an epoch boundary, the EMAs end exactly where an uninterrupted run's do."""
    data = make_data(n=512)

    def run(epochs: int, ckpt_path=None, ckpt_dir=None) -> ScaleWatch:
        watch = _watch()
        cbs = [watch] + ([ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else [])
        t = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=2, callbacks=cbs, logger=False,
                       enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu")
        torch.manual_seed(0)
        t.fit(Classifier(make_model("mlp")), torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return watch

    whole = run(2)
    first = run(1, ckpt_dir=tmp_path)
    ckpt = next(tmp_path.glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["ScaleWatch"]["gns"]
    assert saved["state"] == pytest.approx([*first.noise_scale.ema.state.tolist()])
    assert saved["state"][2] > 0
    resumed = run(2, ckpt_path=str(ckpt))
    assert resumed.noise_scale.ema.state.tolist() == pytest.approx(whole.noise_scale.ema.state.tolist(), rel=1e-9)
    fresh = run(1)  # and without the checkpoint the second epoch alone would differ
    assert fresh.noise_scale.ema.state.tolist() != pytest.approx(whole.noise_scale.ema.state.tolist(), rel=1e-6)


def test_nonfinite_step_is_skipped_and_training_goes_on(tmp_path) -> None:
    class Spiky(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 10 else loss

        def on_before_optimizer_step(self, optimizer):
            # runs after the callback's hook; keeps lr=0 SGD from writing 0 * NaN into the weights
            for p in self.parameters():
                p.grad.nan_to_num_(0.0)

    watch = _watch()
    torch.set_num_threads(1)
    t = pl.Trainer(max_steps=40, accumulate_grad_batches=2, callbacks=[watch], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu")
    t.fit(Spiky(make_model("mlp")), loader(make_data(n=1024), 8))
    m_g2, m_tr, weight = watch.noise_scale.reduced
    assert t.global_step == 40 and math.isfinite(m_g2) and math.isfinite(m_tr)
    assert weight == pytest.approx(1 - DECAY ** 39)  # 40 steps, the one with the NaN skipped


# ------------------------------------------------------------------ bad input
def test_sharded_strategies_get_a_message_not_a_crash() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    method, message = choose_gns_method("auto", FSDPStrategy(), 8, 1, True)
    assert method is None and "FSDPStrategy" in message and "keeps working" in message
    assert choose_gns_method("auto", DDPStrategy(), 2, 1, True) == ("ddp", None)
    assert choose_gns_method("per_example", SingleDeviceStrategy("cpu"), 1, 1, True) == ("per_example", None)
    method, message = choose_gns_method("ddp", SingleDeviceStrategy("cpu"), 1, 1, True)
    assert method is None and "gns='auto'" in message
    method, message = choose_gns_method("auto", SingleDeviceStrategy("cpu"), 1, 1, True)
    assert method is None and "per_example" in message


def test_per_example_without_linear_layers_says_so_once_and_the_rest_works(tmp_path, caplog) -> None:
    class EmbeddingOnly(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(32, 32)

        def training_step(self, batch, batch_idx):
            logits = self.emb(batch["input_ids"])
            return F.cross_entropy(logits.reshape(-1, 32), batch["labels"].reshape(-1), ignore_index=-100)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ds = VarLenDataset(n=16)
    watch = ScaleWatch(gns="per_example")
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        trainer(tmp_path, [watch], max_epochs=2).fit(EmbeddingOnly(), torch.utils.data.DataLoader(ds, batch_size=4))
    messages = [r.getMessage() for r in caplog.records if "noise scale" in r.getMessage()]
    assert len(messages) == 1 and "no Linear" in messages[0]
    assert watch.gns_method is None and watch.tokens == 2 * ds.true_tokens
    assert "scalewatch/gns/b_simple" not in scalars(tmp_path / "tb" / "version_0")


def test_default_single_device_says_once_that_it_cannot_measure(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        trainer(tmp_path, [ScaleWatch()], max_epochs=2).fit(TinyLM(), torch.utils.data.DataLoader(
            VarLenDataset(n=16), batch_size=4))
    messages = [r.getMessage() for r in caplog.records if "noise scale" in r.getMessage()]
    assert len(messages) == 1 and "gns='per_example'" in messages[0]


@pytest.mark.parametrize("kwargs, match", [({"gns": "sometimes"}, "gns must be one of"),
                                           ({"gns_decay": 1.0}, "gns_decay")])
def test_bad_gns_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ScaleWatchConfigError, match=match):
        ScaleWatch(**kwargs)
