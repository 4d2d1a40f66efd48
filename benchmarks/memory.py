"""Process memory of a benchmark child on Linux, from ``/proc/self``.

``peak_rss()`` is the kernel's high-water mark (VmHWM). ``reset_peak()`` sets it to the
current RSS (write 5 to ``/proc/self/clear_refs``, Linux >= 4.0) so a measurement excludes
the import-time peak; where that is unsupported it returns False and ``peak_rss`` falls back
to ``ru_maxrss`` (the whole process's peak). VmHWM is reset by execve, unlike ``ru_maxrss``,
which Linux carries from a forked parent into its exec'd child.
"""
from __future__ import annotations

import resource

__all__ = ["current_rss", "peak_rss", "reset_peak"]


def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss() -> int:
    """Resident set size now (bytes)."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Peak mark := current RSS; False where the kernel does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS of this process image (bytes) since start or the last ``reset_peak``."""
    peak = _status("VmHWM")
    return peak if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
