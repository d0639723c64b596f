"""The `bertscale` command: every verb parses and documents itself, errors are one clear line, and the
data-preparation verbs work end to end on a tiny corpus."""

from __future__ import annotations

import json

import pytest

from bertscale.cli import build_parser, main
from bertscale.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILES, tokenizer_info
from conftest import write_generated_corpus

VERBS = {
    "tokenizer": ["--input", "--vocab-size", "--out", "--cased", "--min-frequency"],
    "shards": ["--input", "--tokenizer", "--seq-len", "--out", "--samples-per-shard", "--seed", "--valid-fraction"],
    "pretrain": ["--config", "--set", "--dry-run", "--resume", "--help-config"],
    "convert": ["--checkpoint", "--out", "--tag", "--format"],
    "eval": ["--model", "--data", "--split", "--batch-size", "--max-batches", "--seed"],
    "demo": ["--corpus", "--out", "--steps1", "--steps2", "--ranks"],
}


def test_parser_has_every_verb(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for verb in VERBS:
        assert verb in text


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([verb, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: bertscale {verb}")
    for option in VERBS[verb]:
        assert option in text, f"{verb} --help does not mention {option}"


def test_verb_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "--checkpoint", "x", "--out", "y", "--format", "onnx"])
    assert info.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_pretrain_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main(["pretrain", "--config", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"bertscale pretrain: error: config file {missing} does not exist; "
                                    f"see configs/ for examples")
    assert "Traceback" not in captured.err and captured.out == ""


def test_pretrain_without_config(capsys):
    assert main(["pretrain"]) == 2
    assert "--config FILE is required" in capsys.readouterr().err


def test_pretrain_help_config(capsys):
    assert main(["pretrain", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "[[phases]]" in out and "global_batch = 256" in out and "Peak learning rate." in out


def test_pretrain_config_error_is_one_message(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[trian]\nlog_interval = 1\n")
    assert main(["pretrain", "--config", str(config), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bertscale pretrain: error: invalid configuration in {config}:")
    assert "did you mean 'train'" in err and "phases: add at least one" in err


def test_convert_empty_directory(tmp_path, capsys):
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    assert main(["convert", "--checkpoint", str(empty), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bertscale convert: error: no complete checkpoint in {empty}")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_and_shards_end_to_end(tmp_path, capsys):
    corpus = write_generated_corpus(tmp_path / "corpus.txt", n_docs=80, seed=3)
    tok = tmp_path / "tok"
    assert main(["tokenizer", "--input", str(corpus), "--vocab-size", "150", "--out", str(tok)]) == 0
    assert f"wrote tokenizer to {tok}" in capsys.readouterr().out
    for name in TOKENIZER_FILES:
        assert (tok / name).is_file(), name
    vocab = (tok / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab[:5] == SPECIAL_TOKENS
    info = tokenizer_info(tok)
    assert info.lowercase and 100 <= info.vocab_size <= 150

    data = tmp_path / "d32"
    assert main(["shards", "--input", str(corpus), "--tokenizer", str(tok), "--seq-len", "32", "--out", str(data),
                 "--samples-per-shard", "25", "--valid-fraction", "0.1", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    index = json.loads((data / "index.json").read_text())
    assert index["seq_len"] == 32 and index["seed"] == 5
    assert index["tokenizer_fingerprint"] == info.fingerprint
    train, valid = index["splits"]["train"], index["splits"]["valid"]
    assert train["samples"] > 25 and valid["samples"] > 0
    assert len(train["shards"]) >= 2 and all(s["samples"] == 25 for s in train["shards"][:-1])
    for split in (train, valid):
        for shard in split["shards"]:
            assert (data / shard["name"]).is_file()
    lines = out.strip().splitlines()
    assert lines[0] == (f"wrote {train['samples']} training and {valid['samples']} validation samples "
                        f"({len(train['shards'])} + {len(valid['shards'])} shards) at seq_len 32 to {data}")
    assert lines[1].startswith(f"  {train['tokens'] + valid['tokens']} tokens, mean fill ")


def test_cased_tokenizer(tmp_path, capsys):
    corpus = write_generated_corpus(tmp_path / "corpus.txt", n_docs=30, seed=4)
    assert main(["tokenizer", "--input", str(corpus), "--vocab-size", "120", "--out", str(tmp_path / "tok"),
                 "--cased"]) == 0
    assert not tokenizer_info(tmp_path / "tok").lowercase
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["do_lower_case"] is False


def test_tokenizer_error_is_reported(tmp_path, capsys):
    corpus = write_generated_corpus(tmp_path / "corpus.txt", n_docs=5)
    assert main(["tokenizer", "--input", str(corpus), "--vocab-size", "10", "--out", str(tmp_path / "t")]) == 1
    assert "bertscale tokenizer: error: vocab_size 10 is too small" in capsys.readouterr().err


def test_shards_with_missing_tokenizer(tmp_path, capsys):
    corpus = write_generated_corpus(tmp_path / "corpus.txt", n_docs=5)
    assert main(["shards", "--input", str(corpus), "--tokenizer", str(tmp_path / "none"), "--seq-len", "32",
                 "--out", str(tmp_path / "d")]) == 1
    assert "bertscale shards: error: no vocab.txt in" in capsys.readouterr().err


def test_pretrain_help_config_prints_every_section(capsys):
    from bertscale.config import describe

    assert main(["pretrain", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out == describe() + "\n"
    headers = [line for line in out.splitlines() if line.startswith("[")]
    assert headers == ["[run]", "[model]", "[distributed]", "[optimizer]", "[train]", "[data]", "[[phases]]"]
    assert "  master_port = None    # TCP port of the rendezvous on node 0. Unset: a single-node run picks a free" in out


def test_pretrain_dry_run_through_the_cli(tmp_path, tokenizer_dir, shard_dir, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f"""
[run]
out_dir = "{tmp_path / 'run'}"
[model]
preset = "tiny"
tokenizer = "{tokenizer_dir}"
[distributed]
accelerator = "cpu"
num_gpus = 2
[[phases]]
name = "short"
seq_len = 64
data = "{shard_dir}"
global_batch = 8
micro_batch = 2
steps = 4
""")
    assert main(["pretrain", "--config", str(config), "--dry-run", "--set", "phases.short.steps=3"]) == 0
    captured = capsys.readouterr()
    assert "# phase short: seq_len 64, 3 steps, world size 2, micro batch 2 x accumulation 2 = global batch 8" \
        in captured.out
    assert "--module bertscale.train" in captured.out and "--phase short" in captured.out
    assert "training finished" not in captured.out and captured.err == ""
    # what the run amounts to, counted here independently: parameters, samples, tokens, epochs of the shards
    from bertscale.model import BertForPreTraining, preset_config
    from bertscale.shard_format import load_manifest
    from bertscale.tokenizer import tokenizer_info

    model = BertForPreTraining(preset_config("tiny", vocab_size=tokenizer_info(tokenizer_dir).vocab_size))
    parameters = sum(p.numel() for p in model.parameters())
    train = load_manifest(shard_dir)["splits"]["train"]
    assert f"model tiny with {parameters:,} parameters" in captured.out
    assert (f"# short: 3 steps x global batch 8 = 24 samples at seq_len 64 (1,536 token positions, about "
            f"{24 * train['tokens'] / train['samples']:,.0f} real tokens): {24 / train['samples']:.2f} epochs of the "
            f"{train['samples']:,} training samples in {shard_dir}") in captured.out
    # the same config at a seq_len the shards were not built for is one error line, not a traceback
    assert main(["pretrain", "--config", str(config), "--dry-run", "--set", "phases.0.seq_len=128"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bertscale pretrain: error: the run cannot start:")
    assert f"shards in {shard_dir} were built with seq_len 64 but the phase trains at 128" in err


def test_convert_incomplete_checkpoint(tmp_path, capsys):
    step = tmp_path / "checkpoints" / "step00000004"
    step.mkdir(parents=True)
    (step / "bertscale.json").write_text(
        json.dumps({"state": {"global_step": 4, "phase_index": 0, "phase_complete": False}}))
    assert main(["convert", "--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 1
    assert "bertscale convert: error:" in (err := capsys.readouterr().err) and "incomplete" in err
    assert not (tmp_path / "hf").exists()
