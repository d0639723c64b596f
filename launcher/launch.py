"""`bertscale pretrain`: resolve the run configuration, check it against the machine and the data,
then start every phase through the real `deepspeed` launcher.

One node:             deepspeed --num_gpus N --master_port P --module bertscale.train ...
                      (P: distributed.master_port, or a free port picked per run when unset)
Many nodes, hostfile: deepspeed --hostfile H --num_nodes K --launcher pdsh ...
Many nodes, no ssh:   deepspeed --no_ssh --node_rank R --master_addr A --num_nodes K ... (run on each node)

Phases run one after another; a phase whose final checkpoint is complete is skipped, so
re-running the same command continues where the run stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bertscale import checkpoint as ckpt
from bertscale.config import (ConfigError, PhaseSection, RunConfig, accumulation_steps, load_config,
                              resolve_paths)
from bertscale.console import RunLog
from bertscale.rundir import RunDir

log = logging.getLogger("bertscale.launcher")

DEFAULT_CPU_RANKS = 2
DEFAULT_MASTER_PORT = 29500
"""The rendezvous port of a multi-node run whose configuration names none (DeepSpeed's and torch's default):
every node must agree on it, so it cannot be picked per node the way a single-node run picks one."""
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
"""For CPU ranks: glibc serves every allocation from its heap and never hands freed memory back, so the
activations and optimizer temporaries of one step reuse the pages of the last one. By default every
allocation over 32 MiB (the word-embedding gradient, the MLM logits) is a fresh mmap whose pages fault
in again each step: 10-17% of a mini-BERT step, 3% of the demo's tiny one (tools/README.md). Peak memory
is unchanged; the process simply keeps it. Ignored by other C libraries; a GLIBC_TUNABLES of the user's is kept."""


@dataclass(frozen=True)
class PhasePlan:
    phase: PhaseSection
    index: int
    world_size: int
    accumulation: int
    command: list[str]
    complete: bool


