"""Checkpoints: which directories exist, which are complete, which to keep, and where a phase resumes.

One checkpoint is one directory ``OUT/checkpoints/<tag>/`` holding

- DeepSpeed's model and optimizer shards (written by ``Engine.save_shards``),
- ``bertscale.json``: run state, phase, model config, tokenizer fingerprint, the data order of the
  phase (``data_order``) and the resolved configuration (rank 0),
- ``rank-00000.pt`` ...: per-rank state (RNG states, data loader epoch),
- ``tokenizer/``: the tokenizer files, so a checkpoint converts on its own,
- ``COMPLETE``: written by rank 0 last, after every rank has finished writing,
- ``universal/``: added later, only when a run continues the phase on another number of ranks:
  DeepSpeed's universal checkpoint of the shards (``universal_checkpoint``), renamed into place whole.

A directory without ``COMPLETE`` is never resumed from or converted. DeepSpeed's own
``latest`` file is not used: rank 0 writes it before the other ranks are done.

``plan_resume`` is the resume policy: from the checkpoints and the configuration it decides whether a
phase continues a checkpoint, starts from the previous phase's weights, or starts fresh, and refuses
(naming every difference) whatever would silently train something else than the run that was asked for.
A phase continues on another number of ranks through DeepSpeed's universal checkpoint (ZeRO 1, 2, 3);
the data position is in global steps, the same on any world size (``bertscale.loader``).
Every ``.pt`` is read weights-only (``bertscale.safe_load``), DeepSpeed's converter's included.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertscale import safe_load, storage
from bertscale.config import ConfigError, PhaseSection, RunConfig, max_predictions
from bertscale.files import atomic_output, write_atomic
from bertscale.rundir import RunDir
from bertscale.schedule import phase_spans

COMPLETE = "COMPLETE"
META = "bertscale.json"
TAG_PREFIX = "step"
UNIVERSAL = "universal"
UNIVERSAL_STAGES = (1, 2, 3)
"""ZeRO stages whose checkpoints continue on another number of ranks (see ``universal_checkpoint``)."""


def tag_for(global_step: int) -> str:
    return f"{TAG_PREFIX}{global_step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    tag: str
    meta: dict

    @property
    def global_step(self) -> int:
        return int(self.meta["state"]["global_step"])

    @property
    def phase_index(self) -> int:
        return int(self.meta["state"]["phase_index"])

    @property
    def phase_complete(self) -> bool:
        return bool(self.meta["state"]["phase_complete"])


def read_meta(path: Path) -> dict:
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a bertscale checkpoint (no {META})")
    return json.loads(meta_file.read_text(encoding="utf-8"))


def complete_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and path.name.startswith(TAG_PREFIX) and (path / COMPLETE).is_file():
            found.append(CheckpointInfo(path, path.name, read_meta(path)))
    return sorted(found, key=lambda c: c.global_step)


def latest(root: str | os.PathLike) -> CheckpointInfo | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def final_of_phase(root: str | os.PathLike, phase_index: int) -> CheckpointInfo | None:
    """The checkpoint written at the last step of phase ``phase_index``, if it is complete."""
    for ckpt in reversed(complete_checkpoints(root)):
        if ckpt.phase_index == phase_index and ckpt.phase_complete:
            return ckpt
    return None


def resolve(checkpoint: str | os.PathLike, tag: str | None = None) -> CheckpointInfo:
    """A complete checkpoint from a run's checkpoint root (latest, or ``tag``) or a tag directory."""
    path = Path(checkpoint)
    if (path / META).is_file() and tag is None:
        if not (path / COMPLETE).is_file():
            raise ValueError(f"{path} is incomplete (no {COMPLETE} marker): a rank did not finish writing it")
        return CheckpointInfo(path, path.name, read_meta(path))
    if tag is not None:
        sub = path / tag
        if not (sub / COMPLETE).is_file():
            tags = [c.tag for c in complete_checkpoints(path)]
            state = "incomplete (no COMPLETE marker)" if sub.is_dir() else "missing"
            raise ValueError(f"no complete checkpoint {tag!r} in {path}: it is {state}; "
                             f"complete ones: {tags or 'none'}")
        return CheckpointInfo(sub, tag, read_meta(sub))
    found = latest(path)
    if found is None:
        raise ValueError(f"no complete checkpoint in {path}; point --checkpoint at a run's checkpoints/ "
                         f"directory or at one step directory in it")
    return found


