"""Our BERT: shapes, the masked-only MLM head, padding invariance, ties, and Hugging Face key names."""

import pytest
import torch
import torch.nn.functional as F

from bertscale.model import (
    PRESETS,
    BertConfig,
    BertForPreTraining,
    num_parameters,
    preset_config,
)

V, S, B = 503, 16, 3


def tiny_config(**overrides) -> BertConfig:
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)
    return BertConfig(**{**base, **overrides})


def make_batch(seed: int = 0, seq_len: int = S):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, V, (B, seq_len), generator=g)
    token_type_ids = torch.zeros(B, seq_len, dtype=torch.long)
    token_type_ids[:, seq_len // 2:] = 1
    attention_mask = torch.ones(B, seq_len, dtype=torch.long)
    attention_mask[1, seq_len - 5:] = 0  # row 1 is padded
    input_ids[attention_mask == 0] = 0
    token_type_ids[attention_mask == 0] = 0
    labels = torch.full((B, seq_len), -100)
    pick = (torch.rand(B, seq_len, generator=g) < 0.3) & (attention_mask == 1)
    labels[pick] = torch.randint(0, V, (int(pick.sum()),), generator=g)
    nsp = torch.tensor([0, 1, 0])
    return input_ids, token_type_ids, attention_mask, labels, nsp


@pytest.fixture(scope="module")
def model() -> BertForPreTraining:
    torch.manual_seed(0)
    m = BertForPreTraining(tiny_config())
    with torch.no_grad():  # move biases and LayerNorms off their init so the tests can see them
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_config_validation_reports_every_problem():
    with pytest.raises(ValueError) as e:
        BertConfig(vocab_size=0, hidden_size=100, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64)
    assert "vocab_size" in str(e.value) and "not divisible by num_attention_heads 3" in str(e.value)


def test_presets_and_hf_dict_round_trip():
    for name, sizes in PRESETS.items():
        c = preset_config(name, vocab_size=1000)
        assert c.hidden_size == sizes["hidden_size"]
    assert preset_config("base", 30522).num_hidden_layers == 12
    assert preset_config("large", 30522).num_attention_heads == 16
    assert preset_config("tiny", 1000, max_position_embeddings=128).max_position_embeddings == 128
    with pytest.raises(ValueError, match="tiny"):
        preset_config("huge", 1000)
    c = tiny_config()
    d = c.to_hf_dict()
    assert d["model_type"] == "bert" and d["architectures"] == ["BertForPreTraining"] and d["tie_word_embeddings"]
    assert BertConfig.from_hf_dict({**d, "some_future_key": 1}) == c


def test_shapes_without_labels(model):
    ids, tt, am, _, _ = make_batch()
    out = model(ids, tt, am)
    assert out.prediction_logits.shape == (B, S, V)
    assert out.seq_relationship_logits.shape == (B, 2)
    assert out.loss is None and out.mlm_loss is None


def test_masked_only_head_equals_full_head(model):
    ids, tt, am, labels, nsp = make_batch()
    out = model(ids, tt, am, labels=labels, next_sentence_label=nsp)
    full = model(ids, tt, am)
    assert out.prediction_logits is None
    logits = full.prediction_logits.view(-1, V)
    flat = labels.view(-1)
    ref_mlm = F.cross_entropy(logits, flat, ignore_index=-100)
    ref_nsp = F.cross_entropy(full.seq_relationship_logits, nsp)
    keep = flat != -100
    torch.testing.assert_close(out.mlm_loss, ref_mlm)
    torch.testing.assert_close(out.nsp_loss, ref_nsp)
    torch.testing.assert_close(out.loss, ref_mlm + ref_nsp)
    assert out.mlm_count.item() == int(keep.sum()) > 0
    assert out.mlm_correct.item() == int((logits.argmax(-1)[keep] == flat[keep]).sum())
    assert out.nsp_count.item() == B
    assert out.nsp_correct.item() == int((full.seq_relationship_logits.argmax(-1) == nsp).sum())


def test_no_masked_positions_gives_zero_loss(model):
    ids, tt, am, _, _ = make_batch()
    out = model(ids, tt, am, labels=torch.full_like(ids, -100))
    assert out.mlm_loss.item() == 0.0 and out.mlm_count.item() == 0
    assert out.nsp_loss.item() == 0.0 and torch.isfinite(out.loss)


def test_padding_does_not_change_real_tokens(model):
    ids, tt, am, _, _ = make_batch()
    extra = 7
    pad = lambda t: torch.cat([t, torch.zeros(B, extra, dtype=t.dtype)], dim=1)  # noqa: E731
    short = model(ids, tt, am)
    long = model(pad(ids), pad(tt), pad(am))
    real = am.bool()
    torch.testing.assert_close(long.prediction_logits[:, :S][real], short.prediction_logits[real])
    torch.testing.assert_close(long.seq_relationship_logits, short.seq_relationship_logits)


def test_decoder_is_tied_to_word_embeddings(model):
    pred = model.cls.predictions
    assert pred.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias
    assert num_parameters(model) == sum(p.numel() for p in model.parameters())
    assert num_parameters(model, exclude_embeddings=True) < num_parameters(model)


def test_state_dict_keys_match_transformers(model):
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf = transformers.BertForPreTraining(transformers.BertConfig(**{
        k: v for k, v in c.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}))
    ours, theirs = model.state_dict(), hf.state_dict()
    # Both list the tied decoder keys; HF's position_ids/token_type_ids buffers are non-persistent.
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k


def test_gradients_flow_everywhere():
    torch.manual_seed(0)
    m = BertForPreTraining(tiny_config()).train()
    ids, tt, am, labels, nsp = make_batch()
    out = m(ids, tt, am, labels=labels, next_sentence_label=nsp)
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name not in ("bert.embeddings.position_embeddings.weight",):
            assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    m = BertForPreTraining(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    ids, tt, am, labels, nsp = make_batch()
    m(ids, tt, am, labels=labels, next_sentence_label=nsp).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    m(ids, tt, am, labels=labels, next_sentence_label=nsp).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_bf16_autocast_runs(model):
    ids, tt, am, labels, nsp = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, tt, am, labels=labels, next_sentence_label=nsp)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = model(ids, tt, am, labels=labels, next_sentence_label=nsp)
    assert abs(out.loss.item() - ref.loss.item()) < 0.1


def test_too_long_sequence_is_a_clear_error(model):
    ids = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        model(ids)
