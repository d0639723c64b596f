"""LAMB against a plain per-tensor reference; trust ratios; the no-decay parameter group."""

from __future__ import annotations

import math

import pytest
import torch

from bertscale.engine import parameter_groups
from bertscale.lamb import Lamb, trust_ratios
from bertscale.model import BertForPreTraining, preset_config

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]


def reference_lamb(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], wds: list[float], lr: float,
                   betas: tuple[float, float], eps: float, bias_correction: bool,
                   max_trust_ratio: float | None) -> list[torch.Tensor]:
    """You et al. 2019, one tensor at a time."""
    beta1, beta2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, 1):
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat, v_hat = m[i], v[i]
            if bias_correction:
                m_hat = m[i] / (1 - beta1 ** step)
                v_hat = v[i] / (1 - beta2 ** step)
            update = m_hat / (v_hat.sqrt() + eps) + wds[i] * p
            w_norm, u_norm = p.norm().item(), update.norm().item()
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if max_trust_ratio is not None:
                ratio = min(ratio, max_trust_ratio)
            params[i] = p - lr * ratio * update
    return params


def random_problem(seed: int, steps: int = 5, zero_first: bool = False):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[1] *= 0.01  # small weights: trust ratio well below 1
    params[2] *= 30.0  # large weights: trust ratio well above 1
    if zero_first:
        params[0].zero_()
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (i + 1) for i, s in enumerate(SHAPES)]
             for _ in range(steps)]
    return params, grads


def run_lamb(params0, grads_per_step, groups_wd: list[list[int]] | None = None, wd: float = 0.0,
             **kwargs) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    if groups_wd is None:
        opt = Lamb(params, weight_decay=wd, **kwargs)
    else:
        opt = Lamb([{"params": [params[i] for i in idx], "weight_decay": d} for idx, d in groups_wd], **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("max_trust_ratio", [None, 2.0])
def test_matches_reference(bias_correction, wd, max_trust_ratio):
    params, grads = random_problem(seed=int(bias_correction) + 10 * int(wd * 10) + (7 if max_trust_ratio else 0))
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=bias_correction,
                  max_trust_ratio=max_trust_ratio)
    got = run_lamb(params, grads, wd=wd, **kwargs)
    want = reference_lamb(params, grads, [wd] * len(params), **kwargs)
    for g, w, p in zip(got, want, params):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert not torch.equal(g, p)  # every tensor moved


def test_max_trust_ratio_changes_the_result():
    params, grads = random_problem(seed=3)
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=True)
    free = run_lamb(params, grads, **kwargs)
    clamped = run_lamb(params, grads, max_trust_ratio=1.0, **kwargs)
    # the large tensor (ratio >> 1) is slowed by the clamp; the small one (ratio < 1) is not
    assert not torch.allclose(free[2], clamped[2])
    torch.testing.assert_close(free[1], clamped[1])


def test_two_groups_with_different_weight_decay():
    params, grads = random_problem(seed=5)
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, bias_correction=True, max_trust_ratio=None)
    got = run_lamb(params, grads, groups_wd=[([0, 2], 0.05), ([1, 3], 0.0)], **kwargs)
    want = reference_lamb(params, grads, [0.05, 0.0, 0.05, 0.0], **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # and decay mattered: the same run with no decay anywhere differs on the decayed tensors only
    plain = reference_lamb(params, grads, [0.0] * 4, **kwargs)
    assert not torch.allclose(got[0], plain[0]) and not torch.allclose(got[2], plain[2])
    torch.testing.assert_close(got[1], plain[1], rtol=1e-10, atol=1e-12)


def test_zero_initialised_tensor_gets_trust_ratio_one():
    params, grads = random_problem(seed=9, steps=1, zero_first=True)
    lr, eps = 0.01, 1e-6
    got = run_lamb(params, grads, lr=lr, wd=0.1, eps=eps, bias_correction=True)
    g = grads[0][0]
    # step 1 with bias correction: m_hat = g, v_hat = g^2, decay of a zero tensor is 0, ratio 1
    torch.testing.assert_close(got[0], -lr * g / (g.abs() + eps), rtol=1e-10, atol=1e-14)
    want = reference_lamb(params, grads, [0.1] * 4, lr=lr, betas=(0.9, 0.999), eps=eps, bias_correction=True,
                          max_trust_ratio=None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_trust_ratios():
    w = torch.tensor([0.0, 2.0, 3.0, 0.0, 1.0])
    u = torch.tensor([1.0, 0.0, 1.5, 0.0, 4.0])
    torch.testing.assert_close(trust_ratios(w, u), torch.tensor([1.0, 1.0, 2.0, 1.0, 0.25]))
    torch.testing.assert_close(trust_ratios(w, u, max_trust_ratio=1.5), torch.tensor([1.0, 1.0, 1.5, 1.0, 0.25]))
    assert torch.isfinite(trust_ratios(torch.zeros(3), torch.zeros(3))).all()


def test_params_without_grad_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lamb([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3)) and opt.state[a]["step"] == 1


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lamb([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert (p.detach() ** 2).sum().item() < 5.0


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(lr=-1.0), "lr"), (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), "betas"),
])
def test_rejects_bad_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Lamb([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_parameter_groups_of_bert():
    model = BertForPreTraining(preset_config("tiny", vocab_size=100))
    decay, no_decay = parameter_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert len(decay_ids) == len(decay["params"]) and len(no_decay_ids) == len(no_decay["params"])
    assert not decay_ids & no_decay_ids, "a parameter is in both groups"
    named = dict(model.named_parameters())
    assert decay_ids | no_decay_ids == {id(p) for p in named.values()}, "a parameter is missing"
    for name, p in named.items():
        want_no_decay = name.endswith(".bias") or ".LayerNorm." in name
        assert (id(p) in no_decay_ids) == want_no_decay, name
    assert id(named["cls.predictions.bias"]) in no_decay_ids
    assert id(named["bert.embeddings.LayerNorm.weight"]) in no_decay_ids
    assert id(named["bert.embeddings.word_embeddings.weight"]) in decay_ids
    assert id(named["bert.encoder.layer.0.attention.self.query.weight"]) in decay_ids
    # every LayerNorm module's weight is a no-decay parameter
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(id(m.weight) in no_decay_ids for m in norms)


def test_parameter_groups_skip_frozen_and_drive_lamb():
    model = BertForPreTraining(preset_config("tiny", vocab_size=100, num_hidden_layers=1))
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=0.01)
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert id(model.bert.embeddings.position_embeddings.weight) not in all_ids
    opt = Lamb(groups, lr=1e-3)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(ids).prediction_logits.float().pow(2).mean().backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["bert.embeddings.position_embeddings.weight"],
                       before["bert.embeddings.position_embeddings.weight"])
    assert not torch.equal(after["cls.predictions.transform.dense.weight"],
                           before["cls.predictions.transform.dense.weight"])
    assert all(math.isfinite(p.detach().abs().max().item()) for p in after.values())
