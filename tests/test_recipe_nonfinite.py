"""A non-finite loss never reaches the weights, on the real launcher (2 ranks, ZeRO-2, bf16, CPU).

Fault injection (``BERTSCALE_FAULT=nan-loss:STEPS:RANK``) makes the loss NaN on ONE rank only: every
rank must skip the same step (no hang, no NaN in the weights, training goes on), and a run of
``train.max_bad_steps`` bad steps in a row must stop with a message naming the step and the last
complete checkpoint.
"""

from __future__ import annotations

import math
import os

import pytest

from bertscale import checkpoint as ckpt
from bertscale.engine import consolidated_state_dict
from bertscale.metrics import read_scalars
from launcher.launch import pretrain
from runs import build_data, write_config

pytestmark = pytest.mark.slow

SETTINGS = ["train.log_interval=1", "train.save_interval=2", "train.eval_batches=0", "train.max_bad_steps=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("nonfinite-data"), n_docs=200)


def _with_fault(spec: str, fn):
    os.environ["BERTSCALE_FAULT"] = spec
    try:
        return fn()
    finally:
        del os.environ["BERTSCALE_FAULT"]


def test_nan_loss_on_one_rank_is_skipped_by_every_rank(data, tmp_path):
    config = write_config(tmp_path, data, steps=(5, 1))
    out = _with_fault("nan-loss:3:1", lambda: pretrain(str(config), SETTINGS))
    scalars = read_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["loss/total"]] == list(range(1, 7))  # nobody hung, every step logged
    bad = dict(scalars["optim/nonfinite_steps"])
    assert bad[2] == 0 and bad[3] == 1 and bad[5] == 1  # step 3 only, counted once for the whole run
    assert dict(scalars["optim/skipped_steps"])[3] == 1
    root = out / "checkpoints"
    weights = consolidated_state_dict(root, ckpt.final_of_phase(root, 0).tag)
    assert all(math.isfinite(v.abs().max().item()) for v in weights.values())
    assert all(math.isfinite(v) for _, v in scalars["optim/grad_norm"] if _ != 3)


def test_consecutive_bad_steps_stop_with_the_last_checkpoint_named(data, tmp_path):
    config = write_config(tmp_path, data, steps=(8, 1))
    with pytest.raises(RuntimeError, match="failed") as failure:
        _with_fault("nan-loss:3-8:0", lambda: pretrain(str(config), SETTINGS))
    text = str(failure.value)
    failures = "".join(p.read_text() for p in (tmp_path / "run" / "failures").glob("rank-*.txt"))
    message = text + failures
    assert "stopping at global step 5" in message and "3 consecutive optimizer steps (3..5)" in message
    # the last complete checkpoint (step 4's weights are step 2's: skipped steps leave them untouched)
    assert "step00000004 (global step 4)" in message
    assert ckpt.latest(tmp_path / "run" / "checkpoints").global_step == 4
    assert "ZeroDivisionError" not in message
