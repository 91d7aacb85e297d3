"""Shared fixtures: tiny Lightning modules and batches with exactly known token counts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("PYTHONHASHSEED", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (multi-process DDP, the example script); CI does")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    config.addinivalue_line("markers", "slow: a real multi-process or whole-script run (seconds each); "
                                       "skipped unless --run-slow or the CI variable is set")

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI runs everything)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: The public loss curves beside the checkout (../shared/data), for tests on real data.
MULTIPOWERLAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "multipowerlaw"


@pytest.fixture(scope="session")
def mpl25_curve_law(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The curve law of multipowerlaw's 25M cosine_24000 + constant_24000 runs, fitted once by
    ``scalewatch fit --curves`` (tests that use it watch or report the other schedules of that model)."""
    if not MULTIPOWERLAW.exists():
        pytest.skip("../shared/data not beside the checkout")
    import contextlib
    import io

    from scalewatch.cli import main

    law = tmp_path_factory.mktemp("mpl25") / "law.json"
    pilots = [str(MULTIPOWERLAW / f"csv_25__{k}_24000.csv") for k in ("cosine", "constant")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--curves", *pilots, "--out", str(law)]) == 0
    return law
