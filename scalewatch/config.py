"""ScaleWatch's configuration: one validated record, and ``build_monitor`` that turns it into a pipeline.

Importing this module does not import torch or Lightning, so ``ScaleWatchConfigError`` and the
configuration can be used by the command line and by ``scalewatch watch`` without paying for them.
The Lightning callback, ``watch`` and a plain training loop all build their Monitor here.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalewatch.detectors import HealthConfig

if TYPE_CHECKING:
    from scalewatch.curves import CurveLaw
    from scalewatch.monitor import Monitor, Sink

FLOP_MODES = ("6N", "6N+attn", "measured")
PARAM_CONVENTIONS = ("total", "non_embedding")
GNS_MODES = ("auto", "ddp", "accumulation", "per_example", "per_example_norm", "off")


class ScaleWatchConfigError(ValueError):
    """A configuration or input that scalewatch cannot work with; the message names the fix."""


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ScaleWatchConfigError(f"scalewatch: {name} must be a positive int, got {value!r}")


@dataclass
class ScaleWatchConfig:
    """Everything ScaleWatch is told, validated once when it is made: the arguments of
    :class:`~scalewatch.callback.ScaleWatch`, of ``scalewatch watch`` and of :func:`build_monitor`.

    A curve law given as a path is read here, so a malformed law file fails at construction.

    Args:
        tokens_fn: ``tokens_fn(batch) -> int | integer tensor`` overrides token counting
            (default: read ``[B, T]`` ids, a dict with ``input_ids`` / ``attention_mask`` /
            ``labels``, or a tuple holding the ids).
        samples_fn: ``samples_fn(batch) -> int`` overrides the sequence count.
        n_params: N to use instead of counting the module's trainable parameters.
        param_convention: ``"total"`` (Chinchilla: all trainable parameters) or
            ``"non_embedding"`` (Kaplan).
        flops: ``"6N"`` (default), ``"6N+attn"`` (adds ``12·n_layer·d_model·T``, the
            PaLM/nanoGPT convention, T = the batch's sequence length or ``context_length``),
            ``"measured"`` (``torch.utils.flop_counter.FlopCounterMode`` over the first
            training batch, forward and backward), or a number of FLOPs per token.
        n_layer, d_model: architecture for ``"6N+attn"``; inferred from common attribute
            names (``n_layer``, ``num_hidden_layers``, ``n_embd``, ``hidden_size``, ... on the
            module or its ``config``/``hparams``) when not given.
        context_length: fixed attention context for ``"6N+attn"`` instead of the batch's.
        peak_flops: peak FLOP/s of ONE device, for MFU; default: Lightning's table for the
            device and precision (none for CPUs, then MFU is not logged).
        log_every_n_steps: optimizer steps between log points (default: the trainer's).
        loss_key: name under which the module logs its training loss, used when
            ``training_step`` returns no loss (default: tries ``train_loss``, ``loss``, ...).
        history_size: observations kept in the bounded history.
        gns: gradient noise scale capture. ``"auto"`` (default) uses what the training
            already computes: under DDP each rank's local gradient before the all-reduce
            against the global one, under gradient accumulation each micro-batch's gradient
            against the step's; with neither it says so once and logs no noise scale.
            ``"per_example"`` (single device, no accumulation, opt-in: extra compute, about
            +30% step time on the example GPT on CPU) takes per-example gradient norms of the
            Linear/LayerNorm/RMSNorm weights; ``"per_example_norm"`` of the LayerNorm/RMSNorm
            weights only (Gray et al.: they track the whole model's noise scale), far cheaper.
            ``"ddp"`` / ``"accumulation"`` insist on one method; ``"off"`` disables it.
            Logged under ``scalewatch/gns/``: ``b_simple`` (sequences), ``b_simple_tokens``,
            ``b_crit`` (tokens), ``batch_size``, ``batch_tokens``, ``steps_factor``,
            ``compute_factor``, ``g2``, ``trace`` and ``b_crit_kaplan_ref``.
        gns_decay: EMA decay per optimizer step of the noise-scale estimates.
        curve_law: a curve-law file from ``scalewatch fit --curves --out`` (or a
            :class:`~scalewatch.curves.CurveLaw`): logs ``loss_pred`` with ``loss_pred_low`` /
            ``loss_pred_high`` (90% band), ``loss_residual`` (in units of the band's
            half-width), ``loss_forecast_final`` with its band, and a TensorBoard
            custom-scalars chart of the live loss inside the predicted band.
        schedule: the run's LR per optimizer step for the prediction (a sequence, a
            ``step,lr`` CSV path, a description such as ``"cosine:peak=3e-4,warmup=2000,final=0.1"``
            (:func:`~scalewatch.curves.schedule_from_spec`), or ``fn(step) -> lr``). Default: the configured LR
            scheduler evaluated ahead on a copy (training state untouched).
        forecast_in_background: run the final-loss forecast (a small fit, milliseconds) on a
            worker thread, off the training loop; each log point then reports the latest
            finished forecast and the step it was based on (``loss_forecast_at_step``).
        alerts_jsonl: also append every alert (firing / resolved) to this JSON-lines file.
        detect: run the run-health detectors (non-finite values, loss and gradient-norm spikes,
            divergence, saturation, off-curve, under/over-training, batch size); see the README.
        health: their thresholds (:class:`~scalewatch.detectors.HealthConfig`).
        law: a Chinchilla law file (``scalewatch fit --out``) for the compute-optimal tokens per
            parameter and the losses in the ``undertrained`` alert (default: about 20 tokens/param).
        unique_tokens: distinct tokens in the training data, to flag more than ~4 epochs of repetition.
        stop_on: ``"critical"`` (or ``"warning"``) stops training cleanly, all ranks together, once an
            alert of that severity fires.
        webhook_url: a Slack-compatible webhook for alerts (default: ``SCALEWATCH_WEBHOOK_URL``); sent
            from a background thread, never written anywhere.
        run_name: the run's name in alerts. The callback, given none, takes its trainer's logger's
            ``name/version`` (e.g. ``tiny_gpt/version_0``), or ``"run"`` without a logger.

    Example:
        >>> ScaleWatchConfig(flops="6N+attn", n_layer=12, d_model=768).flops
        '6N+attn'
        >>> ScaleWatchConfig(flops="7N")
        Traceback (most recent call last):
        ...
        scalewatch.config.ScaleWatchConfigError: scalewatch: flops must be one of ('6N', '6N+attn', 'measured') \
or a positive number of FLOPs per token, got '7N'
    """

    tokens_fn: Callable[[Any], Any] | None = None
    samples_fn: Callable[[Any], int] | None = None
    n_params: int | None = None
    param_convention: str = "total"
    flops: str | float = "6N"
    n_layer: int | None = None
    d_model: int | None = None
    context_length: int | None = None
    peak_flops: float | None = None
    log_every_n_steps: int | None = None
    loss_key: str | None = None
    history_size: int = 2048
    gns: str = "auto"
    gns_decay: float = 0.99
    curve_law: CurveLaw | None = None
    schedule: Sequence[float] | str | Path | Callable[[int], float] | None = None
    forecast_in_background: bool = True
    run_name: str = "run"
    alerts_jsonl: str | Path | None = None
    detect: bool = True
    health: HealthConfig | None = None
    law: Any = None
    unique_tokens: float | None = None
    stop_on: str | None = None
    webhook_url: str | None = None

    def __post_init__(self) -> None:
        # YAML 1.1 (PyYAML, so SCALEWATCH_CONFIG files) reads 2e10 as the string "2e10": take numbers
        # written that way as the numbers they are, so that a config file says what the user meant.
        for name in ("n_params", "peak_flops", "unique_tokens", "gns_decay", "flops", "n_layer", "d_model",
                     "context_length", "log_every_n_steps", "history_size"):
            setattr(self, name, _number_from_text(getattr(self, name), integral=name not in _FLOAT_FIELDS))
        n = self.n_params
        if isinstance(n, float) and n.is_integer():  # 1e9 written as a float is the count it says
            n = self.n_params = int(n)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ScaleWatchConfigError(f"scalewatch: n_params must be a positive int, got {n!r}; "
                                        "leave it out to count the module's trainable parameters")
        if self.param_convention not in PARAM_CONVENTIONS:
            raise ScaleWatchConfigError(f"scalewatch: param_convention must be one of {PARAM_CONVENTIONS}, "
                                        f"got {self.param_convention!r}")
        f = self.flops
        bad_number = not isinstance(f, str) and (isinstance(f, bool) or not isinstance(f, (int, float))
                                                 or not (f > 0) or math.isinf(f))
        if (isinstance(f, str) and f not in FLOP_MODES) or bad_number:
            raise ScaleWatchConfigError(f"scalewatch: flops must be one of {FLOP_MODES} or a positive number of "
                                        f"FLOPs per token, got {f!r}")
        for name in ("n_layer", "d_model", "context_length", "log_every_n_steps"):
            _positive_int(name, getattr(self, name))
        if self.gns is None:
            self.gns = "off"
        if self.gns not in GNS_MODES:
            raise ScaleWatchConfigError(f"scalewatch: gns must be one of {GNS_MODES}, got {self.gns!r}")
        d = self.gns_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d < 1):
            raise ScaleWatchConfigError(f"scalewatch: gns_decay must be in (0, 1), e.g. 0.99, got {d!r}")
        self.gns_decay = float(d)
        pf = self.peak_flops
        if pf is not None and (isinstance(pf, bool) or not isinstance(pf, (int, float)) or not pf > 0):
            raise ScaleWatchConfigError(f"scalewatch: peak_flops must be positive FLOP/s, got {self.peak_flops!r}")
        if isinstance(self.history_size, bool) or not isinstance(self.history_size, int) or self.history_size < 4:
            raise ScaleWatchConfigError(f"scalewatch: history_size must be an int >= 4, got {self.history_size!r}")
        from scalewatch.curves import CurveError, is_schedule_spec, schedule_from_spec

        if is_schedule_spec(self.schedule) and not Path(self.schedule).is_file():
            try:  # checked now (with a stand-in length) so that a typo fails here, not at the first step
                schedule_from_spec(self.schedule, 10)
            except CurveError as exc:
                raise ScaleWatchConfigError(f"scalewatch: {exc}") from None
        elif isinstance(self.schedule, (str, Path)) and not Path(self.schedule).is_file():
            raise ScaleWatchConfigError(f"scalewatch: schedule: no file {str(self.schedule)!r}; give a step,lr CSV, "
                                        "a description such as 'cosine:peak=3e-4,warmup=2000,final=0.1', "
                                        "a list of LRs per step, or a function of the step (or leave it out to "
                                        "read the run's own LR scheduler)")
        self.curve_law = _load_curve_law(self.curve_law)
        self.law = _load_law(self.law)
        if self.health is None:
            self.health = HealthConfig()
        elif isinstance(self.health, dict):
            self.health = HealthConfig(**self.health)
        if self.stop_on not in (None, "warning", "critical"):
            raise ScaleWatchConfigError(f"scalewatch: stop_on must be None, 'warning' or 'critical', got "
                                        f"{self.stop_on!r}")
        if self.unique_tokens is not None and (isinstance(self.unique_tokens, bool) or
                                               not isinstance(self.unique_tokens, (int, float))
                                               or not self.unique_tokens > 0):
            raise ScaleWatchConfigError(f"scalewatch: unique_tokens must be a positive number of tokens, got "
                                        f"{self.unique_tokens!r}")


_FLOAT_FIELDS = ("peak_flops", "unique_tokens", "gns_decay", "flops")


def _number_from_text(value: Any, integral: bool) -> Any:
    """``"2e10"`` -> ``2e10`` (``"1.2e9"`` -> ``1200000000`` for a count); anything else as it was.

    Example:
        >>> _number_from_text("2e10", integral=False), _number_from_text("1.2e9", integral=True)
        (20000000000.0, 1200000000)
        >>> _number_from_text("6N+attn", integral=False)
        '6N+attn'
    """
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if integral:
        return int(number) if number.is_integer() else value
    return number


def _load_law(law: Any) -> Any:
    """A Chinchilla-style law: a law object, or a law file from ``scalewatch fit --out``."""
    from scalewatch.laws import LawFileError, load_law

    if law is None or hasattr(law, "predict"):
        return law
    try:
        return load_law(law).law
    except LawFileError as exc:
        raise ScaleWatchConfigError(f"scalewatch: law: {exc}") from None


def _load_curve_law(law: Any) -> CurveLaw | None:
    from scalewatch.curves import CurveLaw, load_curve_law
    from scalewatch.laws import LawFileError

    if law is None or isinstance(law, CurveLaw):
        return law
    try:
        return load_curve_law(law)
    except LawFileError as exc:
        raise ScaleWatchConfigError(f"scalewatch: curve_law: {exc}") from None


_HELD_OUT_WORDS = {"val", "valid", "validation", "eval", "evaluation", "test", "heldout"}


def curve_law_warnings(law: CurveLaw, param_convention: str, n_params: int | None = None) -> list[str]:
    """What a user should know when this curve law is compared with this run's training loss.

    Example:
        >>> from scalewatch.curves import CurveLaw
        >>> law = CurveLaw({}, n_ref=1.0, conventions={"loss": "val_loss", "n_params": "total"})
        >>> [w.split(",")[0] for w in curve_law_warnings(law, "total")]
        ["the curve law predicts 'val_loss'"]
        >>> curve_law_warnings(CurveLaw({}, n_ref=1.0, conventions={"loss": "train loss per log interval"}), "total")
        []
        >>> curve_law_warnings(CurveLaw({}, n_ref=1.0, fitted_on={"sizes": [2.5e7]}), "total", n_params=137_000)[0][:60]
        'the curve law was fitted on one model size (N=2.5e+07) and p'
    """
    out = []
    law_loss = law.conventions.get("loss", "")
    # Whole words of the name ("val_loss", "eval/c4_en-validation/..."), not substrings: "log interval" is not "val".
    if set(re.split(r"[^a-z]+", law_loss.lower())) & _HELD_OUT_WORDS:
        out.append(f"the curve law predicts {law_loss!r}, a held-out loss, but scalewatch compares it with the "
                   "training loss; expect an offset, or fit the law on training-loss curves (e.g. the TensorBoard "
                   "directories of earlier ScaleWatch runs)")
    law_conv = law.conventions.get("n_params")
    if law_conv and law_conv != param_convention:
        out.append(f"the curve law was fitted with N counted as {law_conv!r}, this run counts N as "
                   f"{param_convention!r}; pass ScaleWatch(param_convention={law_conv!r}) or refit")
    size = size_warning(law, n_params)
    return out + ([size] if size else [])


def size_warning(law: CurveLaw, n_params: float | None) -> str | None:
    """What to say when a curve law is asked about a model size its pilots did not cover, else None.

    A one-size law has no N-dependence (it predicts its pilots' curve for any model); a law of several
    sizes widens its band outside them, but far outside its prediction means little.

    Example:
        >>> from scalewatch.curves import CurveLaw
        >>> size_warning(CurveLaw({}, n_ref=1e8, n_range=(1e8, 4e8)), 8.4e5)[:34]
        'N=8.4e+05 is outside the curve law'
    """
    if not n_params:
        return None
    if law.n_range is None:
        sizes = [float(n) for n in (law.fitted_on.get("sizes") or []) if n]
        if not sizes:
            return (f"the curve law was fitted on curves of one model size, not recorded: it predicts that size's "
                    f"loss whatever this run's N ({n_params:,.0f}); fit it on pilots of 2+ sizes with their n_params")
        if not 2 / 3 <= n_params / sizes[0] <= 1.5:
            return (f"the curve law was fitted on one model size (N={sizes[0]:.3g}) and predicts that size's loss "
                    f"for this run's N={n_params:.3g}; fit it on pilots of 2+ sizes around this one")
        return None
    lo, hi = law.n_range
    if lo <= n_params <= hi:
        return None
    out = max(math.log(lo / n_params), math.log(n_params / hi))
    return (f"N={n_params:.3g} is outside the curve law's pilot sizes {lo:.3g}..{hi:.3g} ({math.exp(out):.1f}x "
            "beyond): its band widens with the distance, "
            + ("but this far out its prediction means little; fit it on pilots nearer this size" if out > math.log(10)
               else "and its prediction is an extrapolation"))


#: The laws' formulas, as the text tab shows them.
CHINCHILLA_FORMULA = "L(N, D) = E + A/N^alpha + B/D^beta"
CURVE_FORMULA = "L(step) = L0 + A*S1^-alpha - C*S2"
# Law-file entries that are formulas or commands: shown as code spans, as typed.
_CODE_KEYS = ("flops", "law", "command", "fit_command")


def _code(text: Any) -> str:
    """A Markdown code span: shown verbatim (no italics from ``*`` or ``_``), in a fixed-width font."""
    return "`" + str(text).replace("`", "'") + "`"


def _entries(mapping: dict[str, Any]) -> str:
    """``key: value; ...`` of a law's conventions or provenance, formulas and commands as code spans;
    lists and nested records are left out (the law file has them)."""
    items = [f"{k}: {_code(v) if k in _CODE_KEYS else v}" for k, v in mapping.items()
             if not isinstance(v, (list, dict))]
    return "; ".join(items) or "not recorded"


def describe_laws(curve_law: Any, law: Any) -> str:
    """The laws a run is compared with, and what they were fitted on, for TensorBoard's text tab (Markdown).

    Formulas, parameter values and the commands that made a law are code spans, so TensorBoard's
    Markdown shows them as typed (``scalewatch.tensorboard.md_escape`` leaves code spans alone).

    Example:
        >>> from scalewatch.laws import ChinchillaLaw
        >>> print(describe_laws(None, ChinchillaLaw.epoch_refit()).splitlines()[0])
        Chinchilla law `L(N, D) = E + A/N^alpha + B/D^beta` with `E=1.817, A=482, B=2085, alpha=0.348, beta=0.366`
    """
    blocks = []
    if law is not None:
        params = ", ".join(f"{k}={v:.4g}" for k, v in law.params().items())
        formula = CHINCHILLA_FORMULA if getattr(law, "family", "") == "chinchilla" else getattr(law, "family", "law")
        blocks.append(f"Chinchilla law {_code(formula)} with {_code(params)}\n\n"
                      f"- conventions: {_entries(getattr(law, 'conventions', {}) or {})}")
    if curve_law is not None:
        fitted = dict(curve_law.fitted_on)
        if isinstance(fitted.get("curves"), list):
            fitted = {"curves": len(fitted["curves"]), **{k: v for k, v in fitted.items() if k != "curves"}}
        if fitted.get("sizes"):
            fitted["sizes"] = ", ".join(f"{n:.3g}" for n in fitted["sizes"])
        from scalewatch.curves import FORM_FLOOR, law_form

        m = curve_law.at(curve_law.n_ref)
        coef = f"L0={m.L0:.4g}, A={m.A:.4g}, alpha={m.alpha:.4g}, C={m.C:.4g}"
        if curve_law.n_range is None:
            in_n = "(one size: no N-dependence)"
        elif law_form(curve_law.coef) == FORM_FLOOR:
            e, beta = curve_law.coef["E"][0], curve_law.coef["beta"][0]
            in_n = (f"(L0 = E + B·(N/n_ref)^-beta with {_code(f'E={e:.4g}, beta={beta:.3g}')}; A, alpha, C linear "
                    "in ln N)")
        else:
            in_n = "(each linear in ln N)"
        blocks.append(f"Curve law ({curve_law.family}) {_code(CURVE_FORMULA)} with {_code(coef)} at "
                      f"{_code(f'N={curve_law.n_ref:.4g}')} {in_n}, 90% band ±{curve_law.band_rel:.2%}"
                      f"\n\n- fitted on: {_entries(fitted)}\n- conventions: {_entries(curve_law.conventions)}")
    return "\n\n".join(blocks) if blocks else "No law given: the undertraining check uses ~20 tokens per parameter."


def build_monitor(config: ScaleWatchConfig, n_params: int | None = None, peak_flops: float | None = None,
                  sinks: Iterable[Sink] = (), stages: Iterable[Any] = (), total_steps: int | None = None) -> Monitor:
    """The Monitor this configuration asks for: forecasters (noise scale, curve law), then ``stages``, then sinks.

    The same call serves the Lightning callback, ``scalewatch watch`` and a plain training loop.
    The curve law needs the run's LR at every step: ``config.schedule`` (a sequence or a ``step,lr``
    CSV; a function of the step with ``total_steps``); one it cannot use is logged, and the rest works.
    The Lightning callback reads it from the trainer's scheduler instead when none is given.

    Example:
        >>> m = build_monitor(ScaleWatchConfig(gns="off", detect=False), n_params=1000)
        >>> [s.name for s in m.stages]
        []
        >>> [s.name for s in build_monitor(ScaleWatchConfig()).stages]
        ['gns', 'nonfinite', 'spike', 'grad_spike', 'divergence', 'saturation', 'off_curve', 'allocation', 'batch_size']
    """
    from scalewatch.alerts import JsonlSink
    from scalewatch.gns import NoiseScalePlugin
    from scalewatch.monitor import Monitor

    plugins: list[Any] = [NoiseScalePlugin()] if config.gns != "off" else []
    if config.curve_law is not None:
        from scalewatch.forecast import CurvePlugin

        from scalewatch.curves import CurveError, schedule_from_arg

        plugin = CurvePlugin(config.curve_law, n_params=n_params, background=config.forecast_in_background)
        if config.schedule is not None and (total_steps is not None or not callable(config.schedule)):
            try:
                plugin.set_schedule(schedule_from_arg(config.schedule, total_steps or 0))
            except CurveError as exc:  # as in the callback: no predicted curve, everything else works
                logging.getLogger("scalewatch").warning("scalewatch: no predicted curve: %s", exc)
        plugins.append(plugin)
    if config.detect:
        from scalewatch.detectors import default_detectors

        plugins.extend(default_detectors(config.health, total_steps, config.law, config.unique_tokens))
    plugins.extend(stages)
    all_sinks = list(sinks)
    if config.alerts_jsonl is not None:
        all_sinks.append(JsonlSink(config.alerts_jsonl))
    if config.webhook_url is not None or os.environ.get("SCALEWATCH_WEBHOOK_URL"):
        from scalewatch.webhook import WebhookSink

        all_sinks.append(WebhookSink(config.webhook_url, run=config.run_name))
    return Monitor(n_params=n_params, peak_flops=peak_flops, history_size=config.history_size, plugins=plugins,
                   sinks=all_sinks, run=config.run_name)
