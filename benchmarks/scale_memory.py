"""Child processes measured: wall time and the peak RSS of the whole process tree.

:func:`run_measured` runs a command to completion while a thread polls the tree's summed RSS and the
root's ``VmHWM``; :func:`zsl_command` and :func:`subprocess_env` are how the harness runs ``zsl``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from pipeline.core.timing import timed
from benchmarks.cli import OFFLINE_ENV

SUBPROCESS_ENV = OFFLINE_ENV

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    import psutil
except ImportError:  # not a dependency of the project: /proc is read instead (Linux)
    psutil = None


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            pass
    return out


def _proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pid: int) -> int:
    """Sum of the resident set sizes (bytes) of ``pid`` and all its descendants (0 if gone).

    psutil when it is importable, else ``/proc`` (Linux). Shared pages count once per process.
    """
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _proc_rss(p)
        todo.extend(_proc_children(p))
    return total


def _proc_hwm(pid: int) -> int:
    """``VmHWM`` (the peak RSS of ``pid`` since its last exec) in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def self_rss() -> int:
    """This process's resident set size in bytes."""
    return _proc_rss(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_measured(cmd: list[str], *, log: Path, env: dict | None = None, cwd: str | None = None,
                 poll_s: float = 0.05, what: str = "") -> dict:
    """Run ``cmd`` to completion; wall seconds and the peak RSS of its process tree.

    The main thread blocks in ``waitpid`` (exact end time); a thread polls every ``poll_s`` the summed
    RSS of the process tree and the root process's ``VmHWM`` (its own peak since exec, which also
    catches spikes between two polls). ``peak_rss_bytes`` is the larger of the two (both are lower
    bounds of the true tree peak). The kernel's ``ru_maxrss`` of a child is not used: on Linux it
    is carried over from the parent's memory at a vfork/exec, so it reads as this harness's size.
    Raises ``RuntimeError`` with the tail of the log when the command fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    peak = {"bytes": 0, "hwm": 0, "samples": 0}
    with open(log, "wb") as fh, timed() as clock:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)

        def poll() -> None:
            while not stop.is_set():
                hwm = _proc_hwm(proc.pid)
                peak["bytes"] = max(peak["bytes"], tree_rss(proc.pid))
                peak["hwm"] = max(peak["hwm"], hwm)
                peak["samples"] += 1
                stop.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            _, status = os.waitpid(proc.pid, 0)
        except BaseException:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
            stop.set()
            raise
        seconds = clock.elapsed()
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what or cmd[0]} exited with status {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": max(peak["bytes"], peak["hwm"]),
            "polled_tree_peak_rss_bytes": peak["bytes"], "root_hwm_bytes": peak["hwm"], "rss_samples": peak["samples"]}


def mb(b: float | None) -> float | None:
    """Bytes as MiB, one decimal (None stays None)."""
    return None if b is None else round(b / 2**20, 1)


def subprocess_env(tmp: Path) -> dict:
    """This environment with ``SUBPROCESS_ENV``, scratch files under ``tmp`` and Ray's temp dir outside it."""
    env = dict(os.environ)
    env.update(SUBPROCESS_ENV)
    env["TMPDIR"] = str(tmp)
    env["ZSL_RAY_TMPDIR"] = env.get("ZSL_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "zsl-ray"))
    return env


def zsl_command() -> list[str]:
    """The installed ``zsl`` console script, else this interpreter running the same entry point."""
    exe = Path(sys.executable).parent / "zsl"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from jobs.cli import run; run()"]


def rss_polling() -> str:
    """How the tree's RSS is read, for the results."""
    return "psutil" if psutil is not None else "/proc (psutil is not installed)"
