#!/usr/bin/env python3
"""Measure the data path on one text: raw tokenizer, shard builder, streaming loader.

    python tools/bench_data.py --json            # stdlib docstrings as the text, all cores
    python tools/bench_data.py --corpus my.txt --workers 8 --json

(a) the ``tokenizers`` library's batch encoding (``encode_batch_fast``, the call the builder
makes) of every sentence held in memory (all cores, its own threads); (b) ``build_shards`` end to
end at 128 and 512 in one pass (``--workers`` processes; the text, dealt ``--repeat`` times over,
is split into that many files so they can run in parallel); (c) the loader (tar read + decode +
masking + collate) in one process, so its samples/s is per core; (d) the same build from the
same text dealt into ``--many-files`` small files; (e) the loader at 128 reading the shards over
HTTP from a ``http.server`` in another process on 127.0.0.1. With ``--json`` the last line is one
JSON object with tokenizer_tokens_per_s, build_tokens_per_s, build_to_tokenizer (their ratio),
loader_samples_per_s_per_core_128, loader_samples_per_s_per_core_512,
build_tokens_per_s_many_files, build_many_files_to_tokenizer,
loader_samples_per_s_per_core_128_http and http_to_local_loader (null where the code under test
cannot read URLs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertscale.corpus import iter_documents, write_stdlib_corpus
from bertscale.hardware import machine_report
from bertscale.shards import build_shards
from bertscale.tokenizer import load_tokenizer, tokenizer_info, train_tokenizer


def split_corpus(src: Path, out_dir: Path, parts: int, repeat: int = 1) -> list[Path]:
    """Deal the documents of src, `repeat` times over, round-robin into `parts` .txt files."""
    return deal(list(iter_documents([src])) * repeat, out_dir, parts)


def deal(docs: list[list[str]], out_dir: Path, parts: int) -> list[Path]:
    """Deal documents round-robin into `parts` .txt files under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"part{i:06d}.txt" for i in range(parts)]
    texts: list[list[str]] = [[] for _ in files]
    for i, doc in enumerate(docs):
        texts[i % parts].append(" ".join(doc) + "\n\n")
    for f, t in zip(files, texts):
        f.write_text("".join(t), encoding="utf-8")
    return files


def build_rate(files: list[Path], tokenizer_dir: Path, out: Path, tokens: int, workers: int) -> float:
    """Tokens/s of build_shards end to end at 128 and 512 in one pass."""
    start = time.perf_counter()
    build_shards(files, tokenizer_dir, [128, 512], out, samples_per_shard=2000, workers=workers, show_progress=False)
    return tokens / (time.perf_counter() - start)


class HTTPServerProcess:
    """``python -m http.server`` on 127.0.0.1 in its own process (port chosen by the OS), serving directory."""

    _CODE = ("import functools, http.server, sys\n"
             "class H(http.server.SimpleHTTPRequestHandler):\n"
             "    def log_message(self, *a): pass\n"
             "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(H, directory=sys.argv[1]))\n"
             "print(s.server_address[1], flush=True)\n"
             "s.serve_forever()\n")

    def __init__(self, directory: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self._CODE, str(directory)], stdout=subprocess.PIPE,
                                     text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.proc.stdout.close()


def tokenizer_rate(files: list[Path], tokenizer_dir: Path) -> tuple[float, int]:
    tok = load_tokenizer(tokenizer_dir)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the call the builder makes
    sentences = [s for doc in iter_documents(files) for s in doc]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(sentences), 10000):
        tokens += sum(len(e.ids) for e in encode(sentences[i : i + 10000], add_special_tokens=False))
    return tokens / (time.perf_counter() - start), tokens


