"""What every rank's environment holds: the accelerator, the precision it computes in, CPU threads and
allocator settings, and the user's own ``.deepspeed_env`` merged in. The result goes both into the launch's own
environment (ranks on this node) and into the one file DeepSpeed's runner sends to every node of a hostfile
launch (``DS_ENV_FILE``), which is why the user's file, which DeepSpeed would otherwise read, must be merged
here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from bertscale.config import ConfigError, DistributedSection, RunConfig
from bertscale.hardware import Precision
from bertscale.recipe import cpu_threads

DEFAULT_CPU_RANKS = 2

CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
"""For CPU ranks: glibc serves every allocation from its heap and never hands freed memory back, so the
activations and optimizer temporaries of one step reuse the pages of the last one. By default every
allocation over 32 MiB (the word-embedding gradient, the MLM logits) is a fresh mmap whose pages fault
in again each step: 10-17% of a mini-BERT step, 3% of the demo's tiny one (tools/README.md). Peak memory
is unchanged; the process simply keeps it. Ignored by other C libraries; a GLIBC_TUNABLES of the user's is kept."""


def detect_accelerator(distributed: DistributedSection) -> str:
    """The accelerator the ranks use: ``distributed.accelerator``, with ``auto`` decided on this machine.

    A hostfile launch (not --no_ssh) starts its ranks on other machines, whose devices this one cannot see:
    launching from a CPU login node would decide ``cpu`` for every GPU node. ``auto`` is refused there
    rather than guessed, because more than the ranks' device follows from it and must be right before any
    rank starts: the vocabulary padding that the resume check compares checkpoints against, and the CPU
    allocator settings, which glibc reads only when a process starts.
    """
    requested = distributed.accelerator
    if distributed.hostfile and not distributed.no_ssh:
        if requested == "auto":
            raise ConfigError(
                f"distributed.accelerator is 'auto' but the ranks run on the hosts of {distributed.hostfile}, whose "
                f"devices this machine cannot see (it would decide for every node what it has itself); set "
                f"distributed.accelerator = \"cuda\" (or \"cpu\") in the config or --set distributed.accelerator=cuda")
        return requested  # the nodes' own, not this machine's: a CPU login node launches CUDA ranks
    from bertscale import hardware

    return hardware.accelerator(requested)


def decide_precision(cfg: RunConfig, accelerator: str) -> Precision:
    """The precision the ranks train in (``bertscale.hardware.choose``), decided here, where the ranks run.

    A DeepSpeed JSON that enables bf16 or fp16 itself wins. A hostfile launch (not --no_ssh) runs its ranks on
    machines this one cannot see, so ``auto`` is refused there as ``distributed.accelerator = "auto"`` is, and an
    explicit precision is checked by each rank against its own device at start (``bertscale.train``)."""
    from bertscale import hardware
    from bertscale.engine import json_precision, load_ds_config

    d = cfg.distributed
    try:
        fixed = json_precision(load_ds_config(d.deepspeed_config))
    except ConfigError:
        fixed = None  # preflight reports the JSON's own problem
    remote = bool(d.hostfile) and not d.no_ssh
    if remote and fixed is None and cfg.train.precision == "auto":
        raise ConfigError(
            f"train.precision is 'auto' but the ranks run on the hosts of {d.hostfile}, whose devices this machine "
            f"cannot see; set train.precision = \"bf16\" (Ampere or newer GPUs; CPUs with avx512_bf16 or amx_bf16), "
            f"\"fp16\" (older GPUs: V100, T4) or \"fp32\" (CPUs without native bf16), e.g. --set train.precision=bf16")
    return hardware.choose(cfg.train.precision, accelerator, ranks_per_node(cfg, accelerator), fixed,
                            d.deepspeed_config, local=not remote)


