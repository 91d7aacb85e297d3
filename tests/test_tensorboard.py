"""TensorBoard in one module: the sink writes a report, the reader turns any event directory into Observations."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import scalars
from torch.utils.tensorboard import SummaryWriter

from scalewatch.monitor import Monitor, Observation
from scalewatch.tensorboard import LOSS_VS_TOKENS, TensorBoardSink, read_observations

EXAMPLE_LAWS = Path(__file__).resolve().parents[1] / "examples" / "laws"  # the main job's committed laws


def test_sink_and_reader_round_trip_a_replay_through_the_same_monitor(tmp_path) -> None:
    with SummaryWriter(str(tmp_path)) as w:
        m = Monitor(n_params=500, sinks=[TensorBoardSink(w)])
        m.texts["conventions"] = "N = 500"
        for step in (10, 20, 30):
            m.observe(Observation(step=step, tokens=640 * step, samples=5 * step, flops=6 * 500 * 640 * step,
                                  loss=4.0 - step / 100, lr=1e-3))
    s = scalars(tmp_path)
    assert [v for _, v in s["scalewatch/tokens_per_param"]] == pytest.approx([12.8, 25.6, 38.4])
    assert [st for st, _ in s[LOSS_VS_TOKENS]] == [6400, 12800, 19200]

    replay = read_observations(tmp_path)
    assert [(o.step, o.tokens, o.samples, o.flops) for o in replay] == \
        [(st, 640 * st, 5 * st, 6 * 500 * 640 * st) for st in (10, 20, 30)]
    assert [o.loss for o in replay] == pytest.approx([3.9, 3.8, 3.7])
    assert all(o.lr == pytest.approx(1e-3) for o in replay)
    again = Monitor(n_params=500)
    assert again.observe(replay[-1]).scalars["tokens_per_param"] == pytest.approx(38.4)


def test_reader_finds_another_trainers_loss_tag_or_is_told(tmp_path) -> None:
    with SummaryWriter(str(tmp_path)) as w:  # a Megatron-style log: "lm loss", no token counts
        for step in (1, 2, 3):
            w.add_scalar("lm loss", 5.0 - step, step)
            w.add_scalar("learning-rate", 3e-4, step)
            w.add_scalar("grad-norm", 1.0, step)
    obs = read_observations(tmp_path, tokens_per_step=2048)
    assert [(o.step, o.loss, o.tokens) for o in obs] == [(1, 4.0, 2048), (2, 3.0, 4096), (3, 2.0, 6144)]
    assert obs[0].lr == pytest.approx(3e-4)
    assert [o.loss for o in read_observations(tmp_path, loss_tag="grad-norm")] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="--loss-tag"):
        read_observations(tmp_path, loss_tag="train/loss")


def _texts(logdir) -> dict[str, str]:
    """The newest text of each text tag in a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    # Text tags are stored as "<tag>/text_summary"; the custom-scalars layout is a serialized proto, skipped.
    return {t.removesuffix("/text_summary"): ea.Tensors(t)[-1].tensor_proto.string_val[0].decode()
            for t in ea.Tags()["tensors"] if t.endswith("/text_summary")}


def test_text_tab_renders_formulas_as_code_spans(tmp_path) -> None:
    # Rendered by TensorBoard's own Markdown converter, as its text tab does: the FLOP formula and the
    # laws' formulas must come out verbatim in <code>, not as italics and not with escape backslashes.
    from tensorboard.plugin_util import markdown_to_safe_html

    from scalewatch.accounting import describe_conventions, six_n_plus_attention
    from scalewatch.config import CHINCHILLA_FORMULA, CURVE_FORMULA, describe_laws
    from scalewatch.curves import load_curve_law
    from scalewatch.laws import ChinchillaLaw

    with SummaryWriter(str(tmp_path)) as w:
        m = Monitor(n_params=842_496, sinks=[TensorBoardSink(w)])
        m.texts["conventions"] = describe_conventions(842_496, None, six_n_plus_attention(842_496, 4, 128), "6N+attn")
        m.texts["laws"] = describe_laws(load_curve_law(EXAMPLE_LAWS / "curve_law.json"), ChinchillaLaw.epoch_refit())
        m.observe(Observation(step=10, tokens=20480, samples=160, flops=10**12, loss=3.0))
    texts = _texts(tmp_path)

    conventions = markdown_to_safe_html(texts["scalewatch/conventions"])
    assert "<code>6*N + 12*n_layer*d_model*T</code> per token" in conventions
    assert "<em>" not in conventions and "\\" not in conventions
    laws = markdown_to_safe_html(texts["scalewatch/laws"])
    assert f"<code>{CHINCHILLA_FORMULA}</code>" in laws and f"<code>{CURVE_FORMULA}</code>" in laws
    assert "<code>C = 6*N*D</code>" in laws  # the law's FLOP convention
    assert "<code>python examples/pilot_sweep.py" in laws  # the command that made the curve law
    assert "<em>" not in laws and "\\" not in laws


def test_md_escape_leaves_code_spans_alone_and_escapes_the_rest() -> None:
    from scalewatch.tensorboard import md_escape

    assert md_escape("a_b `x_y*z` c*d") == "a\\_b `x_y*z` c\\*d"
    assert md_escape("one ` tick_") == "one \\` tick\\_"  # an unpaired backtick opens no span
    assert md_escape("`a` and `b_c`") == "`a` and `b_c`"


def test_every_run_has_the_same_custom_scalar_sections_in_the_same_order() -> None:
    """TensorBoard merges the layouts of a logdir's runs in the order it first meets each section: a section that
    only runs with a curve law had came last when the first run had none (new-user trial)."""
    from scalewatch.tensorboard import layout

    plain, with_law = layout(with_curve=False), layout(with_curve=True)
    assert list(plain) == list(with_law)
    assert all(set(plain[t]) <= set(with_law[t]) and plain[t] for t in plain)  # no empty section
