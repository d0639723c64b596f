"""`bertscale pretrain`: resolve the run configuration, check it against the machine and the data,
then start every phase through the real `deepspeed` launcher.

One node:             deepspeed --num_gpus N --master_port P --module bertscale.train ...
                      (P: distributed.master_port, or a free port picked per run when unset)
Many nodes, hostfile: deepspeed --hostfile H --num_nodes K --launcher pdsh ...
Many nodes, no ssh:   deepspeed --no_ssh --node_rank R --master_addr A --num_nodes K ... (run on each node)

Phases run one after another; a phase whose final checkpoint is complete is skipped, so
re-running the same command continues where the run stopped.

The parts, by concern: ``plan`` (world size, commands, preflight, resume), ``environment`` (the ranks'
variables, the accelerator, the user's ~/.deepspeed_env), ``ports`` (the master port), ``dry_run``
(what --dry-run prints, the run summary, --estimate), ``supervise`` (running the phases, signals) and
``diagnose`` (which rank failed first and how).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.config import RunConfig, config_from_data, load_config, resolve_paths
from bertscale.console import RunLog
from bertscale.rundir import RunDir
from launcher.dry_run import print_plan, run_summary
from launcher.environment import detect_accelerator, merged_environment, with_precision
from launcher.plan import check_resume, plan, preflight, resume_source, world_size
from launcher.ports import pick_port
from launcher.supervise import RunFailed, RunStopped, run_phases

__all__ = ["RunFailed", "RunStopped", "pretrain", "resolve_config"]

log = logging.getLogger("bertscale.launcher")


def resolve_config(config: str | os.PathLike | RunConfig | dict, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration from a TOML/JSON file, a ``RunConfig`` or the nested dict a TOML file parses to,
    with ``KEY=VALUE`` overrides applied, validated, and every path made absolute (against the current
    directory)."""
    if isinstance(config, (RunConfig, dict)):
        return resolve_paths(config_from_data(config, overrides))
    return resolve_paths(load_config(config, overrides))


def pretrain(config: str | os.PathLike | RunConfig | dict, overrides: list[str] | None = None,
             dry_run: bool = False, resume: str = "auto", estimate: bool = False) -> Path:
    """Run every phase of the configured job; returns the run's output directory once every phase finished.

    ``config``: a TOML (or resolved JSON) file, a ``RunConfig``, or its nested dict (``resolve_config``).
    ``dry_run`` prints the plan and starts nothing; with ``estimate`` it also times one real step per phase.

    Raises ``RunStopped`` when SIGTERM/SIGINT stopped it early (the ranks saved first) and ``RunFailed``
    when any rank failed (training, evaluation or a save), naming the rank that failed first; a later phase
    never starts after a failed one.
    """
    cfg = resolve_config(config, overrides)
    accelerator = detect_accelerator(cfg.distributed)
    world = world_size(cfg, accelerator)
    precision = preflight(cfg, world, accelerator)
    cfg = with_precision(cfg, precision)  # the ranks, and the resume checks, see the choice, not "auto"
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
        change = start.universal_change() if start is not None else None
        if dry_run:
            print_plan(cfg, plans, source, merged_environment(cfg, accelerator), port, precision, estimate=estimate)
            if change is not None:
                print(f"# {change}: the run converts {start.resume.path} to DeepSpeed's universal checkpoint first "
                      f"(kept beside it)")
            return run_dir.root
        with RunLog(run_dir.train_log, "bertscale pretrain") as run_log:
            try:
                log.info("%s", "\n".join(run_summary(cfg, plans, accelerator)))
                log.info("%s", precision.line())
                if precision.warning:
                    log.warning("warning: %s", precision.warning)
                if change is not None and lock is not None:
                    log.info("%s: converting %s to a universal checkpoint", change, start.resume.path)
                    ckpt.universal_checkpoint(start.resume)
                run_phases(cfg, plans, source, accelerator, run_log, port, precision)
            except BaseException as exc:  # the record ends with how the run ended, as the console does
                run_log.note(f"{'stopped' if isinstance(exc, RunStopped) else 'error'}: {exc}")
                raise
            run_log.note(f"every phase finished; checkpoints in {run_dir.checkpoints}")
        return run_dir.root
    finally:
        if lock is not None:
            lock.release()
