"""``bertscale shards``: corpus text -> tokenized document store -> sentence-pair samples -> full shards.

Three stages, each run by a pool of processes (one per core by default), each restartable:

1. **Tokenize.** Input files, in groups of consecutive files, are read and tokenized once into the
   document store (``docstore.py``) under ``OUT/.build/``. A document's split (train or valid) is a
   hash of (seed, file index, document index).
2. **Pair.** Each split's documents are cut into chunks of about ``CHUNK_TOKENS`` tokens. A chunk
   becomes samples for every sequence length with its own generator, seeded by (seed, length,
   split, chunk); the random B of a negative pair comes from any other document of the split in
   the whole corpus, as in Google's ``create_pretraining_data.py``, so one-document-per-file
   corpora get their negatives too. Samples are shuffled within the chunk and written as tar
   members to a fragment file.
3. **Assemble.** Fragments are appended, in chunk order, to shards of exactly
   ``--samples-per-shard`` samples (a split's last shard may hold fewer): ``train/shard-000000.tar``,
   ``train/shard-000001.tar``, ..., ``valid/shard-000000.tar``.

Chunks, generators and assembly order depend on the corpus and the options only, never on the
number of processes, so the shards are the same bytes whatever ``--workers``. An interrupted build
resumes: finished groups, the joined store, finished fragments and closed shards are kept (their
records name what they were built from). A lock keeps a second build out of the directory; files
in ``train/`` and ``valid/`` that no build listed are never deleted (the build refuses to start).
``index.json`` is written last; the work files are then removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bertscale import docstore, lifetime
from bertscale.console import progress_bar
from bertscale.corpus import (CorpusStats, check_document_mode, expand_inputs, file_documents, paragraph_layout,
                              refuse_binary_files)
from bertscale.files import ExclusiveLock, require_writable_dir, write_atomic
from bertscale.samples import build_samples
from bertscale.shard_format import (FORMAT, KEY_DIGITS, SPLITS, ShardFile, UstarWriter, ids_dtype, sample_members,
                                    shard_name, write_manifest)
from bertscale.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

TOKENIZE_BATCH_DOCS = 256
CHUNK_TOKENS = 1 << 18
"""Tokens per pairing chunk: the unit of parallel work in stage 2, and of shuffling."""
GROUP_BYTES = (1 << 16, 1 << 26)
"""Bounds on the input bytes tokenized by one stage-1 task (many small files go together)."""
CHUNK_DIGITS = 6
WORK_DIR = ".build"
LOCK_FILE = ".bertscale-shards.lock"
BALANCE_WARN_POINTS = 10
FILL_WARN = 0.5
_STORE_VERSION = 1


def is_valid_document(index: int | str, seed: int, valid_fraction: float) -> bool:
    """Deterministic per-document split decision from a hash of (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


def sample_key(chunk: int, index: int) -> str:
    """The ``__key__`` of a chunk's index-th sample: unique within a split, known without coordination."""
    return f"{chunk:0{CHUNK_DIGITS}d}{index:0{KEY_DIGITS - CHUNK_DIGITS}d}"


def shard_dirs(out_dir: str | os.PathLike, seq_lens: Sequence[int]) -> dict[int, Path]:
    """Where each sequence length goes: OUT itself for one length, OUT/seq{L} for several."""
    out = Path(out_dir)
    if len(seq_lens) == 1:
        return {seq_lens[0]: out}
    return {L: out / f"seq{L}" for L in seq_lens}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --- worker processes ------------------------------------------------------------------------------


class _ProcessState:
    """What a build process keeps between tasks: loaded tokenizers and opened stores."""

    def __init__(self, progress: Callable[[str, int], None]):
        self.progress = progress
        self._tokenizers: dict[str, object] = {}
        self._stores: dict[tuple, docstore.StoreSplit] = {}

    def tokenizer(self, directory: str):
        if directory not in self._tokenizers:
            self._tokenizers[directory] = load_tokenizer(directory)
        return self._tokenizers[directory]

    def store(self, directory: str, split: str, dtype: str, lo: int, hi: int) -> docstore.StoreSplit:
        key = (directory, split, dtype, lo, hi)
        if key not in self._stores:
            self._stores[key] = docstore.StoreSplit(Path(directory), split, np.dtype(dtype), lo, hi)
        return self._stores[key]


_STATE: _ProcessState | None = None  # in a build process: its state (set by _init_process)


def _init_process(q, parent: int) -> None:
    global _STATE
    # a build process exits when the parent does, even by SIGKILL, instead of working on as an orphan
    lifetime.die_with_parent()
    lifetime.exit_when_gone(parent)
    _STATE = _ProcessState(lambda kind, n: q.put((kind, n)))


def _run_in_process(task: tuple[str, dict]) -> dict:
    name, job = task
    return _TASKS[name](job, _STATE)


class _Pool:
    """Runs tasks in worker processes (or in this process for one worker); yields results as they finish."""

    def __init__(self, workers: int, on_progress: Callable[[str, int], None]):
        self.workers, self.on_progress = workers, on_progress
        self._stack = ExitStack()
        self._executor: ProcessPoolExecutor | None = None
        self._queue = None
        self._inline = _ProcessState(on_progress) if workers == 1 else None

    def __enter__(self) -> _Pool:
        if self._inline is None:
            ctx = mp.get_context("spawn")  # fork after threads (tqdm, torch, tokenizers) can deadlock
            self._queue = ctx.Queue()
            # an executor, not mp.Pool: a worker that dies (OOM killer, segfault) breaks the pool and
            # raises here, where mp.Pool would replace the worker and wait for its lost task forever
            self._executor = self._stack.enter_context(ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_process, initargs=(self._queue, os.getpid())))
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None and exc[0] is not None:
            self._executor.shutdown(cancel_futures=True)  # start no task whose result nobody records
        self._stack.close()

    def _drain(self) -> None:
        while self._queue is not None:
            try:
                self.on_progress(*self._queue.get_nowait())
            except queue.Empty:
                return

    def run(self, name: str, jobs: Sequence[dict], window: int | None = None) -> Iterator[tuple[int, dict]]:
        """(index of the job, its result) in completion order; at most ``window`` jobs in flight."""
        if self._inline is not None:
            for i, job in enumerate(jobs):
                yield i, _TASKS[name](job, self._inline)
            return
        window = window or len(jobs)
        futures: dict = {}
        submitted = 0
        while submitted < len(jobs) or futures:
            while submitted < len(jobs) and len(futures) < window:
                futures[self._executor.submit(_run_in_process, (name, jobs[submitted]))] = submitted
                submitted += 1
            finished, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
            self._drain()
            for fut in finished:
                index = futures.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(f"a shard build worker died while working on {jobs[index]['what']} "
                                       "(killed for memory? see the system log); rerun the same command to "
                                       "resume: finished work is kept") from e
                yield index, result
        self._drain()


