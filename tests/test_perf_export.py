"""The fast path against the peer itself: a model built with every lever (vocabulary padded to 64 included)
exports to weights `transformers` loads with no key or shape complaints, and in training mode produces
Hugging Face's loss and gradients on the same batch (forward parity alone would miss a wrong backward)."""

import pytest
import torch

from bertscale.hf_format import save_hf
from bertscale.model import BertConfig, BertForPreTraining, PerfOptions

transformers = pytest.importorskip("transformers")

V, S, B = 503, 16, 3


def fast_model() -> BertForPreTraining:
    cfg = BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64,
                     # so small that nothing drops, yet the training-only CPU paths (fast dropout, matmul attention) run
                     hidden_dropout_prob=1e-9, attention_probs_dropout_prob=1e-9)
    torch.manual_seed(2)
    m = BertForPreTraining(cfg, PerfOptions(pad_vocab_multiple=64))
    with torch.no_grad():  # biases and LayerNorms off their init so a mis-copied one shows
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        m.bert.embeddings.word_embeddings.weight[V:].zero_()
        m.cls.predictions.bias[V:].zero_()
    return m


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, V, (B, S), generator=g)
    tt = torch.zeros(B, S, dtype=torch.long)
    tt[:, 7:] = 1
    am = torch.ones(B, S, dtype=torch.long)
    am[2, 10:] = 0
    ids[am == 0] = 0
    tt[am == 0] = 0
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(B, S, generator=g) < 0.25) & (am == 1)
    labels[pick] = ids[pick]
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels,
                next_sentence_label=torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("padded", [True, False])
def test_fast_path_trains_like_transformers(tmp_path, padded):
    ours = fast_model()
    assert ours.bert.embeddings.word_embeddings.num_embeddings == 512
    out = save_hf(ours.state_dict(), ours.config, tmp_path / "hf")
    peer, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert peer.config.vocab_size == V and peer.bert.embeddings.word_embeddings.num_embeddings == V

    data = batch()
    if not padded:
        data["attention_mask"] = torch.ones_like(data["attention_mask"])  # lets skip_full_mask drop the mask
    ours.train()
    peer.train()
    loss = ours(**data).loss
    peer_loss = peer(**data).loss
    torch.testing.assert_close(loss, peer_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    peer_loss.backward()
    theirs = dict(peer.named_parameters())
    for name, p in ours.named_parameters():
        grad = p.grad[:V] if p.shape[0] == 512 else p.grad
        torch.testing.assert_close(grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
        if p.shape[0] == 512:  # padding rows are no tokens: no gradient reaches them
            assert not p.grad[V:].any(), name
