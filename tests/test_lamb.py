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


# --- segments: LAMB on ZeRO-style flat partitions gives the per-tensor result at any world size ---

def _flat_layout(shapes, align: int = 4):
    """Offsets of tensors laid out one after another with padding to ``align`` between them (like ZeRO)."""
    offsets, off = [], 0
    for s in shapes:
        offsets.append(off)
        off += math.prod(s)
        off += (-off) % align
    return offsets, off


def layout_of(numels, offsets, start: int, size: int):
    """The FlatLayout of flat elements [start, start + size) (written out independently of the engine)."""
    from bertscale.lamb import FlatLayout

    segments = []
    for i, (n, off) in enumerate(zip(numels, offsets)):
        lo, hi = max(off, start), min(off + n, start + size)
        if hi > lo:
            segments.append((lo - start, hi - start, i))
    return FlatLayout(tuple(segments), len(numels))


def run_partitioned(params0, grads_per_step, world: int, wd: float, **kwargs) -> list[torch.Tensor]:
    """``world`` Lamb instances, each owning one partition of a padded flat buffer, summing their
    partial norms through a thread barrier (what the engine's all-reduce does between ranks)."""
    import threading

    numels = [p.numel() for p in params0]
    offsets, used = _flat_layout([p.shape for p in params0])
    total = used + (-used) % world
    size = total // world

    def flatten(tensors):
        flat = torch.zeros(total, dtype=tensors[0].dtype)
        for t, o in zip(tensors, offsets):
            flat[o:o + t.numel()] = t.reshape(-1)
        return flat

    flat0 = flatten(params0)
    parts = [torch.nn.Parameter(flat0[r * size:(r + 1) * size].clone()) for r in range(world)]
    slots: list[torch.Tensor | None] = [None] * world
    barrier = threading.Barrier(world)

    def make_reduce(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total_ = sum(slots)
            barrier.wait()
            return total_
        return reduce

    def worker(rank):
        opt = Lamb([parts[rank]], weight_decay=wd, **kwargs)
        opt.shard({parts[rank]: layout_of(numels, offsets, rank * size, size)}, make_reduce(rank))
        for grads in grads_per_step:
            parts[rank].grad = flatten(grads)[rank * size:(rank + 1) * size].clone()
            opt.step()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = torch.cat([p.detach() for p in parts])
    return [flat[o:o + n].view(p.shape) for o, n, p in zip(offsets, numels, params0)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("bias_correction, wd", [(True, 0.0), (True, 0.1), (False, 0.1)])
def test_partitioned_lamb_matches_per_tensor_reference(world, bias_correction, wd):
    params, grads = random_problem(seed=world * 7 + int(bias_correction), steps=4)
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=bias_correction, max_trust_ratio=None)
    got = run_partitioned(params, grads, world, wd, **kwargs)
    want = reference_lamb(params, grads, [wd] * len(params), **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_naive_partitioned_lamb_would_differ():
    """Why segments matter: per-partition trust ratios (no segment map) depend on the partitioning."""
    params, grads = random_problem(seed=4, steps=3)
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=True, max_trust_ratio=None)
    want = reference_lamb(params, grads, [0.0] * len(params), **kwargs)
    numels = [p.numel() for p in params]
    offsets, used = _flat_layout([p.shape for p in params])
    flat = torch.zeros(used, dtype=torch.float64)
    for t, o in zip(params, offsets):
        flat[o:o + t.numel()] = t.reshape(-1)
    whole = torch.nn.Parameter(flat.clone())
    opt = Lamb([whole], weight_decay=0.0, **kwargs)  # one flat tensor, no segments: one trust ratio
    for gs in grads:
        g = torch.zeros(used, dtype=torch.float64)
        for t, o in zip(gs, offsets):
            g[o:o + t.numel()] = t.reshape(-1)
        whole.grad = g
        opt.step()
    naive = [whole.detach()[o:o + n] for o, n in zip(offsets, numels)]
    assert not all(torch.allclose(a.reshape(-1), b.reshape(-1)) for a, b in zip(naive, want))


def test_layout_windows_and_validation():
    from bertscale.lamb import FlatLayout

    # tensors of 5, 3, 4 elements at offsets 0, 8, 12 (padding 5..7) in a 16-element buffer, 2 partitions
    assert layout_of([5, 3, 4], [0, 8, 12], 0, 8) == FlatLayout(((0, 5, 0),), 3)
    assert layout_of([5, 3, 4], [0, 8, 12], 8, 8) == FlatLayout(((0, 3, 1), (4, 8, 2)), 3)
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="does not fit"):
        Lamb([p]).shard({p: FlatLayout(((2, 5, 0),), 1)}, None)


def test_layout_is_not_optimizer_state():
    p = torch.nn.Parameter(torch.ones(6))
    opt = Lamb([p], lr=0.1)
    opt.shard({p: layout_of([2, 4], [0, 2], 0, 6)}, None)
    p.grad = torch.ones(6)
    opt.step()
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # what DeepSpeed checkpoints


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lamb_on_cuda_matches_reference():
    """The CUDA path (our foreach LAMB; torch fuses the multi-tensor ops) against the float64 reference."""
    params, grads = random_problem(seed=21, steps=5)
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=True, max_trust_ratio=None)
    want = reference_lamb(params, grads, [0.1] * len(params), **kwargs)
    cuda_params = [torch.nn.Parameter(p.float().cuda()) for p in params]
    opt = Lamb(cuda_params, weight_decay=0.1, **kwargs)
    for gs in grads:
        for p, g in zip(cuda_params, gs):
            p.grad = g.float().cuda()
        opt.step()
    for g, w in zip(cuda_params, want):
        torch.testing.assert_close(g.detach().cpu().double(), w, rtol=1e-4, atol=1e-5)
