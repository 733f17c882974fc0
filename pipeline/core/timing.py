"""How long a step took: :func:`timed` instead of hand-written ``perf_counter`` pairs."""

from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Timing:
    """Seconds a :func:`timed` block took: running while the block runs, final once it exits."""

    start: float
    seconds: float = 0.0
    done: bool = False

    def elapsed(self) -> float:
        """Seconds so far (the final figure once the block has exited)."""
        return self.seconds if self.done else time.perf_counter() - self.start


@contextmanager
def timed(what: str | None = None, *, log: logging.Logger | None = None, level: int = logging.INFO) -> Iterator[Timing]:
    """Time a block; with ``log``, log ``"<what>: <seconds> s"`` at ``level`` when it ends.

    >>> with timed() as t:
    ...     _ = sum(range(1000))
    >>> t.done and t.seconds >= 0
    True
    """
    t = Timing(start=time.perf_counter())
    try:
        yield t
    finally:
        t.seconds, t.done = time.perf_counter() - t.start, True
        if log is not None and what:
            log.log(level, "%s: %.2f s", what, t.seconds)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement of this process (Linux: ``/proc/self/clear_refs``); False where
    the peak cannot be reset (then :func:`peak_rss_bytes` is the process's peak since it started)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS since :func:`reset_peak_rss` (``VmHWM``), or since it started."""
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