def loader_rate(data_dir: Path | str, tokenizer_dir: Path, micro_batch: int, max_samples: int) -> float:
    """Samples/s of the loader over up to max_samples samples (or an epoch), every shard read inside the
    timing: a shard is read whole, so timing a few batches past one shard read measures mostly that read."""
    # imported here: the builder's spawned processes re-import this script, and torch (which the
    # loader needs) would add seconds of start-up to each of them
    import torch

    from bertscale.loader import PretrainingLoader

    torch.set_num_threads(1)  # one core: the figure is per core
    info = tokenizer_info(tokenizer_dir)
    loader = PretrainingLoader(data_dir, micro_batch=micro_batch, rank=0, world_size=1, seed=1, tokenizer=info,
                               num_workers=0)
    n = min(max(1, max_samples // micro_batch), loader_batches(loader))
    start = time.perf_counter()
    samples = sum(int(b["input_ids"].shape[0]) for b in itertools.islice(iter(loader), n))
    rate = samples / (time.perf_counter() - start)
    if getattr(loader, "corrupt_shards", 0):  # a skipped shard would flatter the rate
        raise RuntimeError(f"{loader.corrupt_shards} shard(s) of {data_dir} could not be read")
    return rate


def loader_batches(loader) -> int:
    per_epoch = getattr(loader, "batches_per_epoch", None)
    if callable(per_epoch):
        per_epoch = per_epoch()
    return int(per_epoch) if per_epoch else 10**9


def bench(corpus: Path | None, workers: int, work: Path, max_docs: int, vocab_size: int, max_samples: int,
          repeat: int = 1, many_files: int = 2000) -> dict:
    if corpus is None:
        corpus = work / "stdlib.txt"
        write_stdlib_corpus(corpus, max_documents=max_docs)
    (work / "text").mkdir()
    files = split_corpus(corpus, work / "text", workers, repeat)
    tok_dir = train_tokenizer(files, vocab_size=vocab_size, out_dir=work / "tok", show_progress=False)
    tok_rate, tokens = tokenizer_rate(files, tok_dir)
    rate = build_rate(files, tok_dir, work / "shards", tokens, workers)
    small = deal(list(iter_documents(files)), work / "many", many_files)  # the same text, in many files
    rate_many = build_rate(small, tok_dir, work / "shards_many", tokens, workers)
    local_128 = loader_rate(work / "shards" / "seq128", tok_dir, 32, max_samples)
    with HTTPServerProcess(work / "shards" / "seq128") as url:
        try:
            http_128: float | None = loader_rate(url, tok_dir, 32, max_samples)
        except Exception as exc:  # the code under test may not read URLs (main before issue 11)
            logging.warning("the loader could not read %s: %s", url, exc)
            http_128 = None
    return {
        "tokenizer_tokens_per_s": round(tok_rate),
        "build_tokens_per_s": round(rate),
        "build_to_tokenizer": round(rate / tok_rate, 3),
        "loader_samples_per_s_per_core_128": round(local_128),
        "loader_samples_per_s_per_core_512": round(loader_rate(work / "shards" / "seq512", tok_dir, 8, max_samples)),
        "build_tokens_per_s_many_files": round(rate_many),
        "build_many_files_to_tokenizer": round(rate_many / tok_rate, 3),
        "loader_samples_per_s_per_core_128_http": None if http_128 is None else round(http_128),
        "http_to_local_loader": None if http_128 is None else round(http_128 / local_128, 3),
        "corpus_tokens": tokens,
        "many_files": many_files,
        "build_workers": workers,
        "cores": os.cpu_count(),
        **machine_report(),
        "precision": "none (no model compute: tokenizer, builder and loader only)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a .txt/.jsonl corpus (default: stdlib docstrings)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard build processes")
    parser.add_argument("--max-docs", type=int, default=20000, help="documents of the default corpus")
    parser.add_argument("--repeat", type=int, default=8,
                        help="deal the corpus this many times over, so that the builder's start-up (process spawn, "
                             "tokenizer load: about half a second) does not dominate its rate")
    parser.add_argument("--many-files", type=int, default=2000,
                        help="files the same text is dealt into for the many-small-files build")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-samples", type=int, default=40000,
                        help="loader samples timed per length (at most one epoch)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        result = bench(args.corpus, max(1, args.workers), Path(tmp), args.max_docs, args.vocab_size, args.max_samples,
                       max(1, args.repeat), max(1, args.many_files))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>38}: {v:,}" if isinstance(v, (int, float)) else f"{k:>38}: {v if v is not None else 'n/a'}")


if __name__ == "__main__":
    main()
