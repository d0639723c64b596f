"""What a run shows on the console, and ``OUT/train.log``, which keeps it.

The launcher relays its ranks' output line by line (``RunLog.relay``): third-party noise (``NOISE``) is
dropped, every other line goes to the console and is appended to ``OUT/train.log`` together with the
launcher's own log lines (configuration summary, phase transitions, the failure summary). Each attempt
appends under a header line with date, host and pid, so the log of a resumed run reads from its first
attempt to its last without TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, TextIO

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
    (re.compile(r"^\s*$"), "blank lines"),
)
"""Lines kept off the console and out of train.log, each with the reason it is not news to the user."""


def is_noise(line: str) -> bool:
    """Whether a line of output is third-party noise (``NOISE``)."""
    return any(pattern.search(line) for pattern, _ in NOISE)


def last_frame(line: str) -> str:
    """What a line drawn over with carriage returns (a progress bar off a terminal) finally shows."""
    return line.rstrip("\r\n").rsplit("\r", 1)[-1]


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
