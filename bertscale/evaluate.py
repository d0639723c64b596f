"""`bertscale eval`: masked-LM and NSP quality of a converted model, on held-out shards or raw text.

The headline figures count only the positions replaced by [MASK] (``eval_mlm_accuracy``,
``eval_mlm_loss``). BERT's 80/10/10 corruption also leaves 10 % of the targets unchanged (the
model sees the answer) and replaces 10 % with a random token; the figure over all of them is
reported beside it as ``eval_mlm_accuracy_all_positions`` (what Google's ``masked_lm_accuracy``
measures), never in its place. Each figure has a baseline on the same positions, from a model that
ignores the context: a unigram fitted on the *training* split of the same shard directory
(``fit_unigram``: token counts of its first ``UNIGRAM_SAMPLES`` samples, add-one smoothed over the
vocabulary). Its loss is the cross-entropy of that unigram on the held-out targets, its accuracy
that of always predicting the most frequent training token; NSP accuracy has the majority-label
baseline. Without a training split (raw text, or a directory holding only ``valid``) the baselines
fall back to the held-out targets' own histogram, an oracle no model trained elsewhere reaches;
``baseline_fitted_on`` says which one a result used.

Masks are deterministic: on shards, the epoch-0 masks of the sample ids, made exactly as training
makes them (``loader.eval_batches``: the same cap on predictions per sample,
``masking.default_max_predictions``, and optionally whole-word masking); on raw text
(``evaluate_text``), the same masking of consecutive windows of each document, numbered in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bertscale.corpus import CorpusStats, iter_documents
from bertscale.hf_format import load_hf
from bertscale.loader import eval_batches, split_shards
from bertscale.masking import IGNORE_INDEX, Masker, default_max_predictions
from bertscale.packing import attention_mask, pad_rows
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info

Forward = Callable[[dict[str, torch.Tensor]], object]
"""Runs the model on a batch dict and returns its ``PretrainingOutput``."""

_MASK, _REST, _NSP = 0, 3, 6  # offsets of (loss sum, correct, count) in EvalTally.sums
_LABELS = 9  # NSP label counts (2)
_FIXED = 11

UNIGRAM_SAMPLES = 20_000
"""Training samples (the first ones, in manifest order) the unigram baseline is counted on: millions of
tokens at 128-512 per sample, plenty for a unigram, while evaluation never reads a whole corpus."""

HELD_OUT_ORACLE = ("the held-out targets themselves (no training split to fit on): an oracle, lower than "
                   "any context-free model fitted on other text scores")
"""``baseline_fitted_on`` where no training split was there (raw text, a directory holding only ``valid``)."""


@dataclass(frozen=True)
class Unigram:
    """Token counts of training text: the context-free model the MLM baselines predict with."""

    counts: torch.Tensor
    """float64, one count per vocabulary id."""
    fitted_on: str
    """What was counted, for people: reported as ``baseline_fitted_on``."""

    def log_probs(self) -> torch.Tensor:
        """Add-one (Laplace) smoothed over the vocabulary, so a token never seen in training costs a finite
        loss instead of an infinite one."""
        return ((self.counts + 1) / (self.counts.sum() + len(self.counts))).log()


def fit_unigram(data_dir: str | os.PathLike, tokenizer: TokenizerInfo, split: str = "train",
                max_samples: int = UNIGRAM_SAMPLES) -> Unigram | None:
    """Counts of the non-special tokens (the positions masking picks targets from) of the first
    ``max_samples`` samples of ``split``, in manifest order; None when the directory has no such split.

    A damaged shard is skipped with a warning naming it, as evaluation skips one.
    """
    manifest = load_manifest(data_dir, expect_fingerprint=tokenizer.fingerprint)
    if split not in manifest["splits"]:
        return None
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    specials = list(tokenizer.special_ids)
    samples = 0
    for shard in split_shards(manifest, data_dir, split, reader="the unigram baseline"):
        take = min(len(shard), max_samples - samples)
        if take:
            ids = np.concatenate([shard.ids(i) for i in range(take)])
            counts += torch.from_numpy(np.bincount(ids, minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]).double()
        samples += take
        if samples >= max_samples:
            break  # before reading another shard
    counts[specials] = 0
    tokens = int(counts.sum())
    if tokens == 0:
        return None
    return Unigram(counts, f"the {split!r} split of {data_dir} (unigram of {tokens} tokens in its first {samples} "
                           f"samples, add-one smoothed)")


class EvalTally:
    """Sums of one evaluation: loss, correct predictions, count and a target histogram for the
    positions replaced by [MASK] and for the other targets (kept or randomised), and NSP counts.

    ``sums`` is one float64 vector, so ranks combine their tallies with a single all-reduce.
    """

    def __init__(self, vocab_size: int, mask_id: int):
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.sums = torch.zeros(_FIXED + 2 * vocab_size, dtype=torch.float64)

    def score(self, forward: Forward, batch: dict[str, torch.Tensor], counted: bool = True) -> None:
        """Run ``forward`` on the batch (twice: the [MASK] targets, then the others) and add its counts
        unless ``counted`` is False (a rank that runs a forward only to keep collectives in step)."""
        labels, inputs = batch["labels"], batch["input_ids"]
        target = labels != IGNORE_INDEX
        is_mask = target & (inputs == self.mask_id)
        parts = ((_MASK, torch.where(is_mask, labels, IGNORE_INDEX)),
                 (_REST, torch.where(target & ~is_mask, labels, IGNORE_INDEX)))
        for i, (offset, part_labels) in enumerate(parts):
            out = forward({**batch, "labels": part_labels})
            if not counted:
                continue
            n = float(out.mlm_count)
            self.sums[offset:offset + 3] += torch.tensor([float(out.mlm_loss) * n, float(out.mlm_correct), n],
                                                         dtype=torch.float64)
            hist = _FIXED + (i * self.vocab_size)
            targets = part_labels[part_labels != IGNORE_INDEX].cpu()
            self.sums[hist:hist + self.vocab_size] += torch.bincount(targets, minlength=self.vocab_size)[
                :self.vocab_size].double()
            if offset == _MASK and out.nsp_count is not None and int(out.nsp_count) > 0:
                nsp_n = float(out.nsp_count)
                self.sums[_NSP:_NSP + 3] += torch.tensor([float(out.nsp_loss) * nsp_n, float(out.nsp_correct), nsp_n],
                                                         dtype=torch.float64)
                self.sums[_LABELS:_LABELS + 2] += torch.bincount(batch["next_sentence_label"].cpu(), minlength=2)[
                    :2].double()

    @property
    def masked_tokens(self) -> int:
        """Positions replaced by [MASK] so far."""
        return int(self.sums[_MASK + 2])

    def results(self, unigram: Unigram | None) -> dict[str, float]:
        """Model figures and their baselines (keys as logged under TensorBoard's ``eval/``).

        The MLM baselines predict with ``unigram`` (fit it on training data: ``fit_unigram``); with None,
        with the held-out targets' own histogram, an oracle the caller must say it used."""
        s, v = self.sums, self.vocab_size
        mask_hist, rest_hist = s[_FIXED:_FIXED + v], s[_FIXED + v:]
        groups = (("", s[_MASK:_MASK + 3], mask_hist),
                  ("_all_positions", s[_MASK:_MASK + 3] + s[_REST:_REST + 3], mask_hist + rest_hist))
        out: dict[str, float] = {}
        for suffix, (loss_sum, correct, count), hist in groups:
            n = max(count.item(), 1.0)
            out[f"mlm_accuracy{suffix}"] = correct.item() / n
            out[f"mlm_loss{suffix}"] = loss_sum.item() / n
            if unigram is None:
                p = hist[hist > 0] / n
                out[f"baseline_mlm_accuracy{suffix}"] = hist.max().item() / n
                out[f"baseline_mlm_loss{suffix}"] = float(-(p * p.log()).sum())
            else:
                out[f"baseline_mlm_accuracy{suffix}"] = hist[int(unigram.counts.argmax())].item() / n
                out[f"baseline_mlm_loss{suffix}"] = float(-(hist * unigram.log_probs()).sum()) / n
        nsp_loss, nsp_correct, nsp_n = s[_NSP:_NSP + 3].tolist()
        if nsp_n > 0:
            out["nsp_accuracy"] = nsp_correct / nsp_n
            out["baseline_nsp_accuracy"] = s[_LABELS:_LABELS + 2].max().item() / nsp_n
            out["nsp_loss"] = nsp_loss / nsp_n
        return out


def _model_forward(model) -> Forward:
    def forward(batch: dict[str, torch.Tensor]):
        return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"],
                     next_sentence_label=batch.get("next_sentence_label"))
    return forward


