"""Everything TensorBoard: tag names, the custom-scalars layout, a sink that writes a Report, and a
reader that turns any TensorBoard event directory (ScaleWatch's own or another trainer's) into
:class:`~scalewatch.monitor.Observation` records, so offline replays go through the same Monitor.

Scalars are logged as ``scalewatch/<name>``, ``<name>`` being a key of ``Report.scalars``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scalewatch.monitor import Observation, Report

PREFIX = "scalewatch/"
#: Series whose step IS the token count / the compute in GFLOP (TensorBoard steps are int64).
LOSS_VS_TOKENS = PREFIX + "loss_vs_tokens"
LOSS_VS_GFLOP = PREFIX + "loss_vs_gflop"
CONVENTIONS_TEXT = PREFIX + "conventions"
GNS_METHOD_TEXT = PREFIX + "gns/method"

# Tag names other trainers use, most specific first (what `read_observations` and `watch` look for; the
# loss-curve readers of `fit --curves` take the same names for TensorBoard tags and CSV columns).
# No validation loss here: watch judges the training loss, and a held-out loss logged once an epoch is not it.
LOSS_TAGS = ("scalewatch/loss", "train/loss", "train_loss", "loss", "lm loss", "train/CE loss",
             "loss_metrics/global_avg_loss", "training_loss", "Loss/train")
LR_TAGS = ("scalewatch/lr", "lr", "train/lr", "learning_rate", "train/learning_rate", "lr-AdamW", "lr-Adam",
           "lr-SGD", "optim/LR (group 0)", "learning-rate", "optim/learning_rate_group0")
TOKEN_TAGS = ("scalewatch/tokens", "train/tokens", "tokens", "num_tokens", "throughput/total_tokens")

# The custom-scalars layout, in the order an on-call researcher reads it: health first (alert levels
# by kind), then the loss against its predicted band and forecast (runs with a curve law), the loss
# against tokens and compute, throughput, and the noise scale against the batch. Multiline tags are
# regular expressions: they are anchored, or "scalewatch/loss" would match every loss_* series.
HEALTH_LAYOUT = {
    "scalewatch 1 health": {
        "alerts by kind (0 ok, 1 info, 2 warning, 3 critical)": ["Multiline", [f"^{PREFIX}health/"]],
        "loss, largest micro-batch loss, gradient norm": [
            "Multiline", [f"^{PREFIX}(loss|loss_max|grad_norm|grad_norm_max)$"]],
    }
}
CURVE_LAYOUT = {
    "scalewatch 2 loss vs prediction": {
        "loss vs predicted curve (90% band)": [
            "Margin", [PREFIX + "loss", PREFIX + "loss_pred_low", PREFIX + "loss_pred_high"]],
        "final loss forecast (90% band)": [
            "Margin", [PREFIX + "loss_forecast_final", PREFIX + "loss_forecast_final_low",
                       PREFIX + "loss_forecast_final_high"]],
        "loss, predicted, forecast": [
            "Multiline", [f"^{PREFIX}(loss|loss_pred|loss_forecast_final)$"]],
    }
}
RUN_LAYOUT = {
    "scalewatch 3 tokens and compute": {
        "loss against tokens (x: tokens)": ["Multiline", [f"^{PREFIX}loss_vs_tokens$"]],
        "loss against compute (x: GFLOP)": ["Multiline", [f"^{PREFIX}loss_vs_gflop$"]],
        "tokens per parameter (vs the compute-optimal ratio in the alerts)": ["Multiline", [f"^{PREFIX}tokens_per_param$"]],
    },
    "scalewatch 4 throughput": {
        "tokens/s": ["Multiline", [f"^{PREFIX}tokens_per_sec$"]],
        "model FLOPs utilisation": ["Multiline", [f"^{PREFIX}mfu$"]],
    },
    "scalewatch 5 noise scale": {
        "critical batch vs batch (tokens)": ["Multiline", [f"^{PREFIX}gns/(b_crit|batch_tokens)$"]],
        "cost of this batch (x minimum compute, x minimum steps)": [
            "Multiline", [f"^{PREFIX}gns/(compute_factor|steps_factor)$"]],
    },
}


def layout(with_curve: bool) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for a run (the prediction's band charts only where a curve law predicts).

    Every run has every section, in the same order: TensorBoard merges the layouts of the runs in a logdir in the
    order it first meets each section, so a section only some runs had came last. Without a curve law the second
    section holds the loss alone (the chart that also shows the prediction and the forecast where there are).

    Example:
        >>> list(layout(with_curve=False))[:3]
        ['scalewatch 1 health', 'scalewatch 2 loss vs prediction', 'scalewatch 3 tokens and compute']
        >>> list(layout(with_curve=False)["scalewatch 2 loss vs prediction"])
        ['loss, predicted, forecast']
    """
    curve = CURVE_LAYOUT if with_curve else {
        title: {name: chart for name, chart in charts.items() if chart[0] == "Multiline"}
        for title, charts in CURVE_LAYOUT.items()}
    return {**HEALTH_LAYOUT, **curve, **RUN_LAYOUT}


