"""`scalewatch watch`: the same Monitor and detectors over logs, finished or still being written."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from test_health import FAULT_STEP, LRFault, _firing, _train
from torch.utils.tensorboard import SummaryWriter

from scalewatch.cli import main
from scalewatch.config import ScaleWatchConfig
from scalewatch.watch import ConsoleSink, watch


def test_watch_on_a_scalewatch_run_gives_the_alerts_the_live_callback_gave(tmp_path, capsys) -> None:
    live, _ = _train(tmp_path / "run", fault=LRFault(FAULT_STEP, FAULT_STEP + 3, 30.0))
    logdir = tmp_path / "run" / "tb" / "version_0"
    before = sorted((p.name, p.stat().st_size) for p in logdir.iterdir())
    # No --total-steps: the live callback logged the planned length (scalewatch/total_steps).
    rc = main(["watch", str(logdir), "--json", "--tb-out", str(tmp_path / "w")])
    captured = capsys.readouterr()
    assert "no --total-steps" not in captured.err
    lines = [json.loads(x) for x in captured.out.splitlines()]
    replayed = [(d["kind"], d["severity"], d["step"]) for d in lines if d["state"] == "firing"]
    assert replayed and sorted(replayed) == sorted(_firing(live))
    # the exit status is the worst alert that fired (resolved since or not), as the live run's did
    worst_live = max([s for _, s, _ in _firing(live)] or ["ok"], key=["ok", "info", "warning", "critical"].index)
    assert rc == {"ok": 0, "info": 0, "warning": 1, "critical": 2}[worst_live]
    assert (tmp_path / "w").is_dir()  # its own run, beside; the watched one untouched:
    assert sorted((p.name, p.stat().st_size) for p in logdir.iterdir()) == before


def _foreign_log(path, steps, nan_at=None) -> None:
    """A Megatron-style log: `lm loss`, `learning-rate`, no token counts; NaN from ``nan_at`` on."""
    with SummaryWriter(str(path)) as w:
        for s in range(1, steps + 1):
            loss = 2.0 + 3.0 / math.sqrt(s) + 0.01 * math.sin(s)
            w.add_scalar("lm loss", float("nan") if nan_at is not None and s >= nan_at else loss, s * 10)
            w.add_scalar("learning-rate", 3e-4, s * 10)


def test_watch_reads_another_trainers_tags_and_exits_by_health(tmp_path, capsys) -> None:
    _foreign_log(tmp_path / "healthy", 60)
    assert main(["watch", str(tmp_path / "healthy"), "--no-tb", "--tokens-per-step", "4096"]) == 0
    _foreign_log(tmp_path / "nan", 60, nan_at=45)
    rc = main(["watch", str(tmp_path / "nan"), "--no-tb", "--json", "--jsonl", str(tmp_path / "a.jsonl")])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 2 and [(d["kind"], d["step"]) for d in out if d["state"] == "firing"] == [("nonfinite", 450)]
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["kind"] == "nonfinite"


def test_watch_on_the_real_curves_is_quiet_and_catches_an_injected_divergence(tmp_path) -> None:
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "multipowerlaw" / "csv_100__cosine_24000.csv"
    assert main(["watch", str(src), "--no-tb"]) == 0
    rows = src.read_text().splitlines()
    bad = [rows[0]] + [
        ",".join([r.split(",")[0], r.split(",")[1], str(float(r.split(",")[2]) * (1 + 0.04 * max(0, i - 100)))])
        for i, r in enumerate(rows[1:])]
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    assert main(["watch", str(tmp_path / "bad.csv"), "--no-tb"]) == 2


@pytest.mark.slow
def test_follow_sees_alerts_while_the_run_is_still_being_written(tmp_path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_text("")
    stop = threading.Event()
    written = []

    def trainer() -> None:  # a run that blows up at step 300, written line by line
        with path.open("a") as f:
            for s in range(10, 600, 10):
                if stop.is_set():
                    return
                loss = 2.0 + 3.0 / math.sqrt(s) if s < 300 else float("nan")
                f.write(json.dumps({"step": s, "loss": loss, "lr": 1e-3}) + "\n")
                f.flush()
                written.append(s)
                time.sleep(0.02)

    t = threading.Thread(target=trainer)
    t.start()
    seen = []
    try:
        watch([path], dict(config=ScaleWatchConfig(gns="off"), sinks=[ConsoleSink(stream=open("/dev/null", "w"))]),
              follow=True, poll=0.05, idle=1.0,
              on_report=lambda r: seen.extend((a.kind, a.step, len(written)) for a in r.alerts if a.state == "firing"))
    finally:
        stop.set()
        t.join()
    (kind, step, written_then), = seen
    assert (kind, step) == ("nonfinite", 300) and written_then < len(range(10, 600, 10))  # while it still ran


@pytest.mark.parametrize("make, match", [
    (lambda d: d.mkdir() or d, "no TensorBoard event files"),
    (lambda d: (d.with_suffix(".csv").write_text("step,accuracy\n1,0.5\n2,0.6\n"), d.with_suffix(".csv"))[1],
     "tags/columns: step, accuracy"),
    (lambda d: d / "missing", "no such file"),
])
def test_bad_inputs_get_one_line_and_exit_3(tmp_path, capsys, make, match) -> None:
    path = make(tmp_path / "run")
    assert main(["watch", str(path), "--no-tb"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and match in err[0], err


def test_a_half_written_jsonl_line_is_not_lost_or_misread(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in range(10, 110, 10)) + '{"step": 11')
    from scalewatch.watch import TableSource

    src = TableSource(path)
    assert [s for s, _ in src.poll()] == list(range(10, 110, 10))  # the partial line waits
    with path.open("a") as f:
        f.write('0, "loss": 2.5}\n')
    assert list(src.poll()) == [(110, {"loss": 2.5})]


def test_lines_longer_than_a_read_chunk_and_many_chunks(tmp_path, monkeypatch) -> None:
    import scalewatch.watch as w

    monkeypatch.setattr(w, "_CHUNK", 64)  # force many chunks and lines longer than one
    path = tmp_path / "run.jsonl"
    rows = [{"step": s, "loss": 3.0 - s / 1000, "note": "x" * (s % 150)} for s in range(1, 200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = list(w.TableSource(path).poll())
    assert [s for s, _ in got] == list(range(1, 200)) and got[-1][1]["loss"] == pytest.approx(3.0 - 199 / 1000)


def test_odd_but_valid_logs_and_several_paths(tmp_path, capsys) -> None:
    # a byte-order mark, a NaN step, a non-finite token count, a metadata line in JSONL
    (tmp_path / "bom.csv").write_text("\ufeffstep,loss,tokens\nnan,3.0,10\n" +
                                      "".join(f"{s},{3.0 - s / 1000},{'inf' if s == 5 else s * 10}\n"
                                              for s in range(1, 60)), encoding="utf-8")
    (tmp_path / "meta.jsonl").write_text(json.dumps({"config": {"lr": 1e-3}}) + "\n" +
                                         "".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in range(1, 40)))
    assert main(["watch", str(tmp_path / "bom.csv"), "--no-tb"]) == 0
    assert main(["watch", str(tmp_path / "meta.jsonl"), "--no-tb"]) == 0
    # the exit status is the worst over every path, not the last one's
    crit = tmp_path / "crit.jsonl"
    crit.write_text("".join(json.dumps({"step": s, "loss": 3.0 if s < 30 else float("nan")}) + "\n"
                            for s in range(1, 40)))
    assert main(["watch", str(crit), str(tmp_path / "meta.jsonl"), "--no-tb"]) == 2
    # never into (or around) a watched path
    assert main(["watch", str(crit), "--tb-out", str(tmp_path)]) == 3
    assert "would write into or around" in capsys.readouterr().err
    assert main(["watch", str(crit), "--no-tb", "--poll", "0"]) == 3


def test_scalewatch_loss_is_chosen_over_lightnings_train_loss_logged_a_step_earlier() -> None:
    """Lightning logs ``train_loss`` at step N-1, ScaleWatch its loss, tokens and LR at step N: the tag
    choice uses every tag the source has read, not the first row's (which would lose tokens and LR)."""
    from scalewatch.tensorboard import RowConverter

    rows = RowConverter()
    known = ["train_loss", "scalewatch/loss", "scalewatch/tokens", "scalewatch/lr"]
    assert not rows.has_loss({"train_loss": 3.0}, lambda: known)  # step 9: not the run's loss series
    assert rows.has_loss({"scalewatch/loss": 3.1, "scalewatch/tokens": 512.0, "scalewatch/lr": 1e-3}, lambda: known)
    obs = rows.observation(10, {"scalewatch/loss": 3.1, "scalewatch/tokens": 512.0, "scalewatch/lr": 1e-3})
    assert (obs.loss, obs.tokens, obs.lr) == (3.1, 512, 1e-3)


