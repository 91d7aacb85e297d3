"""Zero-code attach: ``SCALEWATCH=1 python train.py`` adds ScaleWatch to every Lightning Trainer.

Lightning calls the factories registered under the ``lightning.pytorch.callbacks_factory`` entry
point (this package registers :func:`callbacks`) whenever a Trainer is built. With neither
``SCALEWATCH`` nor ``SCALEWATCH_CONFIG`` set it returns nothing, so an installed scalewatch
changes no run that did not ask for it. ``SCALEWATCH_CONFIG=path.yaml`` reads ScaleWatch's
arguments from a YAML file: a plain mapping (``flops: 6N+attn``) or one of the LightningCLI
presets in ``callbacks/`` (``trainer: callbacks: - class_path: scalewatch.ScaleWatch``).
A script that already lists ScaleWatch keeps its own: the attached one then steps aside.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from scalewatch.config import ScaleWatchConfigError

ENABLE = "SCALEWATCH"
CONFIG = "SCALEWATCH_CONFIG"


def settings_from_yaml(path: str | Path) -> dict[str, Any]:
    """ScaleWatch's keyword arguments from a YAML file (a plain mapping or a LightningCLI preset).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "sw.yaml")
        >>> _ = open(p, "w").write("trainer:\\n  callbacks:\\n    - class_path: scalewatch.ScaleWatch\\n"
        ...                        "      init_args: {flops: 6N+attn, n_layer: 2, d_model: 8}\\n")
        >>> settings_from_yaml(p)
        {'flops': '6N+attn', 'n_layer': 2, 'd_model': 8}
    """
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ScaleWatchConfigError(f"scalewatch: {CONFIG}={path}: cannot read it ({exc}); point it at a YAML "
                                    "file of ScaleWatch arguments") from None
    if isinstance(doc, dict) and "trainer" in doc:
        trainer = doc["trainer"] or {}
        listed = (trainer.get("callbacks+") or []) + (trainer.get("callbacks") or [])  # the presets append
        found = [cb for cb in listed if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ScaleWatch")]
        if not found:
            raise ScaleWatchConfigError(f"scalewatch: {CONFIG}={path}: no scalewatch.ScaleWatch under "
                                        "trainer.callbacks+ (or trainer.callbacks)")
        doc = found[0].get("init_args") or {}
    if not isinstance(doc, dict):
        raise ScaleWatchConfigError(f"scalewatch: {CONFIG}={path}: expected a mapping of ScaleWatch arguments")
    import dataclasses

    from scalewatch.config import ScaleWatchConfig

    known = {f.name for f in dataclasses.fields(ScaleWatchConfig)}
    unknown = sorted(set(doc) - known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ScaleWatchConfigError(f"scalewatch: {CONFIG}={path}: unknown ScaleWatch argument(s) {hint}; the "
                                    "arguments are those of ScaleWatch(...) (README: Attach it to your training "
                                    "script)")
    return dict(doc)


def callbacks() -> list[Any]:
    """The entry-point factory: ``[ScaleWatch(...)]`` when asked for by the environment, else ``[]``."""
    flag = os.environ.get(ENABLE, "").strip().lower()
    path = os.environ.get(CONFIG)
    if flag in ("0", "false", "no", "off") or (not path and not flag):
        return []  # an explicit off wins over a config path
    return [_attached(**(settings_from_yaml(path) if path else {}))]


def _attached(**kwargs: Any) -> Any:
    """A ScaleWatch with its own checkpoint key that stands down when the script attaches one itself."""
    import logging

    from scalewatch.callback import ScaleWatch

    class AttachedScaleWatch(ScaleWatch):
        @property
        def state_key(self) -> str:
            return "ScaleWatch[attached]"  # Lightning refuses two callbacks with one key

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if any(isinstance(cb, ScaleWatch) and cb is not self for cb in trainer.callbacks):
                logging.getLogger("scalewatch").warning(
                    "scalewatch: %s is set but the script attaches ScaleWatch itself; using the script's", ENABLE)
                for hook in _HOOKS:  # every hook of this instance becomes a no-op
                    setattr(self, hook, lambda *a, **k: None)
                self.state_dict = dict  # type: ignore[method-assign]
                return
            super().setup(trainer, pl_module, stage)

    return AttachedScaleWatch(**kwargs)


_HOOKS = ("on_fit_start", "on_train_start", "on_train_batch_start", "on_train_batch_end", "on_after_backward",
          "on_before_optimizer_step", "on_validation_start", "on_validation_end", "on_train_end", "teardown",
          "load_state_dict")
