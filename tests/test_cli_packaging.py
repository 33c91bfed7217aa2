"""pacs-ai refuses to run when its top-level import names belong to another
distribution (a shared environment where another `db` package wins)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _run(tmp_path: Path, pythonpath: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env.update(PYTHONPATH=pythonpath, PACS_AI_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_shadowed_package_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "db"
    fake.mkdir()
    # another distribution's `db`, which happens to find our submodules
    (fake / "__init__.py").write_text(f"__path__ = [{str(REPO / 'db')!r}]\n")
    result = _run(tmp_path, f"{tmp_path}{os.pathsep}{REPO}", "models", "list")
    assert result.returncode != 0
    assert "db (" in result.stderr and "own virtualenv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_own_packages_are_accepted(tmp_path: Path) -> None:
    result = _run(tmp_path, str(REPO), "models", "list", "--json")
    assert result.returncode == 0, result.stderr
