"""What the benchmark reads about processes: server CPU and memory from ``/proc``, our own CPU."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all threads), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces: the fields we want follow its ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in KB, or None."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def own_cpu_seconds() -> float:
    """CPU seconds this process used (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(slots=True)
class Sample:
    """CPU counters at one instant, for rates over a window."""

    wall: float
    own: float
    servers: list[float | None]

    @classmethod
    def take(cls, pids: list[int]) -> Sample:
        """Read the clocks now."""
        return cls(time.perf_counter(), own_cpu_seconds(), [cpu_seconds(p) for p in pids])

    def cpu_since(self, start: Sample) -> tuple[float, list[float | None]]:
        """(own CPU, each server's CPU) as fractions of one core since ``start``."""
        secs = max(self.wall - start.wall, 1e-9)
        servers: list[float | None] = []
        for before, after in zip(start.servers, self.servers, strict=True):
            servers.append(
                None if before is None or after is None else round((after - before) / secs, 3)
            )
        return round((self.own - start.own) / secs, 3), servers


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-file soft limit towards ``wanted``; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
