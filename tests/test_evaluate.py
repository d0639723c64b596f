"""`bertscale eval` reports figures that mean what they say (issue 15): [MASK]-only accuracy as the
headline, all-positions accuracy beside it, baselines on the same positions, on shards or raw text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bertscale import cli
from bertscale.evaluate import evaluate, evaluate_text
from bertscale.hf_format import save_hf
from bertscale.loader import eval_batches
from bertscale.masking import IGNORE_INDEX, default_max_predictions
from bertscale.model import BertConfig, BertForPreTraining
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info


@pytest.fixture(scope="module")
def copy_model(tokenizer_dir, tmp_path_factory):
    """A real BERT whose weights make it predict, at every position, the token it was given there.

    Position and segment embeddings and every sub-layer's output projection are zero, so each
    position carries its own (normalised) random word embedding through the residual stream; the
    head's transform is a large identity, so the tied decoder scores that embedding highest.
    """
    info = tokenizer_info(tokenizer_dir)
    config = BertConfig(vocab_size=info.vocab_size, hidden_size=256, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertForPreTraining(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_embeddings" in name or "token_type_embeddings" in name or "output.dense" in name:
                p.zero_()
            elif name == "cls.predictions.transform.dense.weight":
                p.copy_(10 * torch.eye(config.hidden_size))
            elif name in ("cls.predictions.transform.dense.bias", "cls.predictions.bias"):
                p.zero_()
    out = save_hf(model.state_dict(), config, tmp_path_factory.mktemp("copy_model"), tokenizer_dir)
    # it really copies: every token of a sequence is its own top-1 prediction
    ids = torch.tensor([[info.cls_id, *range(5, 60), info.sep_id]])
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, token_type_ids=torch.zeros_like(ids)).prediction_logits
    assert torch.equal(logits.argmax(-1), ids)
    return out


def _mask_only_recount(shard_dir, info, seed: int) -> tuple[int, int, float]:
    """(count, most frequent target's count, unigram entropy) over the [MASK] positions, counted here."""
    manifest = load_manifest(shard_dir)
    counts: dict[int, int] = {}
    for batch in eval_batches(shard_dir, split="valid", batch_size=32, seed=seed, tokenizer=info,
                              max_predictions=default_max_predictions(int(manifest["seq_len"]))):
        at = (batch["labels"] != IGNORE_INDEX) & (batch["input_ids"] == info.mask_id)
        for t in batch["labels"][at].tolist():
            counts[t] = counts.get(t, 0) + 1
    n = sum(counts.values())
    p = np.array(list(counts.values())) / n
    return n, max(counts.values()), float(-(p * np.log(p)).sum())


def test_a_model_that_copies_its_input_scores_zero_on_mask_only_and_a_tenth_on_all_positions(
        copy_model, shard_dir, tokenizer_dir):
    r = evaluate(copy_model, shard_dir, split="valid", batch_size=16)
    # at [MASK] it predicts [MASK], never a target; elsewhere it copies: right on the ~10% of targets
    # left unchanged, wrong on the ~10% replaced at random
    assert r["eval_mlm_accuracy"] == 0.0
    assert 0.06 < r["eval_mlm_accuracy_all_positions"] < 0.14, r
    assert r["eval_masked_tokens"] < r["eval_targets_all_positions"]
    assert 0.7 < r["eval_masked_tokens"] / r["eval_targets_all_positions"] < 0.9
    # baselines on the same [MASK] positions as the headline figure, recounted from the batches
    info = tokenizer_info(tokenizer_dir)
    n, top, entropy = _mask_only_recount(shard_dir, info, seed=0)
    assert r["eval_masked_tokens"] == n
    assert r["baseline_mlm_accuracy"] == pytest.approx(top / n)
    assert r["baseline_mlm_loss"] == pytest.approx(entropy, rel=1e-6)
    assert 0 < r["baseline_mlm_accuracy_all_positions"] < 1 and r["baseline_mlm_loss_all_positions"] > 0
    assert 0.5 <= r["baseline_nsp_accuracy"] <= 1 and 0 <= r["eval_nsp_accuracy"] <= 1
    assert r["eval_samples"] > 0
    json.dumps(r)


def test_text_eval_of_the_copy_model_is_deterministic_and_counts_only_mask(copy_model, corpus_file):
    r = evaluate_text(copy_model, [corpus_file], seq_len=64, batch_size=16, seed=3)
    assert r["eval_mlm_accuracy"] == 0.0
    assert 0.06 < r["eval_mlm_accuracy_all_positions"] < 0.14, r
    assert r["eval_documents"] == 400 and r["eval_sequences"] >= 400
    assert "eval_nsp_accuracy" not in r  # windows of one document have no pair label
    again = evaluate_text(copy_model, [corpus_file], seq_len=64, batch_size=7, seed=3)
    assert again == pytest.approx(r, rel=1e-6)  # batching changes only float summation order
    assert {k: v for k, v in again.items() if "loss" not in k} == {k: v for k, v in r.items() if "loss" not in k}
    whole_file = evaluate_text(copy_model, [corpus_file], seq_len=64, batch_size=16, seed=3, documents="file")
    assert whole_file["eval_documents"] == 1 and whole_file["eval_sequences"] < r["eval_sequences"]
    other = evaluate_text(copy_model, [corpus_file], seq_len=64, batch_size=16, seed=4)
    assert other["eval_mlm_accuracy_all_positions"] != r["eval_mlm_accuracy_all_positions"]


def test_eval_cli_on_text_prints_one_json_line_and_refuses_a_window_longer_than_the_model(
        copy_model, corpus_file, capsys):
    assert cli.main(["eval", "--model", str(copy_model), "--text", str(corpus_file), "--seq-len", "64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_masked_tokens"] > 0 and "baseline_mlm_accuracy" in printed
    assert cli.main(["eval", "--model", str(copy_model), "--text", str(corpus_file), "--seq-len", "512"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --data or --text, not both
        cli.main(["eval", "--model", str(copy_model), "--text", str(corpus_file), "--data", "x"])
