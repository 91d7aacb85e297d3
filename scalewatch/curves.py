"""Schedule-aware loss-curve laws: predict a run's whole loss curve from pilot runs and its LR schedule.

A point in the middle of a cosine run is not a point of L(N, D): the loss sits above it
until the learning rate anneals. The momentum law of Tissue et al. (2024, arXiv 2408.11029)
takes the schedule as input::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)
    S1(s) = sum of the LR up to step s (warmup counted at the peak LR)
    m_i = lam * m_{i-1} + (eta_{i-1} - eta_i),   S2(s) = sum of m_i up to s,   lam = 0.999

Fitted on a few pilot curves of a recipe (e.g. one cosine and one constant-LR run) it
predicts the curve under other schedules. Across model sizes the long-training level has
Chinchilla's shape, L0(N) = E + B * (N / n_ref)^-beta with a floor E, and ln A, alpha, ln C are
linear in ``ln(N / n_ref)`` (the law file's ``form``, :data:`FORM_FLOOR`; files from before it are
:data:`FORM_LINEAR`, every parameter linear in ln N), so pilot runs at two or more sizes predict a
new size. The prediction band is calibrated by leave-one-curve-out errors on the
pilot curves. Plain numpy/scipy: nothing here knows Lightning.

This module holds the law and the schedule (features, curves and their readers, the law and
its file); fitting it to pilot curves is in :mod:`scalewatch.curve_fit`, forecasting a live
run's final loss and the monitor plugin in :mod:`scalewatch.forecast`. Their names are
importable from here too (loaded on first use), so ``from scalewatch.curves import fit_curves``
keeps working.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.signal import lfilter

from scalewatch.bands import ForecastCalibration, ScheduleReach, SizeReach
from scalewatch.data import _norm, no_rows_left, parse_where, pick_column, table_delimiter
from scalewatch.laws import SCHEMA, SCHEMA_VERSION, LawFileError, check_law_header, read_law_json, write_law_json
from scalewatch.laws import _finite_number as _finite
from scalewatch.tensorboard import LOSS_TAGS, LR_TAGS, PREFIX, TOKEN_TAGS

if TYPE_CHECKING:  # for type checkers only: at run time these load on first use (see __getattr__ below)
    from scalewatch.curve_fit import CurveFitResult, fit_curves
    from scalewatch.forecast import CurvePlugin, Forecast, ForecastSettings, forecast_final

FAMILY = "momentum_curve"
LAMBDA = 0.999
PARAM_NAMES = ("L0", "lnA", "alpha", "lnC")
# How the parameters depend on N (the law file's "form"; files without one are FORM_LINEAR):
# - FORM_LINEAR: every parameter linear in x = ln(N / n_ref), L0 included (unbounded below in N).
# - FORM_FLOOR: the long-training level has the Chinchilla shape, L0(N) = E + B * (N / n_ref)^-beta
#   with E, B >= 0 shared across sizes, so the loss in N has the floor E; ln A, alpha, ln C stay
#   linear in x (they carry the shape in steps).
FORM_LINEAR = "linear_ln_n"
FORM_FLOOR = "power_floor_l0"
FORM_PARAMS = {FORM_LINEAR: PARAM_NAMES, FORM_FLOOR: ("E", "lnB", "beta", "lnA", "alpha", "lnC")}
BAND_LEVEL = 0.90
# The band is never narrower than this (relative): curves measured on a finite evaluation set
# are not known better, and a law that fits its pilots perfectly is not perfect elsewhere.
BAND_FLOOR_REL = 0.002
# Stretches of a run (step / last step) with their own band width.
PROGRESS_EDGES = (0.0, 0.3, 0.6, 1.0)
# Points before this fraction of a curve's last step are left out of fits: the warmup and
# the first steep drop are not what the law describes (and not what a forecast is about).
SKIP_FRACTION = 0.1


class CurveError(ValueError):
    """A loss curve or a schedule that cannot be used, with the reason and the fix."""


# ------------------------------------------------------------------ schedules
def per_step_lr(steps: Sequence[float], lr: Sequence[float], last_step: int | None = None) -> np.ndarray:
    """The LR at every step 0..last_step from logged ``(step, lr)`` points.

    Linear interpolation between points; before the LR first reaches its peak (warmup, or
    steps before the first logged point) the peak LR is used, as in Tissue et al. Past the
    last point the last LR is held.

    Example:
        >>> per_step_lr([2, 4, 6], [1.0, 1.0, 0.0]).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(lr, dtype=float)
    if s.ndim != 1 or s.shape != v.shape or len(s) == 0:
        raise CurveError("schedule: steps and lr must be 1-D sequences of the same, non-zero length")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(v))):
        raise CurveError("schedule: steps and lr must be finite numbers")
    if np.any(np.diff(s) <= 0):
        raise CurveError("schedule: steps must be strictly increasing; sort the file or drop duplicate steps")
    if not np.any(v > 0):
        raise CurveError("schedule: the learning rate is zero or negative throughout; a schedule needs positive LRs")
    end = int(s[-1]) if last_step is None else int(last_step)
    grid = np.arange(end + 1, dtype=float)
    full = np.interp(grid, s, v)
    rise = warmup_end(v)
    full[: min(int(s[rise]), end) + 1] = float(v[rise])
    return np.clip(full, 0.0, None)


def warmup_end(lr: Sequence[float] | np.ndarray) -> int:
    """The index where a schedule's warmup ends (where the LR first reaches the peak of its opening stretch,
    the stretch before it first falls); 0 when the schedule has no warmup.

    A warmup rises from the start: in steps or smoothly, its first rise comes in the first half of the stretch
    up to its peak. An LR that stays flat and is then raised (a restart, an LR raised by hand or by a fault) is
    not one: its steps before the jump keep the LR they had, so a late jump does not rewrite them.

    Example:
        >>> warmup_end([0.1, 0.5, 1.0, 1.0, 0.5]), warmup_end([0.2, 0.2, 0.6, 0.6, 1.0, 0.9])  # smooth, in steps
        (2, 4)
        >>> warmup_end([1.0, 1.0, 1.0, 300.0, 300.0]), warmup_end([1.0, 0.5])  # a late jump; no rise at all
        (0, 0)
    """
    v = np.asarray(lr, dtype=float)
    falls = np.flatnonzero(np.diff(v) < 0)
    opening = v[: int(falls[0]) + 1] if len(falls) else v
    peak = int(np.argmax(opening))
    if peak == 0:
        return 0
    first_rise = int(np.flatnonzero(np.diff(opening[: peak + 1]) > 0)[0])
    return peak if first_rise <= 0.5 * peak else 0


