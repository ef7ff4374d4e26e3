"""How busy the rest of the machine was while the bench measured: a noise meter.

Machine-wide busy time (``/proc/stat``) minus what the bench's own processes used (the servers,
wrk, this process) is what other processes took. On a shared 2-core machine that figure says how
far to trust a run: the ratios are made robust to it, the absolute figures are not.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def _own() -> float:
    """CPU seconds of this process and its reaped children (the wrk runs)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Noise:
    elapsed_s: float = 0.0
    other_share: float = 0.0
    """Share of all CPUs that processes other than the bench's kept busy."""
    steal_share: float = 0.0
    """Share of all CPUs the hypervisor gave to other machines."""


class CpuMeter:
    """Measures :class:`Noise` over a ``with`` block; ``servers_cpu`` sums the servers' CPU."""

    def __init__(self, servers_cpu: Callable[[], float]):
        self.servers_cpu = servers_cpu
        self.noise = Noise()
        self._start: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def __enter__(self) -> CpuMeter:
        self._start = (time.monotonic(), *_machine(), _own(), self.servers_cpu())
        return self

    def __exit__(self, *_exc: object) -> None:
        started, busy, steal, own, servers = self._start
        elapsed = time.monotonic() - started
        busy_now, steal_now = _machine()
        ours = (_own() - own) + (self.servers_cpu() - servers)
        capacity = elapsed * (os.cpu_count() or 1)
        if capacity > 0:
            self.noise = Noise(elapsed, max(0.0, (busy_now - busy - ours) / capacity),
                               (steal_now - steal) / capacity)


def combined(parts: list[Noise]) -> Noise:
    """Several metered spans as one: their shares weighted by how long each lasted."""
    elapsed = sum(p.elapsed_s for p in parts)
    if elapsed <= 0:
        return Noise()
    return Noise(elapsed, sum(p.other_share * p.elapsed_s for p in parts) / elapsed,
                 sum(p.steal_share * p.elapsed_s for p in parts) / elapsed)
