"""Masked-language-model masking, applied on the fly (a pure function of seed, epoch, sample id)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
"""Label value for positions that are not prediction targets (PyTorch's CrossEntropy default)."""


def default_max_predictions(seq_len: int, mask_prob: float = 0.15) -> int:
    """BERT's caps: 20 at seq_len 128 and 80 at 512 (seq_len x 5/32 at mask_prob 0.15), scaled with mask_prob."""
    return max(1, round(seq_len * mask_prob * 25 / 24))


def _nth_non_special(k: np.ndarray, specials: np.ndarray) -> np.ndarray:
    """Map k in [0, vocab - n_specials) to the k-th id that is not special (specials sorted)."""
    out = k.copy()
    for s in specials:
        out += out >= s
    return out


def _whole_words(candidates: np.ndarray, continuation: np.ndarray) -> list[np.ndarray]:
    """Group candidate positions into words: a word starts at a piece without '##' or after a gap."""
    if len(candidates) == 0:
        return []
    starts = ~continuation | np.concatenate([[True], np.diff(candidates) != 1])
    return np.split(candidates, np.flatnonzero(starts)[1:])


def _mask(
    inputs: np.ndarray,
    rng: np.random.Generator,
    is_special: np.ndarray,
    specials: np.ndarray,
    vocab_size: int,
    mask_id: int,
    mask_prob: float,
    max_predictions: int | None,
    is_continuation: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.full_like(inputs, IGNORE_INDEX)
    candidates = np.flatnonzero(~is_special)
    if len(candidates) == 0 or mask_prob <= 0:
        return inputs, labels
    n = max(1, int(len(candidates) * mask_prob + 0.5))
    if max_predictions is not None:
        n = min(n, max_predictions)
    n = min(n, len(candidates))
    if is_continuation is None:
        picked = np.sort(rng.choice(candidates, size=n, replace=False))
    else:
        # Original BERT: visit words in random order, take a word only if all its pieces fit.
        words = _whole_words(candidates, is_continuation[candidates])
        chosen, total = [], 0
        for w in rng.permutation(len(words)):
            if total + len(words[w]) <= n:
                chosen.append(words[w])
                total += len(words[w])
                if total == n:
                    break
        if not chosen:  # every word is longer than the budget: take the smallest one whole
            chosen = [min(words, key=len)]
        picked = np.sort(np.concatenate(chosen))
        n = len(picked)
    labels[picked] = inputs[picked]
    action = rng.random(n)
    to_mask = picked[action < 0.8]
    to_random = picked[(action >= 0.8) & (action < 0.9)]
    inputs[to_mask] = mask_id
    if len(to_random):
        in_vocab = specials[(specials >= 0) & (specials < vocab_size)]
        k = rng.integers(0, vocab_size - len(in_vocab), size=len(to_random))
        inputs[to_random] = _nth_non_special(k, in_vocab)
    return inputs, labels


def mask_tokens(
    ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    sample_id: int,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int] | np.ndarray,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    continuation_ids: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (input ids, labels) as int64 with BERT's 80/10/10 replacement.

    max(1, round(n * mask_prob)) of the n non-special positions become targets (capped at
    max_predictions); of those 80% turn into [MASK], 10% into a random non-special token and 10%
    stay. Labels are -100 elsewhere. Same (seed, epoch, sample_id) -> same result.

    With ``continuation_ids`` (the ids of '##' pieces) masking is whole-word: all pieces of a
    chosen word become targets together, and words that would overshoot the count are passed over.
    """
    rng = np.random.default_rng([seed, epoch, sample_id])
    inputs = np.asarray(ids, dtype=np.int64).copy()
    specials = np.unique(np.asarray(special_ids, dtype=np.int64))
    cont = None
    if continuation_ids is not None:
        cont = np.isin(inputs, np.asarray(continuation_ids, dtype=np.int64))
    return _mask(inputs, rng, np.isin(inputs, specials), specials, vocab_size, mask_id, mask_prob,
                 max_predictions, cont)


class Masker:
    """``mask_tokens`` for one (tokenizer, seed, epoch) with lookup tables built once (picklable)."""

    def __init__(self, tok, *, seed: int, epoch: int, mask_prob: float = 0.15, max_predictions: int | None = None,
                 whole_word: bool = False):
        self.seed, self.epoch, self.mask_prob, self.max_predictions = seed, epoch, mask_prob, max_predictions
        self.vocab_size, self.mask_id = tok.vocab_size, tok.mask_id
        self.specials = np.unique(np.asarray(tok.special_ids, dtype=np.int64))
        size = max(tok.vocab_size, int(self.specials.max()) + 1)
        self.special_lut = np.zeros(size + 1, dtype=bool)
        self.special_lut[self.specials] = True
        self.cont_lut = None
        if whole_word:
            self.cont_lut = np.zeros(size + 1, dtype=bool)
            self.cont_lut[np.asarray(tok.continuation_ids, dtype=np.int64)] = True

    def __call__(self, ids: np.ndarray, sample_id: int) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.asarray(ids, dtype=np.int64).copy()
        lut_index = np.minimum(inputs, len(self.special_lut) - 1)  # out-of-vocab ids are never special
        is_special = self.special_lut[lut_index] & (inputs < len(self.special_lut) - 1)
        cont = None
        if self.cont_lut is not None:
            cont = self.cont_lut[lut_index] & (inputs < len(self.cont_lut) - 1)
        rng = np.random.default_rng([self.seed, self.epoch, sample_id])
        return _mask(inputs, rng, is_special, self.specials, self.vocab_size, self.mask_id, self.mask_prob,
                     self.max_predictions, cont)
