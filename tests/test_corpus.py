import gzip
import json
import logging

import numpy as np
import pytest

from bertscale.corpus import CorpusStats, iter_documents, split_sentences, write_stdlib_corpus
from bertscale.shard_format import load_manifest


def test_split_sentences_latin_and_cjk():
    assert split_sentences("Hello there. How are you? Fine!  Done") == [
        "Hello there.", "How are you?", "Fine!", "Done"]
    assert split_sentences("version 3.12 is out.") == ["version 3.12 is out."]
    assert split_sentences("今天很好。你呢？我很好！") == ["今天很好。", "你呢？", "我很好！"]
    assert split_sentences("   ") == []


def test_txt_documents_and_stats(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\nFirst doc. Two sentences.\nSecond line\n\n\n\nSecond doc!\n  \nThird doc?\n")
    stats = CorpusStats()
    docs = list(iter_documents([p], stats))
    assert docs == [["First doc.", "Two sentences.", "Second line"], ["Second doc!"], ["Third doc?"]]
    assert (stats.files, stats.documents, stats.sentences) == (1, 3, 5)
    assert "3 documents" in stats.summary()


def test_gz_and_jsonl_and_directory(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Gz doc one.\n\nGz doc two.\n")
    lines = [json.dumps({"text": "Line one. Line two.\nLine three"}), "not json", json.dumps({"id": 3}),
             json.dumps({"text": "   "}), json.dumps({"text": "Last."})]
    (d / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(d / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Zipped json."}) + "\n")
    (d / "README.md").write_text("ignored")
    stats = CorpusStats()
    docs = list(iter_documents([d], stats))
    # sorted: a.jsonl.gz, b.txt.gz, sub/c.jsonl
    assert docs == [["Zipped json."], ["Gz doc one."], ["Gz doc two."],
                    ["Line one.", "Line two.", "Line three"], ["Last."]]
    assert stats.skipped_lines == 2 and stats.empty_documents == 1 and stats.files == 3


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, caplog):
    p = tmp_path / "bad.txt"
    p.write_bytes("Good line. Caf\u00e9 ok.\n".encode() + b"Bad \xff\xfe bytes.\n\nNext doc \xc3.\n")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents([p], stats))
    assert docs[0][-1] == "Bad \ufffd\ufffd bytes."
    assert stats.replaced_chars == 3
    assert sum("bad.txt" in r.getMessage() for r in caplog.records) == 1


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(iter_documents([tmp_path / "nope.txt"]))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv"):
        list(iter_documents([tmp_path / "x.csv"]))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match="bin.txt.*binary"):
        list(iter_documents([tmp_path / "bin.txt"]))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty.txt"):
        list(iter_documents([tmp_path / "empty.txt"]))
    (tmp_path / "fake.txt.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="fake.txt.gz"):
        list(iter_documents([tmp_path / "fake.txt.gz"]))
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        list(iter_documents([empty_dir]))


def test_streams_lazily(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("Doc.\n\n" * 1000)
    it = iter_documents([p])
    assert next(it) == ["Doc."]


def test_write_stdlib_corpus(tmp_path):
    out = tmp_path / "stdlib.txt"
    stats = write_stdlib_corpus(out, max_documents=200)
    assert stats.documents == 200
    docs = list(iter_documents([out]))
    assert len(docs) == 200
    text = out.read_text()
    assert ">>>" not in text
    assert all(len(" ".join(d)) >= 20 for d in docs)
    # deterministic
    out2 = tmp_path / "again.txt"
    write_stdlib_corpus(out2, max_documents=200)
    assert out2.read_bytes() == out.read_bytes()
    # the same text again leaves the file alone, so what was built from it (demo's shards) still matches it
    made = out.stat().st_mtime_ns
    write_stdlib_corpus(out, max_documents=200)
    assert out.stat().st_mtime_ns == made


def test_a_damaged_gz_is_used_up_to_the_damage_and_named_with_its_line(tmp_path, caplog):
    """10.8: a truncated or corrupt .gz input names the file and the last good line, and is counted."""
    text = "".join(f"Document {i} says hello. It has two sentences.\n\n" for i in range(3000))
    whole = gzip.compress(text.encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0xFF  # corrupt deflate data
    (tmp_path / "bad.txt.gz").write_bytes(bytes(flipped))
    (tmp_path / "notgz.txt.gz").write_bytes(b"plain text, not gzip\n")
    for name in ("cut.txt.gz", "bad.txt.gz", "notgz.txt.gz"):
        stats = CorpusStats()
        with caplog.at_level(logging.WARNING):
            docs = list(iter_documents([tmp_path / name], stats)) if name != "notgz.txt.gz" else []
            if name == "notgz.txt.gz":
                with pytest.raises(ValueError, match="no documents"):
                    list(iter_documents([tmp_path / name], stats))
        [skipped] = stats.skipped_files
        assert skipped["file"] == str(tmp_path / name)
        if name != "notgz.txt.gz":
            line = int(skipped["why"].split("damaged after line ")[1].split(" ")[0])
            assert 0 < len(docs) < 3000 and len(docs) in (line // 2, (line + 1) // 2)  # two lines per document
            assert docs[0] == ["Document 0 says hello.", "It has two sentences."]
        else:
            assert "unreadable from its start" in skipped["why"]
        assert name in caplog.text and ("line" in caplog.text or "start" in caplog.text)
        caplog.clear()


def test_tokenizer_training_survives_a_damaged_gz(tmp_path, capsys):
    from bertscale.cli import main as cli_main

    text = "".join(f"Alpha beta gamma{i % 9}. Delta epsilon{i % 4} zeta.\n\n" for i in range(2000))
    whole = gzip.compress(text.encode())
    (tmp_path / "c.txt.gz").write_bytes(whole[: len(whole) // 2])
    assert cli_main(["tokenizer", "--input", str(tmp_path / "c.txt.gz"), "--vocab-size", "120",
                     "--out", str(tmp_path / "tok")]) == 0
    captured = capsys.readouterr()
    assert "wrote tokenizer" in captured.out and "Traceback" not in captured.err


def _same_text_two_layouts(tmp_path, n_docs: int = 60):
    """One set of documents written twice: a one-sentence-per-line dump with blank lines between
    documents, and one file per document with blank lines between paragraphs of 1-3 sentences."""
    from conftest import make_words

    rng = np.random.default_rng(5)
    words = make_words(rng, 200)
    dump = tmp_path / "dump.txt"
    folder = tmp_path / "paragraphs"
    folder.mkdir()
    with open(dump, "w", encoding="utf-8") as d:
        for i in range(n_docs):
            sentences = [" ".join(rng.choice(words, size=int(rng.integers(5, 12)))).capitalize() + "."
                         for _ in range(int(rng.integers(8, 15)))]
            d.write("\n".join(sentences) + "\n\n")
            cuts = np.cumsum(rng.integers(1, 4, size=len(sentences)))
            paragraphs = [" ".join(sentences[a:b]) for a, b in zip([0, *cuts], cuts) if a < len(sentences)]
            (folder / f"doc{i:03d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return dump, folder


def _mean_length(manifest: dict) -> float:
    report = manifest["report"]
    return report["tokens"]["train"] / report["samples"]["train"]


def test_paragraph_files_read_as_one_document_each_match_the_dump_and_the_wrong_mode_is_named(
        tmp_path, tokenizer_dir, caplog):
    from bertscale.shards import build_shards

    dump, folder = _same_text_two_layouts(tmp_path)

    def build(inputs, name, documents):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bertscale"):
            manifest = build_shards([inputs], tokenizer_dir, seq_len=128, out_dir=tmp_path / name,
                                    samples_per_shard=100, seed=1, valid_fraction=0.0, workers=1,
                                    show_progress=False, documents=documents)
        return manifest, [r.getMessage() for r in caplog.records if "--documents file" in r.getMessage()]

    as_dump, dump_warnings = build(dump, "dump", "blank-lines")
    as_files, file_warnings = build(folder, "files", "file")
    wrong, wrong_warnings = build(folder, "wrong", "blank-lines")
    print({k: round(_mean_length(m), 1) for k, m in (("dump", as_dump), ("file", as_files), ("wrong", wrong))})
    # the right mode for each layout gives the same documents, so comparable samples
    assert as_dump["report"]["documents"] == as_files["report"]["documents"] == 60
    assert abs(_mean_length(as_files) / _mean_length(as_dump) - 1) < 0.1
    # paragraphs read as documents: many tiny documents, short samples, and a warning saying so
    assert wrong["report"]["documents"] > 3 * 60
    assert _mean_length(wrong) < 0.7 * _mean_length(as_files)
    assert len(wrong_warnings) == 1 and "median document" in wrong_warnings[0]
    assert not dump_warnings and not file_warnings
    # index.json records how the shards were built
    assert load_manifest(tmp_path / "files")["documents"] == "file"
    assert load_manifest(tmp_path / "dump")["documents"] == "blank-lines"


def test_tokenizer_verb_reads_documents_as_shards_does_and_names_the_paragraph_layout(tmp_path, caplog):
    """15.3: `bertscale tokenizer --documents`: paragraph files read at blank lines get the same warning as
    `shards`; read one per file they get none; the vocabulary (made of sentences) is the same either way."""
    from bertscale.cli import main as cli_main

    _, folder = _same_text_two_layouts(tmp_path, n_docs=30)

    def train(documents: str) -> tuple[str, list[str]]:
        caplog.clear()
        out = tmp_path / f"tok-{documents}"
        with caplog.at_level(logging.WARNING, logger="bertscale"):
            assert cli_main(["tokenizer", "--input", str(folder), "--vocab-size", "150", "--out", str(out),
                             "--documents", documents]) == 0
        return ((out / "vocab.txt").read_text(encoding="utf-8"),
                [r.getMessage() for r in caplog.records if "--documents file" in r.getMessage()])

    vocab_blank, warned_blank = train("blank-lines")
    vocab_file, warned_file = train("file")
    assert len(warned_blank) == 1 and "median document" in warned_blank[0]
    assert not warned_file
    assert vocab_blank == vocab_file


def test_the_demo_probe_is_held_out_of_the_stdlib_corpus(tmp_path):
    """14.3: the downstream probe's docstrings (60 of each of 8 packages, labelled by package) are exactly
    the documents the corpus loses when it is written with a probe: pretraining never sees them."""
    from bertscale.corpus import PROBE_DOCS_PER_FAMILY, PROBE_FAMILIES, write_stdlib_probe

    whole = write_stdlib_corpus(tmp_path / "all.txt")
    held = write_stdlib_corpus(tmp_path / "held.txt", probe_path=tmp_path / "probe.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in rows] == [f for f in PROBE_FAMILIES for _ in range(PROBE_DOCS_PER_FAMILY)]
    assert all(r["where"].split(":")[0].split("/")[0].removesuffix(".py") == r["label"] for r in rows)
    probe_texts = {r["text"] for r in rows}
    assert len(probe_texts) > 0.95 * len(rows)  # a few docstrings repeat within a package
    corpus_docs = {"\n".join(doc) for doc in iter_documents([tmp_path / "held.txt"])}
    all_docs = [d for d in (tmp_path / "all.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    held_docs = [d for d in (tmp_path / "held.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    assert whole.documents == len(all_docs) and held.documents == len(held_docs)
    assert len(rows) <= len(all_docs) - len(held_docs) < 1.1 * len(rows)  # a docstring repeated elsewhere goes too
    assert not probe_texts & set(held_docs)
    assert probe_texts <= set(all_docs)
    assert corpus_docs  # the held-out corpus still reads as documents
    write_stdlib_probe(tmp_path / "probe2.jsonl")  # the probe alone, for a demo on another corpus: the same rows
    assert (tmp_path / "probe2.jsonl").read_bytes() == (tmp_path / "probe.jsonl").read_bytes()
