"""Tokenized sentence-pair samples written as WebDataset tar shards, with an ``index.json`` manifest.

Each sample holds ``ids`` (little-endian uint16/uint32 bytes), ``alen`` and ``nsp`` (ascii); its
``__key__`` is the zero-padded sample index within its split, which seeds its masking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from bertscale.corpus import CorpusStats, iter_documents
from bertscale.samples import Sample, build_samples
from bertscale.tokenizer import load_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

FORMAT = "bertscale-shards-v1"
SPLITS = ("train", "valid")
TOKENIZE_BATCH_DOCS = 256
POOL_DOCS = 2000
"""Documents per sample-building pool; random B segments are drawn from the same pool."""


def is_valid_document(index: int, seed: int, valid_fraction: float) -> bool:
    """Deterministic per-document split decision from a hash of (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class _SplitWriter:
    """Writes one split's samples into numbered shards, each renamed into place when complete."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, dtype: np.dtype):
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.dtype = dtype
        self.shards: list[dict] = []
        self.samples = 0
        self.tokens = 0
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._final = self.dir / name
        self._tmp = self.dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._in_shard = 0

    def _close(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        os.replace(self._tmp, self._final)
        self.shards.append({"name": f"{self.split}/{self._final.name}", "samples": self._in_shard})
        self._writer = self._file = None

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({
            "__key__": f"{self.samples:09d}",
            "ids": sample.ids.astype(self.dtype).tobytes(),
            "alen": str(sample.a_len).encode("ascii"),
            "nsp": str(sample.nsp_label).encode("ascii"),
        })
        self.samples += 1
        self.tokens += len(sample.ids)
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._close()

    def finish(self) -> dict:
        if self._writer is not None:
            self._close()
        return {"shards": self.shards, "samples": self.samples, "tokens": self.tokens}


def _tokenized_documents(
    docs: Iterator[list[str]], tokenizer, batch_docs: int
) -> Iterator[tuple[list[np.ndarray], int]]:
    """Yield (tokenized sentences, token count) per document, tokenizing in batches."""
    batch: list[list[str]] = []

    def flush() -> Iterator[tuple[list[np.ndarray], int]]:
        flat = [s for d in batch for s in d]
        encoded = tokenizer.encode_batch(flat, add_special_tokens=False)
        pos = 0
        for d in batch:
            sents = [np.asarray(e.ids, dtype=np.int32) for e in encoded[pos : pos + len(d)]]
            pos += len(d)
            yield sents, sum(len(s) for s in sents)

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def build_shards(
    inputs: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    seq_len: int,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10000,
    seed: int = 12345,
    valid_fraction: float = 0.01,
    short_seq_prob: float = 0.1,
    show_progress: bool = True,
) -> dict:
    """Tokenize the corpus, build NSP samples and write train/valid shards; returns the manifest."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out = Path(out_dir)
    if (out / "index.json").exists():
        (out / "index.json").unlink()  # a stale manifest must not describe the new shards
    info = tokenizer_info(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = ids_dtype(info.vocab_size)
    stats = CorpusStats()
    writers = {s: _SplitWriter(out, s, samples_per_shard, dtype) for s in SPLITS}
    pools: dict[str, list[list[np.ndarray]]] = {s: [] for s in SPLITS}
    rngs = {s: np.random.default_rng([seed, k]) for k, s in enumerate(SPLITS)}

    def flush(split: str) -> None:
        pool = pools[split]
        if not pool:
            return
        samples = list(build_samples(pool, seq_len, rngs[split], info.cls_id, info.sep_id, short_seq_prob))
        for j in rngs[split].permutation(len(samples)):
            writers[split].write(samples[j])
        pools[split] = []

    def add(split: str, doc: list[np.ndarray]) -> None:
        pools[split].append(doc)
        if len(pools[split]) >= POOL_DOCS:
            flush(split)

    start = time.perf_counter()
    total_tokens = 0
    bar = tqdm(desc="shards", unit=" doc", disable=not show_progress, dynamic_ncols=True)
    held: list[np.ndarray] | None = None  # one document of lookahead, so the last can go to valid
    n_docs = n_valid = 0
    for index, (doc, n_tokens) in enumerate(
        _tokenized_documents(iter_documents(inputs, stats), tokenizer, TOKENIZE_BATCH_DOCS)
    ):
        if held is not None:
            add("train", held)
            held = None
        if is_valid_document(index, seed, valid_fraction):
            add("valid", doc)
            n_valid += 1
        else:
            held = doc
        n_docs += 1
        total_tokens += n_tokens
        bar.update(1)
        if n_docs % 200 == 0:
            rate = total_tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tokens=total_tokens, tok_per_s=f"{rate:,.0f}")
    bar.close()
    if held is not None:
        if n_valid == 0 and n_docs >= 2 and valid_fraction > 0:
            add("valid", held)
        else:
            add("train", held)
    for split in SPLITS:
        flush(split)
    elapsed = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab_size,
        "seed": seed,
        "short_seq_prob": short_seq_prob,
        "valid_fraction": valid_fraction,
        "splits": {s: writers[s].finish() for s in SPLITS},
        "corpus": asdict(stats),
        "build_seconds": round(elapsed, 3),
        "corpus_tokens": total_tokens,
    }
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "index.json")
    sp = manifest["splits"]
    log.info(
        "wrote %s: train %d samples in %d shards, valid %d samples in %d shards; %d tokens in %.1fs "
        "(%.0f tokens/s); corpus: %s",
        out, sp["train"]["samples"], len(sp["train"]["shards"]), sp["valid"]["samples"],
        len(sp["valid"]["shards"]), total_tokens, elapsed, total_tokens / max(elapsed, 1e-9), stats.summary(),
    )
    if stats.replaced_chars:
        log.warning("%d undecodable characters were replaced with U+FFFD", stats.replaced_chars)
    return manifest


def load_manifest(
    data_dir: str | os.PathLike,
    expect_seq_len: int | None = None,
    expect_fingerprint: str | None = None,
) -> dict:
    """Read and check ``index.json``: format, shard files, seq_len and tokenizer match."""
    d = Path(data_dir)
    path = d / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no index.json in {d}; build shards with `bertscale shards ... --out {d}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the shards") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the shards")
    if expect_seq_len is not None and manifest["seq_len"] != expect_seq_len:
        raise ValueError(
            f"shards in {d} were built with seq_len {manifest['seq_len']} but the phase trains at "
            f"{expect_seq_len}; rebuild with --seq-len {expect_seq_len} or point the phase at the right folder"
        )
    if expect_fingerprint is not None and manifest["tokenizer_fingerprint"] != expect_fingerprint:
        raise ValueError(
            f"shards in {d} were built with tokenizer {manifest['tokenizer_fingerprint']} but the run uses "
            f"tokenizer {expect_fingerprint}; rebuild the shards with this tokenizer or use the tokenizer "
            "they were built with"
        )
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            f = d / shard["name"]
            if not f.is_file() or f.stat().st_size == 0:
                raise FileNotFoundError(
                    f"{d / 'index.json'} lists {shard['name']} ({split}) but {f} is missing or empty; "
                    "copy the whole shard folder or rebuild it"
                )
    return manifest


def shard_paths(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute-or-relative paths of a split's shards, in manifest order."""
    if split not in manifest["splits"]:
        raise ValueError(f"shards in {data_dir} have no split {split!r}; available: {sorted(manifest['splits'])}")
    return [str(Path(data_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]
