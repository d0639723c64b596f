"""End to end on CPU: the real `deepspeed` launcher, two ranks, ZeRO-2, bf16, accumulation > 1,
both phases, checkpoints, conversion, and parity of the converted model with `transformers`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale.convert import convert_checkpoint
from bertscale.engine import consolidated_state_dict
from bertscale.evaluate import evaluate
from bertscale.hf_format import load_state_dict_into
from bertscale.model import BertConfig, BertForPreTraining
from launcher.launch import pretrain
from runs import REPO, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(run_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, run_data)
    out = pretrain(str(config))
    return tmp, out


def test_both_phases_leave_complete_checkpoints(trained):
    _, out = trained
    root = out / "checkpoints"
    found = ckpt.complete_checkpoints(root)
    final1, final2 = ckpt.final_of_phase(root, 0), ckpt.final_of_phase(root, 1)
    assert final1 is not None and final1.global_step == 6
    assert final2 is not None and final2.global_step == 8
    assert [c.global_step for c in found][-2:] == [6, 8]
    # step 3 was pruned: keep_last 2 keeps 6 and 8; phase ends are kept anyway
    assert not (root / ckpt.tag_for(3)).exists()
    meta = final2.meta
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["phase"] == "phase2"
    assert meta["state"]["samples_seen"] == 6 * 16 + 2 * 8
    # two ranks wrote their own state beside DeepSpeed's shards
    assert (final2.path / "rank-00000.pt").is_file() and (final2.path / "rank-00001.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_ranks_leave_nothing_in_dev_shm(trained):
    # DeepSpeed's CPU backend would map (and never unlink) 69 MB per rank there for an allreduce that
    # only its inference uses; bertscale.engine keeps it from doing so
    tmp, _ = trained
    port = json.loads((tmp / "run" / "run_config.json").read_text())["distributed"]["master_port"]
    shm = Path("/dev/shm")
    assert not (list(shm.glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if shm.is_dir() else [])


def test_phase2_starts_from_phase1_weights_and_trains(trained):
    _, out = trained
    root = out / "checkpoints"
    w1 = consolidated_state_dict(root, ckpt.final_of_phase(root, 0).tag)
    w2 = consolidated_state_dict(root, ckpt.final_of_phase(root, 1).tag)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    delta = (w2[key] - w1[key]).abs().max().item()
    # phase 2 moved the weights, but only by two small LAMB steps from phase 1's end (not from a fresh init)
    assert 0 < delta < 0.05


def test_rerun_skips_finished_phases(trained, capsys):
    tmp, out = trained
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    pretrain(str(tmp / "run.json"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_train_log_keeps_the_console_without_noise_and_grows_with_each_attempt(trained):
    tmp, out = trained
    first = (out / "train.log").read_text()
    assert "model tiny with " in first and " parameters (1 layers, hidden " in first  # the configuration summary
    assert "  phase1: 6 steps x global batch 16 = 96 samples at seq_len 128" in first
    assert "phase phase1: 6 steps at seq_len 128 on 2 ranks" in first and "phase phase2: 2 steps" in first
    assert "[rank 0] step 2/8 phase1 | loss " in first and "[rank 0] step 8/8 phase2 | loss " in first
    assert "[rank 0] phase phase2: starting from the final weights of phase1" in first
    assert f"saved checkpoint {out / 'checkpoints' / ckpt.tag_for(8)}" in first
    assert "[rank 0] eval at step 8:" in first and "every phase finished" in first
    for noise in ("untested optimizer", "Processing zero checkpoint", "Unable to find hostfile",
                  "Reconstructed fp32 state dict", "Loading checkpoint shards"):
        assert noise not in first, noise
    assert "\n\n" not in first
    header = "==== bertscale pretrain: "
    pretrain(str(tmp / "run.json"))
    second = (out / "train.log").read_text()
    assert second.startswith(first) and second.count(header) == first.count(header) + 1  # appended
    assert "phase phase1 already complete; skipping" in second[len(first):]


def test_converted_model_loads_in_transformers_with_identical_logits(trained):
    transformers = pytest.importorskip("transformers")
    tmp, out = trained
    hf_dir = convert_checkpoint(out / "checkpoints", tmp / "hf")
    hf, info = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True,
                                                               attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()

    root = out / "checkpoints"
    final = ckpt.latest(root)
    ours = BertForPreTraining(BertConfig.from_hf_dict(final.meta["model_config"]))
    load_state_dict_into(ours, consolidated_state_dict(root, final.tag))
    ours.eval()

    tok = transformers.BertTokenizerFast.from_pretrained(hf_dir)
    enc = tok(["ka lo mi ne ru sa.", "vo ze pa"], ["ti vo ze.", "qu dor len fis gar ka lo"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**enc)
        mine = ours(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                    attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(mine.prediction_logits[real], theirs.prediction_logits[real])
    torch.testing.assert_close(mine.seq_relationship_logits, theirs.seq_relationship_logits)


def test_eval_of_converted_model(trained, run_data):
    from bertscale.console import NOISE

    tmp, out = trained
    hf_dir = tmp / "hf-eval"
    # the command as users run it, its output piped: DeepSpeed's consolidation chatter ("Processing zero
    # checkpoint", its progress bar, "Setting accelerator to CPU") is filtered as the training's is
    done = subprocess.run([sys.executable, "-m", "bertscale", "convert", "--checkpoint", str(out / "checkpoints"),
                           "--out", str(hf_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote Hugging Face model to {hf_dir}" in done.stdout
    noise = [line for line in (done.stdout + done.stderr).splitlines() if any(p.search(line) for p, _ in NOISE)]
    assert not noise, noise
    results = evaluate(hf_dir, run_data["d128"], split="valid", batch_size=8)
    assert 0 < results["eval_masked_tokens"] < results["eval_targets_all_positions"]
    assert 0 <= results["eval_mlm_accuracy"] <= 1 and results["eval_mlm_loss"] > 0
    json.dumps(results)


TAGS = ("loss/total", "loss/mlm", "loss/nsp", "accuracy/mlm", "accuracy/nsp", "optim/lr", "optim/grad_norm",
        "optim/loss_scale", "optim/skipped_steps", "optim/global_batch", "throughput/samples_per_s",
        "throughput/tokens_per_s", "throughput/tflops", "throughput/fill", "throughput/data_wait_fraction",
        "throughput/tokens_per_cpu_s",
        "memory/host_rss_gib", "system/cpu_percent", "data/epoch",
        "data/corrupt_shards", "train/phase", "train/seq_len", "train/samples_seen", "eval/mlm_accuracy",
        "eval/mlm_loss", "eval/nsp_accuracy", "eval/mlm_accuracy_all_positions", "eval/mlm_loss_all_positions",
        "eval/baseline_mlm_accuracy", "eval/baseline_mlm_loss", "eval/baseline_mlm_accuracy_all_positions",
        "eval/baseline_mlm_loss_all_positions", "eval/baseline_nsp_accuracy")


def test_tensorboard_events_read_back_with_tensorboards_reader(trained):
    import math

    from bertscale.metrics import read_scalars

    _, out = trained
    scalars = read_scalars(out / "tensorboard")
    missing = [t for t in TAGS if t not in scalars]
    assert not missing, f"missing tags {missing}; have {sorted(scalars)}"
    for tag, series in scalars.items():
        assert all(math.isfinite(v) for _, v in series), tag
        steps = [s for s, _ in series]
        assert steps == sorted(steps) and len(set(steps)) == len(steps), f"{tag}: steps {steps}"
    assert [s for s, _ in scalars["loss/total"]] == [2, 4, 6, 8]  # log_interval 2 over 6 + 2 steps
    assert [v for _, v in scalars["train/phase"]] == [0, 0, 0, 1]
    assert [v for _, v in scalars["train/seq_len"]] == [128, 128, 128, 512]
    samples = [v for _, v in scalars["train/samples_seen"]]
    assert samples == [32, 64, 96, 112]
    assert all(v > 0 for _, v in scalars["throughput/tflops"])
    assert [s for s, _ in scalars["eval/mlm_accuracy"]] == [6, 8]  # end of each phase
    # the shipped default trains on unpadded batches: every computed token is a real one
    assert [v for _, v in scalars["throughput/fill"]] == [1.0] * 4
    assert all(0 <= v <= 1 for _, v in scalars["throughput/data_wait_fraction"])
    # CPU seconds per wall second over each interval, from two figures: the ranks and their loader workers
    # kept at most every core of this machine busy (CPU time counted since the start, or twice, would exceed it)
    busy = [rate / per_cpu_s for (_, rate), (_, per_cpu_s) in zip(scalars["throughput/tokens_per_s"],
                                                                   scalars["throughput/tokens_per_cpu_s"])]
    assert len(busy) == 4 and all(0 < b <= 1.05 * os.cpu_count() for b in busy), busy


BASELINES = ("baseline_mlm_accuracy", "baseline_mlm_loss", "baseline_mlm_accuracy_all_positions",
             "baseline_mlm_loss_all_positions", "baseline_nsp_accuracy")


def test_the_baselines_training_logs_are_those_evaluate_reports_on_the_same_data(plain_run_dir, run_data, tmp_path):
    """The ``eval/baseline_*`` scalars of a real 2-rank run (the unigram fitted by rank 0 and broadcast,
    the held-out tallies summed over both ranks) equal what ``bertscale eval`` reports on each phase's data
    and positions: the same split, seed, batch size and batch count as the trainer's evaluation. The
    baselines do not depend on the model, so the final one stands in for both phases'."""
    from bertscale.metrics import read_scalars

    config = json.loads((plain_run_dir / "run_config.json").read_text())
    scalars = read_scalars(plain_run_dir / "tensorboard")
    hf_dir = convert_checkpoint(plain_run_dir / "checkpoints", tmp_path / "hf")
    for phase, step in zip(config["phases"], (4, 6)):  # each phase's eval at its end
        got = evaluate(hf_dir, phase["data"], split="valid", batch_size=phase["micro_batch"],
                       max_batches=config["train"]["eval_batches"], seed=config["run"]["seed"])
        assert "'train' split of" in got["baseline_fitted_on"]
        for key in BASELINES:
            logged = dict(scalars[f"eval/{key}"])[step]
            assert logged == pytest.approx(got[key], rel=1e-6), (phase["name"], key)  # TensorBoard keeps float32


