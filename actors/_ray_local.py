"""Ray for this process: a frugal, quiet local one, or an existing cluster to connect to.

A local Ray started here (by the tests, the command line, or a user's script) is sized
for a laptop or a CI box, and leaves nothing behind: no dashboard, no usage statistics,
an object store of `OBJECT_STORE_MB` MB (a shard host moves messages, not tensors), its
session files in a new temporary directory (removed when it stops), its processes on the
loopback interface only, the workers' output kept in those files instead of the caller's
terminal, and token authentication on with a token held in the environment of its own
processes, never written to `~/.ray`. Stopping it shuts Ray down and puts the
environment back.

Example:
    >>> with local_ray(num_cpus=2) as ray_here:
    ...     cluster = start_hosts("postgresql://db-host/sleeptime", hosts=2)
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

OBJECT_STORE_MB = 80
"""The object store of a local Ray, in MB (Ray's own floor is about 75)."""
TEMP_PREFIX = "sleeptime-ray-"
CONNECT_TIMEOUT_S = 10.0
"""How long `connect_ray` waits for a cluster's address to answer at all."""
# Unix socket paths are at most 107 bytes: the session directory must be short.
_TEMP_ROOT = "/tmp" if os.path.isdir("/tmp") else None
_AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class LocalRay:
    """Ray as this process uses it: started here (`owned`) or found running.

    `stop()` shuts down a Ray this process started (and removes its temporary directory
    unless `keep_files`); a Ray that was running before is left as it is.
    """

    owned: bool
    address: str
    temp_dir: str | None = None
    keep_files: bool = False
    _saved_environment: dict[str, str | None] = field(default_factory=dict)
    _cluster_mode: bool | None = None

    def stop(self) -> None:
        """Shut down the Ray this process started and forget its files and environment."""
        if not self.owned:
            return
        self.owned = False
        ray.shutdown()
        if self._cluster_mode is not None:
            ray_constants.ENABLE_RAY_CLUSTER = self._cluster_mode
        for name, value in self._saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.temp_dir is not None and not self.keep_files:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(
    num_cpus: int | None = None,
    *,
    namespace: str | None = None,
    temp_dir: str | None = None,
    keep_files: bool = False,
    object_store_mb: int = OBJECT_STORE_MB,
) -> LocalRay:
    """Start a local Ray, frugal and quiet (see the module's docstring); or, if this
    process is connected to a Ray already, use that one (and leave it running on stop).

    `num_cpus` is Ray's logical CPU count (default: the machine's); `temp_dir` where its
    session files go (default: a new directory under /tmp, removed on stop).
    """
    if ray.is_initialized():
        return LocalRay(owned=False, address=_address())
    saved: dict[str, str | None] = {}

    def set_variable(name: str, value: str) -> None:
        saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    if "RAY_USAGE_STATS_ENABLED" not in os.environ:
        set_variable("RAY_USAGE_STATS_ENABLED", "0")
    if not any(name in os.environ for name in _AUTH_VARIABLES):
        # Ray would write a new token to ~/.ray/auth_token; its processes inherit this one.
        set_variable("RAY_AUTH_MODE", "token")
        set_variable("RAY_AUTH_TOKEN", secrets.token_hex(32))
        _reload_ray_config()
    # A single-node Ray on the loopback interface: no port on the machine's other
    # addresses, no traffic through them. (This constant is read when Ray picks the
    # node's address; the variable is for processes that import Ray afresh.)
    set_variable(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    loopback_before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    made = temp_dir is None
    folder = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=_TEMP_ROOT) if made else str(temp_dir)
    local = LocalRay(
        owned=True,
        address="",
        temp_dir=folder if made else None,
        keep_files=keep_files,
        _saved_environment=saved,
        _cluster_mode=loopback_before,
    )
    try:
        options: dict[str, Any] = {
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "object_store_memory": object_store_mb * 2**20,
            "_temp_dir": folder,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
            "namespace": namespace,
        }
        ray.init(**options)
        local.address = _address()
    except BaseException:
        local.stop()  # the environment back, the directory gone (shutdown is harmless)
        raise
    return local


def _reload_ray_config() -> None:
    """Make this process's Ray read its authentication settings again: Ray read them from
    the environment when it was imported, which may have been before they were set."""
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_ray(
    address: str, *, namespace: str | None = None, timeout: float = CONNECT_TIMEOUT_S
) -> LocalRay:
    """Connect this process to the running Ray cluster at `address` (as `ray.init`
    takes it: `auto`, `host:port`, or `ray://host:10001` for Ray Client), quietly: the
    workers' output stays in the cluster's log files. Stopping it disconnects.

    A `host:port` nobody answers at within `timeout` seconds raises ConnectionError
    (`ray.init` itself would keep trying for minutes)."""
    if ray.is_initialized():
        return LocalRay(owned=False, address=_address())
    _probe(address, timeout)
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.ERROR)
    return LocalRay(owned=True, address=_address())


def _probe(address: str, timeout: float) -> None:
    """Raise ConnectionError unless something accepts a TCP connection at `address`'s
    host and port (`auto` and other forms without a port are left to Ray)."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({error}): start one (`ray start --head`)"
            " or give the address its head node prints"
        ) from error


def _address() -> str:
    context = ray.get_runtime_context()
    return str(getattr(context, "gcs_address", "") or "")


@contextmanager
def local_ray(num_cpus: int | None = None, **options: Any) -> Iterator[LocalRay]:
    """`start_local_ray(...)` for a `with` block: stopped at its end."""
    here = start_local_ray(num_cpus, **options)
    try:
        yield here
    finally:
        here.stop()
