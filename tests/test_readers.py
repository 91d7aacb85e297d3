"""Reading other people's logs: tables of several runs (watch/report --where, fit --curves hints), resumed
TensorBoard runs, loss/LR names, W&B exports with blank cells, --n-column for curves, TSV files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from scalewatch.cli import main
from scalewatch.curves import CurveError, read_curve_table, read_curve_tensorboard, read_curves
from scalewatch.tensorboard import LR_TAGS, find_tag, read_scalars

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 20001, 1000))


def loss_at(step: int, size: float) -> float:
    return 10.8 if step == 0 else min(10.8, 2.0 + 1.0 / size + 5.0 * (step + 10) ** -0.3)


def several_runs_csv(path: Path, interleaved: bool = False) -> Path:
    """model,seed,step,loss,n_params: 2 models x 2 seeds, one run after another (or row by row)."""
    runs = [(m, seed, size) for m, size in (("m-70m", 0.07), ("m-160m", 0.16)) for seed in (0, 1)]
    rows = [(m, seed, s, loss_at(s, size) * (1 + 0.001 * seed), size * 1e9) for m, seed, size in runs for s in STEPS]
    if interleaved:
        rows.sort(key=lambda r: (r[2], r[0], r[1]))
    path.write_text("model,seed,step,loss,n_params\n" + "".join(
        f"{m},{seed},{s},{loss:.4f},{n:.0f}\n" for m, seed, s, loss, n in rows))
    return path


# ------------------------------------------------------------------ 1. watch / report on a table of several runs
@pytest.mark.parametrize("interleaved", [False, True])
def test_watch_on_a_table_of_several_runs_names_the_columns_and_where(tmp_path, capsys, interleaved) -> None:
    table = several_runs_csv(tmp_path / "runs.csv", interleaved)
    assert main(["watch", str(table), "--no-tb"]) == 3
    out, err = capsys.readouterr()
    assert out == ""  # no alert before the error (it used to page a divergence at step 1)
    assert len(err.strip().splitlines()) == 1
    assert "several runs (columns 'model', 'seed' have 4 combinations)" in err
    first = "m-160m" if interleaved else "m-70m"  # the first row's
    assert f"pick one with --where model={first} --where seed=0" in err
    # one column given: the other is named
    assert main(["watch", str(table), "--no-tb", "--where", "model=m-70m"]) == 3
    assert "column 'seed' has 2 values); add --where seed=0" in capsys.readouterr().err
    # both: one run, read whole, healthy
    assert main(["watch", str(table), "--no-tb", "--where", "model=m-70m", "--where", "seed=0"]) == 0
    assert f"{len(STEPS)} log points kept" in capsys.readouterr().err


def test_watch_where_with_values_or_columns_the_table_lacks(tmp_path, capsys) -> None:
    table = several_runs_csv(tmp_path / "runs.csv")
    assert main(["watch", str(table), "--no-tb", "--where", "model=m-7m"]) == 3
    assert "no row has model='m-7m'; model holds 'm-70m', 'm-160m'" in capsys.readouterr().err
    assert main(["watch", str(table), "--no-tb", "--where", "modl=m-70m"]) == 3
    assert "--where column 'modl' not found; columns are model, seed, step, loss, n_params" in capsys.readouterr().err
    tb = tmp_path / "tb"
    with SummaryWriter(str(tb)) as w:
        for s in range(1, 5):
            w.add_scalar("loss", 3.0 - 0.1 * s, s)
    assert main(["watch", str(tb), "--no-tb", "--where", "model=m-70m"]) == 3
    assert "a TensorBoard directory holds one run" in capsys.readouterr().err


def test_report_on_a_table_of_several_runs(tmp_path, capsys) -> None:
    table = several_runs_csv(tmp_path / "runs.csv")
    out = tmp_path / "r.html"
    assert main(["report", str(table), "--out", str(out)]) == 3
    assert "columns 'model', 'seed' have 4 combinations" in capsys.readouterr().err and not out.exists()
    assert main(["report", str(table), "--out", str(out), "--where", "model=m-160m", "--where", "seed=1"]) == 0
    assert f"({len(STEPS)} log points" in capsys.readouterr().err


def test_a_resumed_log_is_still_replayed_whole(tmp_path, capsys) -> None:
    """A run resumed from a checkpoint logs steps 150..200 again: one run, not several (no column splits it)."""
    rows = [(s, 3 + 5 / math.sqrt(s)) for s in range(1, 201)] + [(s, 3 + 5 / math.sqrt(s)) for s in range(150, 401)]
    log = tmp_path / "resumed.csv"
    log.write_text("step,loss,lr\n" + "".join(f"{s},{v:.4f},0.001\n" for s, v in rows))
    assert main(["watch", str(log), "--no-tb"]) != 3  # 3: refused as a table of several runs
    err = capsys.readouterr().err
    assert "several runs" not in err and f"{len(rows)} log points kept" in err
    # a column that changes with each session (a job id) does not make the sessions separate runs
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("step,loss,lr,slurm_job_id\n" + "".join(
        f"{s},{v:.4f},0.001,{'job1' if i < 200 else 'job2'}\n" for i, (s, v) in enumerate(rows)))
    assert main(["watch", str(jobs), "--no-tb"]) != 3
    err = capsys.readouterr().err
    assert "several runs" not in err and f"{len(rows)} log points kept" in err


def test_watch_judges_the_training_loss_not_a_validation_loss_beside_it(tmp_path, capsys) -> None:
    """A Lightning CSVLogger file: the training loss under its own name, a val_loss once an epoch. watch must
    not quietly judge the validation loss; it asks for the tag."""
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train_loss_step,val_loss\n" + "".join(
        f"0,{s},{3 + 1 / s:.4f},{'' if s % 10 else f'{3.1 + 1 / s:.4f}'}\n" for s in range(1, 41)))
    assert main(["watch", str(log), "--no-tb"]) != 0
    assert "--loss-tag" in capsys.readouterr().err
    assert main(["watch", str(log), "--no-tb", "--loss-tag", "train_loss_step"]) == 0
    assert "40 log points kept" in capsys.readouterr().err


def test_follow_on_a_growing_csv_still_works(tmp_path, capsys) -> None:
    log = tmp_path / "live.csv"
    log.write_text("step,loss\n" + "".join(f"{s},{3 + 1 / s:.4f}\n" for s in range(1, 30)) + "30,3.0")  # half a line
    assert main(["watch", str(log), "--no-tb", "--follow", "--poll", "0.05", "--idle", "0.2"]) == 0
    assert "30 log points kept" in capsys.readouterr().err


def test_find_run_split_prefers_single_columns_and_skips_metrics() -> None:
    from scalewatch.curves import find_run_split

    steps = [1, 2, 3, 1, 2, 3]
    assert find_run_split(steps, {"loss": [3, 2, 1, 3.1, 2.1, 1.1], "variant": list("aaabbb")}) == (["variant"], 2)
    assert find_run_split([1, 2, 3], {"variant": list("aab")}) is None  # steps increase: nothing to split
    assert find_run_split(steps, {"model": list("aaaaaa")}) is None  # no column splits
    # a W&B export with a row per metric at some steps: a validation loss logged now and then is no run's name
    steps = [100, 200, 200, 300, 400, 400, 500, 600, 600]
    val = ["", "", "2.9", "", "", "2.7", "", "", "2.5"]
    assert find_run_split(steps, {"val/loss": val}) is None


def lightning_csv(path: Path, n_params: float, peak: float, cosine: bool, steps: int = 400) -> Path:
    """A Lightning CSVLogger ``metrics.csv`` of a ScaleWatch run, laid out as Lightning writes it: every 10 steps
    a row of the callback's ``scalewatch/*`` series (epoch blank), then a row of ``train_loss`` (one step earlier,
    its own epoch, the callback's columns blank)."""
    cols = ["epoch", "scalewatch/health/batch_size", "scalewatch/loss", "scalewatch/lr", "scalewatch/n_params",
            "scalewatch/tokens", "step", "train_loss"]
    lines = [",".join(cols)]
    size = n_params / 1e5
    for s in range(10, steps + 1, 10):
        lr = peak * (0.55 + 0.45 * math.cos(math.pi * s / steps) if cosine else 1.0)
        loss = 2.0 + 1.0 / size + 8.0 * (peak * s) ** -0.3 - (0.1 * (1 - lr / peak))
        lines.append(f",0.0,{loss:.5f},{lr:.6g},{n_params:.0f},{s * 3840},{s},")
        lines.append(f"0,,,,,,{s - 1},{loss * 1.01:.5f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_lightning_csvlogger_file_of_a_scalewatch_run_is_read_without_flags(tmp_path, capsys) -> None:
    """fit --curves, watch and report read the callback's own columns (on one row), not Lightning's train_loss
    rows (a step earlier, with a blank LR and N); scalewatch/health/* is no run's name."""
    files = [lightning_csv(tmp_path / f"{n:.0f}_{cos}" / "version_0" / "metrics.csv", n, 3e-3, cos)
             for n in (5e4, 1.5e5) for cos in (False, True)]
    c = read_curve_table(files[0])[0]
    assert c.n_params == 5e4 and c.steps.tolist() == list(range(10, 401, 10)) and np.all(c.lr == 3e-3)
    assert c.loss[0] == pytest.approx(float(files[0].read_text().splitlines()[1].split(",")[2]))
    assert main(["fit", "--curves", *map(str, files), "--out", str(tmp_path / "law.json")]) == 0
    assert "at 2 sizes" in capsys.readouterr().out
    assert main(["watch", str(files[1]), "--no-tb"]) == 0
    err = capsys.readouterr().err
    assert "40 log points kept" in err and "several runs" not in err
    assert main(["report", str(files[1]), "--out", str(tmp_path / "r.html")]) == 0
    assert "(40 log points" in capsys.readouterr().err
    # a metric of the user's own, logged on Lightning's rows only (blank on the callback's): no run's name either
    own = tmp_path / "own.csv"
    own.write_text("\n".join(line + ("," + ("accum" if i == 0 else "4" if line.startswith("0,") else ""))
                             for i, line in enumerate(files[1].read_text().splitlines())) + "\n")
    assert main(["watch", str(own), "--no-tb"]) == 0
    assert "40 log points kept" in capsys.readouterr().err


def test_metrics_and_blank_columns_never_name_a_run() -> None:
    from scalewatch.curves import find_run_split

    steps = [10, 9, 20, 19, 30, 29]
    for col in ("scalewatch/health/batch_size", "epoch"):  # blank on the other metric's rows
        assert find_run_split(steps, {col: ["0.0", "", "0.0", "", "0.0", ""]}) is None
    assert find_run_split([1, 2, 1, 2], {"scalewatch/loss": ["5", "5", "9", "9"]}) is None
    assert find_run_split([1, 2, 1, 2], {"model": ["a", "a", "b", "b"]}) == (["model"], 2)
    # a sweep of constant LRs, runs of two sizes: those columns do name the runs
    assert find_run_split([1, 2, 1, 2], {"lr": ["1e-3", "1e-3", "3e-4", "3e-4"]}) == (["lr"], 2)
    assert find_run_split([1, 2, 1, 2], {"scalewatch/n_params": ["5", "5", "9", "9"]}) == (["scalewatch/n_params"], 2)


# ------------------------------------------------------------------ 2. fit --curves hint
def test_fit_curves_hint_finds_the_second_run_column(tmp_path, capsys) -> None:
    table = several_runs_csv(tmp_path / "runs.csv")
    spec = ["--lr-schedule", "cosine:peak=6e-4,warmup=0.01,final=0.1"]
    assert main(["fit", "--curves", str(table), "--run-column", "model", *spec]) == 2
    err = capsys.readouterr().err
    assert "add --run-column model,seed" in err and "sort the file" not in err
    # any column, not only run/name/id: here 'variant'
    odd = tmp_path / "odd.csv"
    odd.write_text("variant,step,lr,loss\n" + "".join(f"{v},{s},1e-3,{3 - s / 100}\n" for v in "ab" for s in
                                                         (10, 20, 30, 40)))
    with pytest.raises(CurveError, match="column 'variant' has 2 values\\): add --run-column variant"):
        read_curve_table(odd)


# ------------------------------------------------------------------ 3. a resumed TensorBoard directory
def resumed_tb(path: Path, loss_tag: str = "train_loss", lr_tag: str = "lr-AdamW") -> Path:
    with SummaryWriter(str(path), filename_suffix=".0") as w:
        for s in range(100, 5001, 100):
            w.add_scalar(loss_tag, 3 + 1000 / s, s)
            w.add_scalar(lr_tag, 1e-3, s)
    with SummaryWriter(str(path), filename_suffix=".1") as w:  # resumed from step 3000
        for s in range(3100, 8001, 100):
            w.add_scalar(loss_tag, 2 + 1000 / s, s)  # the resumed values differ: they supersede
            w.add_scalar(lr_tag, 1e-3, s)
    assert len(list(path.glob("events.out.tfevents.*"))) == 2
    return path


def test_resumed_tensorboard_run_keeps_the_latest_value_per_step(tmp_path) -> None:
    tb = resumed_tb(tmp_path / "tb")
    series = read_scalars(tb)["train_loss"]
    assert [s for s, _ in series] == list(range(100, 8001, 100))
    c = read_curve_tensorboard(tb)
    assert c.steps.tolist() == list(range(100, 8001, 100))
    assert c.loss[c.steps.tolist().index(4000)] == pytest.approx(2 + 1000 / 4000)  # the later file's
    assert c.loss[c.steps.tolist().index(2000)] == pytest.approx(3 + 1000 / 2000)


# ------------------------------------------------------------------ 4. loss / LR names
def test_curves_take_the_loss_names_watch_takes(tmp_path) -> None:
    p = tmp_path / "wandb.csv"
    p.write_text("Step,train/loss,lr\n" + "".join(f"{s},{3 - s / 1000},1e-3\n" for s in range(100, 600, 100)))
    assert read_curve_table(p)[0].loss.tolist() == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5])
    q = tmp_path / "noloss.csv"
    q.write_text("step,lr,metric\n1,1e-3,3\n2,1e-3,2\n3,1e-3,1\n")
    with pytest.raises(CurveError, match="no loss column .*train/loss.*; name it with --loss-column"):
        read_curve_table(q)