# --- stage 1: tokenize ------------------------------------------------------------------------------


def _tokenized(items: Iterator[tuple[object, list[str]]], tokenizer) -> Iterator[tuple[object, list[np.ndarray]]]:
    """(tag, non-empty sentences as id arrays) per document, tokenizing in batches of documents."""
    # the same ids without character offsets, which we never use (tokenizers >= 0.20; ~1.3x faster)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    batch: list[tuple[object, list[str]]] = []

    def flush() -> Iterator[tuple[object, list[np.ndarray]]]:
        encoded = encode([s for _, d in batch for s in d], add_special_tokens=False)
        pos = 0
        for tag, d in batch:
            sents = [np.asarray(e.ids, dtype=np.int32) for e in encoded[pos : pos + len(d)]]
            pos += len(d)
            yield tag, [s for s in sents if len(s)]

    for item in items:
        batch.append(item)
        if len(batch) >= TOKENIZE_BATCH_DOCS:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _tokenize_group(job: dict, state: _ProcessState) -> dict:
    """Stage 1 task: tokenize a group of input files into a store part; returns its record."""
    if job["threads"] is not None:  # in a pool process: threads only when there are idle cores
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if job["threads"] else "false"
    tokenizer = state.tokenizer(job["tokenizer_dir"])
    stats = CorpusStats()
    prefix = Path(job["prefix"])
    writer = docstore.PartWriter(prefix, np.dtype(job["dtype"]))

    def documents() -> Iterator[tuple[tuple[int, int], list[str]]]:
        for file_index, path in job["files"]:
            for doc_index, doc in enumerate(file_documents(path, stats, job["documents"])):
                yield (file_index, doc_index), doc

    pending = 0
    for (file_index, doc_index), sentences in _tokenized(documents(), tokenizer):
        if not sentences:
            stats.empty_documents += 1
            continue
        valid = is_valid_document(f"{file_index}/{doc_index}", job["seed"], job["valid_fraction"])
        writer.add("valid" if valid else "train", sentences)
        pending += sum(len(s) for s in sentences)
        if pending >= 1 << 16:
            state.progress("tokens", pending)
            pending = 0
    state.progress("tokens", pending)
    record = {"key": job["key"], "splits": writer.close(), "corpus": stats.__dict__}
    write_atomic(f"{prefix}.json", json.dumps(record), sync=False)
    return record


