"""Calibrated bands for the curve law, measured on the pilots themselves (issue 14).

Two records live in a curve-law file beside the law:

* :class:`ForecastCalibration`: how wide the final-loss forecast's 90% band must be. At fit
  time every pilot curve's own prefixes are replayed through :func:`scalewatch.forecast.forecast_final`
  with a law that never saw that curve (nor the curves branched from the same prefix), and the
  forecast's error is divided by the posterior width of that prefix fit. The band of a live
  forecast is the posterior width times the conformal quantile of those scores at its prefix
  fraction: it shrinks as the prefix pins the level, and holds about 90% of the replays.
* :class:`ScheduleReach`: how much the predicted curve's band widens where a run's schedule
  goes beyond the pilots' (its summed LR, S1, past the largest any pilot reached), calibrated
  by predicting each pilot's rest from fits on every pilot's first 60% and first third.
* :class:`SizeReach`: how much the predicted curve's band widens outside the pilot sizes,
  calibrated by leaving the largest and the smallest size out (3+ sizes; issue 12, item 2).

In-range forecast replays are leave-one-curve-out when the pilots allow it (3+ curves): those are
exchangeable with a new run; forward replays (the law saw the curve's prefix) only with two curves.

Plain numpy; the replays themselves are made in :mod:`scalewatch.curve_fit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalewatch.laws import LawFileError
from scalewatch.laws import _finite_number as _finite

# Prefix fractions (last prefix step / final step) that each pilot curve is replayed at. Finer early on,
# where the error changes fastest with the fraction: pooling 0.2 with 0.3 mixed easier forecasts into it.
REPLAY_FRACTIONS = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# The quantile at one fraction pools the replays at its neighbours on the grid too: a 90%
# quantile from ten replays is mostly noise.
POOL_NEIGHBOURS = 1
# The posterior width of a prefix fit counts the prefix as this many independent points per
# whole run, however often the run logs: a run logged every 10 steps does not know its final
# loss 10x better than the same run logged every 100 (neighbouring points share their errors).
EFFECTIVE_POINTS_PER_RUN = 50.0
# Minimum relative half-width of a forecast band: the final loss is measured on a finite set.
FORECAST_FLOOR_REL = 0.001
# How far from the law's band (in half-widths, :func:`scalewatch.forecast.off_band`) a pilot replay may sit
# and still count as pilot-like: the conformal quantile at this level of the replays' distances. Beyond it
# a live run is not like the pilots the blend was chosen on.
OFF_BAND_LEVEL = 0.95


def widening(n_out: float, per_ln_n: float, n_out_max: float = 0.0) -> float:
    """The factor a band widens by at ``n_out`` (ln N beyond the pilot sizes): ``1 + per_ln_n * n_out`` up
    to ``n_out_max``, the farthest the calibration measured; beyond it, at least the unmeasured rule's
    slope of 1 per unit ln N. Evidence from replays a little outside the pilots says nothing of
    how fast the error grows further out (a law's form can break down there), so a measured slope
    below 1 is not extrapolated past it. ``n_out_max = 0`` (files from before it was recorded):
    ``1 + per_ln_n * n_out`` everywhere, as before.

    Example:
        >>> widening(0.5, 0.2, n_out_max=0.7), round(widening(1.7, 0.2, n_out_max=0.7), 6), widening(1.7, 0.2)
        (1.1, 2.14, 1.34)
    """
    d = max(n_out, 0.0)
    if n_out_max <= 0:
        return 1.0 + per_ln_n * d
    return 1.0 + per_ln_n * min(d, n_out_max) + max(per_ln_n, 1.0) * max(d - n_out_max, 0.0)


def conformal_quantile(scores: Sequence[float] | np.ndarray, level: float) -> float:
    """The split-conformal quantile: the ``ceil((n + 1) * level)``-th smallest score (the largest when
    there are too few scores for that), so that a new exchangeable score falls below it with
    probability at least ``level``.

    Example:
        >>> conformal_quantile(range(1, 20), 0.9)   # 19 scores: the 18th smallest
        18.0
        >>> conformal_quantile([0.5, 1.0], 0.9)     # too few: the largest
        1.0
    """
    s = np.sort(np.asarray(scores, dtype=float))
    if len(s) == 0:
        raise ValueError("no scores to take a quantile of")
    k = min(len(s), math.ceil((len(s) + 1) * level))
    return float(s[k - 1])


def sharing_groups(first_points: Sequence[Sequence[tuple[int, float]]], min_shared: int = 3) -> list[int]:
    """A group id per curve: curves whose first ``min_shared`` logged (step, loss) points are
    identical were branched from one run (e.g. WSD cooldowns from a constant-LR run) and must be
    left out of a fit together, or the fit has already seen the left-out curve's prefix.

    Example:
        >>> const = [(100, 3.2), (200, 3.0), (300, 2.9)]
        >>> sharing_groups([const, const, [(100, 3.3), (200, 3.1), (300, 3.0)]])
        [0, 0, 1]
    """
    keys: dict[tuple[tuple[int, float], ...], int] = {}
    out = []
    for pts in first_points:
        key = tuple((int(s), float(y)) for s, y in list(pts)[:min_shared])
        if len(key) < min_shared:  # too short to tell: its own group
            key = (("unique", len(out)),)  # type: ignore[assignment]
        out.append(keys.setdefault(key, len(keys)))
    return out


@dataclass(frozen=True)
class Replay:
    """One replayed forecast: a pilot curve's final loss forecast from its own prefix.

    Attributes:
        curve: the pilot curve's name.
        fraction: last prefix step / the curve's final step.
        rel_error: (forecast - truth) / truth.
        sd_rel: the forecast's posterior sd, relative to the forecast.
        n_out: how far the curve's ln N lies outside the sizes of the law that forecast it (0 inside).
        kind: ``"leave-out"`` (a law without the curve and its branches), ``"size-out"`` (a law without
            the curve's model size) or ``"forward"`` (a law fitted on every curve's first 60%).
        prior_rel_error: (the prior's final loss - truth) / truth: the law alone, no prefix.
        drop: the loss the prior still predicted to fall after the prefix, relative to the final loss.
        prior_widen: how much wider the prior was than within the pilot sizes (1 inside).
        off: how far the prefix's recent losses sat from the law's band (:func:`scalewatch.forecast.off_band`).
    """

    curve: str
    fraction: float
    rel_error: float
    sd_rel: float
    n_out: float
    kind: str
    prior_rel_error: float = math.nan
    drop: float = math.nan
    prior_widen: float = 1.0
    off: float = math.nan

    def blended(self, scale: float | None) -> float:
        """The relative error of the forecast ``prior + w * (prefix fit - prior)`` at blend scale ``scale``."""
        if scale is None or not (math.isfinite(self.prior_rel_error) and math.isfinite(self.drop)):
            return self.rel_error
        w = blend_weight(self.drop, scale, self.prior_widen)
        return self.prior_rel_error + w * (self.rel_error - self.prior_rel_error)

    @property
    def score(self) -> float:
        return abs(self.rel_error) / max(self.sd_rel, 1e-12)


def blend_weight(drop: float, scale: float | None, prior_widen: float = 1.0) -> float:
    """The prefix fit's weight against the prior: ``v / (v + drop)`` with ``v = scale * prior_widen**2``.

    As a Gaussian precision weight: the prior's error variance (``scale``, times its widening outside
    the pilot sizes squared) against the prefix fit's, which grows with how far it extrapolates (the
    loss the prior still predicts to fall after the prefix, ``drop``). ``scale`` None: the prefix fit
    alone (1); 0: the prior alone; no drop left: the prefix fit alone.

    Example:
        >>> blend_weight(0.02, 0.02), blend_weight(0.02, None), blend_weight(0.0, 0.01), blend_weight(0.02, 0.0)
        (0.5, 1.0, 1.0, 0.0)
    """
    if scale is None:
        return 1.0
    d = max(drop, 0.0) if math.isfinite(drop) else 0.0
    v = scale * prior_widen ** 2
    return 1.0 if d <= 0 else float(v / (v + d))


# The fewest replays a blend is chosen on (further neighbouring fractions are pooled until there are).
BLEND_MIN_REPLAYS = 30
# The blend scales tried (BLEND_SCALES, and None: the prefix fit alone): relative drops from 1e-4 to 1.
BLEND_SCALES = (0.0, *np.logspace(-4, 0, 33).tolist())


def choose_blend(replays: Sequence[Replay], one_se: bool = True,
                 toward_prior: bool = False) -> tuple[float | None, float, float, float]:
    """The blend scale for these replays (stacking): returns it (None: the prefix fit alone) with the mean
    |error| of the blend, of the prefix fit alone and of the prior alone.

    The scale with the smallest mean |error| over the replays; with ``one_se``, the one-standard-error
    rule: the candidate nearest the prefix fit alone (the forecast before blending) whose mean |error|
    is within one standard error of the paired differences of the best's, so that a blend is taken only
    where the replays show it helps beyond their noise. Both ends are candidates: in replay the blend is
    never worse than the prior alone or the prefix fit alone by more than that standard error.
    ``toward_prior``: the same rule from the other end, the candidate nearest the prior alone: for replays
    that cannot show the prefix's harm (``forward`` replays, whose law has seen the replayed prefix).

    Example:
        >>> rs = [Replay("c", 0.2, 0.03, 0.01, 0.0, "leave-out", 0.005, 0.1), Replay("c", 0.9, 0.001, 0.001, 0.0,
        ...       "leave-out", 0.005, 0.0)]
        >>> scale, blend, fit, prior = choose_blend(rs, one_se=False)
        >>> blend <= min(fit, prior), round(prior, 4)
        (True, 0.005)
    """
    usable = [r for r in replays if math.isfinite(r.prior_rel_error) and math.isfinite(r.drop)]
    if not usable:
        return None, math.nan, math.nan, math.nan
    candidates: list[float | None] = [None, *sorted(BLEND_SCALES, reverse=True)]  # from the prefix fit to the prior
    errs = {i: np.array([abs(r.blended(c)) for r in usable]) for i, c in enumerate(candidates)}
    best = min(errs, key=lambda i: (float(errs[i].mean()), i))
    chosen = best
    if one_se and len(usable) > 1:
        for i in (range(len(candidates) - 1, best, -1) if toward_prior else range(best)):
            diff = errs[i] - errs[best]
            if diff.mean() <= diff.std(ddof=1) / math.sqrt(len(diff)):
                chosen = i
                break
    return (candidates[chosen], float(errs[chosen].mean()), float(errs[0].mean()),
            float(np.mean([abs(r.prior_rel_error) for r in usable])))


@dataclass
class ForecastCalibration:
    """The final-loss forecast's band, calibrated on replays of the pilots' own prefixes.

    The 90% half-width of a forecast made from a prefix covering ``fraction`` of the run, with
    posterior sd ``sd_rel`` (relative) and ``n_out`` = how far ln N lies outside the pilots:
    ``sd_rel * quantile_at(fraction) * (1 + per_ln_n * n_out)``, never below ``floor_rel``.
    The widening is multiplicative because the size-out replays' |error| / sd stays about the
    same from 15% to 90% of a run while both shrink (the prefix corrects a law from another size
    as much as it corrects the level).

    Attributes:
        by_fraction: ``(fraction, quantile, replays)``: the conformal quantile of |error| / sd of
            the replays at that prefix fraction (and its neighbours), and how many it rests on.
        per_ln_n: widening per unit of ln N outside the pilots, from replays of each outer size by a
            law fitted without it on two or more other sizes (a law of the kind a live forecast uses);
            with fewer sizes nothing measures it and it is 1 (the band doubles at e times the
            largest pilot N, as the predicted curve's does).
        per_ln_n_replays: how many replays ``per_ln_n`` rests on (0: the default above).
        n_out_max: the largest distance in ln N a size-out replay reached (0: none): further out the
            linear growth is an assumption, not a measurement (new in this version; 0 when absent).
        prior_widening: the forecast's posterior width puts the law's widening outside the pilot sizes on
            its prior only (:func:`scalewatch.forecast.prefix_fit`), and ``per_ln_n`` is only what the
            size-out replays needed beyond that. Set only where size-out replays measured it (3+ sizes):
            a prefix pins the level but not the shape (alpha, C) a law extrapolates in N, so without a
            measurement the whole band widens by ``per_ln_n`` (False: as in files from before it).
        blend: ``(fraction, scale, replays)``: the forecast is ``prior + w * (prefix fit - prior)``, ``w`` from
            :func:`blend_weight` at the scale that the replays at that prefix fraction and its neighbours
            chose (:func:`choose_blend`; None: the prefix fit alone), linear in the fraction between rows.
            None (files from before it): the prefix fit alone everywhere.
        blend_far: the same, chosen on the size-out replays (3+ sizes), for forecasts outside the pilot
            sizes. None: outside the pilot sizes the prefix fit alone (nothing measured how far to trust a
            prior extrapolated in N; the in-range blend, which may lean on the prior entirely early on, is
            not carried there).
        by_fraction_fit: as ``by_fraction``, the scores of the prefix fit alone: the band of a forecast that
            is not blended (outside the pilot sizes without ``blend_far``). None: ``by_fraction``.
        off_by_fraction: ``(fraction, distance, replays)``: how far from the law's band the replayed prefixes'
            recent losses sat (the :data:`OFF_BAND_LEVEL` conformal quantile, in half-widths): a live run
            farther off is not pilot-like, and its forecast leaves the blend for the prefix fit alone
            (:func:`scalewatch.forecast.forecast_final`). None (files from before it): a fixed 2 half-widths.
        blend_errors: the replays' mean |error| with the blend, with the prefix fit alone and with the
            prior alone (None when not recorded).
        replays: how many replayed forecasts in all (of ``curves`` pilot curves).
        curves: how many pilot curves were replayed.
        level: the band's level.
        floor_rel: the smallest relative half-width.
        method: what the replays were, in words.

    Example:
        >>> cal = ForecastCalibration([(0.2, 4.0, 30), (0.6, 2.0, 30)], per_ln_n=0.5, replays=60, curves=6)
        >>> cal.quantile_at(0.4), round(cal.half_width(0.001, 0.4, n_out=1.0), 4)
        (3.0, 0.0045)
    """

    by_fraction: list[tuple[float, float, int]]
    per_ln_n: float = 1.0
    per_ln_n_replays: int = 0
    replays: int = 0
    curves: int = 0
    level: float = 0.9
    floor_rel: float = FORECAST_FLOOR_REL
    method: str = ""
    n_out_max: float = 0.0
    prior_widening: bool = False
    blend: list[tuple[float, float | None, int]] | None = None
    blend_errors: tuple[float, float, float] | None = None
    blend_far: list[tuple[float, float | None, int]] | None = None
    by_fraction_fit: list[tuple[float, float, int]] | None = None
    off_by_fraction: list[tuple[float, float, int]] | None = None

    def off_at(self, fraction: float) -> float | None:
        """The farthest from the law's band (half-widths) a pilot-like prefix at this fraction sits: linear
        between the replayed fractions, the nearest outside; None when not calibrated (older files)."""
        if not self.off_by_fraction:
            return None
        rows = self.off_by_fraction
        return float(np.interp(fraction, [r[0] for r in rows], [r[1] for r in rows]))

    def quantile_at(self, fraction: float, blended: bool = True) -> float:
        """The score quantile at a prefix fraction: linear between the replayed fractions, the nearest outside.
        ``blended=False``: of the prefix fit alone (:attr:`by_fraction_fit`, where the blend changed it)."""
        rows = self.by_fraction if blended or not self.by_fraction_fit else self.by_fraction_fit
        f = np.array([r[0] for r in rows])
        q = np.array([r[1] for r in rows])
        return float(np.interp(fraction, f, q))

    def half_width(self, sd_rel: float, fraction: float, n_out: float = 0.0, blended: bool = True) -> float:
        """The band's relative half-width for a forecast with this posterior sd, prefix fraction and N distance."""
        return max(sd_rel * self.quantile_at(fraction, blended) * widening(n_out, self.per_ln_n, self.n_out_max),
                   self.floor_rel)

    def blended_at(self, n_out: float) -> bool:
        """Whether a forecast at ``n_out`` in ln N outside the pilot sizes is blended with the prior."""
        return bool(self.blend if n_out <= 0 else self.blend_far)

    def blend_weight(self, drop: float, fraction: float, prior_widen: float = 1.0, n_out: float = 0.0) -> float:
        """The prefix fit's weight against the prior for a forecast (:func:`blend_weight`) whose prefix
        covers ``fraction`` of the run, ``n_out`` in ln N outside the pilot sizes: linear between the two
        nearest calibrated fractions (of :attr:`blend_far` outside the pilot sizes)."""
        rows = self.blend if n_out <= 0 else self.blend_far
        if not rows:
            return 1.0
        f = np.array([r[0] for r in rows])
        w = np.array([blend_weight(drop, r[1], prior_widen) for r in rows])
        return float(np.interp(fraction, f, w))

    def scale_at(self, fraction: float, far: bool = False) -> float | None:
        """The blend scale calibrated at exactly this prefix fraction (None: no blend there)."""
        for f, scale, _ in (self.blend_far if far else self.blend) or ():
            if abs(f - fraction) < 1e-9:
                return scale
        return None

    def to_json(self) -> dict[str, Any]:
        doc = {"level": self.level, "method": self.method, "replays": int(self.replays), "curves": int(self.curves),
               "per_ln_n": float(self.per_ln_n),
               "per_ln_n_replays": int(self.per_ln_n_replays), "n_out_max": float(self.n_out_max),
               "floor_rel": float(self.floor_rel),
               "by_fraction": [[float(f), float(q), int(n)] for f, q, n in self.by_fraction]}
        if self.prior_widening:  # absent in older files: the whole band widens
            doc["prior_widening"] = True
        if self.by_fraction_fit:
            doc["by_fraction_fit"] = [[float(f), float(q), int(n)] for f, q, n in self.by_fraction_fit]
        if self.off_by_fraction:  # absent in older files: a fixed threshold
            doc["off_band_by_fraction"] = [[float(f), float(q), int(n)] for f, q, n in self.off_by_fraction]
        if self.blend_far:  # absent: outside the pilot sizes the prefix fit alone
            doc["blend_far"] = [[float(f), None if v is None else float(v), int(n)] for f, v, n in self.blend_far]
        if self.blend:  # absent in older files: the prefix fit alone
            doc["blend"] = [[float(f), None if v is None else float(v), int(n)] for f, v, n in self.blend]
            if self.blend_errors is not None:
                doc["blend_mean_abs_error"] = dict(zip(("blend", "prefix_fit", "prior"),
                                                       (float(e) for e in self.blend_errors), strict=True))
        return doc

    @classmethod
    def from_json(cls, doc: Any, source: str) -> ForecastCalibration:
        """Read the ``forecast_band`` block; a malformed one is a one-line :class:`LawFileError`."""
        where = f"{source}: forecast_band"
        if not isinstance(doc, Mapping):
            raise LawFileError(f"{where} must be an object (refit with `scalewatch fit --curves --out`)")
        rows = doc.get("by_fraction")
        if not (isinstance(rows, Sequence) and rows and all(
                isinstance(r, Sequence) and len(r) == 3 and all(_finite(x) for x in r) and 0 < r[0] <= 1
                and r[1] > 0 and r[2] >= 0 for r in rows)):
            raise LawFileError(f"{where}.by_fraction must be a non-empty list of [fraction in (0, 1], quantile > 0, "
                               "replays >= 0]")
        if any(b[0] <= a[0] for a, b in zip(rows[:-1], rows[1:], strict=True)):
            raise LawFileError(f"{where}.by_fraction must be sorted by increasing fraction")
        # n_out_max is newer than the block: absent, it is 0.
        nums = {k: doc.get(k, d) for k, d in (("per_ln_n", 1.0), ("per_ln_n_replays", 0), ("replays", 0), ("curves", 0),
                                              ("level", 0.9), ("floor_rel", FORECAST_FLOOR_REL),
                                              ("n_out_max", 0.0))}
        if not all(_finite(v) and v >= 0 for v in nums.values()) or not 0 < nums["level"] < 1:
            raise LawFileError(f"{where}: per_ln_n, n_out_max, replays, curves and floor_rel must be "
                               "numbers >= 0, level in (0, 1)")
        prior_widening = doc.get("prior_widening", False)
        blend, blend_far = doc.get("blend", []), doc.get("blend_far", [])

        def rows_ok(rows: Any) -> bool:
            return isinstance(rows, Sequence) and all(
                isinstance(r, Sequence) and len(r) == 3 and _finite(r[0]) and _finite(r[2]) and r[2] >= 0
                and (r[1] is None or (_finite(r[1]) and r[1] >= 0)) for r in rows) \
                and not any(b[0] <= a[0] for a, b in zip(rows[:-1], rows[1:], strict=True))

        if not isinstance(prior_widening, bool) or not rows_ok(blend) or not rows_ok(blend_far):
            raise LawFileError(f"{where}: prior_widening must be true or false, blend and blend_far lists of "
                               "[fraction, scale (null or >= 0), replays] sorted by fraction")
        fit_rows = doc.get("by_fraction_fit", [])
        if not (rows_ok(fit_rows) and all(r[1] is not None and r[1] > 0 for r in fit_rows)):
            raise LawFileError(f"{where}.by_fraction_fit must be a list of [fraction, quantile > 0, replays] "
                               "sorted by fraction")
        off_rows = doc.get("off_band_by_fraction", [])
        if not (rows_ok(off_rows) and all(r[1] is not None and r[1] > 0 for r in off_rows)):
            raise LawFileError(f"{where}.off_band_by_fraction must be a list of [fraction, distance > 0, replays] "
                               "sorted by fraction")
        errs = doc.get("blend_mean_abs_error")
        blend_errors = None
        if isinstance(errs, Mapping) and all(_finite(errs.get(k)) for k in ("blend", "prefix_fit", "prior")):
            blend_errors = (float(errs["blend"]), float(errs["prefix_fit"]), float(errs["prior"]))
        return cls(by_fraction=[(float(f), float(q), int(n)) for f, q, n in rows], per_ln_n=float(nums["per_ln_n"]),
                   per_ln_n_replays=int(nums["per_ln_n_replays"]),
                   replays=int(nums["replays"]), curves=int(nums["curves"]), level=float(nums["level"]),
                   floor_rel=float(nums["floor_rel"]), method=str(doc.get("method", "")),
                   n_out_max=float(nums["n_out_max"]), prior_widening=prior_widening,
                   blend=[(float(f), None if v is None else float(v), int(n)) for f, v, n in blend] or None,
                   blend_errors=blend_errors,
                   blend_far=[(float(f), None if v is None else float(v), int(n)) for f, v, n in blend_far] or None,
                   by_fraction_fit=[(float(f), float(q), int(n)) for f, q, n in fit_rows] or None,
                   off_by_fraction=[(float(f), float(q), int(n)) for f, q, n in off_rows] or None)


def calibrate_forecast(replays: Sequence[Replay], level: float = 0.9,
                       prior_widening: bool = False) -> ForecastCalibration | None:
    """The forecast band's calibration from replays; None when no replay was possible.

    In-range replays (``n_out == 0``) set the quantile per fraction. Only the ``leave-out``
    replays are exchangeable with a new run (a law that never saw the curve); ``forward`` replays
    (a law fitted on every curve's first 60 or 80%, the replayed curve's prefix included) are
    easier early in a run and are used only when there is no leave-out replay (two pilot curves).
    Replays from outside the sizes of their law set ``per_ln_n``: the smallest widening that holds
    ``level`` of them.

    ``prior_widening`` (replays made by :func:`scalewatch.forecast.prefix_fit` with the size widening on
    the prior only): the in-range replays also choose the blend of prefix fit and prior
    (:func:`choose_blend`; on forward replays alone, the one-standard-error rule leans towards the prior)
    and the scores are those of the blended forecasts. With size-out replays
    the band's N-widening is on the prior, and ``per_ln_n`` is what those replays needed beyond it;
    without them (two sizes) nothing measures how far the prefix corrects a law extrapolated in N
    (it pins the level, not the shape): the whole band widens by the unmeasured rule, as before.

    Example:
        >>> rs = [Replay("c", f, e * 0.01, 0.01, 0.0, "leave-out") for f in (0.2, 0.6) for e in np.linspace(0, 1, 19)]
        >>> cal = calibrate_forecast(rs)
        >>> [round(q, 3) for _, q, _ in cal.by_fraction], cal.replays
        ([0.944, 0.944], 38)
    """
    near = [r for r in replays if r.n_out <= 0 and math.isfinite(r.score)]
    if not near:
        return None
    leave_out = any(r.kind == "leave-out" for r in near)
    if leave_out:
        near = [r for r in near if r.kind == "leave-out"]
    grid = sorted({r.fraction for r in near})

    def pool(i: int) -> list[Replay]:
        pooled = set(grid[max(0, i - POOL_NEIGHBOURS): i + POOL_NEIGHBOURS + 1])
        return [r for r in near if r.fraction in pooled]

    def blend_pool(i: int, among: Sequence[Replay], on: list[float]) -> list[Replay]:
        # The replays at this fraction and its neighbours (as the quantile pools them), widened to further
        # neighbours until there are BLEND_MIN_REPLAYS: a choice among 35 scales on a dozen replays is noise.
        k = POOL_NEIGHBOURS
        while True:
            pooled = set(on[max(0, i - k): i + k + 1])
            rs = [r for r in among if r.fraction in pooled]
            if len(rs) >= BLEND_MIN_REPLAYS or len(pooled) == len(on):
                return rs
            k += 1

    # The blend per prefix fraction, chosen on the replays there and at its neighbours. Forward replays (two
    # pilot curves) cannot show the prefix's harm: their law has seen the replayed prefix, so a prefix fit
    # mistaking the law's own misfit of a run's early shape for a level shift costs nothing there, and it costs
    # a new run (multipowerlaw's held-out schedules from 40%: 0.37% with the 1-SE rule toward the prefix,
    # 0.28% toward the prior; the law alone 0.24%). Without leave-out replays the prior is kept where they
    # show no gain beyond their noise.
    blend = [(f, choose_blend(rs, toward_prior=not leave_out)[0], len(rs)) for i, f in enumerate(grid)
             for rs in [blend_pool(i, near, grid)]] \
        if prior_widening else None
    cal = ForecastCalibration([], replays=len(near), curves=len({r.curve for r in near}), level=level,
                              prior_widening=prior_widening, blend=blend)

    def score(r: Replay) -> float:
        far_r = r.n_out > 0
        blended = (cal.blend_far if far_r else cal.blend) is not None
        return abs(r.blended(cal.scale_at(r.fraction, far_r)) if blended else r.rel_error) / max(r.sd_rel, 1e-12)

    if blend:
        usable = [r for r in near if math.isfinite(r.prior_rel_error)]
        if usable:
            cal.blend_errors = (float(np.mean([abs(r.blended(cal.scale_at(r.fraction))) for r in usable])),
                                float(np.mean([abs(r.rel_error) for r in usable])),
                                float(np.mean([abs(r.prior_rel_error) for r in usable])))
    for i, f in enumerate(grid):
        scores = [score(r) for r in pool(i)]
        cal.by_fraction.append((f, max(conformal_quantile(scores, level), 1e-6), len(scores)))
    if blend and any(v is not None for _, v, _ in blend):  # for the forecasts that are not blended
        cal.by_fraction_fit = [(f, max(conformal_quantile([r.score for r in pool(i)], level), 1e-6), len(pool(i)))
                               for i, f in enumerate(grid)]
    if any(math.isfinite(r.off) for r in near):
        rows = []
        for i, f in enumerate(grid):
            offs = [r.off for r in pool(i) if math.isfinite(r.off)]
            if offs:
                rows.append((f, max(conformal_quantile(offs, OFF_BAND_LEVEL), 1.0), len(offs)))
        cal.off_by_fraction = rows or None
    far = [r for r in replays if r.n_out > 0 and math.isfinite(r.score)]
    cal.prior_widening = prior_widening and bool(far)
    if far and prior_widening:
        # Outside the pilot sizes the prior is extrapolated in N: its own blend, chosen on the size-out replays.
        far_grid = sorted({r.fraction for r in far})
        cal.blend_far = [(f, choose_blend(rs)[0], len(rs)) for i, f in enumerate(far_grid)
                         for rs in [blend_pool(i, far, far_grid)]]
    if far:
        # Each far replay needs (1 + k * n_out) >= score / q(fraction); the band holds `level` of them
        # at the conformal quantile of those needs.
        needs = [(score(r) / cal.quantile_at(r.fraction) - 1.0) / r.n_out for r in far]
        cal.per_ln_n = max(conformal_quantile(needs, level), 0.0)
        cal.per_ln_n_replays = len(far)
        cal.n_out_max = max(r.n_out for r in far)
        cal.replays += len(far)
    kinds = sorted({r.kind for r in near} | {r.kind for r in far})
    cal.method = (f"conformal: |error| / posterior sd of {cal.replays} replayed prefix forecasts ({', '.join(kinds)}) "
                  f"of {cal.curves} pilot curves at prefix fractions {', '.join(f'{f:g}' for f in grid)}"
                  + (f"; widening outside the pilot sizes from {len(far)} size-out replays up to "
                     f"{cal.n_out_max:.2f} in ln N" if far else "")
                  + ("; outside the pilot sizes the prior widens as the predicted curve's band does, the band by "
                     "what the size-out replays needed beyond that" if cal.prior_widening else "")
                  + (f"; prefix fit blended with the prior by prefix fraction and remaining drop "
                     f"(replayed mean |error| {cal.blend_errors[0]:.3%}, prefix fit alone {cal.blend_errors[1]:.3%}, "
                     f"prior alone {cal.blend_errors[2]:.3%})" if cal.blend_errors else ""))
    return cal


@dataclass
class ScheduleReach:
    """How the predicted curve's band widens where a run's summed LR (S1) goes past the pilots'.

    The half-width at a step with summed LR ``s1`` and LR ``lr_rel`` times the run's peak is multiplied by
    ``1 + k * max(0, ln(s1 / s1_max))``, ``k = per_ln_s1 * lr_rel + per_ln_s1_annealed * (1 - lr_rel)``:
    a point still at its peak LR extrapolates the power law in S1 alone, an annealed one also sits on the
    annealing term, whose error the pilots' own anneals measured, and is calibrated on its own.

    Attributes:
        s1_max: the largest S1 any pilot curve reached.
        per_ln_s1: widening per unit of ln(S1 / s1_max) at the peak LR, from each pilot's rest predicted by
            fits on every pilot's first 60% and first third (points past that fit's S1, LR above half the
            peak); 0 when no point went past it.
        points: how many such points it rests on (all of them).
        per_ln_s1_annealed: the same from the points at or below half their peak LR; None (files from
            before it, or no such point): ``per_ln_s1`` at every LR.
        s1_min: the smallest S1 of the points the law was fitted on (each pilot's first SKIP_FRACTION is
            left out): below it the law extrapolates backwards into the fast early drop, where its band
            was never checked, so ``off_curve`` does not judge a run there. None: files from before it.

    Example:
        >>> ScheduleReach(s1_max=10.0, per_ln_s1=1.0).factor(np.array([5.0, 10.0, 10.0 * math.e])).tolist()
        [1.0, 1.0, 2.0]
        >>> ScheduleReach(10.0, 1.0, 10, per_ln_s1_annealed=0.2).factor(10.0 * math.e, lr_rel=0.1)
        1.28
    """

    s1_max: float
    per_ln_s1: float = 0.0
    points: int = 0
    per_ln_s1_annealed: float | None = None
    s1_min: float | None = None

    def factor(self, s1: Any, lr_rel: Any = None) -> Any:
        beyond = np.log(np.maximum(np.asarray(s1, dtype=float), 1e-300) / self.s1_max)
        k: Any = self.per_ln_s1
        if lr_rel is not None and self.per_ln_s1_annealed is not None:
            r = np.clip(np.asarray(lr_rel, dtype=float), 0.0, 1.0)
            k = self.per_ln_s1 * r + self.per_ln_s1_annealed * (1.0 - r)
        out = 1.0 + k * np.maximum(beyond, 0.0)
        return out if np.ndim(out) else float(out)

    def to_json(self) -> dict[str, Any]:
        doc = {"s1_max": float(self.s1_max), "per_ln_s1": float(self.per_ln_s1), "points": int(self.points)}
        if self.per_ln_s1_annealed is not None:
            doc["per_ln_s1_annealed"] = float(self.per_ln_s1_annealed)
        if self.s1_min is not None:
            doc["s1_min"] = float(self.s1_min)
        return doc

    @classmethod
    def from_json(cls, doc: Any, source: str) -> ScheduleReach:
        if not (isinstance(doc, Mapping) and _finite(doc.get("s1_max")) and doc["s1_max"] > 0
                and _finite(doc.get("per_ln_s1", 0.0)) and doc.get("per_ln_s1", 0.0) >= 0
                and _finite(doc.get("points", 0)) and doc.get("points", 0) >= 0
                and (doc.get("per_ln_s1_annealed") is None
                     or (_finite(doc["per_ln_s1_annealed"]) and doc["per_ln_s1_annealed"] >= 0))
                and (doc.get("s1_min") is None or (_finite(doc["s1_min"]) and doc["s1_min"] >= 0))):
            raise LawFileError(f"{source}: band.beyond_pilots must be {{s1_max > 0, per_ln_s1 >= 0, points >= 0, "
                               "per_ln_s1_annealed >= 0 (optional), s1_min >= 0 (optional)}")
        annealed, s1_min = doc.get("per_ln_s1_annealed"), doc.get("s1_min")
        return cls(float(doc["s1_max"]), float(doc.get("per_ln_s1", 0.0)), int(doc.get("points", 0)),
                   None if annealed is None else float(annealed), None if s1_min is None else float(s1_min))


def calibrate_reach(rel_errors: np.ndarray, widths: np.ndarray, beyond: np.ndarray, s1_max: float,
                    level: float = 0.9, lr_rel: np.ndarray | None = None) -> ScheduleReach:
    """:class:`ScheduleReach` from held-out points: their |relative error|, the band half-width they
    had, and ``ln(S1 / S1 max of the fit)``; only points past the fit's S1 (``beyond > 0``) count.
    With ``lr_rel`` (each point's LR / its run's peak) the points above and at or below half the peak
    set the two slopes, each the conformal quantile of what its own points need (one group empty: the
    pooled slope for both).

    Example:
        >>> e = np.array([0.01, 0.02, 0.03]); w = np.full(3, 0.01); b = np.array([0.5, 0.5, 1.0])
        >>> calibrate_reach(e, w, b, s1_max=7.2).per_ln_s1
        2.0
    """
    m = beyond > 0
    if not m.any():
        return ScheduleReach(s1_max, 0.0, 0)
    needs = (np.abs(rel_errors[m]) / widths[m] - 1.0) / beyond[m]
    pooled = max(conformal_quantile(needs, level), 0.0)
    if lr_rel is None:
        return ScheduleReach(s1_max, pooled, int(m.sum()))
    hot = np.asarray(lr_rel, dtype=float)[m] > 0.5
    if hot.all() or not hot.any():
        return ScheduleReach(s1_max, pooled, int(m.sum()), None)
    return ScheduleReach(s1_max, max(conformal_quantile(needs[hot], level), 0.0), int(m.sum()),
                         max(conformal_quantile(needs[~hot], level), 0.0))


@dataclass
class SizeReach:
    """How the predicted curve's band widens outside the pilot sizes: the half-width at a distance
    ``d`` in ln N beyond them is multiplied by ``1 + per_ln_n * d``.

    Calibrated by leaving the largest (and the smallest) pilot size out: a law fitted on the other
    sizes (two or more, so that it has an N-dependence, as the pilots' law does) predicts the left-out
    size's curves, and ``per_ln_n`` is the smallest widening that holds 90% of their points (each curve
    weighing the same). With fewer than three sizes nothing measures it: ``per_ln_n = 1`` (the rule
    before, twice as wide at e times the largest pilot N) and ``points = 0``.

    Attributes:
        per_ln_n: widening per unit of ln N outside the pilot sizes.
        points: how many held-out points it rests on (0: the unmeasured default).
        n_out_max: the largest distance in ln N they reached; further out the linear growth is assumed.

    Past ``n_out_max`` the measured slope is not extrapolated: see :func:`widening`.

    Example:
        >>> SizeReach(per_ln_n=0.5, points=40, n_out_max=0.7).factor(0.7), SizeReach(0.5, 40, 0.7).factor(1.7)
        (1.35, 2.35)
    """

    per_ln_n: float = 1.0
    points: int = 0
    n_out_max: float = 0.0

    def factor(self, n_out: float) -> float:
        return widening(n_out, self.per_ln_n, self.n_out_max)

    def to_json(self) -> dict[str, Any]:
        return {"per_ln_n": float(self.per_ln_n), "points": int(self.points), "n_out_max": float(self.n_out_max)}

    @classmethod
    def from_json(cls, doc: Any, source: str) -> SizeReach:
        vals = {k: doc.get(k, d) for k, d in (("per_ln_n", 1.0), ("points", 0), ("n_out_max", 0.0))} \
            if isinstance(doc, Mapping) else None
        if vals is None or not all(_finite(v) and v >= 0 for v in vals.values()):
            raise LawFileError(f"{source}: band.beyond_sizes must be {{per_ln_n >= 0, points >= 0, n_out_max >= 0}}")
        return cls(float(vals["per_ln_n"]), int(vals["points"]), float(vals["n_out_max"]))


def calibrate_size_reach(rel_errors: np.ndarray, widths: np.ndarray, n_out: np.ndarray, weights: np.ndarray,
                         level: float = 0.9) -> SizeReach:
    """:class:`SizeReach` from the points of sizes left out of a fit: their |relative error|, the in-range
    band half-width at them, their distance in ln N from the sizes fitted, and a weight per point (each
    curve's summing to 1); the weighted ``level`` quantile of what each point needs.

    Example:
        >>> e = np.array([0.01, 0.02, 0.03]); w = np.full(3, 0.01); d = np.full(3, 0.5)
        >>> calibrate_size_reach(e, w, d, np.ones(3)).per_ln_n
        4.0
    """
    m = n_out > 0
    if not m.any():
        return SizeReach()
    needs = np.maximum((np.abs(rel_errors[m]) / widths[m] - 1.0) / n_out[m], 0.0)
    order = np.argsort(needs)
    cum = np.cumsum(weights[m][order]) / weights[m].sum()
    k = float(needs[order][min(int(np.searchsorted(cum, level)), len(needs) - 1)])
    return SizeReach(k, int(m.sum()), float(n_out[m].max()))


__all__ = ["OFF_BAND_LEVEL", "ForecastCalibration", "Replay", "blend_weight", "choose_blend", "BLEND_SCALES", "ScheduleReach", "SizeReach", "calibrate_forecast", "calibrate_reach",
           "calibrate_size_reach", "widening",
           "conformal_quantile", "sharing_groups", "REPLAY_FRACTIONS", "EFFECTIVE_POINTS_PER_RUN"]