def detect_accelerator(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_hostfile(path: str) -> dict[str, int]:
    """``host slots=N`` per line (comments with #); clear errors naming the line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"distributed.hostfile: {path} does not exist")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise ConfigError(f"{path}:{number}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        try:
            slots = int(parts[1].split("=", 1)[1])
        except ValueError:
            raise ConfigError(f"{path}:{number}: slots must be a whole number, got {parts[1]!r}") from None
        if slots < 1:
            raise ConfigError(f"{path}:{number}: host {parts[0]} has {slots} slots; every host needs at least one")
        if parts[0] in hosts:
            raise ConfigError(f"{path}:{number}: host {parts[0]} is listed twice")
        hosts[parts[0]] = slots
    if not hosts:
        raise ConfigError(f"{path}: no hosts; write one 'HOSTNAME slots=N' line per node")
    return hosts


def ranks_per_node(cfg: RunConfig, accelerator: str) -> int:
    if cfg.distributed.num_gpus is not None:
        return cfg.distributed.num_gpus
    if accelerator == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return DEFAULT_CPU_RANKS


def world_size(cfg: RunConfig, accelerator: str) -> int:
    d = cfg.distributed
    if d.hostfile:
        hosts = parse_hostfile(d.hostfile)
        nodes = list(hosts.values())[: d.num_nodes] if d.num_nodes > 1 else list(hosts.values())
        if d.num_nodes > len(hosts):
            raise ConfigError(f"distributed.num_nodes is {d.num_nodes} but {d.hostfile} lists {len(hosts)} hosts")
        if d.num_gpus is None:
            return sum(nodes)
        short = [f"{h} (slots={n})" for h, n in list(hosts.items())[: len(nodes)] if n < d.num_gpus]
        if short:
            # DeepSpeed would start num_gpus ranks on every host regardless of its slots
            raise ConfigError(f"distributed.num_gpus is {d.num_gpus} but {d.hostfile} gives fewer slots to "
                              f"{', '.join(short)}; lower num_gpus or fix the hostfile")
        return d.num_gpus * len(nodes)
    return ranks_per_node(cfg, accelerator) * d.num_nodes


def node_file(cfg: RunConfig, name: str) -> Path:
    """Where this launcher keeps a file of run.out_dir that its own workers read (``RunDir.node_file``):
    in --no_ssh mode each node keeps its own copy, ``NAME.nodeR``."""
    return RunDir.of(cfg).node_file(name)


def no_ssh_hostfile(cfg: RunConfig, accelerator: str) -> Path:
    """DeepSpeed's --no_ssh mode still sizes the job from a hostfile; write one when none is given.

    The names are labels only (no ssh, no lookup): ranks find each other through master_addr.
    """
    path = node_file(cfg, "hostfile.no_ssh")
    slots = ranks_per_node(cfg, accelerator)
    return RunDir.of(cfg).write(path, "".join(f"node{i} slots={slots}\n" for i in range(cfg.distributed.num_nodes)))


def deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("deepspeed")
    if not found:
        raise RuntimeError("the `deepspeed` launcher is not installed in this environment; `pip install deepspeed`")
    return found


def deepspeed_command(cfg: RunConfig, phase: PhaseSection, config_path: Path, accelerator: str,
                      port: int | None = None) -> list[str]:
    """The deepspeed launcher's command line for one phase; ``port`` (one picked for this run) wins over
    distributed.master_port."""
    d = cfg.distributed
    port = port or d.master_port or DEFAULT_MASTER_PORT
    cmd = [deepspeed_executable(), "--log_level", "warning", "--master_port", str(port)]
    if d.no_ssh:
        hostfile = d.hostfile or str(node_file(cfg, "hostfile.no_ssh"))
        cmd += ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(d.node_rank),
                "--master_addr", str(d.master_addr), "--num_nodes", str(d.num_nodes),
                "--num_gpus", str(ranks_per_node(cfg, accelerator))]
    elif d.hostfile:
        cmd += ["--hostfile", d.hostfile, "--launcher", d.launcher]
        if d.num_nodes > 1:
            cmd += ["--num_nodes", str(d.num_nodes)]
        if d.num_gpus is not None:
            cmd += ["--num_gpus", str(d.num_gpus)]
        if d.master_addr:
            cmd += ["--master_addr", d.master_addr]
    else:
        if d.num_nodes > 1:
            raise ConfigError("distributed.num_nodes > 1 needs distributed.hostfile, or no_ssh with "
                              "node_rank and master_addr on every node")
        cmd += ["--num_gpus", str(ranks_per_node(cfg, accelerator))]
    cmd += ["--module", "bertscale.train", "--config", str(config_path), "--phase", phase.name]
    return cmd


def worker_environment(cfg: RunConfig, accelerator: str) -> dict[str, str]:
    """Variables every rank needs; also written to .deepspeed_env for remote nodes."""
    env = {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": accelerator}
    if accelerator == "cpu":
        per_rank = cfg.distributed.threads_per_rank or max(1, (os.cpu_count() or 1) // ranks_per_node(cfg, "cpu"))
        env["OMP_NUM_THREADS"] = str(per_rank)
        if "GLIBC_TUNABLES" not in os.environ:  # a user's own setting wins
            env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    return env


def standalone(cfg: RunConfig) -> bool:
    """A single-node run that hosts its own rendezvous (no hostfile, no --no_ssh): like torchrun
    --standalone, it may pick its master port itself."""
    d = cfg.distributed
    return not d.hostfile and not d.no_ssh and d.num_nodes == 1


def free_port() -> int:
    """A TCP port no process holds right now (the OS picks it); another may take it before rank 0 listens,
    which the launcher notices and retries once (``_run_phases``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def pick_port(cfg: RunConfig) -> int | None:
    """A free master port for a standalone run whose configuration names none, else None (the configured
    port, or DEFAULT_MASTER_PORT for many nodes)."""
    return free_port() if cfg.distributed.master_port is None and standalone(cfg) else None


def check_port(cfg: RunConfig) -> None:
    """On the node that hosts the rendezvous, refuse a master port another process holds."""
    d = cfg.distributed
    hosts_rendezvous = (d.node_rank in (None, 0)) and (not d.hostfile or d.no_ssh)
    if not hosts_rendezvous:
        return
    port = d.master_port or DEFAULT_MASTER_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the rendezvous store: TIME_WAIT is fine
        try:
            sock.bind(("", port))
        except OSError:
            hint = (" or leave it unset: a single-node run then picks a free port itself" if standalone(cfg) else "")
            raise ConfigError(f"distributed.master_port {port} is in use on this machine (another run?); "
                              f"pick a free one, e.g. --set distributed.master_port={port + 1}{hint}") from None


def preflight(cfg: RunConfig, world: int, accelerator: str = "cpu") -> None:
    """Everything that can be checked before any rank starts: batch arithmetic, the DeepSpeed JSON,
    tokenizer, shards."""
    from bertscale.engine import load_ds_config
    from bertscale.shard_format import load_manifest
    from bertscale.tokenizer import tokenizer_info

    problems = []
    try:
        load_ds_config(cfg.distributed.deepspeed_config)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        info = tokenizer_info(cfg.model.tokenizer)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer: {exc}") from None
    for phase in cfg.phases:
        try:
            accumulation_steps(phase, world)
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            load_manifest(phase.data, expect_seq_len=phase.seq_len, expect_fingerprint=info.fingerprint)
        except (OSError, ValueError) as exc:
            problems.append(f"phase {phase.name!r}: {exc}")
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))


