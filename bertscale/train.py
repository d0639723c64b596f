"""The worker: one DeepSpeed rank training one phase. Started by the launcher through `deepspeed`.

    deepspeed ... --module bertscale.train --config OUT/run_config.json --phase phase1

Where it starts: the latest complete checkpoint of this phase if there is one (re-running
the command continues), else the final weights of the previous phase, else fresh weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bertscale import checkpoint as ckpt
from bertscale.config import RunConfig, accumulation_steps, load_config, max_predictions
from bertscale.engine import (DistInfo, Engine, all_reduce_sum, barrier, build_ds_config,
                              consolidated_state_dict, detect_accelerator, init_distributed)
from bertscale.hf_format import load_state_dict_into
from bertscale.loader import PretrainingLoader
from bertscale.metrics import Metrics, device_peak_tflops
from bertscale.model import BertConfig, BertForPreTraining, PerfOptions, preset_config
from bertscale.schedule import lr_at, phase_spans
from bertscale.state import RunState
from bertscale.tokenizer import TokenizerInfo, tokenizer_info

log = logging.getLogger("bertscale.train")


def model_config(cfg: RunConfig, vocab_size: int) -> BertConfig:
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                            "intermediate_size") if getattr(m, k) is not None}
    if m.dropout is not None:
        overrides.update(hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    return preset_config(m.preset, vocab_size=vocab_size, **overrides)


def perf_options(cfg: RunConfig, accelerator: str) -> PerfOptions:
    """The model's runtime levers from ``[model]``; vocabulary padding defaults per accelerator."""
    m = cfg.model
    pad = m.pad_vocab_multiple or PerfOptions.for_device(accelerator).pad_vocab_multiple
    return PerfOptions(fused_qkv=m.fused_qkv, fast_dropout=m.fast_dropout, pad_vocab_multiple=pad,
                       sparse_last_layer=m.sparse_last_layer, fused_mlm_loss=m.fused_mlm_loss, compile=m.compile,
                       gradient_checkpointing=m.gradient_checkpointing)


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.run.out_dir) / "checkpoints"


