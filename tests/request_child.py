"""The process the request id test kills with -9 between a turn's commit and its reply.

Usage: python tests/request_child.py DB_URL GROUP_ID REQUEST_ID. It steps the group once
with the request id; as soon as the turn is committed, before the caller is answered, it
prints the answer the caller would have had (a TurnResult as JSON) and kills itself.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from messages import MessageCreate
from persistence import Store, TurnWrite


def die_after_the_commit() -> None:
    """Make the store kill this process once a turn taken with a request id committed."""
    record_turn = Store.record_turn

    def record_then_die(store: Store, turn: TurnWrite) -> Future[None]:
        committed = record_turn(store, turn)
        if turn.request is not None:
            committed.result()
            print(turn.request.result.model_dump_json(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return committed

    Store.record_turn = record_then_die  # type: ignore[method-assign,assignment]


def main(url: str, group_id: str, request_id: str) -> None:
    rt = Runtime.start(url)
    die_after_the_commit()
    rt.step(group_id, [MessageCreate(role="user", content="my name is Ada")], request_id=request_id)
    print("answered: the kill came too late", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
