"""The ready-made presets load into a real ScaleWatch; the main example runs end to end."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import scalars

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((ROOT / "callbacks").glob("*.yaml")), ids=lambda p: p.name)
def test_preset_builds_the_callback(preset) -> None:
    doc = yaml.safe_load(preset.read_text())
    (cb,) = doc["trainer"]["callbacks+"]  # appended: the user's own callbacks stay
    module, _, name = cb["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    instance = cls(**(cb.get("init_args") or {}))
    assert type(instance).__name__ == "ScaleWatch"


@pytest.mark.slow
def test_main_example_trains_and_writes_tensorboard(tmp_path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_gpt.py"), "--max-steps", "6",
                        "--log-every", "3", "--n-layer", "1", "--n-embd", "32", "--block-size", "32",
                        "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tensorboard --logdir" in p.stdout
    s = scalars(tmp_path / "tiny_gpt" / "version_0")
    assert s["scalewatch/tokens"][-1] == (6, 6 * 16 * 32)
    assert s["scalewatch/loss_vs_tokens"][-1][0] == 6 * 16 * 32