class Trainer:
    """Trains one phase on this rank."""

    def __init__(self, cfg: RunConfig, phase_name: str, dist: DistInfo, accelerator: str,
                 resume_from: str | None = None, stop: StopRequest | None = None):
        self.cfg, self.dist = cfg, dist
        self.stop = stop or StopRequest()
        self.phase_index, self.phase = cfg.phase(phase_name)
        self.spans = phase_spans([p.steps for p in cfg.phases])
        self.span = self.spans[self.phase_index]
        self.tokenizer: TokenizerInfo = tokenizer_info(cfg.model.tokenizer)
        self.model_config = model_config(cfg, self.tokenizer.vocab_size)
        self.root = checkpoint_root(cfg)
        self.state = RunState(global_step=self.span.start, phase_index=self.phase_index)

        torch.manual_seed(cfg.run.seed)
        perf = perf_options(cfg, accelerator)
        multiple = perf.pad_vocab_multiple
        self.vocab_rows = -(-self.model_config.vocab_size // multiple) * multiple  # with tensor-core padding
        model = BertForPreTraining(self.model_config, perf)
        resume = self._find_resume_point(model, resume_from)
        self.accumulation = accumulation_steps(self.phase, dist.world_size)
        ds_config = build_ds_config(cfg.distributed.deepspeed_config, self.phase, dist.world_size,
                                    cfg.optimizer, accelerator)
        self.engine = Engine(model, ds_config, cfg.optimizer, accelerator, lr=self.phase.lr)
        if resume is None and self.phase_index > 0:
            self._start_phase_from_previous()
        self.bad_steps = self.bad_in_a_row = 0
        # replicate_data: every rank reads the same stream of whole global batches (see TrainSection)
        data_micro, data_rank, data_world = ((self.phase.global_batch, 0, 1) if cfg.train.replicate_data
                                             else (self.phase.micro_batch, dist.rank, dist.world_size))
        self.loader = PretrainingLoader(
            self.phase.data, split="train", micro_batch=data_micro, rank=data_rank,
            world_size=data_world, seed=cfg.run.seed, tokenizer=self.tokenizer,
            mask_prob=self.phase.mask_prob, max_predictions=max_predictions(self.phase),
            num_workers=cfg.train.num_workers, shuffle_buffer=cfg.train.shuffle_buffer,
            expect_seq_len=self.phase.seq_len, whole_word_masking=cfg.data.whole_word_masking,
            strict_shards=cfg.data.strict_shards)
        if resume is not None:
            self.engine.load_shards(resume.path.parent, resume.tag)
            self.state.load_state_dict(resume.meta["state"])
            # last: RNG states (dropout) as they were right after the checkpointed step
            self.loader.load_state_dict(ckpt.read_rank_state(resume.path, dist.rank)["loader"])
            self._log0(f"resumed from {resume.path} at global step {self.state.global_step}")
        # on resume, hide events an interrupted attempt logged after its last checkpoint
        self.metrics = Metrics(str(Path(cfg.run.out_dir) / "tensorboard"), dist.rank, cfg.run.name,
                               total_steps=self.spans[-1].end,
                               purge_step=self.state.global_step + 1 if resume is not None else None,
                               model_dims=(self.model_config.num_hidden_layers, self.model_config.hidden_size,
                                           self.model_config.vocab_size),
                               world_size=dist.world_size, peak_tflops=device_peak_tflops())
        if self.phase_index == 0 and resume is None:
            self.metrics.log_config(cfg.to_dict())

    def _start_phase_from_previous(self) -> None:
        """A new phase: say how accumulation follows from the world size; optionally carry the moments."""
        previous = ckpt.final_of_phase(self.root, self.phase_index - 1)
        saved_world = previous.meta.get("world_size") if previous is not None else None
        if saved_world is not None and saved_world != self.dist.world_size:
            self._log0(f"phase {self.phase.name}: world size changed from {saved_world} to {self.dist.world_size}; "
                       f"gradient accumulation recomputed: {self.phase.global_batch} = micro {self.phase.micro_batch}"
                       f" x accumulation {self.accumulation} x world {self.dist.world_size}")
        if not self.phase.carry_optimizer_state or previous is None:
            return
        stage = self.engine.ds_config["zero_optimization"]["stage"]
        if saved_world != self.dist.world_size or previous.meta.get("zero_stage") != stage:
            raise RuntimeError(
                f"phase {self.phase.name!r} has carry_optimizer_state = true, but {previous.path} was written by "
                f"{saved_world} ranks at ZeRO stage {previous.meta.get('zero_stage')} and this run has "
                f"{self.dist.world_size} ranks at stage {stage}; the optimizer shards are per rank. Use the same "
                f"ranks and stage, or set phases.{self.phase.name}.carry_optimizer_state=false (fresh moments)")
        self.engine.load_shards(previous.path.parent, previous.tag)
        self._log0(f"phase {self.phase.name}: optimizer moments carried over from {previous.path}")

    def _log0(self, message: str) -> None:
        if self.dist.rank == 0:
            log.info(message)

    def _find_resume_point(self, model: BertForPreTraining, resume_from: str | None) -> ckpt.CheckpointInfo | None:
        """Resume this phase, or start it from the previous phase's final weights.

        The source is ``resume_from`` (a checkpoint given with --resume PATH) or the latest complete
        checkpoint of this run. Mid-phase resume needs the same number of ranks (the optimizer shards and
        data positions are per rank); a new phase starts from consolidated weights on any number.
        """
        source = ckpt.resolve(resume_from) if resume_from else ckpt.latest(self.root)
        if source is not None:
            self._check_compatible(source)
        if source is not None and source.phase_index == self.phase_index and not source.phase_complete:
            saved_world = source.meta.get("world_size")
            if saved_world != self.dist.world_size:
                raise RuntimeError(
                    f"{source.path} was written by {saved_world} ranks but this run has {self.dist.world_size}; "
                    f"resuming in the middle of a phase needs the same number of ranks (optimizer shards and data "
                    f"positions are per rank). Resume with {saved_world} ranks, or let the phase finish: the next "
                    f"phase starts from consolidated weights on any number of ranks.")
            saved_rows = source.meta.get("vocab_rows", self.model_config.vocab_size)
            if saved_rows != self.vocab_rows:
                raise RuntimeError(
                    f"{source.path} holds {saved_rows} vocabulary rows (model.pad_vocab_multiple padding) but this "
                    f"run builds {self.vocab_rows}: its default differs between CUDA (64) and CPU (1). Set "
                    f"model.pad_vocab_multiple to the value of the run that wrote the checkpoint to resume it.")
            if not self.span.start <= source.global_step < self.span.end:
                raise RuntimeError(f"{source.path} is at global step {source.global_step}, outside phase "
                                   f"{self.phase.name!r} (steps {self.span.start}..{self.span.end}) of this config")
            return source
        if source is not None and source.phase_index >= self.phase_index and source.phase_complete:
            raise RuntimeError(f"phase {self.phase.name!r} is already complete ({source.path}); "
                               f"the launcher skips finished phases")
        if self.phase_index > 0:
            if source is not None and source.phase_index == self.phase_index - 1 and source.phase_complete:
                previous = source
            else:
                previous = ckpt.final_of_phase(self.root, self.phase_index - 1)
            if previous is None:
                raise RuntimeError(f"phase {self.phase.name!r} starts from the final weights of phase "
                                   f"{self.cfg.phases[self.phase_index - 1].name!r}, but {self.root} has no "
                                   f"complete final checkpoint of it; run that phase first")
            if previous.global_step != self.span.start:
                raise RuntimeError(f"{previous.path} ended phase {previous.meta.get('phase')!r} at global step "
                                   f"{previous.global_step}, but the config's phase table starts phase "
                                   f"{self.phase.name!r} at step {self.span.start}; restore the earlier phases' "
                                   f"steps or start a new run.out_dir")
            load_state_dict_into(model, consolidated_state_dict(previous.path.parent, previous.tag))
            self.state.samples_seen = previous.meta["state"]["samples_seen"]
            self.state.tokens_seen = previous.meta["state"]["tokens_seen"]
            self._log0(f"phase {self.phase.name}: starting from the final weights of "
                       f"{self.cfg.phases[self.phase_index - 1].name} ({previous.path}); optimizer moments reset")
        return None

    def _check_compatible(self, found: ckpt.CheckpointInfo) -> None:
        saved_model = found.meta.get("model_config", {})
        ours = self.model_config.to_hf_dict()
        diffs = [f"{k}: checkpoint {saved_model.get(k)!r} vs config {ours.get(k)!r}"
                 for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if saved_model.get(k) != ours.get(k)]
        if found.meta.get("tokenizer_fingerprint") != self.tokenizer.fingerprint:
            diffs.append("tokenizer: checkpoint was trained with a different vocabulary")
        if diffs:
            raise RuntimeError(f"{found.path} belongs to a different model, so this run cannot continue "
                               f"from it: " + "; ".join(diffs) + f". Use a new run.out_dir or the matching config.")

    def train(self) -> None:
        phase = self.phase
        self._log0(f"phase {phase.name}: global steps {self.state.global_step}..{self.span.end} "
                   f"seq_len {phase.seq_len}, global batch {phase.global_batch} = micro {phase.micro_batch} x "
                   f"accumulation {self.accumulation} x world {self.dist.world_size}")
        batches = iter(self.loader)
        # A bar per phase where a person watches (a terminal); logs and pipes get the interval lines only.
        bar = tqdm(total=self.span.steps, initial=self.state.global_step - self.span.start, desc=phase.name,
                   unit="step", dynamic_ncols=True, disable=self.dist.rank != 0 or not sys.stderr.isatty())
        with bar, logging_redirect_tqdm():
            self._train_loop(batches, bar)

    def _train_loop(self, batches, bar) -> None:
        cfg, phase = self.cfg, self.phase
        p = cfg.phases
        while self.state.global_step < self.span.end:
            lr = lr_at(self.state.global_step, self.spans, [x.lr for x in p], [x.warmup for x in p],
                       [x.decay_power for x in p])
            self.engine.set_lr(lr)
            tokens = 0
            step = self.state.global_step + 1
            poison = _fault_active("nan-loss", step, self.dist.rank)
            for batch in self._micro_batches(batches):
                batch = self.engine.to_device(batch)
                out = self.engine.train_micro_batch(batch, poison=poison)
                self.metrics.add(out, batch)
                tokens += int(batch["attention_mask"].sum())
            self.state.global_step += 1
            self.state.samples_seen += phase.global_batch
            # one small all-reduce per step: every rank takes the same stop decision at the same step,
            # agrees whether the step was skipped as non-finite, and the run counts its real tokens
            stop, all_tokens, bad = self.stop.agreed(tokens, self.engine.step_was_bad())
            self.state.tokens_seen += all_tokens
            self.metrics.step_done()
            self._count_bad_step(bad)
            bar.update()
            last = self.state.global_step == self.span.end
            if self.state.global_step % cfg.train.log_interval == 0 or last or stop:
                self.metrics.log(self.state.global_step, phase.name, self._scalars(lr))
            if last:
                self.state.phase_complete = True
                self.save()
            elif stop or self.state.global_step % cfg.train.save_interval == 0:
                self.save()
            if stop and not last:
                self._log0(f"stop requested (SIGTERM/SIGINT): saved at global step {self.state.global_step}; "
                           f"re-run the same command to continue")
                self.metrics.close()
                return
            if cfg.train.eval_interval and self.state.global_step % cfg.train.eval_interval == 0 and not last:
                self.metrics.log_eval(self.state.global_step, self.evaluate(cfg.train.eval_batches))
        if cfg.train.eval_batches > 0:
            self.metrics.log_eval(self.state.global_step, self.evaluate(cfg.train.eval_batches))
        self.metrics.close()

    def _micro_batches(self, batches):
        """This rank's micro batches of one optimizer step. With replicate_data the loader yields whole
        global batches; rank r trains on contiguous blocks (j * world + r) of micro_batch rows, so the
        micro batches of a step are the same set at any world size."""
        if not self.cfg.train.replicate_data:
            for _ in range(self.accumulation):
                yield next(batches)
            return
        whole, m, world = next(batches), self.phase.micro_batch, self.dist.world_size
        for j in range(self.accumulation):
            start = (j * world + self.dist.rank) * m
            yield {k: v[start:start + m] for k, v in whole.items()}

    def _count_bad_step(self, bad: bool) -> None:
        """Skipped non-finite steps (agreed over ranks); stop after train.max_bad_steps in a row."""
        if not bad:
            self.bad_in_a_row = 0
            return
        self.bad_steps += 1
        self.bad_in_a_row += 1
        step = self.state.global_step
        self._log0(f"step {step}: non-finite loss or gradient on some rank; step skipped, weights unchanged "
                   f"({self.bad_in_a_row} in a row, {self.bad_steps} in this phase)")
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            last = ckpt.latest(self.root)
            where = (f"the last complete checkpoint is {last.path} (global step {last.global_step})"
                     if last is not None else "there is no complete checkpoint yet")
            self.metrics.close()
            raise NonFiniteError(
                f"stopping at global step {step}: {self.bad_in_a_row} consecutive optimizer steps "
                f"({step - self.bad_in_a_row + 1}..{step}) had a non-finite loss or gradient and were skipped "
                f"(train.max_bad_steps = {self.cfg.train.max_bad_steps}); {where}. Lower the learning rate, "
                f"check the data, or use bf16, then resume from that checkpoint")

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
            "data/corrupt_shards": getattr(self.loader, "corrupt_shards", 0),
        }
        grad_norm = self.engine.grad_norm()
        if grad_norm is not None:
            scalars["optim/grad_norm"] = grad_norm
        return scalars

    def save(self) -> None:
        tag = ckpt.tag_for(self.state.global_step)
        path = self.root / tag
        t0 = time.perf_counter()
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
                "vocab_rows": self.vocab_rows,
            }, self.cfg.model.tokenizer)
        barrier()  # every rank has written its shards and state
        if self.dist.rank == 0:
            ckpt.mark_complete(path)
            ckpt.prune(self.root, self.cfg.train.keep_last)
            log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)
        barrier()

    def evaluate(self, max_batches: int) -> dict[str, float]:
        """Held-out MLM/NSP metrics; batches are split over ranks (every rank runs the same count)."""
        world, rank = self.dist.world_size, self.dist.rank
        # masked as the training batches are (the loader's own settings, whole-word masking included)
        batches = list(self.loader.eval_batches(batch_size=self.phase.micro_batch, max_batches=max_batches))
        # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively).
        usable = len(batches) // world * world
        if usable:
            mine = [(b, True) for b in batches[rank:usable:world]]
        else:  # fewer batches than ranks: all run them all, rank 0 counts
            mine = [(b, rank == 0) for b in batches]
        sums = torch.zeros(6)
        for batch, counted in mine:
            out = self.engine.eval_batch(self.engine.to_device(batch))
            if not counted:
                continue
            sums += torch.stack([out.mlm_loss.float() * out.mlm_count, out.mlm_correct.float(),
                                 out.mlm_count.float(), out.nsp_loss.float() * out.nsp_count,
                                 out.nsp_correct.float(), out.nsp_count.float()]).cpu()
        all_reduce_sum(sums)
        mlm_n, nsp_n = max(sums[2].item(), 1), max(sums[5].item(), 1)
        return {"mlm_loss": sums[0].item() / mlm_n, "mlm_accuracy": sums[1].item() / mlm_n,
                "nsp_loss": sums[3].item() / nsp_n, "nsp_accuracy": sums[4].item() / nsp_n}


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


