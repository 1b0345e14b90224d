"""Ids: version 4 UUIDs as `uuid.uuid4()` makes them, unique across threads and forks."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from messages._ids import new_id, new_uuid


def test_an_id_is_its_prefix_and_a_version_4_uuid_in_canonical_text() -> None:
    for _ in range(1_000):
        text = new_id("run")
        prefix, _, rest = text.partition("-")
        parsed = uuid.UUID(rest)
        assert prefix == "run"
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == rest  # lower-case hex, 8-4-4-4-12


def test_ids_from_many_threads_never_repeat() -> None:
    def draw(_: int) -> list[str]:
        return [new_uuid() for _ in range(5_000)]  # each thread reads several chunks

    with ThreadPoolExecutor(8) as pool:
        drawn = [u for batch in pool.map(draw, range(8)) for u in batch]
    assert len(set(drawn)) == len(drawn) == 40_000


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([new_uuid() for _ in range(100)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is a POSIX matter")
def test_a_forked_child_does_not_reuse_the_bytes_its_parent_read() -> None:
    new_uuid()  # the parent has read a chunk, most of it unused: a child must not reuse it
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    from_child = queue.get(timeout=30)
    child.join(30)
    from_parent = [new_uuid() for _ in range(100)]
    assert not set(from_child) & set(from_parent)
