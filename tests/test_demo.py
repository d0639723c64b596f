"""`bertscale demo`: run twice, it continues instead of failing (11.3); it trains whatever holds port 29500 (14.1)."""

import json
import socket
import subprocess
import sys

import pytest

from bertscale import checkpoint as ckpt
from bertscale.cli import main
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info
from conftest import write_generated_corpus
from launcher import launch


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


def _listen(port: int) -> socket.socket | None:
    """A socket listening on ``port`` on every address, or None if another process already holds it."""
    sock = socket.socket()
    try:
        sock.bind(("", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.mark.slow
def test_demo_trains_while_port_29500_is_held_and_its_picked_port_is_taken(tmp_path, monkeypatch):
    """`make demo ARGS=...` scaled down, with 29500 held by another socket and the first port the launcher
    picks taken before rank 0 can listen on it (a real bind race): the demo still trains, on a port it picked
    again, and applies its --set overrides."""
    corpus = str(write_generated_corpus(tmp_path / "corpus.txt", n_docs=150, seed=2))
    out = tmp_path / "demo"
    default = _listen(29500)  # None: another process holds it already, which serves as well
    raced = _listen(0)
    raced_port = raced.getsockname()[1]
    picks = iter([raced_port])
    real_free_port = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: next(picks, None) or real_free_port())
    try:
        code = main(["demo", "--corpus", corpus, "--out", str(out), "--steps1", "2", "--steps2", "1",
                     "--set", "train.log_interval=1", "--set", "model.num_hidden_layers=1",
                     "--set", "phases.phase1.micro_batch=16", "--set", "phases.phase2.micro_batch=8"])
    finally:
        raced.close()
        if default is not None:
            default.close()
    assert code == 0
    assert next(picks, None) is None  # the launcher did pick the raced port first
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["train"]["log_interval"] == 1 and saved["model"]["num_hidden_layers"] == 1
    final = ckpt.final_of_phase(out / "checkpoints", 1)
    assert final is not None and final.global_step == 3
    log = (out / "train.log").read_text()
    assert f"master port {raced_port}: a free port picked for this single-node run" in log
    # one retry: phase 2 started on the port phase 1's retry picked, not the taken one
    assert log.count(f"master port {raced_port} was taken by another process") == 1
    assert "was taken by another process" not in log.split("phase phase2:")[1]
    assert (out / "hf" / "model.safetensors").stat().st_mode & 0o044 == 0o044  # group and others may read it
