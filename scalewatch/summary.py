"""The end-of-run summary of a :class:`~scalewatch.callback.ScaleWatch`: what the run spent and how it did
against its laws, in a few lines (``print(watch.summary())`` after ``trainer.fit``)."""

from __future__ import annotations

from typing import Any

from scalewatch.detectors import CHINCHILLA_TOKENS_PER_PARAM
from scalewatch.laws import optimal_allocation


def run_summary(watch: Any, elapsed: float | None = None) -> str:
    """A plain-text summary of a finished (or running) fit, from what the callback holds on rank 0.

    Lines: tokens and FLOPs spent; the counting conventions; tokens per parameter against the
    compute-optimal ratio (from ``law=``, else about 20); the last interval's training loss against
    the curve law's prediction and band; the final-loss forecast; the noise scale against the batch;
    the alerts firing at the end.
    """
    s, n, tokens = watch.latest, watch.n_params, watch.tokens
    lines = ["scalewatch summary"]
    spent = f"{tokens:,} tokens, {watch.flops:.3g} FLOPs" + (f" in {elapsed:.0f} s" if elapsed is not None else "")
    lines.append(f"  spent:      {spent}; N = {n:,}" if n else f"  spent:      {spent}")
    lines.append(f"  counted as: {watch.describe()}")
    if n and tokens:
        law = watch.config.law
        if law is not None:  # the compute-optimal split of this run's compute (C = 6ND) under the given law
            n_opt, d_opt = (float(x) for x in optimal_allocation(law, 6.0 * n * tokens))
            optimum = f"{d_opt / n_opt:.1f} at this compute by the given law (N ~ {n_opt:,.0f}, D ~ {d_opt:,.0f})"
        else:
            optimum = f"~{CHINCHILLA_TOKENS_PER_PARAM:g} (Chinchilla's rule of thumb; no law given)"
        lines.append(f"  allocation: {tokens / n:.2f} tokens/param; compute-optimal is {optimum}")
    last = watch.monitor.last
    loss = last.loss if last is not None else float("nan")
    if "loss_pred" in s:
        inside = s["loss_pred_low"] <= loss <= s["loss_pred_high"]
        lines.append(f"  loss:       last training loss {loss:.4g}; the curve law predicted {s['loss_pred']:.4g} "
                     f"(90% band {s['loss_pred_low']:.4g}-{s['loss_pred_high']:.4g}): "
                     f"{'inside' if inside else 'OUTSIDE'} the band")
    else:
        lines.append(f"  loss:       last training loss {loss:.4g} (no curve law: no prediction)")
    if "loss_forecast_final" in s:
        lines.append(f"  forecast:   final loss {s['loss_forecast_final']:.4g} (90% band "
                     f"{s['loss_forecast_final_low']:.4g}-{s['loss_forecast_final_high']:.4g}), from the run up to "
                     f"step {s['loss_forecast_at_step']:.0f} with the curve law as prior")
    if "gns/b_crit" in s:
        lines.append(f"  noise:      B_simple = {s['gns/b_simple']:.1f} sequences = {s['gns/b_crit']:,.0f} tokens "
                     f"(critical batch estimate, {watch.gns_method}) vs a batch of {s['gns/batch_tokens']:,.0f} "
                     f"tokens: {s['gns/compute_factor']:.2f}x the minimum compute, {s['gns/steps_factor']:.2f}x the "
                     "minimum steps")
    book = watch.monitor.alerts
    firing = book.firing()
    said = {(a.kind, a.key): a.message for a in book.recent if a.state == "firing"}  # the newest firing message
    lines.append(f"  alerts:     {len(firing) or 'none'} firing at the end")
    for slot, severity in firing.items():
        lines.append(f"    {slot[0]} ({severity}): {said.get(slot, '')}".rstrip(": "))
    return "\n".join(lines)