# --- stage 2: pair ------------------------------------------------------------------------------------


def _pair_chunk(job: dict, state: _ProcessState) -> dict:
    """Stage 2 task: one chunk of one split into samples for each sequence length, as fragment files."""
    split = job["split"]
    view = state.store(job["store"], job["store_split"], job["dtype"], job["view"][0], job["view"][1])
    lo, hi = job["docs"]
    docs = view.documents(lo, hi)
    dtype = np.dtype(job["dtype"])
    records = {}
    for L, prefix in job["targets"].items():
        rng = np.random.default_rng([job["seed"], int(L), SPLITS.index(split), job["chunk"]])
        samples = list(build_samples(docs, int(L), rng, job["cls_id"], job["sep_id"], job["short_seq_prob"],
                                     sentence_order=job["sentence_order"], negatives=view, first_index=lo))
        offsets, labels, lengths = [], [], []
        with open(f"{prefix}.tar", "wb") as f:
            writer = UstarWriter(f)
            for i, j in enumerate(rng.permutation(len(samples))):
                s = samples[j]
                sample_members(writer, sample_key(job["chunk"], i), s.ids, s.a_len, s.nsp_label, dtype)
                offsets.append(writer.position)
                labels.append(s.nsp_label)
                lengths.append(len(s.ids))
            writer.flush()
        record = {"key": job["keys"][L], "samples": len(samples), "offsets": offsets, "lengths": lengths,
                  "labels": labels}
        write_atomic(f"{prefix}.json", json.dumps(record), sync=False)
        records[L] = record
        state.progress("samples", len(samples))
    return records


_TASKS = {"tokenize": _tokenize_group, "pair": _pair_chunk}


# --- stage 3: assemble ----------------------------------------------------------------------------------


