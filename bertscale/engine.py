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
from typing import TypeVar

import torch

from bertscale import hardware, safe_load
from bertscale.config import ConfigError, OptimizerSection, PhaseSection, accumulation_steps
from bertscale.lamb import FlatLayout, Lamb
from bertscale.packing import batch_to, model_inputs

T = TypeVar("T")

log = logging.getLogger(__name__)

# Keys the phase table owns; a base DeepSpeed config must not contradict them.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler")


def detect_accelerator(requested: str = "auto") -> str:
    """'cuda' or 'cpu' (``hardware.accelerator``), also set as DS_ACCELERATOR for DeepSpeed before it is imported."""
    chosen = hardware.accelerator(requested)
    os.environ.setdefault("DS_ACCELERATOR", chosen)
    return chosen


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _without_shm_inference_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from setting up its shared-memory allreduce.

    Only DeepSpeed's tensor-parallel inference calls that allreduce; training never does. Setting it
    up costs a g++ JIT build on a fresh machine (23 s on a 2-core machine, behind a lock that a rank killed
    mid-build leaves for the next run to wait on forever) and a 69 MB buffer per rank in /dev/shm that
    is never unlinked: every single-node run leaks 69 MB of RAM per rank, and where /dev/shm is small
    (64 MB in a default container) the rank crashes (SIGSEGV). Marked incompatible, it is skipped and
    gloo carries every collective, as it does for training anyway.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # a dict that DeepSpeed consults
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def init_distributed(accelerator: str, timeout_minutes: float = 10.0,
                     rendezvous_minutes: float | None = None) -> DistInfo:
    """Join the process group the deepspeed launcher set up (env:// rendezvous), waiting up to
    ``rendezvous_minutes`` (default ``timeout_minutes``) for every rank to join; its collectives then
    give up after ``timeout_minutes``."""
    import deepspeed

    import torch.distributed.distributed_c10d as c10d

    backend = "nccl" if accelerator == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    rendezvous = datetime.timedelta(minutes=rendezvous_minutes) if rendezvous_minutes is not None else timeout
    # DeepSpeed builds its data-parallel groups with new_group() and no timeout, which falls back to
    # torch's 30-minute default: a rank whose peer vanished (link down, no TCP reset) would wait that
    # long. Make our timeout the default for every group created from here on.
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if accelerator != "cuda":
        _without_shm_inference_allreduce()
    # The group's timeout bounds both the wait for every rank to join and its collectives; torch takes one
    # value at creation, so the group is made with the rendezvous's and then given the collectives'.
    deepspeed.init_distributed(dist_backend=backend, timeout=rendezvous)
    if rendezvous != timeout:
        if not hasattr(c10d, "_set_pg_timeout"):
            raise ConfigError(f"distributed.rendezvous_timeout_minutes needs a torch whose process groups can change "
                              f"their timeout (torch.distributed's _set_pg_timeout; this is {torch.__version__}): "
                              f"upgrade torch, or leave it unset")
        c10d._set_pg_timeout(timeout)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device)


