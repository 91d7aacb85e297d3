"""Reading pilot-run tables (CSV or JSON) for fitting.

Columns are matched against common aliases, ignoring case and treating spaces and hyphens as
underscores (``Model Size`` is ``model_size``); ``--n-column`` / ``--tokens-column`` /
``--flops-column`` / ``--loss-column`` name any other:

========  =====================================================================
N         params, n_params, N, parameters, num_params, model_params, n_params_final_json, model_size,
          num_parameters, n_parameters
D         tokens, D, n_tokens, train_tokens, training_tokens, num_tokens, tokens_seen
C         compute, C, flops, train_flops, training_flops, training_flop, flop (D = C / (6 N) when D is absent)
loss      loss, L, final_loss, val_loss, eval_loss, validation_loss
U         unique_tokens, U, unique (optional: data-constrained fits and plans)
name      name, run, id (optional: used to name rows in messages)
========  =====================================================================

JSON: a list of objects with the same keys, or ``{"runs": [...]}``.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalewatch.fitting import FitError, RunSet, make_runs

ALIASES: dict[str, tuple[str, ...]] = {
    "N": ("params", "n_params", "n", "parameters", "num_params", "model_params", "n_params_final_json", "model_size",
          "num_parameters", "n_parameters"),
    # Not "dataset_size" / "data_size": in data-constrained tables those name the unique data (U), not D.
    "D": ("tokens", "d", "n_tokens", "train_tokens", "training_tokens", "num_tokens", "tokens_seen"),
    "C": ("compute", "c", "flops", "train_flops", "training_flops", "training_flop", "flop"),
    "loss": ("loss", "l", "final_loss", "val_loss", "eval_loss", "validation_loss"),
    "U": ("unique_tokens", "u", "unique"),
    "name": ("name", "run", "id"),
}


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FitError(f"{path}: cannot read ({exc.strerror})") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FitError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(doc, Mapping) and "runs" not in doc and ("family" in doc or "schema" in doc):
            raise FitError(f"{path}: this is a law file, not runs: give the CSV/JSON of pilot runs it was fitted "
                           "on, or use the law with `scalewatch plan --law` / `scalewatch predict --law`")
        if isinstance(doc, Mapping):
            doc = doc.get("runs")
        if not isinstance(doc, Sequence) or not all(isinstance(r, Mapping) for r in doc):
            raise FitError(f"{path}: expected a list of run objects or {{\"runs\": [...]}}")
        return [dict(r) for r in doc]
    lines = text.splitlines()
    return list(csv.DictReader(lines, delimiter=table_delimiter(lines[0]) if lines else ","))


def table_delimiter(first_line: str) -> str:
    """The delimiter of a table whose header is ``first_line``: a comma, unless the header has no comma
    but tabs or semicolons (a TSV, or a spreadsheet's export; decimal commas in its cells are not read: a
    cell such as ``3,5`` is reported as not a number).

    Example:
        >>> table_delimiter("step\\tloss"), table_delimiter("step;loss"), table_delimiter("step,loss")
        ('\\t', ';', ',')
    """
    if "," in first_line:
        return ","
    for d in ("\t", ";"):
        if d in first_line:
            return d
    return ","


def _norm(name: str) -> str:
    """A column name for matching: lower case, no surrounding spaces, inner spaces and hyphens as underscores."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def pick_column(header: Sequence[str], aliases: Sequence[str], what: str | None = None, where: str = "",
                given: str | None = None, error: type[Exception] = FitError) -> str | None:
    """The header's column for one quantity: ``given`` if set, else the first alias present.

    Matching ignores case and surrounding spaces, and takes inner spaces and hyphens for underscores
    (``Loss`` and ``loss `` are ``loss``, ``Model Size`` is ``model_size``); an exact match wins when a
    header has both. ``given`` must be there: a name the user typed that is
    missing is an error, never a silent fallback to an alias. With no alias present the
    column is optional (None) unless ``what`` names it, then ``error`` says what was looked for.
    Shared by the pilot-run tables here and the loss-curve CSVs of :mod:`scalewatch.curves`.

    Example:
        >>> pick_column(["Step", "LR", "Loss"], ("loss", "val_loss"))
        'Loss'
        >>> pick_column(["Model Size", "Training Tokens"], ("model_size",))
        'Model Size'
        >>> pick_column(["step", "loss"], ("lr",)) is None
        True
        >>> pick_column(["step", "loss"], ("lr",), what="learning-rate", where="run.csv")
        Traceback (most recent call last):
        ...
        scalewatch.fitting.FitError: run.csv: no learning-rate column (looked for lr); columns are step, loss
    """
    prefix = f"{where}: " if where else ""
    lower = {_norm(h): h for h in reversed(header)}  # reversed: the first of equal names wins
    if given:
        if given in header:
            return given
        if _norm(given) in lower:
            return lower[_norm(given)]
        raise error(f"{prefix}column {given!r} not found; columns are {', '.join(header)}")
    for alias in aliases:
        if alias in header:
            return alias
        if _norm(alias) in lower:
            return lower[_norm(alias)]
    if what is None:
        return None
    raise error(f"{prefix}no {what} column (looked for {', '.join(aliases)}); columns are {', '.join(header)}")


