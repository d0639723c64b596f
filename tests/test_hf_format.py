"""Export parity: what we save loads into `transformers` with no missing keys and the same outputs."""

import json

import pytest
import torch
from safetensors import safe_open

from bertscale.hf_format import TIED_KEYS, load_hf, load_state_dict_into, save_hf
from bertscale.model import BertConfig, BertForPreTraining

transformers = pytest.importorskip("transformers")

V, S, B = 503, 16, 3


def tiny_config(**overrides) -> BertConfig:
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    return BertConfig(**{**base, **overrides})


def random_model(config: BertConfig) -> BertForPreTraining:
    torch.manual_seed(1)
    m = BertForPreTraining(config)
    with torch.no_grad():  # off init everywhere, so a mis-copied bias or LayerNorm changes the outputs
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:  # weights large enough that activations leave GELU's near-linear zone
                p.mul_(5.0)
    return m.eval()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (B, S), generator=g)
    tt = torch.zeros(B, S, dtype=torch.long)
    tt[:, 6:] = 1
    am = torch.ones(B, S, dtype=torch.long)
    am[0, 11:] = 0
    am[2, 4:] = 0
    ids[am == 0] = 0
    tt[am == 0] = 0
    return ids, tt, am


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model(tiny_config())
    out = save_hf(model.state_dict(), model.config, tmp_path_factory.mktemp("hf"))
    return model, out


def test_files_written(exported):
    _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["vocab_size"] == V and cfg["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    # Like transformers v5 save_pretrained: the tied decoder weight and bias are not written.
    assert not keys & set(TIED_KEYS)
    assert "cls.predictions.bias" in keys and "bert.embeddings.word_embeddings.weight" in keys


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_loads_with_identical_outputs(exported, attn):
    model, out = exported
    hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True, attn_implementation=attn)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    ids, tt, am = batch()
    with torch.no_grad():
        ours = model(ids, token_type_ids=tt, attention_mask=am)
        theirs = hf(input_ids=ids, token_type_ids=tt, attention_mask=am)
    real = am.bool()  # HF and we both compute padded positions, but only real ones carry meaning
    torch.testing.assert_close(ours.prediction_logits[real], theirs.prediction_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.seq_relationship_logits, theirs.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_transformers_losses_match(exported):
    model, out = exported
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    ids, tt, am = batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    nsp = torch.tensor([1, 0, 1])
    with torch.no_grad():
        ours = model(ids, tt, am, labels=labels, next_sentence_label=nsp)
        theirs = hf(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls_name, allowed_unexpected", [
    ("BertForMaskedLM", {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                         "cls.seq_relationship.weight", "cls.seq_relationship.bias"}),
    ("BertModel", None),  # any cls.* head is fine to ignore for the bare encoder
])
def test_other_heads_load_without_missing_keys(exported, cls_name, allowed_unexpected):
    model, out = exported
    hf, info = getattr(transformers, cls_name).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    if allowed_unexpected is None:
        assert all(k.startswith("cls.") for k in info["unexpected_keys"]), info
    else:
        assert set(info["unexpected_keys"]) <= allowed_unexpected, info
    if cls_name == "BertModel":
        ids, tt, am = batch()
        with torch.no_grad():
            ours, _ = model.bert(ids, tt, am)
            theirs = hf.eval()(input_ids=ids, token_type_ids=tt, attention_mask=am).last_hidden_state
        real = am.bool()
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_load_hf_round_trip(exported):
    model, out = exported
    loaded = load_hf(out)
    assert loaded.config == model.config
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert loaded.cls.predictions.decoder.bias is loaded.cls.predictions.bias
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    as_bf16 = load_hf(out, dtype=torch.bfloat16)
    assert as_bf16.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert as_bf16.cls.predictions.decoder.weight is as_bf16.bert.embeddings.word_embeddings.weight


def test_load_hf_reads_transformers_own_save(exported, tmp_path):
    model, out = exported
    hf = transformers.BertForPreTraining.from_pretrained(out)
    hf.save_pretrained(tmp_path / "resaved")
    loaded = load_hf(tmp_path / "resaved")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_shape_mismatch_is_a_teaching_error(exported, tmp_path):
    model, _ = exported
    wrong = tiny_config(vocab_size=800)
    with pytest.raises(ValueError, match=r"word_embeddings.weight of shape \[503,64\] but the config says vocab_size 800"):
        save_hf(model.state_dict(), wrong, tmp_path / "bad")
    with pytest.raises(ValueError, match="vocab_size 800"):
        load_state_dict_into(BertForPreTraining(wrong), model.state_dict())


def test_missing_and_unexpected_keys_are_listed(exported, tmp_path):
    model, _ = exported
    sd = {f"module.{k}" if k.startswith("cls.seq") else k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        save_hf(sd, model.config, tmp_path / "bad")
    msg = str(e.value)
    assert "missing keys: cls.seq_relationship.weight, cls.seq_relationship.bias" in msg
    assert "unexpected keys: module.cls.seq_relationship.weight" in msg and "strip the wrapper prefix" in msg


def test_untied_decoder_is_refused(exported, tmp_path):
    model, _ = exported
    sd = dict(model.state_dict())
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="untied"):
        save_hf(sd, model.config, tmp_path / "bad")


def test_missing_files_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no model.safetensors"):
        load_hf(tmp_path)


def test_tokenizer_files_are_copied(exported, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model, _ = exported
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 10, trainer=trainer)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    out = save_hf(model.state_dict(), model.config, tmp_path / "with_tok", tokenizer_dir=tok_dir)
    assert (out / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
    assert not (out / "vocab.txt").exists()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        save_hf(model.state_dict(), model.config, tmp_path / "x", tokenizer_dir=tmp_path / "empty_dir_missing")
