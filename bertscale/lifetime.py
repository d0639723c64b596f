"""A process ends with the one that started it: no orphan trains on, holds a port or writes beside a new run.

- ``die_with_parent()``: the kernel kills this process when its parent dies, even by SIGKILL (Linux
  ``PR_SET_PDEATHSIG``); the deepspeed runner (set before it starts) and the shard build's processes use it.
- ``exit_when_gone(pid, started)``: a daemon thread that ends this process within a second or so once process
  ``pid`` is gone, where the kernel cannot tell (not Linux; or the process to outlive is not the parent: between
  the `bertscale pretrain` launcher and a rank sit DeepSpeed's runner and launcher, which keep their ranks
  running when their own parent dies).
- ``launcher_identity()`` / ``watch_launcher()``: how a rank on the launcher's host knows the launcher
  (``BERTSCALE_LAUNCHER=host:pid:start_time`` in its environment) and stops when it is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

LAUNCHER_ENV = "BERTSCALE_LAUNCHER"
"""``host:pid:start_time`` of the `bertscale pretrain` process that started a rank (same host only)."""


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_when_gone(pid: int, started: float | None = None, interval: float = 1.0, message: str = "") -> None:
    """End this process (exit status 1, ``message`` on stderr first) once process ``pid`` is gone; checked now and
    then every ``interval`` seconds in a daemon thread. ``started``: ``pid``'s start time (psutil's
    ``create_time``), which tells it from a later process given the same pid; without it ``pid`` must be this
    process's parent, whose death changes this process's parent pid."""

    def alive() -> bool:
        if started is None:
            return os.getppid() == pid
        import psutil

        try:
            return abs(psutil.Process(pid).create_time() - started) < 1.0
        except psutil.Error:
            return False

    def gone() -> None:
        try:
            if message:
                print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # our output went through the dead process's pipe
        finally:
            os._exit(1)

    if not alive():  # it died before the watch began
        gone()

    def watch() -> None:
        while alive():
            time.sleep(interval)
        gone()

    threading.Thread(target=watch, name="exit-when-gone", daemon=True).start()


def launcher_identity() -> str:
    """This process as ``LAUNCHER_ENV`` names it, for the ranks it starts on this host."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time()}"


def launched_here() -> bool:
    """Whether this process was started by a `bertscale pretrain` launcher on this host."""
    return os.environ.get(LAUNCHER_ENV, "").partition(":")[0] == socket.gethostname()


def watch_launcher(interval: float = 1.0) -> None:
    """In a rank: stop within seconds once the `bertscale pretrain` process that started it is gone (its lock on
    the run directory is then free for a second run that must not find this rank writing beside it)."""
    host, _, rest = os.environ.get(LAUNCHER_ENV, "").partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return
    try:
        start_time = float(started)
    except ValueError:
        return
    exit_when_gone(int(pid), start_time, interval,
                   f"rank {os.environ.get('RANK', '?')}: the bertscale launcher (pid {pid}) is gone; stopping")