def load_ds_config(base_path: str | os.PathLike) -> dict:
    """Read and check a base DeepSpeed JSON; every problem is a ``ConfigError`` naming the file and key.

    The launcher calls this before any rank starts (so does ``build_ds_config`` in every rank).
    """
    path = Path(base_path)
    try:
        base = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist; {_replaced(path)}pick one of the "
                          f"shipped ds_configs/*.json ({', '.join(shipped_ds_configs()) or 'see the bertscale checkout'})"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object, not {type(base).__name__}")
    clashes = [k for k in _OWNED_KEYS if k in base]
    if clashes:
        raise ConfigError(f"{path} sets {', '.join(clashes)}; batch sizes, clipping, optimizer and schedule come "
                          f"from the run config's phase table and [optimizer] section: remove them from the JSON")
    tables = [k for k in ("zero_optimization", "fp16", "bf16", "checkpoint") if k in base and not isinstance(base[k], dict)]
    if tables:
        raise ConfigError(f"{path}: {', '.join(tables)} must be JSON objects")
    loose = [f"{k}.enabled" for k in ("bf16", "fp16")
             if "enabled" in base.get(k, {}) and not isinstance(base[k]["enabled"], bool)]
    if loose:
        raise ConfigError(f"{path}: {', '.join(loose)} must be true or false ('auto' is the Hugging Face Trainer's "
                          f"placeholder); remove the table and let train.precision decide, or say true or false")
    if "bfloat16" in base:
        raise ConfigError(f"{path} has a 'bfloat16' table (DeepSpeed's old name): rename it 'bf16', or remove it and "
                          f"set train.precision in the run configuration")
    if isinstance(base.get("torch_autocast"), dict) and base["torch_autocast"].get("enabled"):
        raise ConfigError(f"{path} enables torch_autocast, which bertscale does not train with: remove it and set "
                          f"train.precision (bf16, fp16 or fp32; auto picks what the hardware computes natively)")
    stage = base.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r})")
    if base.get("fp16", {}).get("enabled") and base.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; enable one of them")
    unsafe = [f"{table}.{key}" for table, key in (("bf16", "check_grad_overflow"), ("zero_optimization",
              "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")) if base.get(table, {}).get(key) is False]
    if unsafe:
        raise ConfigError(f"{path} sets {unsafe} to false; ZeRO's overflow check is how a non-finite gradient on "
                          f"any rank skips the step on every rank: remove them from the JSON")
    scaling = [f"fp16.{k}" for k in _LOSS_SCALE_KEYS.values() if k in base.get("fp16", {})]
    if scaling:
        raise ConfigError(f"{path} sets {', '.join(scaling)}; dynamic loss scaling comes from the run config's "
                          f"[optimizer] loss_scale_* keys: remove them from the JSON")
    engines = [f"checkpoint.{k}" for k in ("writer",) if base.get("checkpoint", {}).get(k)]
    engines += [k for k in ("datastates_ckpt",) if k in base]
    if engines:
        raise ConfigError(f"{path} sets {', '.join(engines)}; bertscale writes checkpoints with DeepSpeed's torch "
                          f"engine and loads them weights-only (bertscale.safe_load): remove them from the JSON")
    return base


def _replaced(path: Path) -> str:
    """For a shipped config of earlier releases (``zero2_bf16.json``): what replaced it."""
    name = path.name
    for stage in (1, 2, 3):
        for precision in ("bf16", "fp16"):
            if name == f"zero{stage}_{precision}.json":
                return (f"ds_configs/{name} was split in two: its ZeRO settings are ds_configs/zero{stage}.json and "
                        f"its precision is the run configuration's train.precision (= \"{precision}\", or \"auto\" "
                        f"for what the hardware computes natively); ")
    return ""


def json_precision(base: dict) -> str | None:
    """The precision a base DeepSpeed JSON sets explicitly, or None when it leaves it to ``train.precision``:
    a ``bf16`` or ``fp16`` table with ``enabled`` true sets that precision; tables that only disable them
    (``enabled`` false) set fp32. A table without ``enabled`` holds options only."""
    said = {k: bool(base[k]["enabled"]) for k in ("bf16", "fp16")
            if isinstance(base.get(k), dict) and "enabled" in base[k]}
    if not said:
        return None
    enabled = [k for k, on in said.items() if on]
    return enabled[0] if enabled else "fp32"


