"""The ``scalewatch`` console command."""

from __future__ import annotations

import shutil
import subprocess
import sys

import scalewatch


def test_version_from_the_installed_console_script() -> None:
    exe = shutil.which("scalewatch") or f"{sys.executable} -m scalewatch.cli"
    out = subprocess.run(exe.split() + ["--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"scalewatch {scalewatch.__version__}"


def test_cli_module_does_not_import_lightning() -> None:
    # the offline tools must start fast: importing the CLI must not pull in Lightning
    code = "import sys, scalewatch.cli; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
