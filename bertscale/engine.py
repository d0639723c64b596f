"""The only module that talks to DeepSpeed: process group, ZeRO engine, optimizer choice, checkpoint shards.

Everything DeepSpeed-specific (its config keys, its checkpoint calls, its consolidation
utility) lives here, so the training loop reads as plain PyTorch and a DeepSpeed upgrade
touches one file.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bertscale.config import ConfigError, OptimizerSection, PhaseSection, accumulation_steps
from bertscale.lamb import Lamb

log = logging.getLogger(__name__)

# Keys the phase table owns; a base DeepSpeed config must not contradict them.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler")


def detect_accelerator(requested: str = "auto") -> str:
    """'cuda' or 'cpu'. Sets DS_ACCELERATOR for DeepSpeed before it is imported."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distributed.accelerator is 'cuda' but torch sees no CUDA device; "
                          "use accelerator = 'cpu' or install a CUDA build of torch")
    os.environ.setdefault("DS_ACCELERATOR", requested)
    return requested


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def init_distributed(accelerator: str, timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group the deepspeed launcher set up (env:// rendezvous)."""
    import deepspeed

    import torch.distributed.distributed_c10d as c10d

    backend = "nccl" if accelerator == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # DeepSpeed builds its data-parallel groups with new_group() and no timeout, which falls back to
    # torch's 30-minute default: a rank whose peer vanished (link down, no TCP reset) would wait that
    # long. Make our timeout the default for every group created from here on.
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device)


def build_ds_config(base_path: str | os.PathLike, phase: PhaseSection, world_size: int,
                    optimizer: OptimizerSection, accelerator: str) -> dict:
    """The DeepSpeed config of one phase: the base file plus batch sizes, clipping and optimizer."""
    path = Path(base_path)
    try:
        base = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist; pick one of ds_configs/*.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    clashes = [k for k in _OWNED_KEYS if k in base]
    if clashes:
        raise ConfigError(f"{path} sets {clashes}; batch sizes, clipping, optimizer and schedule come from the "
                          f"run config's phase table and [optimizer] section: remove them from the JSON")
    stage = base.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage})")
    if base.get("fp16", {}).get("enabled") and base.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: enable fp16 or bf16, not both")
    cfg = dict(base)
    cfg["train_micro_batch_size_per_gpu"] = phase.micro_batch
    cfg["gradient_accumulation_steps"] = accumulation_steps(phase, world_size)
    cfg["train_batch_size"] = phase.global_batch
    cfg["gradient_clipping"] = optimizer.grad_clip
    cfg.setdefault("steps_per_print", 10 ** 9)  # our metrics module does the logging
    cfg.setdefault("wall_clock_breakdown", False)
    if accelerator == "cuda" and optimizer.name == "lamb":
        # DeepSpeed's fused CUDA LAMB; the learning rate is set by us every step.
        cfg["optimizer"] = {"type": "Lamb", "params": {
            "lr": phase.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay, "bias_correction": optimizer.bias_correction}}
    else:
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases plus LayerNorm parameters with no decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """A DeepSpeed ZeRO engine around one model, with the optimizer the config names."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, optimizer: OptimizerSection,
                 accelerator: str, lr: float):
        import deepspeed

        groups = parameter_groups(model, optimizer.weight_decay)
        client_optimizer = None
        if "optimizer" not in ds_config:
            if optimizer.name == "lamb":
                client_optimizer = Lamb(groups, lr=lr, betas=tuple(optimizer.betas), eps=optimizer.eps,
                                        weight_decay=optimizer.weight_decay,
                                        bias_correction=optimizer.bias_correction)
            else:
                client_optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optimizer.betas),
                                                     eps=optimizer.eps, weight_decay=optimizer.weight_decay,
                                                     foreach=True)
        self.ds_config = ds_config
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optimizer,
            model_parameters=None if client_optimizer is not None else groups,
            config=ds_config)
        self.device = self.engine.device

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def accumulation(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_micro_batch(self, batch: dict[str, torch.Tensor]):
        """Forward and backward of one micro batch; the optimizer steps at the accumulation boundary."""
        self.engine.train()
        out = self.engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                          attention_mask=batch["attention_mask"], labels=batch["labels"],
                          next_sentence_label=batch["next_sentence_label"])
        self.engine.backward(out.loss)
        self.engine.step()
        return out

    @torch.no_grad()
    def eval_batch(self, batch: dict[str, torch.Tensor]):
        self.engine.eval()
        return self.engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                           attention_mask=batch["attention_mask"], labels=batch["labels"],
                           next_sentence_label=batch["next_sentence_label"])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def loss_scale(self) -> float:
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "loss_scale", None) if self.engine.fp16_enabled() else None
        return float(scale) if scale is not None else 1.0

    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    def save_shards(self, root: Path, tag: str) -> None:
        """DeepSpeed's own sharded model and optimizer files (every rank writes its part)."""
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load_shards(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:  # DeepSpeed returns (None, None) instead of raising
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} under {root}")


def consolidated_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 model weights from a ZeRO (stage 1, 2 or 3) checkpoint, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; a no-op without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