def shipped_ds_configs() -> list[str]:
    """The base DeepSpeed configs of the bertscale checkout, if it is there."""
    folder = Path(__file__).resolve().parent.parent / "ds_configs"
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def build_ds_config(base_path: str | os.PathLike, phase: PhaseSection, world_size: int,
                    optimizer: OptimizerSection, accelerator: str, precision: str,
                    load_universal: bool = False) -> dict:
    """The DeepSpeed config of one phase: the base file plus batch sizes, clipping, optimizer and the
    ``precision`` the launcher chose (bf16, fp16 or fp32; ``bertscale.hardware``), unless the base file sets
    one itself, which wins. ``load_universal``: the phase continues from a universal checkpoint
    (``Engine.load_shards``)."""
    cfg = load_ds_config(base_path)
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32 (decided by bertscale.hardware.choose), "
                         f"not {precision!r}")
    if json_precision(cfg) is None and precision != "fp32":  # fp32: neither table enabled, DeepSpeed's default
        cfg[precision] = {**cfg.get(precision, {}), "enabled": True}
    if load_universal:
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    cfg["train_micro_batch_size_per_gpu"] = phase.micro_batch
    cfg["gradient_accumulation_steps"] = accumulation_steps(phase, world_size)
    cfg["train_batch_size"] = phase.global_batch
    cfg["gradient_clipping"] = optimizer.grad_clip
    cfg.setdefault("steps_per_print", 10 ** 9)  # our metrics module does the logging
    cfg.setdefault("wall_clock_breakdown", False)
    if cfg.get("fp16", {}).get("enabled"):
        cfg["fp16"]["loss_scale"] = 0  # dynamic
        for ours, theirs in _LOSS_SCALE_KEYS.items():
            cfg["fp16"][theirs] = getattr(optimizer, ours)
    # Our optimizers are passed to DeepSpeed as client optimizers on every accelerator. DeepSpeed's
    # fused CUDA LAMB is not used: under ZeRO it would see flat partitions and compute its trust
    # ratios per partition (the result would depend on the number of ranks); ours is told the layout.
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


# fp16 dynamic loss scaling: OptimizerSection field -> DeepSpeed "fp16" key
_LOSS_SCALE_KEYS = {"loss_scale_initial_power": "initial_scale_power", "loss_scale_window": "loss_scale_window",
                    "loss_scale_hysteresis": "hysteresis", "loss_scale_min": "min_loss_scale"}


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


def build_optimizer(groups: list[dict], optimizer: OptimizerSection, lr: float) -> torch.optim.Optimizer:
    """The optimizer the config names (our LAMB or torch's AdamW) over ``parameter_groups``, unsharded:
    the engine then tells LAMB its ZeRO partitions; used alone, it is the single-process equivalent."""
    if optimizer.name == "lamb":
        return Lamb(groups, lr=lr, betas=tuple(optimizer.betas), eps=optimizer.eps,
                    weight_decay=optimizer.weight_decay, bias_correction=optimizer.bias_correction,
                    max_trust_ratio=optimizer.max_trust_ratio)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optimizer.betas), eps=optimizer.eps,
                             weight_decay=optimizer.weight_decay, foreach=True)


def _segments(offsets: list[int], numels: list[int], tensor_ids: list[int], lo: int, hi: int,
              ) -> tuple[tuple[int, int, int], ...]:
    """Where tensors laid out at ``offsets`` in a flat buffer meet the window [lo, hi), relative to lo."""
    found = []
    for offset, numel, tensor in zip(offsets, numels, tensor_ids):
        start, end = max(offset, lo), min(offset + numel, hi)
        if start < end:
            found.append((start - lo, end - lo, tensor))
    return tuple(found)