def test_watch_writes_no_tensorboard_run_beside_a_csv_or_on_bad_input(tmp_path) -> None:
    from scalewatch.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "run.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 1000}\n" for s in range(10, 200, 10)))
    (data / "bad.csv").write_text("step,val\n10,3.0\n")
    assert main(["watch", str(data / "run.csv")]) == 0
    assert main(["watch", str(data / "bad.csv")]) == 3
    assert sorted(p.name for p in data.iterdir()) == ["bad.csv", "run.csv"]  # nothing written beside them
    assert main(["watch", str(data / "bad.csv"), "--tb-out", str(tmp_path / "tb")]) == 3
    assert not (tmp_path / "tb").exists()  # created only at the first report
    assert main(["watch", str(data / "run.csv"), "--tb-out", str(tmp_path / "tb")]) == 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_rerun_replaces_its_own_tensorboard_output_and_nothing_else(tmp_path, capsys) -> None:
    from scalewatch.tensorboard import read_scalars

    _foreign_log(tmp_path / "run", 40, nan_at=30)
    out = tmp_path / "run-scalewatch-watch"
    assert main(["watch", str(tmp_path / "run")]) == 2
    assert "replacing" not in capsys.readouterr().err
    first = read_scalars(out)
    (out / "notes.txt").write_text("mine")
    with SummaryWriter(str(out), filename_suffix=".other") as w:  # someone else's event file: kept
        w.add_scalar("other", 1.0, 1)
    assert main(["watch", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{out}: replacing the previous watch output (1 event file); keeping 1 event file there" in err
    again = read_scalars(out)
    assert len(again["scalewatch/loss"]) == len(first["scalewatch/loss"]) == 40  # not 80: no duplicates
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.glob("events.out.tfevents.*"))) == 2
    assert main(["watch", str(tmp_path / "run"), "--loss-tag", "nope"]) == 3  # bad input: the output stays
    assert len(list(out.glob("events.out.tfevents.*"))) == 2


