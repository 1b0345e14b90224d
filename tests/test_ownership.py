"""One runtime owns a database at a time, and a dead owner never blocks the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors import DatabaseInUse, Runtime

ROOT = Path(__file__).resolve().parent.parent


def test_second_runtime_on_the_same_database_fails_at_once(db_url: str) -> None:
    with Runtime.start(db_url) as first:
        group = first.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        started = time.monotonic()
        with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()}"):
            Runtime.start(db_url)
        assert time.monotonic() - started < 5
        with pytest.raises(DatabaseInUse):
            Runtime.migrate(db_url)
        with Runtime.start(db_url, read_only=True) as viewer:  # inspecting is allowed
            assert viewer.get_group(group.id).id == group.id
        assert first.get_group(group.id).turns == 0  # the first one is unharmed
    with Runtime.start(db_url) as second:  # and once it stopped, the next one may start
        assert second.get_group(group.id).id == group.id


def test_owner_killed_with_sigkill_does_not_block_the_next_start(db_url: str) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from actors import Runtime\n"
            f"rt = Runtime.start({db_url!r})\n"
            "print('owning', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "owning"
        with pytest.raises(DatabaseInUse):
            Runtime.start(db_url)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    deadline = time.monotonic() + 10
    while True:  # the server notices the dead connection within moments
        try:
            with Runtime.start(db_url):
                break
        except DatabaseInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling a lock the OS or server frees; nothing to wait on
