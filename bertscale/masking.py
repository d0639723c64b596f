"""Masked-language-model masking, applied on the fly (a pure function of seed, epoch, sample id)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
"""Label value for positions that are not prediction targets (PyTorch's CrossEntropy default)."""


def _nth_non_special(k: np.ndarray, specials: np.ndarray) -> np.ndarray:
    """Map k in [0, vocab - n_specials) to the k-th id that is not special (specials sorted)."""
    out = k.copy()
    for s in specials:
        out += out >= s
    return out


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
) -> tuple[np.ndarray, np.ndarray]:
    """Return (input ids, labels) as int64 with BERT's 80/10/10 replacement.

    max(1, round(n * mask_prob)) of the n non-special positions become targets (capped at
    max_predictions); of those 80% turn into [MASK], 10% into a random non-special token and 10%
    stay. Labels are -100 elsewhere. Same (seed, epoch, sample_id) -> same result.
    """
    rng = np.random.default_rng([seed, epoch, sample_id])
    inputs = np.asarray(ids, dtype=np.int64).copy()
    labels = np.full_like(inputs, IGNORE_INDEX)
    specials = np.unique(np.asarray(special_ids, dtype=np.int64))
    candidates = np.flatnonzero(~np.isin(inputs, specials))
    if len(candidates) == 0 or mask_prob <= 0:
        return inputs, labels
    n = max(1, int(len(candidates) * mask_prob + 0.5))
    if max_predictions is not None:
        n = min(n, max_predictions)
    n = min(n, len(candidates))
    picked = np.sort(rng.choice(candidates, size=n, replace=False))
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
