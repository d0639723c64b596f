"""Never silently wrong, never unsafe: hostile files, changed settings, failed ranks, non-finite weights,
two launchers on one directory, a killed launcher and a full disk, each on real runs through the real
launcher (2 ranks, ZeRO-2, bf16, CPU, loader workers and dropout on).

One short two-phase run is shared: checkpoints at step 2 (inside phase 1), 4 (end of phase 1) and 5
(end of phase 2). Tests copy it before changing anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale import safe_load
from bertscale.convert import convert_checkpoint
from bertscale.engine import consolidated_state_dict
from bertscale.files import LockedError
from bertscale.metrics import read_scalars
from bertscale.rundir import RunDir
from bertscale.shards import build_shards
from launcher.launch import pretrain
from runs import free_port, write_config

pytestmark = pytest.mark.slow

SETTINGS = ["train.save_interval=2", "train.keep_last=5", "train.eval_batches=0"]


@pytest.fixture(scope="module")
def data(run_data):
    return run_data


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished run's directory: complete checkpoints at steps 2, 4 (end of phase 1) and 5 (end of phase 2).

    Rank 1's optimizer makes its weights NaN at steps 2 and 3 (fault injection: what an overflowing learning
    rate or trust ratio does with finite gradients); see the non-finite test.
    """
    tmp = tmp_path_factory.mktemp("hardening-run")
    os.environ["BERTSCALE_FAULT"] = "nan-weights:2-3:1"
    try:
        pretrain(str(write_config(tmp, data, steps=(4, 1))), SETTINGS + ["train.log_interval=1"])
    finally:
        del os.environ["BERTSCALE_FAULT"]
    root = tmp / "run" / "checkpoints"
    assert [c.global_step for c in ckpt.complete_checkpoints(root)] == [2, 4, 5]
    return tmp / "run"


