"""The run's plan before anything starts: ranks per node and the world size (hostfile, --no_ssh), the
`deepspeed` command line of every phase, which phases are already complete, what a resume starts from,
and every check that can fail before a rank starts (``preflight``, ``check_resume``)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.config import ConfigError, PhaseSection, RunConfig, accumulation_steps
from bertscale.rundir import RunDir
from bertscale.hardware import Precision
from launcher.environment import decide_precision, detect_accelerator, ranks_per_node
from launcher.ports import DEFAULT_MASTER_PORT

@dataclass(frozen=True)
class PhasePlan:
    phase: PhaseSection
    index: int
    world_size: int
    accumulation: int
    command: list[str]
    complete: bool


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


def preflight(cfg: RunConfig, world: int, accelerator: str = "cpu") -> Precision:
    """Everything that can be checked before any rank starts: batch arithmetic, the DeepSpeed JSON, the
    precision (decided here: ``decide_precision``; returned), tokenizer, shards."""
    from bertscale.engine import load_ds_config
    from bertscale.shard_format import load_manifest
    from bertscale.tokenizer import tokenizer_info
    from bertscale.recipe import model_config

    problems, choice = [], None
    try:
        load_ds_config(cfg.distributed.deepspeed_config)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        choice = decide_precision(cfg, accelerator)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        info = tokenizer_info(cfg.model.tokenizer)
    except (OSError, ValueError) as exc:
        own = cfg.model.init_from and cfg.model.tokenizer == cfg.model.init_from
        raise ConfigError(f"model.tokenizer: {exc}" + (" (model.init_from's directory has no tokenizer of its own: set "
                          "model.tokenizer to the one its model was trained with)" if own else "")) from None
    try:
        model_config(cfg, info.vocab_size)  # model.init_from: its config against the tokenizer and the phases
    except ConfigError as exc:
        problems.append(str(exc))
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
    return choice


def check_resume(cfg: RunConfig, first: PhasePlan, accelerator: str, resume_from: str | None) -> ckpt.ResumePlan:
    """What the first phase to train would start from, checked as its ranks will (``plan_resume``), and
    every ``.pt`` of that checkpoint inspected (``safe_load``): refusals come before any rank starts."""
    from bertscale import safe_load
    from bertscale.recipe import run_shape

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
    accelerator = detect_accelerator(cfg.distributed)
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
