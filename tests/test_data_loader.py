"""The streaming loader on hand-made shards of uneven sizes: exactly once, equal batches, resume, damage."""

import itertools
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds

from bertscale.loader import OneBuffer, PretrainingLoader, eval_batches, plan_rank
from bertscale.masking import IGNORE_INDEX
from bertscale.tokenizer import TokenizerInfo

SIZES = [1, 37, 5, 60, 13, 22, 9, 3, 41, 17]  # deliberately uneven
SEQ = 32
INFO = TokenizerInfo(vocab_size=300, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, lowercase=True,
                     fingerprint="f" * 16, continuation_ids=tuple(range(200, 300)))


def write_shards(root, sizes, seed=0):
    """A shard directory in build_shards' format, sample ids 0..N-1 spread over shards of `sizes`."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    entries, sid = [], 0
    for k, n in enumerate(sizes):
        name = f"train/shard-{k:06d}.tar"
        with open(root / name, "wb") as f:
            w = wds.TarWriter(f, encoder=False, mtime=0)
            for _ in range(n):
                length = int(rng.integers(8, SEQ + 1))
                ids = rng.integers(5, 300, size=length).astype("<u2")
                a_len = int(rng.integers(3, length - 1))
                ids[0], ids[a_len - 1], ids[-1] = 2, 3, 3
                w.write({"__key__": f"{sid:09d}", "ids": ids.tobytes(), "alen": str(a_len).encode(),
                         "nsp": str(sid % 2).encode()})
                sid += 1
            w.close()
        entries.append({"name": name, "samples": n, "bytes": (root / name).stat().st_size})
    manifest = {"format": "bertscale-shards-v1", "seq_len": SEQ, "dtype": "uint16", "tokenizer_fingerprint": "f" * 16,
                "vocab_size": 300, "splits": {"train": {"shards": entries, "samples": sid, "tokens": 0},
                                               "valid": {"shards": entries[:2], "samples": sum(sizes[:2]),
                                                         "tokens": 0}}}
    (root / "index.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("uneven"), SIZES)


def loader(d, **kw):
    args = dict(micro_batch=4, rank=0, world_size=1, seed=5, tokenizer=INFO, shuffle_buffer=16,
                with_sample_ids=True)
    args.update(kw)
    return PretrainingLoader(d, **args)


def one_epoch(ld):
    """(sample ids, number of batches) of the loader's epoch 0."""
    ids, n = [], 0
    for batch in ld.epoch_batches(0):
        ids.extend(batch["sample_ids"].tolist())
        n += 1
    return ids, n


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 2), (4, 0)])
def test_exactly_once_with_equal_batches_per_rank(uneven, world, workers):
    total = sum(SIZES)
    for drop_last in (False, True):
        seen, counts = [], set()
        for rank in range(world):
            ids, n = one_epoch(loader(uneven, rank=rank, world_size=world, num_workers=workers, drop_last=drop_last))
            seen.extend(ids)
            counts.add(n)
        assert len(counts) == 1, f"ranks got different batch counts {counts}"
        assert len(seen) == len(set(seen)), "a sample was delivered twice"
        if drop_last:
            assert total - world * 4 < len(seen) <= total and len(seen) % (world * 4) == 0
        else:
            assert sorted(seen) == list(range(total))


