"""Shared tiny assets built in-process: a generated corpus, a WordPiece tokenizer, shards; and a HOME of
the test session's own."""

from __future__ import annotations

import os
import shutil
import tempfile
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


def pytest_report_header(config: pytest.Config) -> str:
    """Where the suite runs: the CPU, its bf16 capability and what train.precision = auto trains in here (the
    real runs follow it; on a CPU without native bf16, only the tests about bf16 itself compute in bf16)."""
    from bertscale.hardware import choose, cpu_info

    cpu = cpu_info()
    return (f"bertscale: {cpu.model}, bf16 {cpu.describe_bf16()}; train.precision = auto trains in "
            f"{choose('auto', 'cpu').name}")


_REAL_HOME = pytest.StashKey[str | None]()
_TEST_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Give the session, and every process a test starts (the launcher, ``deepspeed``, its ranks), an empty
    HOME: DeepSpeed merges ``~/.deepspeed_env`` into the ranks' environment, so a developer's own file
    (NCCL settings, LD_LIBRARY_PATH, ...) would otherwise reach the test ranks. Set before collection,
    so nothing imported by a test module reads the real one either. Tests download nothing, so empty
    caches under it cost nothing."""
    config.stash[_REAL_HOME] = os.environ.get("HOME")
    config.stash[_TEST_HOME] = tempfile.mkdtemp(prefix="bertscale-test-home-")
    os.environ["HOME"] = config.stash[_TEST_HOME]


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_TEST_HOME, None)
    if home is None:
        return
    real = config.stash[_REAL_HOME]
    if real is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = real
    shutil.rmtree(home, ignore_errors=True)


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


@pytest.fixture(scope="session")
def run_data(tmp_path_factory) -> dict[str, Path]:
    """``runs.build_data``'s corpus, tokenizer and 128/512 shards, built once for every test that trains through
    the launcher; tests that damage or extend them work on copies."""
    from runs import build_data

    return build_data(tmp_path_factory.mktemp("run-data"))


PLAIN_RUN_SETTINGS = ["model.dropout=0.0", "train.log_interval=1", "train.save_interval=100"]
"""``plain_run``'s overrides of ``runs.run_config``: no dropout (so another batch layout can take the same
steps) and a figure every step."""


@pytest.fixture(scope="session")
def plain_run_dir(run_data, tmp_path_factory) -> Path:
    """The output folder of one real 2-rank run on ``run_data`` (4 + 2 steps, local folders, unpadded batches,
    ``PLAIN_RUN_SETTINGS``; ``runs.run_config`` otherwise: seed 7, eval_batches 2); tests read, never change it."""
    from launcher.launch import pretrain
    from runs import write_config

    tmp = tmp_path_factory.mktemp("plain-run")
    return pretrain(str(write_config(tmp, run_data, steps=(4, 2))), PLAIN_RUN_SETTINGS + ["train.unpadded=true"])


@pytest.fixture(scope="session")
def plain_run(plain_run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of ``plain_run_dir``: the reference that runs changing one thing (padded batches, data
    served over HTTP) must reproduce."""
    from bertscale.metrics import read_scalars

    return read_scalars(plain_run_dir / "tensorboard")
