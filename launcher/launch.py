"""`bertscale pretrain`: resolve the run configuration, check it against the machine and the data,
then start every phase through the real `deepspeed` launcher.

One node:             deepspeed --num_gpus N --master_port P --module bertscale.train ...
Many nodes, hostfile: deepspeed --hostfile H --num_nodes K --launcher pdsh ...
Many nodes, no ssh:   deepspeed --no_ssh --node_rank R --master_addr A --num_nodes K ... (run on each node)

Phases run one after another; a phase whose final checkpoint is complete is skipped, so
re-running the same command continues where the run stopped.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.config import (ConfigError, PhaseSection, RunConfig, accumulation_steps, load_config,
                              resolve_paths, save_resolved)

log = logging.getLogger("bertscale.launcher")

DEFAULT_CPU_RANKS = 2


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
    if d.hostfile and not d.no_ssh:
        hosts = parse_hostfile(d.hostfile)
        nodes = list(hosts.values())[: d.num_nodes] if d.num_nodes > 1 else list(hosts.values())
        per_node = [min(s, d.num_gpus) if d.num_gpus else s for s in nodes]
        return sum(per_node)
    return ranks_per_node(cfg, accelerator) * d.num_nodes


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
        cmd += ["--no_ssh", "--node_rank", str(d.node_rank), "--master_addr", str(d.master_addr),
                "--num_nodes", str(d.num_nodes), "--num_gpus", str(ranks_per_node(cfg, accelerator))]
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
    return env


def preflight(cfg: RunConfig, world: int) -> None:
    """Everything that can be checked before any rank starts: batch arithmetic, tokenizer, shards."""
    from bertscale.shards import load_manifest
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


def plan(cfg: RunConfig) -> list[PhasePlan]:
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    config_path = Path(cfg.run.out_dir) / "run_config.json"
    root = Path(cfg.run.out_dir) / "checkpoints"
    plans = []
    for index, phase in enumerate(cfg.phases):
        plans.append(PhasePlan(phase, index, world, accumulation_steps(phase, world),
                               deepspeed_command(cfg, phase, config_path, accelerator),
                               ckpt.final_of_phase(root, index) is not None))
    return plans


def pretrain(config: str, overrides: list[str] | None = None, dry_run: bool = False) -> Path:
    """Run every phase of the configured job; returns the run's output directory."""
    cfg = resolve_paths(load_config(config, overrides))
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    world = world_size(cfg, accelerator)
    preflight(cfg, world)
    plans = plan(cfg)
    env = worker_environment(cfg, accelerator)
    if dry_run:
        for p in plans:
            print(f"# phase {p.phase.name}: seq_len {p.phase.seq_len}, {p.phase.steps} steps, world size "
                  f"{p.world_size}, micro batch {p.phase.micro_batch} x accumulation {p.accumulation} = "
                  f"global batch {p.phase.global_batch}{' (complete: skipped)' if p.complete else ''}")
            print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(p.command))
        return Path(cfg.run.out_dir)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "run_config.json")
    (out / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    for p in plans:
        if p.complete:
            log.info("phase %s already complete; skipping", p.phase.name)
            continue
        log.info("phase %s: %d steps at seq_len %d on %d ranks (micro batch %d x accumulation %d)",
                 p.phase.name, p.phase.steps, p.phase.seq_len, p.world_size, p.phase.micro_batch, p.accumulation)
        log.info("$ %s", shlex.join(p.command))
        result = subprocess.run(p.command, env={**os.environ, **env, "DS_ENV_FILE": str(out / ".deepspeed_env")},
                                cwd=out)
        if result.returncode != 0:
            raise RuntimeError(f"phase {p.phase.name!r} failed: the deepspeed launcher exited with "
                               f"{result.returncode} (see the rank tracebacks above); re-run the same command "
                               f"to continue from the latest complete checkpoint")
    return out