def _fault_active(name: str, step: int, rank: int) -> bool:
    """BERTSCALE_FAULT=name:step:rank (tests only). ``nan-loss:S:R`` makes rank R's loss NaN at global step S;
    ``nan-loss:S-E:R`` at steps S..E."""
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
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("bertscale").setLevel(logging.INFO if rank == "0" else logging.WARNING)
    # DeepSpeed's own ZeRO code calls this deprecated collective on every step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    cfg = load_config(args.config)
    accelerator = detect_accelerator(cfg.distributed.accelerator)
    dist = init_distributed(accelerator, cfg.distributed.timeout_minutes)
    if accelerator == "cpu":
        threads = cfg.distributed.threads_per_rank or max(1, (os.cpu_count() or 1) // dist.local_world_size)
        torch.set_num_threads(threads)
    stop = StopRequest()
    stop.install()
    try:
        trainer = Trainer(cfg, args.phase, dist, accelerator, resume_from=args.resume_from, stop=stop)
        trainer.train()
        barrier()
    except BaseException as exc:
        report_failure(cfg, dist.rank, exc)
        raise
    torch.distributed.destroy_process_group()
    return 0


def report_failure(cfg: RunConfig, rank: int, exc: BaseException) -> None:
    """Leave the error where the launcher looks, so it can name the rank that failed."""
    import traceback

    folder = Path(cfg.run.out_dir) / "failures"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(exc)) + f"rank {rank} on {socket.gethostname()}: {exc!r}\n"
        (folder / f"rank-{rank:05d}.txt").write_text(text, encoding="utf-8")
    except OSError:
        pass  # reporting must never hide the original error


if __name__ == "__main__":
    sys.exit(main())
