"""The worker: one DeepSpeed rank training one phase. Started by the launcher through `deepspeed`.

    deepspeed ... --module bertscale.train --config OUT/run_config.json --phase phase1

Where it starts: the latest complete checkpoint of this phase if there is one (re-running
the command continues), else the final weights of the previous phase, else (the first phase of a
fresh run) ``model.init_from``'s Hugging Face weights or fresh ones.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import random
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bertscale import checkpoint as ckpt
from bertscale import hardware, lifetime, safe_load
from bertscale.config import ConfigError, RunConfig, accumulation_steps, load_config, max_predictions
from bertscale.console import Progress
from bertscale.files import WriteError, open_log, write_failure
from bertscale.engine import (DistInfo, Engine, all_reduce_sum, barrier, broadcast_from_rank0, build_ds_config,
                              consolidated_state_dict, detect_accelerator, init_distributed)
from bertscale.evaluate import EvalTally, Unigram, fit_unigram
from bertscale.hf_format import load_state_dict_into
from bertscale.loader import PretrainingLoader
from bertscale.metrics import Metrics, device_peak_tflops
from bertscale.packing import token_counts, unpad
from bertscale.recipe import cpu_threads, init_from_for, initial_model, model_config, run_precision, run_shape
from bertscale.rundir import RunDir
from bertscale.schedule import lr_at, phase_spans
from bertscale.state import RunState
from bertscale.tokenizer import TokenizerInfo, tokenizer_info

log = logging.getLogger("bertscale.train")


class Trainer:
    """Trains one phase on this rank."""

    def __init__(self, cfg: RunConfig, phase_name: str, dist: DistInfo, accelerator: str,
                 resume_from: str | None = None, stop: StopRequest | None = None):
        self.cfg, self.dist = cfg, dist
        self.stop = stop or StopRequest()
        self.run_dir = RunDir.of(cfg)
        self.phase_index, self.phase = cfg.phase(phase_name)
        self.spans = phase_spans([p.steps for p in cfg.phases])
        self.span = self.spans[self.phase_index]
        self.tokenizer: TokenizerInfo = tokenizer_info(cfg.model.tokenizer)
        self.model_config = model_config(cfg, self.tokenizer.vocab_size)
        self.root = self.run_dir.checkpoints
        self.state = RunState(global_step=self.span.start, phase_index=self.phase_index)
        self.stopped = False

        shape = run_shape(cfg, accelerator, dist.world_size, self.tokenizer)
        self.vocab_rows = shape.vocab_rows
        plan = ckpt.plan_resume(cfg, self.phase_index, shape, resume_from)
        init_from = init_from_for(cfg, self.phase_index, plan)
        model, fresh = initial_model(cfg, self.model_config, accelerator, init_from)
        if init_from:
            self._log0(f"phase {self.phase.name}: starting from the Hugging Face weights in {init_from}; "
                       + (f"not in it, initialised fresh: {', '.join(fresh)}" if fresh else "every weight from it"))
        if plan.previous is not None:
            previous = plan.previous
            load_state_dict_into(model, consolidated_state_dict(previous.path.parent, previous.tag))
            self.state.samples_seen = previous.meta["state"]["samples_seen"]
            self.state.tokens_seen = previous.meta["state"]["tokens_seen"]
            self.state.world_size_changes = list(previous.meta["state"].get("world_size_changes", []))
            self.state.precision_changes = list(previous.meta["state"].get("precision_changes", []))
        self.accumulation = accumulation_steps(self.phase, dist.world_size)
        ds_config = build_ds_config(cfg.distributed.deepspeed_config, self.phase, dist.world_size,
                                    cfg.optimizer, accelerator, shape.precision,
                                    load_universal=plan.through_universal or plan.carry_through_universal)
        self.engine = Engine(model, ds_config, cfg.optimizer, accelerator, lr=self.phase.lr)
        if plan.previous is not None:
            for note in (plan.world_size_note(self.phase, shape, self.accumulation),
                         plan.precision_note(self.phase, shape)):
                if note:
                    self._log0(note)
            if plan.carry_through_universal:  # written by another number of ranks, or in another precision
                self._load_universal(plan.previous)
            elif plan.carry_moments:
                self.engine.load_shards(plan.previous.path.parent, plan.previous.tag)
            self._log0(f"phase {self.phase.name}: starting from the final weights of "
                       f"{cfg.phases[self.phase_index - 1].name} ({plan.previous.path}); optimizer moments "
                       + ("carried over" if plan.carry_moments else "reset"))
        self.bad_steps = self.bad_in_a_row = 0
        self.sample_log = _sample_log(dist.rank)
        # replicate_data: every rank reads the same stream of whole global batches (see TrainSection)
        data_micro, data_rank, data_world = ((self.phase.global_batch, 0, 1) if cfg.train.replicate_data
                                             else (self.phase.micro_batch, dist.rank, dist.world_size))
        self.loader = PretrainingLoader(
            self.phase.data, split="train", micro_batch=data_micro, rank=data_rank,
            world_size=data_world, seed=cfg.run.seed, tokenizer=self.tokenizer,
            mask_prob=self.phase.mask_prob, max_predictions=max_predictions(self.phase),
            num_workers=cfg.train.num_workers, shuffle_buffer=cfg.train.shuffle_buffer,
            expect_seq_len=self.phase.seq_len, whole_word_masking=cfg.data.whole_word_masking,
            strict_shards=cfg.data.strict_shards,
            # the epoch is cut per global batch: the same global batches, and positions, on any world size
            global_batch=None if cfg.train.replicate_data else self.phase.global_batch,
            with_sample_ids=bool(os.environ.get(SAMPLE_LOG_ENV)),
            unpadded=cfg.train.unpadded and not cfg.train.replicate_data)  # replicated: unpadded per slice
        resume = plan.resume
        if resume is not None and plan.through_universal:
            self._resume_through_universal(plan)
        elif resume is not None:
            self.engine.load_shards(resume.path.parent, resume.tag)
            self.state.load_state_dict(resume.meta["state"])
            # last: RNG states (dropout) as they were right after the checkpointed step
            self.loader.load_state_dict(ckpt.read_rank_state(resume.path, dist.rank)["loader"])
            self._log0(f"resumed from {resume.path} at global step {self.state.global_step}")
        if resume is not None:
            if plan.changed:
                self._log0("changed since the checkpoint: " + "; ".join(plan.changed))
        # on resume, hide events an interrupted attempt logged after its last checkpoint
        self.metrics = Metrics(str(self.run_dir.tensorboard), dist.rank, cfg.run.name,
                               total_steps=self.spans[-1].end,
                               purge_step=self.state.global_step + 1 if resume is not None else None,
                               model_dims=(self.model_config.num_hidden_layers, self.model_config.hidden_size,
                                           self.model_config.vocab_size),
                               world_size=dist.world_size, peak_tflops=device_peak_tflops())
        if self.phase_index == 0 and resume is None:
            self.metrics.log_config(cfg.to_dict())

    def _load_universal(self, source: ckpt.CheckpointInfo) -> None:
        """Model and optimizer from ``source``'s universal checkpoint, which any number of ranks can load
        (made by the launcher or an earlier attempt; rank 0 makes it if it is missing)."""
        if self.dist.rank == 0:
            ckpt.universal_checkpoint(source)
        barrier()
        self.engine.load_shards(source.path, ckpt.UNIVERSAL)

    def _resume_through_universal(self, plan: ckpt.ResumePlan) -> None:
        """Continue a phase that other ranks, or another precision, started: model, fp32 weights and optimizer
        from the universal checkpoint (``_load_universal``). On other ranks the data position in global steps
        comes from rank 0's loader state (the same on every rank) and the RNG streams are seeded afresh per
        rank; on the same ranks each rank takes its own loader and RNG state back."""
        resume = plan.resume
        self._load_universal(resume)
        self.state.load_state_dict(resume.meta["state"])
        step = self.state.global_step
        if plan.precision_change is not None:
            before, now = plan.precision_change
            self.state.precision_changes.append({"global_step": step, "from": before, "to": now})
        if plan.world_change is None:
            self.loader.load_state_dict(ckpt.read_rank_state(resume.path, self.dist.rank)["loader"])
        else:
            before, now = plan.world_change
            self.state.world_size_changes.append({"global_step": step, "from": before, "to": now})
            self.loader.load_state_dict(ckpt.read_rank_state(resume.path, 0, restore_rng=False)["loader"])
            # the saved RNG states belong to ranks that no longer exist: dropout draws afresh, reproducibly
            seed = int(np.random.SeedSequence([self.cfg.run.seed, step, self.dist.rank]).generate_state(1)[0])
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        for note in (plan.resume_note(self.phase, self.accumulation), plan.precision_resume_note()):
            if note:
                self._log0(note)
        self._log0(f"resumed from {resume.path} at global step {step}")

    def _log0(self, message: str) -> None:
        if self.dist.rank == 0:
            log.info(message)

    def train(self) -> None:
        phase = self.phase
        self._log0(f"phase {phase.name}: global steps {self.state.global_step}..{self.span.end} "
                   f"seq_len {phase.seq_len}, global batch {phase.global_batch} = micro {phase.micro_batch} x "
                   f"accumulation {self.accumulation} x world {self.dist.world_size}")
        batches = iter(self.loader)
        # lines, not a bar: the launcher relays this output through a pipe, where a bar is never drawn
        progress = Progress(phase.name, self.span.start, self.span.end, self.state.global_step)
        self._train_loop(batches, progress)

    def _train_loop(self, batches, progress: Progress) -> None:
        cfg, phase = self.cfg, self.phase
        p = cfg.phases
        while self.state.global_step < self.span.end:
            lr = lr_at(self.state.global_step, self.spans, [x.lr for x in p], [x.warmup for x in p],
                       [x.decay_power for x in p])
            self.engine.set_lr(lr)
            tokens = 0
            step = self.state.global_step + 1
            poison = _fault_active("nan-loss", step, self.dist.rank)
            self.engine.poison_weights = _fault_active("nan-weights", step, self.dist.rank)
            for batch in self._micro_batches(batches):
                if self.sample_log is not None:
                    self.sample_log.write(f"{step} {' '.join(map(str, batch['sample_ids'].tolist()))}\n")
                counts = token_counts(batch)  # on the host, before the copy: counting never waits for the device
                tokens += counts[1]
                batch = self.engine.to_device(batch)
                out = self.engine.train_micro_batch(batch, poison=poison)
                self.metrics.add(out, counts)
            self.state.global_step += 1
            self.state.samples_seen += phase.global_batch
            # one small all-reduce per step: every rank takes the same stop decision at the same step,
            # agrees whether the step was skipped as non-finite, and the run counts its real tokens
            stop, all_tokens, bad = self.stop.agreed(tokens, self.engine.step_was_bad())
            self.state.tokens_seen += all_tokens
            self.metrics.step_done()
            self._count_bad_step(bad)
            last = self.state.global_step == self.span.end
            logged = self.state.global_step % cfg.train.log_interval == 0 or last or stop
            if logged:
                self.metrics.log(self.state.global_step, phase.name, self._scalars(lr))
            line = progress.update(self.state.global_step, logged)
            if line is not None:
                self._log0(line)
            if last:
                self.state.phase_complete = True
                self.save()
            elif stop or self.state.global_step % cfg.train.save_interval == 0:
                self.save()
            if stop and not last:
                self._log0(f"stop requested (SIGTERM/SIGINT): saved at global step {self.state.global_step}; "
                           f"re-run the same command to continue")
                self.metrics.close()
                self.stopped = True
                return
            if cfg.train.eval_interval and self.state.global_step % cfg.train.eval_interval == 0 and not last:
                self.metrics.log_eval(self.state.global_step, self.evaluate(cfg.train.eval_batches))
        if cfg.train.eval_batches > 0:
            _fault_point("die-in-eval", self.state.global_step, self.dist.rank)
            self.metrics.log_eval(self.state.global_step, self.evaluate(cfg.train.eval_batches))
        self.metrics.close()

    def _micro_batches(self, batches):
        """This rank's micro batches of one optimizer step. With replicate_data the loader yields whole
        global batches; rank r trains on contiguous blocks (j * world + r) of micro_batch rows, so the
        micro batches of a step are the same set at any world size."""
        if not self.cfg.train.replicate_data:
            for _ in range(self.accumulation):
                yield self._next_batch(batches)
            return
        whole, m, world = self._next_batch(batches), self.phase.micro_batch, self.dist.world_size
        for j in range(self.accumulation):
            start = (j * world + self.dist.rank) * m
            block = {k: v[start:start + m] for k, v in whole.items()}
            yield unpad(block, with_sample_ids="sample_ids" in block) if self.cfg.train.unpadded else block

    def _next_batch(self, batches) -> dict:
        """The loader's next batch; the time waited for it goes to ``throughput/data_wait_fraction``."""
        t = time.perf_counter()
        batch = next(batches)
        self.metrics.add_data_wait(time.perf_counter() - t)
        return batch

    def _count_bad_step(self, bad: bool) -> None:
        """Skipped non-finite steps (agreed over ranks); stop after train.max_bad_steps in a row."""
        if not bad:
            self.bad_in_a_row = 0
            return
        self.bad_steps += 1
        self.bad_in_a_row += 1
        step = self.state.global_step
        self._log0(f"step {step}: non-finite loss, gradient or weights on some rank; step skipped, weights unchanged "
                   f"({self.bad_in_a_row} in a row, {self.bad_steps} in this phase)")
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            self.metrics.close()
            raise NonFiniteError(
                f"stopping at global step {step}: {self.bad_in_a_row} consecutive optimizer steps "
                f"({step - self.bad_in_a_row + 1}..{step}) had a non-finite loss, gradient or weights and were "
                f"skipped (train.max_bad_steps = {self.cfg.train.max_bad_steps}); {self._last_complete()}. Lower "
                f"the learning rate, check the data, or use bf16, then resume from that checkpoint")

    def _scalars(self, lr: float) -> dict[str, float]:
        """What the trainer knows at a log point (Metrics adds losses, throughput and resources)."""
        scalars = {
            "optim/lr": lr,
            "optim/loss_scale": self.engine.loss_scale(),
            "optim/skipped_steps": self.engine.skipped_steps(),
            "optim/nonfinite_steps": self.bad_steps,
            "optim/global_batch": self.phase.global_batch,
            "train/phase": self.phase_index,
            "train/seq_len": self.phase.seq_len,
            "train/samples_seen": self.state.samples_seen,
            "data/epoch": self.loader.epoch,
            "data/corrupt_shards": self._corrupt_shards(),
        }
        grad_norm = self.engine.grad_norm()
        if grad_norm is not None:
            scalars["optim/grad_norm"] = grad_norm
        return scalars

    def _corrupt_shards(self) -> float:
        """Damaged shards skipped so far by all ranks (each rank reads its own; a collective: every rank
        calls it at the log points). With replicate_data every rank reads, and counts, the same shards."""
        total = all_reduce_sum(torch.tensor([float(getattr(self.loader, "corrupt_shards", 0))], dtype=torch.float64))
        return total.item() / (self.dist.world_size if self.cfg.train.replicate_data else 1)

    def save(self) -> None:
        """Write a checkpoint on every rank; rank 0 marks it complete once every rank has written its part
        and the weights of every rank are finite."""
        tag = ckpt.tag_for(self.state.global_step)
        path = self.root / tag
        t0 = time.perf_counter()
        try:
            if self.dist.rank == 0 and path.exists():  # an interrupted attempt's leftover at this step
                ckpt.remove_incomplete(path)
            barrier()
            self.engine.save_shards(self.root, tag)
            _fault_point("die-in-save", self.state.global_step, self.dist.rank)
            ckpt.write_rank_state(path, self.dist.rank, {"loader": self.loader.state_dict()})
            if self.dist.rank == 0:
                ckpt.write_meta(path, {
                    "state": self.state.state_dict(),
                    "phase": self.phase.name,
                    "model_config": self.model_config.to_hf_dict(),
                    "tokenizer_fingerprint": self.tokenizer.fingerprint,
                    "world_size": self.dist.world_size,
                    "zero_stage": self.engine.ds_config["zero_optimization"]["stage"],
                    "precision": self.engine.precision,
                    "vocab_rows": self.vocab_rows,
                    "data_order": ckpt.data_order(self.cfg, self.phase_index),
                    "config": self.cfg.to_dict(),
                }, self.cfg.model.tokenizer)
        except (OSError, RuntimeError) as exc:
            problem = write_failure(exc, path)
            if problem is None:
                raise
            raise WriteError(getattr(exc, "errno", None) or errno.EIO,
                             f"{problem} while saving the checkpoint of global step {self.state.global_step}; "
                             f"{self._last_complete()}. Free some space (or point run.out_dir elsewhere) and "
                             f"re-run the same command to continue from it") from exc
        barrier()  # every rank has written its shards and state
        if not self.engine.weights_finite():  # collective: every rank checks its own partition
            raise NonFiniteError(f"the weights at global step {self.state.global_step} are not finite on some "
                                 f"rank, so {path} is not marked complete; {self._last_complete()}. Lower the "
                                 f"learning rate or check the data, then resume from that checkpoint")
        if self.dist.rank == 0:
            ckpt.mark_complete(path)
            ckpt.prune(self.root, self.cfg.train.keep_last)
            log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)
        barrier()

    def _last_complete(self) -> str:
        last = ckpt.latest(self.root)
        return (f"the last complete checkpoint is {last.path} (global step {last.global_step})"
                if last is not None else "there is no complete checkpoint yet")

    def evaluate(self, max_batches: int) -> dict[str, float]:
        """Held-out MLM/NSP metrics and their baselines (``evaluate.EvalTally``: [MASK]-only figures
        beside all-positions ones); batches are split over ranks (every rank runs the same count)."""
        world, rank = self.dist.world_size, self.dist.rank
        # masked as the training batches are (the loader's own settings, whole-word masking included)
        batches = list(self.loader.eval_batches(batch_size=self.phase.micro_batch, max_batches=max_batches))
        # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively).
        usable = len(batches) // world * world
        if usable:
            mine = [(b, True) for b in batches[rank:usable:world]]
        else:  # fewer batches than ranks: all run them all, rank 0 counts
            mine = [(b, rank == 0) for b in batches]
        tally = EvalTally(self.tokenizer.vocab_size, self.tokenizer.mask_id)
        for batch, counted in mine:
            tally.score(lambda b: self.engine.eval_batch(self.engine.to_device(b)), batch, counted)
        all_reduce_sum(tally.sums)
        return tally.results(self.unigram)

    @functools.cached_property
    def unigram(self) -> Unigram | None:
        """The MLM baselines' unigram, fitted once per phase on its training split (``evaluate.fit_unigram``)
        by rank 0 alone and broadcast: the other ranks would read (or download) the same samples for the same
        counts. A collective: every rank first asks for it in the same ``evaluate``."""
        return broadcast_from_rank0(fit_unigram(self.phase.data, self.tokenizer) if self.dist.rank == 0 else None)


