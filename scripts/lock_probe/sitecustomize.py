"""How late a sleeping thread of each train.py process gets the interpreter lock back.

Put this folder on PYTHONPATH and name a folder in MACFLEET_LOCK_PROBE; every `train.py` started
with that environment (the benchmarks' runs included) starts a thread that sleeps 0.5 ms at a
time and records how late it woke, and writes per half second the mean, median and 99th
percentile to MACFLEET_LOCK_PROBE/<pid>.json. Then print a line per process:

    MACFLEET_LOCK_PROBE=/tmp/probe PYTHONPATH=scripts/lock_probe:$PYTHONPATH \\
        macfleet benchmark --type scaling ... 
    python scripts/lock_probe/sitecustomize.py /tmp/probe

A wake-up is late by the timer's slack and the scheduler, and by however long another thread
holds the lock: compare the fleet's processes with the single-node references of the same run.
Which half seconds hold the timed steps the probe cannot tell (start-up and exit are slow too).
"""

import os
import sys

SLEEP_S = 0.0005
WINDOW_S = 0.5


def _probe(folder: str) -> None:
    import json
    import threading
    import time

    def run() -> None:
        late: list[float] = []
        windows: list[dict] = []
        path = os.path.join(folder, f"{os.getpid()}.json")
        since = time.perf_counter()
        while True:
            t = time.perf_counter()
            time.sleep(SLEEP_S)
            late.append(time.perf_counter() - t - SLEEP_S)
            if time.perf_counter() - since >= WINDOW_S:
                s, late, since = sorted(late), [], time.perf_counter()
                windows.append({"mean_us": 1e6 * sum(s) / len(s), "p50_us": 1e6 * s[len(s) // 2],
                                "p99_us": 1e6 * s[len(s) * 99 // 100]})
                with open(path, "w") as fh:
                    json.dump({"argv": sys.argv, "windows": windows}, fh)

    threading.Thread(target=run, name="lock-probe", daemon=True).start()


def _summary(folder: str) -> None:
    import glob
    import json

    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        d = json.load(open(path))
        tag = " ".join(a for a in d["argv"] if a.startswith(("cluster=", "compression=", "cluster.role=")))
        means = " ".join(f"{w['mean_us']:.0f}" for w in d["windows"])
        print(f"{os.path.basename(path)} {tag}\n  mean us late, per half second: {means}")


if __name__ == "__main__":
    _summary(sys.argv[1])
elif os.environ.get("MACFLEET_LOCK_PROBE") and sys.argv and sys.argv[0].endswith("train.py"):
    _probe(os.environ["MACFLEET_LOCK_PROBE"])
