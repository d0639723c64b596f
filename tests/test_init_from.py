"""Continued pretraining from Hugging Face weights (``model.init_from``).

One real launcher run starts from a ``transformers`` ``BertForMaskedLM`` saved in-test (its NSP head is
reported fresh) and trains a step; its checkpoint, converted with ``bertscale convert``, is then the
``init_from`` of a run whose step-0 model must give the exported model's MLM and NSP logits. The refusals
(what our model cannot represent, another tokenizer, a conflicting preset) run in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale.config import ConfigError, from_dict, load_config, resolve_paths, validate
from bertscale.hf_format import check_pretrained, read_hf_config, read_hf_weights
from bertscale.tokenizer import tokenizer_info, train_tokenizer
from bertscale.recipe import init_from_for, initial_model, model_config
from runs import REPO, free_port

transformers = pytest.importorskip("transformers")

SEQ = 64  # conftest's shard_dir


def save_maskedlm(out: Path, tokenizer_dir: Path, seed: int = 5, **overrides) -> Path:
    """A tiny randomly initialised ``transformers`` BertForMaskedLM and the tokenizer, saved as
    ``transformers`` saves them (v5: tokenizer.json and tokenizer_config.json, no vocab.txt)."""
    vocab = tokenizer_info(tokenizer_dir).vocab_size
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 64,
                                        "max_position_embeddings": 128, **overrides})
    transformers.BertForMaskedLM(config).save_pretrained(out)
    transformers.BertTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                   do_lower_case=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def maskedlm_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return save_maskedlm(tmp_path_factory.mktemp("hf_mlm"), tokenizer_dir)


def run_config(init_from: Path, data: Path, **model) -> dict:
    return {"model": {"init_from": str(init_from), **model},
            "phases": [{"name": "phase1", "seq_len": SEQ, "data": str(data), "global_batch": 4, "micro_batch": 2,
                        "steps": 1, "lr": 1e-3}]}


def write_toml(path: Path, init_from: Path, data: Path) -> Path:
    """The run configuration file of the launcher tests: one rank, one step of conftest's shards."""
    path.write_text(f"""
[run]
out_dir = "{path.parent / 'run'}"
seed = 3
[model]
init_from = "{init_from}"
[distributed]
deepspeed_config = "{REPO / 'ds_configs' / 'zero2.json'}"
accelerator = "cpu"
num_gpus = 1
master_port = {free_port()}
[train]
eval_batches = 0
[[phases]]
seq_len = {SEQ}
data = "{data}"
global_batch = 4
micro_batch = 2
steps = 1
lr = 1e-3
""")
    return path


