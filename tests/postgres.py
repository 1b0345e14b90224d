"""A throwaway PostgreSQL cluster for tests: created in a temporary directory, removed after."""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

MISSING_BINARIES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: "
    "install Debian's postgresql package or set PG_BIN"
)
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the OS account the server runs as when the tests run as root
SUPERUSER = "postgres"  # the database superuser initdb creates
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
PORT_ATTEMPTS = 3
SHARED_MEMORY = Path("/dev/shm")
SHARED_MEMORY_NEEDED = 1 << 30  # bytes free on /dev/shm before the cluster goes there

# A throwaway cluster needs no durability; these settings make it several times faster.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    # Each CREATE DATABASE logs a whole copy of template1; checkpoint often to bound the space.
    "max_wal_size": "'128MB'",
    "min_wal_size": "'32MB'",
}


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be used for the tests: a server command failed or timed out."""


def postgres_required(environ: Mapping[str, str] | None = None) -> bool:
    """Whether REQUIRE_POSTGRES=1 asks for PostgreSQL tests to fail rather than skip."""
    return (os.environ if environ is None else environ).get("REQUIRE_POSTGRES") == "1"


def unavailable(reason: str, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Skip the current test because PostgreSQL is unavailable, or fail it if it is required."""
    if postgres_required(environ):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def _version_key(directory: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", directory.name))


def find_bin_dir(
    environ: Mapping[str, str] | None = None, debian_root: Path = DEBIAN_ROOT
) -> Path | None:
    """The directory holding `initdb` and `pg_ctl`, or None when there is none.

    $PG_BIN, when set, is the only place looked at, so that it can also rule PostgreSQL out;
    otherwise `initdb` on PATH, then the newest Debian install under /usr/lib/postgresql.
    """
    env = os.environ if environ is None else environ
    if pg_bin := env.get("PG_BIN"):
        directory = Path(pg_bin)
        return directory if _has_server_binaries(directory) else None
    if initdb := shutil.which("initdb", path=env.get("PATH", os.defpath)):
        # The real directory, where pg_ctl finds the `postgres` executable too.
        directory = Path(initdb).resolve().parent
        if _has_server_binaries(directory):
            return directory
    installs = [path / "bin" for path in debian_root.glob("*") if _version_key(path)]
    for directory in sorted(installs, key=lambda path: _version_key(path.parent), reverse=True):
        if _has_server_binaries(directory):
            return directory
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def scratch_parent(shared_memory: Path = SHARED_MEMORY) -> Path | None:
    """Where to make the cluster's directory: /dev/shm when it has room, else the default.

    CREATE DATABASE creates some 300 files; on the disk of the machine this was measured on
    that took up to 250 ms per test, in memory it takes about 16 ms.
    """
    try:
        stats = os.statvfs(shared_memory)
    except OSError:
        return None
    roomy = stats.f_bavail * stats.f_frsize >= SHARED_MEMORY_NEEDED
    return shared_memory if roomy and os.access(shared_memory, os.W_OK | os.X_OK) else None


def database_name(hint: str) -> str:
    """A unique, valid database name that starts with a readable form of `hint`."""
    slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:50] or "test"
    return f"{slug}_{uuid.uuid4().hex[:8]}"


class PostgresCluster:
    """One PostgreSQL server on a loopback port, with its data in a temporary directory."""

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, bin_dir: Path, base_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "server.log"
        self.port = port
        self.running = False
        self.start_seconds = 0.0

    @classmethod
    def create(cls, bin_dir: Path) -> PostgresCluster:
        """Initialise a cluster in a new temporary directory and start it."""
        base_dir = Path(tempfile.mkdtemp(prefix="sleeptime-pg-", dir=scratch_parent()))
        cluster = cls(bin_dir, base_dir, free_port(cls.host))
        atexit.register(cluster.remove)  # no server outlives an interrupted session
        try:
            began = time.perf_counter()
            if os.geteuid() == 0:
                account = _server_account()
                os.chown(base_dir, account.pw_uid, account.pw_gid)
            cluster._initdb()
            cluster._start_on_a_free_port()
            cluster.start_seconds = time.perf_counter() - began
        except BaseException:
            cluster.remove()
            raise
        return cluster

    @property
    def admin_url(self) -> str:
        """The SQLAlchemy URL of the `postgres` maintenance database."""
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of database `dbname` as the superuser."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq connection string of database `dbname`, for psycopg itself."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[TupleRow]:
        """A new autocommit psycopg connection to database `dbname`."""
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)

    def create_database(self, hint: str = "test") -> str:
        """Create a new empty database and return its name."""
        name = database_name(hint)
        with self.connect() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting whoever is still connected to it."""
        if not self.running:
            self.start()  # a test stopped the server and left it down
        with self.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        self._pg_ctl("start", "-l", str(self.log_file), "-o", f"-p {self.port}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode` as for pg_ctl -m) and wait until it has exited."""
        self._pg_ctl("stop", "-m", mode)
        self.running = False

    def restart(self) -> None:
        """Stop the server (fast) and start it again on the same port over the same data."""
        self.stop()
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the server meanwhile (SIGSTOP to it and every backend, SIGCONT after): a
        database that hangs, with its connections open, instead of refusing them."""
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            # The pid file, not `running`: a start that timed out may have left a server up.
            if (self.data_dir / "postmaster.pid").exists():
                try:
                    self.stop()
                except PostgresUnavailable:
                    self.stop("immediate")
        finally:
            atexit.unregister(self.remove)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server log, or a note that there is none."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
        )
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.base_dir}'"}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# sleeptime-runtime test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_on_a_free_port(self) -> None:
        # The port was free when chosen, but something may take it before the server binds it.
        for attempt in range(1, PORT_ATTEMPTS + 1):
            logged = self.log_file.stat().st_size if self.log_file.exists() else 0
            try:
                self.start()
                return
            except PostgresUnavailable:
                with self.log_file.open("rb") as log:
                    log.seek(logged)
                    taken = b"Address already in use" in log.read()
                if not taken or attempt == PORT_ATTEMPTS:
                    raise
                self.port = free_port(self.host)

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                action,
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(START_TIMEOUT),
                *options,
            ],
            timeout=START_TIMEOUT + 30,
        )

    def _run(self, command: list[str], timeout: float) -> None:
        try:
            done = subprocess.run(
                _as_server_user(command),
                cwd=self.base_dir,  # the server account must be able to enter the working dir
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach the server
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostgresUnavailable(self._failure(command, str(error))) from error
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise PostgresUnavailable(
                self._failure(command, f"exit status {done.returncode}\n{output}")
            )

    def _failure(self, command: list[str], detail: str) -> str:
        return (
            f"PostgreSQL test cluster: `{shlex.join(command)}` failed: {detail}\n"
            f"server log ({self.log_file}), last lines:\n{self.log_tail()}"
        )


def _children(parent: int) -> list[int]:
    """The processes whose parent is `parent` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def _server_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"the tests run as root and PostgreSQL refuses to, but there is no "
            f"{SERVER_USER!r} user to run it as"
        ) from None


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the server account when running as root, since PostgreSQL refuses root."""
    if os.geteuid() != 0:
        return command
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", SERVER_USER, "--", *command]
    if su := shutil.which("su"):
        return [su, SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(command)]
    raise PostgresUnavailable(
        f"the tests run as root and neither runuser nor su is there to run PostgreSQL as "
        f"{SERVER_USER!r}"
    )