def check_schedule(schedule: Any) -> np.ndarray:
    """A run's per-step LR (index = step) as a float array; :class:`CurveError` if it cannot be one.

    Predictions and forecasts index it by step, so it must be 1-D, cover at least steps 0..1,
    and hold finite numbers; an all-zero schedule has no power-law term to speak of.

    Example:
        >>> check_schedule([3e-4, 3e-4, 1e-4]).tolist()
        [0.0003, 0.0003, 0.0001]
        >>> check_schedule([0.0, 0.0])
        Traceback (most recent call last):
        ...
        scalewatch.curves.CurveError: schedule: the learning rate is zero or negative throughout
    """
    arr = np.asarray(schedule, dtype=float)
    if arr.ndim != 1 or len(arr) < 2 or not np.all(np.isfinite(arr)):
        raise CurveError("schedule: need the LR at every step as a 1-D array of finite numbers")
    if not np.any(arr > 0):
        raise CurveError("schedule: the learning rate is zero or negative throughout")
    return arr


def schedule_features(lr: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """``(S1, S2)`` at every step for a per-step LR array (index = step).

    Steps before the LR first reaches its peak (a warmup) count at the peak, as in Tissue et al.
    and as :func:`per_step_lr` does for logged curves: a rising LR is not an annealing, and its
    negative "drops" would otherwise stay in the momentum and raise the predicted loss for the
    whole run (by 0.56 nats at step 600 of the example GPT's 40-step warmup, with a law fitted on
    its logged pilot curves).

    Example:
        >>> S1, S2 = schedule_features(np.array([1.0, 1.0, 0.5, 0.5]), lam=0.5)
        >>> S1.tolist(), S2.tolist()
        ([1.0, 2.0, 2.5, 3.0], [0.0, 0.0, 0.5, 0.75])
        >>> [f.tolist() for f in schedule_features(np.array([0.5, 1.0, 0.5]), lam=0.5)]  # warmup at the peak
        [[1.0, 2.0, 2.5], [0.0, 0.0, 0.5]]
        >>> schedule_features(np.array([1.0, 0.5, 2.0]), lam=0.5)[0].tolist()  # a later rise is kept
        [1.0, 1.5, 3.5]
    """
    lr = np.asarray(lr, dtype=float)
    # The warmup is the opening rise (warmup_end): a later rise (a restart, an LR raised by hand or by a fault
    # mid-run, after a flat start) is part of the schedule and stays as it is.
    peak = warmup_end(lr)
    if peak:
        lr = np.concatenate([np.full(peak, lr[peak]), lr[peak:]])
    drops = np.concatenate([[0.0], lr[:-1] - lr[1:]])
    momentum = lfilter([1.0], [1.0, -lam], drops)
    return np.cumsum(lr), np.cumsum(momentum)


# ------------------------------------------------------------------ curves
@dataclass
class Curve:
    """One run's loss curve: steps, the LR at those steps, the loss, and N if known."""

    name: str
    steps: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    n_params: float | None = None
    schedule: np.ndarray | None = None  # per-step LR, when known better than from the logged points

    def per_step_lr(self) -> np.ndarray:
        if self.schedule is not None:
            return self.schedule
        return per_step_lr(self.steps, self.lr)

    def features(self, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
        S1, S2 = schedule_features(self.per_step_lr(), lam)
        idx = self.steps.astype(int)
        return S1[idx], S2[idx]


def validate_curve(c: Curve) -> Curve:
    """Check a curve; raise :class:`CurveError` naming the problem (NaN losses are dropped with a warning)."""
    steps = np.asarray(c.steps, dtype=float)
    loss = np.asarray(c.loss, dtype=float)
    lr = np.asarray(c.lr, dtype=float)
    if not (len(steps) == len(loss) == len(lr)) or len(steps) < 3:
        raise CurveError(f"{c.name}: a curve needs at least 3 points with step, lr and loss")
    if np.any(np.diff(steps) <= 0):
        raise CurveError(f"{c.name}: steps are not increasing; sort the file and drop duplicate steps")
    bad = ~np.isfinite(loss)
    if bad.any():
        warnings.warn(f"{c.name}: {int(bad.sum())} non-finite losses dropped", stacklevel=2)
    if not np.any(lr > 0):
        raise CurveError(f"{c.name}: the learning rate is zero or negative throughout")
    if c.n_params is not None and not (c.n_params > 0):
        raise CurveError(f"{c.name}: n_params must be positive, got {c.n_params}")
    schedule = c.schedule if c.schedule is not None else per_step_lr(steps, lr)
    keep = ~bad
    if keep.sum() < 3:
        raise CurveError(f"{c.name}: fewer than 3 finite losses")
    return Curve(c.name, steps[keep].astype(int), lr[keep], loss[keep], c.n_params, schedule)


# Column aliases of curve CSVs, matched case-insensitively (scalewatch.data.pick_column).
# The loss and LR names are those `scalewatch watch` looks for (one list, in scalewatch.tensorboard), after the
# names this reader took first before that list was shared (so a file with both `loss` and `train_loss` gives
# the same curve as before), and with `val_loss`: a curve law may be fitted on a held-out loss.
_STEP_KEYS = ("step", "_step", "global_step")
_LR_KEYS = LR_TAGS
_LOSS_KEYS = tuple(dict.fromkeys(("loss", "train_loss", "val_loss", "scalewatch/loss") + LOSS_TAGS))
_N_KEYS = ("n_params", "params", "N", "n_params_final_json", "scalewatch/n_params")
# The callback's own columns. In a Lightning CSVLogger file of a ScaleWatch run they share one row per log
# interval, while Lightning's `train_loss` sits on rows of its own (one step earlier) with a blank LR and N:
# where the file has `scalewatch/loss`, it and its LR and N are read, as from a ScaleWatch TensorBoard run.
_OWN_LOSS, _OWN_N = "scalewatch/loss", "scalewatch/n_params"


def _column_keys(header: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The loss and N aliases to try for a file with this header: the callback's own columns first where it
    has them (its LR column, ``scalewatch/lr``, is first in :data:`_LR_KEYS` already).

    Example:
        >>> _column_keys(["step", "train_loss", "scalewatch/loss", "scalewatch/lr"])[0][0]
        'scalewatch/loss'
        >>> _column_keys(["step", "loss", "lr"]) == (_LOSS_KEYS, _N_KEYS)
        True
    """
    if pick_column(header, (_OWN_LOSS,)) is None:
        return _LOSS_KEYS, _N_KEYS
    return (_OWN_LOSS, *_LOSS_KEYS), (_OWN_N, *_N_KEYS)


def _read_csv(p: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows (a tab- or semicolon-separated file is read too, see :func:`table_delimiter`);
    an unreadable file is a :class:`CurveError` naming it."""
    try:
        with p.open(newline="") as f:
            delimiter = table_delimiter(f.readline())
            f.seek(0)
            reader = csv.DictReader(f, delimiter=delimiter)
            return list(reader.fieldnames or []), list(reader)
    except OSError as exc:
        raise CurveError(f"{p}: cannot read ({exc.strerror})") from None


def _with_spec(c: Curve, spec: str) -> Curve:
    """``c`` with the LR of a described schedule (:func:`schedule_from_spec`; the run ends at its last logged
    step unless the spec says ``total``)."""
    full = schedule_from_spec(spec, int(c.steps.max()))
    if int(c.steps.max()) >= len(full):
        raise CurveError(f"{c.name}: the schedule {spec!r} ends at step {len(full) - 1}, before the curve's last "
                         f"step {int(c.steps.max())}; fix total=")
    return validate_curve(Curve(c.name, c.steps, full[c.steps.astype(int)], c.loss, c.n_params, full))


def read_curve_csv(path: str | Path, loss_column: str | None = None, n_params: float | None = None,
                   where: Sequence[str] = (), schedule: str | None = None) -> Curve:
    """A CSV with columns ``step,lr,loss`` (optional ``n_params``; aliases accepted, any case).

    ``where`` keeps only the rows where ``COL=VALUE`` holds (all of them). A file that holds several
    runs is read with :func:`read_curve_table` (one curve per run); here it is an error that says so.
    ``schedule``: the LR described in words (:func:`schedule_from_spec`) for a file with no LR column.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> _ = open(p, "w").write("Step,LR,Loss\\n10,1e-3,3.2\\n20,1e-3,3.0\\n30,5e-4,2.9\\n")
        >>> read_curve_csv(p).loss.tolist()
        [3.2, 3.0, 2.9]
    """
    return read_curve_table(path, loss_column, n_params, where=where, schedule=schedule)[0]


# Columns that name a run in a table of several (checked, in order, when a file's steps repeat).
_RUN_KEYS = ("run", "name", "run_name", "run_id", "id")


def read_curve_table(path: str | Path, loss_column: str | None = None, n_params: float | None = None,
                     where: Sequence[str] = (), run_column: str | None = None,
                     schedule: str | None = None, n_column: str | None = None) -> list[Curve]:
    """The curves of a CSV: one, or with ``run_column`` (a column, or several joined by commas) one per
    value of it, named by the value (values joined by ``/``), each with its own ``n_params`` column value.
    ``schedule`` (e.g. ``"cosine:peak=6e-4,warmup=0.01,final=0.1"``, :func:`schedule_from_spec`): every
    curve's LR, each ending at its own last step unless it says ``total``; needed where the file has no
    LR column, and used instead of the column where it has one (the column is then not read).
    ``n_column``: the column of N when it is not one of the usual names (``n_params``, ``params``...).

    Blank cells (an export, e.g. from W&B, whose metrics were logged at different steps): a row with a blank
    loss is not a point of the curve and is dropped; a blank LR cell (in the LR column in use) is interpolated
    linearly between the neighbouring rows that have one. Any other cell that is not a number is an error
    naming the file, the row and the column. A tab- or semicolon-separated file is read too.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "runs.csv")
        >>> _ = open(p, "w").write("run,step,lr,loss,n_params\\n" + "".join(
        ...     f"{r},{s},1e-3,{3 - s / 100},{n}\\n" for r, n in (("a", 1e8), ("b", 2e8)) for s in (10, 20, 30)))
        >>> [(c.name, c.n_params) for c in read_curve_table(p, run_column="run")]
        [('a', 100000000.0), ('b', 200000000.0)]
    """
    p = Path(path)
    header, rows = _read_csv(p)
    filters = parse_where(where, error=CurveError)
    run_cols = [c.strip() for c in run_column.split(",")] if run_column else []
    for k in [k for k, _ in filters] + run_cols:
        if k not in header:
            raise CurveError(f"{p}: column {k!r} not found; columns are {', '.join(header)}")
    kept = [(i, r) for i, r in enumerate(rows, start=2) if all(str(r.get(k)) == v for k, v in filters)]
    if rows and not kept:
        raise CurveError(f"{p}: {no_rows_left(rows, filters)}")
    sk = pick_column(header, _STEP_KEYS, "step", str(p), error=CurveError)
    lk = pick_column(header, _LR_KEYS) if schedule is None else None  # a described schedule replaces the column
    if lk is None and schedule is None:
        raise CurveError(f"{p}: no learning-rate column (looked for {', '.join(_LR_KEYS)}); columns are "
                         f"{', '.join(header)}. A curve law needs the LR schedule: add an lr column, or describe "
                         f"it with --lr-schedule (e.g. {SPEC_EXAMPLE})")
    loss_keys, n_keys = _column_keys(header)
    try:
        yk = pick_column(header, loss_keys, "loss", str(p), given=loss_column, error=CurveError)
    except CurveError as exc:
        raise CurveError(f"{exc}; name it with --loss-column" if loss_column is None else str(exc)) from None
    nk = pick_column(header, n_keys, where=str(p), given=n_column, error=CurveError)  # optional unless named
    groups: dict[str, list[dict[str, str]]] = {}
    lines: dict[str, list[int]] = {}
    for i, r in kept:
        if _blank(r.get(yk)):  # a row of other metrics (logged at other steps): not a point of the curve
            continue
        key = "/".join(str(r.get(c)) for c in run_cols) or str(p)
        groups.setdefault(key, []).append(r)
        lines.setdefault(key, []).append(i)
    curves = []
    for name, group in groups.items():
        where_ = [f"{p}: row {i}" for i in lines[name]]
        steps = _numbers(group, sk, where_)
        lr = _numbers(group, lk, where_, blank=math.nan) if lk else np.ones(len(group))
        loss = _numbers(group, yk, where_)
        if len(steps) >= 3 and np.any(np.diff(steps) <= 0):
            hint = _several_runs_hint(header, group, sk, run_cols)
            if hint:
                raise CurveError(f"{p}" + (f" ({name})" if run_cols else "") + f": steps are not increasing: {hint}")
        n = n_params
        if n is None and nk is not None and group[0].get(nk):
            try:
                n = float(group[0][nk])
            except ValueError:
                raise CurveError(f"{p}: {nk}={group[0][nk]!r} is not a number") from None
        if lk and np.isnan(lr).any():
            lr = _fill_blank_lr(steps, lr, f"{p}" + (f" ({name})" if run_cols else ""), lk)
        c = Curve(name if run_cols else str(p), steps, lr, loss, n)
        curves.append(validate_curve(c) if schedule is None else _with_spec(c, schedule))
    if not curves:
        raise CurveError(f"{p}: no rows with a loss in the file" if kept else f"{p}: no rows in the file")
    return curves


# A column with more distinct values than this is a metric, not the name of a run.
_MAX_RUN_VALUES = 64


def _run_key_rank(name: str) -> int:
    """Columns named like a run's name are tried first (run, name, model, seed...), then the header's order."""
    low = name.strip().lower()
    return 0 if low in _RUN_KEYS else 1 if any(w in low for w in ("run", "model", "seed", "name", "size")) else 2


# Runs of one table start within this fraction of its step range of the earliest (find_run_split).
RUN_START_SPREAD = 0.1
# Metrics that are never a run's name, whatever values they hold: the step, the epoch, the loss, LR and token
# names watch and fit read (normalised as pick_column matches them), and every series under the callback's
# `scalewatch/` prefix. In a Lightning CSVLogger file such a column is blank on the rows of other metrics, and
# its two "values" (blank and 0.0, e.g. scalewatch/health/batch_size) used to read as two runs.
# Never a run's name: the step, the epoch, the loss and the token counts (they change within a run). The LR can
# be one (a sweep of constant LRs), and so can the callback's own N (runs of several sizes in one table).
_NEVER_RUN_KEYS = frozenset(_norm(k) for k in (*_STEP_KEYS, "iteration", "epoch", *LOSS_TAGS, *TOKEN_TAGS))
_RUN_NAMING_OWN = frozenset((PREFIX + "n_params",))


def may_name_a_run(column: str) -> bool:
    """Whether a column may name the run of a row (:func:`find_run_split`): not a metric it knows by name.

    Example:
        >>> may_name_a_run("model"), may_name_a_run("scalewatch/health/batch_size"), may_name_a_run("Epoch")
        (True, False, False)
        >>> may_name_a_run("lr"), may_name_a_run("scalewatch/n_params")  # a sweep of LRs, of sizes
        (True, True)
    """
    own = column.startswith(PREFIX) and column not in _RUN_NAMING_OWN
    return not own and _norm(column) not in _NEVER_RUN_KEYS


def find_run_split(steps: Sequence[float], columns: Mapping[str, Sequence[Any]], given: Sequence[str] = ()
                   ) -> tuple[list[str], int] | None:
    """The column, or pair of columns, that splits rows whose steps go backwards into several runs, each with
    strictly increasing steps: ``(columns, number of runs)``, with ``given`` (columns already splitting the rows,
    e.g. ``--run-column``) first; None when the steps increase already or no column does it.

    ``columns`` maps a column name to its value in each row (e.g. ``model`` and ``seed`` of a table of several
    runs). A column with more than 64 distinct values, one that leaves more than a quarter of its runs with
    a single row (a metric logged now and then), one with a blank (None or empty) value in some row, or a
    metric known by name (:func:`may_name_a_run`: the loss, the LR, the epoch, ``scalewatch/...``) is not a
    run's name. A run resumed from a checkpoint (its steps
    go back to the checkpoint) gets None, even where a column changes with each session (a job id): several
    runs start together near the table's first step (:data:`RUN_START_SPREAD`), a resumed session does not. Singles are tried before pairs; names like run, name, model, seed first.

    Example:
        >>> find_run_split([0, 1, 0, 1, 0, 1, 0, 1], {"model": list("aabbaabb"), "seed": list("00001111"),
        ...                                          "loss": [3, 2, 3.1, 2.1, 3, 2, 3.2, 2.2]})
        (['model', 'seed'], 4)
        >>> find_run_split([1, 2, 3, 2, 3, 4], {"loss": [3, 2, 1, 2, 1, 0.5]}) is None  # a resumed run
        True
        >>> find_run_split([1, 2, 3, 2, 3, 4], {"job": list("aaabbb")}) is None  # resumed, a job id per session
        True
    """
    s = np.asarray(steps, dtype=float)
    n = len(s)
    if n < 2:
        return None
    codes: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if len(values) != n or (name not in given and not may_name_a_run(name)):
            continue
        if name not in given and any(_blank(v) for v in values):
            continue  # a metric logged on some rows only: every row of a run carries the run's name
        uniq, inv = np.unique(np.asarray([str(v) for v in values]), return_inverse=True)
        if name in given or 1 < len(uniq) <= _MAX_RUN_VALUES:
            codes[name] = inv.astype(np.int64)
    base = np.zeros(n, dtype=np.int64)
    for g in given:
        if g in codes:
            base = base * (int(codes[g].max()) + 1) + codes[g]

    def runs(key: np.ndarray) -> int | None:
        order = np.argsort(key, kind="stable")  # each run's rows in file order
        k, st = key[order], s[order]
        same = k[1:] == k[:-1]
        if np.any(same & (np.diff(st) <= 0)):
            return None
        starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
        sizes = np.diff(np.concatenate([starts, [n]]))
        # Several runs start together, near the table's first step; the sessions of one resumed run (split by
        # a job id or a host that changes at each restart) start where a checkpoint left off, well after it.
        first = st[starts]
        together = np.count_nonzero(first <= first.min() + RUN_START_SPREAD * (s.max() - s.min()))
        # runs of one row are a metric's values (e.g. a validation loss logged now and then), not runs
        return len(sizes) if len(sizes) > 1 and together >= 2 and \
            np.count_nonzero(sizes < 2) <= len(sizes) // 4 else None

    if np.all(np.diff(s) > 0) or (given and runs(base) is not None):
        return None
    cands = sorted((c for c in codes if c not in given), key=_run_key_rank)[:16]
    for c in cands:
        if (k := runs(base * (int(codes[c].max()) + 1) + codes[c])) is not None:
            return [*given, c], k
    for a_i, a in enumerate(cands):
        for b in cands[a_i + 1:]:
            key = (base * (int(codes[a].max()) + 1) + codes[a]) * (int(codes[b].max()) + 1) + codes[b]
            if (k := runs(key)) is not None:
                return [*given, *sorted((a, b), key=list(columns).index)], k  # named in the file's order
    return None


def describe_split(cols: Sequence[str], k: int) -> str:
    """``column 'model' has 4 values`` or ``columns 'model', 'seed' have 8 combinations``."""
    return (f"column {cols[0]!r} has {k} values" if len(cols) == 1 else
            f"columns {', '.join(repr(c) for c in cols)} have {k} combinations")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _numbers(rows: Sequence[Mapping[str, str]], col: str, where: Sequence[str], blank: float | None = None
             ) -> np.ndarray:
    """Column ``col`` of ``rows`` as floats; a blank cell is ``blank`` where given, any other non-number a
    :class:`CurveError` naming the file, the row (``where``) and the column."""
    out = np.empty(len(rows))
    for j, r in enumerate(rows):
        v = r.get(col)
        if blank is not None and _blank(v):
            out[j] = blank
            continue
        try:
            out[j] = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise CurveError(f"{where[j]}: column {col!r} holds {v!r}, not a number; fix or drop the row") from None
    return out


def _fill_blank_lr(steps: np.ndarray, lr: np.ndarray, name: str, col: str) -> np.ndarray:
    """The LR at rows whose LR cell is blank (an export whose metrics were logged at different steps), linearly
    interpolated between the rows that have one (held flat before the first and after the last)."""
    have = ~np.isnan(lr)
    if not have.any():
        raise CurveError(f"{name}: the LR column {col!r} is blank in every row with a loss; fill it, or describe "
                         f"the schedule with --lr-schedule (e.g. {SPEC_EXAMPLE})")
    order = np.argsort(steps, kind="stable")
    s_have, v_have = steps[order][have[order]], lr[order][have[order]]
    out = lr.copy()
    out[~have] = np.interp(steps[~have], s_have, v_have)
    return out


def _several_runs_hint(header: Sequence[str], rows: Sequence[Mapping[str, str]], step_col: str,
                       run_cols: Sequence[str]) -> str | None:
    """When steps repeat because the rows hold several runs: which column (or pair of columns), with the
    given ``--run-column`` ones, splits them into curves of increasing steps (:func:`find_run_split`), as
    advice; None when no column does."""
    try:
        steps = [float(r[step_col]) for r in rows]
    except (TypeError, ValueError):
        return None
    cols = {h: [r.get(h) for r in rows] for h in header if h != step_col}
    found = find_run_split(steps, cols, given=list(run_cols))
    if found is None:
        return None
    cols_, k = found
    return (f"this file holds several runs ({describe_split(cols_, k)}): add --run-column {','.join(cols_)}, "
            "or filter with --where COL=VALUE")


def read_curve_tensorboard(path: str | Path, loss_tag: str | None = None, n_params: float | None = None,
                           schedule: str | None = None) -> Curve:
    """A TensorBoard event directory: the loss and LR tags (ScaleWatch's or common names, see
    :mod:`scalewatch.tensorboard`), N from ``scalewatch/n_params`` where logged; ``schedule`` (a
    description, :func:`schedule_from_spec`) instead of the LR tag."""
    from scalewatch.tensorboard import LOSS_TAGS, LR_TAGS, find_tag, read_scalars, tag

    missing = no_event_files(path)
    if missing:
        raise CurveError(missing)
    series = read_scalars(path)
    tags = list(series)
    lr_tag, y_tag = find_tag(tags, LR_TAGS), find_tag(tags, LOSS_TAGS, loss_tag)
    found_ = ", ".join(tags) or "no scalars"
    if y_tag is None:
        wanted = f"loss tag {loss_tag!r}" if loss_tag else f"loss tag (looked for {', '.join(LOSS_TAGS)})"
        raise CurveError(f"{path}: no {wanted}; found {found_}; name it with --loss-column")
    if lr_tag is None and schedule is None:
        raise CurveError(f"{path}: no LR tag (looked for {', '.join(LR_TAGS)}); found {found_}; describe the LR "
                         f"with --lr-schedule (e.g. {SPEC_EXAMPLE})")
    if n_params is None and tag("n_params") in series:
        n_params = float(series[tag("n_params")][-1][1])
    if schedule is not None:
        pts = sorted(series[y_tag])
        c = Curve(str(path), np.array([p[0] for p in pts], dtype=float), np.ones(len(pts)),
                  np.array([p[1] for p in pts], dtype=float), n_params)
        return _with_spec(c, schedule)
    lr_by_step = dict(series[lr_tag])
    pts = [(step, lr_by_step[step], loss) for step, loss in series[y_tag] if step in lr_by_step]
    arr = np.array(sorted(pts), dtype=float).reshape(-1, 3)
    return validate_curve(Curve(str(path), arr[:, 0], arr[:, 1], arr[:, 2], n_params))


def read_curves(paths: Sequence[str | Path], loss_column: str | None = None, where: Sequence[str] = (),
                run_column: str | None = None, schedule: str | None = None,
                n_column: str | None = None) -> list[Curve]:
    """CSV files and TensorBoard event directories, in order; ``where`` (``COL=VALUE`` filters),
    ``run_column`` (one curve per value) and ``n_column`` (the column of N) apply to the CSVs (see
    :func:`read_curve_table`); ``schedule`` describes the LR of every run (:func:`schedule_from_spec`) where
    the logs have none."""
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            if where or run_column or n_column:
                raise CurveError(f"{p}: --where, --run-column and --n-column select rows or columns of a CSV; a "
                                 "TensorBoard directory holds one run (give the run's own directory)")
            out.append(read_curve_tensorboard(p, loss_column, schedule=schedule))
        elif p.exists():
            out.extend(read_curve_table(p, loss_column, where=where, run_column=run_column, schedule=schedule,
                                        n_column=n_column))
        else:
            raise CurveError(f"{p}: no such file or directory")
    return out


def no_event_files(path: str | Path) -> str | None:
    """Why ``path`` is not a TensorBoard run directory (with where event files are, below it), or None if it is.

    Example:
        >>> import tempfile
        >>> no_event_files(tempfile.mkdtemp()).split(': ', 1)[1]
        'no TensorBoard event files in this directory'
    """
    if any(Path(path).glob("events.out.tfevents.*")):
        return None
    found = event_dirs(path)
    return f"{path}: no TensorBoard event files in this directory" + (
        f"; event files are in: {', '.join(found[:5])}" if found else "")


def event_dirs(path: str | Path) -> list[str]:
    """The directories under ``path`` that hold TensorBoard event files (relative to it), for hints; never
    ``scalewatch watch``'s own runs (``*-scalewatch-watch``), which hold its alerts, not a training run."""
    out = set()
    for f in Path(path).rglob("events.out.tfevents.*"):
        rel = f.parent.relative_to(path)
        if not any(part.endswith("-scalewatch-watch") for part in rel.parts):
            out.add(str(rel))
    return sorted(out)


# ------------------------------------------------------------------ the law
def law_form(coef: Mapping[str, Any]) -> str:
    """The form (:data:`FORM_LINEAR` or :data:`FORM_FLOOR`) that a coefficient dict is written in."""
    return FORM_FLOOR if "E" in coef else FORM_LINEAR


def momentum_params(coef: Mapping[str, tuple[float, float]], x: Any) -> tuple[Any, Any, Any, Any]:
    """``(L0, ln A, alpha, ln C)`` at ``x = ln(N / n_ref)`` (a number or an array) for either form.

    Example:
        >>> c = {"E": (2.0, 0.0), "lnB": (0.0, 0.0), "beta": (0.5, 0.0), "lnA": (0.0, 0.1),
        ...      "alpha": (0.5, 0.0), "lnC": (1.0, 0.0)}
        >>> [round(float(v), 4) for v in momentum_params(c, math.log(4.0))]
        [2.5, 0.1386, 0.5, 1.0]
    """
    v = {k: a + b * x for k, (a, b) in coef.items() if k in PARAM_NAMES}
    if "E" in coef:
        v["L0"] = coef["E"][0] + np.exp(coef["lnB"][0] - coef["beta"][0] * x)
    return v["L0"], v["lnA"], v["alpha"], v["lnC"]


@dataclass(frozen=True)
class MomentumLaw:
    """Tissue et al.'s law for one model size."""

    L0: float
    A: float
    alpha: float
    C: float
    lam: float = LAMBDA

    def loss(self, S1: np.ndarray, S2: np.ndarray) -> np.ndarray:
        return self.L0 + self.A * np.power(np.maximum(S1, 1e-30), -self.alpha) - self.C * S2


@dataclass(frozen=True)
class CurvePrediction:
    """The predicted loss at ``steps`` with a band (``low``, ``high``) at ``level``."""

    steps: np.ndarray
    loss: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float = BAND_LEVEL


@dataclass
class CurveLaw:
    """A momentum law shared across model sizes.

    Two forms (:attr:`form`, the law file's ``form``): :data:`FORM_LINEAR`, each parameter linear
    in ``x = ln(N / n_ref)`` (L0, lnA, alpha, lnC; every file written before the other form existed),
    and :data:`FORM_FLOOR`, where the long-training level is L0(N) = E + B·(N/n_ref)^-beta with a
    floor E (Chinchilla's shape in N) and lnA, alpha, lnC stay linear in x.

    Attributes:
        coef: name -> (value at n_ref, slope per unit of x) for L0, lnA, alpha, lnC; in
            :data:`FORM_FLOOR` E, lnB, beta (slopes 0: one value for every size) instead of L0.
        n_ref: the reference size (geometric mean of the pilot sizes).
        lam: the momentum decay.
        band_rel: half-width of the 90% band, relative to the predicted loss (from
            held-out errors on the pilot curves).
        band_by_progress: ``(from, to, half-width)`` per stretch of the run (step / last
            step), where the held-out errors allow; ``band_rel`` elsewhere.
        n_range: smallest and largest pilot N (None for a single unknown size).
        fitted_on: provenance (curves, sizes, errors).
        conventions: loss name, N convention, step unit.
        forecast_band: the final-loss forecast's band, calibrated on replays of the pilots' own
            prefixes (:class:`scalewatch.bands.ForecastCalibration`); None in files written before
            it existed (then the forecast's band is the law's own at the final step).
        reach: how the band widens where a run's summed LR goes past the pilots'
            (:class:`scalewatch.bands.ScheduleReach`); None: no widening.
        size_reach: how the band widens outside the pilot sizes, measured by leaving the largest
            and the smallest size out (:class:`scalewatch.bands.SizeReach`, 3+ sizes); None: the
            unmeasured rule, ``1 + distance in ln N``.
    """

    coef: dict[str, tuple[float, float]]
    n_ref: float
    lam: float = LAMBDA
    band_rel: float = 0.01
    band_by_progress: list[tuple[float, float, float]] = field(default_factory=list)
    n_range: tuple[float, float] | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)
    conventions: dict[str, str] = field(default_factory=dict)
    forecast_band: ForecastCalibration | None = None
    reach: ScheduleReach | None = None
    size_reach: SizeReach | None = None

    family = FAMILY

    @property
    def form(self) -> str:
        """How the parameters depend on N: :data:`FORM_FLOOR` when the coefficients hold ``E``, else
        :data:`FORM_LINEAR` (the only form before it existed)."""
        return law_form(self.coef)

    def at(self, n_params: float | None = None) -> MomentumLaw:
        x = 0.0 if n_params is None or not self.n_ref else math.log(n_params / self.n_ref)
        L0, lnA, alpha, lnC = momentum_params(self.coef, x)
        return MomentumLaw(L0=float(L0), A=math.exp(lnA), alpha=float(alpha), C=math.exp(lnC), lam=self.lam)

    def n_outside(self, n_params: float | None) -> float:
        """How far ln N lies outside the pilot sizes (0 inside, or when N or the sizes are unknown).

        Example:
            >>> law = CurveLaw({}, n_ref=1e8, n_range=(1e8, 4e8))
            >>> law.n_outside(2e8), round(law.n_outside(4e8 * math.e), 6)
            (0.0, 1.0)
        """
        if n_params is None or self.n_range is None:
            return 0.0
        lo, hi = self.n_range
        return max(math.log(lo / n_params), math.log(n_params / hi), 0.0)

    def band_at(self, n_params: float | None, progress: float | np.ndarray | None = None,
                s1: float | np.ndarray | None = None, lr_rel: float | np.ndarray | None = None) -> Any:
        """The relative band half-width at N, at ``progress`` = step / last step of the run, and at
        ``s1`` = the run's summed LR at that step, and ``lr_rel`` = its LR there / the run's peak LR
        (how far it has annealed: the widening past the pilots' summed LR depends on it, see
        :class:`~scalewatch.bands.ScheduleReach`).

        Wider outside the pilot sizes (extrapolation in N; by :attr:`size_reach` where leave-the-largest-
        size-out measured it) and, with a calibrated :attr:`reach`,
        where the summed LR goes past the pilots' (a longer run or a higher LR than theirs).
        """
        width: Any = self.band_rel
        if progress is not None and self.band_by_progress:
            prog = np.asarray(progress, dtype=float)
            width = np.full(prog.shape, self.band_rel)
            for lo, hi, w in self.band_by_progress:
                width = np.where((prog > lo) & (prog <= hi), w, width)
            width = np.where(prog <= self.band_by_progress[0][0], self.band_by_progress[0][2], width)
            width = width if width.ndim else float(width)
        if s1 is not None and self.reach is not None:
            width = width * self.reach.factor(s1, lr_rel)
            width = width if np.ndim(width) else float(width)
        return width * (self.size_reach or SizeReach()).factor(self.n_outside(n_params))

    def predict(self, schedule: np.ndarray, n_params: float | None = None,
                steps: Sequence[int] | None = None) -> CurvePrediction:
        """The loss at ``steps`` (default: every step after the first) of a run with this per-step LR.

        Example:
            >>> law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0),
            ...                 "lnC": (math.log(100.0), 0.0)}, n_ref=1e8, band_rel=0.01)
            >>> p = law.predict(np.full(101, 1e-3), steps=[100])
            >>> round(float(p.loss[0]), 4), round(float(p.high[0] - p.loss[0]), 4)
            (5.1466, 0.0515)
        """
        schedule = check_schedule(schedule)
        idx = np.arange(1, len(schedule)) if steps is None else np.asarray(steps, dtype=int)
        if len(idx) and (idx.max() >= len(schedule) or idx.min() < 0):
            raise CurveError(f"schedule covers steps 0..{len(schedule) - 1}, but step {int(idx.max())} was asked for; "
                             "give a schedule that covers the whole run")
        S1, S2 = schedule_features(schedule, self.lam)
        loss = self.at(n_params).loss(S1[idx], S2[idx])
        # |loss|: where a poorly determined law predicts a loss below 0 the band still runs low <= loss <= high
        # (scalewatch predict refuses those steps; the caller decides what a negative loss means)
        half = self.band_at(n_params, idx / (len(schedule) - 1), S1[idx], schedule[idx] / schedule.max()) * np.abs(loss)
        return CurvePrediction(idx, loss, loss - half, loss + half)

    # ------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "family": FAMILY,
            "form": self.form,
            "params": {k: [float(a), float(b)] for k, (a, b) in self.coef.items()},
            "n_ref": float(self.n_ref),
            "lam": float(self.lam),
            "band": self._band_json(),
            "n_range": None if self.n_range is None else [float(x) for x in self.n_range],
            "fitted_on": self.fitted_on,
            "conventions": dict(self.conventions),
            **({} if self.forecast_band is None else {"forecast_band": self.forecast_band.to_json()}),
        }

    def _band_json(self) -> dict[str, Any]:
        band = {"level": BAND_LEVEL, "relative_half_width": float(self.band_rel),
                "by_progress": [[float(a), float(b), float(w)] for a, b, w in self.band_by_progress]}
        band = band if self.reach is None else band | {"beyond_pilots": self.reach.to_json()}
        return band if self.size_reach is None else band | {"beyond_sizes": self.size_reach.to_json()}

    @classmethod
    def from_json(cls, doc: Any, source: str = "law file") -> CurveLaw:
        doc = check_law_header(doc, source, family=FAMILY, how_to_write=_HOW_TO_WRITE, needed="a curve law")
        form = doc.get("form", FORM_LINEAR)  # files written before the form existed are the linear form
        if form not in FORM_PARAMS:
            raise LawFileError(f"{source}: unknown curve-law form {form!r}; this scalewatch reads "
                               f"{', '.join(FORM_PARAMS)} (a newer scalewatch may have written the file)")
        names = FORM_PARAMS[form]
        params = doc.get("params")
        if not isinstance(params, Mapping) or any(k not in params for k in names):
            raise LawFileError(f"{source}: 'params' must hold {list(names)}, each [value, slope]")
        coef = {}
        for k in names:
            v = params[k]
            if not (isinstance(v, Sequence) and len(v) == 2 and all(_finite(x) for x in v)):
                raise LawFileError(f"{source}: params.{k} must be [value at n_ref, slope per ln N], finite numbers")
            coef[k] = (float(v[0]), float(v[1]))
        band = doc.get("band") or {}
        if not isinstance(band, Mapping):
            raise LawFileError(f"{source}: 'band' must be an object with relative_half_width")
        n_ref, lam, width = doc.get("n_ref"), doc.get("lam", LAMBDA), band.get("relative_half_width")
        if not (_finite(n_ref) and n_ref > 0 and _finite(lam) and 0 < lam < 1 and _finite(width) and width >= 0):
            raise LawFileError(f"{source}: n_ref > 0, 0 < lam < 1 and band.relative_half_width >= 0 are required")
        n_range = doc.get("n_range")
        if n_range is not None and not (isinstance(n_range, Sequence) and len(n_range) == 2
                                        and all(_finite(x) and x > 0 for x in n_range)):
            raise LawFileError(f"{source}: n_range must be [smallest N, largest N] or null")
        conv = doc.get("conventions", {}) or {}
        by_progress = band.get("by_progress", []) or []
        if not (isinstance(by_progress, Sequence) and all(
                isinstance(r, Sequence) and len(r) == 3 and all(_finite(x) for x in r) for r in by_progress)):
            raise LawFileError(f"{source}: band.by_progress must be a list of [from, to, half-width]")
        # Blocks added by issue 14; files written before it have neither and load as before.
        cal = doc.get("forecast_band")
        reach = band.get("beyond_pilots")
        size_reach = band.get("beyond_sizes")  # newer still: absent, the (1 + distance in ln N) rule
        return cls(coef=coef, n_ref=float(n_ref), lam=float(lam), band_rel=float(width),
                   band_by_progress=[(float(a), float(b), float(w)) for a, b, w in by_progress],
                   n_range=None if n_range is None else (float(n_range[0]), float(n_range[1])),
                   fitted_on=dict(doc.get("fitted_on", {}) or {}),
                   conventions={str(k): str(v) for k, v in conv.items()},
                   forecast_band=None if cal is None else ForecastCalibration.from_json(cal, source),
                   reach=None if reach is None else ScheduleReach.from_json(reach, source),
                   size_reach=None if size_reach is None else SizeReach.from_json(size_reach, source))


# What a law-file error tells the user to run.
_HOW_TO_WRITE = "`scalewatch fit --curves --out`"


def save_curve_law(law: CurveLaw, path: str | Path) -> None:
    write_law_json(law.to_json(), path)


def load_curve_law(path: str | Path) -> CurveLaw:
    """Read a curve-law file; malformed or wrong-family files raise :class:`LawFileError`."""
    return CurveLaw.from_json(read_law_json(path, _HOW_TO_WRITE), source=str(path))


def schedule_from_arg(arg: Any, total_steps: int | None) -> np.ndarray | None:
    """The per-step LR a ``schedule=`` argument gives: a ``step,lr`` CSV path, a description such as
    ``"cosine:peak=3e-4,warmup=2000,final=0.1"`` (:func:`schedule_from_spec`), ``fn(step) -> lr``, or a
    sequence; None when no schedule was given (then the caller reads the run's own scheduler).

    Example:
        >>> schedule_from_arg(lambda s: 0.1 / (s + 1), 3).round(3).tolist()
        [0.1, 0.05, 0.033, 0.025]
    """
    if is_schedule_spec(arg) and not Path(arg).exists():
        return schedule_from_spec(arg, total_steps)
    if isinstance(arg, (str, Path)):
        return schedule_from_csv(arg)
    if callable(arg):
        return np.array([float(arg(s)) for s in range(int(total_steps or 0) + 1)])
    return None if arg is None else np.asarray(arg, dtype=float)


SCHEDULE_KINDS = ("constant", "cosine", "linear", "wsd")
# How messages show a schedule description: an example, and the form to fill in for a whole run.
SPEC_EXAMPLE = "cosine:peak=6e-4,warmup=0.01,final=0.1"
SPEC_TEMPLATE = "cosine:peak=...,warmup=...,final=...,total=LAST_STEP"
_SPEC_KEYS = {"peak", "warmup", "final", "total", "decay"}
SPEC_HELP = ("KIND:key=value,... with KIND one of constant, cosine, linear, wsd; keys peak (the peak LR, default 1: "
             "only ratios matter for one recipe), warmup (steps, or a fraction of the run if < 1; default 0), final "
             "(the last LR as a fraction of the peak; default 0), total (the run's last step; default the run's own), "
             "decay (wsd: the decay's length, steps or a fraction of the run; default 0.2). "
             "E.g. cosine:peak=6e-4,warmup=0.01,final=0.1")


def is_schedule_spec(arg: Any) -> bool:
    """Whether ``arg`` reads as a schedule description (``KIND:...`` or a bare KIND) rather than a file path.

    Example:
        >>> is_schedule_spec("cosine:peak=3e-4"), is_schedule_spec("wsd"), is_schedule_spec("lr.csv")
        (True, True, False)
    """
    return isinstance(arg, str) and arg.split(":", 1)[0].strip().lower() in SCHEDULE_KINDS


def schedule_from_spec(spec: str, total_steps: int | None = None) -> np.ndarray:
    """The per-step LR (steps 0..total) of a schedule described in words, for runs whose logs have no LR.

    ``spec``: see :data:`SPEC_HELP`. Warmup is linear from 0 to the peak; ``cosine`` falls from the peak to
    ``final * peak`` along a half cosine, ``linear`` along a line, ``wsd`` holds the peak and falls linearly over
    the last ``decay`` of the run; ``constant`` holds the peak. A bad spec is a :class:`CurveError` naming the fix.

    Example:
        >>> schedule_from_spec("cosine:peak=1,warmup=2,final=0.1", 6).round(3).tolist()
        [0.0, 0.5, 1.0, 0.868, 0.55, 0.232, 0.1]
        >>> schedule_from_spec("wsd:peak=2,decay=0.5,total=4").tolist()
        [2.0, 2.0, 2.0, 1.0, 0.0]
    """
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in SCHEDULE_KINDS:
        raise CurveError(f"schedule {spec!r}: unknown kind {kind!r}; {SPEC_HELP}")
    vals: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in _SPEC_KEYS:
            raise CurveError(f"schedule {spec!r}: {item!r} is not one of {', '.join(sorted(_SPEC_KEYS))} = a number; "
                             f"{SPEC_HELP}")
        try:
            vals[key] = float(value)
        except ValueError:
            raise CurveError(f"schedule {spec!r}: {key}={value.strip()!r} is not a number") from None
        if not math.isfinite(vals[key]) or vals[key] < 0:
            raise CurveError(f"schedule {spec!r}: {key} must be a number >= 0")
    peak, final = vals.get("peak", 1.0), vals.get("final", 0.0)
    if peak <= 0 or final > 1:
        raise CurveError(f"schedule {spec!r}: peak must be > 0 and final (a fraction of the peak) at most 1")
    if "total" in vals and vals["total"] < 1:
        raise CurveError(f"schedule {spec!r}: total (the run's last step) must be at least 1")
    total = vals.get("total", total_steps)
    if total is None or int(total) < 1:
        raise CurveError(f"schedule {spec!r}: the run's last step is not known here: add total=LAST_STEP to the "
                         "description (or, for watch/report, give --total-steps)")
    total = int(total)

    def steps_of(v: float) -> float:  # a fraction of the run below 1, steps from 1 up
        return v * total if v < 1 else v

    warm = min(steps_of(vals.get("warmup", 0.0)), float(total))
    s = np.arange(total + 1, dtype=float)
    if kind == "wsd":
        start = total - min(steps_of(vals.get("decay", 0.2)), total - warm)
        t = np.clip((s - start) / max(total - start, 1e-12), 0.0, 1.0)
        shape = 1.0 - t * (1.0 - final)
    else:
        t = np.clip((s - warm) / max(total - warm, 1e-12), 0.0, 1.0)
        shape = {"constant": np.ones_like(t), "cosine": final + (1 - final) * 0.5 * (1 + np.cos(np.pi * t)),
                 "linear": 1.0 - t * (1.0 - final)}[kind]
    lr = peak * shape
    if warm > 0:
        lr = np.where(s < warm, peak * s / warm, lr)
    return lr


def schedule_from_csv(path: str | Path) -> np.ndarray:
    """A per-step LR array from a ``step,lr`` CSV."""
    p = Path(path)
    header, rows = _read_csv(p)
    sk, lk = pick_column(header, _STEP_KEYS), pick_column(header, _LR_KEYS)
    if not rows or sk is None or lk is None:
        raise CurveError(f"{p}: a schedule CSV needs columns step,lr (columns: {', '.join(header) or 'none'})")
    try:
        return per_step_lr([float(r[sk]) for r in rows], [float(r[lk]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise CurveError(f"{p}: {exc}") from None


# Fitting and forecasting live in their own modules, which import this one; their names are
# re-exported lazily (PEP 562) so that old imports keep working without an import cycle.
_MOVED = {
    "CurveFitResult": "scalewatch.curve_fit",
    "fit_curves": "scalewatch.curve_fit",
    "Forecast": "scalewatch.forecast",
    "ForecastSettings": "scalewatch.forecast",
    "forecast_final": "scalewatch.forecast",
    "CurvePlugin": "scalewatch.forecast",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
