"""The process the prune kill -9 test kills: it prunes a database in batches of one row.

Usage: python tests/prune_kill9_child.py DB_URL. Prints "pruning" once its runtime has
started, then prunes every group (runs, primary messages, turn requests) until killed.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime


def main(url: str) -> None:
    rt = Runtime.start(url, workers=4, lease_s=1.0)
    print("pruning", flush=True)
    rt.prune(
        before=datetime.now(UTC) + timedelta(hours=1),
        keep_runs=1,
        messages=True,
        keep_messages=2,
        batch_size=1,
    )
    print("done", flush=True)
    rt.stop()


if __name__ == "__main__":
    main(sys.argv[1])