def zero_layouts(zero_optimizer) -> tuple[dict[torch.Tensor, FlatLayout], object]:
    """For each flat fp32 partition DeepSpeed hands the base optimizer: which slices of which original
    parameters (numbered by their place in the parameter group) it holds; and the data-parallel group.

    Read from DeepSpeed's own bookkeeping, so LAMB can compute trust ratios per original tensor.
    Raises for a ZeRO optimizer whose layout we do not know rather than run a wrong LAMB.
    """
    import deepspeed.comm as ds_dist

    layouts: dict[torch.Tensor, FlatLayout] = {}
    name = type(zero_optimizer).__name__
    if hasattr(zero_optimizer, "round_robin_bit16_offsets"):  # ZeRO stages 1 and 2
        for i, group in enumerate(zero_optimizer.bit16_groups):
            number = {id(p): k for k, p in enumerate(group)}
            ordered = zero_optimizer.round_robin_bit16_groups[i]
            size = int(zero_optimizer.partition_size[i])
            lo = ds_dist.get_rank(group=zero_optimizer.real_dp_process_group[i]) * size
            segments = _segments(zero_optimizer.round_robin_bit16_offsets[i],
                                 [m.numel() for m in zero_optimizer.round_robin_bit16_meta[i]],
                                 [number[id(p)] for p in ordered], lo, lo + size)
            # DeepSpeed's own view of the same partition (its first tensor may start mid-way)
            assert [t for _, _, t in segments] == [number[id(p)] for p in zero_optimizer.params_in_partition[i]]
            layouts[zero_optimizer.single_partition_of_fp32_groups[i]] = FlatLayout(segments, len(group))
        return layouts, zero_optimizer.real_dp_process_group[0]
    if hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 ZeRO-1, fp32 accumulation)
        for i, group in enumerate(zero_optimizer.bf16_groups):
            numels = [p.numel() for p in group]
            offsets = [sum(numels[:k]) for k in range(len(numels))]
            flat = zero_optimizer.fp32_groups_flat_partition[i]
            size = flat.numel()
            lo = ds_dist.get_rank(group=zero_optimizer.real_dp_process_group[i]) * size
            layouts[flat] = FlatLayout(_segments(offsets, numels, list(range(len(group))), lo, lo + size), len(group))
        return layouts, zero_optimizer.real_dp_process_group[0]
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO stage 3: every tensor split over ranks
        for i, sub_group in enumerate(zero_optimizer.fp16_groups):
            rank = ds_dist.get_rank(group=zero_optimizer.sub_group_process_groups[i])
            offsets, numels, offset = [], [], 0
            for p in sub_group:
                part = p.partition_numel()
                offsets.append(offset)
                numels.append(max(0, min(part, p.ds_numel - rank * part)))  # the last rank holds padding
                offset += part
            flat = zero_optimizer.fp32_partitioned_groups_flat[i]
            if flat.numel() != offset:
                raise RuntimeError(f"ZeRO-3 sub-group {i}: flat partition has {flat.numel()} elements, "
                                   f"its parameters' partitions {offset}; cannot map LAMB's trust ratios")
            layouts[flat] = FlatLayout(_segments(offsets, numels, list(range(len(sub_group))), 0, offset),
                                       len(sub_group))
        return layouts, zero_optimizer.dp_process_group
    raise RuntimeError(f"LAMB under ZeRO needs the parameter layout of DeepSpeed's {name}, which bertscale "
                       f"does not know; use optimizer.name = 'adamw' or a ds_configs/zero*.json that DeepSpeed "
                       f"serves with its ZeRO optimizer")


def right_sized_buckets(ds_config: dict, num_params: int) -> dict:
    """On CPU, ZeRO's gradient bucket no bigger than the model, unless the JSON sets one.

    ZeRO 1/2 allocate a fresh ``reduce_bucket_size``-element buffer every micro step (DeepSpeed's default:
    5e8 elements, 1 GB in bf16), of which only the model's gradients are ever written. On a GPU the caching
    allocator reuses it. A CPU rank runs with ``launcher.environment.CPU_MALLOC_TUNABLES`` (no mmap, no trim), so
    each buffer lands in the heap; the holes left by earlier ones fragment and the heap's address space grew
    by ~1 GB per micro step (24 GiB in a 40-step test on this 24 GiB machine), until the kernel refused the
    fork of the next epoch's loader workers (ENOMEM: one mapping larger than RAM). Sized to the model, the
    buffer is what a step touches anyway."""
    zero = ds_config.get("zero_optimization", {})
    if "reduce_bucket_size" in zero or int(zero.get("stage", 0)) not in (1, 2):
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": max(int(num_params), 1)}}


