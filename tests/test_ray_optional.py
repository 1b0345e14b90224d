"""Ray is an optional extra: without it everything else works, and `--ray` says how to
get it. Run in a child process where importing `ray` fails, as it does without the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from actors import INVARIANTS

ROOT = Path(__file__).resolve().parent.parent
WITHOUT_RAY = """
import importlib.abc, sys


class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoRay())
import actors, cli.fanout, cli.workloads, run
assert "ray" not in sys.modules
sys.exit(run.main(sys.argv[1:]))
"""


def without_ray(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_base_install_runs_without_ray(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sim.db'}"
    finished = without_ray("simulate", "--groups", "2", "--turns", "2", "--db", url)
    assert finished.returncode == 0, finished.stderr
    assert f"All {len(INVARIANTS)} invariants hold." in finished.stdout


def test_ray_without_the_extra_says_how_to_install_it() -> None:
    finished = without_ray("simulate", "--ray", "2", "--db", "postgresql://u@127.0.0.1:9/db")
    assert finished.returncode == 2
    assert "pip install 'sleeptime-runtime[ray]'" in finished.stderr


def test_ray_needs_a_postgresql_database(tmp_path: Path) -> None:
    for database in ([], ["--db", f"sqlite:///{tmp_path / 'x.db'}"]):
        finished = without_ray("loadtest", "--ray", "2", *database)
        assert finished.returncode == 2
        assert "one PostgreSQL database" in finished.stderr and "--db postgresql://" in (
            finished.stderr
        )
    assert not (tmp_path / "x.db").exists()  # refused before anything was made
