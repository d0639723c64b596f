import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bertscale.shard_format import load_manifest, read_shard, shard_paths
from bertscale.shards import build_shards, is_valid_document
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
    assert m["format"] == "bertscale-shards-v2" and m["seq_len"] == 64 and m["dtype"] == "uint16"
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
        assert sorted(keys) == [f"{0:06d}{i:010d}" for i in range(entry["samples"])]  # chunk 0, sample i
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
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() != (tmp_path / "c/train/shard-000000.tar").read_bytes()


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
    with pytest.raises(FileNotFoundError, match="shard-000000.tar"):
        load_manifest(broken)
    with pytest.raises(ValueError, match="no split 'test'"):
        shard_paths(m, shard_dir, "test")


def write_one_document_per_file(folder, n_files: int, seed: int = 0):
    """n_files .txt files of one document each (8-16 sentences), the layout of man pages or Gutenberg books."""
    from conftest import make_words

    rng = np.random.default_rng(seed)
    words = make_words(rng, 300)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        sentences = [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))).capitalize() + "."
                     for _ in range(int(rng.integers(8, 17)))]
        (folder / f"page{i:03d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return folder


def labels_of(m, d):
    return [int(read_shard(p, m["dtype"], e).nsp.sum()) for p, e in
            zip(shard_paths(m, d, "train"), m["splits"]["train"]["shards"])], m["splits"]["train"]["samples"]


def test_one_document_per_file_gets_negatives_from_other_files_whatever_the_workers(tokenizer_dir, tmp_path):
    """11.1: random B's come from any other document of the corpus, not only the same file."""
    pages = write_one_document_per_file(tmp_path / "pages", 60)
    kw = dict(samples_per_shard=50, seed=3, valid_fraction=0.1, show_progress=False)
    m1 = build_shards([pages], tokenizer_dir, 64, tmp_path / "w1", workers=1, **kw)
    m3 = build_shards([pages], tokenizer_dir, 64, tmp_path / "w3", workers=3, **kw)
    negatives, total = labels_of(m1, tmp_path / "w1")
    assert 0.4 <= sum(negatives) / total <= 0.6, f"{sum(negatives)} of {total} pairs have a random B"
    assert m1["report"]["label_balance"]["train"]["fraction_1"] == round(sum(negatives) / total, 4)
    assert m1["splits"] == m3["splits"]
    for e in m1["splits"].values():
        for s in e["shards"]:
            assert (tmp_path / "w1" / s["name"]).read_bytes() == (tmp_path / "w3" / s["name"]).read_bytes()
    # A and B are runs of one page's tokens: the same page for "B follows A", another page for a random B
    from bertscale.corpus import split_sentences

    tok = load_tokenizer(tokenizer_dir)

    def spelled(ids) -> str:
        return "," + ",".join(map(str, ids)) + ","

    pages_ids = [spelled([t for s in split_sentences(p.read_text().strip())
                          for t in tok.encode(s, add_special_tokens=False).ids]) for p in sorted(pages.glob("*.txt"))]
    for p, e in zip(shard_paths(m1, tmp_path / "w1", "train"), m1["splits"]["train"]["shards"]):
        shard = read_shard(p, m1["dtype"], e)
        for i in range(len(shard)):
            _, ids, a_len, label = shard.sample(i)
            a, b = spelled(ids[1:a_len - 1].tolist()), spelled(ids[a_len:-1].tolist())
            home_a = {k for k, text in enumerate(pages_ids) if a in text}
            home_b = {k for k, text in enumerate(pages_ids) if b in text}
            assert home_a and home_b
            assert bool(home_a & home_b) == (label == 0) or len(home_a) > 1 or len(home_b) > 1


def test_sentence_order_is_unaffected_by_the_file_layout(tokenizer_dir, tmp_path):
    pages = write_one_document_per_file(tmp_path / "pages", 30)
    m = build_shards([pages], tokenizer_dir, 64, tmp_path / "sop", sentence_order=True, samples_per_shard=40,
                     show_progress=False)
    swapped, total = labels_of(m, tmp_path / "sop")
    assert m["pair_task"] == "sop" and 0.4 <= sum(swapped) / total <= 0.6


def test_shards_are_full_whatever_the_number_of_files(tokenizer_dir, tmp_path):
    """11.2: --samples-per-shard holds across input files; names as the README gives them."""
    pages = write_one_document_per_file(tmp_path / "pages", 80, seed=1)
    one = tmp_path / "one" / "all.txt"
    one.parent.mkdir()
    one.write_text("\n".join(p.read_text() for p in sorted(pages.glob("*.txt"))), encoding="utf-8")
    kw = dict(samples_per_shard=64, seed=2, valid_fraction=0.05, show_progress=False)
    for inputs, out in (([pages], tmp_path / "many"), ([one], tmp_path / "single")):
        m = build_shards(inputs, tokenizer_dir, 64, out, workers=2, **kw)
        for split, e in m["splits"].items():
            counts = [s["samples"] for s in e["shards"]]
            assert counts[:-1] == [64] * (len(counts) - 1) and 0 < counts[-1] <= 64, (inputs, split, counts)
            assert [s["name"] for s in e["shards"]] == [f"{split}/shard-{i:06d}.tar" for i in range(len(counts))]
            assert sorted(f"{split}/{f.name}" for f in (out / split).iterdir()) == [s["name"] for s in e["shards"]]
        assert len(m["splits"]["train"]["shards"]) == -(-m["splits"]["train"]["samples"] // 64)


def test_the_build_reports_what_it_made(tokenizer_dir, tmp_path, capsys):
    """11.5: counts, fill, balance, documents, files, skipped files (index.json and console), and warnings."""
    import gzip

    from bertscale.cli import main as cli_main

    pages = write_one_document_per_file(tmp_path / "pages", 20)
    (pages / "empty.txt").write_text("\n\n")
    good = "Ka lo mi ne. Ru sa ti vo.\n" * 50
    (pages / "cut.txt.gz").write_bytes(gzip.compress(good.encode())[:-30])  # truncated gzip
    out = tmp_path / "out"
    assert cli_main(["shards", "--input", str(pages), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--seq-len", "64", "512", "--samples-per-shard", "50", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    m = load_manifest(out / "seq64")
    r = m["report"]
    assert r["samples"]["train"] == m["splits"]["train"]["samples"] and r["tokens"]["train"] > 0
    assert 0.5 < r["mean_fill"] <= 1 and r["documents"] == m["corpus"]["documents"] and r["files_read"] == 22
    bal = r["label_balance"]["train"]
    assert bal["0"] + bal["1"] == r["samples"]["train"] and 0.4 <= bal["fraction_1"] <= 0.6
    skipped = {Path(s["file"]).name: s["why"] for s in r["files_skipped"]}
    assert set(skipped) == {"empty.txt", "cut.txt.gz"} and "damaged after line" in skipped["cut.txt.gz"]
    assert "mean fill" in printed and "random-B pairs: train" in printed and "cut.txt.gz" in printed
    long = load_manifest(out / "seq512")["report"]  # short pages do not fill 512 positions
    assert long["mean_fill"] < 0.5 and any("fill" in w for w in long["warnings"]) and "warning: samples fill" in printed
    assert not r["warnings"]
    # one document: no negatives at all, which the report says
    single = tmp_path / "single.txt"
    single.write_text((pages / "page000.txt").read_text())
    alone = build_shards([single], tokenizer_dir, 64, tmp_path / "alone", valid_fraction=0.0, show_progress=False)
    assert alone["report"]["label_balance"]["train"]["fraction_1"] == 0.0
    assert any("0.0% of the training pairs are random-B" in w for w in alone["report"]["warnings"])