def md_escape(text: str) -> str:
    r"""Plain text for TensorBoard's Markdown: ``*`` and ``_`` kept literal, code spans left as they are.

    Formulas and commands are written as code spans (between backticks), which Markdown shows
    verbatim in a fixed-width font; a backslash added inside one would be shown, so only the
    text between code spans is escaped. An unpaired backtick is text, and escaped.

    Example:
        >>> print(md_escape("FLOPs: `6*N + 12*n_layer*d_model*T` per token, n_layer=4"))
        FLOPs: `6*N + 12*n_layer*d_model*T` per token, n\_layer=4
        >>> print(md_escape("6*N, a ` alone"))
        6\*N, a \` alone
    """
    parts = text.split("`")  # even indices: plain text; odd: inside a code span
    unpaired = len(parts) % 2 == 0  # an odd number of backticks: the last one opens no span
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(part.replace("*", "\\*").replace("_", "\\_"))
        elif unpaired and i == len(parts) - 1:
            out.append("\\`" + part.replace("*", "\\*").replace("_", "\\_"))
        else:
            out.append(f"`{part}`")
    return "".join(out)


def tag(name: str) -> str:
    """The TensorBoard tag of a report scalar.

    Example:
        >>> tag("tokens"), tag("gns/b_crit")
        ('scalewatch/tokens', 'scalewatch/gns/b_crit')
    """
    return PREFIX + name