def test_hugging_face_lr_tag_and_a_missing_loss_tag(tmp_path) -> None:
    assert find_tag(["train/loss", "train/learning_rate"], LR_TAGS) == "train/learning_rate"
    hf = resumed_tb(tmp_path / "hf", loss_tag="train/loss", lr_tag="train/learning_rate")
    assert len(read_curve_tensorboard(hf).steps) == 80
    nolos = resumed_tb(tmp_path / "nolos", loss_tag="eval/accuracy", lr_tag="train/learning_rate")
    with pytest.raises(CurveError, match=r"no loss tag \(looked for .*found .*eval/accuracy.*--loss-column") as e:
        read_curve_tensorboard(nolos)
    assert "LR tag" not in str(e.value)


# ------------------------------------------------------------------ 5. blank cells
def test_wandb_export_with_blank_cells(tmp_path) -> None:
    p = tmp_path / "sparse.csv"
    lines = ["Step,train/loss,val/loss,lr"]
    for s in range(100, 1100, 100):
        loss = "" if s == 500 else f"{3 - s / 1000}"  # a row of val/loss only
        lr = "" if s in (300, 700) else f"{1e-3 * (1 - s / 2000)}"
        lines.append(f"{s},{loss},{'2.5' if s == 500 else ''},{lr}")
    p.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a blank loss is no point: dropped without a non-finite warning
        c = read_curve_table(p)[0]
    assert 500 not in c.steps.tolist() and len(c.steps) == 9
    at = dict(zip(c.steps.tolist(), c.lr.tolist(), strict=True))
    assert at[300] == pytest.approx(1e-3 * (1 - 300 / 2000)) and at[700] == pytest.approx(1e-3 * (1 - 700 / 2000))
    # with a described schedule the LR column is not read at all
    bad_lr = tmp_path / "bad_lr.csv"
    bad_lr.write_text(p.read_text().replace(f"{1e-3 * (1 - 100 / 2000)}", "n/a"))
    assert len(read_curve_table(bad_lr, schedule="cosine:peak=1e-3")[0].steps) == 9
    with pytest.raises(CurveError, match=r"bad_lr.csv: row 2: column 'lr' holds 'n/a', not a number"):
        read_curve_table(bad_lr)


