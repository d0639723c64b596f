"""`bertscale demo`: a second run continues instead of failing (11.3), it trains whatever holds port 29500
(14.1), and its model is judged by stock `transformers` on held-out text (15.4)."""

import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale.cli import main
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info
from conftest import write_generated_corpus
from launcher import ports


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


# --- the demo judged from outside (issue 15) --------------------------------------------------------

JUDGE_MARGIN = 0.06
"""How far above the most-frequent-token baseline the demo's model must score on held-out text
([MASK]-only, top-1). Measured on the test below: stock `transformers` 0.198 vs 0.094, the demo's own
eval 0.200 vs 0.073; a model that learned only word frequencies scores the baseline."""


def write_topic_corpus(path, n_docs: int, seed: int):
    """Documents in a made-up language with structure a tiny BERT learns in a hundred steps: each document
    keeps to one of 8 topics, and its sentences walk round that topic's 4 words in order (a tenth of the
    words are any of the 32), so a masked word is predictable from its document, not from word
    frequencies. ``seed`` picks the documents; the language is fixed."""
    from conftest import make_words

    words = make_words(np.random.default_rng(1234), 32)
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            topic = words[4 * int(rng.integers(8)):][:4]
            lines = []
            for _ in range(int(rng.integers(3, 8))):
                start = int(rng.integers(4))
                sentence = [topic[(start + i) % 4] if rng.random() < 0.9 else str(rng.choice(words))
                            for i in range(int(rng.integers(6, 14)))]
                lines.append(" ".join(sentence).capitalize() + ".")
            f.write("\n".join(lines) + "\n\n")
    return path


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo's pipeline and recipe (demo_config: tiny BERT, two ranks, both phases), scaled down to a
    small corpus and 150 + 2 steps (the launcher picks a free port); returns (out dir, its summary, a held-out text file)."""
    from bertscale.demo import convert_and_evaluate, demo_run_config, prepare_data
    from launcher.launch import pretrain

    tmp = tmp_path_factory.mktemp("judged_demo")
    train = write_topic_corpus(tmp / "train.txt", n_docs=1500, seed=1)
    held_out = write_topic_corpus(tmp / "heldout.txt", n_docs=200, seed=2)
    out = tmp / "demo"
    out.mkdir()
    prepare_data(out, [str(train)], vocab_size=300)
    run_dir = pretrain(demo_run_config(out, ranks=2, steps1=150, steps2=2, overrides=[]))  # a free port
    return out, convert_and_evaluate(out, run_dir), held_out


def judge(model_dir, text_file, seed: int = 0) -> tuple[float, float, int]:
    """Stock `transformers`, none of our code: replace 15 % of the word pieces of each held-out document
    with [MASK] and count top-1 hits; returns (accuracy, most-frequent-token baseline, masked count)."""
    import transformers

    tok = transformers.BertTokenizerFast.from_pretrained(model_dir)
    model = transformers.BertForMaskedLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    correct, targets = 0, []
    documents = [d for d in Path(text_file).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    for doc in documents:
        ids = tok(doc, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
        picked = torch.nonzero(torch.rand(ids.shape[1] - 2, generator=g) < 0.15).flatten() + 1
        if len(picked) == 0:
            continue
        answers = ids[0, picked].clone()
        ids[0, picked] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        correct += int((logits[0, picked].argmax(-1) == answers).sum())
        targets += answers.tolist()
    most_frequent = Counter(targets).most_common(1)[0][1]
    return correct / len(targets), most_frequent / len(targets), len(targets)


@pytest.mark.slow
def test_a_stock_transformers_judge_scores_the_demo_model_clearly_above_the_most_frequent_token(demo_model):
    pytest.importorskip("transformers")
    out, summary, held_out = demo_model
    accuracy, baseline, n = judge(out / "hf", held_out)
    print(f"judge: [MASK]-only top-1 {accuracy:.3f} vs most frequent token {baseline:.3f} over {n} positions; "
          f"demo summary {summary}")
    assert n > 1000
    assert accuracy > baseline + JUDGE_MARGIN
    # the demo's own headline figure tells the same story as the judge
    assert summary["eval_mlm_accuracy"] > summary["baseline_mlm_accuracy"] + JUDGE_MARGIN


@pytest.mark.slow
def test_eval_on_raw_text_agrees_with_eval_on_shards_of_the_same_documents(demo_model, tmp_path):
    from bertscale.evaluate import evaluate, evaluate_text
    from bertscale.shards import build_shards

    out, _, held_out = demo_model
    build_shards([held_out], out / "tokenizer", seq_len=128, out_dir=tmp_path / "held128", samples_per_shard=500,
                 seed=5, valid_fraction=0.0, show_progress=False)
    on_shards = evaluate(out / "hf", tmp_path / "held128", split="train")
    on_text = evaluate_text(out / "hf", [held_out], seq_len=128)
    print(f"[MASK]-only accuracy on shards {on_shards['eval_mlm_accuracy']:.3f} "
          f"({on_shards['eval_masked_tokens']} positions), on text {on_text['eval_mlm_accuracy']:.3f} "
          f"({on_text['eval_masked_tokens']})")
    assert on_text["eval_masked_tokens"] > 1000 and on_shards["eval_masked_tokens"] > 1000
    assert abs(on_text["eval_mlm_accuracy"] - on_shards["eval_mlm_accuracy"]) < 0.03
    assert abs(on_text["baseline_mlm_accuracy"] - on_shards["baseline_mlm_accuracy"]) < 0.04
    assert on_text["eval_mlm_accuracy"] > on_text["baseline_mlm_accuracy"] + JUDGE_MARGIN
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
def test_demo_trains_while_port_29500_is_held_and_its_picked_port_is_taken(tmp_path, monkeypatch, capsys):
    """`make demo ARGS=...` scaled down, with 29500 held by another socket and the first port the launcher
    picks taken before rank 0 can listen on it (a real bind race): the demo still trains, on a port it picked
    again, and applies its --set overrides. Its corpus is one file per document written in paragraphs, read
    with --documents file (15.3), and its JSON line ends with the downstream probe's accuracies (14.3)."""
    dump = write_generated_corpus(tmp_path / "corpus.txt", n_docs=150, seed=2).read_text(encoding="utf-8")
    folder = tmp_path / "paragraphs"
    folder.mkdir()
    for i, doc in enumerate(d for d in dump.split("\n\n") if d.strip()):
        (folder / f"doc{i:03d}.txt").write_text(doc.replace("\n", "\n\n") + "\n", encoding="utf-8")
    corpus = str(folder)
    out = tmp_path / "demo"
    default = _listen(29500)  # None: another process holds it already, which serves as well
    raced = _listen(0)
    raced_port = raced.getsockname()[1]
    picks = iter([raced_port])
    real_free_port = ports.free_port
    monkeypatch.setattr(ports, "free_port", lambda: next(picks, None) or real_free_port())
    try:
        code = main(["demo", "--corpus", corpus, "--documents", "file", "--out", str(out), "--steps1", "2",
                     "--steps2", "1",
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
    # each paragraph file is one document, and index.json says so
    manifest = load_manifest(out / "data128")
    assert manifest["documents"] == "file" and manifest["report"]["documents"] == 150
    # the JSON line: held-out figures beside their baselines, and the downstream probe from both starts
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("eval_mlm_accuracy", "baseline_mlm_accuracy", "downstream_accuracy", "downstream_accuracy_scratch",
                "downstream_chance"):
        assert 0 <= summary[key] <= 1, (key, summary)
    assert Path(summary["downstream_task"], "train.jsonl").is_file()


def test_demo_documents_mode_is_for_corpus_files(tmp_path, capsys):
    """The default corpus is a docstring per blank-line block: --documents file without --corpus would make
    it one document, so the demo refuses before doing anything."""
    assert main(["demo", "--documents", "file", "--out", str(tmp_path / "demo")]) == 1
    assert "--documents file is for --corpus files" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