def write_rank_state(path: Path, rank: int, state: dict) -> None:
    """Per-rank state beside DeepSpeed's shards (DeepSpeed keeps client state once, not per rank)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_output(path / f"rank-{rank:05d}.pt") as tmp:
        torch.save({"rng": rng, **state}, tmp)


def read_rank_state(path: Path, rank: int, restore_rng: bool = True) -> dict:
    """This rank's state, loaded weights-only; restores the RNG states it holds unless ``restore_rng``
    is false (a run on another number of ranks reads rank 0's data position and seeds its own RNGs)."""
    file = path / f"rank-{rank:05d}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: this checkpoint was written by fewer ranks; "
                                f"resume with the same number of ranks")
    state = safe_load.load(file)
    if not restore_rng:
        return state
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def write_meta(path: Path, meta: dict, tokenizer_dir: str | os.PathLike) -> None:
    """Rank 0: metadata and tokenizer copy (before the completion marker)."""
    from bertscale.tokenizer import copy_tokenizer_files

    copy_tokenizer_files(tokenizer_dir, path / "tokenizer")
    write_atomic(path / META, json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- resume policy

class ResumeError(ConfigError):
    """This run cannot continue from the checkpoint it found; the message says why and what to do."""


def manifest_fingerprint(location: str | os.PathLike) -> str:
    """A hash of a shard location's manifest (``index.json``) bytes, read where the loader reads it (a local
    directory or a URL prefix, ``bertscale.storage``): the shards, their counts and how they were built.
    Another build, or other shards, give another fingerprint; an unreadable manifest gives "missing"."""
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(location, "index.json"))).hexdigest()
    except OSError:  # storage.LocationError included
        return "missing"


def data_order(cfg: RunConfig, phase_index: int) -> dict[str, object]:
    """What decides which samples a phase trains on, in which order, and how they are masked. Every
    checkpoint records it; resuming inside the phase with any of it changed is refused."""
    phase = cfg.phases[phase_index]
    return {
        "run.seed": cfg.run.seed,
        "phase.data": manifest_fingerprint(phase.data),
        "phase.seq_len": phase.seq_len,
        "phase.global_batch": phase.global_batch,
        "phase.micro_batch": phase.micro_batch,
        "phase.mask_prob": phase.mask_prob,
        "phase.max_predictions": max_predictions(phase),
        "data.whole_word_masking": cfg.data.whole_word_masking,
        "train.num_workers": cfg.train.num_workers,
        "train.shuffle_buffer": cfg.train.shuffle_buffer,
        "train.replicate_data": cfg.train.replicate_data,
    }


@dataclass(frozen=True)
class RunShape:
    """What this run is, for matching a checkpoint against it: the model it builds (``model_config``:
    the Hugging Face config dict), its tokenizer, its vocabulary rows, ranks, ZeRO stage and precision."""

    model_config: dict
    tokenizer_fingerprint: str
    vocab_rows: int
    world_size: int
    zero_stage: int
    precision: str
    """bf16, fp16 or fp32 (``bertscale.hardware``)."""


