"""`bertscale eval` reports figures that mean what they say (issue 15): [MASK]-only accuracy as the
headline, all-positions accuracy beside it, baselines on the same positions (a unigram fitted on the
training split, not on the held-out targets), on shards or raw text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale import cli
from bertscale.evaluate import evaluate, evaluate_text
from bertscale.hf_format import save_hf
from bertscale.loader import eval_batches
from bertscale.masking import IGNORE_INDEX, default_max_predictions
from bertscale.model import BertConfig, BertForPreTraining
from bertscale.shard_format import SampleRules, load_manifest, read_shard, shard_paths
from bertscale.shards import build_shards, is_valid_document
from bertscale.tokenizer import tokenizer_info
from conftest import make_words


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


def _held_out_targets(shard_dir, info, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of the valid split's targets at the [MASK] positions and at all target positions,
    recounted here from the batches evaluation masks."""
    manifest = load_manifest(shard_dir)
    mask_only, every = np.zeros(info.vocab_size), np.zeros(info.vocab_size)
    for batch in eval_batches(shard_dir, split="valid", batch_size=32, seed=seed, tokenizer=info,
                              max_predictions=default_max_predictions(int(manifest["seq_len"]))):
        target = batch["labels"] != IGNORE_INDEX
        np.add.at(mask_only, batch["labels"][target & (batch["input_ids"] == info.mask_id)].numpy(), 1)
        np.add.at(every, batch["labels"][target].numpy(), 1)
    return mask_only, every


def _train_token_counts(shard_dir, info) -> np.ndarray:
    """Counts of every non-special token of every training sample, read here shard by shard."""
    manifest = load_manifest(shard_dir)
    counts = np.zeros(info.vocab_size)
    for url, entry in zip(shard_paths(manifest, shard_dir, "train"), manifest["splits"]["train"]["shards"]):
        shard = read_shard(url, SampleRules.of(manifest), entry)
        for i in range(len(shard)):
            np.add.at(counts, shard.ids(i), 1)
    counts[list(info.special_ids)] = 0
    return counts


def _entropy(hist: np.ndarray) -> float:
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def skewed_shards(tokenizer_dir, tmp_path_factory) -> Path:
    """Shards whose training documents use one half of the words and whose held-out documents the other,
    mostly: the held-out targets' own histogram is far from anything training text teaches."""
    words = make_words(np.random.default_rng(0), 300)  # the words the session tokenizer was trained on
    rng = np.random.default_rng(5)
    tmp = tmp_path_factory.mktemp("skewed")
    docs = []
    for i in range(300):
        # build_shards splits documents by this hash of (file index, document index), so each is written
        # knowing the split it will land in
        own = words[150:] if is_valid_document(f"0/{i}", 3, 0.2) else words[:150]
        docs.append(" ".join(" ".join(rng.choice(own if rng.random() < 0.9 else words, size=10)).capitalize() + "."
                             for _ in range(4)))
    (tmp / "skewed.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    build_shards([tmp / "skewed.txt"], tokenizer_dir, seq_len=64, out_dir=tmp / "shards", samples_per_shard=40,
                 seed=3, valid_fraction=0.2, show_progress=False)
    return tmp / "shards"


def test_mlm_baselines_are_a_smoothed_unigram_fitted_on_the_training_split(copy_model, skewed_shards,
                                                                           tokenizer_dir):
    info = tokenizer_info(tokenizer_dir)
    r = evaluate(copy_model, skewed_shards, split="valid", batch_size=16)
    counts = _train_token_counts(skewed_shards, info)
    log_q = np.log((counts + 1) / (counts.sum() + info.vocab_size))  # add-one over the vocabulary
    mask_only, every = _held_out_targets(skewed_shards, info, seed=0)
    assert r["eval_masked_tokens"] == mask_only.sum() and r["eval_targets_all_positions"] == every.sum()
    for suffix, hist in (("", mask_only), ("_all_positions", every)):
        cross_entropy = float(-(hist * log_q).sum() / hist.sum())
        assert r[f"baseline_mlm_loss{suffix}"] == pytest.approx(cross_entropy, rel=1e-9)
        assert r[f"baseline_mlm_accuracy{suffix}"] == pytest.approx(hist[counts.argmax()] / hist.sum(), rel=1e-9)
        # not the oracle the held-out targets' own histogram would be
        assert r[f"baseline_mlm_loss{suffix}"] > _entropy(hist) + 0.5
        assert r[f"baseline_mlm_accuracy{suffix}"] < hist.max() / hist.sum()
    assert "'train' split of" in r["baseline_fitted_on"] and str(skewed_shards) in r["baseline_fitted_on"]


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
    mask_only, _ = _held_out_targets(shard_dir, info, seed=0)
    assert r["eval_masked_tokens"] == mask_only.sum()
    counts = _train_token_counts(shard_dir, info)
    assert r["baseline_mlm_accuracy"] == pytest.approx(mask_only[counts.argmax()] / mask_only.sum())
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
    # no training split to fit a unigram on: the baselines are the held-out targets' own, and say so
    assert "no training split" in r["baseline_fitted_on"]
    again = evaluate_text(copy_model, [corpus_file], seq_len=64, batch_size=7, seed=3)
    assert again.pop("baseline_fitted_on") == r["baseline_fitted_on"]
    figures = {k: v for k, v in r.items() if k != "baseline_fitted_on"}
    assert again == pytest.approx(figures, rel=1e-6)  # batching changes only float summation order
    assert {k: v for k, v in again.items() if "loss" not in k} == {k: v for k, v in figures.items() if "loss" not in k}
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
