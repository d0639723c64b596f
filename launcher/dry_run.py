"""What `pretrain --dry-run` prints, and the run summary the console and train.log open with."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass

from bertscale import checkpoint as ckpt
from bertscale.config import ConfigError, PhaseSection, RunConfig
from bertscale.console import duration
from bertscale.hardware import Precision
from bertscale.recipe import cpu_threads
from launcher.environment import WorkerEnvironment, detect_accelerator, ranks_per_node
from launcher.plan import PhasePlan

def run_summary(cfg: RunConfig, plans: list[PhasePlan], accelerator: str) -> list[str]:
    """The run in a few lines: the model and its parameter count, ranks, and per phase the samples and tokens
    it trains on and how many epochs of its shards' training split that is."""
    import torch

    from bertscale.engine import load_ds_config, zero_stage
    from bertscale.model import BertForPreTraining
    from bertscale.shard_format import load_manifest
    from bertscale.recipe import model_config, model_name
    from bertscale.tokenizer import tokenizer_info

    config = model_config(cfg, tokenizer_info(cfg.model.tokenizer).vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        parameters = sum(p.numel() for p in BertForPreTraining(config).parameters())
    stage = zero_stage(load_ds_config(cfg.distributed.deepspeed_config))
    lines = [f"run {cfg.run.name!r} in {cfg.run.out_dir}: model {model_name(cfg)} with {parameters:,} parameters "
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


def print_plan(cfg: RunConfig, plans: list[PhasePlan], source: ckpt.CheckpointInfo | None,
               env: WorkerEnvironment, port: int | None, precision: Precision, estimate: bool = False) -> None:
    """What --dry-run prints: the resolved configuration, the run summary, the precision and why, where the
    ranks' environment comes from, each phase's command line and, with ``estimate``, each phase's estimated
    time (``estimate_phases``)."""
    print("# resolved configuration")
    print(json.dumps(cfg.to_dict(), indent=2))
    accelerator = detect_accelerator(cfg.distributed)
    print("\n".join(f"# {line.strip()}" for line in run_summary(cfg, plans, accelerator)))
    print(f"# {precision.line()}")
    if precision.warning:
        print(f"# warning: {precision.warning}")
    if port is not None:
        print(f"# master port {port}: free now; a run picks its own free port when distributed.master_port is unset")
    if source is not None:
        print(f"# resuming from {source.path} (global step {source.global_step})")
    else:
        from bertscale.recipe import initial_weights

        print(f"# initial weights: {initial_weights(cfg)}")
    print("\n".join(f"# environment: {line}" for line in env.describe()))
    for p in plans:
        print(f"# phase {p.phase.name}: seq_len {p.phase.seq_len}, {p.phase.steps} steps, world size "
              f"{p.world_size}, micro batch {p.phase.micro_batch} x accumulation {p.accumulation} = "
              f"global batch {p.phase.global_batch}{' (complete: skipped)' if p.complete else ''}")
        print(" ".join(f"{k}={v}" for k, v in env.variables.items()), shlex.join(p.command))
    if estimate:
        print("\n".join(f"# {line}" for line in estimate_phases(cfg, plans, accelerator)))


@dataclass(frozen=True)
class StepTiming:
    """One phase's measured costs on this machine: a forward and backward of one micro batch, one optimizer step."""

    micro_batch_s: float
    optimizer_s: float
    threads: int | None
    """CPU threads the measurement used (each CPU rank's share of the cores); None on CUDA."""

    def step_s(self, accumulation: int) -> float:
        """One optimizer step of a rank: ``accumulation`` micro batches, then the update."""
        return accumulation * self.micro_batch_s + self.optimizer_s


def estimate_batch(cfg: RunConfig, phase: PhaseSection) -> dict:
    """The micro batch ``--estimate`` times: the phase's first ``micro_batch`` training samples, in the layout
    the trainer feeds the model (unpadded when ``train.unpadded`` is on, as ``bertscale.train`` builds its
    micro batches; else padded to the longest sample)."""
    from bertscale.loader import eval_batches
    from bertscale.packing import unpad
    from bertscale.tokenizer import tokenizer_info

    batch = next(iter(eval_batches(phase.data, split="train", batch_size=phase.micro_batch, seed=cfg.run.seed,
                                   tokenizer=tokenizer_info(cfg.model.tokenizer), max_batches=1)), None)
    if batch is None:
        raise ConfigError(f"phase {phase.name!r}: no training samples in {phase.data} to time a step on")
    return unpad(batch) if cfg.train.unpadded else batch


def measure_step(cfg: RunConfig, phase: PhaseSection, accelerator: str, threads: int | None = None,
                 repeats: int = 2) -> StepTiming:
    """Time real steps of the run's model on this machine's device: forward and backward of one micro batch of
    the phase's own training samples at its seq_len (dropout on; ``estimate_batch``), and one LAMB/AdamW update;
    the best of ``repeats`` after one untimed warm-up. ``threads``: CPU threads to measure with (a CPU rank's
    share)."""
    import torch

    from bertscale.engine import build_optimizer, parameter_groups
    from bertscale.model import BertForPreTraining
    from bertscale.packing import batch_to, model_inputs
    from bertscale.recipe import model_config, perf_options, run_precision
    from bertscale.tokenizer import tokenizer_info

    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[run_precision(cfg, accelerator)]
    info = tokenizer_info(cfg.model.tokenizer)
    batch = batch_to(estimate_batch(cfg, phase), device)
    previous_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.run.seed)
        model = BertForPreTraining(model_config(cfg, info.vocab_size), perf_options(cfg, accelerator))
        model.to(device=device, dtype=dtype).train()
        # the run's optimizer with the run's settings, unsharded (a rank steps its share of it under ZeRO)
        optimizer = build_optimizer(parameter_groups(model, cfg.optimizer.weight_decay), cfg.optimizer, phase.lr)

        def timed(fn) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        def forward_backward() -> None:
            model(**model_inputs(batch)).loss.backward()

        forward_backward()  # warm-up: allocator, kernels, lazy initialisation
        optimizer.step()
        micro = min(timed(forward_backward) for _ in range(repeats))
        update = min(timed(optimizer.step) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous_threads)
    return StepTiming(micro, update, threads if device.type == "cpu" else None)


def estimate_phases(cfg: RunConfig, plans: list[PhasePlan], accelerator: str) -> list[str]:
    """``--dry-run --estimate``: each phase's time from one measured step (``measure_step``) extrapolated to
    its steps x accumulation. The ranks work in parallel, each on its own micro batches (accumulation is
    already the global batch divided by micro batch x ranks), so a step takes one rank's time; CPU ranks are
    measured with their share of this machine's cores."""
    threads = None
    if accelerator == "cpu":
        threads = cpu_threads(cfg, ranks_per_node(cfg, "cpu"))
    lines = ["estimated time per phase (--estimate), from real steps of this model measured on this machine's "
             f"{accelerator}{f' with {threads} thread(s), one CPU rank' + chr(39) + 's share' if threads else ''}, on "
             f"{'unpadded' if cfg.train.unpadded else 'padded'} micro batches as training feeds them (train.unpadded):"]
    total = 0.0
    for p in plans:
        if p.complete:
            lines.append(f"  {p.phase.name}: complete, skipped")
            continue
        timing = measure_step(cfg, p.phase, accelerator, threads)
        seconds = p.phase.steps * timing.step_s(p.accumulation)
        total += seconds
        lines.append(f"  {p.phase.name}: about {duration(seconds)} = {p.phase.steps:,} steps x ({p.accumulation} "
                     f"micro batch(es) of {p.phase.micro_batch} of its samples (seq_len {p.phase.seq_len}) x "
                     f"{timing.micro_batch_s:.3f} s forward+backward + {timing.optimizer_s:.3f} s optimizer step)"
                     f" per rank, {p.world_size} rank(s) in parallel")
    lines.append(f"  total: about {duration(total)}. An estimate, likely low: it leaves out data loading, "
                 f"communication between ranks (gradient all-reduce, ZeRO gathers), starting the ranks (tens of seconds "
                 f"per phase), warm-up and compilation, "
                 f"evaluation and checkpoint saves, and other jobs sharing this machine")
    if cfg.distributed.hostfile and not cfg.distributed.no_ssh:
        lines.append("  measured on this machine, not on the hostfile's nodes: rerun --estimate on a node like them")
    return lines
