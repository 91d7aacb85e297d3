"""The main job's pilot runs: a small sweep of the same tiny GPT, and the two laws fitted on it.

    python examples/pilot_sweep.py          # about 15 minutes on a 2-core CPU; rewrites examples/laws/

The sweep trains the model of ``train_tiny_gpt.py`` with its recipe (same byte-level data of the
standard library, 16 sequences of 128 bytes per optimizer step, AdamW at peak LR 2e-3, linear
warmup) at three sizes that bracket the main job's 0.84M parameters (0.12M, 0.37M, 1.30M), each
under cosine schedules of several lengths and one constant LR, with ScaleWatch attached. Then it
fits, with scalewatch's own command line (``scalewatch fit``):

* a **curve law** (schedule-aware, Tissue et al.) on every run's training-loss curve: the main job
  draws its predicted loss curve with the 90% band and forecasts its final loss from it;
* a **Chinchilla law** L(N, D) on the final losses of the cosine runs (a run whose schedule ends at
  D is a point of L(N, D); a constant-LR run is not): the main job's compute-optimal allocation,
  behind its ``undertrained`` alert.

Written to ``--out``: ``pilots.csv`` (one row per run: N, tokens, final loss, ...), ``curves/*.csv``
(each run's ``step,lr,loss,n_params``), ``curve_law.json`` and ``chinchilla_law.json``. Each law
file records under ``fitted_on`` the command that made it (``command``), the ``scalewatch fit``
command that refits it from the committed CSVs (``fit_command``), the seed and the sweep's wall time.
Deterministic for a given ``--seed`` on one machine (CPU, fixed thread count); the TensorBoard logs
of the pilots go to ``--logdir``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from tiny_gpt import GPTConfig, TinyGPTModule, make_loaders  # noqa: E402

from scalewatch import ScaleWatch  # noqa: E402
from scalewatch.cli import main as scalewatch_cli  # noqa: E402
from scalewatch.curves import load_curve_law, read_curve_tensorboard, save_curve_law  # noqa: E402
from scalewatch.laws import load_law, save_law  # noqa: E402
from scalewatch.tensorboard import read_scalars, tag  # noqa: E402

# The main job's recipe (train_tiny_gpt.py defaults): only the size and the schedule vary here.
BATCH_SIZE, ACCUMULATE, BLOCK_SIZE, PEAK_LR, N_HEAD, LOG_EVERY = 8, 2, 128, 2e-3, 4, 10
LOSS_NAME = "train loss, nats/byte (mean over each 10-step log interval)"
MIN_LAW_STEPS = 300  # shorter runs are not points of L(N, D) here (see mark_law_points)


@dataclass(frozen=True)
class Pilot:
    """One pilot run: a model size and a schedule."""

    n_layer: int
    n_embd: int
    steps: int
    schedule: str = "cosine"

    @property
    def name(self) -> str:
        return f"L{self.n_layer}_d{self.n_embd}_{self.schedule}_{self.steps}"

    @property
    def warmup(self) -> int:
        return min(40, self.steps // 10)  # as train_tiny_gpt.py


def full_grid() -> list[Pilot]:
    """Three sizes around the main job's (4 layers x 128): cosine at 150/300/600 steps and a constant LR at
    600 each; the two smaller sizes also get a long cosine run (1,200 steps, 2.5M tokens), so the law
    sees where more tokens beat more parameters at the main job's compute."""
    grid = []
    for n_layer, n_embd, long in ((2, 64, True), (3, 96, True), (4, 160, False)):
        grid += [Pilot(n_layer, n_embd, s) for s in (150, 300, 600)] + [Pilot(n_layer, n_embd, 600, "constant")]
        if long:
            grid.append(Pilot(n_layer, n_embd, 1200))
    return grid


def smoke_grid() -> list[Pilot]:
    """Seconds, not minutes: checks that the script runs end to end (the laws it makes mean nothing)."""
    return [Pilot(n_layer, n_embd, s, sched) for n_layer, n_embd in ((1, 16), (1, 32), (2, 32))
            for s, sched in ((40, "cosine"), (80, "cosine"), (80, "constant"))]


