"""Time from a restart to every run recovered, after the runtime was killed with kill -9.

A child process drives many groups with slow sleeptime agents, so runs pile up, and is
killed with SIGKILL; a new runtime on the same database then re-queues and finishes every
run it left open. Prints the open runs found and the seconds until all were terminal.

    python bench/recovery.py
    python bench/recovery.py --db postgresql://user@127.0.0.1:5432/recovery
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from messages import MessageCreate, RunStatus

SLOW = {"kind": "simulated", "config": {"latency_ms": 40, "jitter_ms": 20, "seed": 1}}


def child(url: str, groups: int) -> None:
    """Drive `groups` groups as fast as they go until killed."""
    rt = Runtime.start(url, workers=16)
    ids = [
        rt.create_group(primary={"kind": "scripted"}, sleeptime=[SLOW, SLOW], frequency=1).id
        for _ in range(groups)
    ]
    print("ready", flush=True)

    def drive(group_id: str) -> None:
        while True:
            rt.step(group_id, [MessageCreate(role="user", content="my number is 7")])

    for group_id in ids:
        threading.Thread(target=drive, args=(group_id,), daemon=True).start()
    threading.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--drive-seconds", type=float, default=3.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'recovery.db'}"
        if args.child:
            child(url, args.groups)
            return 0
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", "--db", url, "--groups", str(args.groups)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "SLEEPTIME_LOG_LEVEL": "critical"},
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        threading.Event().wait(args.drive_seconds)  # let runs pile up
        process.send_signal(signal.SIGKILL)
        process.wait()
        started = time.perf_counter()
        with Runtime.start(url, workers=64) as rt:
            open_runs = rt.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
            runs = rt.wait_for_runs([r.id for r in open_runs], timeout=600)
            recovered = time.perf_counter() - started
            report = rt.check_invariants()
        print(f"open runs after kill -9        {len(open_runs)}")
        requeued = sum(r.attempt > 1 for r in runs)
        print(f"  interrupted mid-run          {requeued} (re-queued, attempt 2)")
        print(f"seconds to all runs terminal   {recovered:.2f}")
        print(
            f"completed / failed             {sum(r.status is RunStatus.COMPLETED for r in runs)}"
            f" / {sum(r.status is RunStatus.FAILED for r in runs)}"
        )
        print(f"invariants hold                {report.ok}")
        return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