def copy_run(trained: Path, tmp_path: Path, data, keep: tuple[int, ...]) -> tuple[Path, Path]:
    """A copy of the shared run holding only the checkpoints of steps ``keep``, and a config for it."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns(".lock", "exits", "failures"))
    for path in (out / "checkpoints").glob("step*"):
        if ckpt.CheckpointInfo(path, path.name, ckpt.read_meta(path)).global_step not in keep:
            shutil.rmtree(path)
    return out, write_config(tmp_path, data, out=out, steps=(4, 1))


class Planted:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command (it creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file: Path, marker: Path) -> None:
    """Add the payload to a real checkpoint file, keeping everything else in it (loaded here, trusted: our own)."""
    state = torch.load(file, map_location="cpu", weights_only=False)
    state["extra"] = Planted(marker)
    torch.save(state, file)


# ---------------------------------------------------------------- 1. no code runs from a file

def test_a_planted_pickle_never_runs_on_convert_resume_or_phase_start(trained, data, tmp_path):
    marker = tmp_path / "PWNED"

    # convert: DeepSpeed's consolidation would unpickle the model states
    out, config = copy_run(trained, tmp_path / "c", data, keep=(5,))
    model_states = out / "checkpoints" / ckpt.tag_for(5) / "mp_rank_00_model_states.pt"
    plant(model_states, marker)
    with pytest.raises(safe_load.UnsafeFileError) as refused:
        convert_checkpoint(out / "checkpoints", tmp_path / "hf")
    assert str(model_states) in str(refused.value) and "posix.system" in str(refused.value)
    assert not marker.exists()

    # resume inside phase 1 (a rank's own state file); --resume PATH from another run's checkpoint
    # (DeepSpeed's optimizer states); phase 2 starting from phase 1's final weights (consolidated)
    elsewhere = write_config(tmp_path, data, out=tmp_path / "elsewhere", steps=(4, 1), name="elsewhere.toml")
    for case, step, file, resume in [
        ("r", 2, "rank-00001.pt", "auto"),
        ("p", 2, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "PATH"),
        ("s", 4, "mp_rank_00_model_states.pt", "auto"),
    ]:
        out, config = copy_run(trained, tmp_path / case, data, keep=(step,))
        planted = ds_file(out / "checkpoints" / ckpt.tag_for(step), file)
        plant(planted, marker)
        explicit = resume == "PATH"
        with pytest.raises(safe_load.UnsafeFileError, match=str(planted)):
            pretrain(str(elsewhere if explicit else config), SETTINGS,
                     resume=str(planted.parent) if explicit else "auto")
        assert not marker.exists()


def ds_file(folder: Path, name: str) -> Path:
    """A DeepSpeed file of a checkpoint: ``name``, or its bf16 run's name (``bf16_`` prefixed: DeepSpeed names
    optimizer files by precision, and the runs here train in what train.precision = auto picks)."""
    found = [f for f in (folder / name, folder / f"bf16_{name}") if f.is_file()]
    assert len(found) == 1, f"{folder}: expected one of {name}, bf16_{name}; found {sorted(os.listdir(folder))}"
    return found[0]


def test_the_rank_side_loaders_refuse_too(trained, tmp_path):
    """What a rank runs if a file changes after the launcher's check: every loader refuses on its own."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "PWNED"
    root = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints" / ckpt.tag_for(4), root / ckpt.tag_for(4))
    path = root / ckpt.tag_for(4)
    plant(path / "rank-00000.pt", marker)
    with pytest.raises(safe_load.UnsafeFileError, match="rank-00000.pt.*posix.system"):
        ckpt.read_rank_state(path, 0)
    shutil.copy2(trained / "checkpoints" / ckpt.tag_for(4) / "rank-00000.pt", path / "rank-00000.pt")
    plant(ds_file(path, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), marker)
    with pytest.raises(safe_load.UnsafeFileError, match="optim_states.pt"):
        consolidated_state_dict(root, ckpt.tag_for(4))  # convert and phase hand-over
    with pytest.raises(safe_load.UnsafeFileError, match="posix.system"), safe_load.enforced():
        # the call DeepSpeed's engine makes on resume, asking for weights_only=False
        TorchCheckpointEngine().load(str(ds_file(path, "zero_pp_rank_1_mp_rank_00_optim_states.pt")),
                                     map_location="cpu")
    assert not marker.exists()
    # what DeepSpeed's real files need is allowed: the untouched ones load
    assert "optimizer_state_dict" in safe_load.load(ds_file(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


# ---------------------------------------------------------------- 5. a resumed run is the run asked for

def test_resuming_inside_a_phase_with_other_data_order_is_refused_naming_each_change(trained, data, tmp_path):
    out, config = copy_run(trained, tmp_path, data, keep=(2,))
    other = tmp_path / "other128"  # the same corpus, shuffled and split with another seed
    build_shards([data["corpus"]], data["tokenizer"], seq_len=128, out_dir=other, samples_per_shard=60, seed=4,
                 valid_fraction=0.05, show_progress=False)
    changed = [f"phases.phase1.data={other}", "run.seed=8", "phases.phase1.mask_prob=0.2",
               "phases.phase1.micro_batch=2", "train.num_workers=2"]
    with pytest.raises(ckpt.ResumeError) as refused:
        pretrain(str(config), SETTINGS + changed)
    text = str(refused.value)
    assert f"{out / 'checkpoints' / ckpt.tag_for(2)} is in the middle of phase 'phase1'" in text
    assert "phases.phase1.data: the shards differ" in text and str(other) in text
    for line in ("run.seed: 7 in the checkpoint, 8 now", "phases.phase1.mask_prob: 0.15 in the checkpoint, 0.2 now",
                 "phases.phase1.micro_batch: 4 in the checkpoint, 2 now",
                 "train.num_workers: 1 in the checkpoint, 2 now"):
        assert line in text
    assert "start a new run.out_dir" in text
    assert not (out / "exits").exists()  # refused before any rank started


# ---------------------------------------------------------------- 6. non-finite is never checkpointed

def test_weights_that_become_non_finite_on_one_rank_are_put_back_on_every_rank(trained):
    """The shared run's rank 1 made its weights NaN in steps 2 and 3: both steps were skipped on every rank,
    no checkpoint holds a non-finite weight, and training went on."""
    root = trained / "checkpoints"
    scalars = read_scalars(trained / "tensorboard")
    assert [v for _, v in scalars["optim/nonfinite_steps"]][:4] == [0, 1, 2, 2]
    assert [s for s, _ in scalars["loss/total"]] == [1, 2, 3, 4, 5] and all(v == v for _, v in scalars["loss/total"])
    step2, step4 = (consolidated_state_dict(root, ckpt.tag_for(s)) for s in (2, 4))
    assert all(torch.isfinite(v).all() for v in [*step2.values(), *step4.values()])
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)  # step 4 trained again


def test_the_weight_guards_finite_check_is_exact():
    """The guard's check sums each tensor first (cheap); a sum past the float32 range must not reject finite
    weights, and one inf or NaN anywhere must be found (no process group: this rank's verdict)."""
    from bertscale.engine import _all_finite

    for dtype in (torch.float32, torch.bfloat16):
        finite = [torch.randn(10_000).to(dtype), torch.randn(3, 7).to(dtype)]
        assert _all_finite(finite) and _all_finite([])
        assert _all_finite(finite + [torch.full((1000,), 3e38, dtype=dtype)])  # its sum overflows float32
        for bad in ([float("inf")], [float("-inf")], [float("nan")], [float("inf"), float("-inf")]):
            spoiled = finite[0].clone()
            spoiled[[17, 9_999][:len(bad)]] = torch.tensor(bad, dtype=dtype)
            assert not _all_finite([finite[1], spoiled]), (dtype, bad)


# ---------------------------------------------------------------- 2. the exit status tells the truth

def test_a_rank_killed_in_the_final_evaluation_fails_the_run_and_is_named(trained, data, tmp_path):
    """The shared run resumed inside phase 1 with legitimate changes (logged once); then rank 1 is SIGKILLed
    in phase 1's evaluation, after the phase's final checkpoint is complete: the run exits non-zero, phase 2
    never starts, and rank 1 (not rank 0, whose connection was reset) is named."""
    out, config = copy_run(trained, tmp_path, data, keep=(2,))
    cmd = [sys.executable, "-m", "bertscale.cli", "pretrain", "--config", str(config)]
    for setting in SETTINGS + ["train.eval_batches=2", "phases.phase1.lr=2e-3", "train.log_interval=3"]:
        cmd += ["--set", setting]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BERTSCALE_FAULT": "die-in-eval:4:1"})
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(2)}" in output
    assert output.count("changed since the checkpoint:") == 1
    changed = next(x for x in output.splitlines() if "changed since the checkpoint:" in x)
    assert "phases.phase1.lr 0.001 -> 0.002" in changed and "train.log_interval 1 -> 3" in changed
    root = out / "checkpoints"
    assert ckpt.final_of_phase(root, 0) is not None  # phase 1's final checkpoint was complete ...
    assert ckpt.final_of_phase(root, 1) is None and "phase phase2" not in output  # ... phase 2 never started
    assert "training finished" not in output
    assert "bertscale pretrain: error: phase 'phase1' failed: rank 1: killed without a word" in output
    assert "then rank 0" in output and "lost its connection" in output
    log = (out / "train.log").read_text()  # the record has what the console had: warnings, the failure
    assert changed.split("] ", 1)[-1] in log
    assert "error: phase 'phase1' failed: rank 1: killed without a word" in log


