#!/usr/bin/env python3
"""Measure the data path on one text: raw tokenizer, shard builder, streaming loader.

    python tools/bench_data.py --json            # stdlib docstrings as the text, all cores
    python tools/bench_data.py --corpus my.txt --workers 8 --json

(a) the ``tokenizers`` library's batch encoding (``encode_batch_fast``, the call the builder
makes) of every sentence held in memory (all cores, its own threads); (b) ``build_shards`` end to
end at 128 and 512 in one pass (``--workers`` processes; the text, dealt ``--repeat`` times over,
is split into that many files so they can run in parallel); (c) the loader (tar read + decode +
masking + collate) in one process, so its samples/s is per core. With ``--json`` the last line is
one JSON object with tokenizer_tokens_per_s, build_tokens_per_s, build_to_tokenizer (their ratio),
loader_samples_per_s_per_core_128 and loader_samples_per_s_per_core_512.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

from bertscale.corpus import iter_documents, write_stdlib_corpus
from bertscale.shards import build_shards
from bertscale.tokenizer import load_tokenizer, tokenizer_info, train_tokenizer


def split_corpus(src: Path, out_dir: Path, parts: int, repeat: int = 1) -> list[Path]:
    """Deal the documents of src, `repeat` times over, round-robin into `parts` .txt files."""
    files = [out_dir / f"part{i}.txt" for i in range(parts)]
    handles = [open(f, "w", encoding="utf-8") for f in files]
    docs = list(iter_documents([src]))
    for i, doc in enumerate(docs * repeat):
        handles[i % parts].write(" ".join(doc) + "\n\n")
    for h in handles:
        h.close()
    return files


def tokenizer_rate(files: list[Path], tokenizer_dir: Path) -> tuple[float, int]:
    tok = load_tokenizer(tokenizer_dir)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the call the builder makes
    sentences = [s for doc in iter_documents(files) for s in doc]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(sentences), 10000):
        tokens += sum(len(e.ids) for e in encode(sentences[i : i + 10000], add_special_tokens=False))
    return tokens / (time.perf_counter() - start), tokens


def loader_rate(data_dir: Path, tokenizer_dir: Path, micro_batch: int, max_samples: int) -> float:
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
    return samples / (time.perf_counter() - start)


def loader_batches(loader) -> int:
    per_epoch = getattr(loader, "batches_per_epoch", None)
    if callable(per_epoch):
        per_epoch = per_epoch()
    return int(per_epoch) if per_epoch else 10**9


def bench(corpus: Path | None, workers: int, work: Path, max_docs: int, vocab_size: int, max_samples: int,
          repeat: int = 1) -> dict:
    if corpus is None:
        corpus = work / "stdlib.txt"
        write_stdlib_corpus(corpus, max_documents=max_docs)
    (work / "text").mkdir()
    files = split_corpus(corpus, work / "text", workers, repeat)
    tok_dir = train_tokenizer(files, vocab_size=vocab_size, out_dir=work / "tok", show_progress=False)
    tok_rate, tokens = tokenizer_rate(files, tok_dir)
    start = time.perf_counter()
    build_shards(files, tok_dir, [128, 512], work / "shards", samples_per_shard=2000, workers=workers,
                 show_progress=False)
    build_rate = tokens / (time.perf_counter() - start)
    return {
        "tokenizer_tokens_per_s": round(tok_rate),
        "build_tokens_per_s": round(build_rate),
        "build_to_tokenizer": round(build_rate / tok_rate, 3),
        "loader_samples_per_s_per_core_128": round(loader_rate(work / "shards" / "seq128", tok_dir, 32, max_samples)),
        "loader_samples_per_s_per_core_512": round(loader_rate(work / "shards" / "seq512", tok_dir, 8, max_samples)),
        "corpus_tokens": tokens,
        "build_workers": workers,
        "cores": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a .txt/.jsonl corpus (default: stdlib docstrings)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard build processes")
    parser.add_argument("--max-docs", type=int, default=20000, help="documents of the default corpus")
    parser.add_argument("--repeat", type=int, default=8,
                        help="deal the corpus this many times over, so that the builder's start-up (process spawn, "
                             "tokenizer load: about half a second) does not dominate its rate")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-samples", type=int, default=40000,
                        help="loader samples timed per length (at most one epoch)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        result = bench(args.corpus, max(1, args.workers), Path(tmp), args.max_docs, args.vocab_size, args.max_samples,
                       max(1, args.repeat))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>36}: {v:,}")


if __name__ == "__main__":
    main()
