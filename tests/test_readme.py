"""The README's API example runs as written (it is the first thing a newcomer tries)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes sleeptime.db in the working directory
    exec(compile(_blocks()[0], str(README), "exec"), {})
    assert os.path.exists(tmp_path / "sleeptime.db")


def test_readme_supervision_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (example,) = [block for block in _blocks() if "RestartPolicy(" in block]
    names: dict[str, Any] = {}
    exec(compile(example, str(README), "exec"), names)
    names["rt"].stop()
    assert names["report"].ok