def with_precision(cfg: RunConfig, choice: Precision) -> RunConfig:
    """``cfg`` with ``train.precision`` the concrete choice: what the launcher writes for the ranks, and what
    the resume checks compare with the checkpoint's."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=choice.name))


def ranks_per_node(cfg: RunConfig, accelerator: str) -> int:
    if cfg.distributed.num_gpus is not None:
        return cfg.distributed.num_gpus
    if accelerator == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return DEFAULT_CPU_RANKS


OURS_WIN = ("PYTHONUNBUFFERED", "DS_ACCELERATOR")
"""The variables the launcher must set whatever the user's .deepspeed_env says: the console relays rank
output line by line, and DeepSpeed's accelerator must be the one the config and the ranks use. On every
other variable (OMP_NUM_THREADS, GLIBC_TUNABLES, NCCL_*, ...) the user's file wins."""


def worker_environment(cfg: RunConfig, accelerator: str) -> dict[str, str]:
    """The variables the launcher sets for every rank (before the user's .deepspeed_env is merged)."""
    env = {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": accelerator}
    d = cfg.distributed
    # a hostfile's nodes are other machines: their cores are not this one's, so each rank sets its own thread
    # count from its node's cores at start (bertscale.train) unless threads_per_rank says it
    remote = bool(d.hostfile) and not d.no_ssh
    if accelerator == "cpu":
        if d.threads_per_rank or not remote:
            env["OMP_NUM_THREADS"] = str(cpu_threads(cfg, ranks_per_node(cfg, "cpu")))
        if "GLIBC_TUNABLES" not in os.environ:  # a user's own setting wins
            env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    return env


def user_env_files() -> list[Path]:
    """Where DeepSpeed's runner looks for the user's environment file, in its order (the later wins): the
    home directory, then the current one; named by DS_ENV_FILE, default ``.deepspeed_env``."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found: list[Path] = []
    for folder in (Path.home(), Path.cwd()):
        path = (folder / name).resolve()
        if path.is_file() and path not in found:
            found.append(path)
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` per line, as DeepSpeed's runner reads it; blank lines and ``#`` comments are skipped
    (DeepSpeed would fail on them), anything else is an error naming the line."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if line.startswith("export "):
            key = key[len("export "):].strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE (one variable per line), got {raw.strip()!r}")
        env[key] = value
    return env


@dataclass
class WorkerEnvironment:
    """Every rank's variables: the launcher's merged with the user's .deepspeed_env files."""

    variables: dict[str, str]
    sources: list[Path] = field(default_factory=list)
    """The user's files merged in, in order."""
    user_keys: list[str] = field(default_factory=list)
    """The variables that come from them."""
    replaced: dict[str, str] = field(default_factory=dict)
    """Variables of the user's that the launcher set anyway (``OURS_WIN``), with the user's value."""

    def describe(self) -> list[str]:
        """What --dry-run says about where the ranks' variables come from."""
        if not self.sources:
            name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
            return [f"no ~/{name} or ./{name} to merge: the ranks get the launcher's own environment and variables"]
        lines = [f"merged {path} (DeepSpeed's own file for variables sent to every node) into the ranks' "
                 f"environment" for path in self.sources]
        lines.append(f"from those files: {', '.join(self.user_keys) or 'nothing'}; the launcher's value wins only "
                     f"on {', '.join(OURS_WIN)}")
        lines += [f"{key}={value} of the user's file replaced by {key}={self.variables[key]}"
                  for key, value in self.replaced.items()]
        return lines


def merged_environment(cfg: RunConfig, accelerator: str) -> WorkerEnvironment:
    """The launcher's variables (``worker_environment``) merged with the user's .deepspeed_env files."""
    ours = worker_environment(cfg, accelerator)
    sources = user_env_files()
    user: dict[str, str] = {}
    for path in sources:
        user.update(read_env_file(path))
    replaced = {k: v for k, v in user.items() if k in OURS_WIN and v != ours[k]}
    variables = {**ours, **user, **{k: ours[k] for k in OURS_WIN}}
    return WorkerEnvironment(variables, sources, list(user), replaced)
