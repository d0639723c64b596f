"""Shard building at scale: parallel, several sequence lengths in one pass, restartable; reading checks."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bertscale.cli import main as cli_main
from bertscale.shard_format import (CorruptShardError, UstarWriter, load_manifest, read_shard, shard_paths,
                                    shard_problems)
from bertscale.shards import build_shards
from conftest import write_generated_corpus

KW = dict(samples_per_shard=50, seed=5, valid_fraction=0.05, show_progress=False)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    for i in range(3):
        write_generated_corpus(d / f"part{i}.txt", n_docs=60 + 20 * i, seed=10 + i)
    return d


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """Two files of 6000 short documents: a build of several seconds with two workers."""
    d = tmp_path_factory.mktemp("big")
    for i in range(2):
        write_generated_corpus(d / f"part{i}.txt", n_docs=6000, seed=i)
    return d


def shard_bytes(out, m):
    return {s["name"]: (out / s["name"]).read_bytes() for e in m["splits"].values() for s in e["shards"]}


def test_parallel_equals_serial_and_two_lengths_in_one_pass(corpus_dir, tokenizer_dir, tmp_path):
    both = build_shards([corpus_dir], tokenizer_dir, [32, 64], tmp_path / "both", workers=2, **KW)
    assert set(both) == {32, 64}
    for L in (32, 64):
        d = tmp_path / "both" / f"seq{L}"
        m = load_manifest(d, expect_seq_len=L)
        assert m == both[L] and m["corpus"]["files"] == 3 and m["corpus"]["documents"] == 60 + 80 + 100
        alone = build_shards([corpus_dir], tokenizer_dir, L, tmp_path / f"alone{L}", workers=1, **KW)
        assert shard_bytes(d, m) == shard_bytes(tmp_path / f"alone{L}", alone)  # same bytes, serial or parallel
        keys = [k for p in shard_paths(m, d, "train") for k in read_shard(p, m["dtype"]).keys.tolist()]
        assert len(keys) == len(set(keys)) == m["splits"]["train"]["samples"]
    assert both[32]["splits"]["train"]["samples"] > both[64]["splits"]["train"]["samples"]
    assert both[32]["corpus_tokens"] == both[64]["corpus_tokens"]  # one tokenization


def test_a_worker_that_dies_fails_the_build_instead_of_hanging(big_corpus, tokenizer_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    corpus = big_corpus
    outcome = {}

    def build():
        try:
            build_shards([corpus], tokenizer_dir, 64, tmp_path / "out", workers=2, **KW)
            outcome["result"] = "finished"
        except RuntimeError as e:
            outcome["result"] = e

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    me, victim, deadline = psutil.Process(), None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        # a build worker: a spawned child busy at work (the executor also starts a queue feeder thread only)
        busy = [c for c in me.children(recursive=True) if c.cpu_percent(interval=0.2) > 20]
        victim = busy[0] if busy else None
    assert victim is not None, "no busy build worker seen"
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the build hung after its worker died"
    err = outcome["result"]
    assert isinstance(err, RuntimeError) and "worker died" in str(err) and "rerun the same command" in str(err)
    assert not (tmp_path / "out" / "index.json").exists()


def test_killed_build_is_locked_stops_its_workers_and_resumes_to_the_same_bytes(big_corpus, tokenizer_dir, tmp_path):
    """10.3, 10.4 and restart: a second build into the same --out is refused naming the first; SIGKILL of the
    first stops its worker processes within seconds and leaves no stuck lock; a rerun keeps the shards already
    published and ends with the bytes of an uninterrupted build."""
    psutil = pytest.importorskip("psutil")
    from bertscale.files import LockedError

    out = tmp_path / "out"
    code = (f"from bertscale.shards import build_shards; build_shards([{str(big_corpus)!r}], {str(tokenizer_dir)!r}, "
            f"64, {str(out)!r}, workers=2, **{KW!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent, stderr=subprocess.PIPE)
    record = out / ".build" / "assembly-train.json"
    deadline = time.monotonic() + 180
    while not record.exists() and proc.poll() is None:  # mid-assembly: some shards published, more to come
        assert time.monotonic() < deadline, "the build never started assembling shards"
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    with pytest.raises(LockedError, match=rf"pid {proc.pid} on "):
        build_shards([big_corpus], tokenizer_dir, 64, out, workers=1, **KW)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "no build worker processes seen"
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"build workers kept running after their parent was killed: {alive}"
    kept = {f.name: f.stat().st_mtime_ns for f in (out / "train").glob("shard-*.tar")}
    assert kept and not (out / "index.json").exists()
    again = build_shards([big_corpus], tokenizer_dir, 64, out, workers=2, **KW)  # the lock was not left stuck
    reference = build_shards([big_corpus], tokenizer_dir, 64, tmp_path / "ref", workers=1, **KW)
    assert again["splits"] == reference["splits"]
    assert shard_bytes(out, again) == shard_bytes(tmp_path / "ref", reference)
    assert all((out / "train" / n).stat().st_mtime_ns == t for n, t in kept.items())  # published ones kept
    assert not list(out.rglob("*.tmp")) and not (out / ".build").exists()
    # a finished build is not redone; other settings rebuild everything
    assert build_shards([big_corpus], tokenizer_dir, 64, out, workers=2, **KW) == again
    assert all((out / "train" / n).stat().st_mtime_ns == t for n, t in kept.items())
    other = build_shards([big_corpus], tokenizer_dir, 64, out, workers=2, **{**KW, "seed": 6})
    assert other["splits"] != again["splits"]


def test_a_build_never_deletes_files_it_did_not_write(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    theirs = out / "train" / "shard-000000-000000.tar"
    theirs.write_bytes(b"someone else's shard")
    notes = out / "train" / "README"
    notes.write_text("mine")
    with pytest.raises(ValueError, match="shard-000000-000000.tar.*never deletes files it did not write"):
        build_shards([corpus_dir], tokenizer_dir, 32, out, **KW)
    assert theirs.read_bytes() == b"someone else's shard" and notes.read_text() == "mine"
    assert cli_main(["shards", "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--seq-len", "32", "--no-progress"]) == 1
    theirs.unlink()
    # shards an earlier build listed (here a v1 build's names) are ours: replaced, and the leftovers removed
    first = build_shards([corpus_dir], tokenizer_dir, 32, out, **KW)
    old = json.loads((out / "index.json").read_text())
    old_name = "train/shard-000001-000000.tar"
    (out / old_name).write_bytes(b"stale")
    old["splits"]["train"]["shards"].append({"name": old_name, "samples": 1, "bytes": 5})
    (out / "index.json").write_text(json.dumps(old))
    again = build_shards([corpus_dir], tokenizer_dir, 32, out, **{**KW, "samples_per_shard": 70})
    assert not (out / old_name).exists() and notes.read_text() == "mine"
    assert {f"train/{f.name}" for f in (out / "train").glob("shard-*")} == \
        {s["name"] for s in again["splits"]["train"]["shards"]}
    assert len(again["splits"]["train"]["shards"]) < len(first["splits"]["train"]["shards"])


def test_a_build_without_samples_fails_saying_why(tokenizer_dir, tmp_path):
    for text in ("ka\n", "\n\n  \n"):  # one one-token document: nothing to pair; no document at all
        corpus = tmp_path / "tiny.txt"
        corpus.write_text(text)
        with pytest.raises(ValueError, match="no training samples.*at least two tokens"):
            build_shards([corpus], tokenizer_dir, 32, tmp_path / "out", **KW)
        assert not (tmp_path / "out" / "index.json").exists()


def test_an_unwritable_out_is_refused_before_any_work(corpus_dir, tokenizer_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for verb in (["shards", "--tokenizer", str(tokenizer_dir), "--seq-len", "32"], ["tokenizer", "--vocab-size", "150"]):
        assert cli_main([verb[0], "--input", str(corpus_dir), "--out", str(blocker / "sub"), *verb[1:]]) == 1
        err = capsys.readouterr().err
        assert f"cannot write to the" in err and str(blocker / "sub") in err and "Traceback" not in err


def test_cli_shards_several_lengths(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "cli"
    args = ["shards", "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--samples-per-shard", "80", "--no-progress"]
    assert cli_main(args + ["--seq-len", "32", "48"]) == 0
    assert load_manifest(out / "seq32", expect_seq_len=32) and load_manifest(out / "seq48", expect_seq_len=48)
    assert cli_main(args[:-3] + ["--out", str(tmp_path / "one"), "--seq-len", "32", "--workers", "2"]) == 0
    assert load_manifest(tmp_path / "one", expect_seq_len=32)


def test_sentence_order_shards(corpus_file, tokenizer_dir, tmp_path):
    m = build_shards([corpus_file], tokenizer_dir, 32, tmp_path / "sop", sentence_order=True, **KW)
    assert m["pair_task"] == "sop"
    labels = [int(x) for p in shard_paths(m, tmp_path / "sop", "train") for x in read_shard(p, m["dtype"]).nsp]
    assert 0.4 < np.mean(labels) < 0.6


def corrupt_variants(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[10] ^= 0xFF  # inside the first header's name: checksum no longer matches
    return {"truncated mid-member": good[: len(good) // 2 + 100], "truncated at a member boundary": good[:1536 * 2],
            "bad header": bytes(flipped), "empty": b"", "garbage": b"\x01" * 4096}


def test_read_shard_rejects_damage_naming_the_file(shard_dir, tmp_path):
    m = load_manifest(shard_dir)
    path = shard_paths(m, shard_dir, "train")[0]
    good = read_shard(path, m["dtype"], m["splits"]["train"]["shards"][0])
    assert len(good) == 40 and good.ids(0)[0] == good.ids(1)[0]
    raw = open(path, "rb").read()
    for why, data in corrupt_variants(raw).items():
        bad = tmp_path / f"bad-{why.replace(' ', '_')}.tar"
        bad.write_bytes(data)
        with pytest.raises(CorruptShardError, match=bad.name):
            read_shard(bad, m["dtype"])
    with pytest.raises(CorruptShardError, match="manifest lists 41"):
        read_shard(path, m["dtype"], {"samples": 41})


def test_our_tar_writer_writes_webdatasets_bytes(tmp_path):
    """UstarWriter is a fast path, not a new format: the same bytes as webdataset's own writer in ustar
    form, for empty, odd-sized and block-sized fields and for enough members to span several records."""
    import io
    import tarfile

    import webdataset as wds

    rng = np.random.default_rng(3)
    samples = [{"__key__": f"{i:016d}", "ids": rng.integers(0, 2**16, size=n, dtype="<u2").tobytes(),
                "alen": str(n // 2).encode(), "nsp": b"" if i == 3 else b"1"}
               for i, n in enumerate([1, 2, 255, 256, 257, 3, 700, 4096])]
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = UstarWriter(ours)
    reference = wds.TarWriter(theirs, encoder=False, mtime=0)
    reference.tarstream.format = tarfile.USTAR_FORMAT  # webdataset computes this format but never applies it
    for sample in samples * 3:
        writer.write(sample)
        reference.write(sample)
    writer.close()
    reference.close()
    assert ours.getvalue() == theirs.getvalue()
    path = tmp_path / "ours.tar"
    path.write_bytes(ours.getvalue())
    read = list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples * 3]
    assert all(r["ids"] == s["ids"] and r["nsp"] == s["nsp"] for r, s in zip(read, samples * 3))


def test_missing_field_is_corrupt_not_a_half_sample(tmp_path):
    import webdataset as wds
    path = tmp_path / "x.tar"
    with wds.TarWriter(str(path), encoder=False) as w:
        w.write({"__key__": "0000000000000000", "ids": np.array([2, 9, 3], "<u2").tobytes(), "alen": b"2", "nsp": b"0"})
        w.write({"__key__": "0000000000000001", "ids": np.array([2, 9, 3], "<u2").tobytes(), "alen": b"2"})
    with pytest.raises(CorruptShardError, match=r"lacks \['nsp'\]"):
        read_shard(path, "uint16")


def test_manifest_disagreeing_with_disk(shard_dir, tmp_path, caplog):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    m = load_manifest(copy)
    victim = copy / m["splits"]["train"]["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[:-1024])
    assert [i for i, _ in shard_problems(m, copy, "train")] == [1]
    with caplog.at_level(logging.WARNING):
        load_manifest(copy)
    assert m["splits"]["train"]["shards"][1]["name"] in caplog.text
    with pytest.raises(ValueError, match="disagree.*" + m["splits"]["train"]["shards"][1]["name"]):
        load_manifest(copy, strict=True)
