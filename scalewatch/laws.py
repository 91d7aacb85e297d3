"""Scaling-law families, law files, and compute-optimal planning.

Pure numpy/scipy. A law is a small frozen dataclass with ``predict`` and the
conventions it assumes (how N is counted, what the loss is). Law files are
JSON (never pickle) with a schema version, the family, the parameters, their
uncertainty, what the law was fitted on and the conventions.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
from numpy.typing import ArrayLike

SCHEMA = "scalewatch.law"
SCHEMA_VERSION = 1

ArrayOrFloat = Union[float, np.ndarray]


class LawFileError(ValueError):
    """A law file that cannot be used; the message is one line that names the fix."""


class PlanningError(ValueError):
    """A planning question the law cannot answer (e.g. a loss below the law's floor)."""


def _default_conventions() -> dict[str, str]:
    return {
        "n_params": "total",  # all trainable parameters incl. embeddings (Chinchilla)
        "tokens": "training tokens",
        "loss": "nats/token, held-out loss of the recipe it was fitted on",
        "flops": "C = 6*N*D",
    }


@dataclass(frozen=True)
class ChinchillaLaw:
    """Hoffmann et al. 2022: ``L(N, D) = E + A / N**alpha + B / D**beta``.

    Example:
        >>> law = ChinchillaLaw.epoch_refit()
        >>> round(float(law.predict(70e9, 1.4e12)), 3)
        1.973
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    conventions: dict[str, str] = field(default_factory=_default_conventions, compare=False)

    family: ClassVar[str] = "chinchilla"
    param_names: ClassVar[tuple[str, ...]] = ("E", "A", "B", "alpha", "beta")

    @classmethod
    def epoch_refit(cls) -> ChinchillaLaw:
        """Besiroglu et al. 2024's refit of Chinchilla (MassiveText; losses of another recipe differ)."""
        return cls(E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366,
                   conventions={**_default_conventions(), "source": "Epoch AI refit of Chinchilla "
                                "(Besiroglu et al. 2024, arXiv 2404.10102), MassiveText"})

    @classmethod
    def hoffmann(cls) -> ChinchillaLaw:
        """The constants published by Hoffmann et al. 2022 (fit known to have stopped early)."""
        return cls(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
                   conventions={**_default_conventions(), "source": "Hoffmann et al. 2022, MassiveText"})

    def predict(self, N: ArrayLike, D: ArrayLike) -> ArrayOrFloat:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def params(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.param_names}


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020 joint form: ``L = ((N_c/N)**(alpha_N/alpha_D) + D_c/D)**alpha_D``.

    N counts non-embedding parameters; loss in nats on WebText2 for the published constants.

    Example:
        >>> law = KaplanLaw.published()
        >>> bool(law.predict(1e9, 1e12) < law.predict(1e8, 1e12))
        True
    """

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float
    conventions: dict[str, str] = field(default_factory=lambda: {
        **_default_conventions(), "n_params": "non_embedding"}, compare=False)

    family: ClassVar[str] = "kaplan"
    param_names: ClassVar[tuple[str, ...]] = ("N_c", "D_c", "alpha_N", "alpha_D")

    @classmethod
    def published(cls) -> KaplanLaw:
        return cls(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095,
                   conventions={**_default_conventions(), "n_params": "non_embedding",
                                "loss": "nats/token on WebText2", "source": "Kaplan et al. 2020"})

    def predict(self, N: ArrayLike, D: ArrayLike) -> ArrayOrFloat:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return ((self.N_c / N) ** (self.alpha_N / self.alpha_D) + self.D_c / D) ** self.alpha_D

    def params(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.param_names}


def effective_repeats(unique: ArrayLike, total: ArrayLike, r_star: float) -> np.ndarray:
    """Muennighoff et al.: ``U + U·R*·(1 - exp(-R/R*))`` with ``R = total/U - 1`` repetitions.

    Example:
        >>> float(effective_repeats(100.0, 100.0, 15.4))  # one epoch: no repetition
        100.0
        >>> float(effective_repeats(100.0, 50.0, 15.4))  # half an epoch
        50.0
    """
    total = np.asarray(total, dtype=float)
    unique = np.minimum(np.asarray(unique, dtype=float), total)  # less than one epoch: all unique
    repeats = np.maximum(total / unique - 1.0, 0.0)
    return unique + unique * r_star * (1.0 - np.exp(-repeats / r_star))


@dataclass(frozen=True)
class DataConstrainedLaw:
    """Muennighoff et al. 2023: Chinchilla's form on effective data D' and parameters N'.

    ``D' = U_D + U_D·R_D*·(1 - exp(-R_D/R_D*))`` with ``R_D = D/U_D - 1`` epochs repeated;
    ``N' = U_N + U_N·R_N*·(1 - exp(-R_N/R_N*))`` with ``U_N = min(N, N_opt(U_D))``, the
    compute-optimal model size for the unique data, and ``R_N = N/U_N - 1``.

    Example:
        >>> law = DataConstrainedLaw.published()
        >>> fresh, repeated = law.predict(1e9, 40e9, unique=40e9), law.predict(1e9, 40e9, unique=10e9)
        >>> bool(repeated > fresh)
        True
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    R_D: float = 15.4
    R_N: float = 5.3
    conventions: dict[str, str] = field(default_factory=_default_conventions, compare=False)

    family: ClassVar[str] = "data_constrained"
    param_names: ClassVar[tuple[str, ...]] = ("E", "A", "B", "alpha", "beta", "R_D", "R_N")

    @classmethod
    def published(cls) -> DataConstrainedLaw:
        return cls(E=1.869, A=520.8, B=1487.7, alpha=0.353, beta=0.353, R_D=15.4, R_N=5.3,
                   conventions={**_default_conventions(), "loss": "C4 validation loss",
                                "source": "Muennighoff et al. 2023 (arXiv 2305.16264)"})

    @property
    def base(self) -> ChinchillaLaw:
        return ChinchillaLaw(self.E, self.A, self.B, self.alpha, self.beta, dict(self.conventions))

    def effective_tokens(self, D: ArrayLike, unique: ArrayLike) -> np.ndarray:
        return effective_repeats(unique, D, self.R_D)

    def effective_params(self, N: ArrayLike, unique: ArrayLike) -> np.ndarray:
        N = np.asarray(N, dtype=float)
        # U_N: the compute-optimal size for the unique data (D_opt = U), Chinchilla allocation
        n_for_unique = optimal_n_for_tokens(self.base, np.asarray(unique, dtype=float))
        u_n = np.minimum(N, n_for_unique)
        return effective_repeats(u_n, N, self.R_N)

    def predict(self, N: ArrayLike, D: ArrayLike, unique: ArrayLike | None = None) -> ArrayOrFloat:
        if unique is None:
            return self.base.predict(N, D)
        d_eff = self.effective_tokens(D, unique)
        n_eff = self.effective_params(N, unique)
        return self.E + self.A / n_eff**self.alpha + self.B / d_eff**self.beta

    def params(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.param_names}


Law = Union[ChinchillaLaw, KaplanLaw, DataConstrainedLaw]
FAMILIES: dict[str, type] = {c.family: c for c in (ChinchillaLaw, KaplanLaw, DataConstrainedLaw)}


# ------------------------------------------------------------------ law files
@dataclass
class LawRecord:
    """A law with what is known about it: the content of a law file.

    Attributes:
        law: the fitted law.
        ci95: parameter -> (low, high) 95% interval.
        samples: bootstrap parameter vectors (rows in ``law.param_names`` order), for
            propagating the uncertainty into plans and predictions.
        fitted_on: provenance (number of runs, ranges of N and D, fit quality, method).
        extrapolation: optional calibration of how the interval widens away from the pilots
            (:class:`scalewatch.extrapolation.ExtrapolationBand` as JSON); written under
            ``uncertainty.extrapolation``. Files without it load as before (no widening).
    """

    law: Law
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: list[list[float]] = field(default_factory=list)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    extrapolation: dict[str, Any] | None = None

    def extrapolation_band(self) -> Any:
        """The :class:`~scalewatch.extrapolation.ExtrapolationBand`, or None when the file has none."""
        if self.extrapolation is None:
            return None
        from scalewatch.extrapolation import ExtrapolationBand

        return ExtrapolationBand.from_json(self.extrapolation)

    def sample_laws(self) -> list[Law]:
        cls = type(self.law)
        return [cls(**dict(zip(cls.param_names, row)), conventions=dict(self.law.conventions))
                for row in self.samples]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "family": self.law.family,
            "params": self.law.params(),
            "uncertainty": {"ci95": {k: list(v) for k, v in self.ci95.items()},
                            "bootstrap_samples": self.samples,
                            **({"extrapolation": self.extrapolation} if self.extrapolation is not None else {})},
            "fitted_on": self.fitted_on,
            "conventions": dict(self.law.conventions),
        }


