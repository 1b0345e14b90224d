"""The process the kill -9 test kills: it drives turns until it is killed.

Usage: python tests/kill9_child.py DB_URL SEED. Prints "ready" once its groups exist and
"turn" after each turn it completed, so the test can kill it in the middle of things.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from messages import MessageCreate


def main(url: str, seed: int) -> None:
    slow = {
        "kind": "simulated",
        "config": {"latency_ms": 15, "jitter_ms": 10, "seed": seed, "failure_rate": 0.05},
    }
    rt = Runtime.start(url, workers=8)
    groups = [
        rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}, slow], frequency=frequency
        ).id
        for frequency in (1, 2, None, 3)
    ]
    print("ready", flush=True)
    lock = threading.Lock()

    def drive(group_id: str) -> None:
        for n in range(10_000):
            rt.step(group_id, [MessageCreate(role="user", content=f"my number is {n}")])
            with lock:
                print("turn", flush=True)

    threads = [threading.Thread(target=drive, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
