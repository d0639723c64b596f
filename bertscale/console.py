"""What a run shows on the console, and ``OUT/train.log``, which keeps it.

The launcher relays its ranks' output line by line (``RunLog.relay``): third-party noise (``NOISE``) is
dropped, every other line goes to the console and is appended to ``OUT/train.log`` together with the
launcher's own log lines (configuration summary, phase transitions, the failure summary). Each attempt
appends under a header line with date, host and pid, so the log of a resumed run reads from its first
attempt to its last without TensorBoard.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import IO, TextIO

from tqdm import tqdm

from bertscale.files import open_log

NOISE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"You are using ZeRO with an untested optimizer"),
     "DeepSpeed warns about any optimizer not its own; bertscale.lamb is tested under ZeRO 1-3 "
     "(tests/test_recipe_zero_lamb.py)"),
    (re.compile(r"Unable to find hostfile, will proceed with training with local resources only"),
     "a single-node run has no hostfile by design"),
    (re.compile(r"\[launch\.py:\d+:sigkill_handler\]"),
     "DeepSpeed stopping the other ranks after one failed: the launcher's failure summary names the rank and why"),
    (re.compile(r"^Processing zero checkpoint '"), "every rank consolidating the previous phase's weights"),
    (re.compile(r"^Parsing checkpoint created by deepspeed=="), "the same consolidation, per rank"),
    (re.compile(r"^Detected checkpoint of type zero stage "), "the same consolidation, per rank"),
    (re.compile(r"^Reconstructed fp32 state dict with "), "the same consolidation, per rank"),
    (re.compile(r"^Loading checkpoint shards: "), "the same consolidation's progress bar, per rank"),
    (re.compile(r"\[real_accelerator\.py:\d+:get_accelerator\] Setting accelerator to CPU"),
     "DeepSpeed finding no GPU where bertscale chose the CPU (conversion, CPU runs)"),
    (re.compile(r"\[base_optimizer\.py:\d+:load_hp_checkpoint_state_from_checkpoint_dir\] MPU is not provided"),
     "DeepSpeed loading a universal checkpoint (a world-size change) without tensor parallelism, which bertscale "
     "does not use"),
    (re.compile(r"^\s*$"), "blank lines"),
)
"""Lines kept off the console and out of train.log, each with the reason it is not news to the user."""


PROGRESS_SECONDS = 30.0
"""The longest a training phase stays silent on the console: a progress line comes when no line (an interval
line or another progress line) came for this long."""


class Progress:
    """Progress of one phase as plain lines, for the console and train.log, which are pipes (the launcher relays
    the ranks' output), so a ``\\r`` bar would never be drawn: between the log interval's lines, a line every
    ``every_s`` seconds with the step, the rate and the time left."""

    def __init__(self, name: str, start: int, end: int, step: int, every_s: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.start, self.end, self.every_s, self._clock = name, start, end, every_s, clock
        self._first_step, self._first_time = step, clock()
        self._last_line = self._first_time

    def update(self, step: int, logged: bool = False) -> str | None:
        """After ``step``: the progress line to print now, or None (``logged``: an interval line was just
        printed, which restarts the wait)."""
        now = self._clock()
        if logged or now - self._last_line < self.every_s or step >= self.end:
            if logged:
                self._last_line = now
            return None
        self._last_line = now
        done, total = step - self.start, self.end - self.start
        rate = (step - self._first_step) / max(now - self._first_time, 1e-9)
        left = f", about {duration((self.end - step) / rate)} left in the phase" if rate > 0 else ""
        return f"{self.name}: step {done}/{total} ({100 * done / total:.0f}%), {rate:.2f} steps/s{left}"


def progress_bar(**options) -> tqdm:
    """A tqdm bar for long work in this process (tokenizing, shard building): drawn in place on a terminal; off
    one (a pipe, a log file), where a ``\\r`` bar reads as one endless line, each state becomes a line of its
    own, at most one per ``PROGRESS_SECONDS``, and the final one when the bar closes."""
    if not sys.stderr.isatty():
        options = {**options, "file": _Frames(sys.stderr), "mininterval": PROGRESS_SECONDS, "dynamic_ncols": False}
    return tqdm(**options)


class _Frames(io.TextIOBase):
    """tqdm's output off a terminal: each frame drawn over the last (``\\r``) becomes a line."""

    def __init__(self, out: TextIO):
        self.out, self.last = out, ""

    def write(self, text: str) -> int:
        for frame in re.split(r"[\r\n]", text):
            frame = frame.strip()
            if frame and frame != self.last:
                self.out.write(frame + "\n")
                self.last = frame
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def duration(seconds: float) -> str:
    """Seconds as "1h 05m", "3m 20s" or "4.2s"."""
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def is_noise(line: str) -> bool:
    """Whether a line of output is third-party noise (``NOISE``)."""
    return any(pattern.search(line) for pattern, _ in NOISE)


def last_frame(line: str) -> str:
    """What a line drawn over with carriage returns (a progress bar off a terminal) finally shows."""
    return line.rstrip("\r\n").rsplit("\r", 1)[-1]


@contextlib.contextmanager
def filtered_output() -> Iterator[None]:
    """While it lasts, what this process writes to its standard output and error (``print``, tqdm bars, logging,
    C libraries: file descriptors 1 and 2) passes through the noise filter, line by line, as the ranks' output
    does (``RunLog.relay``); for third-party work run in this process, such as DeepSpeed's consolidation."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    pumps = []
    try:
        for fd, original in saved.items():
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            pumps.append(threading.Thread(target=_pump, args=(read, original), name=f"filter-{fd}", daemon=True))
            pumps[-1].start()
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)  # the pipe's last writer is gone: its pump reads to the end and stops
        for pump in pumps:
            pump.join(timeout=10.0)
        for original in saved.values():
            os.close(original)


def _pump(read: int, out: int) -> None:
    with open(read, "rb", closefd=True) as pipe:
        for raw in iter(pipe.readline, b""):
            line = last_frame(raw.decode("utf-8", errors="replace"))
            if not is_noise(line):
                with contextlib.suppress(OSError):
                    os.write(out, (line + "\n").encode("utf-8"))


class RunLog:
    """``OUT/train.log`` of one launcher process: ``write`` a line, ``relay`` a child's output through the
    noise filter to the console and the file, and (while open) every ``bertscale`` log record at INFO or
    above that the console shows is appended too."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self._file = open_log(self.path)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.write(f"==== {what}: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {socket.gethostname()} "
                   f"(pid {os.getpid()})")
        self._handler = _ToRunLog(self)
        logger = logging.getLogger("bertscale")
        logger.addHandler(self._handler)
        # the record keeps the launcher's INFO lines even where the console (an embedding program) hides them
        self._level = logger.level if logger.getEffectiveLevel() > logging.INFO else None
        if self._level is not None:
            logger.setLevel(logging.INFO)

    def write(self, line: str) -> None:
        """Append one line (the file only; the console has it already or gets it another way). A log that
        cannot be written (a full disk) is given up with one line on the console; the run goes on."""
        with self._lock:
            if self._file.closed:
                return
            try:
                self._file.write(line.rstrip("\n") + "\n")
            except OSError as exc:
                self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        print(f"{self.path}: cannot write ({exc.strerror or exc}); the rest of this run is on the console only",
              file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """Append a message under the time, as the launcher's log lines are."""
        for i, line in enumerate(message.splitlines() or [""]):
            self.write(f"{time.strftime('%H:%M:%S')} {line}" if i == 0 else line)

    def relay(self, pipe: IO[bytes], console: TextIO) -> None:
        """Copy a child's output (until it closes) to ``console`` and the file, line by line, without noise."""

        def pump() -> None:
            for raw in iter(pipe.readline, b""):
                line = last_frame(raw.decode("utf-8", errors="replace"))
                if is_noise(line):
                    continue
                try:
                    console.write(line + "\n")
                    console.flush()
                except (OSError, ValueError):
                    pass  # a closed console must not stop the record
                self.write(line)
            pipe.close()

        thread = threading.Thread(target=pump, name="relay", daemon=True)
        thread.start()
        self._threads.append(thread)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait for the relayed output to end (the child exited); a descendant that keeps the pipe open past
        ``timeout`` is not waited for."""
        for thread in self._threads:
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def close(self) -> None:
        logger = logging.getLogger("bertscale")
        logger.removeHandler(self._handler)
        if self._level is not None:
            logger.setLevel(self._level)
        self.drain(timeout=1.0)
        with self._lock:
            try:
                self._file.close()
            except OSError as exc:
                self._give_up(exc)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ToRunLog(logging.Handler):
    def __init__(self, run_log: RunLog):
        super().__init__(logging.INFO)
        self.run_log = run_log
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)
