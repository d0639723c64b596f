"""Tokenized sentence-pair samples written as WebDataset tar shards, with an ``index.json`` manifest.

Each sample holds ``ids`` (little-endian uint16/uint32 bytes), ``alen`` and ``nsp`` (ascii); its
``__key__`` is ``FFFFFFNNNNNNNNNN``: the input file's index and the sample's index in that file's
split, so keys are unique and known without coordination between build processes. The key seeds
the sample's masking.

Building runs one process per input file (in parallel), tokenizes every document once and feeds
it to one sample builder per requested sequence length. Each shard is written to ``*.tmp`` and
renamed when complete; when a file is done, a record ``.parts/file-NNNNNN.json`` lists its shards,
and ``index.json`` is written last. A rerun skips files whose record matches, so an interrupted
build restarts where it stopped (at file granularity) and never mistakes a partial shard for a
finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bertscale.corpus import CorpusStats, expand_inputs, file_documents
from bertscale.samples import Sample, build_samples
from bertscale.tokenizer import load_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

FORMAT = "bertscale-shards-v1"
SPLITS = ("train", "valid")
TOKENIZE_BATCH_DOCS = 256
POOL_DOCS = 2000
"""Documents per sample-building pool; random B segments are drawn from the same pool."""
KEY_FILE_DIGITS, KEY_SAMPLE_DIGITS = 6, 10
PARTS_DIR = ".parts"
_BLOCK = 512  # tar's block


def is_valid_document(index: int | str, seed: int, valid_fraction: float) -> bool:
    """Deterministic per-document split decision from a hash of (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def sample_key(file_index: int, index: int) -> str:
    return f"{file_index:0{KEY_FILE_DIGITS}d}{index:0{KEY_SAMPLE_DIGITS}d}"


class UstarWriter:
    """Writes tar members exactly as ``webdataset.TarWriter(f, encoder=False, mtime=0)`` does in ustar
    format (members of a sample in sorted field order, mode 0444, owner ``bigdata``, closing zero
    blocks padded to tarfile's 10 KiB record), byte for byte, without a ``tarfile.TarInfo`` per member.

    webdataset's writer goes through ``tarfile`` (a TarInfo, a copy and ~25 field conversions per
    member) and, because it never hands ``tarfile`` its format, a PAX header before every member:
    that made up most of the builder's time (tools/bench_data.py). The header here is a template
    with only name, size and checksum filled in. tests/test_data_build.py checks the bytes against
    webdataset's own writer.
    """

    _RECORD = 20 * _BLOCK
    _FLUSH_BYTES = 1 << 20

    def __init__(self, file):
        self.file = file
        self.offset = 0
        template = tarfile.TarInfo("")
        template.mode, template.mtime, template.uname, template.gname = 0o444, 0, "bigdata", "bigdata"
        header = template.tobuf(tarfile.USTAR_FORMAT)
        # the fixed parts around name [0:100], size [124:136] and checksum [148:156]
        self._mid, self._after_size, self._tail = header[100:124], header[136:148], header[156:]
        self._fixed_sum = sum(self._mid) + sum(self._after_size) + sum(self._tail) + 8 * ord(" ")  # checksum: spaces
        self._suffixes: dict[str, tuple[bytes, int]] = {}
        self._zeros = bytes(_BLOCK)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, sample: Mapping[str, object]) -> None:
        """One sample as webdataset's writer takes it: ``__key__`` plus fields of bytes."""
        self.add(str(sample["__key__"]), [(f, sample[f]) for f in sorted(sample) if not f.startswith("_")])

    def add(self, key: str, fields: Sequence[tuple[str, bytes]]) -> None:
        """One sample's members ``KEY.FIELD``, in the order given (webdataset's is sorted by field)."""
        key_bytes = key.encode()
        key_sum = sum(key_bytes)
        parts = self._pending
        for field, data in fields:
            suffix = self._suffixes.get(field)
            if suffix is None:
                dotted = b"." + field.encode()
                suffix = self._suffixes[field] = (dotted, sum(dotted))
            name = key_bytes + suffix[0]
            if len(name) > 100:
                raise ValueError(f"tar member name {name!r} is longer than ustar's 100 bytes")
            size = b"%011o\0" % len(data)
            checksum = self._fixed_sum + key_sum + suffix[1] + sum(size)
            pad = -len(data) % _BLOCK
            parts += (name, self._zeros[: 100 - len(name)], self._mid, size, self._after_size,
                      b"%06o\0 " % checksum, self._tail, data, self._zeros[:pad])
            self._pending_bytes += _BLOCK + len(data) + pad
        if self._pending_bytes >= self._FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self.file.write(b"".join(self._pending))
        self.offset += self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        """The end-of-archive marker: two zero blocks, then zeros up to a whole tar record."""
        self._flush()
        end = 2 * _BLOCK
        end += -(self.offset + end) % self._RECORD
        self.file.write(bytes(end))
        self.offset += end


