"""Processes that other processes watch: whether one still lives, and children that die with their parent.

A leaf module: it imports no other ``core`` module, so both the job lock (:mod:`core.app.jobs`) and the run
folder's status (:mod:`core.common.runs`) can name the process behind them and be judged by it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, which may itself hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the original process."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def process_record(pid: int) -> dict:
    """What a file needs to name a live process: its pid and start time (see :func:`record_alive`)."""
    return {"pid": pid, "pid_start": proc_start_time(pid)}


def pid_alive(pid: int | None, start_time: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, when known, the same one that was recorded."""
    if not isinstance(pid, int) or pid <= 0:  # also whatever a damaged status or lock file holds
        return False
    try:  # reap it if it is our own finished child, so it does not linger as a zombie
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except OSError:  # not our child
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    fields = stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    return start_time is None or fields is None or fields[19] == start_time


def record_alive(record: dict) -> bool:
    """Whether the process a :func:`process_record` names still lives."""
    return pid_alive(record.get("pid"), record.get("pid_start"))


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` after which the child gets ``sig`` when the process that
    started it dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG); None where that does not exist.

    Only for a parent without other threads: ``preexec_fn`` runs between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: loading anything in the forked child is unsafe
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl: nobody would send the signal
            os.kill(os.getpid(), sig)

    return preexec