def _report(tally: EvalTally, where: str, unigram: Unigram | None) -> dict[str, float | str]:
    """``results`` under the CLI's names: ``eval_*`` for the model, ``baseline_*`` as they are, and
    ``baseline_fitted_on`` saying what the MLM baselines were fitted on."""
    if tally.masked_tokens == 0:
        raise ValueError(f"no position of {where} was replaced by [MASK]; is it empty?")
    results: dict[str, float | str] = {(k if k.startswith("baseline_") else f"eval_{k}"): v
                                       for k, v in tally.results(unigram).items()}
    results["baseline_fitted_on"] = unigram.fitted_on if unigram is not None else HELD_OUT_ORACLE
    results["eval_masked_tokens"] = tally.masked_tokens
    results["eval_targets_all_positions"] = int(tally.sums[_MASK + 2] + tally.sums[_REST + 2])
    return results


@torch.inference_mode()
def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "valid",
             batch_size: int = 32, max_batches: int | None = None, seed: int = 0,
             mask_prob: float = 0.15, max_predictions: int | None = None,
             whole_word_masking: bool = False) -> dict[str, float | str]:
    """MLM loss/accuracy ([MASK]-only and all positions), NSP accuracy and their baselines, as a flat dict.

    ``data_dir`` is a shard directory or URL prefix; ``max_predictions`` defaults to training's cap
    for the shards' sequence length. The MLM baselines are a unigram fitted on its ``train`` split
    (``baseline_fitted_on`` names it; the held-out targets' own histogram when there is none).
    """
    model = load_hf(model_dir).eval()
    info = tokenizer_info(model_dir)
    manifest = load_manifest(data_dir, expect_fingerprint=info.fingerprint)
    if max_predictions is None:
        max_predictions = default_max_predictions(int(manifest["seq_len"]), mask_prob)
    tally = EvalTally(info.vocab_size, info.mask_id)
    forward = _model_forward(model)
    for batch in eval_batches(data_dir, split=split, batch_size=batch_size, seed=seed, tokenizer=info,
                              max_batches=max_batches, mask_prob=mask_prob, max_predictions=max_predictions,
                              whole_word_masking=whole_word_masking):
        tally.score(forward, batch)
    results = _report(tally, f"the {split!r} split of {data_dir}", fit_unigram(data_dir, info))
    results["eval_samples"] = int(tally.sums[_NSP + 2])
    return results


