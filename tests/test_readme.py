"""The README runs as written: its quick start and its API examples (what a newcomer tries)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import export

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Runs `python run.py ARGS` as a user would, in a Python that cannot import the optional
# extras' packages: the quick start promises the base install is enough for the demo.
_WITHOUT_EXTRAS = """
import runpy, sys
blocked, script, *args = sys.argv[1:]
sys.modules.update(dict.fromkeys(blocked.split(","), None))
sys.argv = [script, *args]
sys.path.insert(0, script.rpartition("/")[0])
runpy.run_path(script, run_name="__main__")
"""


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


def test_readme_service_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    class Console(export.ConsoleSpanExporter):
        """The SDK's, writing to this test's stdout (its default is the one at import)."""

        def __init__(self) -> None:
            super().__init__(out=sys.stdout)

    monkeypatch.setattr(export, "ConsoleSpanExporter", Console)
    (example,) = [block for block in _blocks() if "rt.metrics.serve(" in block]
    example = example.replace("serve(port=9464)", "serve(port=0)")  # any free port, here
    names: dict[str, Any] = {}
    exec(compile(example, str(README), "exec"), names)
    names["provider"].shutdown()  # what a script's exit does: the spans still batched go out
    printed = capsys.readouterr().out
    assert 'sleeptime_turns_total{fired="true"} 1.0' in printed
    assert '"name": "sleeptime.run"' in printed  # the console exporter's spans


def quick_start_commands() -> list[str]:
    """The `python run.py ...` commands of the README's quick start, in order, as written."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = []
    for line in "".join(blocks).splitlines():
        for command in line.split("#", 1)[0].split("&&"):
            if command.strip().startswith("python run.py"):
                commands.append(command.strip())
    return commands


def extras_modules() -> list[str]:
    """The import names of the packages only the optional extras install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("-", "_")

    base = {name(r) for r in project["dependencies"]}
    extras = {name(r) for group in project["optional-dependencies"].values() for r in group}
    return sorted(extras - base)


def run_as_a_user(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one `python run.py ...` command in `cwd`, without the extras' packages."""
    program, script, *args = shlex.split(command)
    assert (program, script) == ("python", "run.py"), command
    blocked = ",".join(extras_modules())
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, blocked, str(ROOT / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_quick_start_demo_then_look_inside(tmp_path: Path) -> None:
    demo, *inspect = quick_start_commands()
    assert demo == "python run.py"  # the demo, with no options
    assert {command.split()[2] for command in inspect} >= {"groups", "runs", "check"}
    assert {"psycopg", "matplotlib", "pytest"} <= set(extras_modules())

    shown = run_as_a_user(demo, tmp_path)

    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "favorite color: coral" in shown.stdout
    run_ids = re.findall(r"after turn \d+: (run-[0-9a-f-]+) completed", shown.stdout)
    assert len(run_ids) == 3, shown.stdout
    for command in inspect:
        # The demo ends by suggesting the same commands, word for word.
        assert f"\n  {command}\n" in shown.stdout, command
        looked = run_as_a_user(command, tmp_path)
        assert looked.returncode == 0, f"{command}: {looked.stdout}{looked.stderr}"
        assert "Traceback" not in looked.stderr
        verb = command.split()[2]
        if verb == "groups":
            assert looked.stdout.endswith("\n1 group(s)\n"), looked.stdout
            assert re.search(r"^group-\S+ +2 +1 +6 ", looked.stdout, re.M), looked.stdout
        elif verb == "runs":
            assert all(run_id in looked.stdout for run_id in run_ids), looked.stdout
            assert looked.stdout.endswith("3 run(s), newest first\n"), looked.stdout
        elif verb == "check":
            assert "Checked 1 group(s) and 3 run(s)" in looked.stdout, looked.stdout
            assert "invariants hold." in looked.stdout, looked.stdout
    assert sorted(path.name for path in tmp_path.glob("*.db")) == ["sleeptime.db"]