@dataclass(frozen=True)
class ResumePlan:
    """How a rank starts its phase: continue a checkpoint of the phase (``resume``), or start from the
    previous phase's final weights (``previous``; with its optimizer moments if ``carry_moments``), or
    fresh (neither). ``changed`` lists settings that differ from the checkpoint's and may (log them)."""

    resume: CheckpointInfo | None = None
    previous: CheckpointInfo | None = None
    carry_moments: bool = False
    changed: tuple[str, ...] = ()
    world_change: tuple[int, int] | None = None
    """(ranks that wrote ``resume``, ranks now) when the phase continues on another number of ranks:
    model and optimizer come from the universal checkpoint, the data position from rank 0's state."""
    carry_through_universal: bool = False
    """``carry_moments`` from ``previous`` written by another number of ranks or in another precision: the
    moments come from its universal checkpoint."""
    precision_change: tuple[str, str] | None = None
    """(precision ``resume`` was trained in, precision now) when the phase continues in another one: model, fp32
    weights and optimizer come from the universal checkpoint, and the steps from there on are not bit for bit
    those of an uninterrupted run."""

    @property
    def through_universal(self) -> bool:
        """The phase continues ``resume`` through its universal checkpoint (other ranks or another precision)."""
        return self.resume is not None and (self.world_change is not None or self.precision_change is not None)

    def universal_change(self) -> str | None:
        """Why the phase continues through the universal checkpoint, in words (the launcher's log), or None."""
        if not self.through_universal:
            return None
        why = []
        if self.world_change is not None:
            why.append(f"{self.world_change[1]} ranks continue a phase that {self.world_change[0]} ranks started")
        if self.precision_change is not None:
            before, now = self.precision_change
            why.append(f"the phase continues in {now}, trained so far in {before}")
        return "; ".join(why)

    def precision_resume_note(self) -> str | None:
        """Mid-phase in another precision: what carries over exactly and what does not."""
        if self.precision_change is None:
            return None
        before, now = self.precision_change
        return (f"precision changed from {before} to {now} at global step {self.resume.global_step} (the launcher's "
                f"precision line says why): the fp32 master weights and optimizer moments carry over "
                f"exactly through the universal checkpoint {self.resume.path / UNIVERSAL}, but every step from here "
                f"computes in {now}, so this run is no longer bit for bit the {before} run it continues; recorded in "
                f"the run state (precision_changes). Set train.precision = \"{before}\" to continue as it was trained")

    def precision_note(self, phase: PhaseSection, shape: RunShape) -> str | None:
        """At a phase start in another precision than the previous phase's: said, not hidden."""
        saved = self.previous.meta.get("precision") if self.previous is not None else None
        if saved is None or saved == shape.precision:
            return None
        return (f"phase {phase.name}: trains in {shape.precision}, the previous phase in {saved}; it starts from "
                f"the previous phase's fp32 weights" + (" and, through its universal checkpoint, its optimizer moments"
                                                         if self.carry_moments else ""))

    def resume_note(self, phase: PhaseSection, accumulation: int) -> str | None:
        """Mid-phase on another number of ranks: what changed and how accumulation follows."""
        if self.world_change is None:
            return None
        before, now = self.world_change
        return (f"phase {phase.name}: world size changed from {before} to {now} ranks at global step "
                f"{self.resume.global_step}; model and optimizer from the universal checkpoint "
                f"{self.resume.path / UNIVERSAL}; gradient accumulation recomputed: {phase.global_batch} = micro "
                f"{phase.micro_batch} x accumulation {accumulation} x world {now}")

    def world_size_note(self, phase: PhaseSection, shape: RunShape, accumulation: int) -> str | None:
        """At a phase start on another number of ranks than the previous phase: how accumulation follows."""
        saved = self.previous.meta.get("world_size") if self.previous is not None else None
        if saved is None or saved == shape.world_size:
            return None
        return (f"phase {phase.name}: world size changed from {saved} to {shape.world_size}; gradient accumulation "
                f"recomputed: {phase.global_batch} = micro {phase.micro_batch} x accumulation {accumulation} x "
                f"world {shape.world_size}")