def padded_batch(vocab_size: int, generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(5, vocab_size, (3, 20), generator=g)
    ids[:, 0], ids[:, 8], ids[:, -1] = 2, 3, 3  # [CLS] a [SEP] b [SEP]
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    ids[mask == 0] = 0
    types[mask == 0] = 0
    return ids, types, mask


def test_transformers_directory_reads_as_its_tokenizer(maskedlm_dir, tokenizer_dir):
    # transformers v5 writes no vocab.txt: the fingerprint is rebuilt from tokenizer.json's vocabulary, so
    # shards built with the same tokenizer are accepted (and shards of another are refused, below)
    assert not (maskedlm_dir / "vocab.txt").exists()
    assert tokenizer_info(maskedlm_dir) == tokenizer_info(tokenizer_dir)


@pytest.mark.parametrize("pad", [None, 64])  # 64: CUDA's default tensor-core padding of the vocabulary rows
def test_maskedlm_weights_load_with_fresh_heads(maskedlm_dir, shard_dir, pad):
    cfg = resolve_paths(from_dict(run_config(maskedlm_dir, shard_dir, pad_vocab_multiple=pad)))
    assert not validate(cfg) and cfg.model.tokenizer == str(maskedlm_dir)  # its tokenizer is the run's
    config = model_config(cfg, tokenizer_info(cfg.model.tokenizer).vocab_size)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 1, 64)
    model, fresh = initial_model(cfg, config, "cpu", cfg.model.init_from)
    rows = model.bert.embeddings.word_embeddings.num_embeddings
    assert rows == (-(-config.vocab_size // pad) * pad if pad else config.vocab_size)
    assert sorted(fresh) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                             "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    theirs = transformers.BertForMaskedLM.from_pretrained(maskedlm_dir).eval()
    ids, types, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        ours = model.eval()(ids, token_type_ids=types, attention_mask=mask)
        hf = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours.prediction_logits[real], hf.logits[real], rtol=1e-5, atol=1e-5)


def test_pytorch_bin_and_tensorflow_names_load_safely(maskedlm_dir, tmp_path):
    """An older directory: pytorch_model.bin (a pickle, loaded weights-only) with the LayerNorm gamma/beta
    names of Google's TensorFlow checkpoints and a saved position_ids buffer."""
    state = read_hf_weights(maskedlm_dir)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(128)[None]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(maskedlm_dir / name, legacy / name)
    torch.save(old, legacy / "pytorch_model.bin")
    assert {k: v.tolist() for k, v in read_hf_weights(legacy).items()} == {k: v.tolist() for k, v in state.items()}
    assert check_pretrained(legacy, read_hf_config(legacy)) == [  # the launcher's check: shapes, on meta
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias"]

    class Payload:  # a pickle that asks for a class: loading it could run code
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, legacy / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: refused to load"):
        read_hf_weights(legacy)


@pytest.mark.parametrize("key, value, message", [
    ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key'"),
    ("hidden_act", "silu", "hidden_act 'silu' is not supported"),
    ("is_decoder", True, "is_decoder true"),
    ("tie_word_embeddings", False, "tie_word_embeddings false"),
    ("vocab_size", 999, "vocab_size 999, but the tokenizer"),
    ("max_position_embeddings", 32, r"seq_len 64 is longer than max_position_embeddings 32"),
])
def test_config_our_model_cannot_represent_is_refused_naming_the_key(maskedlm_dir, shard_dir, tmp_path, key, value,
                                                                     message):
    changed = tmp_path / "changed"
    shutil.copytree(maskedlm_dir, changed)
    hf = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**hf, key: value}))
    cfg = resolve_paths(from_dict(run_config(changed, shard_dir)))
    with pytest.raises(ConfigError, match=message) as refused:
        model_config(cfg, tokenizer_info(cfg.model.tokenizer).vocab_size)
    assert str(changed) in str(refused.value)


def test_weights_that_do_not_fit_are_refused_before_any_rank_reads_them(maskedlm_dir, tokenizer_dir, shard_dir,
                                                                        tmp_path):
    headless = tmp_path / "headless"  # a BertModel: no "bert." prefix, no MLM head to continue training
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig.from_pretrained(maskedlm_dir)).save_pretrained(headless)
    transformers.BertTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json")).save_pretrained(headless)
    cfg = resolve_paths(from_dict(run_config(headless, shard_dir)))
    with pytest.raises(ConfigError, match=r"(?s)cannot start from .*headless.*missing keys: bert\.embeddings.*"
                                          r"headless BertModel checkpoint"):
        model_config(cfg, tokenizer_info(tokenizer_dir).vocab_size)


def test_directory_without_a_tokenizer_needs_model_tokenizer(maskedlm_dir, tokenizer_dir, shard_dir, tmp_path):
    from launcher.launch import pretrain

    bare = tmp_path / "bare"  # weights and config only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(maskedlm_dir / name, bare / name)
    config = write_toml(tmp_path / "run.toml", bare, shard_dir)
    with pytest.raises(ConfigError, match="model.init_from's directory has no tokenizer of its own: set model.tokenizer"):
        pretrain(str(config), dry_run=True)
    pretrain(str(config), [f"model.tokenizer={tokenizer_dir}"], dry_run=True)


def test_shipped_continued_pretraining_config_is_valid():
    cfg = load_config(REPO / "configs" / "bert_continued.toml")
    assert cfg.model.init_from and cfg.model.preset is None and not cfg.model.tokenizer


def test_conflicting_preset_or_tokenizer_is_refused_naming_both(maskedlm_dir, shard_dir, corpus_file, tmp_path):
    errors = validate(from_dict(run_config(maskedlm_dir, shard_dir, preset="tiny", num_hidden_layers=2)))
    assert any("model.preset = 'tiny', model.num_hidden_layers = 2 and model.init_from" in e for e in errors), errors
    other = train_tokenizer([corpus_file], vocab_size=150, out_dir=tmp_path / "other", show_progress=False)
    cfg = resolve_paths(from_dict(run_config(maskedlm_dir, shard_dir, tokenizer=str(other))))
    with pytest.raises(ConfigError, match=f"model.tokenizer {other} is not the tokenizer of model.init_from "
                                          f"{maskedlm_dir}"):
        model_config(cfg, tokenizer_info(other).vocab_size)


