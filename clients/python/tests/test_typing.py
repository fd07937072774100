"""The package's type hints: the package passes `mypy --strict` (its configuration is in
pyproject.toml), and code that uses the *installed* package is checked against them (PEP 561:
py.typed and the generated .pyi stubs ship in the wheel), so a wrong argument type is caught."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is in the client's [test] extra")


def _mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_package_passes_mypy_strict():
    out = _mypy("goodtriever_client", cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_users_code_is_checked_against_the_installed_hints(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(
        textwrap.dedent(
            """
            import numpy as np
            from goodtriever_client import Bias, Client, apply_bias

            def step(client: Client, hidden: np.ndarray, logits: np.ndarray) -> np.ndarray:
                answer = client.adjust(hidden, alpha=1.5, k=64)
                if isinstance(answer, Bias):
                    return apply_bias(logits, answer)
                return answer

            rows: int = Client("127.0.0.1:1").info().model.hidden_size
            """
        )
    )
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent(
            """
            from goodtriever_client import Client

            Client("127.0.0.1:1").adjust([[0.0]], k="many")
            name: int = Client("127.0.0.1:1").info().model.key_type
            """
        )
    )
    # Run outside the source tree so that mypy finds the installed package, not the sources.
    ok = _mypy("--strict", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = _mypy("--strict", str(bad), cwd=tmp_path)
    assert wrong.returncode != 0, wrong.stdout
    assert 'bad.py:4: error: Argument "k" to "adjust"' in wrong.stdout, wrong.stdout
    assert "bad.py:5: error: Incompatible types in assignment" in wrong.stdout, wrong.stdout
