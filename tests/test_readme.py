"""The README's API example runs as written (it is the first thing a newcomer tries)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows the API in a python block"
    monkeypatch.chdir(tmp_path)  # the example writes sleeptime.db in the working directory
    exec(compile(blocks[0], str(README), "exec"), {})
    assert os.path.exists(tmp_path / "sleeptime.db")