def plan_resume(cfg: RunConfig, phase_index: int, shape: RunShape, resume_from: str | os.PathLike | None = None,
                ) -> ResumePlan:
    """Decide where phase ``phase_index`` starts, refusing whatever would train something else than asked.

    The source is ``resume_from`` (``--resume PATH``) or the run's latest complete checkpoint. Inside a
    phase the run continues only with the same model, tokenizer, ranks, vocabulary rows and data order
    (``data_order``); a new phase starts from the previous phase's consolidated weights on any number of
    ranks; inside a phase another number of ranks continues through DeepSpeed's universal checkpoint
    (``world_change``; ZeRO 1, 2 or 3, the same stage, a global batch the new ranks can make), and so do
    the previous phase's optimizer moments (``carry_optimizer_state``) on another number of ranks. Raises
    ``ResumeError`` naming every difference and what to do.
    """
    root = RunDir.of(cfg).checkpoints
    phase = cfg.phases[phase_index]
    span = phase_spans([p.steps for p in cfg.phases])[phase_index]
    source = resolve(resume_from) if resume_from else latest(root)
    if source is not None:
        _check_same_model(source, shape)
    if source is not None and source.phase_index == phase_index and not source.phase_complete:
        _check_same_position(source, phase, span, shape)
        _check_same_data_order(source, cfg, phase_index)
        saved_world, saved_precision = source.meta.get("world_size"), source.meta.get("precision")
        return ResumePlan(resume=source, changed=tuple(_changed_settings(source, cfg, phase_index)),
                          world_change=(saved_world, shape.world_size) if saved_world != shape.world_size else None,
                          precision_change=(saved_precision, shape.precision)
                          if saved_precision is not None and saved_precision != shape.precision else None)
    if source is not None and source.phase_index >= phase_index and source.phase_complete:
        raise ResumeError(f"phase {phase.name!r} is already complete ({source.path}); the launcher skips "
                          f"finished phases")
    if phase_index == 0:
        return ResumePlan()
    if source is not None and source.phase_index == phase_index - 1 and source.phase_complete:
        previous = source
    else:
        previous = final_of_phase(root, phase_index - 1)
    if previous is None:
        raise ResumeError(f"phase {phase.name!r} starts from the final weights of phase "
                          f"{cfg.phases[phase_index - 1].name!r}, but {root} has no complete final checkpoint "
                          f"of it; run that phase first")
    if previous.global_step != span.start:
        raise ResumeError(f"{previous.path} ended phase {previous.meta.get('phase')!r} at global step "
                          f"{previous.global_step}, but the config's phase table starts phase {phase.name!r} "
                          f"at step {span.start}; restore the earlier phases' steps or start a new run.out_dir")
    if phase.carry_optimizer_state:
        saved_world, saved_stage = previous.meta.get("world_size"), previous.meta.get("zero_stage")
        if saved_stage != shape.zero_stage or (saved_world != shape.world_size and saved_stage not in UNIVERSAL_STAGES):
            raise ResumeError(
                f"phase {phase.name!r} has carry_optimizer_state = true, but {previous.path} was written by "
                f"{saved_world} ranks at ZeRO stage {saved_stage} and this run has {shape.world_size} ranks at "
                f"stage {shape.zero_stage}; the optimizer state carries over at the same ZeRO stage (on any number "
                f"of ranks at stages {', '.join(map(str, UNIVERSAL_STAGES))}). Use stage {saved_stage}, or set "
                f"phases.{phase.name}.carry_optimizer_state=false (fresh moments)")
        saved_precision = previous.meta.get("precision", shape.precision)
        return ResumePlan(previous=previous, carry_moments=True,
                          carry_through_universal=saved_world != shape.world_size or saved_precision != shape.precision)
    return ResumePlan(previous=previous)


def _check_same_model(found: CheckpointInfo, shape: RunShape) -> None:
    saved = found.meta.get("model_config", {})
    ours = shape.model_config
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}"
             for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
             if saved.get(k) != ours.get(k)]
    if found.meta.get("tokenizer_fingerprint") != shape.tokenizer_fingerprint:
        diffs.append("tokenizer: checkpoint was trained with a different vocabulary")
    if diffs:
        raise ResumeError(f"{found.path} belongs to a different model, so this run cannot continue from it: "
                          + "; ".join(diffs) + ". Use a new run.out_dir or the matching config.")


def _check_same_position(source: CheckpointInfo, phase: PhaseSection, span, shape: RunShape) -> None:
    saved_world, saved_stage = source.meta.get("world_size"), source.meta.get("zero_stage")
    if saved_world != shape.world_size:
        how = (f"Resume with {saved_world} ranks, or let the phase finish: the next phase starts from "
               f"consolidated weights on any number of ranks.")
        if saved_stage != shape.zero_stage:
            raise ResumeError(
                f"{source.path} was written by {saved_world} ranks at ZeRO stage {saved_stage}; this run has "
                f"{shape.world_size} ranks at stage {shape.zero_stage}. The middle of a phase continues on another "
                f"number of ranks only at the same ZeRO stage: set distributed.deepspeed_config back to a stage "
                f"{saved_stage} config. " + how)
        if saved_stage not in UNIVERSAL_STAGES:
            raise ResumeError(
                f"{source.path} was written by {saved_world} ranks at ZeRO stage {saved_stage} and this run has "
                f"{shape.world_size}; continuing the middle of a phase on another number of ranks goes through "
                f"DeepSpeed's universal checkpoint, which bertscale supports at ZeRO stages "
                f"{', '.join(map(str, UNIVERSAL_STAGES))} only. " + how)
        if phase.global_batch % (phase.micro_batch * shape.world_size):
            raise ResumeError(
                f"{source.path} continues phase {phase.name!r} with global batch {phase.global_batch} (micro batch "
                f"{phase.micro_batch}), which {shape.world_size} ranks cannot make: the global batch must stay the "
                f"same inside a phase, so use a number of ranks that divides {phase.global_batch // phase.micro_batch}"
                f". " + how)
    saved_rows = source.meta.get("vocab_rows", shape.model_config.get("vocab_size"))
    if saved_rows != shape.vocab_rows:
        raise ResumeError(
            f"{source.path} holds {saved_rows} vocabulary rows (model.pad_vocab_multiple padding) but this run "
            f"builds {shape.vocab_rows}: its default differs between CUDA (64) and CPU (1). Set "
            f"model.pad_vocab_multiple to the value of the run that wrote the checkpoint to resume it.")
    if not span.start <= source.global_step < span.end:
        raise ResumeError(f"{source.path} is at global step {source.global_step}, outside phase {phase.name!r} "
                          f"(steps {span.start}..{span.end}) of this config")