class StopRequest:
    """Set by SIGTERM/SIGINT (what schedulers send before preemption). The ranks agree on it once per
    optimizer step, so all of them save at the same step and exit 0."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:
        self.requested = True

    def agreed(self, count: int = 0, bad: bool = False) -> tuple[bool, int, bool]:
        """(did any rank receive a stop signal, sum of ``count`` over ranks, was the step bad on any
        rank) in one all-reduce."""
        values = all_reduce_sum(torch.tensor([1.0 if self.requested else 0.0, float(count), 1.0 if bad else 0.0],
                                             dtype=torch.float64))
        return bool(values[0].item() > 0), int(values[1].item()), bool(values[2].item() > 0)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the message names the checkpoint."""


SAMPLE_LOG_ENV = "BERTSCALE_SAMPLE_LOG"
"""Tests only: a directory where every rank appends ``step id id ...`` per micro batch it trains on."""


def _sample_log(rank: int):
    """The open ``BERTSCALE_SAMPLE_LOG`` file of this rank (line-buffered, appended to), or None."""
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return None
    return open_log(Path(folder) / f"samples-{os.getpid()}-rank{rank}.txt")


def _fault_active(name: str, step: int, rank: int) -> bool:
    """BERTSCALE_FAULT=name:step:rank (tests only). ``nan-loss:S:R`` makes rank R's loss NaN at global step S;
    ``nan-loss:S-E:R`` at steps S..E; ``nan-weights:S:R`` makes rank R's weights NaN as its optimizer steps."""
    spec = os.environ.get("BERTSCALE_FAULT", "")
    if not spec.startswith(name + ":"):
        return False
    _, steps, ranks = spec.split(":")
    first, _, last = steps.partition("-")
    return int(ranks) == rank and int(first) <= step <= int(last or first)


