"""One runtime owns a SQLite file at a time, and a dead owner never blocks the next one.

On PostgreSQL several runtimes share a database, each owning its shards: tests/test_shards.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from actors import DatabaseInUse, Runtime
from persistence import Store
from tests.agents import user, wait_until
from tests.logs import Records, host_logging

ROOT = Path(__file__).resolve().parent.parent


def balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def test_second_runtime_on_the_same_database_fails_at_once(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'owned.db'}"  # on PostgreSQL processes share (test_shards)
    with Runtime.start(db_url) as first:
        group = first.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        started = time.monotonic()
        with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()} on .+ since ") as refused:
            Runtime.start(db_url)
        assert time.monotonic() - started < 5
        assert balanced(str(refused.value)), str(refused.value)
        with pytest.raises(DatabaseInUse):
            Runtime.migrate(db_url)
        with Runtime.start(db_url, read_only=True) as viewer:  # inspecting is allowed
            assert viewer.get_group(group.id).id == group.id
        assert first.get_group(group.id).turns == 0  # the first one is unharmed
        first.step(group.id, [user("still mine")])  # and still writes after the refusals
    with Runtime.start(db_url) as second:  # and once it stopped, the next one may start
        assert second.get_group(group.id).turns == 1


class Owner:
    """A runtime in a child process, owning `url` until `stop()` or `kill()`.

    `script` runs in the child with `rt` started, before it says it owns the database;
    then each line the test sends is run as a command (`tell`), answered by "ok" or the
    error's class name.
    """

    def __init__(self, url: str, script: str = "") -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from actors import Runtime\n"
                "from tests.agents import user\n"
                f"rt = Runtime.start({url!r})\n"
                f"{script}\n"
                "print('owning', flush=True)\n"
                "for line in sys.stdin:\n"
                "    try:\n"
                "        exec(line)\n"
                "        print('ok', flush=True)\n"
                "    except Exception as error:\n"
                "        print(type(error).__name__, flush=True)\n"
                "rt.stop()\n",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "SLEEPTIME_LOG_LEVEL": "critical"},
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "owning"

    @property
    def pid(self) -> int:
        return self.process.pid

    def tell(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


MAKE_GROUP = "group = rt.create_group(primary={'kind': 'scripted'}, sleeptime=[{'kind': 'memory'}])"


def start_when_free(url: str) -> Runtime:
    """Start a runtime on `url` once its dead owner's lock is gone."""
    started: list[Runtime] = []

    def start() -> bool:  # the server notices the dead connection within moments
        try:
            started.append(Runtime.start(url))
        except DatabaseInUse:
            return False
        return True

    if not wait_until(start, timeout=10, every=0.05):
        return Runtime.start(url)  # raises DatabaseInUse, naming the holder
    return started[0]


def test_owner_killed_with_sigkill_does_not_block_the_next_start(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'owned.db'}"  # on PostgreSQL: test_shards
    owner = Owner(db_url)
    try:
        with pytest.raises(DatabaseInUse, match=f"pid {owner.pid} "):
            Runtime.start(db_url)
    finally:
        owner.kill()
    with start_when_free(db_url):
        pass


# -- SQLite: the lock is on the database file itself, whatever name it is opened by ---------


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sleeptime.db"


