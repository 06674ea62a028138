"""What the benchmarks read from /proc: CPU seconds of a process or thread, this process's RSS.

One place for the parsing, so every table counts CPU and memory the same way.
"""

from __future__ import annotations

import os

__all__ = ["cpu_s", "thread_cpu_s", "rss_mb"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> float:
    """user + system seconds from a ``stat`` file; 0 if it cannot be read (the process is gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_s(pid: int | str | None = "self") -> float:
    """CPU seconds (user + system) process ``pid`` has used so far; 0 if unknown or gone."""
    return 0.0 if pid is None else _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu_s(*tids: int) -> float:
    """CPU seconds (user + system) of this process's threads with these native ids, summed."""
    return sum(_stat_cpu(f"/proc/self/task/{tid}/stat") for tid in tids)


def rss_mb() -> float:
    """This process's resident set size in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
