"""Checkpoint layout: completeness markers, lookup, pruning and per-rank state (RNG included)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale import checkpoint as ckpt


def make(root: Path, step: int, phase_index: int = 0, phase_complete: bool = False, complete: bool = True) -> Path:
    """A fake checkpoint directory: metadata, one payload file, and the completion marker if ``complete``."""
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    meta = {"state": {"global_step": step, "phase_index": phase_index, "phase_complete": phase_complete},
            "phase": f"phase{phase_index + 1}"}
    (path / ckpt.META).write_text(json.dumps(meta), encoding="utf-8")
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(path)
    return path


def tags(infos) -> list[str]:
    return [c.tag for c in infos]


def test_tag_for_is_zero_padded_and_sorts_by_step():
    assert ckpt.tag_for(10) == "step00000010"
    assert sorted([ckpt.tag_for(s) for s in (100, 9, 20)]) == [ckpt.tag_for(s) for s in (9, 20, 100)]


def test_complete_checkpoints_ignores_incomplete_and_foreign_dirs(tmp_path):
    make(tmp_path, 20)
    make(tmp_path, 10, phase_index=0, phase_complete=True)
    make(tmp_path, 30, complete=False)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "step_notes.txt").write_text("a file, not a checkpoint")
    found = ckpt.complete_checkpoints(tmp_path)
    assert tags(found) == ["step00000010", "step00000020"]
    first = found[0]
    assert first.path == tmp_path / "step00000010"
    assert (first.global_step, first.phase_index, first.phase_complete) == (10, 0, True)
    assert found[1].phase_complete is False


def test_complete_checkpoints_of_missing_root_is_empty(tmp_path):
    assert ckpt.complete_checkpoints(tmp_path / "nope") == []
    assert ckpt.latest(tmp_path / "nope") is None
    assert ckpt.final_of_phase(tmp_path / "nope", 0) is None


def test_latest_is_the_highest_complete_step(tmp_path):
    assert ckpt.latest(tmp_path) is None
    make(tmp_path, 5)
    make(tmp_path, 40)
    make(tmp_path, 50, complete=False)
    assert ckpt.latest(tmp_path).tag == "step00000040"


def test_final_of_phase(tmp_path):
    make(tmp_path, 10, phase_index=0)
    make(tmp_path, 20, phase_index=0, phase_complete=True)
    make(tmp_path, 30, phase_index=1)
    make(tmp_path, 40, phase_index=1, phase_complete=True, complete=False)  # rank did not finish
    assert ckpt.final_of_phase(tmp_path, 0).tag == "step00000020"
    assert ckpt.final_of_phase(tmp_path, 1) is None
    assert ckpt.final_of_phase(tmp_path, 2) is None


def test_resolve_root_tag_and_tag_dir(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    assert ckpt.resolve(tmp_path).tag == "step00000020"                       # root -> latest complete
    assert ckpt.resolve(str(tmp_path), "step00000010").path == tmp_path / "step00000010"
    one = ckpt.resolve(tmp_path / "step00000010")                             # a step directory itself
    assert (one.tag, one.global_step) == ("step00000010", 10)


def test_resolve_incomplete_tag_dir_says_incomplete(tmp_path):
    make(tmp_path, 30, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resolve(tmp_path / "step00000030")


def test_resolve_incomplete_tag_under_root_lists_complete_ones(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 30, complete=False)
    with pytest.raises(ValueError) as info:
        ckpt.resolve(tmp_path, "step00000030")
    msg = str(info.value)
    assert "no complete checkpoint 'step00000030'" in msg and "['step00000010']" in msg
    assert "incomplete" in msg
    with pytest.raises(ValueError, match="missing; complete ones: none"):
        ckpt.resolve(tmp_path / "empty", "step00000001")


def test_resolve_empty_dir(tmp_path):
    with pytest.raises(ValueError, match=f"no complete checkpoint in {tmp_path}"):
        ckpt.resolve(tmp_path)
    make(tmp_path, 5, complete=False)
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        ckpt.resolve(tmp_path)


def test_read_meta_of_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bertscale checkpoint"):
        ckpt.read_meta(tmp_path)


def test_prune_keeps_newest_and_phase_finals(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        make(tmp_path, step, phase_index=0 if step <= 30 else 1, phase_complete=step == 30)
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step00000010", "step00000020", "step00000040"]
    assert tags(ckpt.complete_checkpoints(tmp_path)) == ["step00000030", "step00000050", "step00000060"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000030", "step00000050", "step00000060"]
    assert ckpt.prune(tmp_path, keep_last=2) == []  # idempotent


def test_prune_removes_old_incomplete_but_never_a_newer_one(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 15, complete=False)      # leftover of a crash, older than the newest complete
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)      # may be being written right now
    removed = ckpt.prune(tmp_path, keep_last=5)
    assert [p.name for p in removed] == ["step00000015"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000010", "step00000020", "step00000030"]
    assert (tmp_path / "step00000030" / "mp_rank_00_model_states.pt").is_file()


def test_prune_with_only_incomplete_dirs_removes_nothing(tmp_path):
    make(tmp_path, 10, complete=False)
    assert ckpt.prune(tmp_path, keep_last=1) == []
    assert (tmp_path / "step00000010").is_dir()


def test_remove_incomplete(tmp_path):
    done = make(tmp_path, 10)
    partial = make(tmp_path, 20, complete=False)
    with pytest.raises(ValueError, match="refusing to delete .* complete checkpoint"):
        ckpt.remove_incomplete(done)
    assert (done / ckpt.COMPLETE).is_file() and (done / ckpt.META).is_file()
    ckpt.remove_incomplete(partial)
    assert not partial.exists()


def test_rank_state_round_trip_restores_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.write_rank_state(tmp_path, 1, {"loader": {"epoch": 3, "position": 17}})
    assert (tmp_path / "rank-00001.pt").is_file()
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    # move every generator on, then restore
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = ckpt.read_rank_state(tmp_path, 1)
    assert state["loader"] == {"epoch": 3, "position": 17}
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_rank_states_are_per_rank(tmp_path):
    torch.manual_seed(0)
    ckpt.write_rank_state(tmp_path, 0, {"who": 0})
    first = torch.rand(2)
    ckpt.write_rank_state(tmp_path, 1, {"who": 1})
    second = torch.rand(2)
    assert ckpt.read_rank_state(tmp_path, 0)["who"] == 0
    assert torch.equal(torch.rand(2), first)
    assert ckpt.read_rank_state(tmp_path, 1)["who"] == 1
    assert torch.equal(torch.rand(2), second)


def test_read_rank_state_missing_rank(tmp_path):
    ckpt.write_rank_state(tmp_path, 0, {})
    with pytest.raises(FileNotFoundError, match="rank-00003.pt is missing.*same number of ranks"):
        ckpt.read_rank_state(tmp_path, 3)


def test_write_meta_copies_tokenizer_and_meta(tmp_path, tokenizer_dir):
    path = tmp_path / "step00000007"
    path.mkdir()
    meta = {"state": {"global_step": 7, "phase_index": 0, "phase_complete": False}}
    ckpt.write_meta(path, meta, tokenizer_dir)
    assert ckpt.read_meta(path) == meta
    assert (path / "tokenizer" / "vocab.txt").read_bytes() == (tokenizer_dir / "vocab.txt").read_bytes()
    assert ckpt.complete_checkpoints(tmp_path) == []  # not complete until marked
    ckpt.mark_complete(path)
    assert ckpt.latest(tmp_path).global_step == 7


def test_complete_checkpoints_sorted_by_step_not_name(tmp_path):
    make(tmp_path, 99_999_999)
    make(tmp_path, 123_456_789)  # 9 digits: sorts before the 8-digit tag by name
    assert [c.global_step for c in ckpt.complete_checkpoints(tmp_path)] == [99_999_999, 123_456_789]
    assert ckpt.latest(tmp_path).global_step == 123_456_789


def test_mid_phase_on_another_world_size_continues_through_the_universal_checkpoint(tmp_path):
    """The resume policy: another number of ranks continues a phase at ZeRO 1, 2 or 3 when it can make the
    global batch; another stage, no ZeRO or an impossible global batch are refused saying why."""
    from bertscale.config import load_config
    from bertscale.rundir import RunDir
    from runs import write_config

    data = {"tokenizer": tmp_path / "tok", "d128": tmp_path / "d128", "d512": tmp_path / "d512"}
    cfg = load_config(write_config(tmp_path, data, out=tmp_path / "run"))  # phase1: global 16, micro 4
    path = make(RunDir.of(cfg).checkpoints, 2)
    meta = json.loads((path / ckpt.META).read_text())

    def plan(world: int, stage: int = 2, saved_stage: int = 2, precision: str = "bf16", saved_precision="bf16",
             **phase) -> ckpt.ResumePlan:
        saved = {"precision": saved_precision} if saved_precision else {}  # none: written before it was recorded
        (path / ckpt.META).write_text(json.dumps({**meta, "world_size": 2, "zero_stage": saved_stage, **saved}))
        for key, value in phase.items():
            setattr(cfg.phases[0], key, value)
        shape = ckpt.RunShape(model_config={}, tokenizer_fingerprint=None, vocab_rows=None, world_size=world,
                              zero_stage=stage, precision=precision)
        return ckpt.plan_resume(cfg, 0, shape)

    assert plan(2).world_change is None
    assert plan(1).world_change == (2, 1) and plan(4).world_change == (2, 4)
    assert "accumulation 4 x world 1" in plan(1).resume_note(cfg.phases[0], 4)
    with pytest.raises(ckpt.ResumeError, match="3 ranks cannot make.*divides 4"):
        plan(3)
    with pytest.raises(ckpt.ResumeError, match="stage 2; this run has 1 ranks at stage 1"):
        plan(1, stage=1)
    assert plan(1, stage=3, saved_stage=3).world_change == (2, 1)
    with pytest.raises(ckpt.ResumeError, match="universal checkpoint.*stages 1, 2, 3 only"):
        plan(1, stage=0, saved_stage=0)
    # another precision (auto on another kind of machine): through the universal checkpoint too, said
    assert not plan(2).through_universal and plan(2).universal_change() is None
    other = plan(2, precision="fp32")
    assert other.precision_change == ("bf16", "fp32") and other.world_change is None and other.through_universal
    assert other.universal_change() == "the phase continues in fp32, trained so far in bf16"
    assert "precision changed from bf16 to fp32 at global step 2" in other.precision_resume_note()
    assert 'Set train.precision = "bf16" to continue as it was trained' in other.precision_resume_note()
    both = plan(4, precision="fp16")
    assert both.world_change == (2, 4) and both.precision_change == ("bf16", "fp16")
    assert plan(2, precision="fp32", saved_precision=None).precision_change is None  # older checkpoints


def test_a_phase_carries_optimizer_state_at_the_same_stage_on_any_number_of_ranks(tmp_path):
    """``carry_optimizer_state`` at a phase start: the same ranks load the shards, other ranks the universal
    checkpoint (ZeRO 1-3); another stage, or another number of ranks without ZeRO, is refused saying why."""
    from bertscale.config import load_config
    from bertscale.rundir import RunDir
    from runs import write_config

    data = {"tokenizer": tmp_path / "tok", "d128": tmp_path / "d128", "d512": tmp_path / "d512"}
    cfg = load_config(write_config(tmp_path, data, out=tmp_path / "run"))  # phase1: 6 steps
    path = make(RunDir.of(cfg).checkpoints, 6, phase_complete=True)
    meta = json.loads((path / ckpt.META).read_text())

    def plan(world: int, stage: int = 2, saved_stage: int = 2, carry: bool = True,
             precision: str = "bf16") -> ckpt.ResumePlan:
        (path / ckpt.META).write_text(json.dumps({**meta, "world_size": 2, "zero_stage": saved_stage,
                                                  "precision": "bf16"}))
        cfg.phases[1].carry_optimizer_state = carry
        shape = ckpt.RunShape(model_config={}, tokenizer_fingerprint=None, vocab_rows=None, world_size=world,
                              zero_stage=stage, precision=precision)
        return ckpt.plan_resume(cfg, 1, shape)

    same = plan(2)
    assert same.previous.path == path and same.carry_moments and not same.carry_through_universal
    for world, stage in ((1, 2), (4, 2), (1, 1), (4, 3)):
        other = plan(world, stage=stage, saved_stage=stage)
        assert other.carry_moments and other.carry_through_universal and other.world_change is None
    fresh = plan(1, carry=False)
    assert not fresh.carry_moments and not fresh.carry_through_universal
    with pytest.raises(ckpt.ResumeError, match="ZeRO stage 2 and this run has 2 ranks at stage 3.*Use stage 2"):
        plan(2, stage=3)
    with pytest.raises(ckpt.ResumeError, match="on any number of ranks at stages 1, 2, 3"):
        plan(1, stage=0, saved_stage=0)
    assert plan(2, stage=0, saved_stage=0).carry_moments  # no ZeRO, the same ranks: the shards as they are
    # another precision: the moments come through the universal checkpoint, and the phase says so
    other = plan(2, precision="fp32")
    assert other.carry_moments and other.carry_through_universal
    shape = ckpt.RunShape(model_config={}, tokenizer_fingerprint=None, vocab_rows=None, world_size=2, zero_stage=2,
                          precision="fp32")
    assert other.precision_note(cfg.phases[1], shape) == ("phase phase2: trains in fp32, the previous phase in bf16; "
                                                          "it starts from the previous phase's fp32 weights and, "
                                                          "through its universal checkpoint, its optimizer moments")
    assert plan(2, carry=False, precision="fp32").precision_note(cfg.phases[1], shape).endswith("fp32 weights")


def test_a_resume_onto_other_shards_served_over_http_is_refused(run_data, tmp_path):
    """The data-order guard reads a URL phase's manifest where the loader reads it: a resume onto another
    shard set at another URL is refused (before, both manifests read as "missing" through a local path and
    the resume was accepted); the same set at the same URL continues."""
    from bertscale.config import load_config
    from bertscale.rundir import RunDir
    from bertscale.shards import build_shards
    from runs import serve, write_config

    served = tmp_path / "served"
    shutil.copytree(run_data["d128"], served / "a")
    build_shards([run_data["corpus"]], run_data["tokenizer"], seq_len=128, out_dir=served / "b", samples_per_shard=60,
                 seed=4, valid_fraction=0.05, show_progress=False)  # the same corpus, other samples
    config = write_config(tmp_path, run_data, out=tmp_path / "run")
    shape = ckpt.RunShape(model_config={}, tokenizer_fingerprint=None, vocab_rows=None, world_size=2, zero_stage=2,
                          precision="fp32")
    with serve(served) as (url, _):
        cfg_a = load_config(config, [f"phases.phase1.data={url}/a"])
        cfg_b = load_config(config, [f"phases.phase1.data={url}/b"])
        assert ckpt.manifest_fingerprint(f"{url}/a") == ckpt.manifest_fingerprint(served / "a") != "missing"
        path = make(RunDir.of(cfg_a).checkpoints, 2)
        meta = json.loads((path / ckpt.META).read_text())
        (path / ckpt.META).write_text(json.dumps({**meta, "world_size": 2, "zero_stage": 2, "precision": "fp32",
                                                  "data_order": ckpt.data_order(cfg_a, 0)}))
        with pytest.raises(ckpt.ResumeError, match=r"phases.phase1.data: the shards differ"):
            ckpt.plan_resume(cfg_b, 0, shape)
        assert ckpt.plan_resume(cfg_a, 0, shape).resume.path == path