class _Assembler:
    """Appends one split's fragments, in chunk order, to full shards of one target; resumable per shard.

    Its record lists every closed shard with where it ends in the stream of chunks, its tokens and
    its label counts; a shard is renamed into place only after the record lists it. A rerun keeps
    the longest run of listed shards that are in place and continues after the last of them.
    """

    def __init__(self, target: Path, split: str, per_shard: int, key: str):
        self.target, self.split, self.per_shard, self.key = target, split, per_shard, key
        self.record_path = target / WORK_DIR / f"assembly-{split}.json"
        self.shards: list[dict] = []  # manifest entries plus "end", "tokens", "labels"
        self.next_chunk = self.next_sample = 0
        self._open: ShardFile | None = None
        self._open_tokens, self._open_labels = 0, [0, 0]
        self._closed: list[ShardFile] = []  # closed, to be published once the record lists them
        record = _read_json(self.record_path)
        if record and record.get("key") == key:
            for entry in record["shards"]:
                f = target / entry["name"]
                if not f.is_file() or f.stat().st_size != entry["bytes"]:
                    break
                self.shards.append(entry)
            if self.shards:
                self.next_chunk, self.next_sample = self.shards[-1]["end"]

    def _save(self) -> None:
        """Record the closed shards, then let them appear."""
        write_atomic(self.record_path, json.dumps({"key": self.key, "shards": self.shards}), sync=False)
        for shard in self._closed:
            shard.publish()
        self._closed.clear()

    def _close(self, end: tuple[int, int]) -> None:
        entry = self._open.close()
        self.shards.append({**entry, "end": list(end), "tokens": self._open_tokens, "labels": self._open_labels})
        self._closed.append(self._open)
        self._open, self._open_tokens, self._open_labels = None, 0, [0, 0]

    def add(self, chunk: int, prefix: str, record: dict) -> None:
        """The chunk's fragment (chunks arrive in order, from next_chunk on)."""
        ends = [0] + record["offsets"]
        lengths, labels = record["lengths"], record["labels"]
        data = memoryview(Path(f"{prefix}.tar").read_bytes())
        i = self.next_sample if chunk == self.next_chunk else 0
        n = record["samples"]
        while i < n:
            if self._open is None:
                self._open = ShardFile(self.target, shard_name(self.split, len(self.shards)))
            take = min(self.per_shard - self._open.samples, n - i)
            self._open.append(data[ends[i] : ends[i + take]], take)
            self._open_tokens += sum(lengths[i : i + take])
            ones = sum(labels[i : i + take])
            self._open_labels = [self._open_labels[0] + take - ones, self._open_labels[1] + ones]
            i += take
            if self._open.samples == self.per_shard:
                self._close((chunk, i) if i < n else (chunk + 1, 0))
        if self._closed:  # one record per chunk, however many shards it closed
            self._save()
        for suffix in (".tar", ".json"):  # consumed: a crash from here on rebuilds it if needed
            Path(prefix + suffix).unlink(missing_ok=True)

    def finish(self, chunks: int) -> dict:
        """The split's entry for the manifest."""
        if self._open is not None:
            self._close((chunks, 0))
        self._save()
        return {"shards": [{k: s[k] for k in ("name", "samples", "bytes", "crc32")} for s in self.shards],
                "samples": sum(s["samples"] for s in self.shards), "tokens": sum(s["tokens"] for s in self.shards),
                "labels": [sum(s["labels"][0] for s in self.shards), sum(s["labels"][1] for s in self.shards)]}

    def abort(self) -> None:
        for shard in self._closed + ([self._open] if self._open is not None else []):
            shard.abort()


# --- the directory: lock, ownership, reuse ---------------------------------------------------------------

_OUR_TEMPORARY = re.compile(r"^\.shard-\d+\.tar\..+\.tmp$")


def _listed(manifest: Mapping | None) -> set[str]:
    if not manifest:
        return set()
    return {s["name"] for e in manifest.get("splits", {}).values() for s in e.get("shards", [])}


def _claim(target: Path) -> set[str]:
    """Set the target's old manifest aside and return the shard files the build may replace or remove.

    Those are the files a previous manifest or an interrupted build of this directory listed; any
    other ``shard-*`` file in ``train/`` or ``valid/`` makes the build refuse to start, since it
    could overwrite it.
    """
    work = target / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    previous = work / "previous-index.json"
    owned = _listed(_read_json(previous))
    current = _read_json(target / "index.json")
    if current is not None:
        owned |= _listed(current)
        merged = {"splits": {"earlier": {"shards": [{"name": n} for n in sorted(owned)]}}}
        write_atomic(previous, json.dumps(merged))
        (target / "index.json").unlink()  # a stale manifest must not describe the new shards
    for split in SPLITS:
        owned |= _listed({"splits": {split: _read_json(work / f"assembly-{split}.json") or {}}})
    foreign = []
    for split in SPLITS:
        folder = target / split
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if _OUR_TEMPORARY.match(f.name):
                f.unlink(missing_ok=True)  # our own partial shard from an interrupted build
            elif f.name.startswith("shard-") and f"{split}/{f.name}" not in owned:
                foreign.append(str(f))
    if foreign:
        listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{target} already holds shard files that no bertscale build of this directory listed "
                         f"({listing}); the build could overwrite them and never deletes files it did not write: "
                         "move them away or choose another --out")
    return owned


