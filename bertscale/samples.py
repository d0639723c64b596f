"""BERT sentence-pair samples ``[CLS] A [SEP] B [SEP]`` with next-sentence labels (pure numpy).

The logic follows the original BERT data generator: chunks of consecutive sentences up to a
target length, split at a sentence boundary; half of the time B comes from another document.
One departure: Google's generator makes every one-sentence chunk a random-B pair, so a corpus of
short documents (docstrings, abstracts, one-paragraph pages) came out 72-73 % random-B; here such
a chunk takes the coin like any other and, when it says IsNext, is split inside its sentence (A is
the sentence's start, B its continuation), which keeps the labels near 50 % on any corpus.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IS_NEXT = 0
"""B really follows A (Hugging Face's ``next_sentence_label`` convention)."""
IS_RANDOM = 1
"""B was taken from another document."""
IN_ORDER, SWAPPED = 0, 1
"""Sentence-order prediction labels (ALBERT): A and B in their order in the text, or swapped."""
MIN_SEQ_LEN = 5


@dataclass
class Sample:
    """One pretraining pair. Token type is 0 for positions < a_len, 1 after."""

    ids: np.ndarray
    """int32 ``[CLS] A [SEP] B [SEP]``."""
    a_len: int
    """Length of ``[CLS] A [SEP]``."""
    nsp_label: int


class _Draws:
    """Uniform draws from a numpy Generator taken a block at a time.

    One ``Generator`` call costs microseconds, as much as building a sample's arrays; a sample
    needs about six draws, so drawing them one by one was a third of the shard builder's time.
    Still a pure function of the generator's seed.
    """

    _BLOCK = 4096

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self._buf: list[float] = []

    def random(self) -> float:
        """A float in [0, 1)."""
        if not self._buf:
            self._buf = self.rng.random(self._BLOCK).tolist()
        return self._buf.pop()

    def below(self, n: int) -> int:
        """An integer in [0, n), n >= 1."""
        return min(int(self.random() * n), n - 1)

    def heads(self, n: int) -> int:
        """How many of n fair coin flips come up heads."""
        return int(self.rng.binomial(n, 0.5)) if n > 8 else sum(self.random() < 0.5 for _ in range(n))


def truncation_counts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """How many tokens to drop from A and B: always from the longer one (B on ties)."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, 0
    drop_a = min(max(len_a - len_b, 0), excess)
    drop_b = min(max(len_b - len_a, 0), excess - drop_a)
    rest = excess - drop_a - drop_b
    # Lengths are now equal; removal alternates B, A, B, ...
    return drop_a + rest // 2, drop_b + (rest + 1) // 2


def _drop(tokens: np.ndarray, n: int, rng: _Draws) -> np.ndarray:
    """Remove n tokens, each from the front or the back with probability 1/2."""
    if n == 0:
        return tokens
    front = rng.heads(n)
    return tokens[front : len(tokens) - (n - front)]


class Documents(Protocol):
    """Random access to the documents random B segments are drawn from (a list, or the build's store).

    Every document has at least one sentence and every sentence at least one token.
    """

    def __len__(self) -> int: ...

    def sentence_count(self, doc: int) -> int: ...

    def sentence(self, doc: int, index: int) -> np.ndarray: ...


class DocumentList:
    """``Documents`` over an in-memory list of documents (lists of sentence id arrays)."""

    def __init__(self, docs: Sequence[Sequence[np.ndarray]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def sentence_count(self, doc: int) -> int:
        return len(self.docs[doc])

    def sentence(self, doc: int, index: int) -> np.ndarray:
        return self.docs[doc][index]


def _random_b(source: Documents, own: int, target: int, limit: int, rng: _Draws) -> np.ndarray:
    """Consecutive sentences of a random other document, from a random sentence on, about target tokens."""
    other = rng.below(len(source) - 1)
    other += other >= own
    n = source.sentence_count(other)
    parts, length = [], 0
    for j in range(rng.below(n), n):
        for piece in split_long_sentences([np.asarray(source.sentence(other, j))], limit):
            parts.append(piece)
            length += len(piece)
            if length >= target:
                return np.concatenate(parts)
    return np.concatenate(parts)


def _pack(a: np.ndarray, b: np.ndarray, label: int, cls_id: int, sep_id: int) -> Sample:
    ids = np.empty(len(a) + len(b) + 3, dtype=np.int32)
    ids[0] = cls_id
    ids[1 : 1 + len(a)] = a
    ids[1 + len(a)] = sep_id
    ids[2 + len(a) : -1] = b
    ids[-1] = sep_id
    return Sample(ids=ids, a_len=len(a) + 2, nsp_label=label)


def build_samples(
    documents: Sequence[Sequence[np.ndarray]],
    seq_len: int,
    rng: np.random.Generator,
    cls_id: int,
    sep_id: int,
    short_seq_prob: float = 0.1,
    sentence_order: bool = False,
    negatives: Documents | None = None,
    first_index: int = 0,
) -> Iterator[Sample]:
    """Yield sentence-pair samples of at most seq_len tokens from tokenized documents.

    ``documents`` holds lists of sentences (id arrays without specials). Random B segments come
    from ``negatives``, a ``Documents`` source in which ``documents[k]`` is document
    ``first_index + k`` (never its own B): the whole corpus's split when building shards. Without
    it they come from the other ``documents``. With a single document to draw from, every sample
    is a real continuation. A one-sentence chunk whose pair is a continuation is split inside the
    sentence (a single-token sentence can only take a random B). A sentence
    longer than half the token budget is first cut into pieces that fit, so that no text is lost to
    truncation. With ``sentence_order`` B always follows A in the text and half of the pairs are
    swapped (label ``SWAPPED``) instead of taking a random B.
    """
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len {seq_len} is too short for [CLS] A [SEP] B [SEP]; use >= {MIN_SEQ_LEN}")
    max_tokens = seq_len - 3
    limit = max(1, max_tokens // 2)
    docs = [split_long_sentences([np.asarray(s) for s in doc if len(s) > 0], limit) for doc in documents]
    if negatives is None:  # positions in the filtered list are the documents' indices
        docs = [d for d in docs if d]
        negatives, owners = DocumentList(docs), list(range(len(docs)))
    else:
        owners = [first_index + k for k, d in enumerate(docs) if d]
        docs = [d for d in docs if d]
    rng = _Draws(rng)
    if sentence_order:
        yield from _sop_samples(docs, max_tokens, rng, cls_id, sep_id, short_seq_prob)
        return
    can_draw = len(negatives) >= 2
    for own, doc in zip(owners, docs):
        chunk: list[np.ndarray] = []
        length = 0
        target = _target_length(max_tokens, short_seq_prob, rng)
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = 1 + rng.below(len(chunk) - 1) if len(chunk) >= 2 else 1
                a = np.concatenate(chunk[:a_end])
                lone_token = len(chunk) == 1 and len(a) < 2  # nothing to split: only a random B pairs it
                if can_draw and (lone_token or rng.random() < 0.5):
                    b = _random_b(negatives, own, max(1, target - len(a)), limit, rng)
                    label = IS_RANDOM
                    i -= len(chunk) - a_end  # unused sentences go back to the document
                elif len(chunk) >= 2:
                    b = np.concatenate(chunk[a_end:])
                    label = IS_NEXT
                elif len(a) >= 2:
                    cut = 1 + rng.below(len(a) - 1)
                    a, b = a[:cut], a[cut:]
                    label = IS_NEXT
                else:
                    a = b = None  # one single-token sentence and nothing to pair it with
                if a is not None and b is not None:
                    drop_a, drop_b = truncation_counts(len(a), len(b), max_tokens)
                    a, b = _drop(a, drop_a, rng), _drop(b, drop_b, rng)
                    yield _pack(a, b, label, cls_id, sep_id)
                chunk, length = [], 0
                target = _target_length(max_tokens, short_seq_prob, rng)
            i += 1


def _target_length(max_tokens: int, short_seq_prob: float, rng: _Draws) -> int:
    if rng.random() < short_seq_prob:
        return 2 + rng.below(max_tokens - 1)
    return max_tokens


def split_long_sentences(sentences: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """Cut every sentence longer than limit into consecutive, nearly equal pieces of at most limit."""
    out: list[np.ndarray] = []
    for s in sentences:
        if len(s) <= limit:
            out.append(s)
        else:
            out.extend(np.array_split(s, -(-len(s) // limit)))
    return out


def _sop_samples(docs: list[list[np.ndarray]], max_tokens: int, rng: _Draws, cls_id: int,
                 sep_id: int, short_seq_prob: float) -> Iterator[Sample]:
    for doc in docs:
        chunk: list[np.ndarray] = []
        length = 0
        target = _target_length(max_tokens, short_seq_prob, rng)
        for i, sentence in enumerate(doc):
            chunk.append(sentence)
            length += len(sentence)
            if i == len(doc) - 1 or length >= target:
                if len(chunk) >= 2:
                    a_end = 1 + rng.below(len(chunk) - 1)
                    a, b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
                else:
                    a = chunk[0]
                    if len(a) < 2:
                        a = None
                    else:
                        cut = 1 + rng.below(len(a) - 1)
                        a, b = a[:cut], a[cut:]
                if a is not None:
                    drop_a, drop_b = truncation_counts(len(a), len(b), max_tokens)
                    a, b = _drop(a, drop_a, rng), _drop(b, drop_b, rng)
                    label = SWAPPED if rng.random() < 0.5 else IN_ORDER
                    if label == SWAPPED:
                        a, b = b, a
                    yield _pack(a, b, label, cls_id, sep_id)
                chunk, length = [], 0
                target = _target_length(max_tokens, short_seq_prob, rng)
