"""Unpadded batches (bertscale.packing) and the model's unpadded path: the same losses and gradients as the
padded path on the same samples, per sample, with every speed lever; the attention kernels' dispatch."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertscale.hf_format import load_state_dict_into
from bertscale.loader import collate, eval_batches
from bertscale.masking import IGNORE_INDEX
from bertscale.model import (ROW_CALL_COST, BertConfig, BertForPreTraining, PerfOptions, UnpaddedLayout,
                             attention_rows, unpadded_attention_kernel)
from bertscale.packing import (batch_to, computed_tokens, model_inputs, real_tokens, samples_from_padded, unpad,
                               unpadded_batch)
from bertscale.tokenizer import tokenizer_info

ROOT = Path(__file__).resolve().parent.parent


def sample(ids, labels, a_len, nsp, sid):
    return {"input_ids": np.array(ids), "labels": np.array(labels), "a_len": a_len, "nsp_label": nsp, "sample_id": sid}


def test_unpadded_batch_layout():
    s = [sample([2, 10, 3, 11, 3], [-100, 10, -100, 7, -100], 3, 1, 40),
         sample([2, 12, 13, 3, 14, 15, 3], [-100] * 7, 4, 0, 41),
         sample([2, 16, 3, 17, 3], [-100, -100, -100, 17, -100], 3, 1, 42)]
    b = unpadded_batch(s, with_sample_ids=True)
    assert b["input_ids"].tolist() == [2, 10, 3, 11, 3, 2, 12, 13, 3, 14, 15, 3, 2, 16, 3, 17, 3]
    assert b["labels"][[1, 3, 15]].tolist() == [10, 7, 17] and int((b["labels"] != IGNORE_INDEX).sum()) == 3
    assert b["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert b["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    assert b["cu_seqlens"].tolist() == [0, 5, 12, 17] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 7 and isinstance(b["max_seqlen"], int)
    assert b["next_sentence_label"].tolist() == [1, 0, 1] and b["sample_ids"].tolist() == [40, 41, 42]
    assert all(b[k].dtype == torch.long for k in ("input_ids", "labels", "token_type_ids", "position_ids"))
    assert "sample_ids" not in unpadded_batch(s)
    assert real_tokens(b) == computed_tokens(b) == 17
    # deterministic, and the same samples padded hold the same real tokens
    assert all(torch.equal(v, unpadded_batch(s)[k]) for k, v in unpadded_batch(s).items() if torch.is_tensor(v))
    padded = collate(s, pad_id=0, with_sample_ids=True)
    assert real_tokens(padded) == 17 and computed_tokens(padded) == 3 * 8
    assert set(model_inputs(b)) == {"input_ids", "labels", "token_type_ids", "position_ids", "cu_seqlens",
                                    "max_seqlen", "next_sentence_label"}
    assert set(model_inputs(padded)) == {"input_ids", "labels", "token_type_ids", "attention_mask",
                                         "next_sentence_label"}
    moved = batch_to(b, "cpu")
    assert moved["max_seqlen"] == 7 and torch.equal(moved["cu_seqlens"], b["cu_seqlens"])


def test_unpadded_batch_refuses_malformed_samples():
    good = sample([2, 10, 3, 11, 3], [-100] * 5, 3, 0, 7)
    with pytest.raises(ValueError, match="at least one sample"):
        unpadded_batch([])
    with pytest.raises(ValueError, match=r"sample 8 \(position 1\): 5 input ids and 4 labels"):
        unpadded_batch([good, sample([2, 10, 3, 11, 3], [-100] * 4, 3, 0, 8)])
    with pytest.raises(ValueError, match="sample 9 .*a_len 6 outside 1..5"):
        unpadded_batch([good, sample([2, 10, 3, 11, 3], [-100] * 5, 6, 0, 9)])


@pytest.fixture(scope="module")
def info(tokenizer_dir):
    return tokenizer_info(tokenizer_dir)


@pytest.fixture(scope="module")
def real_batch(shard_dir, info):
    """A padded batch of real masked samples of different lengths (the shards' epoch-0 masks)."""
    batch = next(eval_batches(shard_dir, split="train", batch_size=12, seed=5, tokenizer=info))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() == batch["input_ids"].shape[1]  # padding to cut away
    assert (batch["labels"] != IGNORE_INDEX).sum() > 12 and 0 < batch["next_sentence_label"].sum() < 12
    return batch


def test_samples_from_padded_round_trip(real_batch):
    samples = samples_from_padded(real_batch)
    again = collate(samples, pad_id=0, max_len=real_batch["input_ids"].shape[1])
    for k, v in real_batch.items():
        assert torch.equal(again[k], v), k
    u = unpad(real_batch)
    mask = real_batch["attention_mask"].bool()
    for k in ("input_ids", "labels", "token_type_ids"):
        assert torch.equal(u[k], real_batch[k][mask]), k
    assert u["cu_seqlens"].diff().tolist() == mask.sum(1).tolist()
    assert torch.equal(u["next_sentence_label"], real_batch["next_sentence_label"])


def small_config(vocab_size: int, dropout: float = 0.0) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


def twin_models(cfg: BertConfig, perf: PerfOptions) -> tuple[BertForPreTraining, BertForPreTraining]:
    """(padded reference with every lever off, the same weights with ``perf``)."""
    torch.manual_seed(0)
    plain = BertForPreTraining(cfg, PerfOptions.plain())
    with torch.no_grad():  # move biases and LayerNorms off their init so that gradients see them
        for name, p in plain.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    fast = BertForPreTraining(cfg, perf)
    load_state_dict_into(fast, plain.state_dict())
    return plain.train(), fast.train()


def per_sample_losses(model: BertForPreTraining, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per sample: the MLM cross-entropies of its masked positions, [B] NSP cross-entropies)."""
    inputs = dict(model_inputs(batch), labels=None)
    out = model(**inputs)
    labels = batch["labels"]
    if "cu_seqlens" in batch:
        bounds = batch["cu_seqlens"].tolist()
        rows = [(out.prediction_logits[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        rows = list(zip(out.prediction_logits, labels))
    mlm = [F.cross_entropy(logits[y != IGNORE_INDEX].float(), y[y != IGNORE_INDEX], reduction="none")
           for logits, y in rows]
    nsp = F.cross_entropy(out.seq_relationship_logits.float(), batch["next_sentence_label"], reduction="none")
    return mlm, nsp


def loss_and_grads(model: BertForPreTraining, batch: dict):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


def assert_same_function(plain, fast, padded: dict, unpadded: dict) -> None:
    """Per-sample MLM and NSP losses, the training loss, its counts and every gradient agree (fp32)."""
    mlm_p, nsp_p = per_sample_losses(plain, padded)
    mlm_u, nsp_u = per_sample_losses(fast, unpadded)
    for i, (a, b) in enumerate(zip(mlm_p, mlm_u)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"sample {i} MLM losses: {m}")
    torch.testing.assert_close(nsp_u, nsp_p, rtol=1e-5, atol=1e-5)
    out_p, grads_p = loss_and_grads(plain, padded)
    out_u, grads_u = loss_and_grads(fast, unpadded)
    torch.testing.assert_close(out_u.mlm_loss, out_p.mlm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_u.nsp_loss, out_p.nsp_loss, rtol=1e-5, atol=1e-6)
    for field in ("mlm_count", "mlm_correct", "nsp_count", "nsp_correct"):
        assert torch.equal(getattr(out_u, field), getattr(out_p, field)), field
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_u[name], g, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")


LEVERS = {
    "plain": PerfOptions.plain(),
    "fused_qkv": replace(PerfOptions.plain(), fused_qkv=True),
    "sparse_last_layer": replace(PerfOptions.plain(), sparse_last_layer=True),
    "fused_mlm_loss": replace(PerfOptions.plain(), fused_mlm_loss=True),
    "fast_dropout": replace(PerfOptions.plain(), fast_dropout=True),
    "defaults": PerfOptions(),
    "gradient_checkpointing": replace(PerfOptions(), gradient_checkpointing=True),
}


@pytest.mark.parametrize("kernel", ["rows", "jagged"])
@pytest.mark.parametrize("lever", list(LEVERS))
def test_unpadded_is_the_padded_function_of_the_same_samples(real_batch, info, lever, kernel):
    plain, fast = twin_models(small_config(info.vocab_size), replace(LEVERS[lever], unpadded_attention=kernel))
    if kernel == "rows":  # the batch's rows come in two widths: the equality covers the groups' bookkeeping
        plan = attention_rows(real_batch["attention_mask"].sum(1).tolist(), heads=fast.config.num_attention_heads)
        assert [tuple(s.shape) for s in plan.segments] == [(5, 64), (4, 32)]
    assert_same_function(plain, fast, real_batch, unpad(real_batch))


def test_the_equality_check_catches_wrong_packing(real_batch, info):
    """Positions that do not restart, or attention that leaks across samples, change the losses."""
    plain, fast = twin_models(small_config(info.vocab_size), PerfOptions())
    good = unpad(real_batch)
    no_restart = dict(good, position_ids=torch.arange(len(good["input_ids"])) % 64)  # within the table
    with pytest.raises(AssertionError, match="MLM losses"):
        assert_same_function(plain, fast, real_batch, no_restart)
    # samples 0 and 1 seen as one (positions still restart at sample 1): only attention is wrong
    leaky = dict(good, cu_seqlens=torch.cat([good["cu_seqlens"][:1], good["cu_seqlens"][2:]]),
                 next_sentence_label=good["next_sentence_label"][1:])
    mlm_p, _ = per_sample_losses(plain, real_batch)
    mlm_leaky, _ = per_sample_losses(fast, leaky)
    assert mlm_leaky[0].shape == torch.cat(mlm_p[:2]).shape
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):  # the equality test's tolerance
        torch.testing.assert_close(mlm_leaky[0], torch.cat(mlm_p[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlm_leaky[1], mlm_p[2], rtol=1e-5, atol=1e-5)  # the rest is untouched


def test_dropout_on_trains_like_the_padded_path(real_batch, info):
    """The shipped defaults (dropout 0.1, fast CPU dropout): eval mode agrees exactly; in training the
    unpadded path drops out (its draws differ from the padded path's, the expected loss does not)."""
    plain, fast = twin_models(small_config(info.vocab_size, dropout=0.1), PerfOptions())
    u = unpad(real_batch)
    plain.eval(), fast.eval()
    eval_p, eval_u = plain(**model_inputs(real_batch)).loss.detach(), fast(**model_inputs(u)).loss.detach()
    torch.testing.assert_close(eval_u, eval_p, rtol=1e-5, atol=1e-6)
    plain.train(), fast.train()
    losses = {}
    for name, model, batch in (("padded", plain, real_batch), ("unpadded", fast, u)):
        torch.manual_seed(1)
        draws = torch.stack([model(**model_inputs(batch)).loss.detach() for _ in range(6)])
        assert len(set(draws.tolist())) == 6 and not torch.isclose(draws, eval_p).any()  # dropout is on
        losses[name] = draws.mean()
        model.zero_grad()
        model(**model_inputs(batch)).loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(losses["unpadded"] - losses["padded"]) < 0.02


def test_unpadded_input_errors_teach(real_batch, info):
    model = BertForPreTraining(small_config(info.vocab_size))
    u = unpad(real_batch)
    with pytest.raises(ValueError, match="has no padding: pass attention_mask=None"):
        model(**model_inputs(u), attention_mask=torch.ones_like(u["input_ids"]))
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        model(input_ids=u["input_ids"], labels=u["labels"])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        model(**dict(model_inputs(u), max_seqlen=65))
    # max_seqlen and position_ids are derived when absent
    model.eval()
    full = model(**model_inputs(u)).loss
    derived = model(**{k: v for k, v in model_inputs(u).items() if k not in ("max_seqlen", "position_ids")}).loss
    torch.testing.assert_close(derived, full)


def test_attention_kernel_dispatch():
    assert unpadded_attention_kernel("auto", "cuda") == "varlen"
    assert unpadded_attention_kernel("auto", "cpu") == "rows"
    assert unpadded_attention_kernel("rows", "cuda") == "rows"
    assert unpadded_attention_kernel("jagged", "cpu") == "jagged"
    with pytest.raises(ValueError, match="'varlen' runs flash attention, which needs a CUDA device"):
        unpadded_attention_kernel("varlen", "cpu")
    with pytest.raises(ValueError, match="unpadded_attention must be one of auto, varlen, jagged, rows"):
        unpadded_attention_kernel("flex", "cuda")
    with pytest.raises(ValueError, match="unpadded_attention must be one of"):
        PerfOptions(unpadded_attention="flash")
    assert PerfOptions().with_overrides(["unpadded_attention=jagged"]).unpadded_attention == "jagged"
    cu = torch.tensor([0, 5, 12, 17], dtype=torch.int32)
    jagged = UnpaddedLayout.build(cu, 7, "jagged", torch.bfloat16)
    assert jagged.cu_seqlens.dtype == torch.int64 and jagged.rows is None and jagged.bias is None
    varlen = UnpaddedLayout.build(cu.long(), 7, "varlen", torch.bfloat16)
    assert varlen.cu_seqlens.dtype == torch.int32 and varlen.rows is None and varlen.bias is None
    rows = UnpaddedLayout.build(cu, 7, "rows", torch.bfloat16)
    (bias,) = rows.bias  # one width: 7 | 5 | 5
    assert bias.dtype == torch.bfloat16 and bias.shape == (3, 1, 8, 8)


def test_attention_rows_first_fit_decreasing():
    lengths = [5, 7, 5, 3, 2, 8]
    r = attention_rows(lengths)
    (seg,) = r.segments  # no narrower multiple of 8 holds a sample: one width
    assert seg.shape == (4, 8)  # 8 | 7 | 5+3 | 5+2 (longest first, into the first row with room)
    assert seg[0].tolist() == [5] * 8 and seg[1].tolist() == [1] * 7 + [-1]
    assert seg[2].tolist() == [0] * 5 + [3] * 3 and seg[3].tolist() == [2] * 5 + [4] * 2 + [-1]
    assert torch.equal(r.index[r.back], torch.arange(sum(lengths)))  # every token once, in its sample's slots
    assert r.fill == pytest.approx(30 / 32)
    assert torch.equal(attention_rows(lengths).back, r.back)  # deterministic
    (bias,) = r.block_bias(torch.float32)
    assert bias.shape == (4, 1, 8, 8) and bias[2, 0, 0, :5].eq(0).all() and bias[2, 0, 0, 5:].lt(-1e38).all()
    assert [s.shape for s in attention_rows([9]).segments] == [(1, 16)]
    with pytest.raises(ValueError, match="positive sample lengths"):
        attention_rows([3, 0])


def check_rows(r, lengths: list[int]) -> None:
    """Every token in exactly one slot, each sample contiguous in one row, the segments saying whose."""
    total = sum(lengths)
    assert torch.equal(r.index[r.back], torch.arange(total))
    flat = torch.cat([s.reshape(-1) for s in r.segments])
    assert flat.numel() == r.index.numel() and int((flat >= 0).sum()) == total
    starts = np.cumsum([0] + lengths)
    bounds = np.cumsum([0] + [s.numel() for s in r.segments])
    for i, n in enumerate(lengths):
        slots = r.back[starts[i]:starts[i] + n]
        assert torch.equal(slots, slots[0] + torch.arange(n)), f"sample {i} not contiguous"
        assert flat[slots].eq(i).all()
        g = int(np.searchsorted(bounds, int(slots[0]), side="right")) - 1
        width = r.segments[g].shape[1]
        assert (int(slots[0]) - bounds[g]) // width == (int(slots[-1]) - bounds[g]) // width, f"sample {i} split"


def test_attention_rows_come_in_narrower_widths_when_they_pay():
    """A row costs its width squared: short samples go into narrower rows when that saves more than a call."""
    r = attention_rows([8, 40, 8, 8, 8], call_cost=0)
    assert [tuple(s.shape) for s in r.segments] == [(1, 40), (4, 8)]  # 1,600 + 4 x 64 score slots, not 2 x 1,600
    assert r.scores == 40 * 40 + 4 * 64
    assert r.segments[0].tolist() == [[1] * 40] and r.segments[1][:, 0].tolist() == [0, 2, 3, 4]
    check_rows(r, [8, 40, 8, 8, 8])
    # a call's fixed cost outweighs what 2 x 1,600 - 1,856 score slots save: one width, as before
    assert [tuple(s.shape) for s in attention_rows([8, 40, 8, 8, 8], call_cost=2_000).segments] == [(2, 40)]
    rng = np.random.default_rng(0)
    for heads in (1, 2, 12):
        for _ in range(20):
            lengths = [int(x) for x in rng.integers(3, 300, size=int(rng.integers(1, 33)))]
            r = attention_rows(lengths, heads=heads)
            check_rows(r, lengths)
            widths = [s.shape[1] for s in r.segments]
            assert widths == sorted(widths, reverse=True) and len(widths) <= 3 and all(w % 8 == 0 for w in widths)
            assert widths[0] == -(-max(lengths) // 8) * 8
            (one,) = attention_rows(lengths, heads=heads, call_cost=float("inf")).segments
            cost_one = heads * one.shape[0] * one.shape[1] ** 2 + ROW_CALL_COST
            assert heads * r.scores + ROW_CALL_COST * len(widths) <= cost_one  # never worse than one width


def test_bf16_unpadded_forward(real_batch, info):
    model = BertForPreTraining(small_config(info.vocab_size), PerfOptions()).to(torch.bfloat16).train()
    out = model(**model_inputs(unpad(real_batch)))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert model.bert.embeddings.word_embeddings.weight.grad.dtype == torch.bfloat16


def test_bench_step_data_reports_padded_and_unpadded(shard_dir, tokenizer_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_step import main, shard_dirs_in

    (tmp_path / "data64").symlink_to(shard_dir)  # a demo-like output folder
    assert shard_dirs_in(tmp_path) == [tmp_path / "data64"] and shard_dirs_in(shard_dir) == [shard_dir]
    with pytest.raises(FileNotFoundError, match="holds no shard directory"):
        shard_dirs_in(tmp_path / "data64" / "train")
    main(["--preset", "tiny", "--data", str(shard_dir), "--tokenizer", str(tokenizer_dir), "--batch", "6",
          "--iters", "2", "--warmup", "1", "--clock", "cpu", "--threads", "1", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    x = r["lengths"]["64"]
    assert r["clock"] == "cpu" and x["batch"] == 6 and x["seq_len"] == 64
    assert r["config"]["vocab"] == tokenizer_info(tokenizer_dir).vocab_size
    p, u = x["padded"], x["unpadded"]
    assert p["real_tokens_per_step"] == u["real_tokens_per_step"] > 0
    assert 0 < p["fill"] < 1 and u["fill"] == 1.0 and 0 < u["attention_fill"] <= 1
    assert u["attention_scores_vs_ideal"] >= 1  # rows never compute fewer score slots than the samples need
    assert 0 < x["optimizer_step_ms"] < min(p["step_ms"], u["step_ms"])
    opt = x["optimizer_step_ms"]  # the ratio of the two steps' times with the optimizer's taken out of both
    assert x["speedup_without_optimizer"] == pytest.approx((p["step_ms"] - opt) / (u["step_ms"] - opt))
    assert p["real_tokens_per_s"] > 0 and u["real_tokens_per_s"] > 0 and x["speedup"] > 0 and x["flop_ratio"] > 1
    # the same samples' model FLOPs over each layout's time: the ratio is the measured speedup
    assert u["model_tflops"] / p["model_tflops"] == pytest.approx(x["speedup"]) and "mfu" not in u
    assert any("unpadded / padded" in line for line in out)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_gpu_jagged_attention_matches_padded(real_batch, info):
    """On CUDA the unpadded path runs SDPA on jagged nested tensors (flash / memory-efficient varlen)."""
    plain, fast = twin_models(small_config(info.vocab_size), PerfOptions.for_device("cuda"))
    plain, fast = plain.cuda(), fast.cuda()
    padded = {k: v.cuda() for k, v in real_batch.items()}
    unpadded = batch_to(unpad(real_batch), "cuda")
    out_p, grads_p = loss_and_grads(plain, padded)
    out_u, grads_u = loss_and_grads(fast, unpadded)
    torch.testing.assert_close(out_u.loss, out_p.loss, rtol=1e-4, atol=1e-4)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_u[name][: len(g)], g, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    bf16 = fast.to(torch.bfloat16)
    bf16.train()(**model_inputs(unpadded)).loss.backward()  # flash kernel, dropout off


@pytest.mark.gpu
@gpu
def test_gpu_flash_varlen_matches_jagged_and_padded(real_batch, info):
    """The default CUDA kernel: flash varlen on the token stream, in bf16. Without dropout it computes
    what SDPA on jagged tensors computes (the same flash kernel, reached without nested tensors) and
    the padded loss; with dropout it is reproducible from the CUDA seed (exact resume relies on it)."""
    plain, fast = twin_models(small_config(info.vocab_size), PerfOptions.for_device("cuda"))
    jagged = BertForPreTraining(fast.config, replace(fast.perf, unpadded_attention="jagged"))
    load_state_dict_into(jagged, fast.state_dict())
    plain, fast, jagged = (m.cuda().to(torch.bfloat16).train() for m in (plain, fast, jagged))
    unpadded = batch_to(unpad(real_batch), "cuda")
    out_v, grads_v = loss_and_grads(fast, unpadded)
    out_j, grads_j = loss_and_grads(jagged, unpadded)
    out_p, _ = loss_and_grads(plain, {k: v.cuda() for k, v in real_batch.items()})
    torch.testing.assert_close(out_v.loss, out_j.loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out_v.loss.float(), out_p.loss.float(), rtol=2e-2, atol=2e-2)
    for name, g in grads_j.items():
        torch.testing.assert_close(grads_v[name], g, rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")
    for layer in fast.bert.encoder.layer:
        layer.attention.self.dropout_p = 0.5
    runs = []
    for _ in range(2):
        torch.cuda.manual_seed(7)
        runs.append(loss_and_grads(fast, unpadded))
    assert torch.isfinite(runs[0][0].loss) and not torch.equal(runs[0][0].loss, out_v.loss)
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