def check_resume(cfg: RunConfig, first: PhasePlan, accelerator: str, resume_from: str | None) -> ckpt.ResumePlan:
    """What the first phase to train would start from, checked as its ranks will (``plan_resume``), and
    every ``.pt`` of that checkpoint inspected (``safe_load``): refusals come before any rank starts."""
    from bertscale import safe_load
    from bertscale.train import run_shape

    start = ckpt.plan_resume(cfg, first.index, run_shape(cfg, accelerator, first.world_size), resume_from)
    for source in (start.resume, start.previous):
        if source is not None:
            safe_load.check_directory(source.path)
    return start


def resume_source(cfg: RunConfig, resume: str) -> ckpt.CheckpointInfo | None:
    """What the run continues from: ``auto`` (latest complete checkpoint of run.out_dir, if any),
    ``never`` (nothing; refused if run.out_dir already has checkpoints) or a checkpoint path."""
    root = RunDir.of(cfg).checkpoints
    if resume == "auto":
        return ckpt.latest(root)
    if resume == "never":
        found = ckpt.latest(root)
        if found is not None:
            raise ConfigError(f"--resume never, but {root} already holds checkpoints (latest {found.tag}); "
                              f"use a new run.out_dir, delete that folder, or --resume auto to continue it")
        return None
    try:
        return ckpt.resolve(resume)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {resume}: {exc}") from None


def plan(cfg: RunConfig, source: ckpt.CheckpointInfo | None = None, port: int | None = None) -> list[PhasePlan]:
    """One entry per phase; a phase is complete if the run (or the resume source) finished it. ``port``: the
    master port picked for this run (``pick_port``), if any."""
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    config_path = node_file(cfg, "run_config.json")
    root = RunDir.of(cfg).checkpoints
    plans = []
    for index, phase in enumerate(cfg.phases):
        done = ckpt.final_of_phase(root, index) is not None or (
            source is not None and (source.phase_index > index or (source.phase_index == index and source.phase_complete)))
        plans.append(PhasePlan(phase, index, world, accumulation_steps(phase, world),
                               deepspeed_command(cfg, phase, config_path, accelerator, port), done))
    return plans


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


