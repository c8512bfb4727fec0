"""What machine a benchmark ran on (imported by the scripts beside it: `python bench/NAME.py`)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ticks() -> tuple[float, int, int] | None:
    """(wall time, busy clock ticks of the whole machine, ticks of this process) from /proc, or
    None off Linux: what `other_cores` compares."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]          # all but idle and iowait
    return time.monotonic(), busy, int(own[11]) + int(own[12])   # utime + stime


def other_cores(before, after) -> float | None:
    """The cores other processes kept busy between two cpu_ticks() readings, on average. A
    load average would count this process's own threads: a 2-thread benchmark alone shows ~2."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / hz / (after[0] - before[0]))
