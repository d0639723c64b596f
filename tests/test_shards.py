import json
import tarfile

import numpy as np
import pytest

from bertscale.shards import build_shards, is_valid_document, load_manifest, shard_paths
from bertscale.tokenizer import load_tokenizer, tokenizer_info
from conftest import write_generated_corpus


def read_tar(path):
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_manifest_and_shard_contents(shard_dir, tokenizer_dir):
    m = load_manifest(shard_dir)
    info = tokenizer_info(tokenizer_dir)
    assert m["format"] == "bertscale-shards-v1" and m["seq_len"] == 64 and m["dtype"] == "uint16"
    assert m["tokenizer_fingerprint"] == info.fingerprint and m["vocab_size"] == 200
    assert m["corpus"]["documents"] == 400
    assert json.loads((shard_dir / "index.json").read_text()) == m
    for split in ("train", "valid"):
        entry = m["splits"][split]
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"]) > 0
        assert all(s["samples"] == 40 for s in entry["shards"][:-1])
        keys, tokens = [], 0
        for path, shard in zip(shard_paths(m, shard_dir, split), entry["shards"]):
            samples = read_tar(path)
            assert len(samples) == shard["samples"]
            for key, s in sorted(samples.items()):
                assert set(s) == {"ids", "alen", "nsp"}
                ids = np.frombuffer(s["ids"], dtype="<u2")
                a_len, nsp = int(s["alen"]), int(s["nsp"])
                assert len(ids) <= 64 and ids[0] == info.cls_id and ids[-1] == info.sep_id
                assert ids[a_len - 1] == info.sep_id and nsp in (0, 1)
                assert ids.max() < 200
                keys.append(key)
                tokens += len(ids)
        assert sorted(keys) == [f"{0:06d}{i:010d}" for i in range(entry["samples"])]  # file 0, sample i
        assert tokens == entry["tokens"]
    assert not list(shard_dir.rglob("*.tmp"))
    assert m["splits"]["valid"]["samples"] < m["splits"]["train"]["samples"] / 5


def test_samples_decode_to_corpus_text(shard_dir, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    m = load_manifest(shard_dir)
    s = read_tar(shard_paths(m, shard_dir, "train")[0])["0000000000000000"]
    ids = np.frombuffer(s["ids"], dtype="<u2").tolist()
    text = tok.decode(ids[1 : int(s["alen"]) - 1])
    assert len(text.split()) >= 1 and "[" not in text


def test_deterministic_and_seed_dependent(corpus_file, tokenizer_dir, tmp_path):
    kw = dict(seq_len=32, samples_per_shard=100, valid_fraction=0.1, show_progress=False)
    a = build_shards([corpus_file], tokenizer_dir, out_dir=tmp_path / "a", seed=1, **kw)
    b = build_shards([corpus_file], tokenizer_dir, out_dir=tmp_path / "b", seed=1, **kw)
    c = build_shards([corpus_file], tokenizer_dir, out_dir=tmp_path / "c", seed=2, **kw)
    assert a["splits"] == b["splits"]
    for sh in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / sh["name"]).read_bytes() == (tmp_path / "b" / sh["name"]).read_bytes()
    assert (tmp_path / "a/train/shard-000000-000000.tar").read_bytes() != (tmp_path / "c/train/shard-000000-000000.tar").read_bytes()


def test_validation_split_by_document():
    picks = [is_valid_document(i, 5, 0.1) for i in range(20000)]
    assert abs(np.mean(picks) - 0.1) < 0.01
    assert picks == [is_valid_document(i, 5, 0.1) for i in range(20000)]
    assert picks != [is_valid_document(i, 6, 0.1) for i in range(20000)]


def test_tiny_corpus_still_gets_a_valid_document(tokenizer_dir, tmp_path):
    corpus = write_generated_corpus(tmp_path / "two.txt", n_docs=2, seed=3)
    m = build_shards([corpus], tokenizer_dir, 32, tmp_path / "out", valid_fraction=0.001, show_progress=False)
    assert m["splits"]["valid"]["samples"] > 0 and m["splits"]["train"]["samples"] > 0


def test_load_manifest_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no index.json in .*bertscale shards"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="seq_len 64 but the phase trains at 128; rebuild with --seq-len 128"):
        load_manifest(shard_dir, expect_seq_len=128)
    with pytest.raises(ValueError, match="tokenizer"):
        load_manifest(shard_dir, expect_fingerprint="0" * 16)
    assert load_manifest(shard_dir, expect_seq_len=64)["seq_len"] == 64
    # a missing shard is reported by name
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    m = json.loads((shard_dir / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps(m))
    with pytest.raises(FileNotFoundError, match="shard-000000-000000.tar"):
        load_manifest(broken)
    with pytest.raises(ValueError, match="no split 'test'"):
        shard_paths(m, shard_dir, "test")