class _SplitWriter:
    """Writes one split's samples of one input file into numbered shards, each renamed into place."""

    def __init__(self, out_dir: Path, split: str, file_index: int, samples_per_shard: int, dtype: np.dtype):
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.file_index = split, file_index
        self.samples_per_shard = samples_per_shard
        self.dtype = dtype
        self.shards: list[dict] = []
        self.samples = 0
        self.tokens = 0
        self._writer: UstarWriter | None = None
        self._file = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"shard-{self.file_index:06d}-{len(self.shards):06d}.tar"
        self._final = self.dir / name
        self._tmp = self.dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._writer = UstarWriter(self._file)
        self._in_shard = 0

    def _close(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        os.replace(self._tmp, self._final)
        self.shards.append({"name": f"{self.split}/{self._final.name}", "samples": self._in_shard,
                            "bytes": self._final.stat().st_size})
        self._writer = self._file = None

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            self._open()
        self._writer.add(sample_key(self.file_index, self.samples), (  # sorted by field, as webdataset writes
            ("alen", b"%d" % sample.a_len), ("ids", sample.ids.astype(self.dtype).tobytes()),
            ("nsp", b"%d" % sample.nsp_label)))
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
    # the same ids without character offsets, which we never use (tokenizers >= 0.20; ~1.3x faster)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    batch: list[list[str]] = []

    def flush() -> Iterator[tuple[list[np.ndarray], int]]:
        flat = [s for d in batch for s in d]
        encoded = encode(flat, add_special_tokens=False)
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


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class _Pools:
    """Document pools of one sequence length and one input file, flushed into sample writers."""

    def __init__(self, out: Path, file_index: int, seq_len: int, samples_per_shard: int, dtype: np.dtype,
                 params: dict, cls_id: int, sep_id: int):
        self.seq_len, self.params, self.cls_id, self.sep_id = seq_len, params, cls_id, sep_id
        self.writers = {s: _SplitWriter(out, s, file_index, samples_per_shard, dtype) for s in SPLITS}
        self.pools: dict[str, list[list[np.ndarray]]] = {s: [] for s in SPLITS}
        self.rngs = {s: np.random.default_rng([params["seed"], file_index, seq_len, k]) for k, s in enumerate(SPLITS)}

    def add(self, split: str, doc: list[np.ndarray]) -> None:
        self.pools[split].append(doc)
        if len(self.pools[split]) >= POOL_DOCS:
            self.flush(split)

    def flush(self, split: str) -> None:
        pool, self.pools[split] = self.pools[split], []
        if not pool:
            return
        rng = self.rngs[split]
        samples = list(build_samples(pool, self.seq_len, rng, self.cls_id, self.sep_id, self.params["short_seq_prob"],
                                     sentence_order=self.params["sentence_order"]))
        for j in rng.permutation(len(samples)):
            self.writers[split].write(samples[j])

    def finish(self) -> dict:
        for split in SPLITS:
            self.flush(split)
        return {s: self.writers[s].finish() for s in SPLITS}


def _build_file(job: dict, progress=None) -> dict:
    """Tokenize one input file once and write its shards for every target; returns its records."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if job["in_pool"] else "true")
    path, file_index, params = Path(job["path"]), job["file_index"], job["params"]
    tokenizer = load_tokenizer(job["tokenizer_dir"])
    dtype = np.dtype(params["dtype"])
    pools = {L: _Pools(Path(d), file_index, L, job["samples_per_shard"][L], dtype, params, job["cls_id"], job["sep_id"])
             for L, d in job["targets"].items()}
    stats = CorpusStats()
    tokens = docs = pending_tokens = pending_docs = n_valid = 0
    held: list[np.ndarray] | None = None  # one document of lookahead, so a tiny corpus gets a valid one
    vf = params["valid_fraction"]
    for index, (doc, n_tokens) in enumerate(_tokenized_documents(file_documents(path, stats), tokenizer,
                                                                  TOKENIZE_BATCH_DOCS)):
        if held is not None:
            for p in pools.values():
                p.add("train", held)
            held = None
        if is_valid_document(f"{file_index}/{index}", params["seed"], vf):
            for p in pools.values():
                p.add("valid", doc)
            n_valid += 1
        else:
            held = doc
        docs += 1
        tokens += n_tokens
        pending_tokens += n_tokens
        pending_docs += 1
        if progress is not None and pending_docs >= 64:
            progress(pending_tokens, pending_docs)
            pending_tokens = pending_docs = 0
    if held is not None:
        split = "valid" if job["single_file"] and n_valid == 0 and docs >= 2 and vf > 0 else "train"
        for p in pools.values():
            p.add(split, held)
    if progress is not None:
        progress(pending_tokens, pending_docs)
    records = {}
    for L, p in pools.items():
        record = {"input": job["identity"], "params": {**params, "samples_per_shard": job["samples_per_shard"][L]},
                  "seq_len": L, "splits": p.finish(),
                  "corpus": asdict(stats), "tokens": tokens}
        parts = Path(job["targets"][L]) / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        tmp = parts / f"file-{file_index:06d}.json.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, parts / f"file-{file_index:06d}.json")
        records[L] = record
    return {"file_index": file_index, "records": records, "tokens": tokens}


_PROGRESS = None  # in a build worker process: the queue its progress goes to


def _init_worker(q) -> None:
    global _PROGRESS
    _PROGRESS = q


def _pool_job(job: dict) -> dict:
    def progress(tokens: int, docs: int) -> None:
        _PROGRESS.put((tokens, docs))

    return _build_file(job, progress)


def _done_record(target: Path, file_index: int, identity: dict, params: dict, seq_len: int) -> dict | None:
    """The finished record of an input file from an earlier (interrupted) run, if it still applies."""
    f = target / PARTS_DIR / f"file-{file_index:06d}.json"
    try:
        record = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("input") != identity or record.get("params") != params or record.get("seq_len") != seq_len:
        return None
    for entry in record["splits"].values():
        for shard in entry["shards"]:
            g = target / shard["name"]
            if not g.is_file() or g.stat().st_size != shard["bytes"]:
                return None
    return record


def shard_dirs(out_dir: str | os.PathLike, seq_lens: Sequence[int]) -> dict[int, Path]:
    """Where each sequence length goes: OUT itself for one length, OUT/seq{L} for several."""
    out = Path(out_dir)
    if len(seq_lens) == 1:
        return {seq_lens[0]: out}
    return {L: out / f"seq{L}" for L in seq_lens}


def build_shards(
    inputs: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    seq_len: int | Sequence[int],
    out_dir: str | os.PathLike | None = None,
    samples_per_shard: int | Mapping[int, int] = 10000,
    seed: int = 12345,
    valid_fraction: float = 0.01,
    short_seq_prob: float = 0.1,
    show_progress: bool = True,
    workers: int | None = None,
    sentence_order: bool = False,
    out_dirs: Mapping[int, str | os.PathLike] | None = None,
) -> dict:
    """Tokenize the corpus once, build sentence-pair samples and write train/valid shards.

    ``seq_len`` is one length (shards go to out_dir, the manifest is returned) or several (shards
    go to out_dir/seq{L}, or to ``out_dirs[L]``; returns {seq_len: manifest}). ``workers``
    processes (default: one per core, at most one per input file) each build whole input files.
    ``sentence_order`` makes negatives swapped segments (ALBERT's SOP) instead of random B's.
    """
    lens = [int(seq_len)] if isinstance(seq_len, (int, np.integer)) else [int(x) for x in seq_len]
    if not lens or len(set(lens)) != len(lens):
        raise ValueError(f"seq_len must be one or more distinct lengths, got {seq_len!r}")
    if isinstance(samples_per_shard, Mapping):
        per_shard = {L: int(samples_per_shard[L]) for L in lens}
    else:
        per_shard = {L: int(samples_per_shard) for L in lens}
    if min(per_shard.values()) < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if out_dirs is not None:
        targets = {L: Path(out_dirs[L]) for L in lens}
    elif out_dir is not None:
        targets = shard_dirs(out_dir, lens)
    else:
        raise ValueError("give out_dir (or out_dirs per sequence length)")
    files = expand_inputs(inputs)
    for target in targets.values():
        target.mkdir(parents=True, exist_ok=True)
        if (target / "index.json").exists():
            (target / "index.json").unlink()  # a stale manifest must not describe the new shards
    info = tokenizer_info(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # fail here, not in a worker, when tokenizer.json is missing
    dtype = ids_dtype(info.vocab_size)
    params = {"seed": seed, "valid_fraction": valid_fraction, "short_seq_prob": short_seq_prob,
              "sentence_order": sentence_order, "dtype": dtype.name, "tokenizer_fingerprint": info.fingerprint,
              "format": FORMAT}
    results: dict[int, dict[int, dict]] = {}
    jobs = []
    for i, path in enumerate(files):
        identity = _file_identity(path)
        todo = {}
        for L, target in targets.items():
            record = _done_record(target, i, identity, {**params, "samples_per_shard": per_shard[L]}, L)
            if record is None:
                todo[L] = str(target)
            else:
                results.setdefault(i, {})[L] = record
        if todo:
            jobs.append({"path": str(path), "file_index": i, "identity": identity, "tokenizer_dir": str(tokenizer_dir),
                         "targets": todo, "samples_per_shard": per_shard, "single_file": len(files) == 1,
                         "cls_id": info.cls_id, "sep_id": info.sep_id, "in_pool": False,
                         "params": params})
    if len(jobs) < len(files):
        log.info("resuming: %d of %d input files already built", len(files) - len(jobs), len(files))
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    start = time.perf_counter()
    bar = tqdm(desc="shards", unit=" tok", unit_scale=True, disable=not show_progress, dynamic_ncols=True)
    counts = {"tokens": 0, "docs": 0, "files": 0}

    def progress(tokens: int, docs: int) -> None:
        counts["tokens"] += tokens
        counts["docs"] += docs
        bar.update(tokens)
        rate = counts["tokens"] / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs=counts["docs"], files=f"{counts['files']}/{len(jobs)}", tok_per_s=f"{rate:,.0f}",
                        refresh=False)

    def done(res: dict) -> None:
        counts["files"] += 1
        for L, record in res["records"].items():
            results.setdefault(res["file_index"], {})[L] = record

    if n_workers == 1:
        for job in jobs:
            done(_build_file(job, progress))
    else:
        ctx = mp.get_context("spawn")  # fork after threads (tqdm, torch, tokenizers) can deadlock
        q = ctx.Queue()

        def drain() -> None:
            while True:
                try:
                    progress(*q.get_nowait())
                except queue.Empty:
                    return

        # an executor, not mp.Pool: a worker that dies (OOM killer, segfault) breaks the pool and
        # raises here, where mp.Pool would replace the worker and wait for its lost task forever
        with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
            futures = {pool.submit(_pool_job, {**job, "in_pool": True}): job for job in jobs}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    drain()
                    for fut in finished:
                        try:
                            done(fut.result())
                        except BrokenProcessPool as e:
                            raise RuntimeError(f"a shard build worker died while building {futures[fut]['path']} "
                                               "(killed for memory? see the system log); rerun the same command "
                                               "to resume: finished files are kept") from e
            except BaseException:
                pool.shutdown(cancel_futures=True)  # start no file we would not record
                raise
            drain()
    bar.close()
    elapsed = time.perf_counter() - start
    manifests = {L: _write_manifest(targets[L], L, [results[i][L] for i in range(len(files))], params, info,
                                    per_shard[L], elapsed) for L in lens}
    if len(lens) == 1:
        return manifests[lens[0]]
    return manifests


def _write_manifest(out: Path, seq_len: int, records: list[dict], params: dict, info, per_shard: int,
                    elapsed: float) -> dict:
    stats = CorpusStats()
    for record in records:
        for f in fields(CorpusStats):
            setattr(stats, f.name, getattr(stats, f.name) + record["corpus"][f.name])
    splits = {}
    for split in SPLITS:
        shards = [s for r in records for s in r["splits"][split]["shards"]]
        splits[split] = {"shards": shards, "samples": sum(r["splits"][split]["samples"] for r in records),
                         "tokens": sum(r["splits"][split]["tokens"] for r in records)}
    total_tokens = sum(r["tokens"] for r in records)
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": params["dtype"],
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab_size,
        "seed": params["seed"],
        "short_seq_prob": params["short_seq_prob"],
        "valid_fraction": params["valid_fraction"],
        "pair_task": "sop" if params["sentence_order"] else "nsp",
        "samples_per_shard": per_shard,
        "splits": splits,
        "corpus": asdict(stats),
        "build_seconds": round(elapsed, 3),
        "corpus_tokens": total_tokens,
    }
    listed = {s["name"] for e in splits.values() for s in e["shards"]}
    for split in SPLITS:  # shards of an earlier build with other settings, and partial writes
        for f in (out / split).glob("shard-*"):
            if f"{split}/{f.name}" not in listed:
                f.unlink()
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
    strict: bool = False,
) -> dict:
    """Read and check ``index.json`` against the files on disk: format, shards, seq_len, tokenizer.

    A listed shard that is missing is an error; one whose size differs from the manifest is a
    warning naming it (the loader then skips it), or an error with ``strict``.
    """
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
    problems = [why for split in manifest["splits"] for _, why in shard_problems(manifest, d, split)]
    if problems:
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        if strict:
            raise ValueError(f"shards in {d} disagree with {path}: {listing}; rebuild or re-copy them")
        log.warning("shards in %s disagree with %s (they will be skipped): %s", d, path, listing)
    return manifest


def shard_problems(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[tuple[int, str]]:
    """(index, reason) of a split's shards whose size on disk is not the manifest's."""
    out = []
    for i, shard in enumerate(manifest["splits"].get(split, {}).get("shards", [])):
        if "bytes" not in shard:  # manifests of older builds do not record sizes
            continue
        f = Path(data_dir) / shard["name"]
        size = f.stat().st_size if f.is_file() else -1
        if size != shard["bytes"]:
            out.append((i, f"{shard['name']} has {size} bytes, the manifest says {shard['bytes']}"))
    return out


def shard_paths(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute-or-relative paths of a split's shards, in manifest order."""
    if split not in manifest["splits"]:
        raise ValueError(f"shards in {data_dir} have no split {split!r}; available: {sorted(manifest['splits'])}")
    return [str(Path(data_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]


# --- reading -----------------------------------------------------------------------------------

_FIELDS = ("ids", "alen", "nsp")


class CorruptShardError(ValueError):
    """A shard file that cannot be read completely (truncated, bad header, missing fields)."""


class ShardIndex:
    """All samples of one shard file, parsed without copying: sample i is ``ids(i)``, ``alen[i]``, ...

    The whole tar is read into memory (one shard, bounded by ``--samples-per-shard``) and every
    header is checked, so a truncated or damaged file fails here, never half-way through a batch.
    """

    def __init__(self, path: str, data: bytes, keys, ids_off, ids_len, alen, nsp, dtype: np.dtype):
        self.path, self.data, self.dtype = path, data, dtype
        self.keys, self.ids_off, self.ids_len, self.alen, self.nsp = keys, ids_off, ids_len, alen, nsp

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, i: int) -> np.ndarray:
        return np.frombuffer(self.data, self.dtype, int(self.ids_len[i]), int(self.ids_off[i])).astype(np.int64)


def read_shard(path: str | os.PathLike, dtype: str | np.dtype, expect_samples: int | None = None) -> ShardIndex:
    """Parse a shard written by ``build_shards``; raises CorruptShardError naming the file."""
    path = str(path)
    dt = np.dtype(dtype).newbyteorder("<")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorruptShardError(f"cannot read shard {path}: {e}") from e

    def bad(why: str) -> CorruptShardError:
        return CorruptShardError(f"corrupt shard {path}: {why}; rebuild it with `bertscale shards`")

    n = len(data)
    pos = 0
    headers: list[int] = []
    keys: list[str] = []
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    ended = False
    while pos + _BLOCK <= n:
        h = data[pos : pos + _BLOCK]
        if h[0] == 0 and not h.strip(b"\0"):
            ended = True
            break
        try:
            size = int(h[124:136].strip(b" \0") or b"0", 8)
        except ValueError:
            raise bad(f"unreadable tar header at byte {pos}") from None
        kind = h[156:157]
        start = pos + _BLOCK
        pos = start + -(-size // _BLOCK) * _BLOCK
        if pos > n:
            raise bad(f"truncated inside a member at byte {start} ({n} bytes on disk)")
        headers.append(start - _BLOCK)
        if kind in (b"x", b"g"):  # pax headers carry no sample data
            continue
        if kind not in (b"0", b"\0"):
            raise bad(f"unexpected tar member type {kind!r} at byte {start - _BLOCK}")
        name = h[:100].rstrip(b"\0").decode("utf-8", "replace")
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        if key not in samples:
            samples[key] = {}
            keys.append(key)
        samples[key][ext] = (start, size)
    if not ended:
        raise bad(f"truncated: no end-of-archive marker ({n} bytes on disk)")
    if headers:
        hdr = np.frombuffer(data, np.uint8)[np.asarray(headers)[:, None] + np.arange(_BLOCK)]
        stored = [int(data[o + 148 : o + 156].strip(b" \0") or b"-1", 8) for o in headers]
        computed = hdr[:, :148].sum(1, dtype=np.int64) + hdr[:, 156:].sum(1, dtype=np.int64) + 8 * 32
        if not np.array_equal(computed, np.asarray(stored, dtype=np.int64)):
            first = headers[int(np.flatnonzero(computed != np.asarray(stored))[0])]
            raise bad(f"tar header checksum mismatch at byte {first}")
    m = len(keys)
    key_arr = np.empty(m, np.int64)
    ids_off = np.empty(m, np.int64)
    ids_len = np.empty(m, np.int64)
    alen = np.empty(m, np.int64)
    nsp = np.empty(m, np.int64)
    for i, key in enumerate(keys):
        fields = samples[key]
        missing = [f for f in _FIELDS if f not in fields]
        if missing:
            raise bad(f"sample {key!r} lacks {missing}")
        try:
            key_arr[i] = int(key)
            (o, s), (ao, asz), (no, nsz) = fields["ids"], fields["alen"], fields["nsp"]
            alen[i] = int(data[ao : ao + asz])
            nsp[i] = int(data[no : no + nsz])
        except ValueError:
            raise bad(f"sample {key!r} has a non-numeric key, alen or nsp") from None
        if s % dt.itemsize:
            raise bad(f"sample {key!r} has {s} id bytes, not a multiple of {dt.itemsize}")
        ids_off[i], ids_len[i] = o, s // dt.itemsize
    if expect_samples is not None and m != expect_samples:
        raise bad(f"holds {m} samples but the manifest lists {expect_samples}")
    return ShardIndex(path, data, key_arr, ids_off, ids_len, alen, nsp, dt)