def train_pilot(pilot: Pilot, logdir: Path, seed: int) -> dict[str, object]:
    """Train one pilot with ScaleWatch attached; its row of pilots.csv (the final loss from its own log)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    cfg = GPTConfig(block_size=BLOCK_SIZE, n_layer=pilot.n_layer, n_embd=pilot.n_embd, n_head=N_HEAD)
    train, _ = make_loaders(cfg, BATCH_SIZE, num_train=pilot.steps * BATCH_SIZE * ACCUMULATE)
    module = TinyGPTModule(cfg, lr=PEAK_LR, warmup_steps=pilot.warmup, max_steps=pilot.steps,
                           schedule=pilot.schedule)
    logger = TensorBoardLogger(str(logdir), name=pilot.name, version=0)
    trainer = pl.Trainer(max_steps=pilot.steps, accelerator="cpu", devices=1, accumulate_grad_batches=ACCUMULATE,
                         callbacks=[ScaleWatch(flops="6N+attn")], logger=logger, log_every_n_steps=LOG_EVERY,
                         limit_val_batches=0, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, deterministic=True)
    start = time.perf_counter()
    trainer.fit(module, train)
    seconds = time.perf_counter() - start
    series = read_scalars(logger.log_dir)
    return {"name": pilot.name, "n_layer": pilot.n_layer, "n_embd": pilot.n_embd, "schedule": pilot.schedule,
            "steps": pilot.steps, "params": int(series[tag("n_params")][-1][1]),
            "tokens": int(series[tag("tokens")][-1][1]), "flops": float(series[tag("flops")][-1][1]),
            "loss": round(float(series[tag("loss")][-1][1]), 5), "seconds": round(seconds, 1),
            "logdir": logger.log_dir}


def write_curve_csv(logdir: str, path: Path) -> None:
    """A pilot's loss curve as ``step,lr,loss,n_params`` (what ``scalewatch fit --curves`` reads)."""
    curve = read_curve_tensorboard(logdir)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "n_params"])
        for step, lr, loss in zip(curve.steps, curve.lr, curve.loss, strict=True):
            w.writerow([int(step), f"{lr:.6g}", f"{loss:.5f}", int(curve.n_params or 0)])


def fit(args: list[str]) -> None:
    """One ``scalewatch fit`` through the CLI's own entry point; a failed fit stops the sweep."""
    status = scalewatch_cli(args)
    if status != 0:
        raise SystemExit(f"pilot_sweep: `scalewatch {shlex.join(args)}` failed (exit status {status})")


def run_sweep(grid: list[Pilot], out: Path, logdir: Path, seed: int) -> tuple[list[dict[str, object]], float]:
    """Train every pilot; write its curve CSV; the rows of pilots.csv and the wall time in seconds."""
    (out / "curves").mkdir(parents=True, exist_ok=True)
    for old in (out / "curves").glob("*.csv"):  # a rerun replaces the sweep; stale curves would join the fit
        old.unlink()
    start = time.perf_counter()
    rows = []
    for i, pilot in enumerate(grid, 1):
        row = train_pilot(pilot, logdir, seed)
        write_curve_csv(str(row.pop("logdir")), out / "curves" / f"{pilot.name}.csv")
        rows.append(row)
        print(f"pilot {i}/{len(grid)} {pilot.name}: N={row['params']:,} D={row['tokens']:,} "
              f"loss={row['loss']:.4f} ({row['seconds']:.0f} s)", flush=True)
    return rows, round(time.perf_counter() - start, 1)


def mark_law_points(rows: list[dict[str, object]]) -> None:
    """Which runs are points of L(N, D) (column ``chinchilla_point``): cosine runs of MIN_LAW_STEPS or more.

    A constant-LR run has not annealed at its end, so its final loss is not L(N, D). The 150-step runs are
    left out too: all three sizes end them at 2.61-2.66 nats/byte with the largest model worst, still in the
    first plateau of byte-level training that L(N, D) does not describe; with them the fit put E at 0 and
    the compute-optimal N for the main job's compute at 10k parameters (2 layers x 64 already has 125k).
    """
    for row in rows:
        ok = row["schedule"] == "cosine" and int(row["steps"]) >= MIN_LAW_STEPS  # type: ignore[call-overload]
        row["chinchilla_point"] = "yes" if ok else "no"