# ---------------------------------------------------------------- 3 and 4. one run per directory, no orphans

def test_a_second_launcher_is_refused_and_a_killed_launcher_leaves_no_orphans(data, tmp_path):
    config = write_config(tmp_path, data, steps=(400, 1))
    first = subprocess.Popen([sys.executable, "-m", "bertscale.cli", "pretrain", "--config", str(config),
                              "--set", "train.log_interval=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "run" / "tensorboard").glob("events.*")):  # training has started
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read().decode()
            time.sleep(0.5)
        tree = psutil.Process(first.pid).children(recursive=True)
        assert len([p for p in tree if "bertscale.train" in " ".join(p.cmdline())]) >= 2

        with pytest.raises(LockedError) as refused:  # another port, same directory
            pretrain(str(config), [f"distributed.master_port={free_port()}"])
        assert f"run directory {tmp_path / 'run'} is in use by pid {first.pid} on " in str(refused.value)

        first.send_signal(signal.SIGKILL)  # the launcher dies without a chance to clean up
        first.wait()
        gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, f"still running after the launcher was killed: {[p.pid for p in alive]}"
    finally:
        for proc in tree:  # whatever a failing assertion left behind
            try:
                proc.kill()
            except psutil.Error:
                pass
        if first.poll() is None:
            first.kill()
            first.wait()
    RunDir(tmp_path / "run").lock().release()  # nothing is left stuck


# ---------------------------------------------------------------- 8. a full disk reads like English

def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                          capture_output=True).returncode == 0


def _on_small_disk(mount: Path, size: str, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` in a private mount namespace where ``mount`` is a tmpfs of ``size``."""
    mount.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs {mount} && exec \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          timeout=600)


def test_a_full_disk_during_save_and_convert_reads_like_english(trained, data, tmp_path):
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare -m and a tmpfs mount (root in a Linux container)")
    cli = [sys.executable, "-m", "bertscale.cli"]

    done = _on_small_disk(tmp_path / "small", "256k",
                          cli + ["convert", "--checkpoint", str(trained / "checkpoints"), "--out", str(tmp_path / "small" / "hf")])
    assert done.returncode == 1, done.stderr
    assert f"bertscale convert: error: no space left on device at {tmp_path / 'small' / 'hf'}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout

    config = write_config(tmp_path, data, out=tmp_path / "small" / "run", steps=(4, 1))
    done = _on_small_disk(tmp_path / "small", "1m", cli + ["pretrain", "--config", str(config)] +
                          [x for kv in SETTINGS for x in ("--set", kv)])
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"no space left on device at {tmp_path / 'small' / 'run' / 'checkpoints' / ckpt.tag_for(2)}" in output
    assert "there is no complete checkpoint yet" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------- 7. corrupt shards of every rank are counted

def _damage_a_shard_only_rank_1_reads(data_dir: Path, tokenizer: Path, micro_batches: int) -> Path:
    """Truncate the first train shard that rank 1 of 2 meets in its first ``micro_batches`` and rank 0
    does not (found with the real loader, so it follows however the loader splits an epoch)."""
    from bertscale.loader import PretrainingLoader
    from bertscale.shard_format import load_manifest, shard_paths
    from bertscale.tokenizer import tokenizer_info

    tok = tokenizer_info(tokenizer)

    def skipped(rank: int) -> int:
        loader = PretrainingLoader(data_dir, split="train", micro_batch=4, rank=rank, world_size=2, seed=7,
                                   tokenizer=tok, num_workers=0, expect_seq_len=128)
        batches = iter(loader)
        for _ in range(micro_batches):
            next(batches)
        return loader.corrupt_shards

    for url in shard_paths(load_manifest(data_dir, 128, tok.fingerprint), data_dir, "train"):
        shard = Path(url)
        whole = shard.read_bytes()
        shard.write_bytes(whole[:3000])  # truncated inside a member
        if skipped(0) == 0 and skipped(1) == 1:
            return shard
        shard.write_bytes(whole)
    raise AssertionError(f"no shard of {data_dir} is read by rank 1 alone")


def test_corrupt_shards_skipped_by_any_rank_are_counted(data, tmp_path):
    damaged = tmp_path / "d128"
    shutil.copytree(data["d128"], damaged)
    shard = _damage_a_shard_only_rank_1_reads(damaged, data["tokenizer"], micro_batches=4 * 2)  # 4 steps x accumulation 2
    config = write_config(tmp_path, {**data, "d128": damaged}, steps=(4, 1))
    pretrain(str(config), ["train.log_interval=1", "train.eval_batches=0", "train.save_interval=100"])
    counted = dict(read_scalars(tmp_path / "run" / "tensorboard")["data/corrupt_shards"])
    assert counted[4] == 1, f"{shard.name} was skipped by rank 1; the run logged {counted}"
