"""Checkpoint layout: which directories exist, which are complete, which to keep.

One checkpoint is one directory ``OUT/checkpoints/<tag>/`` holding

- DeepSpeed's model and optimizer shards (written by ``Engine.save_shards``),
- ``bertscale.json``: run state, phase, model config and tokenizer fingerprint (rank 0),
- ``rank-00000.pt`` ...: per-rank state (RNG states, data loader epoch),
- ``tokenizer/``: the tokenizer files, so a checkpoint converts on its own,
- ``COMPLETE``: written by rank 0 last, after every rank has finished writing.

A directory without ``COMPLETE`` is never resumed from or converted. DeepSpeed's own
``latest`` file is not used: rank 0 writes it before the other ranks are done.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
META = "bertscale.json"
TAG_PREFIX = "step"


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
    tmp = path / f".rank-{rank:05d}.pt.tmp"
    torch.save({"rng": rng, **state}, tmp)
    os.replace(tmp, path / f"rank-{rank:05d}.pt")


def read_rank_state(path: Path, rank: int) -> dict:
    file = path / f"rank-{rank:05d}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: this checkpoint was written by fewer ranks; "
                                f"resume with the same number of ranks")
    state = torch.load(file, map_location="cpu", weights_only=False)
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
    tmp = path / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path / META)


def remove_incomplete(path: Path) -> None:
    """Delete a checkpoint directory that never got its completion marker (never a complete one)."""
    if (path / COMPLETE).exists():
        raise ValueError(f"refusing to delete {path}: it is a complete checkpoint")
    shutil.rmtree(path, ignore_errors=True)


def mark_complete(path: Path) -> None:
    (path / COMPLETE).write_text("ok\n", encoding="utf-8")


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