def fit_laws(out: Path, seed: int, provenance: dict[str, object]) -> None:
    """Fit both laws with ``scalewatch fit`` on the CSVs in ``out``; record how they were made in each file."""
    # The fits run from the repository root on the committed CSVs, so fit_command reproduces them as written
    # (the shell expands curves/*.csv to the sorted list that is passed here).
    rel = Path(os.path.relpath(out, ROOT))
    curves = sorted(str(rel / "curves" / p.name) for p in (out / "curves").glob("*.csv"))
    chinchilla_args = ["fit", str(rel / "pilots.csv"), "--where", "chinchilla_point=yes", "--seed", str(seed),
                       "--n-convention", "total", "--loss-name", LOSS_NAME, "--out", str(rel / "chinchilla_law.json")]
    curve_tail = ["--n-convention", "total", "--loss-name", LOSS_NAME, "--out", str(rel / "curve_law.json")]
    with contextlib.chdir(ROOT):
        fit(chinchilla_args)
        fit(["fit", "--curves", *curves, *curve_tail])
    curve_command = f"scalewatch fit --curves {shlex.quote(str(rel / 'curves'))}/*.csv {shlex.join(curve_tail)}"
    record = load_law(out / "chinchilla_law.json")
    record.fitted_on.update(provenance, fit_command="scalewatch " + shlex.join(chinchilla_args))
    # The text tab and `plan` show a law's conventions: say there where this one comes from.
    record.law.conventions["source"] = (f"pilot sweep of examples/tiny_gpt.py ({provenance['command']}), "
                                        "cosine runs of 300+ steps")
    save_law(record, out / "chinchilla_law.json")
    curve_law = load_curve_law(out / "curve_law.json")
    curve_law.fitted_on.update(provenance, fit_command=curve_command)
    save_curve_law(curve_law, out / "curve_law.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "laws"), help="where the laws and the pilots' CSVs go")
    p.add_argument("--logdir", default="runs/pilots", help="TensorBoard logs of the pilot runs")
    p.add_argument("--seed", type=int, default=0, help="model initialisation of every pilot (the data order is "
                                                       "the example's, fixed); the bootstrap of the L(N, D) fit")
    p.add_argument("--grid", choices=("full", "smoke"), default="full",
                   help="full: the sweep behind the committed laws; smoke: a seconds-long check of this script")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads fighting for one free "
                        "core ran 9x slower; a fixed count also keeps the sums deterministic)")
    p.add_argument("--fit-only", action="store_true",
                   help="train nothing: refit both laws from the pilots.csv, curves/ and sweep.json in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if args.fit_only:
        sweep = json.loads((out / "sweep.json").read_text())
        with (out / "pilots.csv").open(newline="") as f:
            rows: list[dict[str, object]] = list(csv.DictReader(f))
        sweep["refit_command"] = shlex.join(["python", "examples/pilot_sweep.py",
                                             *(sys.argv[1:] if argv is None else argv)])
    else:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("scalewatch").setLevel(logging.ERROR)  # pilots are undertrained on purpose: no alert spam
        warnings.filterwarnings("ignore", ".*(does not have many workers|no .val_dataloader.|LeafSpec).*")
        grid = full_grid() if args.grid == "full" else smoke_grid()
        rows, seconds = run_sweep(grid, out, Path(args.logdir).resolve(), args.seed)
        sweep = {"command": shlex.join(["python", "examples/pilot_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
                 "seed": args.seed, "sweep_seconds": seconds, "grid": args.grid,
                 "recipe": f"examples/tiny_gpt.py, {BATCH_SIZE}x{ACCUMULATE} sequences of {BLOCK_SIZE} bytes per "
                           f"optimizer step, AdamW peak LR {PEAK_LR:g}, warmup min(40, steps/10), "
                           "cosine to 10% or constant",
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                            f"{args.threads} thread(s)"}
        (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    mark_law_points(rows)
    with (out / "pilots.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fit_laws(out, int(sweep["seed"]), sweep)
    print(f"\n{len(rows)} pilots, trained in {float(sweep['sweep_seconds']):.0f} s (seed {sweep['seed']}); "
          f"laws written to {os.path.relpath(out, ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
