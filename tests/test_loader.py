import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.loader import PretrainingLoader, collate, epoch_order, eval_batches
from bertscale.masking import IGNORE_INDEX, mask_tokens
from bertscale.shard_format import load_manifest, read_shard, shard_paths
from bertscale.tokenizer import tokenizer_info


@pytest.fixture(scope="module")
def info(tokenizer_dir):
    return tokenizer_info(tokenizer_dir)


def all_train_samples(shard_dir, info):
    """sample_id -> (ids, a_len, nsp) read straight from the shards with webdataset's own tar reader."""
    import webdataset as wds
    m = load_manifest(shard_dir)
    out = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(shard_paths(m, shard_dir, "train")), wds.tarfile_to_samples()):
        ids = np.frombuffer(raw["ids"], dtype="<u2").astype(np.int64)
        out[int(raw["__key__"])] = (ids, int(raw["alen"]), int(raw["nsp"]))
    return out


def test_the_one_reader_agrees_with_webdataset(shard_dir, info):
    m = load_manifest(shard_dir)
    truth = all_train_samples(shard_dir, info)
    ours = {}
    for url, entry in zip(shard_paths(m, shard_dir, "train"), m["splits"]["train"]["shards"]):
        shard = read_shard(url, m["dtype"], entry)
        for i in range(len(shard)):
            sid, ids, a_len, nsp = shard.sample(i)
            ours[sid] = (ids, a_len, nsp)
    assert ours.keys() == truth.keys() and len(ours) == m["splits"]["train"]["samples"]
    assert all(ours[k][0].tolist() == truth[k][0].tolist() and ours[k][1:] == truth[k][1:] for k in truth)


def test_collate_padding_and_types():
    items = [
        {"input_ids": np.array([2, 10, 3, 11, 3]), "labels": np.array([-100, 10, -100, -100, -100]),
         "a_len": 3, "nsp_label": 0, "sample_id": 5},
        {"input_ids": np.arange(2, 13), "labels": np.full(11, -100), "a_len": 6, "nsp_label": 1, "sample_id": 6},
    ]
    b = collate(items, pad_id=0, with_sample_ids=True)
    assert b["input_ids"].shape == (2, 16) and all(t.dtype == torch.long for t in b.values())
    assert b["attention_mask"].sum(1).tolist() == [5, 11]
    assert b["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1] + [0] * 11
    assert b["token_type_ids"][1, 6:11].tolist() == [1] * 5 and b["token_type_ids"][1, 11:].sum() == 0
    assert b["input_ids"][0, 5:].eq(0).all() and b["labels"][0, 5:].eq(IGNORE_INDEX).all()
    assert b["labels"][0, 1] == 10 and b["next_sentence_label"].tolist() == [0, 1]
    assert b["sample_ids"].tolist() == [5, 6]
    assert collate(items, pad_id=0, max_len=12)["input_ids"].shape == (2, 12)
    assert "sample_ids" not in collate(items, pad_id=0)


def make_loader(shard_dir, info, **kw):
    args = dict(micro_batch=8, rank=0, world_size=1, seed=3, tokenizer=info, shuffle_buffer=50)
    args.update(kw)
    return PretrainingLoader(shard_dir, **args)


def test_batches_are_consistent_with_shards_and_masking(shard_dir, info):
    truth = all_train_samples(shard_dir, info)
    loader = make_loader(shard_dir, info, with_sample_ids=True, expect_seq_len=64)
    assert loader.manifest["seq_len"] == 64
    for batch in itertools.islice(loader, 5):
        assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 8 == 0
        assert batch["input_ids"].shape[1] <= 64
        for row, sid in enumerate(batch["sample_ids"].tolist()):
            ids, a_len, nsp = truth[sid]
            inp, lab = mask_tokens(ids, seed=3, epoch=0, sample_id=sid, vocab_size=info.vocab_size,
                                   mask_id=info.mask_id, special_ids=info.special_ids)
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == inp.tolist()
            assert batch["labels"][row, :n].tolist() == lab.tolist()
            assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
            assert batch["attention_mask"][row].sum() == n
            assert batch["token_type_ids"][row, :a_len].sum() == 0
            assert batch["token_type_ids"][row, a_len:n].eq(1).all()
            assert batch["next_sentence_label"][row] == nsp
    assert "sample_ids" not in next(iter(make_loader(shard_dir, info)))


def epoch_ids(loader):
    ids = []
    it = iter(loader)
    while True:
        batch = next(it)
        if loader.epoch != 0:
            return ids, batch
        ids.extend(batch["sample_ids"].tolist())


def test_two_ranks_cover_an_epoch(shard_dir, info):
    total = load_manifest(shard_dir)["splits"]["train"]["samples"]
    seen = []
    for rank in range(2):
        loader = make_loader(shard_dir, info, rank=rank, world_size=2, with_sample_ids=True, drop_last=False)
        ids, _ = epoch_ids(loader)
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(total))
    # the shard order comes from (seed, epoch) only, so every rank computes the same one
    assert epoch_order(10, seed=3, epoch=1).tolist() == epoch_order(10, seed=3, epoch=1).tolist()
    assert sorted(epoch_order(10, seed=3, epoch=1)) == list(range(10))
    assert epoch_order(10, seed=3, epoch=1).tolist() != epoch_order(10, seed=3, epoch=2).tolist()