def test_a_watch_of_another_log_into_the_same_output_keeps_the_first_replay(tmp_path, capsys) -> None:
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("step,loss\n" + "".join(f"{s},{2 + 3 / s}\n" for s in range(10, 410, 10)))
    out = tmp_path / "out"
    assert main(["watch", str(tmp_path / "a.csv"), "--tb-out", str(out)]) == 0
    assert main(["watch", str(tmp_path / "b.csv"), "--tb-out", str(out)]) == 0
    assert "replacing" not in capsys.readouterr().err
    assert len(list(out.rglob("events.out.tfevents.*"))) == 2  # a's replay is not b's to delete


def _nan_then_recovered(path, every=10, nan_step=160):
    path.write_text("step,loss,lr\n" + "".join(
        f"{s},{'nan' if s == nan_step else 2 + 3 / math.sqrt(s)},3e-4\n" for s in range(every, 610, every)))
    return path


def test_a_nan_the_run_recovered_from_still_exits_2_and_the_end_state_is_said(tmp_path, capsys) -> None:
    """A cron job must not miss a NaN: the exit status is the worst alert that FIRED during the replay."""
    csv = _nan_then_recovered(tmp_path / "run.csv")
    assert main(["watch", str(csv), "--no-tb", "--total-steps", "600"]) == 2
    captured = capsys.readouterr()
    assert "CRITICAL  nonfinite" in captured.out and "resolved  nonfinite" in captured.out
    assert "non-finite loss in steps 151–160 (" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert "state at the end: ok;" in last and "worst alert fired: critical (exit 2)" in last, last


