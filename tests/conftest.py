"""Shared tiny assets built in-process: a generated corpus, a WordPiece tokenizer, shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "dor", "len", "fis", "gar"]


def make_words(rng: np.random.Generator, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))))
    return sorted(words)


def write_generated_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """A .txt corpus of n_docs documents of pseudo-word sentences, separated by blank lines."""
    rng = np.random.default_rng(seed)
    words = make_words(rng, 300)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            lines = []
            for _ in range(int(rng.integers(1, 6))):
                sentences = []
                for _ in range(int(rng.integers(1, 4))):
                    sent = " ".join(rng.choice(words, size=int(rng.integers(3, 14)), p=zipf))
                    sentences.append(sent.capitalize() + rng.choice([".", "!", "?"]))
                lines.append(" ".join(sentences))
            f.write("\n".join(lines) + "\n\n")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_generated_corpus(tmp_path_factory.mktemp("corpus") / "gen.txt", n_docs=400)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, tmp_path_factory) -> Path:
    from bertscale.tokenizer import train_tokenizer

    return train_tokenizer([corpus_file], vocab_size=200, out_dir=tmp_path_factory.mktemp("tok"), show_progress=False)


@pytest.fixture(scope="session")
def shard_dir(corpus_file, tokenizer_dir, tmp_path_factory) -> Path:
    from bertscale.shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards([corpus_file], tokenizer_dir, seq_len=64, out_dir=out, samples_per_shard=40,
                 seed=7, valid_fraction=0.05, show_progress=False)
    return out
