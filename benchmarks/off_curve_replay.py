"""False alarms of `off_curve` on healthy real runs watched with their own recipe's curve law.

    python benchmarks/off_curve_replay.py [--data ../shared/data]

multipowerlaw (25M and 100M): the curve law of each size's cosine_24000 + constant_24000 runs
(`scalewatch fit --curves`), then `scalewatch watch --curve-law` on each of the 7 other schedules of
that size. Every run is healthy: a warning is a false alarm. Prints each run's alerts and exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalewatch.cli import main as cli  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _quiet(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli(args)
    return rc, out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    folder = p.parse_args().data / "multipowerlaw"
    warnings = runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for size in ("25", "100"):
            law = str(Path(tmp) / f"law{size}.json")
            pilots = [str(folder / f"csv_{size}__{k}_24000.csv") for k in ("cosine", "constant")]
            rc, _ = _quiet(["fit", "--curves", *pilots, "--out", law])
            if rc != 0:
                print(f"fit failed for {size}M", file=sys.stderr)
                return 1
            for csv in sorted(folder.glob(f"csv_{size}__*.csv")):
                if str(csv) in pilots:
                    continue
                last = csv.read_text().strip().splitlines()[-1].split(",")[0]
                rc, out = _quiet(["watch", str(csv), "--curve-law", law, "--json", "--no-tb", "--total-steps", last])
                fired = [json.loads(x) for x in out.splitlines()]
                fired = [(d["kind"], d["severity"], d["step"]) for d in fired if d["state"] == "firing"]
                runs += 1
                warnings += sum(1 for _, sev, _ in fired if sev != "info")
                print(f"{size:>4}M {csv.stem.split('__')[1]:<22} exit {rc}  {fired}")
    print(f"{warnings} warning(s) or critical(s) on {runs} healthy runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
