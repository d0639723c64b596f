"""Conversion from every ZeRO stage: runs at stages 1 and 3 (stage 2 is tests/test_pipeline.py) convert
from a mid-phase and a final tag, load into transformers with no missing keys and identical logits,
and agree with each other (same seed, same data: only the partitioning differs)."""

from __future__ import annotations

import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale.convert import convert_checkpoint
from bertscale.hf_format import load_hf
from bertscale.model import BertConfig, BertForPreTraining
from launcher.launch import pretrain
from runs import write_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def runs(run_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    data = run_data
    out = {}
    for stage in (1, 3):
        config = write_config(tmp, data, out=tmp / f"run{stage}", stage=stage, steps=(4, 1), name=f"z{stage}.toml")
        # both train with tensor-core vocabulary padding (CUDA's default), which conversion must strip;
        # the unpadded path is tests/test_pipeline.py (stage 2)
        pretrain(str(config), ["train.save_interval=2", "train.keep_last=3", "model.pad_vocab_multiple=64"])
        out[stage] = tmp / f"run{stage}" / "checkpoints"
    return tmp, out


def batch(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (2, 12), generator=g)
    ids[:, 0], ids[:, 5], ids[:, -1] = 2, 3, 3
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, types, mask


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("tag", ["step00000002", None])  # mid-phase 1, and the latest (end of phase 2)
def test_stage_converts_to_transformers_with_identical_logits(runs, stage, tag):
    tmp, roots = runs
    info = ckpt.resolve(roots[stage], tag)
    assert info.meta["zero_stage"] == stage
    assert info.phase_complete == (tag is None)
    hf_dir = convert_checkpoint(roots[stage], tmp / f"hf{stage}-{tag}", tag=tag)
    hf, loading = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    ours = load_hf(hf_dir).eval()
    ids, types, mask = batch(ours.config.vocab_size)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
        mine = ours(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mine.prediction_logits[real], theirs.prediction_logits[real])
    torch.testing.assert_close(mine.seq_relationship_logits, theirs.seq_relationship_logits)


def test_stages_agree(runs):
    tmp, roots = runs
    w1 = load_hf(convert_checkpoint(roots[1], tmp / "agree1")).state_dict()
    w3 = load_hf(convert_checkpoint(roots[3], tmp / "agree3")).state_dict()
    assert w1.keys() == w3.keys()
    for key in w1:
        # bf16 compute with fp32 masters; only reduction order differs between the stages
        torch.testing.assert_close(w1[key], w3[key], atol=2e-3, rtol=2e-2, msg=key)


def test_torch_format_is_a_plain_state_dict(runs):
    tmp, roots = runs
    out = convert_checkpoint(roots[3], tmp / "pt", fmt="torch")
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    model = BertForPreTraining(BertConfig.from_hf_dict(ckpt.latest(roots[3]).meta["model_config"]))
    model.load_state_dict(state, strict=True)
    assert (out / "vocab.txt").is_file() and (out / "config.json").is_file()
    hf = load_hf(convert_checkpoint(roots[3], tmp / "pt-hf")).state_dict()
    for key, value in hf.items():
        torch.testing.assert_close(state[key], value)
