"""The process the delete kill -9 test kills: it fills groups, then deletes them one by one.

Usage: python tests/lifecycle_kill9_child.py DB_URL SEED. Prints "group ID AGENT_IDS..."
for each group it made, "ready", then "deleting ID" before each delete (and "deleted ID"
after it), so the test can kill it in the middle of one. Slow sleeptime agents keep runs
open while the groups are deleted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime

GROUPS = 6
TURNS = 40


def main(url: str, seed: int) -> None:
    slow = {"kind": "simulated", "config": {"latency_ms": 30, "jitter_ms": 10, "seed": seed}}
    rt = Runtime.start(url, workers=8, lease_s=3.0)  # (the test restarts after they expire)
    groups = [
        rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}, slow])
        for _ in range(GROUPS)
    ]
    for group in groups:
        print("group", group.id, group.primary_agent_id, *group.sleeptime_agent_ids, flush=True)
        for n in range(TURNS):
            rt.record_turn(
                group.id,
                [
                    {"role": "user", "content": f"my number is {n}"},
                    {"role": "assistant", "content": f"noted: {n}"},
                ],
            )
    print("ready", flush=True)
    for group in groups:
        print("deleting", group.id, flush=True)
        rt.delete_group(group.id)
        print("deleted", group.id, flush=True)
    rt.stop(drain_timeout=0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