def test_plan_is_independent_of_workers_and_epochs_reshuffle(uneven):
    # `with_epoch`-style per-worker counting would change the batch count with the worker count
    assert one_epoch(loader(uneven, num_workers=2))[1] == one_epoch(loader(uneven))[1] == sum(SIZES) // 4
    sizes = plan_rank(10, rank=1, world_size=3, workers=2, micro_batch=2, drop_last=False)
    assert sum(sum(p.batch_sizes) for p in sizes) == 10 // 3
    ld = loader(uneven, drop_last=False)
    first = [b["sample_ids"].tolist() for b in ld.epoch_batches(0)]
    second = [b["sample_ids"].tolist() for b in ld.epoch_batches(1)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) and first != second


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_resume_matches_uninterrupted(uneven, world, workers):
    for rank in range(world):
        per_epoch = loader(uneven, rank=rank, world_size=world, num_workers=workers).batches_per_epoch()
        for stop in (3, per_epoch - 1, per_epoch + 2):  # mid-shard, end of epoch, into the next epoch
            ref = loader(uneven, rank=rank, world_size=world, num_workers=workers)
            it = iter(ref)
            for _ in range(stop):
                next(it)
            state = json.loads(json.dumps(ref.state_dict()))  # it must survive a JSON checkpoint
            expected = [next(it) for _ in range(5)]
            resumed = loader(uneven, rank=rank, world_size=world, num_workers=workers)
            resumed.load_state_dict(state)
            got = list(itertools.islice(resumed, 5))
            assert all(same(x, y) for x, y in zip(expected, got)), (rank, stop)
            assert resumed.epoch == ref.epoch and resumed.batches_in_epoch == ref.batches_in_epoch


