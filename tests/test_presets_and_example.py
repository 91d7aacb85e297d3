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
def test_main_example_trains_and_shows_its_laws(tmp_path) -> None:
    # A short run (the flags the example has for it) of its model on a 32-byte context, with the committed laws
    # by default: 40 steps logged every 5 give the forecast 7 points past the skipped first 10% of the run.
    # The model keeps the example's size: the pilots' L(N, D) is not asked far below their compute, where its
    # compute-optimal ratio (it grows as C^0.67 in this fit) says even 1 token per parameter is enough.
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_gpt.py"), "--max-steps", "40",
                        "--log-every", "5", "--n-layer", "4", "--n-embd", "128", "--block-size", "32",
                        "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tensorboard --logdir" in p.stdout
    s = scalars(tmp_path / "tiny_gpt" / "version_0")
    assert s["scalewatch/tokens"][-1] == (40, 40 * 16 * 32)
    assert s["scalewatch/loss_vs_tokens"][-1][0] == 40 * 16 * 32
    # The predicted curve with its band at every log point, and a forecast that saw the last step.
    for name in ("loss_pred", "loss_pred_low", "loss_pred_high"):
        assert [st for st, _ in s[f"scalewatch/{name}"]] == list(range(5, 41, 5)), name
    assert all(lo < mid < hi for (_, lo), (_, mid), (_, hi) in
               zip(s["scalewatch/loss_pred_low"], s["scalewatch/loss_pred"], s["scalewatch/loss_pred_high"]))
    for name in ("loss_forecast_final", "loss_forecast_final_low", "loss_forecast_final_high"):
        assert name in {t.removeprefix("scalewatch/") for t in s}, name
    assert s["scalewatch/loss_forecast_at_step"][-1][1] == 40
    # 40 steps x 512 tokens for 830k parameters: 0.025 tokens per parameter, the warning it deserves.
    assert max(v for _, v in s["scalewatch/health/undertrained"]) == 2
    assert "undertrained (warning)" in p.stdout
    for line in ("spent:", "allocation:", "loss:", "forecast:", "noise:", "alerts:"):
        assert line in p.stdout, line
    assert "the curve law predicted" in p.stdout


@pytest.mark.slow
def test_main_example_runs_without_laws(tmp_path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_gpt.py"), "--max-steps", "6",
                        "--log-every", "3", "--n-layer", "1", "--n-embd", "32", "--block-size", "32",
                        "--no-law", "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    s = scalars(tmp_path / "tiny_gpt" / "version_0")
    assert "scalewatch/loss_pred" not in s and "scalewatch/tokens" in s
    assert "no curve law: no prediction" in p.stdout and "Chinchilla's rule of thumb" in p.stdout


def test_committed_example_laws_load_and_name_the_command_that_made_them() -> None:
    from tiny_gpt import GPT, GPTConfig

    from scalewatch.config import ScaleWatchConfig
    from scalewatch.curves import load_curve_law
    from scalewatch.laws import load_law

    laws = ROOT / "examples" / "laws"
    record, curve_law = load_law(laws / "chinchilla_law.json", family="chinchilla"), load_curve_law(laws / "curve_law.json")
    for fitted_on in (record.fitted_on, curve_law.fitted_on):
        assert fitted_on["command"].startswith("python examples/pilot_sweep.py")
        assert fitted_on["fit_command"].startswith("scalewatch fit ")
        assert fitted_on["grid"] == "full" and isinstance(fitted_on["seed"], int) and fitted_on["sweep_seconds"] > 0
    assert record.fitted_on["converged"]
    # The pilots show no floor in N at this scale (see examples/laws/README.md): the floor form puts it at 0 and
    # every fit converges (the linear form's stopped at its evaluation limit with L0 -> -inf); the band is
    # calibrated on held-out pilot curves.
    assert curve_law.form == "power_floor_l0" and curve_law.coef["E"][0] < 1e-3
    assert curve_law.fitted_on["converged"] is True and "converged" in curve_law.fitted_on["message"]
    assert len(curve_law.fitted_on["held_out_mean_rel_error"]) == 14 and 0.01 < curve_law.band_rel < 0.1
    assert record.ci95 and record.samples  # the bootstrap intervals came along
    # The pilots bracket the main job's model size, so its prediction interpolates in N.
    n_example = sum(p.numel() for p in GPT(GPTConfig()).parameters())
    lo, hi = curve_law.n_range
    assert lo < n_example < hi
    # The loader the callback uses accepts both files, and the README names the command.
    config = ScaleWatchConfig(curve_law=str(laws / "curve_law.json"), law=str(laws / "chinchilla_law.json"))
    assert config.law.params() == record.law.params()
    assert record.fitted_on["command"] in (laws / "README.md").read_text()
