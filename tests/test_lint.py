"""The repository passes ``ruff check`` (its settings: ``[tool.ruff]`` in pyproject.toml), so style problems fail
the test suite rather than piling up."""
import subprocess
import sys

from tests.conftest import REPO


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
