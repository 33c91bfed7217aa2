"""pacs-ai refuses to run when its top-level import names belong to another
distribution (a shared environment where another `db` package wins)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO, cli_env, run_cli


def _run(tmp_path: Path, pythonpath: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(data_dir=tmp_path / "data"), "PYTHONPATH": pythonpath}
    return run_cli(env, *args, cwd=tmp_path, timeout=60)


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
