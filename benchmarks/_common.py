"""Helpers shared by the benchmark scripts (formatting, load detection on a shared machine)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


class ForeignLoad:
    """CPU time that OTHER processes used while a block ran, as a fraction of all CPUs.

    The machine may be shared (tests of other engineers running on the same cores);
    with 2 threads on 2 cores, any foreign load stalls every parallel region.
    """

    def __enter__(self):
        import resource

        self._stat0 = self._busy_ticks()
        self._own0 = self._own_seconds(resource)
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import resource

        wall = time.perf_counter() - self._wall0
        busy = (self._busy_ticks() - self._stat0) / os.sysconf("SC_CLK_TCK")
        own = self._own_seconds(resource) - self._own0
        self.fraction = max(0.0, (busy - own) / (wall * os.cpu_count())) if wall > 0 else 0.0
        return False

    @staticmethod
    def _busy_ticks() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]

    @staticmethod
    def _own_seconds(resource) -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total


def wait_until_idle(max_wait: float, *, threshold: float = 0.1, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use < ``threshold`` of the CPUs.

    Returns the foreign load of the last window. ``max_wait`` 0 only measures one window.
    """
    deadline = time.perf_counter() + max_wait
    while True:
        with ForeignLoad() as load:
            time.sleep(window)
        if load.fraction < threshold or time.perf_counter() >= deadline:
            return load.fraction


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def warn_if_loaded(records: list[dict], what: str) -> None:
    """Print a warning when some measurements ran while other processes used >10% of the CPUs."""
    loaded = [r for r in records if r.get("foreign_cpu_load", 0) > 0.1]
    if loaded:
        print(f"warning: {len(loaded)} {what} ran while other processes used >10% of the CPUs "
              f"(marked *); rerun with --wait-idle 120 on a quiet machine. "
              f"load average at end: {loadavg()}")


def write_json(path: str, benchmark: str, *, config: dict, **results) -> None:
    """Write a benchmark's results with the date and the versions that produced them."""
    import pyro
    import torch

    payload = {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "machine": platform.machine()},
        **results,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, target)  # a stop mid-write leaves the previous file whole (bench_compression rewrites it per seed)
    print(f"wrote {target}")