class SummaryWriterLike(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> Any: ...


class TensorBoardExtras:
    """What TensorBoard gets beyond the plain scalars: texts, the layout (once), the token/compute x-axis series."""

    def __init__(self) -> None:
        self.layout_written: bool | None = None  # None: not yet; False: without the curve charts; True: with

    def write(self, writer: Any, report: Report) -> None:
        obs = report.observation
        for name, text in report.texts.items():
            # TensorBoard renders text as Markdown: 6*N*D would turn into italics. The alert table is
            # Markdown already (its cells escaped by the alert book).
            writer.add_text(tag(name), text if name == "alerts" else md_escape(text), global_step=report.step)
        with_curve = "loss_pred" in report.scalars
        if self.layout_written in (None, False) and self.layout_written != with_curve \
                and hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(layout(with_curve))  # rewritten once if the prediction starts later
            self.layout_written = with_curve
        if obs is not None and "loss" in report.scalars:
            writer.add_scalar(LOSS_VS_TOKENS, obs.loss, global_step=obs.tokens)
            writer.add_scalar(LOSS_VS_GFLOP, obs.loss, global_step=obs.flops // 10**9)


class TensorBoardSink:
    """Writes each report to a ``SummaryWriter`` (a plain loop, ``scalewatch watch``).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from scalewatch.monitor import Monitor
        >>> logdir = tempfile.mkdtemp()
        >>> with SummaryWriter(logdir) as w:
        ...     m = Monitor(sinks=[TensorBoardSink(w)])
        ...     _ = m.observe(Observation(step=1, tokens=100, samples=1, flops=600, loss=3.0))
        >>> [o.loss for o in read_observations(logdir)]
        [3.0]
    """

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.extras = TensorBoardExtras()

    def write(self, report: Report) -> None:
        for name, value in report.scalars.items():
            self.writer.add_scalar(tag(name), value, global_step=report.step)
        self.extras.write(self.writer, report)


# ------------------------------------------------------------------ reading event files
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard event directory: tag -> [(step, value)], steps ascending.

    One value per step: where a step was written twice (a resumed run's later event file repeats the steps
    since its checkpoint), the one written last, as :class:`EventSource` (``scalewatch watch``) reads it.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()  # events in the order written: the files by name (their creation time), then within each
    return {t: sorted({int(e.step): e.value for e in ea.Scalars(t)}.items()) for t in ea.Tags().get("scalars", [])}


def find_tag(tags: Sequence[str], aliases: Sequence[str], given: str | None = None) -> str | None:
    """The tag to read: ``given`` if it exists, else the first alias present (case-insensitive); None if none.

    Example:
        >>> find_tag(["lm loss", "lr"], LOSS_TAGS), find_tag(["x"], LOSS_TAGS), find_tag(["Loss"], LOSS_TAGS)
        ('lm loss', None, 'Loss')
    """
    from scalewatch.data import pick_column

    try:
        return pick_column(tags, aliases, given=given, error=LookupError)
    except LookupError:
        return None


@dataclass
class Tags:
    """Which tag (or column) holds what; None where the log has none."""

    loss: str | None = None
    lr: str | None = None
    tokens: str | None = None


class EventSource:
    """A TensorBoard event directory read incrementally: call :meth:`poll` again to get what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaders: dict[Path, Any] = {}
        self._pending: dict[int, dict[str, float]] = {}  # steps not yet complete (a later step may add tags)
        self._seen: set[str] = set()

    def _files(self) -> list[Path]:
        return sorted(self.path.glob("events.out.tfevents.*"))

    def poll(self, final: bool = False) -> Iterator[tuple[int, dict[str, float]]]:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        for f in self._files():
            if f not in self._loaders:
                self._loaders[f] = LegacyEventFileLoader(str(f))
            try:
                for event in self._loaders[f].Load():
                    for v in event.summary.value:
                        value = _scalar_value(v)
                        if value is not None:
                            self._pending.setdefault(int(event.step), {})[v.tag] = value
                            self._seen.add(v.tag)
            except Exception as exc:  # a truncated or corrupt record: keep what was read
                print(f"scalewatch: {f.name}: stopped reading at a damaged record ({type(exc).__name__})",
                      file=sys.stderr)
        # A step is complete once a later step has been seen (writers log a step's scalars together).
        steps = sorted(self._pending)
        done = steps if final else steps[:-1]
        for s in done:
            yield s, self._pending.pop(s)

    def tags(self) -> list[str]:
        return sorted(self._seen)


def _scalar_value(v: Any) -> float | None:
    if v.HasField("simple_value"):
        return float(v.simple_value)
    if v.HasField("tensor") and v.metadata.plugin_data.plugin_name in ("scalars", ""):
        from tensorboard.util.tensor_util import make_ndarray

        try:  # float_val, double_val or packed tensor_content (TF2 / Keras writers)
            arr = make_ndarray(v.tensor)
        except Exception:  # not a numeric tensor
            return None
        return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    return None


class RowConverter:
    """Turns one step's scalars (tag -> value) into an :class:`Observation`, for any trainer's tags.

    The loss, LR and token tags are found on the first row with a loss (common names, or the
    given ones); ScaleWatch's own ``scalewatch/*`` tags give samples, FLOPs, the max loss, the
    gradient norm and the noise-scale EMAs. Non-finite counts are treated as missing; the non-finite
    losses are counted.
    """

    def __init__(self, loss_tag: str | None = None, lr_tag: str | None = None, tokens_tag: str | None = None,
                 tokens_per_step: float | None = None) -> None:
        self.given = Tags(loss_tag, lr_tag, tokens_tag)
        self.tokens_per_step = tokens_per_step
        self.tags = Tags()
        self._nonfinite = 0

    def has_loss(self, row: Mapping[str, float], known: Callable[[], Sequence[str]] | None = None) -> bool:
        """Whether the row carries the run's loss. The tags are chosen once, among ``known()`` (every tag
        the source has read so far) and the row's own: choosing from the first row alone would take
        Lightning's ``train_loss``, logged one step before ScaleWatch's ``scalewatch/loss`` with its
        tokens and LR, and lose those for the whole replay."""
        if not self.tags.loss:
            names = sorted({*row, *(known() if known else ())})
            self.tags = Tags(loss=find_tag(names, LOSS_TAGS, self.given.loss),
                             lr=find_tag(names, LR_TAGS, self.given.lr),
                             tokens=find_tag(names, TOKEN_TAGS, self.given.tokens))
        return bool(self.tags.loss) and self.tags.loss in row

    def observation(self, step: int, row: Mapping[str, float], n_params: float | None = None) -> Observation:
        """The observation of a row :meth:`has_loss` accepted; FLOPs as 6·N·D when the log has none."""
        row = {k: v for k, v in row.items() if math.isfinite(v) or k == self.tags.loss}  # bad counts: missing
        loss = row[self.tags.loss]  # type: ignore[index]
        tokens = row.get(self.tags.tokens) if self.tags.tokens else None
        if tokens is None:
            tokens = step * self.tokens_per_step if self.tokens_per_step else 0
        nonfinite = int(row.get(tag("nonfinite_losses"), self._nonfinite + (0 if math.isfinite(loss) else 1)))
        all_finite = nonfinite == self._nonfinite and math.isfinite(loss)
        self._nonfinite = nonfinite
        flops = row.get(tag("flops"), 6.0 * n_params * tokens if n_params else 0.0)
        grad = row.get(tag("grad_norm"))
        return Observation(step=step, tokens=int(tokens), samples=int(row.get(tag("samples"), 0)), flops=int(flops),
                           loss=loss if math.isfinite(loss) else math.nan,
                           lr=row.get(self.tags.lr) if self.tags.lr else None, nonfinite=nonfinite,
                           loss_max=row.get(tag("loss_max"), math.nan), all_finite=all_finite, grad_norm=grad,
                           grad_norm_max=row.get(tag("grad_norm_max"), grad),
                           # the noise-scale EMAs as logged: a replay recomputes B_crit from them
                           gns_g2=row.get(tag("gns/g2")), gns_trace=row.get(tag("gns/trace")))


def no_loss_message(path: str | Path, loss_tag: str | None, tags: Sequence[str]) -> str:
    """The one-line error for a log without a (findable) loss: what was looked for, what was found."""
    wanted = f"loss tag {loss_tag!r}" if loss_tag else \
        f"loss tag or column (looked for {', '.join(LOSS_TAGS[:6])}, ...)"
    if not tags:
        return f"{path}: the log is empty (no tags or columns, no rows): give a log that has a loss"
    return f"{path}: no {wanted}; tags/columns: {', '.join(tags)}; name it with --loss-tag"


def read_observations(logdir: str | Path, loss_tag: str | None = None, lr_tag: str | None = None,
                      tokens_tag: str | None = None, tokens_per_step: int | None = None) -> list[Observation]:
    """The run in a TensorBoard event directory as Observations, one per step that logged a loss.

    ScaleWatch's own logs give tokens, samples and FLOPs; another trainer's give the loss (its tag
    found among common names, or ``loss_tag``), the LR and tokens where logged, else tokens as
    ``step * tokens_per_step``. The same conversion as ``scalewatch watch``.
    """
    source = EventSource(Path(logdir))
    rows = RowConverter(loss_tag, lr_tag, tokens_tag, tokens_per_step)
    out = [rows.observation(step, row) for step, row in source.poll(final=True) if rows.has_loss(row, source.tags)]
    if not out:
        raise ValueError(no_loss_message(logdir, loss_tag, source.tags()))
    return out