def other_name(kind: str, database: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Another URL for the same database file, made with `kind`."""
    elsewhere = database.parent.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    match kind:
        case "symlink":
            (elsewhere / "linked.db").symlink_to(database)
            return f"sqlite:///{elsewhere / 'linked.db'}"
        case "hard link":
            os.link(database, elsewhere / "linked.db")  # in another directory, too
            return f"sqlite:///{elsewhere / 'linked.db'}"
        case "symlinked directory":
            (elsewhere / "dir").symlink_to(database.parent, target_is_directory=True)
            return f"sqlite:///{elsewhere / 'dir' / database.name}"
        case "relative path":
            monkeypatch.chdir(database.parent.parent)
            return f"sqlite:///{database.relative_to(database.parent.parent)}"
    raise AssertionError(kind)


NAMES = ["symlink", "hard link", "symlinked directory", "relative path"]


@pytest.mark.parametrize("kind", NAMES)
def test_a_second_start_through_another_name_of_the_file_is_refused(
    sqlite_file: Path,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with host_logging():
        records = Records()
        logging.getLogger("sleeptime").addHandler(records)
        _start_through_another_name(sqlite_file, kind, monkeypatch)
    # SQLite names its write-ahead log after the name it opened: several names are a hazard.
    warned = bool(records.events("database_has_several_names"))
    assert warned == (kind == "hard link")


def _start_through_another_name(
    sqlite_file: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_file.parent.mkdir()
    url = f"sqlite:///{sqlite_file}"
    with Runtime.start(url) as first:
        group = first.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        alias = other_name(kind, sqlite_file, monkeypatch)
        with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()} "):
            Runtime.start(alias)
        with pytest.raises(DatabaseInUse):
            Runtime.migrate(alias)
        if kind != "hard link":  # SQLite would read through it a log of its own (none)
            with Runtime.start(alias, read_only=True) as viewer:  # inspecting is allowed
                assert viewer.get_group(group.id).id == group.id
        first.step(group.id, [user("still mine")])
    with Runtime.start(alias) as second:  # the owner stopped: any name of the file will do
        assert second.get_group(group.id).turns == 1


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_another_process_through_another_name_is_refused_until_the_owner_is_gone(
    sqlite_file: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_file.parent.mkdir()
    url = f"sqlite:///{sqlite_file}"
    owner = Owner(url, MAKE_GROUP)
    try:
        alias = other_name(kind, sqlite_file, monkeypatch)
        with pytest.raises(DatabaseInUse, match=f"pid {owner.pid} on .+ since ") as refused:
            Runtime.start(alias)
        assert balanced(str(refused.value)), str(refused.value)
        with Runtime.start(url, read_only=True) as viewer:  # `run.py runs` beside an owner
            assert len(viewer.list_groups()) == 1
        owner.stop()
        with Runtime.start(alias):  # stopped: free
            pass
        owner = Owner(alias)
        with pytest.raises(DatabaseInUse, match=f"pid {owner.pid} "):
            Runtime.start(url)
    finally:
        owner.kill()
    with start_when_free(url):  # killed: free as well
        pass


def test_an_owner_keeps_what_it_commits_when_a_second_start_in_its_process_is_refused(
    sqlite_file: Path,
) -> None:
    """SQLite's own locks are POSIX locks, which a process loses on the file as soon as it
    closes *any* descriptor of it. Were the refused start to close a descriptor of the file
    it tried to lock, the owner would lose the lock that keeps another process from deleting
    the write-ahead log under it: a commit would then go to a deleted file."""
    sqlite_file.parent.mkdir()
    url = f"sqlite:///{sqlite_file}"
    owner = Owner(url, MAKE_GROUP)
    try:
        assert owner.tell(f"Runtime.start({url!r})") == "DatabaseInUse"
        assert owner.tell(f"Runtime.start({url!r}, read_only=True).stop()") == "ok"
        assert owner.tell("rt.step(group.id, [user('first')])") == "ok"
        reader = sqlite3.connect(sqlite_file)  # another process reads, then leaves
        assert reader.execute("SELECT count(*) FROM groups").fetchone() == (1,)
        reader.close()
        assert owner.tell("rt.step(group.id, [user('second')])") == "ok"
    finally:
        owner.kill()  # no checkpoint at exit: what was committed is in the log alone
    with start_when_free(url) as rt:
        (group,) = rt.list_groups()
        history = rt.list_messages(group.primary_agent_id)
        assert [m.text() for m in history if m.role == "user"] == ["first", "second"]


@pytest.fixture
def posix_locks() -> Iterator[None]:
    if not Path("/proc/locks").exists():
        pytest.skip("needs Linux's /proc/locks")
    yield


def sqlite_read_locks(database: Path) -> int:
    """How many POSIX locks this process holds on the file (SQLite's own)."""
    stat = os.stat(database)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "POSIX" in line and f" {os.getpid()} {inode} " in f"{line} ")


def test_sqlite_keeps_its_locks_when_an_owner_of_the_same_process_stops(
    sqlite_file: Path, posix_locks: None
) -> None:
    sqlite_file.parent.mkdir()
    url = f"sqlite:///{sqlite_file}"
    owner = Runtime.start(url)
    group = owner.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    with Runtime.start(url, read_only=True) as viewer:
        viewer.get_group(group.id)
        assert sqlite_read_locks(sqlite_file) >= 1
        owner.stop()
        assert sqlite_read_locks(sqlite_file) >= 1  # the viewer's, still there
        assert viewer.get_group(group.id).id == group.id


# -- only the writer writes -----------------------------------------------------------------


def test_only_the_writer_writes(db_url: str) -> None:
    """The readers hold no ownership, so they must not be able to write."""
    store = Store(db_url)
    try:
        with pytest.raises(DBAPIError, match=r"read.only|readonly"), store._reader.begin() as c:
            c.exec_driver_sql("UPDATE groups SET counter = 0")
        assert store.committer.run(
            lambda c: c.exec_driver_sql("UPDATE groups SET counter = 0").rowcount == 0
        )
    finally:
        store.close()
