"""Memory figures from /proc, shared by the benchmarks (Linux; each script says what it needs)."""

from __future__ import annotations


def _field(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in {path}")


def status(field: str) -> int:
    """Bytes of ``field`` (``VmRSS``, ``VmHWM``, ...) in this process's /proc/self/status."""
    return _field("/proc/self/status", field)


def meminfo(field: str) -> int:
    """Bytes of ``field`` (``MemAvailable``, ``MemTotal``, ...) in /proc/meminfo."""
    return _field("/proc/meminfo", field)
