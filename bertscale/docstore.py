"""The shard builder's tokenized document store: every document of the corpus, by split, on disk.

The builder tokenizes the corpus once into the store, then pairs sentences from it: positives
from a document's own sentences, random B segments from any other document of the same split in
the whole corpus. A store is three flat files per split, read through memory maps so that every
build process shares one copy in the page cache:

- ``{split}.tok``: the token ids of every sentence, back to back (the shards' ids dtype);
- ``{split}.sent``: int64 offsets into ``.tok``, one per sentence plus the end;
- ``{split}.doc``: int64 offsets into ``.sent``, one per document plus the end.

Groups of input files are tokenized in parallel into *parts* (the same layout, with int32 lengths
instead of offsets, written as they are read) and then joined in input order, so the store does not
depend on how the files were grouped. Documents and sentences are never empty.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from bertscale.shard_format import SPLITS

_COPY_BLOCK = 1 << 24


class PartWriter:
    """One group's documents, appended as they are tokenized; a record written by the caller marks it done."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.dtype = dtype
        self.counts = {s: {"docs": 0, "sentences": 0, "tokens": 0} for s in SPLITS}
        self._files = {(s, kind): open(f"{prefix}.{s}.{kind}", "wb", buffering=1 << 20)
                       for s in SPLITS for kind in ("tok", "sent", "doc")}

    def add(self, split: str, sentences: list[np.ndarray]) -> None:
        """One document (non-empty sentences of token ids)."""
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int32, count=len(sentences))
        self._files[split, "tok"].write(np.concatenate(sentences).astype(self.dtype, copy=False).tobytes())
        self._files[split, "sent"].write(lengths.tobytes())
        self._files[split, "doc"].write(np.int32(len(sentences)).tobytes())
        c = self.counts[split]
        c["docs"] += 1
        c["sentences"] += len(sentences)
        c["tokens"] += int(lengths.sum())

    def close(self) -> dict:
        for f in self._files.values():
            f.close()
        return self.counts


def part_files(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}.{s}.{kind}") for s in SPLITS for kind in ("tok", "sent", "doc")]


def _append_offsets(out, lengths_file: Path, base: int) -> int:
    """Write cumulative int64 offsets of the int32 lengths in lengths_file, starting after base; returns the end."""
    lengths = np.fromfile(lengths_file, dtype=np.int32)
    if len(lengths):
        offsets = np.cumsum(lengths, dtype=np.int64) + base
        out.write(offsets.tobytes())
        base = int(offsets[-1])
    return base


def join_parts(prefixes: list[Path], out_dir: Path) -> dict:
    """Concatenate parts (in order) into the store in out_dir; returns per-split counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        with open(out_dir / f"{split}.tok", "wb") as tok, open(out_dir / f"{split}.sent", "wb") as sent, \
                open(out_dir / f"{split}.doc", "wb") as doc:
            sent.write(np.int64(0).tobytes())
            doc.write(np.int64(0).tobytes())
            tokens = sentences = docs = 0
            for prefix in prefixes:
                with open(f"{prefix}.{split}.tok", "rb") as src:
                    shutil.copyfileobj(src, tok, _COPY_BLOCK)
                tokens = _append_offsets(sent, Path(f"{prefix}.{split}.sent"), tokens)
                sentences = _append_offsets(doc, Path(f"{prefix}.{split}.doc"), sentences)
                docs += os.path.getsize(f"{prefix}.{split}.doc") // 4
        counts[split] = {"docs": docs, "sentences": sentences, "tokens": tokens}
    return counts


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray)  # plain views: memmap indexing is slow


class StoreSplit:
    """A split's documents ``lo``..``hi-1`` (a ``samples.Documents`` source)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, lo: int = 0, hi: int | None = None):
        self.tok = _map(directory / f"{split}.tok", dtype)
        self.sent = _map(directory / f"{split}.sent", np.int64)
        self.doc = _map(directory / f"{split}.doc", np.int64)
        self.lo = lo
        self.hi = len(self.doc) - 1 if hi is None else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def sentence_count(self, doc: int) -> int:
        d = self.lo + doc
        return int(self.doc[d + 1] - self.doc[d])

    def sentence(self, doc: int, index: int) -> np.ndarray:
        s = int(self.doc[self.lo + doc]) + index
        return self.tok[int(self.sent[s]) : int(self.sent[s + 1])]

    def documents(self, lo: int, hi: int) -> list[list[np.ndarray]]:
        """Documents lo..hi-1 of this view as lists of sentence arrays."""
        s0, s1 = int(self.doc[self.lo + lo]), int(self.doc[self.lo + hi])
        t0 = int(self.sent[s0])
        tokens = np.asarray(self.tok[t0 : int(self.sent[s1])])
        sentences = np.split(tokens, np.asarray(self.sent[s0 + 1 : s1]) - t0)
        bounds = np.asarray(self.doc[self.lo + lo : self.lo + hi + 1]) - s0
        return [sentences[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def token_offsets(self) -> np.ndarray:
        """Tokens before each document of the view, and the total: len(self) + 1 values from 0."""
        at = np.asarray(self.sent[np.asarray(self.doc[self.lo : self.hi + 1])])
        return at - at[0] if len(at) else np.zeros(1, np.int64)


def chunks(view: StoreSplit, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive document ranges of about chunk_tokens tokens each (a longer document is a chunk of its own)."""
    offsets = view.token_offsets()
    out, lo = [], 0
    while lo < len(view):
        hi = int(np.searchsorted(offsets, offsets[lo] + chunk_tokens, side="left"))
        hi = min(max(hi, lo + 1), len(view))
        out.append((lo, hi))
        lo = hi
    return out

