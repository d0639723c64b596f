"""Exact resume and fault tolerance on CPU with the real launcher (2 ranks, ZeRO-2, in the precision
train.precision = auto picks: bf16 where the CPU computes it natively, else fp32).

The reference is one uninterrupted run that logs the loss of every optimizer step. Interrupted runs
(SIGTERM, SIGKILL of everything, one rank killed inside a save) are re-run with the same command
and must produce the same per-step losses, bit for bit, across the phase boundary too. A run moved
between 2 and 1 ranks mid-phase trains every global step on the same samples, with losses and LAMB
moments within measured tolerances of the reference.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bertscale import checkpoint as ckpt
from bertscale.convert import convert_checkpoint
from launcher.launch import pretrain
from runs import losses, optimizer_state, write_config

pytestmark = pytest.mark.slow

STEPS = (6, 3)
SETTINGS = ["train.log_interval=1", "train.save_interval=2", "train.keep_last=2", "train.eval_batches=0"]
LOSS_TOL = 0.01
"""Relative per-step loss deviation allowed after a world-size change (measured: see the test)."""
MOMENT_TOL = 0.25
"""Relative deviation of LAMB's second-moment norms from the uninterrupted run's (measured: see the test)."""


@pytest.fixture(scope="module")
def data(run_data):
    return run_data


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """The uninterrupted run on 2 ranks: its per-step losses and the sample ids of every global step."""
    tmp = tmp_path_factory.mktemp("reference")
    with environment(BERTSCALE_SAMPLE_LOG=str(tmp / "samples")):
        out = pretrain(str(write_config(tmp, data, steps=STEPS)), SETTINGS)
    series = losses(out)
    assert [s for s, _ in series] == list(range(1, sum(STEPS) + 1))
    return series, steps_samples(tmp / "samples"), tmp / "run" / "checkpoints"


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0]


@pytest.fixture(scope="module")
def died_in_save(data, tmp_path_factory) -> tuple[Path, Path]:
    """A 2-rank run whose rank 1 was SIGKILLed inside the save of step 4: after writing DeepSpeed's shards,
    before its own state and the marker (the run directory, and the ranks' sample logs of steps 1-4).
    Each test that continues it works on a copy (``continue_from``)."""
    tmp = tmp_path_factory.mktemp("died-in-save")
    with environment(BERTSCALE_SAMPLE_LOG=str(tmp / "samples"), BERTSCALE_FAULT="die-in-save:4:1"):
        with pytest.raises(RuntimeError, match="failed"):
            pretrain(str(write_config(tmp, data, steps=STEPS)), SETTINGS)
    return tmp / "run", tmp / "samples"


def continue_from(run: Path, data, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a shared run directory at TMP_PATH/run, and a config for it (as the test that made it had)."""
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return write_config(tmp_path, data, steps=STEPS), tmp_path / "run" / "checkpoints"


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
    # the signal goes as the ranks start phase 1's loop: sent once a checkpoint exists, it could land after the
    # phase's last step where fp32 steps of the tiny model take 0.1 s (the launcher then stops between phases,
    # and no rank ever sees it)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "phase phase1: global steps" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
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


def test_rank_dying_inside_a_save_leaves_no_usable_half_checkpoint(data, reference, died_in_save, tmp_path, capfd):
    # rank 1 was SIGKILLed after writing DeepSpeed's shards of step 4, before its own state and the marker
    config, root = continue_from(died_in_save[0], data, tmp_path)
    assert (root / ckpt.tag_for(4)).is_dir() and not (root / ckpt.tag_for(4) / ckpt.COMPLETE).exists()
    assert ckpt.latest(root).global_step == 2  # auto-resume never picks the half-written one
    capfd.readouterr()
    out = pretrain(str(config), SETTINGS)
    # the resumed run wrote step 4 again, whole (later pruned), and left no half-written directory behind
    assert f"saved checkpoint {root / ckpt.tag_for(4)} " in capfd.readouterr().out
    assert all((path / ckpt.COMPLETE).is_file() for path in root.iterdir() if path.is_dir())
    assert losses(out) == reference


def steps_samples(folder: Path, steps: range | None = None) -> dict[int, list[int]]:
    """Sample ids each global step trained on, from the ranks' BERTSCALE_SAMPLE_LOG files in ``folder``."""
    found: dict[int, list[int]] = {}
    for file in folder.glob("samples-*.txt"):
        for line in file.read_text().splitlines():
            step, *ids = map(int, line.split())
            if steps is None or step in steps:
                found.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in sorted(found.items())}