def test_shards_of_another_tokenizer_are_refused_and_dry_run_names_the_weights(
        maskedlm_dir, shard_dir, corpus_file, tmp_path, capsys):
    from launcher.launch import pretrain

    other_tok = train_tokenizer([corpus_file], vocab_size=150, out_dir=tmp_path / "tok150", show_progress=False)
    other = save_maskedlm(tmp_path / "hf150", other_tok)
    config = write_toml(tmp_path / "run.toml", other, shard_dir)
    # shard_dir was built with conftest's tokenizer: refused as it is without init_from
    with pytest.raises(ConfigError, match=f"but the run uses tokenizer {tokenizer_info(other_tok).fingerprint}"):
        pretrain(str(config), dry_run=True)
    pretrain(str(config), [f"model.init_from={maskedlm_dir}"], dry_run=True)
    printed = capsys.readouterr().out
    assert (f"# initial weights: BertForMaskedLM in {maskedlm_dir}; not in it, initialised fresh: "
            f"bert.pooler.dense.weight, bert.pooler.dense.bias, cls.seq_relationship.weight") in printed
    assert f"model from {maskedlm_dir} with" in printed


@pytest.mark.slow
def test_maskedlm_starts_a_run_and_its_export_is_step_zero_of_the_next(maskedlm_dir, shard_dir, tmp_path):
    """The one launcher run: transformers' BertForMaskedLM trains a step (NSP head reported fresh); the
    checkpoint, exported with `bertscale convert`, starts a run whose step-0 logits are the export's."""
    from bertscale.cli import main
    from bertscale.engine import consolidated_state_dict
    from launcher.launch import pretrain

    config = write_toml(tmp_path / "run.toml", maskedlm_dir, shard_dir)
    pretrain(str(config))
    log = (tmp_path / "run" / "train.log").read_text()
    assert (f"starting from the Hugging Face weights in {maskedlm_dir}; not in it, initialised fresh: "
            "bert.pooler.dense.weight, bert.pooler.dense.bias, cls.seq_relationship.weight, "
            "cls.seq_relationship.bias") in log
    checkpoints = tmp_path / "run" / "checkpoints"
    trained = consolidated_state_dict(checkpoints, "step00000001")
    start = read_hf_weights(maskedlm_dir)
    # one LAMB step at lr 1e-3 moves a weight by about 1e-3 of its norm: still the HF model's weights,
    # not a fresh initialisation (which would differ by ~0.03 everywhere)
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"):
        moved = (trained[key] - start[key]).abs().max().item()
        assert 0 < moved < 1e-3, (key, moved)

    # init_from is the first phase of a fresh run only: resuming this checkpoint, or a phase starting from it,
    # takes the checkpoint's weights
    saved = ckpt.latest(checkpoints)
    cfg = resolve_paths(load_config(config))
    assert init_from_for(cfg, 0, ckpt.ResumePlan()) == str(maskedlm_dir)
    assert init_from_for(cfg, 0, ckpt.ResumePlan(resume=saved)) == ""
    assert init_from_for(cfg, 1, ckpt.ResumePlan(previous=saved)) == ""

    exported = tmp_path / "hf"
    assert main(["convert", "--checkpoint", str(checkpoints), "--out", str(exported)]) == 0
    cfg = resolve_paths(from_dict(run_config(exported, shard_dir)))
    model, fresh = initial_model(cfg, model_config(cfg, tokenizer_info(exported).vocab_size), "cpu",
                                 cfg.model.init_from)
    assert fresh == []  # a BertForPreTraining export has every head
    theirs = transformers.BertForPreTraining.from_pretrained(exported).eval()
    ids, types, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model.eval()(ids, token_type_ids=types, attention_mask=mask)
        hf = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    mlm_diff = (ours.prediction_logits[real] - hf.prediction_logits[real]).abs().max().item()
    nsp_diff = (ours.seq_relationship_logits - hf.seq_relationship_logits).abs().max().item()
    print(f"init_from parity: max abs diff MLM logits {mlm_diff:.3g}, NSP logits {nsp_diff:.3g}")
    torch.testing.assert_close(ours.prediction_logits[real], hf.prediction_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.seq_relationship_logits, hf.seq_relationship_logits, rtol=1e-5, atol=1e-5)
