"""`bertscale eval`: masked-LM and NSP quality of a converted model on held-out shards.

Masks are the deterministic epoch-0 masks of the shards' sample ids, made exactly as training
makes them (``loader.eval_batches``: the same cap on predictions per sample,
``masking.default_max_predictions``, and optionally whole-word masking), so two evaluations of the
same data are comparable and the figures measure the task the model was trained on. Two
baselines say what a model that learned nothing scores: always predicting the most frequent
target token (MLM), and always predicting the more frequent pair label (NSP/SOP).
"""

from __future__ import annotations

import os

import torch

from bertscale.hf_format import load_hf
from bertscale.loader import eval_batches
from bertscale.masking import IGNORE_INDEX, default_max_predictions
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info


@torch.inference_mode()
def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "valid",
             batch_size: int = 32, max_batches: int | None = None, seed: int = 0,
             mask_prob: float = 0.15, max_predictions: int | None = None,
             whole_word_masking: bool = False) -> dict[str, float]:
    """MLM loss/accuracy, NSP accuracy and both majority baselines, as a flat dict.

    ``data_dir`` is a shard directory or URL prefix; ``max_predictions`` defaults to training's cap
    for the shards' sequence length.
    """
    model = load_hf(model_dir).eval()
    info = tokenizer_info(model_dir)
    manifest = load_manifest(data_dir, expect_fingerprint=info.fingerprint)
    if max_predictions is None:
        max_predictions = default_max_predictions(int(manifest["seq_len"]), mask_prob)
    loss_sum = correct = count = nsp_correct = nsp_count = 0.0
    target_counts = torch.zeros(info.vocab_size, dtype=torch.long)
    label_counts = torch.zeros(2, dtype=torch.long)
    for batch in eval_batches(data_dir, split=split, batch_size=batch_size, seed=seed, tokenizer=info,
                              max_batches=max_batches, mask_prob=mask_prob, max_predictions=max_predictions,
                              whole_word_masking=whole_word_masking):
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                    next_sentence_label=batch["next_sentence_label"])
        n = int(out.mlm_count)
        loss_sum += float(out.mlm_loss) * n
        correct += int(out.mlm_correct)
        count += n
        nsp_correct += int(out.nsp_correct)
        nsp_count += int(out.nsp_count)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        target_counts += torch.bincount(targets, minlength=info.vocab_size)
        label_counts += torch.bincount(batch["next_sentence_label"], minlength=2)
    if count == 0:
        raise ValueError(f"no masked positions in the {split!r} split of {data_dir}; is it empty?")
    return {
        "eval_mlm_loss": loss_sum / count,
        "eval_mlm_accuracy": correct / count,
        "eval_nsp_accuracy": nsp_correct / max(nsp_count, 1),
        "baseline_mlm_accuracy": int(target_counts.max()) / count,
        "baseline_nsp_accuracy": int(label_counts.max()) / max(int(label_counts.sum()), 1),
        "eval_masked_tokens": int(count),
        "eval_samples": int(nsp_count),
    }
