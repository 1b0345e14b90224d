"""Shared fixtures: a real database file and a real runtime per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Runtime


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'sleeptime.db'}"


@pytest.fixture
def rt(db_url: str) -> Iterator[Runtime]:
    """A started runtime over `db_url`, stopped after the test."""
    runtime = Runtime.start(db_url)
    try:
        yield runtime
    finally:
        runtime.stop(drain_timeout=5)
