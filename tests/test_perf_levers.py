"""Every speed lever in PerfOptions computes what the plain path computes (same loss and gradients on the same batch)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bertscale.hf_format import load_hf, load_state_dict_into, save_hf
from bertscale.model import (BertConfig, BertForPreTraining, PerfOptions, fast_dropout, masked_lm_loss,
                             padded_vocab_size)

V, S, B = 503, 16, 3
ROOT = Path(__file__).resolve().parent.parent


def config(**overrides) -> BertConfig:
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **overrides})


def batch(padded: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, S), generator=g)
    tt = torch.zeros(B, S, dtype=torch.long)
    tt[:, S // 2:] = 1
    am = torch.ones(B, S, dtype=torch.long)
    if padded:
        am[1, S - 5:] = 0
        ids[am == 0] = 0
    labels = torch.full((B, S), -100)
    pick = (torch.rand(B, S, generator=g) < 0.3) & (am == 1)
    labels[pick] = torch.randint(0, V, (int(pick.sum()),), generator=g)
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0]))


def loss_and_grads(model: BertForPreTraining, data: dict, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**data).loss
    loss.backward()
    rows = model.config.vocab_size  # compare real vocabulary rows only
    grads = {n: (p.grad[:rows] if p.shape[0] > rows and "word_embeddings" in n or n == "cls.predictions.bias"
                 else p.grad).clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


def reference(cfg: BertConfig, **perf) -> tuple[BertForPreTraining, BertForPreTraining]:
    """(plain model, same weights with the given levers)."""
    torch.manual_seed(0)
    plain = BertForPreTraining(cfg, PerfOptions.plain()).train()
    fast = BertForPreTraining(cfg, replace(PerfOptions.plain(), **perf)).train()
    load_state_dict_into(fast, plain.state_dict())
    return plain, fast


def assert_same(plain, fast, data, rtol=1.3e-6, atol=1e-5):
    loss_p, grads_p = loss_and_grads(plain, data)
    loss_f, grads_f = loss_and_grads(fast, data)
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=atol)
    for n, g in grads_p.items():
        torch.testing.assert_close(grads_f[n], g, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("lever", [dict(fused_qkv=True), dict(skip_full_mask=True), dict(gradient_checkpointing=True),
                                   dict(pad_vocab_multiple=64), dict(sparse_last_layer=True), dict(fused_mlm_loss=True),
                                   dict(sparse_last_layer=True, gradient_checkpointing=True), PerfOptions().__dict__])
def test_lever_matches_plain_path(lever, padded):
    plain, fast = reference(config(), **lever)
    assert_same(plain, fast, batch(padded))


def test_defaults_are_the_fast_cpu_path():
    p = PerfOptions()
    assert p.fused_qkv and p.fast_dropout and p.skip_full_mask and p.sparse_last_layer and p.fused_mlm_loss
    assert not p.compile and not p.gradient_checkpointing and p.pad_vocab_multiple == 1
    assert PerfOptions.for_device("cuda").pad_vocab_multiple == 64
    assert PerfOptions().with_overrides(["compile=true", "pad_vocab_multiple=8"]) == replace(p, compile=True,
                                                                                          pad_vocab_multiple=8)
    with pytest.raises(ValueError, match="unknown PerfOptions field 'fused'"):
        p.with_overrides(["fused=1"])


def test_fast_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(512, 512, requires_grad=True)
    y = fast_dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient is the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1), y)  # seeded like nn.Dropout


def test_fast_dropout_attention_path_matches_sdpa():
    # p so small that no element drops: the CPU matmul-softmax path must equal SDPA's, mask included.
    cfg = config(hidden_dropout_prob=1e-9, attention_probs_dropout_prob=1e-9)
    plain, fast = reference(cfg, fast_dropout=True)
    for padded in (True, False):
        assert_same(plain, fast, batch(padded))


def test_fast_dropout_trains_like_dropout():
    """With real dropout the two samplers differ, but the loss lands in the same place."""
    cfg = config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    plain, fast = reference(cfg, fast_dropout=True)
    data = batch()
    losses = {}
    for name, m in (("plain", plain), ("fast", fast)):
        torch.manual_seed(1)
        losses[name] = torch.stack([m(**data).loss.detach() for _ in range(20)]).mean()
    torch.manual_seed(1)
    eval_loss = plain.eval()(**data).loss.detach()
    assert abs(losses["fast"] - losses["plain"]) < 0.1 * abs(losses["plain"] - eval_loss) + 0.02


def test_padded_vocabulary_stays_zero_and_exports_unpadded(tmp_path):
    plain, fast = reference(config(), pad_vocab_multiple=64)
    rows = padded_vocab_size(V, 64)
    assert rows == 512 and fast.bert.embeddings.word_embeddings.weight.shape == (rows, 64)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2, foreach=True)
    fast(**batch()).loss.backward()
    opt.step()
    assert not fast.bert.embeddings.word_embeddings.weight[V:].any() and not fast.cls.predictions.bias[V:].any()
    out = save_hf(fast.state_dict(), fast.config, tmp_path / "hf")
    unpadded = load_hf(out)
    assert unpadded.bert.embeddings.word_embeddings.weight.shape == (V, 64)
    repadded = load_hf(out, perf=PerfOptions(pad_vocab_multiple=64))
    for (k, a), b in zip(fast.state_dict().items(), repadded.state_dict().values()):
        assert torch.equal(a, b), k
    # and a padded checkpoint starts an unpadded model (phase 2 from consolidated phase-1 weights)
    load_state_dict_into(plain, fast.state_dict())
    torch.testing.assert_close(plain.eval()(**batch()).loss, fast.eval()(**batch()).loss)


def test_sparse_last_layer_counts_and_accuracy_match():
    plain, fast = reference(config(), sparse_last_layer=True)
    data = batch()
    a, b = plain.eval()(**data), fast.eval()(**data)
    for field in ("mlm_correct", "mlm_count", "nsp_correct", "nsp_count"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    torch.testing.assert_close(b.seq_relationship_logits, a.seq_relationship_logits)
    no_targets = dict(data, labels=torch.full_like(data["labels"], -100))  # only [CLS] rows survive
    torch.testing.assert_close(fast(**no_targets).nsp_loss, plain(**no_targets).nsp_loss)


def test_padding_is_fixed_at_construction():
    m = BertForPreTraining(config())
    with pytest.raises(ValueError, match="fixed when the model is built"):
        m.set_perf_options(PerfOptions(pad_vocab_multiple=64))


@pytest.mark.slow
def test_compiled_layers_match_plain_path():
    plain, fast = reference(config(), compile=True)
    assert_same(plain, fast, batch(), rtol=1e-5, atol=1e-5)


def test_bench_step_reports_every_figure(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_step import main

    main(["--preset", "mini", "--seq-len", "32", "--batch", "2", "--iters", "1", "--warmup", "1",
          "--matmul-n", "256", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ours_tokens_per_s", "peer_tokens_per_s", "ratio", "ours_tflops", "device", "config",
                "matmul_tflops", "ours_peak_mem_gib", "lamb_step_ms", "adamw_step_ms"):
        assert key in r, key
    assert r["config"]["masked_per_seq"] > 0 and r["ratio"] > 0


def test_bench_levers_times_default_against_variant(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_levers import main

    main(["--preset", "tiny", "--seq-len", "32", "--batch", "2", "--iters", "1", "--lever", "fused_mlm_loss=false",
          "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["default"]["fused_mlm_loss"] and not r["variant"]["fused_mlm_loss"] and r["speedup"] > 0
    # an exact lever on the same weights, batch and dropout draws: the same first loss
    assert r["first_losses"]["default"] == pytest.approx(r["first_losses"]["variant"], rel=1e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_gpu_levers_match_plain_path():
    plain, fast = reference(config(), **PerfOptions.for_device("cuda").__dict__)
    plain, fast = plain.cuda(), fast.cuda()
    data = {k: v.cuda() for k, v in batch().items()}
    assert_same(plain, fast, data, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_bench_runs_bf16():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_step import bench

    r = bench("base", seq_len=128, batch=8, precision="bf16", iters=2, warmup=1, lamb=False)
    assert 0 < r["ours_mfu"] < 1 and r["ours_peak_mem_gib"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_lm_loss_is_cross_entropy_and_argmax(dtype):
    """The fused head loss: the value, the correct count and the gradient of cross_entropy + argmax."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(37, 211, generator=g) * 4).to(dtype)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: argmax takes the first
    targets = torch.randint(0, 211, (37,), generator=g)
    targets[3], targets[5] = 7, int(logits[5].float().argmax())
    a = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(a.float(), targets, reduction="sum")
    want_correct = (a.float().argmax(-1) == targets).sum()
    (want * 0.3).backward()
    b = logits.clone().requires_grad_()
    got, correct = masked_lm_loss(b, targets)
    (got * 0.3).backward()
    assert got.dtype == torch.float32 and int(correct) == int(want_correct) >= 2
    torch.testing.assert_close(got, want)
    assert b.grad.dtype == dtype
    torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-3 if dtype == torch.bfloat16 else 1e-7)
    empty, none = masked_lm_loss(torch.zeros(0, 211, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0 and int(none) == 0