def test_no_total_steps_is_said_once_and_bad_input_stays_one_line(tmp_path, capsys) -> None:
    csv = _nan_then_recovered(tmp_path / "run.csv", nan_step=-1)
    assert main(["watch", str(csv), str(csv), "--no-tb"]) == 0
    err = capsys.readouterr().err
    assert err.count("no --total-steps: the undertrained / overtrained / repeated_data checks are off "
                     "(they project to the planned end)") == 1, err
    assert main(["watch", str(csv), "--no-tb", "--total-steps", "600"]) == 0
    assert "--total-steps" not in capsys.readouterr().err
    assert main(["report", str(csv), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().err.count("scalewatch report: no --total-steps") == 1


def test_a_json_document_is_not_a_log_and_non_json_lines_are_counted_once(tmp_path, capsys) -> None:
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"L0": 1.7, "coefficients": list(range(1000)), "conventions": {"N": "total"}},
                              indent=1))
    assert len(law.read_text().splitlines()) > 1000
    assert main(["watch", str(law), "--no-tb"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "law.json is one JSON document, not a JSONL log of scalars" in err[0], err
    assert "give a TensorBoard directory, a CSV or a JSONL log" in err[0]
    # a log with 1,000 lines of noise among its points: one line with the count
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in range(1, 40))
                     + "not json\n" * 1000)
    assert main(["watch", str(noisy), "--no-tb", "--total-steps", "40"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1,000 lines that are not JSON" in err and err.count("not JSON") == 1, err


def test_curve_law_without_schedule_uses_the_logs_lr_or_names_the_flag(tmp_path, capsys, mpl25_curve_law) -> None:
    from conftest import MULTIPOWERLAW

    law = mpl25_curve_law
    run = MULTIPOWERLAW / "csv_25__wsd_20000_24000.csv"  # step,lr,loss
    capsys.readouterr()
    args = ["watch", str(run), "--no-tb", "--json", "--curve-law", str(law), "--total-steps", "24000"]
    rc = main(args)
    out, err = capsys.readouterr()
    assert err.count("--curve-law without --schedule: the schedule is the log's own 'lr'") == 1, err
    # the same alerts (here the band's off_curve ones) as with the schedule given: the prediction is on
    assert main([*args, "--schedule", str(run)]) == rc and "off_curve" in out
    given = capsys.readouterr()
    strip = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in out.splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "time"} for x in given.out.splitlines()]
    assert "--curve-law without --schedule" not in given.err
    no_lr = tmp_path / "no_lr.csv"
    no_lr.write_text("\n".join(",".join(r.split(",")[i] for i in (0, 2)) for r in run.read_text().splitlines()))
    assert main(["watch", str(no_lr), "--no-tb", "--curve-law", str(law), "--total-steps", "24000"]) == 0
    err = capsys.readouterr().err
    assert err.count("no predicted curve; name the LR with --lr-tag, or give --schedule step,lr.csv") == 1, err
    assert "among step, loss" in err and "cosine:peak=...,warmup=...,final=...,total=LAST_STEP" in err


def test_a_healthy_run_on_its_own_recipes_curve_law_raises_no_warning(capsys, mpl25_curve_law) -> None:
    # The law of the 25M model's cosine + constant runs, watching its WSD runs: their first logged
    # points (the fast early drop, below any summed LR the law was fitted on) are not judged.
    from conftest import MULTIPOWERLAW as MPL

    law = mpl25_curve_law
    doc = json.loads(law.read_text())
    assert 0 < doc["band"]["beyond_pilots"]["s1_min"] < doc["band"]["beyond_pilots"]["s1_max"]
    for name in ("wsdcon_18", "wsd_20000_24000"):
        csv = MPL / f"csv_25__{name}.csv"
        last = csv.read_text().strip().splitlines()[-1].split(",")[0]
        capsys.readouterr()
        rc = main(["watch", str(csv), "--curve-law", str(law), "--json", "--no-tb", "--total-steps", last])
        fired = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert rc == 0 and not [d for d in fired if d["severity"] != "info"], (name, fired)


def test_an_empty_log_is_named_as_such(tmp_path, capsys) -> None:
    empty = tmp_path / "losses.csv"
    empty.write_text("")
    assert main(["watch", str(empty), "--no-tb"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the log is empty" in err[0]