def parse_where(where: Sequence[str], error: type[Exception] = FitError) -> list[tuple[str, str]]:
    """``--where COL=VALUE`` filters as ``(column, value)`` pairs.

    Example:
        >>> parse_where(["dataset = c4", "run=a=b"])
        [('dataset', 'c4'), ('run', 'a=b')]
    """
    out = []
    for f in where:
        if "=" not in f:
            raise error(f"filter {f!r} must look like column=value")
        k, v = f.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def no_rows_left(rows: Sequence[Mapping[str, Any]], filters: Sequence[tuple[str, str]], what: str = "rows") -> str:
    """Why ``filters`` kept none of ``rows``: the first filter whose value the column never holds, with the
    values it does hold (up to 8), else that the filters hold only apart.

    Example:
        >>> no_rows_left([{"dataset": "c4_original"}, {"dataset": "rpj"}], [("dataset", "c4")])
        "no rows left after the filters: no row has dataset='c4'; dataset holds 'c4_original', 'rpj'"
    """
    for k, v in filters:
        values = list(dict.fromkeys(str(r.get(k)) for r in rows))
        if v not in values:
            shown = ", ".join(repr(x) for x in values[:8]) + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")
            return f"no {what} left after the filters: no row has {k}={v!r}; {k} holds {shown}"
    return (f"no {what} left after the filters: each of {', '.join(f'{k}={v}' for k, v in filters)} matches rows, "
            "but no row matches them all")


# The units check (warnings, never errors: toy models exist, e.g. the 1,056-parameter TinyLM of tests/helpers.py).
# A sweep whose LARGEST model has fewer than 1e5 parameters, or whose longest run saw fewer than 1e5 tokens, is
# what a table in millions or billions looks like (Chinchilla's sizes in millions are 125..8.9e4, Pythia's in
# billions 0.07..12). The repo's own pilots (examples/laws/pilots.csv) are 124,672..1,298,880 parameters and
# 307,200..2,457,600 tokens, so their largest is 13x and 25x clear; the public sets in ../shared/data are
# 7e6+ parameters and 5e7+ tokens. Every run with fewer tokens than parameters is the other sign of D in
# billions (or of N in a smaller unit than D): real sweeps have some such runs (the example pilots 36%, the
# Chinchilla IsoFLOP profiles 40%), never all of them.
UNITS_MIN_LARGEST_N = 1e5
UNITS_MIN_LONGEST_D = 1e5


def _span(lo: float, hi: float) -> str:
    f = (lambda x: f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}")
    return f(lo) if lo == hi else f"{f(lo)}–{f(hi)}"


def unit_warnings(n_range: Sequence[float] | None, d_range: Sequence[float] | None = None,
                  every_d_below_n: bool | None = None) -> list[str]:
    """What in N (parameters) and D (tokens) looks like millions or billions rather than counts: one line each.

    ``n_range``, ``d_range``: (smallest, largest); ``every_d_below_n``: whether every run had fewer tokens
    than parameters (None: judged from the ranges, D's largest below N's smallest). Thresholds: see
    :data:`UNITS_MIN_LARGEST_N`.

    Example:
        >>> unit_warnings((0.07, 1.0))
        ['N values 0.07–1 look like billions or millions of parameters (the largest model has fewer than 1e5): give N as a parameter count (e.g. 7e+07, not 0.07)']
        >>> unit_warnings((1.2e5, 1.3e6), (3e5, 2.5e6), every_d_below_n=False)
        []
        >>> unit_warnings((1e8, 7e9), (0.25, 179.0))[0][:60]
        'D values 0.25–179 look like billions or millions of tokens ('
    """
    out = []
    if n_range is not None and 0 < n_range[1] < UNITS_MIN_LARGEST_N:
        lo, hi = n_range
        unit = 1e9 if hi < 1e3 else 1e6
        out.append(f"N values {_span(lo, hi)} look like {'billions or millions' if unit == 1e9 else 'millions'} "
                   f"of parameters (the largest model has fewer than 1e5): give N as a parameter count "
                   f"(e.g. {lo * unit:.3g}, not {lo:.3g})")
    if d_range is not None and d_range[1] > 0:
        lo, hi = d_range
        below = every_d_below_n if every_d_below_n is not None else (n_range is not None and hi < n_range[0])
        if hi < UNITS_MIN_LONGEST_D or below:
            why = ("the longest run saw fewer than 1e5" if hi < UNITS_MIN_LONGEST_D else
                   "every run has fewer tokens than parameters")
            out.append(f"D values {_span(lo, hi)} look like billions or millions of tokens ({why}): give D as a "
                       "token count (e.g. 8e9, not 8)")
    return out


