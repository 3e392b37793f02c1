"""Memory accounting: the process's real RAM high-water mark, current RSS and peak VRAM per device."""
from __future__ import annotations

import os
import sys


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in KiB, or None when unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark in bytes: /proc VmHWM where Linux has it (ru_maxrss
    would report a forking parent's size for a child until the child outgrows it), else ru_maxrss."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (maxrss if sys.platform == "darwin" else maxrss * 1024) or current_rss_bytes()
    except (ImportError, OSError):
        return current_rss_bytes()


def current_rss_bytes() -> int:
    """The process's resident set size now, in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform
        return 0


def peak_vram_bytes() -> dict[str, int]:
    """Peak bytes allocated by torch per CUDA device ("cuda:0": n, ...); {} without CUDA.

    Only reads devices when CUDA is already initialized, so calling it never creates a CUDA
    context (and never costs VRAM) in a CPU-only run.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


def reset_peak_vram() -> None:
    """Reset torch's per-device peak counters (no-op without an initialized CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def human_bytes(n: int | float) -> str:
    """Binary units: 512 B, 1.5 KiB, 3.2 MiB, 7.1 GiB, 1.0 TiB."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if round(n, 1) < 1024 or unit == "TiB":
            return f"{sign}{n:.1f} {unit}"
    raise AssertionError("unreachable")