def save_law(record: LawRecord, path: str | Path) -> None:
    """Write a law file (JSON).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "law.json")
        >>> save_law(LawRecord(ChinchillaLaw.epoch_refit()), p)
        >>> load_law(p).law.alpha
        0.348
    """
    write_law_json(record.to_json(), path)


def write_law_json(doc: Mapping[str, Any], path: str | Path) -> None:
    """Write a law document as JSON; non-finite numbers are refused, never written as NaN."""
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_law_json(path: str | Path, how_to_write: str = "`scalewatch fit --out`") -> Any:
    """Parse a law file's JSON; an unreadable or invalid file raises :class:`LawFileError` naming the fix."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise LawFileError(f"{p}: cannot read law file ({exc.strerror}); give the path of a file written by "
                           "`scalewatch fit ... --out`") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LawFileError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg}); "
                           f"write it with {how_to_write}") from None


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_law_header(doc: Any, source: str = "law file", family: str | None = None,
                     how_to_write: str = "`scalewatch fit --out`", known: Collection[str] | None = None,
                     needed: str | None = None) -> Mapping[str, Any]:
    """Check a parsed law file's header (a JSON object, schema, version, family) and return it.

    Every kind of law file (the L(N, D) families here, curve laws in :mod:`scalewatch.curves`)
    starts with the same header, so it is checked in one place with one set of messages.

    Args:
        doc: the parsed JSON.
        source: what to call the file in messages (its path).
        family: the family needed here, or None for any.
        how_to_write: the command that writes a good file, named in the messages.
        known: when given, a family outside it is refused as unknown (checked before ``family``).
        needed: how to say the family needed in the wrong-family message (default ``a 'family' law``).

    Example:
        >>> doc = {"schema": SCHEMA, "version": SCHEMA_VERSION, "family": "kaplan"}
        >>> check_law_header(doc, family="kaplan")["family"]
        'kaplan'
        >>> try:
        ...     check_law_header(doc, "k.json", family="chinchilla")
        ... except LawFileError as exc:
        ...     print(str(exc).split(";")[0])
        k.json: this is a 'kaplan' law, but a 'chinchilla' law is needed here
    """
    if not isinstance(doc, Mapping):
        raise LawFileError(f"{source}: expected a JSON object, got {type(doc).__name__}; write it with {how_to_write}")
    if doc.get("schema") != SCHEMA:
        raise LawFileError(f"{source}: not a scalewatch law file (schema {doc.get('schema')!r}, "
                           f"expected {SCHEMA!r}); write it with {how_to_write}")
    if doc.get("version") != SCHEMA_VERSION:
        raise LawFileError(f"{source}: law file version {doc.get('version')!r} is not supported "
                           f"(this scalewatch reads version {SCHEMA_VERSION}); refit or upgrade scalewatch")
    fam = doc.get("family")
    if fam == "momentum_curve" and ((known is not None and fam not in known) or (family is not None and fam != family)):
        raise LawFileError(f"{source} is a curve law (L over steps): use it with `scalewatch predict --law` or "
                           "`scalewatch watch --curve-law`; here a law L(N, D) from `scalewatch fit` (Chinchilla) "
                           "is needed")
    if known is not None and fam not in known:
        raise LawFileError(f"{source}: unknown law family {fam!r}; expected one of {sorted(known)}")
    if family is not None and fam != family:
        raise LawFileError(f"{source}: this is a {fam!r} law, but {needed or f'a {family!r} law'} is needed here; "
                           f"write one with {how_to_write}")
    return doc


def law_from_json(doc: Any, source: str = "law file", family: str | None = None) -> LawRecord:
    """Validate a parsed law file; raise :class:`LawFileError` naming the problem."""
    doc = check_law_header(doc, source, family=family, known=FAMILIES)
    fam = doc["family"]
    cls = FAMILIES[fam]
    params = doc.get("params")
    if not isinstance(params, Mapping):
        raise LawFileError(f"{source}: 'params' must be an object with {list(cls.param_names)}")
    missing = [k for k in cls.param_names if k not in params]
    if missing:
        raise LawFileError(f"{source}: parameters {missing} missing for family {fam!r}")
    bad = [k for k in cls.param_names if not _finite_number(params[k])]
    if bad:
        raise LawFileError(f"{source}: parameters {bad} must be finite numbers")
    conventions = doc.get("conventions", {})
    if not isinstance(conventions, Mapping):
        raise LawFileError(f"{source}: 'conventions' must be an object")
    law = cls(**{k: float(params[k]) for k in cls.param_names},
              conventions={str(k): str(v) for k, v in conventions.items()})
    unc = doc.get("uncertainty", {}) or {}
    ci = {}
    for k, v in (unc.get("ci95", {}) or {}).items():
        if not (isinstance(v, Sequence) and len(v) == 2 and all(_finite_number(x) for x in v)):
            raise LawFileError(f"{source}: uncertainty.ci95.{k} must be [low, high]")
        ci[k] = (float(v[0]), float(v[1]))
    samples = unc.get("bootstrap_samples", []) or []
    if not all(isinstance(r, Sequence) and len(r) == len(cls.param_names) and all(_finite_number(x) for x in r)
               for r in samples):
        raise LawFileError(f"{source}: uncertainty.bootstrap_samples rows must hold {len(cls.param_names)} numbers")
    extrapolation = unc.get("extrapolation")
    if extrapolation is not None:
        from scalewatch.extrapolation import ExtrapolationBand

        ExtrapolationBand.from_json(extrapolation, source)  # validate now: one clear error at load time
        extrapolation = dict(extrapolation)
    return LawRecord(law=law, ci95=ci, samples=[list(map(float, r)) for r in samples],
                     fitted_on=dict(doc.get("fitted_on", {}) or {}), extrapolation=extrapolation)


def load_law(path: str | Path, family: str | None = None) -> LawRecord:
    """Read a law file. Malformed, unknown-version or wrong-family files raise :class:`LawFileError`."""
    return law_from_json(read_law_json(path), source=str(path), family=family)


# ------------------------------------------------------------------- planning
def _as_chinchilla(law: Law) -> ChinchillaLaw:
    if isinstance(law, ChinchillaLaw):
        return law
    if isinstance(law, DataConstrainedLaw):
        return law.base
    raise PlanningError(f"planning needs a Chinchilla-form law, got family {law.family!r}")


def optimal_allocation(law: Law, flops: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal ``(N, D)`` for a FLOP budget under ``C = 6·N·D`` (closed form).

    ``N_opt = G·(C/6)**(beta/(alpha+beta))``, ``G = (alpha·A/(beta·B))**(1/(alpha+beta))``.

    Example:
        >>> n, d = optimal_allocation(ChinchillaLaw.epoch_refit(), 1e21)
        >>> f"{float(n):.2e}", round(float(d / n), 1)
        ('2.78e+09', 21.6)
    """
    c = _as_chinchilla(law)
    flops = np.asarray(flops, dtype=float)
    s = c.alpha + c.beta
    G = (c.alpha * c.A / (c.beta * c.B)) ** (1.0 / s)
    n = G * (flops / 6.0) ** (c.beta / s)
    return n, flops / (6.0 * n)


