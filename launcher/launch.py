"""`bertscale pretrain`: resolve the run configuration, check it against the machine and the data,
then start every phase through the real `deepspeed` launcher.

One node:             deepspeed --num_gpus N --master_port P --module bertscale.train ...
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

from bertscale import checkpoint as ckpt
from bertscale.config import (ConfigError, PhaseSection, RunConfig, accumulation_steps, load_config,
                              resolve_paths)

log = logging.getLogger("bertscale.launcher")

DEFAULT_CPU_RANKS = 2
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
    """Where this launcher keeps a file of run.out_dir that its own workers read.

    In --no_ssh mode every node runs its own launcher against the same (shared) out_dir, and what
    they write differs (node_rank, threads per rank): each node gets its own copy, ``NAME.nodeR``.
    """
    out = Path(cfg.run.out_dir)
    if not cfg.distributed.no_ssh:
        return out / name
    tag = f".node{cfg.distributed.node_rank}"
    return out / (name[: -len(".json")] + tag + ".json" if name.endswith(".json") else name + tag)


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename under a name unique to this process: readers (and other nodes' launchers
    writing beside us) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def no_ssh_hostfile(cfg: RunConfig, accelerator: str) -> Path:
    """DeepSpeed's --no_ssh mode still sizes the job from a hostfile; write one when none is given.

    The names are labels only (no ssh, no lookup): ranks find each other through master_addr.
    """
    path = node_file(cfg, "hostfile.no_ssh")
    slots = ranks_per_node(cfg, accelerator)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"node{i} slots={slots}\n" for i in range(cfg.distributed.num_nodes)))
    return path


def deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("deepspeed")
    if not found:
        raise RuntimeError("the `deepspeed` launcher is not installed in this environment; `pip install deepspeed`")
    return found


def deepspeed_command(cfg: RunConfig, phase: PhaseSection, config_path: Path, accelerator: str) -> list[str]:
    d = cfg.distributed
    cmd = [deepspeed_executable(), "--log_level", "warning", "--master_port", str(d.master_port)]
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


def check_port(cfg: RunConfig) -> None:
    """On the node that hosts the rendezvous, refuse a master port another process holds."""
    d = cfg.distributed
    hosts_rendezvous = (d.node_rank in (None, 0)) and (not d.hostfile or d.no_ssh)
    if not hosts_rendezvous:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the rendezvous store: TIME_WAIT is fine
        try:
            sock.bind(("", d.master_port))
        except OSError:
            raise ConfigError(f"distributed.master_port {d.master_port} is in use on this machine (another run?); "
                              f"pick a free one, e.g. --set distributed.master_port={d.master_port + 1}") from None


def failure_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.out_dir) / "failures"


def failed_ranks(cfg: RunConfig, since: float) -> list[str]:
    """One line per rank that reported a failure after ``since`` (see bertscale.train.main)."""
    folder = failure_dir(cfg)
    if not folder.is_dir():
        return []
    lines = []
    for file in sorted(folder.glob("rank-*.txt")):
        if file.stat().st_mtime >= since:
            text = file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            lines.append(f"{file.stem}: {text[-1] if text else '(no message)'}  [{file}]")
    return lines


def preflight(cfg: RunConfig, world: int) -> None:
    """Everything that can be checked before any rank starts: batch arithmetic, tokenizer, shards."""
    from bertscale.shard_format import load_manifest
    from bertscale.tokenizer import tokenizer_info

    problems = []
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


def resume_source(cfg: RunConfig, resume: str) -> ckpt.CheckpointInfo | None:
    """What the run continues from: ``auto`` (latest complete checkpoint of run.out_dir, if any),
    ``never`` (nothing; refused if run.out_dir already has checkpoints) or a checkpoint path."""
    root = Path(cfg.run.out_dir) / "checkpoints"
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


def plan(cfg: RunConfig, source: ckpt.CheckpointInfo | None = None) -> list[PhasePlan]:
    """One entry per phase; a phase is complete if the run (or the resume source) finished it."""
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    config_path = node_file(cfg, "run_config.json")
    root = Path(cfg.run.out_dir) / "checkpoints"
    plans = []
    for index, phase in enumerate(cfg.phases):
        done = ckpt.final_of_phase(root, index) is not None or (
            source is not None and (source.phase_index > index or (source.phase_index == index and source.phase_complete)))
        plans.append(PhasePlan(phase, index, world, accumulation_steps(phase, world),
                               deepspeed_command(cfg, phase, config_path, accelerator), done))
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
        import psutil

        try:
            tree = psutil.Process(self.child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        workers = [p for p in tree if _is_worker(p)]
        for proc in workers or tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


def _is_worker(proc) -> bool:
    try:
        return "bertscale.train" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - a process that vanished or that we may not inspect
        return False


def pretrain(config: str, overrides: list[str] | None = None, dry_run: bool = False,
             resume: str = "auto") -> Path:
    """Run every phase of the configured job; returns the run's output directory.

    Stops early (returning normally) when SIGTERM/SIGINT arrives: the ranks save first.
    """
    cfg = resolve_paths(load_config(config, overrides))
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    preflight(cfg, world)
    source = resume_source(cfg, resume)
    plans = plan(cfg, source)
    env = worker_environment(cfg, accelerator)
    first = next((p for p in plans if not p.complete), None)
    explicit = source is not None and resume not in ("auto", "never")
    if explicit and first is not None:
        first.command.extend(["--resume-from", str(source.path)])
    if dry_run:
        print("# resolved configuration")
        print(json.dumps(cfg.to_dict(), indent=2))
        if source is not None:
            print(f"# resuming from {source.path} (global step {source.global_step})")
        for p in plans:
            print(f"# phase {p.phase.name}: seq_len {p.phase.seq_len}, {p.phase.steps} steps, world size "
                  f"{p.world_size}, micro batch {p.phase.micro_batch} x accumulation {p.accumulation} = "
                  f"global batch {p.phase.global_batch}{' (complete: skipped)' if p.complete else ''}")
            print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(p.command))
        return Path(cfg.run.out_dir)
    check_port(cfg)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.distributed.no_ssh and not cfg.distributed.hostfile:
        no_ssh_hostfile(cfg, accelerator)
    resolved = json.dumps(cfg.to_dict(), indent=2) + "\n"  # what the workers load (bertscale.config)
    write_atomic(node_file(cfg, "run_config.json"), resolved)
    if cfg.distributed.node_rank in (None, 0):
        write_atomic(out / "run_config.json", resolved)  # the run's own record (tools/run_summary.py reads it)
    env_file = node_file(cfg, ".deepspeed_env")
    write_atomic(env_file, "".join(f"{k}={v}\n" for k, v in env.items()))
    if source is not None:
        log.info("resuming from %s (global step %d, phase %s)", source.path, source.global_step,
                 source.meta.get("phase"))
    root = out / "checkpoints"
    with _Forwarder() as forwarder:
        for p in plans:
            if p.complete:
                log.info("phase %s already complete; skipping", p.phase.name)
                continue
            if forwarder.signalled:
                break
            log.info("phase %s: %d steps at seq_len %d on %d ranks (micro batch %d x accumulation %d)",
                     p.phase.name, p.phase.steps, p.phase.seq_len, p.world_size, p.phase.micro_batch,
                     p.accumulation)
            log.info("$ %s", shlex.join(p.command))
            started = time.time()
            forwarder.child = subprocess.Popen(
                p.command, env={**os.environ, **env, "DS_ENV_FILE": str(env_file)}, cwd=out,
                start_new_session=True)
            try:
                returncode = forwarder.child.wait()
            except BaseException:
                # interrupted from inside this process (an embedding program's exception, a test's
                # timeout): the ranks run in their own session and must not be left running behind us
                forwarder.kill()
                forwarder.child.wait()
                raise
            forwarder.child = None
            finished = ckpt.final_of_phase(root, p.index) is not None
            if finished:
                continue
            latest = ckpt.latest(root)
            if forwarder.signalled or returncode == 0:
                where = f"{latest.path} (global step {latest.global_step})" if latest else "no checkpoint"
                log.warning("stopped before the end of phase %s; latest complete checkpoint: %s. Re-run the same "
                            "command to continue.", p.phase.name, where)
                return out
            failed = failed_ranks(cfg, started)
            who = ("\n  " + "\n  ".join(failed)) if failed else (
                " (no rank reported an error: a process was killed, or a node was lost)")
            raise RuntimeError(f"phase {p.phase.name!r} failed: the deepspeed launcher exited with "
                               f"{returncode}; failed ranks:{who}\nRe-run the same command to continue "
                               f"from the latest complete checkpoint")
    return out
