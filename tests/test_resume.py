"""Exact resume and fault tolerance on CPU with the real launcher (2 ranks, ZeRO-2, bf16).

The reference is one uninterrupted run that logs the loss of every optimizer step. Interrupted runs
(SIGTERM, SIGKILL of everything, one rank killed inside a save) are re-run with the same command
and must produce the same per-step losses, bit for bit, across the phase boundary too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bertscale import checkpoint as ckpt
from bertscale.metrics import read_scalars
from launcher.launch import pretrain
from runs import build_data, write_config

pytestmark = pytest.mark.slow

STEPS = (6, 3)
SETTINGS = ["train.log_interval=1", "train.save_interval=2", "train.keep_last=2", "train.eval_batches=0"]


def losses(out: Path) -> list[tuple[int, float]]:
    return read_scalars(out / "tensorboard")["loss/total"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume-data")
    return build_data(tmp)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    out = pretrain(str(write_config(tmp, data, steps=STEPS)), SETTINGS)
    series = losses(out)
    assert [s for s, _ in series] == list(range(1, sum(STEPS) + 1))
    return series


def start(config: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bertscale.cli", "pretrain", "--config", str(config)]
    cmd += [x for kv in SETTINGS for x in ("--set", kv)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_step(root: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while (ckpt.latest(root) is None or ckpt.latest(root).global_step < step) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen) -> None:
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)  # the ranks' sockets (the master port) close when they are gone


def test_sigterm_saves_exits_zero_and_resume_is_exact(data, reference, tmp_path):
    config = write_config(tmp_path, data, steps=STEPS)
    root = tmp_path / "run" / "checkpoints"
    proc = start(config)
    wait_for_step(root, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped = ckpt.latest(root)
    assert stopped is not None and stopped.global_step < sum(STEPS)  # it really stopped early
    assert "stop requested" in output
    assert f"stopped at step {stopped.global_step}, checkpoint saved ({stopped.path}); re-run to continue" in output
    assert "training finished" not in output
    assert not ckpt.final_of_phase(root, 1)

    out = pretrain(str(config), SETTINGS)  # same command: continues, crosses into phase 2
    assert ckpt.final_of_phase(root, 1).global_step == sum(STEPS)
    assert losses(out) == reference  # bitwise: every step once, identical values


def test_sigkill_at_a_random_point_then_resume_is_exact(data, reference, tmp_path):
    config = write_config(tmp_path, data, steps=STEPS)
    root = tmp_path / "run" / "checkpoints"
    proc = start(config)
    wait_for_step(root, 2, proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))
    kill_tree(proc)  # launcher, deepspeed launcher and every rank, no chance to save
    assert ckpt.final_of_phase(root, 1) is None
    out = pretrain(str(config), SETTINGS)
    assert losses(out) == reference  # events logged after the last checkpoint were purged


def test_rank_dying_inside_a_save_leaves_no_usable_half_checkpoint(data, reference, tmp_path, capfd):
    config = write_config(tmp_path, data, steps=STEPS)
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(RuntimeError, match="failed"):
        # rank 1 is SIGKILLed after writing DeepSpeed's shards of step 4, before its own state and the marker
        os.environ["BERTSCALE_FAULT"] = "die-in-save:4:1"
        try:
            pretrain(str(config), SETTINGS)
        finally:
            del os.environ["BERTSCALE_FAULT"]
    assert (root / ckpt.tag_for(4)).is_dir() and not (root / ckpt.tag_for(4) / ckpt.COMPLETE).exists()
    assert ckpt.latest(root).global_step == 2  # auto-resume never picks the half-written one
    capfd.readouterr()
    out = pretrain(str(config), SETTINGS)
    # the resumed run wrote step 4 again, whole (later pruned), and left no half-written directory behind
    assert f"saved checkpoint {root / ckpt.tag_for(4)} " in capfd.readouterr().out
    assert all((path / ckpt.COMPLETE).is_file() for path in root.iterdir() if path.is_dir())
    assert losses(out) == reference


def test_mid_phase_resume_on_another_world_size_is_refused(data, tmp_path):
    config = write_config(tmp_path, data, steps=STEPS)
    root = tmp_path / "run" / "checkpoints"
    proc = start(config)
    wait_for_step(root, 2, proc)
    kill_tree(proc)
    # refused by the launcher, before any rank starts (the ranks would refuse the same way)
    with pytest.raises(ckpt.ResumeError) as failure:
        pretrain(str(config), SETTINGS + ["distributed.num_gpus=1", "phases.phase1.global_batch=8",
                                          "phases.phase1.micro_batch=4", "phases.phase2.global_batch=4"])
    assert "written by 2 ranks but this run has 1" in str(failure.value)
    with pytest.raises(ckpt.ResumeError) as failure:
        pretrain(str(config), SETTINGS + ["model.pad_vocab_multiple=64"])  # as a CUDA run would pad
    assert "vocabulary rows" in str(failure.value) and "model.pad_vocab_multiple" in str(failure.value)


def test_resume_never_refuses_an_existing_run(data, tmp_path):
    config = write_config(tmp_path, data, steps=(2, 1))
    pretrain(str(config), ["train.eval_batches=0"])
    from bertscale.config import ConfigError

    with pytest.raises(ConfigError, match="--resume never"):
        pretrain(str(config), ["train.eval_batches=0"], resume="never")