@contextlib.contextmanager
def environment(**values: str):
    """Variables the launched ranks inherit (pretrain runs in this process)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def test_mid_phase_resume_on_another_world_size_continues_the_same_run(data, reference_run, died_in_save, tmp_path):
    """2 ranks -> SIGKILL -> 1 rank -> SIGKILL -> 2 ranks, each kill inside phase 1 (a rank killed while
    saving, so the checkpoint it was writing is never complete): every global step trains on the same
    samples as the uninterrupted run, the losses follow it, and the result converts to transformers."""
    ref_losses, ref_samples, ref_root = reference_run
    # the first attempt (2 ranks, rank 1 killed saving step 4) is the shared died_in_save run
    config, root = continue_from(died_in_save[0], data, tmp_path)
    one_rank = ["distributed.num_gpus=1"]  # same global batch: accumulation 2 -> 4
    attempts = [(died_in_save[1], "die-in-save:4:1", [])] + [
        (tmp_path / f"samples{i}", fault, world) for i, (fault, world) in
        enumerate([("die-in-save:6:0", one_rank), ("", [])], 1)]
    for folder, fault, world in attempts:
        if folder != attempts[0][0]:
            with environment(BERTSCALE_SAMPLE_LOG=str(folder), BERTSCALE_FAULT=fault):
                if fault:
                    with pytest.raises(RuntimeError, match="failed"):
                        pretrain(str(config), SETTINGS + world)
                else:
                    out = pretrain(str(config), SETTINGS + world)
        if folder == attempts[0][0]:
            assert ckpt.latest(root).global_step == 2
            # the same phase cannot continue with a vocabulary padded otherwise (refused by the launcher)
            with pytest.raises(ckpt.ResumeError, match="vocabulary rows.*model.pad_vocab_multiple"):
                pretrain(str(config), SETTINGS + one_rank + ["model.pad_vocab_multiple=64"])
        if folder == attempts[1][0]:
            assert ckpt.latest(root).global_step == 4
            assert (root / ckpt.tag_for(2) / ckpt.UNIVERSAL / "zero").is_dir()  # converted beside the original
    assert ckpt.latest(root).global_step == sum(STEPS)
    # steps 1-2 on 2 ranks, 3-4 on 1 rank (resumed from step 2), 5-9 on 2 ranks (resumed from step 4)
    samples = {**steps_samples(attempts[0][0], range(1, 3)), **steps_samples(attempts[1][0], range(3, 5)),
               **steps_samples(attempts[2][0])}
    assert samples == ref_samples
    phase1 = sum((samples[s] for s in range(1, STEPS[0] + 1)), [])
    assert len(phase1) == len(set(phase1)) == STEPS[0] * 16  # no sample twice inside the phase's epoch
    changes = ckpt.latest(root).meta["state"]["world_size_changes"]
    assert changes == [{"global_step": 2, "from": 2, "to": 1}, {"global_step": 4, "from": 1, "to": 2}]

    got = dict(losses(out))
    assert [s for s, _ in ref_losses] == sorted(got)
    assert all(got[s] == v for s, v in ref_losses if s <= 2)  # before the first switch: the same run, bitwise
    deviation = max(abs(got[s] - v) / abs(v) for s, v in ref_losses if s > 2)
    print(f"world-size change: max relative loss deviation {deviation:.2e} over steps 3..{sum(STEPS)}; per step "
          + ", ".join(f"{s}: {got[s] - v:+.4f}" for s, v in ref_losses if s > 2))
    # Measured: another summation order and other dropout draws on the resumed ranks move the loss
    # by up to ~LOSS_TOL/4 relative; the loss of a run whose optimizer state was dropped at step 2
    # moves by more (see the closing note of issue 13).
    assert deviation < LOSS_TOL, (deviation, ref_losses, sorted(got.items()))

    # LAMB's state went through both switches: at the end of phase 1 (step 6) every tensor's step count
    # and second moment match the uninterrupted run's (a run that lost them at step 4 would count 2 steps
    # and hold about a third of the second moment: beta2 0.999 sums 2 squared gradients instead of 6)
    ours, theirs = (optimizer_state(ckpt.resolve(r, ckpt.tag_for(STEPS[0]))) for r in (root, ref_root))
    assert ours.keys() == theirs.keys() and len(ours) == 30
    assert all(ours[name][0] == theirs[name][0] == STEPS[0] for name in ours)
    ratios = sorted(ours[n][1] / theirs[n][1] for n in ours if theirs[n][1] > 0)
    moment = max(abs(r - 1) for r in ratios)
    print(f"world-size change: exp_avg_sq norm ratios to the reference at step {STEPS[0]}: min {ratios[0]:.3f} "
          f"median {ratios[len(ratios) // 2]:.3f} max {ratios[-1]:.3f} over {len(ratios)} tensors")
    assert moment < MOMENT_TOL

    from transformers import BertForPreTraining as HFBert

    hf_dir = convert_checkpoint(root, tmp_path / "hf")
    model = HFBert.from_pretrained(hf_dir)
    assert model.config.num_hidden_layers == 1


def test_resume_never_refuses_an_existing_run(data, reference_run, tmp_path):
    from bertscale.config import ConfigError

    # a copy of the finished reference run (its checkpoints and events), not a run of its own
    config, _ = continue_from(reference_run[2].parent, data, tmp_path)
    with pytest.raises(ConfigError, match="--resume never"):
        pretrain(str(config), SETTINGS, resume="never")
