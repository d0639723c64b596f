"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), vectorised with torch._foreach_*.

Used on CPU, where DeepSpeed has no LAMB kernel, and as the reference the fused CUDA
path is checked against. Per tensor: Adam moments (optionally bias-corrected), decoupled
weight decay added to the Adam direction, and a trust ratio ||w|| / ||update|| (1 where
either norm is 0, optionally clamped) that scales the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive large-batch optimizer. Biases and LayerNorm weights belong in a
    parameter group with ``weight_decay=0`` (see ``bertscale.engine.parameter_groups``)."""

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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            grads = [p.grad.to(p.dtype) if p.grad.dtype != p.dtype else p.grad for p in params]
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

            ratios = trust_ratios(torch.stack(torch._foreach_norm(params)),
                                  torch.stack(torch._foreach_norm(updates)),
                                  group["max_trust_ratio"])
            torch._foreach_mul_(updates, list(ratios.unbind()))
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


def trust_ratios(weight_norms: torch.Tensor, update_norms: torch.Tensor,
                 max_trust_ratio: float | None = None) -> torch.Tensor:
    """||w|| / ||u|| per tensor; 1 where either norm is 0; optionally clamped from above."""
    ok = (weight_norms > 0) & (update_norms > 0)
    ratio = torch.where(ok, weight_norms / torch.where(ok, update_norms, torch.ones_like(update_norms)),
                        torch.ones_like(weight_norms))
    if max_trust_ratio is not None:
        ratio = ratio.clamp(max=max_trust_ratio)
    return ratio
