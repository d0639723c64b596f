import json

import pytest

from bertscale.tokenizer import (SPECIAL_TOKENS, TOKENIZER_FILES, copy_tokenizer_files, load_tokenizer,
                                 tokenizer_info, train_tokenizer)


def test_files_and_special_ids(tokenizer_dir):
    for name in TOKENIZER_FILES:
        assert (tokenizer_dir / name).is_file()
    vocab = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == SPECIAL_TOKENS
    assert len(vocab) == 200 and len(set(vocab)) == 200
    info = tokenizer_info(tokenizer_dir)
    assert (info.pad_id, info.unk_id, info.cls_id, info.sep_id, info.mask_id) == (0, 1, 2, 3, 4)
    assert info.vocab_size == 200 and info.lowercase
    tok = load_tokenizer(tokenizer_dir)
    assert tok.get_vocab_size() == 200
    assert [tok.id_to_token(i) for i in range(len(vocab))] == vocab
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_encoding_template_and_decode(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    enc = tok.encode("Kalo DORFIS mi.", "Sa ti!")
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2 and enc.tokens[-1] == "[SEP]"
    first_sep = enc.tokens.index("[SEP]")
    assert enc.type_ids == [0] * (first_sep + 1) + [1] * (len(enc.tokens) - first_sep - 1)
    assert any(t.startswith("##") for t in enc.tokens)
    plain = tok.encode("Kalo DORFIS mi.", add_special_tokens=False)
    assert tok.decode(plain.ids) == "kalo dorfis mi."


def test_matches_transformers(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)
    texts = [("Dorfis kalo, mine RUSA!", None), ("Café naïve 中文 words", "Second part here."), ("x" * 80, None)]
    for a, b in texts:
        ours = tok.encode(a, b) if b else tok.encode(a)
        theirs = hf(a, b) if b else hf(a)
        assert theirs["input_ids"] == ours.ids
        assert theirs["token_type_ids"] == ours.type_ids
    assert hf.mask_token_id == 4 and hf.pad_token_id == 0 and hf.model_max_length == 512


def test_fingerprint_identifies_vocab(corpus_file, tokenizer_dir, tmp_path):
    other = train_tokenizer([corpus_file], vocab_size=150, out_dir=tmp_path / "t150", show_progress=False)
    cased = train_tokenizer([corpus_file], vocab_size=200, out_dir=tmp_path / "cased", lowercase=False,
                            show_progress=False)
    fps = {tokenizer_info(d).fingerprint for d in (tokenizer_dir, other, cased)}
    assert len(fps) == 3
    assert tokenizer_info(tokenizer_dir).fingerprint == tokenizer_info(tokenizer_dir).fingerprint
    assert load_tokenizer(cased).encode("KALO").tokens[0] != "kalo"


def test_copy_tokenizer_files(tokenizer_dir, tmp_path):
    copy_tokenizer_files(tokenizer_dir, tmp_path / "copy")
    assert tokenizer_info(tmp_path / "copy") == tokenizer_info(tokenizer_dir)


def test_errors(corpus_file, tmp_path):
    with pytest.raises(ValueError, match="vocab_size 50"):
        train_tokenizer([corpus_file], vocab_size=50, out_dir=tmp_path / "small", show_progress=False)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        train_tokenizer([tmp_path / "empty.txt"], vocab_size=200, out_dir=tmp_path / "e", show_progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_gz_jsonl_inputs(tmp_path):
    import gzip
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"alpha beta gamma{i % 7}. delta epsilon{i % 5} zeta."}) + "\n")
    d = train_tokenizer([tmp_path / "c.jsonl.gz"], vocab_size=120, out_dir=tmp_path / "t", show_progress=False)
    assert "alpha" in load_tokenizer(d).get_vocab()


def test_training_is_reproducible_in_one_process_and_across_processes(corpus_file, tmp_path):
    """11.3: the same corpus and options give byte-identical files (tokenizers alone does not)."""
    import subprocess
    import sys

    files = ("vocab.txt", "tokenizer.json")
    runs = [train_tokenizer([corpus_file], vocab_size=300, out_dir=tmp_path / f"in{i}", show_progress=False)
            for i in range(3)]
    code = (f"from bertscale.tokenizer import train_tokenizer; train_tokenizer([{str(corpus_file)!r}], vocab_size=300, "
            f"out_dir={str(tmp_path / 'other')!r}, show_progress=False)")
    subprocess.run([sys.executable, "-c", code], check=True)
    runs.append(tmp_path / "other")
    for name in files:
        assert len({(d / name).read_bytes() for d in runs}) == 1, f"{name} differs between runs"
    # the continuation pieces handed to the trainer stay ordinary vocabulary, not special tokens
    tok = load_tokenizer(runs[0])
    assert [t.content for t in tok.get_added_tokens_decoder().values()] == SPECIAL_TOKENS
    ids = tok.encode("dorfis kalo", add_special_tokens=False).ids
    assert tok.decode(ids) == "dorfis kalo" and any(tok.id_to_token(i).startswith("##") for i in ids)


def test_a_smaller_vocabulary_than_asked_is_reported(corpus_file, tmp_path, capsys, caplog):
    from bertscale.cli import main as cli_main

    assert cli_main(["tokenizer", "--input", str(corpus_file), "--vocab-size", "30522", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    size = tokenizer_info(tmp_path / "t").vocab_size
    assert size < 30522 and f"the vocabulary has {size} entries, fewer than the 30522 asked" in out


def test_training_off_a_terminal_prints_no_blank_lines(corpus_file, tmp_path):
    """The tokenizers library's progress bar, off a terminal, printed only blank lines into logs (the demo)."""
    import subprocess
    import sys

    code = ("import sys; from bertscale.tokenizer import train_tokenizer; "
            "train_tokenizer([sys.argv[1]], vocab_size=200, out_dir=sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, str(corpus_file), str(tmp_path / "tok")],
                          capture_output=True, text=True, check=True)
    assert (tmp_path / "tok" / "vocab.txt").is_file()
    assert not [line for line in (done.stdout + done.stderr).splitlines() if not line.strip()]
