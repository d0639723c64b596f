"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), vectorised with torch._foreach_*.

Used on CPU, where DeepSpeed has no LAMB kernel, on CUDA under ZeRO (where DeepSpeed's fused
kernel would see flat partitions), and as the reference. Per original tensor: Adam moments
(optionally bias-corrected), decoupled weight decay added to the Adam direction, and a trust
ratio ||w|| / ||update|| (1 where either norm is 0, optionally clamped) that scales the step.

**Segments.** Under ZeRO each rank's optimizer holds one flat fp32 partition per
parameter group, made of slices of many original tensors. ``Lamb.shard`` tells the
optimizer which stretch of a flat parameter belongs to which original tensor, and gives it a
``reduce`` callable that sums a vector over the data-parallel group. The squared norms of
weights and updates are then computed per segment, summed per original tensor, reduced across
ranks, and each tensor's trust ratio is applied to all of its segments: the update is the same
as on one rank, whatever the partitioning. This module knows nothing of DeepSpeed; the engine
builds the segment map from the ZeRO optimizer (``bertscale.engine.zero_layouts``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class FlatLayout:
    """Which original tensors a flat (ZeRO-partitioned) parameter holds.

    ``segments`` are ``(start, end, tensor)``: elements ``[start, end)`` of the flat parameter are a
    stretch of original tensor number ``tensor`` (0 .. ``num_tensors`` - 1, numbered the same on every
    rank). Elements in no segment are padding. A tensor may be split over ranks and over segments.
    """

    segments: tuple[tuple[int, int, int], ...]
    num_tensors: int


Reduce = Callable[[torch.Tensor], torch.Tensor]


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive large-batch optimizer. Biases and LayerNorm weights belong in a
    parameter group with ``weight_decay=0`` (see ``bertscale.engine.parameter_groups``).

    Under ZeRO the parameters it steps are flat partitions; ``shard()`` tells it which slices of
    which original tensors each one holds and how to sum over the data-parallel group, so every
    trust ratio is ``||w|| / ||update||`` of a whole original tensor, at any world size.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 max_trust_ratio: float | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0, eps ({eps}) > 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas {betas} must lie in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)
        self._layouts: dict[torch.Tensor, FlatLayout] = {}
        self._reduce: Reduce | None = None

    def shard(self, layouts: dict[torch.Tensor, FlatLayout], reduce: Reduce | None) -> None:
        """Declare flat parameters (keys: the tensors in ``param_groups``) and the in-place sum over
        the ranks that hold the other pieces of their tensors. Every rank must call ``step`` alike."""
        for p, layout in layouts.items():
            for start, end, tensor in layout.segments:
                if not (0 <= start < end <= p.numel() and 0 <= tensor < layout.num_tensors):
                    raise ValueError(f"segment {(start, end, tensor)} does not fit a flat parameter of "
                                     f"{p.numel()} elements holding {layout.num_tensors} tensors")
        self._layouts = dict(layouts)
        self._reduce = reduce

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Pieces of original tensors: weight and update views, the tensor they belong to, and whether
        # their squared norms must be summed over ranks. Replicated tensors are one local piece each.
        local, shared = _Norms(), _Norms()
        steps = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None or p in self._layouts]
            if not params:
                continue
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.to(p.dtype) if p.grad.dtype != p.dtype
                     else p.grad for p in params]
            updates = self._adam_directions(group, params, grads)
            ratio_slots = []
            for p, u in zip(params, updates):
                layout = self._layouts.get(p)
                if layout is None:
                    ratio_slots.append(local.add(group, [(p, u, 0)], 1))
                else:
                    pieces = [(p[s:e], u[s:e], t) for s, e, t in layout.segments]
                    ratio_slots.append(shared.add(group, pieces, layout.num_tensors))
            steps.append((group, params, updates, ratio_slots))
        local.finish(None)
        shared.finish(self._reduce)
        for group, params, updates, ratio_slots in steps:
            # a group's pieces are contiguous in each _Norms: one ratio computation and one scaling each
            for norms in {id(n): n for n, _, _ in ratio_slots}.values():
                spans = [(first, first + count) for n, first, count in ratio_slots if n is norms]
                start, end = spans[0][0], spans[-1][1]
                norms.scale(start, end - start, group["max_trust_ratio"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss

    def _adam_directions(self, group: dict, params: list[torch.Tensor],
                         grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update moments; return the bias-corrected Adam direction plus decoupled weight decay."""
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        step = self.state[params[0]]["step"]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        else:
            bc1 = bc2 = 1.0
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        if bc1 != 1.0:
            torch._foreach_div_(updates, bc1)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        return updates


class _Norms:
    """Squared norms of weights and updates per original tensor, summed from pieces, then the
    trust ratio of each tensor applied to its pieces. One reduction for all tensors of a step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.updates: list[torch.Tensor] = []
        self.owner: list[int] = []
        self.num_tensors = 0
        self.sums: torch.Tensor | None = None

    def add(self, group: dict, pieces: list[tuple[torch.Tensor, torch.Tensor, int]],
            num_tensors: int) -> tuple[_Norms, int, int]:
        """Register the pieces of ``num_tensors`` tensors; returns the slot to scale them later."""
        first, start = self.num_tensors, len(self.weights)
        for w, u, t in pieces:
            self.weights.append(w)
            self.updates.append(u)
            self.owner.append(first + t)
        self.num_tensors += num_tensors
        return self, start, len(pieces)

    def finish(self, reduce: Reduce | None) -> None:
        if not self.weights:
            return
        device = self.weights[0].device
        n = self.num_tensors
        pieces = torch.stack(torch._foreach_norm(self.weights + self.updates))
        pieces = pieces.to(torch.promote_types(pieces.dtype, torch.float32)) ** 2
        owner = torch.tensor(self.owner, device=device)
        sums = torch.zeros(2 * n, device=device, dtype=pieces.dtype)
        sums.index_add_(0, torch.cat([owner, owner + n]), pieces)
        if reduce is not None:
            sums = reduce(sums)
        self.sums = sums.sqrt()
        self._owner = owner

    def scale(self, start: int, count: int, max_trust_ratio: float | None) -> None:
        """Multiply pieces [start, start + count) by their tensor's trust ratio."""
        n = self.num_tensors
        ratios = trust_ratios(self.sums[:n], self.sums[n:], max_trust_ratio)
        per_piece = ratios[self._owner[start:start + count]]
        torch._foreach_mul_(self.updates[start:start + count], list(per_piece.unbind()))


def trust_ratios(weight_norms: torch.Tensor, update_norms: torch.Tensor,
                 max_trust_ratio: float | None = None) -> torch.Tensor:
    """||w|| / ||u|| per tensor; 1 where either norm is 0; optionally clamped from above."""
    ok = (weight_norms > 0) & (update_norms > 0)
    ratio = torch.where(ok, weight_norms / torch.where(ok, update_norms, torch.ones_like(update_norms)),
                        torch.ones_like(weight_norms))
    if max_trust_ratio is not None:
        ratio = ratio.clamp(max=max_trust_ratio)
    return ratio