def _check_same_data_order(source: CheckpointInfo, cfg: RunConfig, phase_index: int) -> None:
    saved = source.meta.get("data_order")
    if saved is None:  # written before checkpoints recorded it: nothing to compare
        return
    name = cfg.phases[phase_index].name
    ours = data_order(cfg, phase_index)
    diffs = []
    for key, value in ours.items():
        if key in saved and saved[key] != value:
            shown = key.replace("phase.", f"phases.{name}.", 1)
            if key == "phase.data":
                diffs.append(f"{shown}: the shards differ (manifest {str(saved[key])[:12]} in the checkpoint, "
                             f"{str(value)[:12]} in {cfg.phases[phase_index].data})")
            else:
                diffs.append(f"{shown}: {saved[key]!r} in the checkpoint, {value!r} now")
    if diffs:
        raise ResumeError(
            f"{source.path} is in the middle of phase {name!r}, and this run would continue it with other data "
            f"or another sample order or masking:\n    " + "\n    ".join(diffs) + "\n  A resumed phase must "
            f"see what the interrupted one would have seen. Restore these settings to continue it; a new phase "
            f"may change them (the next one starts from this phase's final weights), or start a new run.out_dir.")


def _changed_settings(source: CheckpointInfo, cfg: RunConfig, phase_index: int) -> list[str]:
    """Settings that differ from the checkpoint's and may change mid-phase (learning rate, intervals, ...)."""
    saved = source.meta.get("config")
    if saved is None:
        return []
    before, now = _flatten(saved), _flatten(cfg.to_dict())
    order = {k.replace("phase.", f"phases.{cfg.phases[phase_index].name}.", 1) for k in data_order(cfg, phase_index)}
    order.add("train.precision")  # a precision change has its own note (ResumePlan.precision_resume_note)
    return [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key) and key not in order]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if key == "phases" and isinstance(value, list):
            for item in value:
                flat.update(_flatten(item, f"phases.{item.get('name')}."))
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def universal_checkpoint(source: CheckpointInfo) -> Path:
    """DeepSpeed's universal checkpoint of ``source``'s shards, in ``source/universal`` (made once; reused).

    ``deepspeed.checkpoint.ds_to_universal`` rebuilds every parameter's fp32 weights and optimizer
    state (``exp_avg``, ``exp_avg_sq``, ``step``: everything our LAMB and AdamW keep) per original
    tensor, so any number of ranks can load it. It runs in this process, its loads weights-only with
    our allow-list (every ``.pt`` is checked first), into a temporary directory renamed into place
    whole: a directory named ``universal`` is always complete.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = source.path / UNIVERSAL
    if out.is_dir():
        return out
    safe_load.check_directory(source.path)
    args = argparse.Namespace(input_folder=str(source.path), output_folder=None, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our engine does not record UNIVERSAL_CHECKPOINT_INFO
    with atomic_output(out) as tmp:
        try:
            args.output_folder = str(tmp)
            quiet = io.StringIO()  # its prints and progress bars; a failure raises
            with safe_load.enforced(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds_to_universal.main(args)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def remove_incomplete(path: Path) -> None:
    """Delete a checkpoint directory that never got its completion marker (never a complete one)."""
    if (path / COMPLETE).exists():
        raise ValueError(f"refusing to delete {path}: it is a complete checkpoint")
    shutil.rmtree(path, ignore_errors=True)


def mark_complete(path: Path) -> None:
    write_atomic(path / COMPLETE, "ok\n")


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, keeping every phase's final one.

    Incomplete directories older than the newest complete checkpoint are leftovers of a crash
    and are removed too.
    """
    found = complete_checkpoints(root)
    keep = {c.tag for c in found[-keep_last:]} | {c.tag for c in found if c.phase_complete}
    removed = []
    for c in found:
        if c.tag not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path)
    if found:
        newest = found[-1].global_step
        for path in Path(root).iterdir():
            if (path.is_dir() and path.name.startswith(TAG_PREFIX) and not (path / COMPLETE).exists()
                    and path.name < tag_for(newest)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