def test_workers_cover_an_epoch_and_drop_last(shard_dir, info):
    total = load_manifest(shard_dir)["splits"]["train"]["samples"]
    loader = make_loader(shard_dir, info, num_workers=2, with_sample_ids=True, drop_last=False)
    ids, _ = epoch_ids(loader)
    assert sorted(ids) == list(range(total))
    dropped = make_loader(shard_dir, info, micro_batch=16, with_sample_ids=True)
    ids, nxt = epoch_ids(dropped)
    assert len(ids) % 16 == 0 and total - 16 < len(ids) <= total and len(set(ids)) == len(ids)
    assert nxt["input_ids"].shape[0] == 16


def test_a_script_holding_a_live_iterator_with_workers_exits(shard_dir, tokenizer_dir, tmp_path):
    """Workers ignore SIGTERM (the rank decides when to stop), which is how multiprocessing's exit hook
    stops daemonic children: a script still holding a live iterator at exit used to wait forever."""
    script = tmp_path / "hold.py"
    script.write_text(
        "from bertscale.loader import PretrainingLoader\n"
        "from bertscale.tokenizer import tokenizer_info\n"
        f"loader = PretrainingLoader({str(shard_dir)!r}, micro_batch=4, rank=0, world_size=1, seed=3,\n"
        f"                           tokenizer=tokenizer_info({str(tokenizer_dir)!r}), num_workers=2)\n"
        "it = iter(loader)\n"
        "print('batch', tuple(next(it)['input_ids'].shape), flush=True)\n")
    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0 and r.stdout.startswith("batch (4, "), r.stderr[-2000:]


def test_deterministic_and_epochs_differ(shard_dir, info):
    a = list(itertools.islice(make_loader(shard_dir, info, with_sample_ids=True), 12))
    b = list(itertools.islice(make_loader(shard_dir, info, with_sample_ids=True), 12))
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    c = next(iter(make_loader(shard_dir, info, seed=4, with_sample_ids=True)))
    assert not torch.equal(a[0]["sample_ids"], c["sample_ids"])
    loader = make_loader(shard_dir, info, with_sample_ids=True, drop_last=False)
    _, first_of_epoch1 = epoch_ids(loader)
    assert loader.epoch == 1
    assert not torch.equal(first_of_epoch1["sample_ids"], a[0]["sample_ids"])


def test_resume_from_state_dict(shard_dir, info):
    loader = make_loader(shard_dir, info, with_sample_ids=True)
    it = iter(loader)
    for _ in range(110):  # an epoch is ~105 batches of 8: resume inside epoch 1
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_in_epoch"] > 0
    expected = [next(it) for _ in range(3)]
    resumed = make_loader(shard_dir, info, with_sample_ids=True)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, 3))
    for x, y in zip(expected, got):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_more_ranks_than_shards_and_too_little_data(shard_dir, info):
    valid = load_manifest(shard_dir)["splits"]["valid"]
    # ranks need not own whole shards: more ranks than shards still works
    ld = make_loader(shard_dir, info, split="valid", world_size=len(valid["shards"]) + 1, micro_batch=2)
    assert next(iter(ld))["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="cannot give each of"):
        make_loader(shard_dir, info, split="valid", world_size=valid["samples"] + 1, micro_batch=1)
    with pytest.raises(ValueError, match="seq_len 64"):
        make_loader(shard_dir, info, expect_seq_len=128)


def test_eval_batches(shard_dir, info):
    m = load_manifest(shard_dir)
    batches = list(eval_batches(shard_dir, batch_size=8, seed=3, tokenizer=info))
    assert sum(b["input_ids"].shape[0] for b in batches) == m["splits"]["valid"]["samples"]
    again = list(eval_batches(shard_dir, batch_size=8, seed=3, tokenizer=info))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)
    assert len(list(eval_batches(shard_dir, batch_size=8, seed=3, tokenizer=info, max_batches=2))) == 2
    assert all((b["labels"] != IGNORE_INDEX).any() for b in batches)


def test_eval_reports_the_nsp_majority_baseline(shard_dir, tokenizer_dir, info, tmp_path, capsys):
    """11.5: `eval` reports what always predicting the more frequent pair label scores, beside NSP accuracy."""
    from bertscale.cli import main as cli_main
    from bertscale.hf_format import save_hf
    from bertscale.model import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=info.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    model_dir = save_hf(BertForPreTraining(config).state_dict(), config, tmp_path / "hf", tokenizer_dir)
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(shard_dir), "--batch-size", "8"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_manifest(shard_dir)
    labels = [int(x) for p, e in zip(shard_paths(m, shard_dir, "valid"), m["splits"]["valid"]["shards"])
              for x in read_shard(p, m["dtype"], e).nsp]
    assert results["eval_samples"] == len(labels)
    assert results["baseline_nsp_accuracy"] == max(labels.count(0), labels.count(1)) / len(labels)
    assert 0 <= results["eval_nsp_accuracy"] <= 1


def test_training_evaluation_masks_as_training_does(shard_dir, info):
    """Training's held-out batches come from its loader's settings: whole-word masking is no longer dropped."""
    ww = make_loader(shard_dir, info, whole_word_masking=True, max_predictions=9)
    got = list(ww.eval_batches(batch_size=8))
    want = list(eval_batches(shard_dir, batch_size=8, seed=3, tokenizer=info, max_predictions=9,
                             whole_word_masking=True))
    plain = list(eval_batches(shard_dir, batch_size=8, seed=3, tokenizer=info, max_predictions=9))
    assert len(got) == len(want) >= 4 and all(torch.equal(x[k], y[k]) for x, y in zip(got, want) for k in x)
    assert any(not torch.equal(x["labels"], y["labels"]) for x, y in zip(got, plain))