def test_cli_fit_curves_blank_cells_name_no_empty_string(tmp_path, capsys) -> None:
    p = tmp_path / "run.csv"
    p.write_text("step,loss,lr\n1,3.0,1e-3\n2,,1e-3\n3,2.8,\n4,oops,1e-3\n")
    assert main(["fit", "--curves", str(p)]) == 2
    err = capsys.readouterr().err
    assert "row 5: column 'loss' holds 'oops'" in err and "''" not in err


# ------------------------------------------------------------------ 6. --n-column with --curves
def test_fit_curves_n_column(tmp_path) -> None:
    table = tmp_path / "runs.csv"
    table.write_text(several_runs_csv(tmp_path / "x.csv").read_text().replace("n_params", "params_b"))
    curves = read_curves([table], run_column="model,seed", n_column="params_b", schedule="cosine:peak=6e-4")
    assert sorted({c.n_params for c in curves}) == [7e7, 1.6e8]
    assert {c.n_params for c in read_curves([table], run_column="model,seed", schedule="cosine")} == {None}
    with pytest.raises(CurveError, match="column 'size' not found"):
        read_curves([table], run_column="model,seed", n_column="size", schedule="cosine")


# ------------------------------------------------------------------ 7. a forecast of the last logged step
def test_log_lr_with_total_steps_says_the_forecast_is_of_the_last_logged_step(tmp_path, capsys,
                                                                               mpl25_curve_law) -> None:
    from conftest import MULTIPOWERLAW

    rows = (MULTIPOWERLAW / "csv_25__wsd_20000_24000.csv").read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(rows[: len(rows) // 2]) + "\n")
    last = int(float(rows[len(rows) // 2 - 1].split(",")[0]))
    main(["watch", str(part), "--no-tb", "--curve-law", str(mpl25_curve_law), "--total-steps", "24000"])
    err = capsys.readouterr().err
    assert (f"the forecast is of step {last:,} (the last logged step), not of the run's end at --total-steps 24,000"
            in err) and "total=24000" in err


# ------------------------------------------------------------------ 8. minor
def test_watch_output_is_no_candidate_run_directory(tmp_path, capsys) -> None:
    from scalewatch.curves import event_dirs

    for d in ("version_0", "version_0-scalewatch-watch"):
        with SummaryWriter(str(tmp_path / "runs" / d)) as w:
            w.add_scalar("loss", 3.0, 1)
    assert event_dirs(tmp_path / "runs") == ["version_0"]
    assert main(["watch", str(tmp_path / "runs"), "--no-tb"]) == 3
    err = capsys.readouterr().err
    assert "event files are in: version_0" in err and "scalewatch-watch" not in err


@pytest.mark.parametrize("sep", ["\t", ";"])
def test_tab_and_semicolon_separated_files_are_read(tmp_path, capsys, sep) -> None:
    p = tmp_path / "run.tsv"
    p.write_text(sep.join(["step", "loss", "lr"]) + "\n" + "".join(
        sep.join([str(s), f"{3 - s / 100}", "1e-3"]) + "\n" for s in range(1, 21)))
    assert main(["watch", str(p), "--no-tb"]) == 0
    assert "20 log points kept" in capsys.readouterr().err
    assert len(read_curve_table(p)[0].steps) == 20


def test_blank_lr_everywhere_is_an_error_naming_the_fix(tmp_path) -> None:
    p = tmp_path / "run.csv"
    p.write_text("step,loss,lr\n1,3.0,\n2,2.9,\n3,2.8,\n")
    with pytest.raises(CurveError, match="blank in every row with a loss.*--lr-schedule"):
        read_curve_table(p)
    assert np.all(read_curve_table(p, schedule="constant")[0].lr == 1.0)


def test_watch_takes_n_from_the_tables_own_column_and_refuses_a_multi_size_law_without_n(tmp_path, capsys) -> None:
    """A law of several sizes predicts a size: watch reads N from the table's n_params column (as fit --curves
    does), and without one it says to give --n-params instead of predicting some other size's curve."""
    from scalewatch.curves import CurveLaw, save_curve_law, schedule_from_spec

    coef = {"L0": (3.0, -0.1), "lnA": (math.log(0.5), 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(2.0), 0.0)}
    law = CurveLaw(coef, n_ref=2e8, band_rel=0.01, n_range=(1e8, 4e8))
    save_curve_law(law, tmp_path / "law.json")
    sched = schedule_from_spec("cosine:peak=1e-3,final=0.1", 4000)
    steps = list(range(100, 4001, 100))
    truth = law.predict(sched, n_params=4e8, steps=steps).loss  # the 4e8 model, 3.6% below the law at n_ref
    rows = "".join(f"{s},{y:.5f},{sched[s]:.6g},4e8\n" for s, y in zip(steps, truth, strict=True))
    (tmp_path / "run.csv").write_text("step,loss,lr,n_params\n" + rows)
    args = ["--curve-law", str(tmp_path / "law.json"), "--no-tb", "--total-steps", "4000"]
    assert main(["watch", str(tmp_path / "run.csv"), *args]) == 0
    assert "off_curve" not in capsys.readouterr().out
    (tmp_path / "bare.csv").write_text("step,loss,lr\n" + "".join(",".join(r.split(",")[:3]) + "\n"
                                                                 for r in rows.splitlines()))
    assert main(["watch", str(tmp_path / "bare.csv"), *args]) == 3
    assert "give --n-params N" in capsys.readouterr().err
    assert main(["watch", str(tmp_path / "bare.csv"), *args, "--n-params", "4e8"]) == 0


def test_watch_reads_an_lr_tag_written_with_spaces_and_capitals(tmp_path, capsys) -> None:
    """A tutorial-style TensorBoard log ('Loss/train', 'Learning Rate'): the log's own LR is the schedule."""
    from scalewatch.curves import CurveLaw, save_curve_law

    law = CurveLaw({"L0": (2.0, 0.0), "lnA": (0.0, 0.0), "alpha": (0.5, 0.0), "lnC": (math.log(100.0), 0.0)},
                   n_ref=1e8, band_rel=0.02)
    save_curve_law(law, tmp_path / "law.json")
    run = tmp_path / "run"
    w = SummaryWriter(str(run))
    for s in range(10, 401, 10):
        w.add_scalar("Loss/train", 3.0 + 1.0 / s, s)
        w.add_scalar("Learning Rate", 1e-3, s)
    w.close()
    assert main(["watch", str(run), "--no-tb", "--curve-law", str(tmp_path / "law.json")]) in (0, 1)
    assert "the schedule is the log's own 'Learning Rate'" in capsys.readouterr().err


def test_watch_refuses_an_lr_sweep_as_one_run(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("step,lr,loss\n" + "".join(f"{s},{lr},{3 + 1 / s}\n" for lr in ("1e-3", "3e-4")
                                                  for s in range(1, 201)))
    assert main(["watch", str(sweep), "--no-tb"]) == 3
    assert "--where lr=" in capsys.readouterr().err