def _fault_point(name: str, step: int, rank: int) -> None:
    """Fault injection for the fault-tolerance tests: BERTSCALE_FAULT=name:step:rank kills this rank here."""
    if _fault_active(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bertscale worker (started by `bertscale pretrain`)")
    parser.add_argument("--config", required=True, help="resolved run config (JSON) written by the launcher")
    parser.add_argument("--phase", required=True, help="name of the phase to train")
    parser.add_argument("--resume-from", default=None, help="a checkpoint directory to start this phase from")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("bertscale").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # DeepSpeed's own ZeRO code calls this deprecated collective on every step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    lifetime.watch_launcher()
    safe_load.enforce_in_this_process()  # every torch.load of this rank, DeepSpeed's included
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr)
        return 1
    run_dir = RunDir.of(cfg)
    try:
        accelerator = detect_accelerator(cfg.distributed.accelerator)
        dist = init_distributed(accelerator, cfg.distributed.timeout_minutes,
                                cfg.distributed.rendezvous_timeout_minutes)
        check_precision_here(cfg, accelerator, dist)
        if accelerator == "cpu":
            torch.set_num_threads(cpu_threads(cfg, dist.local_world_size))
        stop = StopRequest()
        stop.install()
        trainer = Trainer(cfg, args.phase, dist, accelerator, resume_from=args.resume_from, stop=stop)
        trainer.train()
        barrier()
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the rank exits 1
        run_dir.record_exit(rank, "error", exc)
        return 1
    run_dir.record_exit(rank, "stopped" if trainer.stopped else "ok")
    torch.distributed.destroy_process_group()
    return 0