def pretrain(config: str, overrides: list[str] | None = None, dry_run: bool = False,
             resume: str = "auto") -> Path:
    """Run every phase of the configured job; returns the run's output directory once every phase finished.

    Raises ``RunStopped`` when SIGTERM/SIGINT stopped it early (the ranks saved first) and ``RunFailed``
    when any rank failed (training, evaluation or a save), naming the rank that failed first; a later phase
    never starts after a failed one.
    """
    cfg = resolve_paths(load_config(config, overrides))
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    preflight(cfg, world, accelerator)
    run_dir = RunDir.of(cfg)
    # node 0 holds the run directory (every --no_ssh node runs a launcher against the same one)
    lock = run_dir.lock() if not dry_run and cfg.distributed.node_rank in (None, 0) else None
    try:
        source = resume_source(cfg, resume)
        port = pick_port(cfg)
        plans = plan(cfg, source, port)
        first = next((p for p in plans if not p.complete), None)
        explicit = source is not None and resume not in ("auto", "never")
        if explicit and first is not None:
            first.command.extend(["--resume-from", str(source.path)])
        start = (check_resume(cfg, first, accelerator, str(source.path) if explicit else None)
                 if first is not None else None)
        if dry_run:
            _print_plan(cfg, plans, source, worker_environment(cfg, accelerator), port)
            return run_dir.root
        if start is not None and start.world_change is not None and lock is not None:
            log.info("%s ranks continue a phase that %s ranks started: converting %s to a universal checkpoint",
                     start.world_change[1], start.world_change[0], start.resume.path)
            ckpt.universal_checkpoint(start.resume)
        with RunLog(run_dir.train_log, "bertscale pretrain") as run_log:
            try:
                log.info("%s", "\n".join(run_summary(cfg, plans, accelerator)))
                _run_phases(cfg, plans, source, accelerator, run_log, port)
            except BaseException as exc:  # the record ends with how the run ended, as the console does
                run_log.note(f"{'stopped' if isinstance(exc, RunStopped) else 'error'}: {exc}")
                raise
            run_log.note(f"every phase finished; checkpoints in {run_dir.checkpoints}")
        return run_dir.root
    finally:
        if lock is not None:
            lock.release()


def run_summary(cfg: RunConfig, plans: list[PhasePlan], accelerator: str) -> list[str]:
    """The run in a few lines: the model and its parameter count, ranks, and per phase the samples and tokens
    it trains on and how many epochs of its shards' training split that is."""
    import torch

    from bertscale.engine import load_ds_config, zero_stage
    from bertscale.model import BertForPreTraining
    from bertscale.shard_format import load_manifest
    from bertscale.tokenizer import tokenizer_info
    from bertscale.train import model_config

    config = model_config(cfg, tokenizer_info(cfg.model.tokenizer).vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        parameters = sum(p.numel() for p in BertForPreTraining(config).parameters())
    stage = zero_stage(load_ds_config(cfg.distributed.deepspeed_config))
    lines = [f"run {cfg.run.name!r} in {cfg.run.out_dir}: model {cfg.model.preset} with {parameters:,} parameters "
             f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}); "
             f"{plans[0].world_size if plans else '?'} ranks on {accelerator}, ZeRO stage {stage}, optimizer "
             f"{cfg.optimizer.name}"]
    for p in plans:
        phase = p.phase
        samples = phase.steps * phase.global_batch
        train = load_manifest(phase.data)["splits"].get("train", {})
        have = train.get("samples") or 0
        real = f", about {samples * train['tokens'] / have:,.0f} real tokens" if have and train.get("tokens") else ""
        epochs = f"{samples / have:.2f} epochs of the {have:,} training samples in {phase.data}" if have else \
            f"no training samples in {phase.data}"
        lines.append(f"  {phase.name}: {phase.steps:,} steps x global batch {phase.global_batch} = "
                     f"{samples:,} samples at seq_len {phase.seq_len} ({samples * phase.seq_len:,} token "
                     f"positions{real}): {epochs}{' (complete: skipped)' if p.complete else ''}")
    return lines


def _print_plan(cfg: RunConfig, plans: list[PhasePlan], source: ckpt.CheckpointInfo | None,
                env: dict[str, str], port: int | None) -> None:
    print("# resolved configuration")
    print(json.dumps(cfg.to_dict(), indent=2))
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    print("\n".join(f"# {line.strip()}" for line in run_summary(cfg, plans, accelerator)))
    if port is not None:
        print(f"# master port {port}: free now; a run picks its own free port when distributed.master_port is unset")
    if source is not None:
        print(f"# resuming from {source.path} (global step {source.global_step})")
    for p in plans:
        print(f"# phase {p.phase.name}: seq_len {p.phase.seq_len}, {p.phase.steps} steps, world size "
              f"{p.world_size}, micro batch {p.phase.micro_batch} x accumulation {p.accumulation} = "
              f"global batch {p.phase.global_batch}{' (complete: skipped)' if p.complete else ''}")
        print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(p.command))