class Engine:
    """A DeepSpeed ZeRO engine around one model, with the optimizer the config names."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, optimizer: OptimizerSection,
                 accelerator: str, lr: float):
        import deepspeed

        groups = parameter_groups(model, optimizer.weight_decay)
        client_optimizer = None if "optimizer" in ds_config else build_optimizer(groups, optimizer, lr)
        if accelerator == "cpu":
            ds_config = right_sized_buckets(ds_config, sum(p.numel() for p in model.parameters()))
        self.ds_config = ds_config
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optimizer,
            model_parameters=None if client_optimizer is not None else groups,
            config=ds_config)
        self.device = self.engine.device
        if isinstance(client_optimizer, Lamb):
            # ZeRO hands LAMB flat partitions: give it the original tensors' layout and the sum over ranks
            layouts, dp_group = zero_layouts(self.engine.optimizer)
            client_optimizer.shard(layouts, reduce=lambda t: _all_reduce_in(t, dp_group))
        self._base_optimizer = client_optimizer
        self._weights_rejected = False
        self.poison_weights = False  # fault injection (tests): this rank's step makes its weights NaN
        self._guard_weights(client_optimizer)
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool, device=self.device)  # this step, this rank
        # fp16: DeepSpeed's dynamic scaler raises a bare Exception on an overflow at the minimum scale; we
        # keep skipping at the floor instead, and train.max_bad_steps stops the run with a clear message.
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if hasattr(scaler, "raise_error_at_min_scale"):
            scaler.raise_error_at_min_scale = False

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def accumulation(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def precision(self) -> str:
        """What DeepSpeed trains in: bf16, fp16 or fp32 (recorded in every checkpoint)."""
        return "bf16" if self.engine.bfloat16_enabled() else "fp16" if self.engine.fp16_enabled() else "fp32"

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def to_device(self, batch: dict[str, torch.Tensor | int]) -> dict[str, torch.Tensor | int]:
        return batch_to(batch, self.device, non_blocking=True)

    def train_micro_batch(self, batch: dict[str, torch.Tensor], poison: bool = False):
        """Forward and backward of one micro batch; the optimizer steps at the accumulation boundary.

        A non-finite loss (or ``poison``, the fault-injection hook) makes this rank's gradients NaN
        on purpose: ZeRO's overflow check (``check_grad_overflow``, on in stages 1-3 for fp16, bf16
        and fp32 alike) all-reduces a non-finite flag over the ranks before the optimizer runs, so
        every rank skips the same step and no NaN reaches the weights. ``step_was_bad`` reports it.
        """
        self.engine.train()
        out = self.engine(**model_inputs(batch))  # a padded or an unpadded batch (bertscale.packing)
        loss = out.loss
        if poison:
            loss = loss * float("nan")
        # no host sync here; a rank must run backward even with a bad loss (collectives). An inf loss
        # can give finite gradients; NaN ones never are.
        finite = torch.isfinite(loss.detach())
        self._nonfinite_loss |= ~finite
        loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
        self.engine.backward(loss)
        self.engine.step()
        return out

    def step_was_bad(self) -> bool:
        """After an optimizer step: did this rank see a non-finite loss, was the step skipped for
        non-finite gradients, or were its weights put back because they came out non-finite? Under fp16
        an overflow skip is ordinary loss-scale search (counted by ``skipped_steps``) and counts as bad
        only once the scale sits at its minimum. Resets the flags."""
        skipped = not self.engine.was_step_applied()
        bad = (bool(self._nonfinite_loss) or self._weights_rejected
               or (skipped and self._loss_scale_at_minimum()))  # one sync per step
        self._nonfinite_loss.zero_()
        self._weights_rejected = False
        return bad

    def _guard_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the step of the optimizer ZeRO runs on this rank's fp32 partitions: if the weights of any
        rank come out non-finite (finite gradients with an overflowing learning rate or trust ratio), every
        rank puts its weights back as they were, so the step is skipped everywhere, like one with a
        non-finite gradient (its moments have advanced; the weights, which a checkpoint and the model
        carry, have not). Costs a copy of the partition per step and one small all-reduce."""
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            before = [p.detach().clone() for p in params]
            result = step(*args, **kwargs)
            if self.poison_weights:
                with torch.no_grad():
                    params[0].view(-1)[0] = float("nan")
            if not _all_finite(params):
                with torch.no_grad():
                    torch._foreach_copy_(params, before)
                self._weights_rejected = True
            return result

        optimizer.step = guarded_step

    def weights_finite(self) -> bool:
        """Whether the weights of every rank are finite (a collective: every rank must call it)."""
        return _all_finite([p for group in self._base_optimizer.param_groups for p in group["params"]])

    def _loss_scale_at_minimum(self) -> bool:
        if not self.engine.fp16_enabled():
            return True
        floor = float(self.ds_config.get("fp16", {}).get("min_loss_scale", 1.0))
        return self.loss_scale() <= floor

    @torch.no_grad()
    def eval_batch(self, batch: dict[str, torch.Tensor]):
        self.engine.eval()
        return self.engine(**model_inputs(batch))

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
        """Load model and optimizer shards; every ``.pt`` is checked first and loaded weights-only (the
        rank runs under ``safe_load.enforce_in_this_process``; DeepSpeed's own engine asks for pickles).
        With ``load_universal`` in the config, ``root/tag`` is a universal checkpoint (any number of ranks)."""
        folder = Path(root) / tag
        safe_load.check_directory(folder)
        universal = bool(self.ds_config.get("checkpoint", {}).get("load_universal"))
        if universal:
            for sub in sorted({f.parent for f in (folder / "zero").rglob("*.pt")}):  # a folder per parameter
                safe_load.check_directory(sub)
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:  # DeepSpeed returns (None, None) instead of raising
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} under {root}")
        if universal:
            saved = safe_load.load(folder / "zero" / "optimizer_state.pt")["param_groups"]
            self._restore_group_settings(saved, folder)

    def _restore_group_settings(self, saved: list[dict], folder: Path) -> None:
        """Give each optimizer parameter group its own saved settings back after a universal load.

        ZeRO-3's universal load copies the *first* group's settings into every group (DeepSpeed's
        ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``: "the hyperparameters of each parameter
        should be the same"), so biases and LayerNorms, our no-decay group, would silently decay from
        then on. ZeRO-1/2's load restores each group's own; this makes every stage do so.
        """
        groups = self.engine.optimizer.param_groups
        if len(saved) != len(groups):
            raise RuntimeError(f"{folder}: the checkpoint's optimizer has {len(saved)} parameter groups, this "
                               f"run's has {len(groups)}; it was saved by another optimizer setup")
        for group, settings in zip(groups, saved):
            group.update({k: v for k, v in settings.items() if k != "params"})


