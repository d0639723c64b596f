"""The run directory (``run.out_dir``): every path of one run, and the records ranks leave in it.

    OUT/run_config.json          the resolved configuration (written by node 0's launcher)
    OUT/run_config.nodeR.json    in --no_ssh mode, each node's own copy (its workers read it)
    OUT/.deepspeed_env[.nodeR]   variables the deepspeed launcher exports to remote ranks
    OUT/hostfile.no_ssh.nodeR    the hostfile DeepSpeed's --no_ssh mode sizes the job from
    OUT/.lock                    held by the launcher training in this directory (node 0's)
    OUT/train.log[.nodeR]        the console's lines of every attempt, appended (``bertscale.console``)
    OUT/checkpoints/             one directory per checkpoint (see ``bertscale.checkpoint``)
    OUT/tensorboard/             TensorBoard events (rank 0)
    OUT/failures/rank-NNNNN.txt  a failed rank's traceback and one-line summary, for people
    OUT/exits/rank-NNNNN.json    how each rank ended (ok, stopped, error; when; whether it lost a peer or
                                 found its port taken), for the launcher to name the rank that failed first

Everything is written through ``bertscale.files``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bertscale.files import ExclusiveLock, WriteError, write_atomic

_ADDRESS_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use")
_PEER_LOST = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|Socket Timeout|timeout after|"
    r"NCCL communicator was aborted|ncclRemoteError|ncclSystemError|DistNetworkError|DistStoreError")


@dataclass(frozen=True)
class RunDir:
    """The layout of one ``run.out_dir``. ``node_rank`` is set in --no_ssh mode, where every node runs
    its own launcher against the shared directory and keeps its own copies of the per-node files."""

    root: Path
    node_rank: int | None = None

    @classmethod
    def of(cls, cfg) -> RunDir:
        """The run directory of a ``RunConfig``."""
        d = cfg.distributed
        return cls(Path(cfg.run.out_dir), d.node_rank if d.no_ssh else None)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def failures(self) -> Path:
        return self.root / "failures"

    @property
    def exits(self) -> Path:
        return self.root / "exits"

    @property
    def train_log(self) -> Path:
        """What this node's launcher showed on the console, every attempt appended (``bertscale.console``)."""
        return self.node_file("train.log")

    @property
    def config(self) -> Path:
        """The run's own record of its resolved configuration (``tools/run_summary.py`` reads it)."""
        return self.root / "run_config.json"

    def node_file(self, name: str) -> Path:
        """``name`` in the run directory, or this node's own ``NAME.nodeR`` copy in --no_ssh mode."""
        if self.node_rank is None:
            return self.root / name
        tag = f".node{self.node_rank}"
        return self.root / (name[: -len(".json")] + tag + ".json" if name.endswith(".json") else name + tag)

    def lock(self) -> ExclusiveLock:
        """Hold the directory for this process's lifetime; refused at once, naming the holder, while
        another live launcher trains here. The kernel releases it when the holder dies."""
        return ExclusiveLock(self.root / ".lock", f"run directory {self.root}").acquire()

    def write(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, text)

    # ---------------------------------------------------------------- how ranks ended

    def record_exit(self, rank: int, status: str, exc: BaseException | None = None) -> None:
        """Leave how this rank ended where the launcher looks (``status``: ok, stopped or error).

        For an error the traceback goes to ``failures/rank-NNNNN.txt`` and a one-line summary to
        stderr; if the run directory cannot be written (a full disk), the whole report goes to
        stderr instead, so it reaches the console either way. Never raises.
        """
        record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                  "status": status}
        report = None
        if exc is not None:
            in_use = address_in_use(exc)
            record.update(summary=summarize(exc), peer_lost=lost_a_peer(exc) and not in_use, address_in_use=in_use)
            report = "".join(traceback.format_exception(exc)) + f"rank {rank} on {record['host']}: {record['summary']}\n"
        try:
            if report is not None:
                self.write(self.failures / f"rank-{rank:05d}.txt", report)
            self.write(self.exits / f"rank-{rank:05d}.json", json.dumps(record) + "\n")
        except OSError as err:
            if report is not None:
                # a problem of the machine (WriteError) is said in words; anything else keeps its traceback
                shown = f"rank {rank} failed: {record['summary']}\n" if isinstance(exc, WriteError) else report
                print(f"{shown}(this report could not be saved in {self.failures}: {err})", file=sys.stderr,
                      flush=True)
            return
        if report is not None:
            print(f"rank {rank} failed: {record['summary']} (traceback in {self.failures / f'rank-{rank:05d}.txt'})",
                  file=sys.stderr, flush=True)

    def exits_since(self, since: float) -> dict[int, dict]:
        """Exit records written at or after ``since`` (this attempt), by rank."""
        found = {}
        if not self.exits.is_dir():
            return found
        for file in self.exits.glob("rank-*.json"):
            try:
                if file.stat().st_mtime < since:
                    continue
                record = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            record["report"] = str(self.failures / f"rank-{int(record['rank']):05d}.txt")
            found[int(record["rank"])] = record
        return found


def summarize(exc: BaseException) -> str:
    """One line: the exception's class and message (the last line of its traceback)."""
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def address_in_use(exc: BaseException) -> bool:
    """Whether this rank failed to listen on a port another process holds (rank 0 opening the rendezvous
    on the master port): a cause of its own, not a lost peer, though torch raises it as a DistNetworkError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.EADDRINUSE or _ADDRESS_IN_USE.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def lost_a_peer(exc: BaseException) -> bool:
    """Whether the error this started from is a collective that lost its peer (a connection reset, a
    timeout): what every surviving rank reports after another rank died, i.e. a consequence."""
    root = exc
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    try:
        import torch.distributed as dist

        if isinstance(root, (dist.DistNetworkError, dist.DistStoreError)):
            return True
    except (ImportError, AttributeError):
        pass
    return bool(_PEER_LOST.search(f"{type(root).__name__}: {root}"))