def _run_phases(cfg: RunConfig, plans: list[PhasePlan], source: ckpt.CheckpointInfo | None,
                accelerator: str, run_log: RunLog, port: int | None = None) -> None:
    """Start each unfinished phase in turn. ``port``: a master port picked for this run (not configured);
    if another process takes it before rank 0 listens, the phase is started once more on a fresh one."""
    if port is None:
        check_port(cfg)
    else:
        log.info("master port %d: a free port picked for this single-node run (set distributed.master_port to "
                 "choose one)", port)
    run_dir = RunDir.of(cfg)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    if cfg.distributed.no_ssh and not cfg.distributed.hostfile:
        no_ssh_hostfile(cfg, accelerator)
    resolved = json.dumps(cfg.to_dict(), indent=2) + "\n"  # what the workers load (bertscale.config)
    run_dir.write(node_file(cfg, "run_config.json"), resolved)
    if cfg.distributed.node_rank in (None, 0):
        run_dir.write(run_dir.config, resolved)  # the run's own record (tools/run_summary.py reads it)
    env = worker_environment(cfg, accelerator)
    env_file = node_file(cfg, ".deepspeed_env")
    run_dir.write(env_file, "".join(f"{k}={v}\n" for k, v in env.items()))
    if source is not None:
        log.info("resuming from %s (global step %d, phase %s)", source.path, source.global_step,
                 source.meta.get("phase"))
    from bertscale.train import LAUNCHER_ENV

    me = psutil.Process()
    # only for ranks on this host: they stop when this process is gone (bertscale.train.watch_launcher)
    env[LAUNCHER_ENV] = f"{socket.gethostname()}:{me.pid}:{me.create_time()}"
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
                    old, port = port, free_port()
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
                                       preexec_fn=_die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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


def failure_message(p: PhasePlan, returncode: int, exits: dict[int, dict], vanished: dict[int, float],
                     run_dir: RunDir) -> str:
    """Which rank failed first and how, then the others.

    A rank that raised reports it (``RunDir.record_exit``); a rank killed outright (SIGKILL, the OOM
    killer) reports nothing, and this launcher saw it vanish; the ranks that merely lost their connection
    to it report that. Order: real errors by time, then ranks that vanished without a word (by when they
    vanished), then lost connections. The first is named as the cause.
    """
    errors = sorted((r for r in exits.values() if r["status"] == "error" and not r.get("peer_lost")),
                    key=lambda r: r["time"])
    killed = sorted((t, rank) for rank, t in vanished.items() if rank not in exits)
    lost = sorted((r for r in exits.values() if r["status"] == "error" and r.get("peer_lost")),
                  key=lambda r: r["time"])
    port = p.command[p.command.index("--master_port") + 1] if "--master_port" in p.command else "?"
    lines = [f"rank {r['rank']} ({r['host']}): could not listen on master port {port}: another process holds it "
             f"(address already in use). Leave distributed.master_port unset on a single node (a free port is "
             f"picked per run) or choose another port  [{r['report']}]"
             if r.get("address_in_use") else f"rank {r['rank']} ({r['host']}): {r['summary']}  [{r['report']}]"
             for r in errors]
    lines += [f"rank {rank}: killed without a word (SIGKILL, the out-of-memory killer, or a crash in native code)"
              for _, rank in killed]
    lines += [f"rank {r['rank']} ({r['host']}): lost its connection to a failed rank ({r['summary']})" for r in lost]
    if not errors and not killed:  # the cause is out of this node's sight
        lines.insert(0, f"no rank reported an error of its own (the deepspeed launcher exited with {returncode}): "
                        f"a rank on another node was killed, or a node was lost")
    latest = ckpt.latest(run_dir.checkpoints)
    where = (f"the latest complete checkpoint is {latest.path} (global step {latest.global_step}). Fix the cause "
             f"and re-run the same command to continue from it." if latest else
             "there is no complete checkpoint yet. Fix the cause and re-run the same command to start again.")
    return (f"phase {p.phase.name!r} failed: {lines[0]}" + "".join(f"\n  then {line}" for line in lines[1:])
            + f"\n{where}")


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


def _die_with_parent() -> None:
    """In the deepspeed runner, before it starts: the kernel kills it when this launcher dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``). Its ranks notice on their own (``watch_launcher``)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the ranks' own watch still stops them