def test_resume_seeks_instead_of_replaying(uneven, monkeypatch):
    import bertscale.loader as mod

    ref = loader(uneven, shuffle_buffer=1)
    it = iter(ref)
    for _ in range(ref.batches_per_epoch() - 2):
        next(it)
    state = ref.state_dict()
    pos = state["positions"][0]
    assert pos["shard"].startswith("shard-") and pos["samples"] == 4 * state["batches_in_epoch"]
    reads = []
    real = mod.read_shard
    monkeypatch.setattr(mod, "read_shard", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    resumed = loader(uneven, shuffle_buffer=1)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert 1 <= len(reads) <= 2, f"resume read {len(reads)} shards of {len(SIZES)}"
    with pytest.raises(ValueError, match="same global batch, dataloader workers"):
        loader(uneven, rank=0, world_size=2).load_state_dict(state)


def test_corrupt_shard_is_skipped_with_warning_and_counted(tmp_path, caplog):
    d = write_shards(tmp_path / "d", SIZES)
    victim = d / "train/shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated mid-member
    healthy = one_epoch(loader(write_shards(tmp_path / "ok", SIZES)))[1]
    for workers in (0, 2):
        ld = loader(d, num_workers=workers)
        with caplog.at_level(logging.WARNING):
            ids, n = one_epoch(ld)
        assert n == healthy, "a damaged shard must not shorten the epoch"
        assert ld.corrupt_shards == 1
        assert not set(range(43, 103)) & set(ids)  # none of the victim's samples; stand-ins instead
    assert any("shard-000003.tar" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="shard-000003.tar"):
        one_epoch(loader(d, strict_shards=True))


def test_sample_with_missing_field_counts_as_damage(tmp_path):
    # webdataset's warn_and_continue would hand such a sample on; we refuse the shard
    d = write_shards(tmp_path / "d", [6, 6, 6])
    with open(d / "train/shard-000001.tar", "wb") as f:
        w = wds.TarWriter(f, encoder=False, mtime=0)
        for sid in range(6, 12):
            sample = {"__key__": f"{sid:09d}", "ids": np.array([2, 9, 3, 9, 3], "<u2").tobytes(), "alen": b"3"}
            if sid != 8:
                sample["nsp"] = b"0"
            w.write(sample)
        w.close()
    ld = loader(d, micro_batch=3)
    ids, n = one_epoch(ld)
    assert n == 6 and ld.corrupt_shards == 1 and not set(range(6, 12)) & set(ids)


def test_webdataset_node_splitter_trap_does_not_apply(uneven, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    urls = [str(uneven / "train" / f"shard-{k:06d}.tar") for k in range(len(SIZES))]
    with pytest.raises(ValueError):  # the default node splitter refuses world size > 1
        next(iter(wds.WebDataset(urls, shardshuffle=False)))
    assert one_epoch(loader(uneven, rank=1, world_size=2))[1] > 0


def test_deterministic_across_runs_and_workers_and_masked(uneven):
    a = list(itertools.islice(loader(uneven, num_workers=2), 8))
    b = list(itertools.islice(loader(uneven, num_workers=2), 8))
    assert all(same(x, y) for x, y in zip(a, b))
    for batch in a:
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= SEQ
        t = batch["labels"] != IGNORE_INDEX
        assert t.sum(1).ge(1).all() and not (batch["attention_mask"].eq(0) & t).any()


def test_whole_word_masking_through_the_loader(uneven):
    for batch in itertools.islice(loader(uneven, whole_word_masking=True), 10):
        ids = batch["labels"].where(batch["labels"] != IGNORE_INDEX, batch["input_ids"])
        target = batch["labels"] != IGNORE_INDEX
        cont = (ids >= 200) & batch["attention_mask"].bool()
        # a continuation piece is a target exactly when the piece before it is
        prev = torch.zeros_like(target)
        prev[:, 1:] = target[:, :-1]
        prev_cand = torch.zeros_like(target)
        prev_cand[:, 1:] = (ids[:, :-1] > 4)
        assert (target[cont & prev_cand] == prev[cont & prev_cand]).all()


def test_eval_batches_on_uneven_shards(uneven):
    batches = list(eval_batches(uneven, batch_size=5, seed=1, tokenizer=INFO))
    assert sum(len(b["input_ids"]) for b in batches) == SIZES[0] + SIZES[1]


def damaged_copy(shard_dir, tmp_path, member: str, change, keep_crc: bool = True):
    """A copy of real shards whose first train shard has one member's payload changed (same length):
    the first member named *.member whose payload change() maps to new bytes (None: not this one)."""
    import shutil

    from bertscale.shard_format import load_manifest

    d = tmp_path / f"copy-{member}-{keep_crc}"
    shutil.copytree(shard_dir, d)
    m = load_manifest(d)
    victim = d / m["splits"]["train"]["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    at = -512
    while True:
        at = data.index(b"." + member.encode() + b"\0", at + 512) - 16
        size = int(bytes(data[at + 124 : at + 136]).strip(b" \0"), 8)
        changed = change(bytes(data[at + 512 : at + 512 + size]))
        if changed is not None:
            break
    data[at + 512 : at + 512 + size] = changed
    victim.write_bytes(bytes(data))
    if not keep_crc:  # as an older build's manifest: only the sample checks can catch it
        for e in m["splits"].values():
            for s in e["shards"]:
                s.pop("crc32", None)
        (d / "index.json").write_text(json.dumps(m))
    return d, victim


CHANGES = {
    "label 0 -> 7": ("nsp", lambda body: b"7" if body == b"0" else None),
    "label 1 -> 7": ("nsp", lambda body: b"7" if body == b"1" else None),
    "id -> 32767": ("ids", lambda body: body[:2] + b"\xff\x7f" + body[4:]),  # little-endian, past the vocabulary
}


@pytest.mark.parametrize("keep_crc", [True, False])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_payload_byte_is_skipped_counted_and_named_once(shard_dir, tokenizer_dir, tmp_path, caplog,
                                                                  change, keep_crc):
    """10.7: a damaged sample (here a label 7, or a token id past the vocabulary) is caught when its shard is
    read, by the manifest's CRC-32 or by the sample checks; the shard is skipped and counted and the log names it
    once, across epochs and a resume. Before, the label 7 reached the loss: IndexError at an arbitrary step."""
    from bertscale.tokenizer import tokenizer_info

    member, how = CHANGES[change]
    d, victim = damaged_copy(shard_dir, tmp_path, member, how, keep_crc)
    info = tokenizer_info(tokenizer_dir)
    ld = PretrainingLoader(d, micro_batch=8, rank=0, world_size=1, seed=1, tokenizer=info, with_sample_ids=True)
    per_epoch = ld.batches_per_epoch()
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(iter(ld), per_epoch + 3))  # into a second epoch
    assert ld.corrupt_shards == 1
    for b in batches:
        assert set(b["next_sentence_label"].tolist()) <= {0, 1} and int(b["input_ids"].max()) < info.vocab_size
    why = "CRC-32" if keep_crc else ("pair label 7" if member == "nsp" else "outside the vocabulary")
    named = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert len(named) == 1 and why in named[0], named
    state = json.loads(json.dumps(ld.state_dict()))
    resumed = PretrainingLoader(d, micro_batch=8, rank=0, world_size=1, seed=1, tokenizer=info, with_sample_ids=True)
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        list(itertools.islice(iter(resumed), per_epoch))
    assert resumed.corrupt_shards == 1 and not [r for r in caplog.records if victim.name in r.getMessage()]
    with pytest.raises(Exception, match=victim.name):
        list(PretrainingLoader(d, micro_batch=8, rank=0, world_size=1, seed=1, tokenizer=info,
                               strict_shards=True).epoch_batches(0))


def global_steps(d, world, steps, state=None, **kw):
    """Sample ids of each global step (sorted), gathered from every rank's micro batches; and rank 0's state."""
    out, rank0 = [[] for _ in range(steps)], None
    for rank in range(world):
        ld = loader(d, rank=rank, world_size=world, global_batch=8, micro_batch=2, **kw)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        it = iter(ld)
        for step in range(steps):
            for _ in range(ld.accumulation):
                out[step].extend(next(it)["sample_ids"].tolist())
        rank0 = rank0 or ld.state_dict()
    return [sorted(s) for s in out], rank0


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_and_positions_do_not_depend_on_the_world_size(uneven, workers):
    steps = 4 * sum(SIZES) // 8 // 4 + 3  # into the second epoch
    ref, _ = global_steps(uneven, 1, steps, num_workers=workers)
    assert all(len(s) == 8 == len(set(s)) for s in ref)
    per_epoch = sum(SIZES) // 8
    assert len(set(sum(ref[:per_epoch], []))) == per_epoch * 8  # exactly once within the epoch
    for world in (2, 4):
        assert global_steps(uneven, world, steps, num_workers=workers)[0] == ref
    # stop after k steps on one world size, continue on another: the same global batches follow
    for before, after, k in ((2, 1, 5), (1, 2, 5), (4, 2, per_epoch - 1), (1, 4, per_epoch + 1)):
        _, state = global_steps(uneven, before, k, num_workers=workers)
        assert state["global_steps_in_epoch"] == k % per_epoch and state["partial_step"] == 0
        rest, _ = global_steps(uneven, after, steps - k, state=state, num_workers=workers)
        assert rest == ref[k:], (before, after, k)


def test_another_world_size_needs_a_step_boundary_and_a_divisible_batch(uneven):
    ld = loader(uneven, rank=0, world_size=1, global_batch=8, micro_batch=2)
    it = iter(ld)
    next(it)
    with pytest.raises(ValueError, match="1 micro batch.*into a global step"):
        loader(uneven, rank=0, world_size=2, global_batch=8, micro_batch=2).load_state_dict(ld.state_dict())
    with pytest.raises(ValueError, match="global batch of 8 is not a whole number"):
        loader(uneven, rank=0, world_size=3, global_batch=8, micro_batch=2)
    with pytest.raises(ValueError, match="older bertscale"):
        ld.load_state_dict({**ld.state_dict(), "version": 2})


def test_reading_a_split_skips_a_damaged_shard_once_named_and_stops_before_shards_it_does_not_need(
        shard_dir, tokenizer_dir, tmp_path, caplog):
    """Evaluation and the unigram baseline read a split through ``loader.split_shards``: a damaged shard is
    skipped with a warning naming it and the reader (``strict`` raises), and a reader that has what it asked
    for stops before reading the next shard (here: deleted, so reading it would fail or warn)."""
    from bertscale.evaluate import fit_unigram
    from bertscale.shard_format import CorruptShardError, load_manifest
    from bertscale.tokenizer import tokenizer_info

    info = tokenizer_info(tokenizer_dir)
    d, victim = damaged_copy(shard_dir, tmp_path, *CHANGES["label 0 -> 7"])
    counts = [s["samples"] for s in load_manifest(d)["splits"]["train"]["shards"]]
    with caplog.at_level(logging.WARNING):
        got = sum(len(b["input_ids"]) for b in eval_batches(d, split="train", batch_size=8, seed=1, tokenizer=info))
        unigram = fit_unigram(d, info)
    assert got == sum(counts[1:])
    assert f"in its first {sum(counts[1:])} samples" in unigram.fitted_on
    named = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert len(named) == 2 and named[0].startswith("evaluation skips") and "unigram baseline" in named[1], named
    with pytest.raises(CorruptShardError, match="strict"):
        list(eval_batches(d, split="train", batch_size=8, seed=1, tokenizer=info, strict=True))

    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(shard_dir, clean)
    shards = load_manifest(clean)["splits"]["train"]["shards"]
    first = shards[0]["samples"]
    second = clean / shards[1]["name"]
    second.write_bytes(b"\0" * second.stat().st_size)  # damaged: reading it would warn
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = list(eval_batches(clean, split="train", batch_size=first, seed=1, tokenizer=info, max_batches=1))
        unigram = fit_unigram(clean, info, max_samples=first)
    assert len(batches) == 1 and len(batches[0]["input_ids"]) == first
    assert f"in its first {first} samples" in unigram.fitted_on
    assert not [r for r in caplog.records if second.name in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # reading on does reach it: the check above can fail
        list(eval_batches(clean, split="train", batch_size=first, seed=1, tokenizer=info, max_batches=2))
    assert [r for r in caplog.records if second.name in r.getMessage()]


def assert_same_batch(got, want):
    """The same dict: keys in the same order, each tensor of the same dtype, shape and values, each other
    value of the same type and value."""
    assert list(got) == list(want)
    for key, value in want.items():
        if torch.is_tensor(value):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key
        else:
            assert type(got[key]) is type(value) and got[key] == value, key


@pytest.mark.parametrize("unpadded", [False, True])
def test_a_batch_from_a_worker_is_the_batch_built_in_process(uneven, unpadded):
    """A worker sends each batch as one buffer (``OneBuffer``); the rank gets exactly the dict the
    in-process loader builds, in both layouts (one logical worker either way, so the same batches)."""
    here = list(itertools.islice(loader(uneven, unpadded=unpadded), 12))
    there = list(itertools.islice(loader(uneven, unpadded=unpadded, num_workers=1), 12))
    assert len(there) == 12 and ("cu_seqlens" in here[0]) == unpadded
    for got, want in zip(there, here):
        assert_same_batch(got, want)


def test_one_buffer_round_trips_any_tensor_and_the_other_values():
    """Odd sizes (fields must stay aligned for every dtype), a scalar, an empty tensor, a non-contiguous
    one, and plain values beside the tensors."""
    batch = {
        "a": torch.arange(7, dtype=torch.int32),
        "b": torch.arange(12, dtype=torch.int64).view(3, 4).t(),
        "max_seqlen": 9,
        "c": torch.tensor(3.5, dtype=torch.float64),
        "d": torch.zeros(0, 5, dtype=torch.int64),
        "e": torch.tensor([True, False, True]),
        "_corrupt": [("shard-000003.tar", "truncated")],
        "f": torch.arange(5, dtype=torch.uint8),
    }
    packed = OneBuffer.of(batch)
    assert packed.buffer.dtype == torch.uint8 and packed.buffer.dim() == 1
    assert_same_batch(packed.batch(), batch)