def consolidated_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 model weights from a ZeRO (stage 1, 2 or 3) checkpoint, on CPU.

    DeepSpeed's consolidation unpickles every shard with ``weights_only=False``; the files are checked
    first (a refusal names the file and the type it asks for) and loaded weights-only regardless.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    safe_load.check_directory(Path(root) / tag)
    with safe_load.enforced():
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor on every rank is finite (a collective: every rank must call it).

    The weight guard asks this after every optimizer step. A tensor's sum is finite when all its elements
    are, and an element that is inf or NaN makes it inf or NaN: one summing pass and one all-reduce, ~40x
    less CPU than an element-wise check of a partition. Finite values can still sum past the float32 range,
    so only when some rank's sums are not all finite does every rank look element by element (a second
    all-reduce, taken by all ranks alike since it follows the first one's result)."""
    if _nonfinite_count(tensors, lambda t: t.sum(dtype=torch.float32)) == 0:
        return True
    return _nonfinite_count(tensors, lambda t: t) == 0


def _nonfinite_count(tensors: list[torch.Tensor], view) -> float:
    """How many of the tensors, over all ranks, have a non-finite ``view`` (one all-reduce)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for t in tensors:
        bad += (~torch.isfinite(view(t.detach()))).any().float()
    return all_reduce_sum(bad).item()


def _all_reduce_in(tensor: torch.Tensor, group) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled over the process group; each rank's NCCL device carries it
    there); ``value`` as it is without a process group. A collective: every rank calls it at the same point."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; a no-op without a process group.

    NCCL reduces only CUDA tensors: a host tensor (counters, flags) makes the round trip through the
    current device there (gloo takes it as it is)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if tensor.device.type != "cuda" and torch.distributed.get_backend() == "nccl":
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(on_device, op=torch.distributed.ReduceOp.SUM)
            tensor.copy_(on_device)
        else:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
