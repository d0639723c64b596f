"""Shards read from URL prefixes (11.4): a real HTTP server on 127.0.0.1 and ``pipe:`` commands."""

from __future__ import annotations

import itertools
import json
import logging
import os

import pytest
import torch

from bertscale import storage
from bertscale.config import load_config, resolve_paths
from bertscale.loader import PretrainingLoader, eval_batches
from bertscale.shard_format import load_manifest
from bertscale.tokenizer import tokenizer_info
from runs import serve, write_config


@pytest.fixture(scope="module")
def info(tokenizer_dir):
    return tokenizer_info(tokenizer_dir)


def snapshot(directory) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def loader(location, info, **kw):
    args = dict(micro_batch=8, rank=0, world_size=1, seed=3, tokenizer=info, shuffle_buffer=50, with_sample_ids=True)
    return PretrainingLoader(location, **{**args, **kw})


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_url_data_gives_the_local_batches_and_resumes_mid_shard(shard_dir, info, workers):
    before = snapshot(shard_dir)
    with serve(shard_dir) as (url, requests):
        local, remote = loader(shard_dir, info, num_workers=workers), loader(url, info, num_workers=workers)
        assert remote.manifest == local.manifest
        n = local.batches_per_epoch() + 4  # into the second epoch
        expected = list(itertools.islice(iter(local), n))
        got = list(itertools.islice(iter(remote), n))
        assert all(same(x, y) for x, y in zip(expected, got)) and len(got) == n
        # resume mid-shard from the URL: the same batches as the run that never stopped
        stopped = loader(url, info, num_workers=workers)
        it = iter(stopped)
        for _ in range(7):
            next(it)
        state = json.loads(json.dumps(stopped.state_dict()))
        assert state["positions"][0]["shard_offset"] > 0
        resumed = loader(url, info, num_workers=workers)
        resumed.load_state_dict(state)
        assert all(same(x, y) for x, y in zip(expected[7:12], itertools.islice(iter(resumed), 5)))
        assert requests["/index.json"] >= 1 and all(r.startswith(("/index.json", "/train/", "/valid/")) for r in requests)
    assert snapshot(shard_dir) == before  # nothing written into the data location


def test_a_shard_answering_500_is_retried_then_skipped_and_counted(shard_dir, info, caplog):
    m = load_manifest(shard_dir)
    bad = m["splits"]["train"]["shards"][2]["name"]
    healthy = loader(shard_dir, info).batches_per_epoch()
    with serve(shard_dir, fail=(bad,)) as (url, requests):
        ld = loader(url, info)
        with caplog.at_level(logging.WARNING):
            batches = list(ld.epoch_batches(0))
        assert len(batches) == healthy and ld.corrupt_shards == 1  # the epoch keeps its length
        assert requests[f"/{bad}"] == storage.READ_ATTEMPTS  # bounded retries, then never asked again
        bad_ids = {int(k) for k in _keys(shard_dir / bad)}
        assert not bad_ids & {i for b in batches for i in b["sample_ids"].tolist()}
    named = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(named) == 1 and f"after {storage.READ_ATTEMPTS} tries" in named[0] and "HTTP error" in named[0]


def _keys(path):
    from bertscale.shard_format import read_shard

    return read_shard(path, "uint16").keys.tolist()


def test_manifest_and_eval_batches_from_url_and_pipe(shard_dir, info):
    local = list(eval_batches(shard_dir, batch_size=8, seed=1, tokenizer=info))
    with serve(shard_dir) as (url, _):
        assert all(same(x, y) for x, y in zip(local, eval_batches(url + "/", batch_size=8, seed=1, tokenizer=info)))
        with pytest.raises(FileNotFoundError, match=r"no readable index.json at http://127.0.0.1:\d+/nowhere"):
            load_manifest(url + "/nowhere")
    piped = f"pipe:cat {shard_dir}/{{}}"
    assert all(same(x, y) for x, y in zip(local, eval_batches(piped, batch_size=8, seed=1, tokenizer=info)))


def test_a_url_in_the_config_stays_a_url(tmp_path, tokenizer_dir):
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
preset = "tiny"
tokenizer = "{tokenizer_dir}"
[[phases]]
name = "phase1"
data = "relative/dir"
""")
    for url in ("https://example.com/data/seq128", "pipe:aws s3 cp s3://bucket/seq128/{} -", "gs://b/seq128"):
        assert resolve_paths(load_config(str(config), [f"phases.phase1.data={url}"])).phases[0].data == url
    assert resolve_paths(load_config(str(config))).phases[0].data == os.path.abspath("relative/dir")


@pytest.mark.slow
def test_two_ranks_train_the_same_from_a_url_as_from_the_local_folder(run_data, plain_run, tmp_path):
    from bertscale.metrics import read_scalars
    from conftest import PLAIN_RUN_SETTINGS
    from launcher.launch import pretrain

    # the local run is the shared plain_run: the same config and settings (eval_batches 2) on local folders
    runs = {"local": plain_run}
    with serve(run_data["d128"].parent) as (url, requests):
        config = write_config(tmp_path, run_data, out=tmp_path / "url", steps=(4, 2), name="url.toml")
        out = pretrain(str(config), PLAIN_RUN_SETTINGS + ["train.unpadded=true", f"phases.phase1.data={url}/d128",
                                                          f"phases.phase2.data={url}/d512"])
        runs["url"] = read_scalars(out / "tensorboard")
        assert any(r.startswith("/d512/train/") for r in requests)
    assert [s for s, _ in runs["url"]["loss/total"]] == list(range(1, 7))
    assert runs["url"]["loss/total"] == runs["local"]["loss/total"]
    assert runs["url"]["eval/mlm_loss"] == runs["local"]["eval/mlm_loss"]
