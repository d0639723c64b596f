"""`bertscale demo` run twice continues instead of failing (11.3): its tokenizer and shards are reused."""

import subprocess
import sys

from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info
from conftest import write_generated_corpus


def test_a_second_demo_reuses_the_tokenizer_and_shards_it_made(tmp_path):
    corpus = str(write_generated_corpus(tmp_path / "corpus.txt", n_docs=150, seed=2))
    out = tmp_path / "demo"
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); from pathlib import Path; "
            "from bertscale.demo import prepare_data; prepare_data(Path(sys.argv[1]), [sys.argv[2]], vocab_size=300)")
    first = subprocess.run([sys.executable, "-c", code, str(out), corpus], capture_output=True, text=True, check=True)
    assert "training a WordPiece tokenizer" in first.stderr
    made = {p: p.stat().st_mtime_ns for p in [*(out / "tokenizer").iterdir(), *out.rglob("*.tar"),
                                               *out.rglob("index.json")]}
    second = subprocess.run([sys.executable, "-c", code, str(out), corpus], capture_output=True, text=True, check=True)
    assert "reusing the WordPiece tokenizer" in second.stderr and "up to date" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nothing rebuilt
    fingerprint = tokenizer_info(out / "tokenizer").fingerprint
    for d in ("data128", "data512"):
        assert load_manifest(out / d, expect_fingerprint=fingerprint)
    # another vocabulary size is another tokenizer: trained again, and the shards rebuilt with it
    code3 = code.replace("vocab_size=300", "vocab_size=250")
    third = subprocess.run([sys.executable, "-c", code3, str(out), corpus], capture_output=True, text=True, check=True)
    assert "training a WordPiece tokenizer" in third.stderr
    assert load_manifest(out / "data128")["tokenizer_fingerprint"] == tokenizer_info(out / "tokenizer").fingerprint
