"""Zero-code attach: an unmodified Lightning script, run with and without the environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import scalars

from scalewatch import ScaleWatch
from scalewatch.attach import callbacks, settings_from_yaml
from scalewatch.config import ScaleWatchConfigError

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {examples!r})
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders

    cfg = GPTConfig(block_size=32, n_layer=1, n_embd=32, n_head=2)
    train, _ = make_loaders(cfg, 8, num_train=8 * 8, max_bytes=200_000)
    pl.Trainer(max_steps=8, accelerator="cpu", log_every_n_steps=4, enable_progress_bar=False,
               enable_checkpointing=False, logger=TensorBoardLogger(sys.argv[1], name="tb", version=0)
               ).fit(TinyGPTModule(cfg, max_steps=8), train)
""")


def _run(tmp_path: Path, name: str, **env: str) -> dict:
    script = tmp_path / "train.py"  # knows nothing about scalewatch
    script.write_text(SCRIPT.format(examples=str(ROOT / "examples")))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SCALEWATCH")}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / name)], env={**clean, **env},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return scalars(tmp_path / name / "tb" / "version_0")


@pytest.mark.slow
def test_an_unmodified_script_gets_scalewatch_only_when_asked(tmp_path) -> None:
    assert not any(t.startswith("scalewatch/") for t in _run(tmp_path, "plain"))
    with_it = _run(tmp_path, "attached", SCALEWATCH="1")
    assert with_it["scalewatch/tokens"][-1] == (8, 8 * 8 * 32)
    preset = _run(tmp_path, "preset", SCALEWATCH_CONFIG=str(ROOT / "callbacks" / "scalewatch_attention.yaml"))
    # 6N+attn from the preset, the architecture inferred from the module's hparams
    assert preset["scalewatch/flops"][-1][1] > with_it["scalewatch/flops"][-1][1]


def test_the_factory_reads_the_environment(tmp_path, monkeypatch) -> None:
    for k in ("SCALEWATCH", "SCALEWATCH_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    assert callbacks() == []
    monkeypatch.setenv("SCALEWATCH", "0")
    assert callbacks() == []
    monkeypatch.setenv("SCALEWATCH", "1")
    (cb,) = callbacks()
    assert isinstance(cb, ScaleWatch) and cb.config.flops == "6N" and cb.state_key == "ScaleWatch[attached]"
    (tmp_path / "plain.yaml").write_text("flops: 6N+attn\nn_layer: 2\nd_model: 8\nlog_every_n_steps: 7\n")
    monkeypatch.setenv("SCALEWATCH_CONFIG", str(tmp_path / "plain.yaml"))
    (cb,) = callbacks()
    assert (cb.config.flops, cb.config.log_every_n_steps) == ("6N+attn", 7)
    (tmp_path / "bad.yaml").write_text("trainer:\n  callbacks: []\n")
    with pytest.raises(ScaleWatchConfigError, match="no scalewatch.ScaleWatch"):
        settings_from_yaml(tmp_path / "bad.yaml")


def test_an_attached_scalewatch_stands_down_when_the_script_has_its_own(tmp_path, monkeypatch, caplog) -> None:
    import logging

    import lightning.pytorch as pl
    from helpers import TinyLM, VarLenDataset, loader

    monkeypatch.setenv("SCALEWATCH", "1")
    own = ScaleWatch(log_every_n_steps=2)
    with caplog.at_level(logging.WARNING, logger="scalewatch"):
        t = pl.Trainer(max_steps=4, accelerator="cpu", callbacks=[own], logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
        (attached,) = [cb for cb in t.callbacks if isinstance(cb, ScaleWatch) and cb is not own]
        t.fit(TinyLM(), loader(VarLenDataset(n=16), 4))
    assert own.tokens > 0 and attached.tokens == 0  # the script's counts; the attached one stood down
    assert "using the script's" in caplog.text
    monkeypatch.setenv("SCALEWATCH", "0")
    monkeypatch.setenv("SCALEWATCH_CONFIG", str(tmp_path / "missing.yaml"))
    assert callbacks() == []  # an explicit off wins over a (bad) config path


def test_yaml_numbers_in_exponent_form_and_unknown_keys(tmp_path, monkeypatch) -> None:
    # PyYAML reads 2e10 as the string "2e10": the callback must still take it as a number.
    p = tmp_path / "sw.yaml"
    p.write_text("unique_tokens: 2e10\npeak_flops: 1e12\nn_params: 1.2e6\nflops: 6N+attn\n")
    monkeypatch.setenv("SCALEWATCH_CONFIG", str(p))
    (watch,) = callbacks()
    assert watch.config.unique_tokens == 2e10 and watch.config.peak_flops == 1e12
    assert watch.config.n_params == 1_200_000 and watch.config.flops == "6N+attn"
    p.write_text("flop: 6N+attn\n")
    with pytest.raises(ScaleWatchConfigError, match=r"unknown ScaleWatch argument\(s\) 'flop' \(did you mean 'flops'\?\)"):
        callbacks()
    with pytest.raises(ScaleWatchConfigError, match="peak_flops must be positive"):
        ScaleWatch(peak_flops="fast")  # a string that is no number: one clear line, not a TypeError
    with pytest.raises(ScaleWatchConfigError, match="schedule: no file"):
        ScaleWatch(schedule=str(tmp_path / "missing.csv"))
