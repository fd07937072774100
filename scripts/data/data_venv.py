"""The `.venv-data` virtualenv that scripts/data/prepare_data.py creates (alt-profanity-check,
matplotlib): scripts that need it re-execute themselves inside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-data"


def reexec_in_data_venv(script: str) -> None:
    """Returns when already running inside .venv-data; otherwise replaces this process with
    `script` run by the venv's Python, with the same arguments."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        sys.exit(f"{py} is missing: run python3 scripts/data/prepare_data.py first")
    os.execv(str(py), [str(py), str(Path(script).resolve()), *sys.argv[1:]])
