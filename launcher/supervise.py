"""Running the phases: one `deepspeed` launch per phase, its output relayed through the run log, its ranks
watched, stop signals forwarded so the ranks save first, a raced master port retried once."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bertscale import checkpoint as ckpt
from bertscale import lifetime
from bertscale.config import DECIDED, RunConfig
from bertscale.console import RunLog
from bertscale.hardware import Precision
from bertscale.rundir import RunDir
from launcher import ports
from launcher.diagnose import failure_message
from launcher.environment import merged_environment
from launcher.plan import PhasePlan, no_ssh_hostfile, node_file

log = logging.getLogger("bertscale.launcher")

class RunStopped(Exception):
    """A stop signal (SIGTERM/SIGINT) ended the run before its last phase finished; the ranks saved first.
    Not a failure: re-running the same command continues."""

    def __init__(self, step: int | None, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = (f"stopped at step {step}, checkpoint saved ({checkpoint}); re-run to continue"
                 if checkpoint is not None else "stopped before the first checkpoint; re-run to start again")
        super().__init__(where)


class RunFailed(RuntimeError):
    """A phase failed on some rank; the message names the rank that failed first and how."""


class _Forwarder:
    """Relays SIGTERM/SIGINT to the worker ranks so they finish the step, save and exit 0.

    The deepspeed launcher runs in its own session: a signal to our process group reaches only us,
    and we send SIGTERM to the ranks themselves (the deepspeed launcher would SIGKILL them after 30 s).
    A second signal kills the whole launch.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signalled = 0

    def __enter__(self) -> "_Forwarder":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def kill(self) -> None:
        """SIGKILL the deepspeed launcher's whole session (it and every rank it started)."""
        if self.child is not None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone

    def _handle(self, signum: int, frame) -> None:
        self.signalled += 1
        if self.child is None:
            return
        if self.signalled > 1:
            self.kill()
            return
        log.warning("received %s: asking every rank to save and stop", signal.Signals(signum).name)
        try:
            tree = psutil.Process(self.child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        workers = [p for p in tree if _is_rank(p)]
        for proc in workers or tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


def _runs_train_module(proc) -> bool:
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - a process that vanished or that we may not inspect
        return False
    return any(a == "-m" and b == "bertscale.train" for a, b in zip(cmd, cmd[1:]))


def _is_rank(proc) -> bool:
    """A rank: ``python -m bertscale.train``, and not one of a rank's data-loader workers (forked, same
    command line). Not the deepspeed launcher either (its arguments name the module too): a SIGTERM to
    it would tear the ranks down instead of letting them save."""
    if not _runs_train_module(proc):
        return False
    try:
        return not _runs_train_module(proc.parent())
    except Exception:  # noqa: BLE001
        return True


def run_phases(cfg: RunConfig, plans: list[PhasePlan], source: ckpt.CheckpointInfo | None,
               accelerator: str, run_log: RunLog, port: int | None = None, precision: Precision | None = None) -> None:
    """Start each unfinished phase in turn. ``port``: a master port picked for this run (not configured);
    if another process takes it before rank 0 listens, the phase is started once more on a fresh one.
    ``precision``: the launcher's choice (``cfg.train.precision`` already holds its name); the resolved
    configuration written for the ranks records why under ``decided``."""
    if port is None:
        ports.check_port(cfg)
    else:
        log.info("master port %d: a free port picked for this single-node run (set distributed.master_port to "
                 "choose one)", port)
    run_dir = RunDir.of(cfg)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    if cfg.distributed.no_ssh and not cfg.distributed.hostfile:
        no_ssh_hostfile(cfg, accelerator)
    decided = {DECIDED: {"precision": precision.record()}} if precision is not None else {}
    resolved = json.dumps({**cfg.to_dict(), **decided}, indent=2) + "\n"  # what the workers load (bertscale.config)
    run_dir.write(node_file(cfg, "run_config.json"), resolved)
    if cfg.distributed.node_rank in (None, 0):
        run_dir.write(run_dir.config, resolved)  # the run's own record (tools/run_summary.py reads it)
    merged = merged_environment(cfg, accelerator)
    for line in merged.describe():
        log.info("environment: %s", line)
    env = dict(merged.variables)
    # DeepSpeed's runner reads only this file (DS_ENV_FILE) for the nodes of a hostfile launch; the user's own
    # .deepspeed_env is merged into it, and into the local ranks' environment for --no_ssh and single-node runs
    env_file = node_file(cfg, ".deepspeed_env")
    run_dir.write(env_file, "".join(f"{k}={v}\n" for k, v in env.items()))
    if source is not None:
        log.info("resuming from %s (global step %d, phase %s)", source.path, source.global_step,
                 source.meta.get("phase"))
    # only for ranks on this host: they stop when this process is gone (lifetime.watch_launcher)
    env[lifetime.LAUNCHER_ENV] = lifetime.launcher_identity()
    with _Forwarder() as forwarder:
        for p in plans:
            if p.complete:
                log.info("phase %s already complete; skipping", p.phase.name)
                continue
            if forwarder.signalled:  # the signal came as the previous phase ended: do not start this one
                latest = ckpt.latest(run_dir.checkpoints)
                raise RunStopped(latest.global_step if latest else None, latest.path if latest else None)
            log.info("phase %s: %d steps at seq_len %d on %d ranks (micro batch %d x accumulation %d)",
                     p.phase.name, p.phase.steps, p.phase.seq_len, p.world_size, p.phase.micro_batch,
                     p.accumulation)
            if port is not None:  # the port this run uses now (a retry of an earlier phase may have changed it)
                p.command[p.command.index("--master_port") + 1] = str(port)
            for attempt in (1, 2):
                log.info("$ %s", shlex.join(p.command))
                started = time.time()
                watch = _RankWatch()
                returncode = _run_deepspeed(forwarder, watch, p.command,
                                            {**os.environ, **env, "DS_ENV_FILE": str(env_file)}, run_dir.root,
                                            run_log)
                exits = run_dir.exits_since(started - 1.0)
                failed = [r for r in exits.values() if r["status"] == "error"]
                if returncode == 0 and not failed:
                    break
                taken = any(r.get("address_in_use") for r in failed)
                if taken and port is not None and attempt == 1 and not forwarder.signalled:
                    # the port was free when picked; another process bound it before rank 0 listened
                    old, port = port, ports.free_port()
                    p.command[p.command.index("--master_port") + 1] = str(port)
                    log.warning("master port %d was taken by another process before rank 0 could listen on it; "
                                "starting phase %s again on port %d", old, p.phase.name, port)
                    continue
                raise RunFailed(failure_message(p, returncode, exits, watch.vanished, run_dir))
            if ckpt.final_of_phase(run_dir.checkpoints, p.index) is None:
                latest = ckpt.latest(run_dir.checkpoints)
                raise RunStopped(latest.global_step if latest else None, latest.path if latest else None)


def _run_deepspeed(forwarder: _Forwarder, watch: "_RankWatch", command: list[str], env: dict[str, str],
                   cwd: Path, run_log: RunLog) -> int:
    """Run one deepspeed launch to its end, watching its ranks, its output relayed through ``run_log`` (the
    console and train.log, without third-party noise); its exit status."""
    forwarder.child = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True,
                                       preexec_fn=lifetime.die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_log.relay(forwarder.child.stdout, sys.stdout)
    run_log.relay(forwarder.child.stderr, sys.stderr)
    try:
        while forwarder.child.poll() is None:
            watch.sample(forwarder.child.pid)
            time.sleep(0.1)
    except BaseException:
        # interrupted from inside this process (an embedding program's exception, a test's
        # timeout): the ranks run in their own session and must not be left running behind us
        forwarder.kill()
        forwarder.child.wait()
        run_log.drain(timeout=1.0)
        raise
    returncode = forwarder.child.returncode
    forwarder.child = None
    watch.sample(None)
    run_log.drain()
    return returncode


class _RankWatch:
    """This node's ranks under the deepspeed launcher: when each was last seen, to tell which vanished
    first (their own exit records cannot say so for a rank killed outright)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}       # rank -> pid
        self.vanished: dict[int, float] = {}  # rank -> when it was first seen gone

    def sample(self, root_pid: int | None) -> None:
        alive = {}
        if root_pid is not None:
            try:
                tree = psutil.Process(root_pid).children(recursive=True)
            except psutil.Error:
                tree = []
            for proc in tree:
                rank = _rank_of(proc)
                if rank is not None:
                    alive[rank] = proc.pid
        now = time.time()
        for rank, pid in self.seen.items():
            if rank not in alive and rank not in self.vanished:
                self.vanished[rank] = now
        self.seen.update(alive)


def _rank_of(proc) -> int | None:
    if not _is_rank(proc):
        return None
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(proc.environ().get("RANK", ""))
    except (psutil.Error, ValueError):
        return None