def check_precision_here(cfg: RunConfig, accelerator: str, dist: DistInfo) -> None:
    """This rank's device against the run's precision: refuse one it cannot compute (bf16 on a GPU older than
    Ampere); on a CPU without native bf16, warn once per node unless the launcher ran here and warned already
    (a hostfile launch decides on another machine)."""
    name = run_precision(cfg, accelerator)
    problem = hardware.unsupported(name, accelerator, devices=dist.local_rank + 1)
    if problem:
        raise ConfigError(f"rank {dist.rank} on {socket.gethostname()}: {problem}")
    if name == "bf16" and accelerator == "cpu" and dist.local_rank == 0 and not lifetime.launched_here():
        native, _ = hardware.cpu_bf16_native()
        if not native:
            log.warning("rank %d on %s: warning: %s", dist.rank, socket.gethostname(), hardware.emulated_warning())


def exit_rank(code: int) -> None:
    """End the rank once ``main`` returned, without the interpreter's teardown when nothing is left to wait for.

    Tearing down torch's and DeepSpeed's modules takes a CPU rank ~1.3 s after its last line, at the end of
    every phase (measured on the 2-core machine: 23.5 s -> 21.1 s for a 2-phase tiny run). The exit handlers
    (the loader's workers, logging, multiprocessing) still run; only the freeing of objects the OS reclaims
    anyway is skipped. A non-daemon thread still running (something writing in the background) gets the
    ordinary exit, which waits for it."""
    import atexit
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # the launcher's pipe is gone (lifetime.watch_launcher)
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
