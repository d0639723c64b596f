"""Shard building at scale: parallel, several sequence lengths in one pass, restartable; reading checks."""

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from bertscale.cli import main as cli_main
from bertscale.shards import (CorruptShardError, UstarWriter, build_shards, load_manifest, read_shard,
                              shard_paths, shard_problems)
from conftest import write_generated_corpus

KW = dict(samples_per_shard=50, seed=5, valid_fraction=0.05, show_progress=False)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    for i in range(3):
        write_generated_corpus(d / f"part{i}.txt", n_docs=60 + 20 * i, seed=10 + i)
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


def test_a_worker_that_dies_fails_the_build_instead_of_hanging(tokenizer_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    corpus = tmp_path / "big"
    corpus.mkdir()
    for i in range(2):
        write_generated_corpus(corpus / f"part{i}.txt", n_docs=6000, seed=i)
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
    assert isinstance(err, RuntimeError) and "worker died" in str(err) and "part" in str(err)
    assert not (tmp_path / "out" / "index.json").exists()


def test_restart_keeps_finished_files_and_ignores_partial_shards(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "r"
    first = build_shards([corpus_dir], tokenizer_dir, 32, out, workers=1, **KW)
    # simulate a crash while file 1 was being written: its record gone, a partial shard left behind
    (out / ".parts" / "file-000001.json").unlink()
    (out / "index.json").unlink()
    (out / "train" / "shard-000001-000099.tar.tmp").write_bytes(b"partial")
    kept = {s["name"]: os.stat(out / s["name"]).st_mtime_ns for s in first["splits"]["train"]["shards"]
            if not s["name"].startswith("train/shard-000001-")}
    again = build_shards([corpus_dir], tokenizer_dir, 32, out, workers=1, **KW)
    assert again["splits"] == first["splits"]
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in kept.items())  # not rewritten
    assert not list(out.rglob("*.tmp"))
    # other settings invalidate every record
    other = build_shards([corpus_dir], tokenizer_dir, 32, out, workers=1, **{**KW, "seed": 6})
    assert other["splits"] != first["splits"]


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
    good = read_shard(path, m["dtype"], m["splits"]["train"]["shards"][0]["samples"])
    assert len(good) == 40 and good.ids(0)[0] == good.ids(1)[0]
    raw = open(path, "rb").read()
    for why, data in corrupt_variants(raw).items():
        bad = tmp_path / f"bad-{why.replace(' ', '_')}.tar"
        bad.write_bytes(data)
        with pytest.raises(CorruptShardError, match=bad.name):
            read_shard(bad, m["dtype"])
    with pytest.raises(CorruptShardError, match="manifest lists 41"):
        read_shard(path, m["dtype"], 41)


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
