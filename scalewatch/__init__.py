"""scalewatch: watch LLM training runs against the scaling laws they are supposed to follow.

``from scalewatch import ScaleWatch`` gives the Lightning callback. The numerical
core (accounting, monitor, laws, fitting) imports without Lightning, so the
command-line tools start fast; ``ScaleWatch`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ScaleWatch", "ScaleWatchConfig", "build_monitor", "Monitor", "Observation", "Report", "Alert",
           "ScaleWatchConfigError", "__version__"]

if TYPE_CHECKING:
    from scalewatch.alerts import Alert
    from scalewatch.callback import ScaleWatch
    from scalewatch.config import ScaleWatchConfig, ScaleWatchConfigError, build_monitor
    from scalewatch.monitor import Monitor, Observation, Report


def __getattr__(name: str) -> Any:
    if name == "ScaleWatch":
        from scalewatch.callback import ScaleWatch

        return ScaleWatch
    if name in ("Monitor", "Observation", "Report"):
        from scalewatch import monitor

        return getattr(monitor, name)
    if name in ("ScaleWatchConfig", "ScaleWatchConfigError", "build_monitor"):
        from scalewatch import config  # torch-free: the CLI and `watch` import it without paying for torch

        return getattr(config, name)
    if name == "Alert":
        from scalewatch.alerts import Alert

        return Alert
    raise AttributeError(f"module 'scalewatch' has no attribute {name!r}")
