"""Ids of stored objects: a prefix naming the kind, then a random UUID."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    """A fresh id such as `run-5c1e...`."""
    return f"{prefix}-{uuid.uuid4()}"