def optimal_n_for_tokens(law: ChinchillaLaw, tokens: ArrayLike) -> np.ndarray:
    """The N whose compute-optimal D equals ``tokens`` (inverse of the allocation)."""
    s = law.alpha + law.beta
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / s)
    # D = (1/G)·(C/6)^(alpha/s) and N = G·(C/6)^(beta/s)  =>  N = G·(G·D)^(beta/alpha)
    return G * (G * np.asarray(tokens, dtype=float)) ** (law.beta / law.alpha)


def tokens_for_loss(law: Law, target_loss: float, n_params: ArrayLike) -> np.ndarray:
    """Training tokens a model of N parameters needs to reach ``target_loss``.

    Raises:
        PlanningError: the target is at or below what N can reach with infinite data.

    Example:
        >>> law = ChinchillaLaw.epoch_refit()
        >>> d = tokens_for_loss(law, 2.1, 7e9)
        >>> round(float(law.predict(7e9, d)), 6)
        2.1
    """
    c = _as_chinchilla(law)
    n = np.asarray(n_params, dtype=float)
    gap = target_loss - c.E - c.A / n**c.alpha
    if np.any(gap <= 0):
        floor = float(np.max(c.E + c.A / n**c.alpha))
        raise PlanningError(f"loss {target_loss} is out of reach for N={float(np.min(n)):.3g}: "
                            f"even infinite data gives {floor:.4f}; choose a larger model or a higher loss")
    return (c.B / gap) ** (1.0 / c.beta)


