"""Gradient noise scale and critical batch size: the numbers, without any framework.

McCandlish et al. 2018 (arXiv 1812.06162). A batch gradient of B examples has
``E|G_B|^2 = |G|^2 + tr(Sigma)/B``. Squared norms at two batch sizes taken at the
SAME weights give unbiased estimates of ``|G|^2`` and ``tr(Sigma)``; single-step
estimates are very noisy (``|G|^2`` can come out negative), so each is smoothed by
its own bias-corrected EMA and the simple noise scale is the ratio of the EMAs,
``B_simple = tr(Sigma) / |G|^2``, never an average of per-step ratios.

How the squared norms are captured during training (hooks, DDP, per-example norms)
lives in :mod:`scalewatch.gns_capture`; this module is plain Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Kaplan et al. 2020, eq. 1.4: B_crit(L) = B_* / L^(1/alpha_B), in tokens, L in nats/token.
KAPLAN_B_STAR = 2.0e8
KAPLAN_ALPHA_B = 0.21

# B_simple is reported at most this many times the ratio's scale: where |G|^2 is estimated
# at or below zero the noise dominates and the ratio has no finite value.
_MAX_RATIO = 1e9


@dataclass(frozen=True)
class Coefficients:
    """``|G|^2 = big·|G_big|^2 - small·|G_small|^2`` and ``tr(Sigma) = trace·(|G_small|^2 - |G_big|^2)``."""

    big: float
    small: float
    trace: float


def coefficients(b_small: float, b_big: float) -> Coefficients:
    """The linear weights of McCandlish's unbiased estimators for batch sizes ``b_small < b_big``.

    Example:
        >>> c = coefficients(1, 4)   # per-example norms, batch of 4
        >>> c.big, c.small, round(c.trace, 4)
        (1.3333333333333333, 0.3333333333333333, 1.3333)
    """
    if not (0 < b_small < b_big):
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    return Coefficients(big=b_big / (b_big - b_small), small=b_small / (b_big - b_small),
                        trace=1.0 / (1.0 / b_small - 1.0 / b_big))


def unbiased_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at the same weights.

    ``small_sq`` is the MEAN squared norm of the small-batch gradients (batch size
    ``b_small``), ``big_sq`` the squared norm of their mean (``b_big``).

    Example:
        >>> g2, tr = unbiased_estimates(small_sq=5.0, big_sq=2.0, b_small=1, b_big=4)
        >>> round(g2, 6), round(tr, 6)
        (1.0, 4.0)
    """
    c = coefficients(b_small, b_big)
    return c.big * big_sq - c.small * small_sq, c.trace * (small_sq - big_sq)


def b_simple_from(g2: float, trace: float) -> float:
    """``tr(Sigma)/|G|^2`` clamped to ``[0, 1e9]``: a non-positive ``|G|^2`` means the noise dominates.

    Example:
        >>> b_simple_from(2.0, 10.0), b_simple_from(-1.0, 10.0) > 1e8, b_simple_from(1.0, -3.0)
        (5.0, True, 0.0)
    """
    if not (math.isfinite(g2) and math.isfinite(trace)):
        return math.nan
    trace = max(trace, 0.0)
    if trace == 0.0:
        return 0.0
    return trace / max(g2, trace / _MAX_RATIO)


def kaplan_b_crit(loss: float, b_star: float = KAPLAN_B_STAR, alpha_b: float = KAPLAN_ALPHA_B) -> float:
    """Kaplan et al.'s reference critical batch in tokens, ``B_* / L^(1/alpha_B)``.

    Fitted on WebText2 in nats/token with their recipe: a reference, not a measurement.

    Example:
        >>> f"{kaplan_b_crit(3.0):.3g}"
        '1.07e+06'
    """
    if not (loss > 0) or not math.isfinite(loss):
        return math.nan
    return b_star / loss ** (1.0 / alpha_b)


@dataclass(frozen=True)
class BatchTradeoff:
    """Where a batch size sits against B_crit (McCandlish eq. 2.11-2.12).

    Attributes:
        steps_factor: S/S_min = 1 + B_crit/B (how many more optimizer steps than the minimum).
        compute_factor: E/E_min = 1 + B/B_crit (how many more examples, i.e. compute, than the minimum).
    """

    steps_factor: float
    compute_factor: float


def batch_tradeoff(batch: float, b_crit: float) -> BatchTradeoff:
    """Steps and compute multipliers of training at ``batch`` when the critical batch is ``b_crit``.

    Example:
        >>> batch_tradeoff(batch=512, b_crit=128)
        BatchTradeoff(steps_factor=1.25, compute_factor=5.0)
    """
    if not (batch > 0 and b_crit > 0):
        return BatchTradeoff(math.nan, math.nan)
    return BatchTradeoff(steps_factor=1 + b_crit / batch, compute_factor=1 + batch / b_crit)


class NoiseScalePlugin:
    """Monitor plugin: turns the noise-scale EMAs an observation carries into the logged scalars.

    Reads the observation's ``gns_g2`` and ``gns_trace`` (bias-corrected EMAs, per-sequence
    units), ``batch_samples`` and ``batch_tokens`` (the global batch of one optimizer step).
    Returns ``gns/b_simple`` (sequences), ``gns/b_simple_tokens``, ``gns/b_crit``
    (tokens; B_simple taken as the estimate of the critical batch), ``gns/batch_size``,
    ``gns/batch_tokens``, ``gns/steps_factor`` and ``gns/compute_factor`` at the current
    batch, ``gns/g2``, ``gns/trace``, and ``gns/b_crit_kaplan_ref`` (tokens, Kaplan's
    B_crit(L) at the current loss, a published reference, not a measurement).

    Example:
        >>> from scalewatch.monitor import Monitor, Observation
        >>> m = Monitor(plugins=[NoiseScalePlugin()])
        >>> s = m.observe(Observation(step=10, tokens=40960, samples=80, flops=0, loss=3.0,
        ...     gns_g2=0.5, gns_trace=16.0, batch_samples=8, batch_tokens=4096)).scalars
        >>> s["gns/b_simple"], s["gns/b_crit"], s["gns/compute_factor"]
        (32.0, 16384.0, 1.25)
    """

    name = "gns"

    def on_observation(self, obs: Any, monitor: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        batch = obs.batch_samples
        batch_tokens = obs.batch_tokens
        if obs.gns_g2 is None or obs.gns_trace is None:
            return out  # nothing measured: no batch-size series beside a noise scale that is not there
        g2, tr = float(obs.gns_g2), float(obs.gns_trace)
        b_simple = b_simple_from(g2, tr)
        if not math.isfinite(b_simple):
            return out
        if batch:
            out["gns/batch_size"] = float(batch)
        if batch_tokens:
            out["gns/batch_tokens"] = float(batch_tokens)
        ref = kaplan_b_crit(obs.loss)
        if math.isfinite(ref):
            out["gns/b_crit_kaplan_ref"] = ref
        out["gns/g2"] = g2
        out["gns/trace"] = tr
        out["gns/b_simple"] = b_simple
        if batch and batch_tokens:
            tokens_per_seq = float(batch_tokens) / float(batch)
            out["gns/b_simple_tokens"] = b_simple * tokens_per_seq
            out["gns/b_crit"] = b_simple * tokens_per_seq
            trade = batch_tradeoff(float(batch), b_simple)
            out["gns/steps_factor"] = trade.steps_factor
            out["gns/compute_factor"] = trade.compute_factor
        return out
