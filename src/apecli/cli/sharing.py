"""How the command line shares the machine with other work.

torch's CPU kernels run on OpenMP threads, and GNU OpenMP's threads spin while they wait for each other
(300,000 turns of a loop, by default). Where another process keeps a core busy, a thread that spins
takes that core's time from the thread it waits for: a search took 1.6 times as long. Threads that
sleep as they wait (``OMP_WAIT_POLICY=PASSIVE``) give the core back, but on a quiet machine their
waking costs a few per cent (benchmarks/busy_machine.py measures both). So the command line looks,
as it starts, whether another process is running: if one is, its threads sleep while they wait; on a
quiet machine they wait as OpenMP has them by default.

It decides before torch is first imported (OpenMP reads its settings then), and not at all where the
user set OpenMP's waiting; a program that calls the library chooses for itself.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, MutableMapping

WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # the standard's, GNU's and Intel's settings
SHARING = {"OMP_WAIT_POLICY": "PASSIVE"}
READINGS = 3


def others_running() -> bool:
    """Whether another process is running on the machine now (Linux: the kernel's count of runnable
    tasks, this one included; elsewhere: a load average of one or more)."""
    try:
        counts = []
        for _ in range(READINGS):  # the fewest of a few readings: a task of the kernel's that runs a moment is none
            with open("/proc/loadavg") as handle:
                counts.append(int(handle.read().split()[3].split("/")[0]))
            time.sleep(0.001)
        return min(counts) > 1
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0] >= 1.0
    except (OSError, AttributeError):
        return False


def share_cores(environ: MutableMapping[str, str] = os.environ,
                busy: Callable[[], bool] = others_running) -> dict[str, str]:
    """Where another process is running, have OpenMP's threads sleep while they wait, unless the user
    set how they wait or torch has started its threads already; return what it set."""
    if any(name in environ for name in WAITING) or "torch" in sys.modules or not busy():
        return {}
    environ.update(SHARING)
    return dict(SHARING)
