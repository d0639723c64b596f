"""`bertscale eval`: masked-LM and NSP quality of a converted model on held-out shards.

Masks are the deterministic epoch-0 masks of the shards' sample ids, so two evaluations of
the same data are comparable. The baseline is the accuracy of always predicting the most
frequent target token of the evaluated positions: a model that learned nothing scores at
most that.
"""

from __future__ import annotations

import math
import os

import torch

from bertscale.hf_format import load_hf
from bertscale.loader import eval_batches
from bertscale.model import IGNORE_INDEX
from bertscale.shards import load_manifest
from bertscale.tokenizer import tokenizer_info


@torch.inference_mode()
def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "valid",
             batch_size: int = 32, max_batches: int | None = None, seed: int = 0,
             mask_prob: float = 0.15) -> dict[str, float]:
    """MLM loss/accuracy, NSP accuracy and the most-frequent-token baseline, as a flat dict."""
    model = load_hf(model_dir).eval()
    info = tokenizer_info(model_dir)
    manifest = load_manifest(data_dir, expect_fingerprint=info.fingerprint)
    max_pred = max(1, math.ceil(manifest["seq_len"] * mask_prob))
    loss_sum = correct = count = nsp_correct = nsp_count = 0.0
    target_counts = torch.zeros(info.vocab_size, dtype=torch.long)
    for batch in eval_batches(data_dir, split=split, batch_size=batch_size, seed=seed, tokenizer=info,
                              max_batches=max_batches, mask_prob=mask_prob, max_predictions=max_pred):
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
    if count == 0:
        raise ValueError(f"no masked positions in the {split!r} split of {data_dir}; is it empty?")
    return {
        "eval_mlm_loss": loss_sum / count,
        "eval_mlm_accuracy": correct / count,
        "eval_nsp_accuracy": nsp_correct / max(nsp_count, 1),
        "baseline_mlm_accuracy": int(target_counts.max()) / count,
        "eval_masked_tokens": int(count),
        "eval_samples": int(nsp_count),
    }