@pytest.mark.slow
def test_unpadded_and_padded_training_take_the_same_steps(run_data, plain_run, tmp_path):
    """The trainer's unpadded batches are the padded batches' samples and masks: without dropout (whose
    masks are drawn per element of differently shaped tensors) two real 2-rank runs log the same losses
    and accuracies at every step, up to the order of bf16 sums; the padded run's fill is below 1."""
    from bertscale.metrics import read_scalars
    from conftest import PLAIN_RUN_SETTINGS

    out = pretrain(str(write_config(tmp_path, run_data, steps=(4, 2))), PLAIN_RUN_SETTINGS + ["train.unpadded=false"])
    runs = {True: plain_run, False: read_scalars(out / "tensorboard")}  # the unpadded run is the shared one
    for tag in ("loss/mlm", "loss/nsp", "accuracy/nsp", "optim/grad_norm"):
        got, want = ([v for _, v in runs[u][tag]] for u in (True, False))
        assert len(got) == len(want) == 6, tag
        assert got == pytest.approx(want, rel=2e-2, abs=2e-2), tag
    assert all(v == 1.0 for _, v in runs[True]["throughput/fill"])
    assert all(0 < v < 0.9 for _, v in runs[False]["throughput/fill"])


def test_run_summary_tool(trained):
    import importlib.util

    _, out = trained
    spec = importlib.util.spec_from_file_location("run_summary", REPO / "tools" / "run_summary.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    summary = tool.summarize(out)
    assert summary["latest_logged_step"] == 8 and summary["total_steps"] == 8
    assert [c["tag"] for c in summary["checkpoints"]] == ["step00000006", "step00000008"]
    assert all(c["complete"] for c in summary["checkpoints"])
    assert "loss/total" in summary["scalars"] and not summary["failures"]