def param_label(n: float) -> str:
    """A parameter count as people write it, with the exact count: ``1.3B (1,298,880,000)`` (B, not SI's G).

    Example:
        >>> param_label(1e9), param_label(124672), param_label(1056), param_label(500)
        ('1B (1,000,000,000)', '125k (124,672)', '1.06k (1,056)', '500')
    """
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix} ({n:,.0f})"
    return f"{n:.3g}"


def _number(row: Mapping[str, Any], col: str, where: str) -> float:
    value = row.get(col)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FitError(f"{where}: {col}={value!r} is not a number") from None


def read_runs(paths: Sequence[str | Path], loss_column: str | None = None,
              where: Sequence[str] = (), min_runs: int = 1, columns: Mapping[str, str | None] | None = None) -> RunSet:
    """Read pilot runs from CSV/JSON files into a validated :class:`~scalewatch.fitting.RunSet`.

    Args:
        paths: files to read and concatenate.
        loss_column: the loss column, when it is not one of the aliases.
        where: filters ``column=value`` (rows kept where all hold), e.g. ``val_data=c4_val``.
        columns: the column of a quantity (``"N"``, ``"D"``, ``"C"``, ``"U"``) when it is not one of the aliases.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "runs.csv")
        >>> _ = open(p, "w").write("params,tokens,loss\\n1e8,2e9,3.1\\n2e8,4e9,2.9\\n")
        >>> read_runs([p]).L
        array([3.1, 2.9])
    """
    filters = parse_where(where)
    N, D, L, U, names = [], [], [], [], []
    seen: list[Mapping[str, Any]] = []
    has_u = True
    for path in map(Path, paths):
        rows = _rows(path)
        if not rows:
            raise FitError(f"{path}: no runs in the file")
        header = list(rows[0].keys())
        given = {**(columns or {}), "loss": loss_column}
        cols = {k: pick_column(header, ALIASES[k], where=str(path), given=given.get(k)) for k in ALIASES}
        missing = [k for k in ("N", "loss") if cols[k] is None]
        if cols["D"] is None and cols["C"] is None:
            missing.append("D (or compute C)")
        if missing:
            hint = "; name the column with " + ", ".join(
                {"N": "--n-column", "loss": "--loss-column"}.get(k, "--tokens-column (or --flops-column)")
                for k in missing)
            if (cols["N"] is None or cols["D"] is None) and pick_column(header, ("step", "_step", "global_step")):
                hint = "; this looks like a loss curve (a step column): use `scalewatch fit --curves FILE`"
            raise FitError(f"{path}: missing column(s) {', '.join(missing)}; columns are {', '.join(header)} "
                           f"(see `scalewatch fit --help` for accepted names){hint}")
        for k, _ in filters:
            if k not in header:
                raise FitError(f"{path}: filter column {k!r} not found; columns are {', '.join(header)}")
        has_u = has_u and cols["U"] is not None
        seen.extend(rows)
        for i, row in enumerate(rows, start=2 if path.suffix.lower() != ".json" else 1):
            if any(str(row.get(k)) != v for k, v in filters):
                continue
            where_ = f"{path.name}:{i}"
            n = _number(row, cols["N"], where_)
            d = _number(row, cols["D"], where_) if cols["D"] else _number(row, cols["C"], where_) / (6 * n)
            N.append(n)
            D.append(d)
            L.append(_number(row, cols["loss"], where_))
            if cols["U"] is not None:
                U.append(_number(row, cols["U"], where_))
            label = row.get(cols["name"]) if cols["name"] else None
            names.append(f"{where_}" + (f" ({label})" if label else ""))
    if not L:
        raise FitError(no_rows_left(seen, filters, "runs") if filters else "no runs found")
    distinct = len(set(zip(N, D, strict=True)))
    if distinct < len(L):
        warnings.warn(f"{len(L)} rows but only {distinct} distinct (N, D): several runs share a size and token "
                      "count (different data, validation sets or LR schedules?); filter with --where COL=VALUE",
                      stacklevel=2)
    runs = make_runs(N, D, L, U if has_u and U else None, names, min_runs=min_runs)
    for message in unit_warnings((float(runs.N.min()), float(runs.N.max())), (float(runs.D.min()), float(runs.D.max())),
                                 every_d_below_n=bool(np.all(runs.D < runs.N))):
        warnings.warn(message, stacklevel=2)
    return runs
