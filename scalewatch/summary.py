"""The end-of-run summary of a :class:`~scalewatch.callback.ScaleWatch`: what the run spent and how it did
against its laws, in a few lines (``print(watch.summary())`` after ``trainer.fit``)."""

from __future__ import annotations

import math
from typing import Any

from scalewatch.alerts import HEALTH_LEVEL, AlertBook, Episode, Finding
from scalewatch.detectors import CHINCHILLA_TOKENS_PER_PARAM
from scalewatch.laws import optimal_allocation


def run_summary(watch: Any, elapsed: float | None = None) -> str:
    """A plain-text summary of a finished (or running) fit, from what the callback holds on rank 0.

    Lines: tokens and FLOPs spent; the counting conventions; tokens per parameter against the
    compute-optimal ratio (from ``law=``, else about 20); the last interval's training loss against
    the curve law's prediction and band; the final-loss forecast; the noise scale against the batch;
    the alerts firing at the end (with the step their words are of) and those that fired and resolved since.
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
    plugin = watch.curve_plugin
    end = _schedule_end(plugin)
    run_end = last.step if last is not None else None
    stopped = end is not None and run_end is not None and run_end > end  # the schedule ended before the run
    if stopped:
        lines.append(f"  loss:       last training loss {loss:.4g} at step {run_end}; the predicted curve stopped at "
                     f"step {end}, where the LR schedule ends (the run went on to step {run_end}): no prediction "
                     f"past it{_at_schedule_end(watch, plugin, end)}")
    elif "loss_pred" in s:
        inside = s["loss_pred_low"] <= loss <= s["loss_pred_high"]
        lines.append(f"  loss:       last training loss {loss:.4g}; the curve law predicted {s['loss_pred']:.4g} "
                     f"(90% band {s['loss_pred_low']:.4g}-{s['loss_pred_high']:.4g}): "
                     f"{'inside' if inside else 'OUTSIDE'} the band")
    elif plugin is not None and plugin.schedule is None:
        lines.append(f"  loss:       last training loss {loss:.4g} (a curve law, but no usable LR schedule: no "
                     "prediction; the log says why at the start of the fit)")
    else:
        lines.append(f"  loss:       last training loss {loss:.4g} (no curve law: no prediction)")
    # The last forecast: at the last log point, or (when the log points past the schedule's end carried none)
    # the one the curve plugin still holds
    fc = s if "loss_forecast_final" in s else (getattr(plugin, "_latest", None) or {})
    if "loss_forecast_final" in fc:
        target = (f"loss at step {end} (where the LR schedule ends, not at the run's end, step {run_end})"
                  if stopped else "final loss")
        lines.append(f"  forecast:   {target} {fc['loss_forecast_final']:.4g} (90% band "
                     f"{fc['loss_forecast_final_low']:.4g}-{fc['loss_forecast_final_high']:.4g}), from the run up to "
                     f"step {fc['loss_forecast_at_step']:.0f} with the curve law as prior")
    elif getattr(plugin, "nonfinite_since", None) is not None:
        lines.append(f"  forecast:   none: the loss is non-finite from step {plugin.nonfinite_since} on (a forecast "
                     "from the run before it would not be this run's)")
    if "gns/b_crit" in s:
        lines.append(f"  noise:      B_simple = {s['gns/b_simple']:.1f} sequences = {s['gns/b_crit']:,.0f} tokens "
                     f"(critical batch estimate, {watch.gns_method}) vs a batch of {s['gns/batch_tokens']:,.0f} "
                     f"tokens: {s['gns/compute_factor']:.2f}x the minimum compute, {s['gns/steps_factor']:.2f}x the "
                     "minimum steps")
    lines += alert_lines(watch.monitor.alerts)
    return "\n".join(lines)


def alert_lines(book: AlertBook, most: int = 8) -> list[str]:
    """The summary's alert lines: those firing at the end with their newest words (and the step those words'
    numbers are of), then those that fired and resolved since, worst first.

    Every critical and warning episode is listed (repeats of one alert on one line); info ones only while
    there are fewer than ``most`` lines. A run that recovered from a critical still says so here, as
    ``scalewatch watch``'s exit status does.

    Example:
        >>> book = AlertBook(resolve_after=1, cooldown=0)
        >>> _ = book.update([Finding("divergence", True, "critical", "loss up; stop")], step=270, tokens=0)
        >>> _ = book.update([Finding("divergence", False, "critical")], step=290, tokens=0)
        >>> print("\\n".join(alert_lines(book)))
          alerts:     none firing at the end
          resolved:   1 alert fired during the run and resolved since (worst: critical)
            divergence (critical): fired at step 270, resolved at step 290: loss up
    """
    saying, since = book.now_saying(), {(e.kind, e.key): e.fired for e in book.episodes if e.resolved is None}
    firing = sorted(book.firing().items(), key=lambda kv: -HEALTH_LEVEL[kv[1]])
    lines = [f"  alerts:     {len(firing) or 'none'} firing at the end"]
    for slot, severity in firing:
        step, message = saying.get(slot, (-1, ""))
        when = (f" since step {since[slot]:,}" if slot in since else "") + (f"; at step {step:,}" if step >= 0 else "")
        lines.append(f"    {slot[0]} ({severity}){when}: {message}".rstrip(": "))
    groups: dict[tuple[str, str, str], list[Episode]] = {}
    for e in book.episodes:
        if e.resolved is not None:
            groups.setdefault((e.kind, e.key, e.severity), []).append(e)
    if not groups:
        return lines
    ordered = sorted(groups.values(), key=lambda g: (-HEALTH_LEVEL[g[0].severity], g[0].fired))
    n = sum(len(g) for g in ordered)
    lines.append(f"  resolved:   {n} alert{'s' if n > 1 else ''} fired during the run and resolved since (worst: "
                 f"{ordered[0][0].severity})")
    shown = [g for i, g in enumerate(ordered) if g[0].severity != "info" or len(lines) + i < most]
    for g in shown:
        lines.append(f"    {g[0].kind} ({g[0].severity}): {_episodes_when(g)}: {g[0].message.split('; ')[0]}")
    left = sum(len(g) for g in ordered if g not in shown)
    if left:
        lines.append(f"    and {left} info alert{'s' if left > 1 else ''} more")
    return lines


def _episodes_when(episodes: list[Episode], most: int = 4) -> str:
    """'fired at step A, resolved at step B', or 'fired 3 times: steps A-B, C-D, ...' for repeats."""
    if len(episodes) == 1:
        return f"fired at step {episodes[0].fired:,}, resolved at step {episodes[0].resolved:,}"
    spans = ", ".join(f"{e.fired:,}-{e.resolved:,}" for e in episodes[:most])
    return f"fired {len(episodes)} times: steps {spans}{', ...' if len(episodes) > most else ''}"


def _schedule_end(plugin: Any) -> int | None:
    """The last step the curve law's schedule covers (None: no curve law or no schedule)."""
    schedule = getattr(plugin, "schedule", None)
    return None if schedule is None else len(schedule) - 1


def _at_schedule_end(watch: Any, plugin: Any, end: int) -> str:
    """'; at step S (...) the loss was X, the curve law predicted Y (band): inside' for the last log point the
    schedule covers, or '' when the history no longer holds one or the prediction fails (a summary never raises)."""
    try:
        obs = [o for o in watch.monitor.history if 1 <= o.step <= end and math.isfinite(o.loss)]
        if not obs:
            return ""
        o = obs[-1]
        p = plugin.law.predict(plugin.schedule, n_params=plugin.n_params, steps=[o.step])
        pred, low, high = float(p.loss[0]), float(p.low[0]), float(p.high[0])
    except Exception:  # noqa: BLE001 - the summary reports, it must not fail a finished run
        return ""
    where = "" if o.step == end else ", the last log point it covers"
    return (f"; at step {o.step}{where} the training loss was {o.loss:.4g}, the curve law predicted {pred:.4g} "
            f"(90% band {low:.4g}-{high:.4g}): {'inside' if low <= o.loss <= high else 'OUTSIDE'} the band")
