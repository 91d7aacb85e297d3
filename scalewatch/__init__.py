"""scalewatch: watch LLM training runs against the scaling laws they are supposed to follow.

``from scalewatch import ScaleWatch`` gives the Lightning callback. The numerical
core (accounting, monitor, laws, fitting) imports without Lightning, so the
command-line tools start fast; ``ScaleWatch`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ScaleWatch", "Monitor", "Observation", "ScaleWatchConfigError", "__version__"]

if TYPE_CHECKING:
    from scalewatch.accounting import ScaleWatchConfigError
    from scalewatch.callback import ScaleWatch
    from scalewatch.monitor import Monitor, Observation


def __getattr__(name: str) -> Any:
    if name == "ScaleWatch":
        from scalewatch.callback import ScaleWatch

        return ScaleWatch
    if name in ("Monitor", "Observation"):
        from scalewatch import monitor

        return getattr(monitor, name)
    if name == "ScaleWatchConfigError":
        from scalewatch.accounting import ScaleWatchConfigError

        return ScaleWatchConfigError
    raise AttributeError(f"module 'scalewatch' has no attribute {name!r}")
