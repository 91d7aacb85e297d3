"""Two real DDP processes on CPU (gloo) log exactly the totals of one process over the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_ddp, scalars

pytestmark = pytest.mark.slow  # real multi-process runs


def _run(out: Path, devices: int, *extra: str) -> dict[int, dict]:
    return run_ddp("counts", out, devices, *extra)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single")
    return out, _run(out, 1)[0]


def test_two_process_ddp_totals_equal_single_process(tmp_path, single) -> None:
    single_dir, one = single
    ranks = _run(tmp_path, 2)
    assert sorted(ranks) == [0, 1] and ranks[0]["world_size"] == 2

    assert one["tokens"] == 2 * one["true_tokens_per_epoch"]
    for r in (0, 1):  # every rank holds the global totals, not its own share
        assert ranks[r]["tokens"] == one["tokens"]
        assert ranks[r]["samples"] == one["samples"] == 88
        assert ranks[r]["flops"] == one["flops"]

    logged = scalars(tmp_path / "tb" / "version_0")
    assert logged["scalewatch/tokens"][-1][1] == one["tokens"]
    assert logged["scalewatch/samples"][-1][1] == 88
    assert logged["scalewatch/tokens"][-1][0] == ranks[0]["global_step"] == 12
    assert scalars(single_dir / "tb" / "version_0")["scalewatch/tokens"][-1][1] == one["tokens"]
    # only rank 0 writes: one event file in the log directory
    assert len(list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))) == 1


def test_ddp_resume_keeps_every_ranks_unlogged_counts(tmp_path, single) -> None:
    # First leg: one epoch of 6 steps, logged every 4: the checkpoint at its end is written
    # while each rank still holds the unreduced counts of steps 5 and 6. Second leg resumes.
    _run(tmp_path / "a", 2, "-", str(tmp_path / "ckpt"))
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    ranks = _run(tmp_path / "b", 2, str(ckpt))
    _, one = single
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == one["tokens"]
    assert ranks[0]["flops"] == one["flops"]


def test_ddp_nan_stops_every_rank_together_and_only_rank_0_writes_alerts(tmp_path) -> None:
    ranks = run_ddp("health", tmp_path, 2)
    assert sorted(ranks) == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8  # the NaN at step 6, seen at log point 8
    assert "nonfinite" in ranks[0]["firing"] and ranks[1]["firing"] == []  # detection runs on rank 0 only
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    fired = [json.loads(x)["kind"] for x in lines if json.loads(x)["state"] == "firing"]
    assert sorted(fired) == sorted(set(fired)) and "nonfinite" in fired  # one writer (rank 0): each alert once
