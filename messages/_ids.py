"""Ids of stored objects: a prefix naming the kind, then a random (version 4) UUID.

The random bytes come from `os.urandom`, read a few kilobytes at a time per thread rather
than 16 bytes per id: every `os.urandom` call lets go of the GIL around its system call,
and on a busy runtime taking the GIL back costs a thread switch (measured: about 50 us of
wall time per id under load, where the id itself needs 1). The bytes are the same kind
`uuid.uuid4()` uses; a forked child drops what its parent had read, so two processes never
hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

_CHUNK = 4096
"""Bytes read from the system at once: 256 ids."""


class _RandomBytes(threading.local):
    """A thread's unread random bytes (thread-local: no lock on the way to an id)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.offset = 0

    def take16(self) -> bytes:
        offset = self.offset
        if offset + 16 > len(self.buffer):
            self.buffer, offset = os.urandom(_CHUNK), 0
        self.offset = offset + 16
        return self.buffer[offset : offset + 16]


_random = _RandomBytes()


def _forget_after_fork() -> None:
    # In the child only the forking thread lives on: its bytes are the parent's too.
    _random.buffer, _random.offset = b"", 0


os.register_at_fork(after_in_child=_forget_after_fork)


def new_uuid() -> str:
    """A random UUID (version 4, RFC 4122 variant) as text, as `str(uuid.uuid4())`."""
    raw = bytearray(_random.take16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_id(prefix: str) -> str:
    """A fresh id such as `run-5c1e...`."""
    return f"{prefix}-{new_uuid()}"