def text_windows(paths: Sequence[str | os.PathLike], model_dir: str | os.PathLike, seq_len: int,
                 stats: CorpusStats | None = None, documents: str = "blank-lines") -> Iterator[np.ndarray]:
    """``[CLS] piece... [SEP]`` id arrays of at most ``seq_len``: each document (read as ``bertscale
    shards --documents`` reads it) tokenized whole and cut into consecutive windows; the last may be
    shorter."""
    info = tokenizer_info(model_dir)
    tok = load_tokenizer(model_dir)
    width = seq_len - 2
    for doc in iter_documents(paths, stats, documents):
        ids = np.concatenate([np.asarray(e.ids, dtype=np.int64)
                              for e in tok.encode_batch(doc, add_special_tokens=False)])
        for start in range(0, len(ids), width):
            yield np.concatenate([[info.cls_id], ids[start:start + width], [info.sep_id]])


def _text_batches(windows: Iterator[np.ndarray], info: TokenizerInfo, masker: Masker,
                  batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    def batch_of(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        inputs = torch.from_numpy(pad_rows([r[0] for r in rows], info.pad_id))
        labels = torch.from_numpy(pad_rows([r[1] for r in rows], IGNORE_INDEX))
        attention = torch.from_numpy(attention_mask([len(r[0]) for r in rows], inputs.shape[1]))
        return {"input_ids": inputs, "token_type_ids": torch.zeros_like(inputs), "attention_mask": attention,
                "labels": labels}

    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for sample_id, window in enumerate(windows):
        rows.append(masker(window, sample_id))
        if len(rows) == batch_size:
            yield batch_of(rows)
            rows = []
    if rows:
        yield batch_of(rows)


@torch.inference_mode()
def evaluate_text(model_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], seq_len: int = 128,
                  batch_size: int = 32, seed: int = 0, mask_prob: float = 0.15, max_predictions: int | None = None,
                  whole_word_masking: bool = False, documents: str = "blank-lines") -> dict[str, float | str]:
    """Masked-LM figures of a converted model on raw text files, without building shards.

    Documents are read as for ``bertscale shards`` (.txt: blank lines between documents, or one
    document per file with ``documents="file"``; .jsonl: a ``text`` field per line), each cut into consecutive windows of ``seq_len`` tokens and masked as
    training masks (``max_predictions`` defaults to training's cap for ``seq_len``). The same
    files, seed and options give the same figures. There is no training split to fit the unigram
    baselines on, so they are the held-out targets' own histogram (``baseline_fitted_on`` says so).
    """
    model = load_hf(model_dir).eval()
    if not 3 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is outside 3..{model.config.max_position_embeddings} "
                         f"(the model's max_position_embeddings in {model_dir}/config.json)")
    info = tokenizer_info(model_dir)
    if max_predictions is None:
        max_predictions = default_max_predictions(seq_len, mask_prob)
    masker = Masker(info, seed=seed, epoch=0, mask_prob=mask_prob, max_predictions=max_predictions,
                    whole_word=whole_word_masking)
    tally = EvalTally(info.vocab_size, info.mask_id)
    forward = _model_forward(model)
    stats = CorpusStats()
    windows = 0
    for batch in _text_batches(text_windows(paths, model_dir, seq_len, stats, documents), info, masker,
                               batch_size):
        tally.score(forward, batch)
        windows += len(batch["input_ids"])
    results = _report(tally, ", ".join(str(p) for p in paths), None)
    results.update(eval_documents=stats.documents, eval_sequences=windows)
    return results
