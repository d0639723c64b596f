"""Writing files safely: every file bertscale writes goes through here.

- ``write_atomic(path, data)``: text or bytes written to a temporary name unique to this host and
  process, flushed, then renamed over ``path``. A reader (another rank, another node's launcher, a
  resumed run) sees the old file or the whole new one, never half of one.
- ``atomic_output(path)``: the same for writers that want a path of their own (``torch.save``,
  safetensors, a tar writer): write to the yielded temporary path; it is renamed into place when
  the block ends without an exception and removed when it does not.
- ``ExclusiveLock(path, what)``: a POSIX record lock (``fcntl.lockf``, which NFS honours) held for as
  long as the owning process lives. The lock file records host, pid and start time so the refusal
  names the owner; a crashed owner's lock is released by the kernel, so nothing is left stuck.

Files get the permissions of the process's umask (readable by the group, like any other output),
not the 0600 that ``tempfile`` and some writers (safetensors) give their files.

- ``open_log(path)``: a text file opened for appending, one line at a time (``OUT/train.log``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from typing import TextIO
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread creating a
    file meanwhile would otherwise get a mask of 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: Path) -> None:
    """Widen a file its writer created private (safetensors makes 0600) to what ``open`` gives a new file."""
    mode = path.stat().st_mode
    wanted = (mode & 0o777) | (0o666 & ~_umask())
    if stat.S_ISREG(mode) and mode & 0o777 != wanted:
        os.chmod(path, wanted)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _describe_os_error(exc: OSError, path: Path) -> OSError:
    """The same error class, with a message that names the file and says what happened in words."""
    if exc.errno == errno.ENOSPC:
        return OSError(exc.errno, f"no space left on device while writing {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(exc.errno, f"cannot write {path}: permission denied or read-only file system")
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _as_umask_allows(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _describe_os_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, *, sync: bool = True) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` so that no reader ever sees a partial file.

    ``sync=False`` skips the fsync, for work files that are rebuilt when lost (a crash still never
    leaves half a file under the name).
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    return path


def open_log(path: str | os.PathLike) -> TextIO:
    """``path`` opened for appending text, flushed line by line, so a reader (``tail -f``, a person after a
    crash) sees every finished line. The directory is created if needed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise _describe_os_error(exc, path) from exc


class WriteError(OSError):
    """A write that failed for a reason of the machine (a full disk, a permission), said in words: the
    message is the whole story, no traceback needed."""


def write_failure(exc: BaseException, path: Path) -> str | None:
    """A failed write under ``path`` in words ("no space left on device at PATH"), or None if ``exc`` is
    not one. torch and safetensors report a full disk without an errno ("file write failed", "iostream
    error", "StorageFull"); the file system's free space then tells."""
    path = Path(path)
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return f"no space left on device at {path}"
    if code == errno.EDQUOT:
        return f"disk quota exceeded at {path}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied or read-only file system"
    text = str(exc).lower()
    if not any(k in text for k in ("write failed", "iostream", "unexpected pos", "no space left", "storagefull",
                                   "os error 28")):
        return None
    probe = next((p for p in (path, *path.parents) if p.exists()), None)
    if probe is not None:
        usage = shutil.disk_usage(probe)
        if usage.free < max(64 * 2 ** 20, usage.total // 100):
            return f"no space left on device at {path} ({usage.free // 2 ** 20} MiB free)"
    return f"writing under {path} failed ({str(exc).strip().splitlines()[-1]})"


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it."""


class ExclusiveLock:
    """An exclusive lock on ``path`` for the life of this process (or until ``release``).

    ``what`` names the guarded thing in the refusal, e.g. ``"run directory runs/bert"``.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> ExclusiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockedError(f"{self.what} is in use by {self.owner()}; wait for it to finish or stop it, "
                              f"or use another directory") from None
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def owner(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')})"

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def require_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there; a clear error names it if not.

    Commands call this before long work (tokenizer training, a shard build), not after it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _temporary_name(path / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.ENOTDIR: "a file is in the way"}.get(exc.errno, exc.strerror or str(exc))
        raise PermissionError(f"cannot write to the {what} {path} ({why}); choose a directory you can write to")\
            from None
    return path