@dataclass
class InferencePlan:
    """Sardana & Frankle's optimum: least ``6·N·D_train + 2·N·D_inference`` at a target loss."""

    n_params: float
    train_tokens: float
    train_flops: float
    inference_flops: float
    chinchilla_n_params: float
    chinchilla_train_tokens: float
    chinchilla_total_flops: float

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops


def inference_optimal(law: Law, target_loss: float, inference_tokens: float) -> InferencePlan:
    """Smallest lifetime compute reaching ``target_loss`` when ``inference_tokens`` will be served.

    Example:
        >>> law = ChinchillaLaw.epoch_refit()
        >>> p = inference_optimal(law, 2.1, inference_tokens=2e13)
        >>> bool(p.n_params < p.chinchilla_n_params and p.total_flops < p.chinchilla_total_flops)
        True
    """
    from scipy.optimize import minimize_scalar

    c = _as_chinchilla(law)
    if target_loss <= c.E:
        raise PlanningError(f"target loss {target_loss} is at or below the law's floor E={c.E:.4f}")
    # Smallest N that can reach the target at all (D -> infinity).
    n_min = (c.A / (target_loss - c.E)) ** (1.0 / c.alpha)

    def total(log_n: float, d_inf: float) -> float:
        n = math.exp(log_n)
        return 6 * n * float(tokens_for_loss(c, target_loss, n)) + 2 * n * d_inf

    lo, hi = math.log(n_min) + 1e-6, math.log(n_min) + 30.0
    best = minimize_scalar(lambda x: total(x, inference_tokens), bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-9})
    chin = minimize_scalar(lambda x: total(x, 0.0), bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    n, n0 = math.exp(best.x), math.exp(chin.x)
    d, d0 = float(tokens_for_loss(c, target_loss, n)), float(tokens_for_loss(c, target_loss, n0))
    return InferencePlan(n_params=n, train_tokens=d, train_flops=6 * n * d, inference_flops=2 * n * inference_tokens,
                         chinchilla_n_params=n0, chinchilla_train_tokens=d0,
                         chinchilla_total_flops=6 * n0 * d0 + 2 * n0 * inference_tokens)


@dataclass
class DataConstrainedPlan:
    """Best allocation of a FLOP budget when only ``unique_tokens`` of data exist."""

    n_params: float
    train_tokens: float
    epochs: float
    effective_tokens: float
    loss: float
    unconstrained_loss: float
    value_of_next_epoch: float  # a further epoch's worth relative to fresh data
    worthwhile_epochs: float  # epochs until a further one is worth less than half of fresh data


def data_constrained_plan(law: Law, flops: float, unique_tokens: float) -> DataConstrainedPlan:
    """Allocate ``flops`` with ``unique_tokens`` of unique data (Muennighoff et al. 2023).

    With a plain Chinchilla law, the published R_D* = 15.4 and R_N* = 5.3 are used.

    Example:
        >>> p = data_constrained_plan(ChinchillaLaw.epoch_refit(), 1e22, unique_tokens=50e9)
        >>> bool(p.epochs > 1 and p.loss >= p.unconstrained_loss)
        True
    """
    from scipy.optimize import minimize_scalar

    if not (unique_tokens > 0):
        raise PlanningError(f"unique tokens must be positive, got {unique_tokens}")
    if isinstance(law, DataConstrainedLaw):
        dc = law
    else:
        c = _as_chinchilla(law)
        dc = DataConstrainedLaw(c.E, c.A, c.B, c.alpha, c.beta, conventions=dict(c.conventions))

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return float(dc.predict(n, flops / (6 * n), unique=unique_tokens))

    n0, _ = optimal_allocation(dc.base, flops)
    center = math.log(float(n0))
    res = minimize_scalar(loss_at, bounds=(center - 12, center + 6), method="bounded", options={"xatol": 1e-9})
    n = math.exp(res.x)
    d = flops / (6 * n)
    epochs = d / unique_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unconstrained = float(dc.base.predict(float(n0), flops / (6 * float(n0))))
    return DataConstrainedPlan(
        n_params=n, train_tokens=d, epochs=epochs,
        effective_tokens=float(dc.effective_tokens(d, unique_tokens)), loss=float(res.fun),
        unconstrained_loss=unconstrained,
        value_of_next_epoch=math.exp(-max(epochs - 1.0, 0.0) / dc.R_D),
        worthwhile_epochs=1.0 + dc.R_D * math.log(2.0),
    )


def interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan)
    q = (1 - level) / 2
    return float(np.quantile(arr, q)), float(np.quantile(arr, 1 - q))


__all__ = [
    "ChinchillaLaw", "KaplanLaw", "DataConstrainedLaw", "LawRecord", "LawFileError", "PlanningError",
    "save_law", "load_law", "law_from_json", "optimal_allocation", "tokens_for_loss", "inference_optimal",
    "data_constrained_plan", "InferencePlan", "DataConstrainedPlan", "effective_repeats", "interval",
]