def _up_to_date(target: Path, build: dict) -> dict | None:
    """The target's manifest if it was built from the same inputs and options and its shards are intact."""
    manifest = _read_json(target / "index.json")
    if not manifest or manifest.get("format") != FORMAT or manifest.get("build") != build:
        return None
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            f = target / s["name"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                return None
    return manifest


# --- the build ----------------------------------------------------------------------------------------


def _groups(files: list[Path], workers: int) -> list[list[int]]:
    """Consecutive input files in groups of similar size: several per task when they are small."""
    sizes = [f.stat().st_size for f in files]
    target = min(max(sum(sizes) // (4 * workers), GROUP_BYTES[0]), GROUP_BYTES[1])
    groups, current, size = [], [], 0
    for i, n in enumerate(sizes):
        current.append(i)
        size += n
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


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
    documents: str = "blank-lines",
    check_layout: bool = True,
) -> dict:
    """Tokenize the corpus once, build sentence-pair samples and write train/valid shards.

    ``seq_len`` is one length (shards go to out_dir, the manifest is returned) or several (shards
    go to out_dir/seq{L}, or to ``out_dirs[L]``; returns {seq_len: manifest}). ``workers``
    processes (default: one per core) share the work; the result does not depend on their number.
    ``sentence_order`` makes negatives swapped segments (ALBERT's SOP) instead of random B's. A
    directory already built from the same inputs and options is left as it is. ``documents`` (one of
    ``corpus.DOCUMENT_MODES``) says how .txt files split into documents; in ``blank-lines`` mode a corpus
    that looks written in paragraphs is named in a warning at the start, suggesting ``file``
    (``check_layout=False``: the caller wrote the corpus and knows its documents, as the demo does).
    """
    lens = [int(seq_len)] if isinstance(seq_len, (int, np.integer)) else [int(x) for x in seq_len]
    if not lens or len(set(lens)) != len(lens):
        raise ValueError(f"seq_len must be one or more distinct lengths, got {seq_len!r}")
    if min(lens) < 5:
        raise ValueError(f"seq_len {min(lens)} is too short for [CLS] A [SEP] B [SEP]; use >= 5")
    per_shard = {L: int(samples_per_shard[L] if isinstance(samples_per_shard, Mapping) else samples_per_shard)
                 for L in lens}
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
    check_document_mode(documents)
    files = expand_inputs(inputs)
    info = tokenizer_info(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # fail here, not in a worker, when tokenizer.json is missing
    refuse_binary_files(files)
    for target in targets.values():
        require_writable_dir(target, "shard output directory")
    with ExitStack() as locks:
        for L in sorted(targets):
            locks.enter_context(ExclusiveLock(targets[L] / LOCK_FILE, f"shard directory {targets[L]}"))
        return _build_locked(files, tokenizer_dir, info, targets, per_shard, seed, valid_fraction, short_seq_prob,
                             sentence_order, workers, show_progress, documents, check_layout)


def _build_locked(files: list[Path], tokenizer_dir, info: TokenizerInfo, targets: dict[int, Path],
                  per_shard: dict[int, int], seed: int, valid_fraction: float, short_seq_prob: float,
                  sentence_order: bool, workers: int | None, show_progress: bool, documents: str,
                  check_layout: bool) -> dict:
    start = time.perf_counter()
    lens = sorted(targets)
    dtype = ids_dtype(info.vocab_size)
    identities = [_file_identity(f) for f in files]
    store_params = {"version": _STORE_VERSION, "inputs": _digest(identities), "tokenizer": info.fingerprint,
                    "seed": seed, "valid_fraction": valid_fraction, "dtype": dtype.name, "documents": documents}
    params = {"seed": seed, "valid_fraction": valid_fraction, "short_seq_prob": short_seq_prob,
              "sentence_order": sentence_order, "dtype": dtype.name, "tokenizer_fingerprint": info.fingerprint,
              "format": FORMAT, "documents": documents}
    builds = {L: {"inputs": store_params["inputs"], "files": len(files), "params": params,
                  "samples_per_shard": per_shard[L]} for L in lens}
    done = {L: m for L in lens if (m := _up_to_date(targets[L], builds[L])) is not None}
    for L in done:
        log.info("%s is up to date (built from the same inputs and options); nothing to do", targets[L])
    todo = [L for L in lens if L not in done]
    if todo:
        layout = paragraph_layout(files) if documents == "blank-lines" and check_layout else None
        if layout is not None:
            log.warning("%s", layout)
        owned = {L: _claim(targets[L]) for L in todo}
        n_workers = max(1, workers or os.cpu_count() or 1)
        bars = _Progress(show_progress)
        with _Pool(n_workers, bars.update) as pool:
            store_dir, counts, corpus, views = _tokenize(files, identities, tokenizer_dir, targets[todo[0]], dtype,
                                                         store_params, seed, valid_fraction, n_workers, pool, bars)
            built = _pair_and_assemble(store_dir, views, counts, {L: targets[L] for L in todo}, per_shard, builds,
                                       params, info, dtype, short_seq_prob, sentence_order, n_workers, pool, bars)
        bars.close()
        elapsed = time.perf_counter() - start
        for L in todo:
            _require_samples(built[L], L, corpus)
        for L in todo:
            done[L] = _finish(targets[L], L, built[L], owned[L], builds[L], params, info, per_shard[L], corpus,
                              sum(c["tokens"] for c in counts.values()), elapsed)
    return done[lens[0]] if len(lens) == 1 else {L: done[L] for L in lens}


class _Progress:
    """One bar per stage: tokens tokenized, then samples written."""

    def __init__(self, show: bool):
        self.show = show
        self.bars: dict[str, tqdm] = {}
        self.start = time.perf_counter()

    def update(self, kind: str, n: int) -> None:
        if kind not in self.bars:
            for bar in self.bars.values():
                bar.close()
            unit = " tok" if kind == "tokens" else " samples"
            self.bars[kind] = progress_bar(desc="tokenize" if kind == "tokens" else "pair", unit=unit,
                                           unit_scale=True, disable=not self.show, dynamic_ncols=True)
        self.bars[kind].update(n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _tokenize(files, identities, tokenizer_dir, home: Path, dtype, store_params: dict, seed: int,
              valid_fraction: float, workers: int, pool: _Pool, bars: _Progress):
    """Stage 1 and the join: the store directory, per-split counts, corpus stats, and each split's view."""
    work = home / WORK_DIR
    store_dir = work / "store"
    store_key = _digest(store_params)
    record = _read_json(store_dir / "store.json")
    if record is None or record.get("key") != store_key:
        groups = _groups(files, workers)
        parts = work / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        jobs, records = [], {}
        for g, members in enumerate(groups):
            key = _digest({**store_params, "files": [identities[i] for i in members]})
            prefix = parts / f"group-{g:06d}"
            old = _read_json(Path(f"{prefix}.json"))
            if old is not None and old.get("key") == key:
                records[g] = old
                continue
            jobs.append({"files": [(i, str(files[i])) for i in members], "prefix": str(prefix), "key": key,
                         "tokenizer_dir": str(tokenizer_dir), "dtype": dtype.name, "seed": seed,
                         "valid_fraction": valid_fraction, "group": g, "documents": store_params["documents"],
                         "threads": None if workers == 1 else len(groups) < workers,
                         "what": f"{files[members[0]]}" + (f" (and {len(members) - 1} more files)"
                                                            if len(members) > 1 else "")})
        if records:
            log.info("resuming: %d of %d input groups already tokenized", len(records), len(groups))
        for i, result in pool.run("tokenize", jobs):
            records[jobs[i]["group"]] = result
        prefixes = [parts / f"group-{g:06d}" for g in range(len(groups))]
        counts = docstore.join_parts(prefixes, store_dir)
        corpus = CorpusStats()
        for g in range(len(groups)):
            corpus.add(records[g]["corpus"])
        record = {"key": store_key, "counts": counts, "corpus": corpus.__dict__}
        write_atomic(store_dir / "store.json", json.dumps(record), sync=False)
        shutil.rmtree(parts, ignore_errors=True)
    counts = record["counts"]
    corpus = CorpusStats(**record["corpus"])
    n_train, n_valid = counts["train"]["docs"], counts["valid"]["docs"]
    views = {"train": ("train", 0, n_train), "valid": ("valid", 0, n_valid)}
    if n_valid == 0 and n_train >= 2 and valid_fraction > 0:
        # a tiny corpus whose hash split held nothing out: hold out its last document
        views = {"train": ("train", 0, n_train - 1), "valid": ("train", n_train - 1, n_train)}
    return store_dir, counts, corpus, views


def _pair_and_assemble(store_dir: Path, views: dict, counts: dict, targets: dict[int, Path], per_shard: dict,
                       builds: dict, params: dict, info: TokenizerInfo, dtype, short_seq_prob: float,
                       sentence_order: bool, workers: int, pool: _Pool, bars: _Progress) -> dict[int, dict]:
    """Stages 2 and 3 for every target: {seq_len: {split: {"shards", "samples", "tokens", "labels"}}}."""
    result: dict[int, dict] = {L: {} for L in targets}
    for split in SPLITS:
        store_split, lo, hi = views[split]
        view = docstore.StoreSplit(store_dir, store_split, dtype, lo, hi)
        bounds = docstore.chunks(view, CHUNK_TOKENS)
        keys = {L: _digest({**builds[L], "split": split, "chunk_tokens": CHUNK_TOKENS}) for L in targets}
        assemblers = {L: _Assembler(targets[L], split, per_shard[L], keys[L]) for L in targets}
        frag = {L: targets[L] / WORK_DIR / "fragments" / split for L in targets}
        for d in frag.values():
            d.mkdir(parents=True, exist_ok=True)
        jobs, ready = [], {}
        for c, (a, b) in enumerate(bounds):
            need = {L: str(frag[L] / f"chunk-{c:06d}") for L in targets if c >= assemblers[L].next_chunk}
            if not need:
                continue
            have = {L: r for L, p in need.items()
                    if (r := _read_json(Path(p + ".json"))) is not None and r.get("key") == keys[L]
                    and Path(p + ".tar").is_file()}
            if len(have) == len(need):
                ready[c] = (need, have)
                continue
            jobs.append({"split": split, "chunk": c, "docs": (a, b), "store": str(store_dir),
                         "store_split": store_split, "view": (lo, hi), "dtype": dtype.name, "seed": params["seed"],
                         "targets": {L: p for L, p in need.items() if L not in have}, "keys": keys,
                         "cls_id": info.cls_id, "sep_id": info.sep_id, "short_seq_prob": short_seq_prob,
                         "sentence_order": sentence_order, "what": f"{split} chunk {c} of {len(bounds)}",
                         "have": have, "need": need})
        try:
            results = pool.run("pair", jobs, window=4 * workers)
            pending = dict(ready)
            in_jobs = {job["chunk"] for job in jobs}
            for c in range(len(bounds)):
                if c not in pending and c not in in_jobs:
                    continue  # every target is past this chunk (an interrupted build's closed shards)
                while c not in pending:
                    i, records = next(results)
                    pending[jobs[i]["chunk"]] = (jobs[i]["need"], {**jobs[i]["have"], **records})
                need, records = pending.pop(c)
                for L, prefix in need.items():
                    assemblers[L].add(c, prefix, records[L])
            for L in targets:
                result[L][split] = assemblers[L].finish(len(bounds))
        except BaseException:
            for a in assemblers.values():
                a.abort()
            raise
        del view
    return result


def _report(manifest: dict, corpus: CorpusStats) -> dict:
    """What the build produced, and warnings when it looks wrong for pretraining."""
    L = manifest["seq_len"]
    splits = manifest["splits"]
    samples = sum(e["samples"] for e in splits.values())
    tokens = sum(e["tokens"] for e in splits.values())
    fill = tokens / max(samples * L, 1)
    train = splits["train"]
    negatives = train["labels"][1] / max(train["samples"], 1)
    task = manifest["pair_task"]
    warnings = []
    if train["samples"] and abs(negatives - 0.5) * 100 > BALANCE_WARN_POINTS:
        what = "random-B (IsRandom)" if task == "nsp" else "swapped"
        why = ""
        if task == "nsp":
            why = ("; most documents have no other document of their split to draw a B from" if negatives < 0.5 else
                   "; documents are short: a chunk of one sentence always takes a random B")
        warnings.append(f"{negatives:.1%} of the training pairs are {what}, more than {BALANCE_WARN_POINTS} points "
                        f"from 50%: the {task.upper()} task is unbalanced{why}")
    if samples and fill < FILL_WARN:
        warnings.append(f"samples fill {fill:.0%} of the {L} positions on average (under {FILL_WARN:.0%}): "
                        f"documents are short for this length; most of each batch would be padding")
    return {
        "samples": {s: e["samples"] for s, e in splits.items()},
        "tokens": {s: e["tokens"] for s, e in splits.items()},
        "mean_fill": round(fill, 4),
        "pair_task": task,
        "label_balance": {s: {"0": e["labels"][0], "1": e["labels"][1],
                              "fraction_1": round(e["labels"][1] / max(e["samples"], 1), 4)}
                          for s, e in splits.items()},
        "documents": corpus.documents,
        "files_read": corpus.files,
        "files_skipped": corpus.skipped_files,
        "warnings": warnings,
    }


def _require_samples(built: dict, seq_len: int, corpus: CorpusStats) -> None:
    if built["train"]["samples"] == 0:
        skipped = f"; files skipped: {corpus.skipped_files[:3]}" if corpus.skipped_files else ""
        raise ValueError(
            f"the corpus gave no training samples at seq_len {seq_len} ({corpus.summary()}{skipped}): a sample "
            "needs a document with at least two tokens; check the inputs (documents are separated by blank lines "
            "in .txt, one per line in .jsonl)")


def _finish(target: Path, seq_len: int, built: dict, owned: set[str], build: dict, params: dict,
            info: TokenizerInfo, per_shard: int, corpus: CorpusStats, corpus_tokens: int, elapsed: float) -> dict:
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": params["dtype"],
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab_size,
        "cls_id": info.cls_id,
        "sep_id": info.sep_id,
        "seed": params["seed"],
        "short_seq_prob": params["short_seq_prob"],
        "valid_fraction": params["valid_fraction"],
        "pair_task": "sop" if params["sentence_order"] else "nsp",
        "documents": params["documents"],
        "samples_per_shard": per_shard,
        "splits": built,
        "corpus": corpus.__dict__,
        "corpus_tokens": corpus_tokens,
        "build_seconds": round(elapsed, 3),
        "build": build,
    }
    manifest["report"] = _report(manifest, corpus)
    write_manifest(target, manifest)
    listed = _listed(manifest)
    for name in sorted(owned - listed):  # an earlier build's shards that this one did not rewrite
        (target / name).unlink(missing_ok=True)
    shutil.rmtree(target / WORK_DIR, ignore_errors=True)
    for line in describe_build(manifest, target):
        log.info("%s", line)
    for warning in manifest["report"]["warnings"]:
        log.warning("%s: %s", target, warning)
    if corpus.replaced_chars:
        log.warning("%d undecodable characters were replaced with U+FFFD", corpus.replaced_chars)
    return manifest


def describe_build(manifest: dict, where: str | os.PathLike) -> list[str]:
    """The build report of a manifest in a few lines, for people."""
    r = manifest.get("report")
    sp = manifest["splits"]
    lines = [f"wrote {sp['train']['samples']} training and {sp['valid']['samples']} validation samples "
             f"({len(sp['train']['shards'])} + {len(sp['valid']['shards'])} shards) at seq_len {manifest['seq_len']} "
             f"to {where}"]
    if r:
        bal = r["label_balance"]
        what = "random-B pairs" if r["pair_task"] == "nsp" else "swapped pairs"
        lines.append(f"  {sum(r['tokens'].values())} tokens, mean fill {r['mean_fill']:.1%}; {what}: "
                     f"train {bal['train']['fraction_1']:.1%}, valid {bal['valid']['fraction_1']:.1%}; "
                     f"{r['documents']} documents from {r['files_read']} files"
                     f"{'; build ' + str(manifest['build_seconds']) + ' s' if 'build_seconds' in manifest else ''}")
        for skipped in r["files_skipped"]:
            lines.append(f"  skipped {skipped['file']}: {skipped['why']}")
    return lines

