"""TensorBoard in one module: the sink writes a report, the reader turns any event directory into Observations."""

from __future__ import annotations

import pytest
from helpers import scalars
from torch.utils.tensorboard import SummaryWriter

from scalewatch.monitor import Monitor, Observation
from scalewatch.tensorboard import LOSS_VS_TOKENS, TensorBoardSink, read_observations


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
