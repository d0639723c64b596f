"""train.precision: auto picks what the hardware computes natively (bf16, else fp32 on a CPU, fp16 on a GPU),
the ranks' DeepSpeed config follows it, a DeepSpeed JSON that sets one wins, and a resume never changes it
silently. The CPU's capability is forced each way by patching the detection the launcher consults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bertscale import checkpoint as ckpt
from bertscale import hardware
from bertscale.config import ConfigError, load_config
from bertscale.engine import build_ds_config, json_precision, load_ds_config
from launcher.launch import RunFailed, pretrain
from runs import REPO, optimizer_steps, run_config, write_config

NATIVE = (True, "this CPU (test) computes bf16 natively (forced by the test)")
EMULATED = (False, "this CPU (test) has no native bf16 (forced by the test)")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Force what the CPU is said to compute: ``cpu_bf16(True)`` or ``cpu_bf16(False)``."""
    def force(native: bool) -> None:
        monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: NATIVE if native else EMULATED)
    return force


# ---------------------------------------------------------------- the choice

def test_auto_on_cpu_follows_native_bf16(cpu_bf16):
    cpu_bf16(True)
    chosen = hardware.choose("auto", "cpu")
    assert (chosen.name, chosen.warning) == ("bf16", None)
    assert chosen.line() == f"precision bf16 (train.precision = 'auto'): auto: {NATIVE[1]}"
    cpu_bf16(False)
    chosen = hardware.choose("auto", "cpu")
    assert (chosen.name, chosen.warning) == ("fp32", None)
    assert EMULATED[1] in chosen.reason and "fp32 instead (bf16 would be emulated, about 40x slower)" in chosen.reason


def test_explicit_bf16_on_a_cpu_without_it_runs_with_a_warning_naming_the_slowdown(cpu_bf16):
    cpu_bf16(False)
    chosen = hardware.choose("bf16", "cpu")
    assert chosen.name == "bf16" and chosen.reason == "as configured"
    assert "torch emulates it" in chosen.warning and "x slower than fp32" in chosen.warning
    assert 'train.precision = "auto" or "fp32" trains at full speed here' in chosen.warning
    cpu_bf16(True)
    assert hardware.choose("bf16", "cpu").warning is None
    assert hardware.choose("fp32", "cpu").name == "fp32"


def test_auto_on_cuda_picks_fp16_where_the_gpu_has_no_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_bf16", lambda devices: (False, "cuda:0 Tesla V100 has no native bf16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = hardware.choose("auto", "cuda", devices=2)
    assert chosen.name == "fp16" and "Tesla V100" in chosen.reason and "dynamic loss scaling" in chosen.reason
    with pytest.raises(ConfigError, match=r'precision bf16: cuda:0 Tesla V100.*set train.precision = "fp16"'):
        hardware.choose("bf16", "cuda")
    monkeypatch.setattr(hardware, "cuda_bf16", lambda devices: (True, "NVIDIA H100 computes bf16 natively"))
    assert hardware.choose("auto", "cuda").name == "bf16"


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="precision fp16 on CPU: DeepSpeed has no fp16 there"):
        hardware.choose("fp16", "cpu")


def test_the_cpu_report_agrees_with_proc_cpuinfo():
    info = hardware.cpu_info()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags |= set(value.split())
    for flag in hardware.X86_BF16_FLAGS:
        assert (flag in info.bf16_features) == (flag in flags)
    report = hardware.machine_report()
    assert report["cpu_model"] == info.model and report["cpu_bf16"].split(" ")[0] in ("native", "emulated")
    # torch's oneDNN capped below AVX-512 (ONEDNN_MAX_CPU_ISA) runs bf16 emulated whatever the CPU has
    assert info.reports_native_bf16 == (bool(info.bf16_features) and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---------------------------------------------------------------- the DeepSpeed JSON

def test_a_json_that_sets_a_precision_wins_and_says_so(tmp_path, cpu_bf16):
    cpu_bf16(False)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    fixed = json_precision(load_ds_config(path))
    chosen = hardware.choose("fp32", "cpu", json_precision=fixed, json_path=str(path))
    assert chosen.name == "bf16" and f"{path} sets bf16 explicitly, which wins over train.precision = 'fp32'" \
        in chosen.reason
    assert chosen.warning is not None  # still emulated on this (forced) CPU: said
    assert json_precision({"fp16": {"enabled": False}, "zero_optimization": {"stage": 2}}) == "fp32"
    assert json_precision({"bf16": {"immediate_grad_update": True}}) is None  # options only: the run setting decides
    assert json_precision(load_ds_config(REPO / "ds_configs" / "zero2.json")) is None
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled must be true or false \('auto' is the Hugging Face"):
        load_ds_config(path)


def test_the_shipped_configs_of_earlier_releases_say_what_replaced_them(tmp_path):
    with pytest.raises(ConfigError, match=r"zero2_bf16.json was split in two: its ZeRO settings are "
                                          r"ds_configs/zero2.json and its precision is the run configuration's "
                                          r'train.precision \(= "bf16"'):
        load_ds_config(tmp_path / "ds_configs" / "zero2_bf16.json")


def test_a_typo_in_the_precision_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\ntokenizer = "tok"\n[train]\nprecision = "bf61"\n[[phases]]\ndata = "d"\n')
    with pytest.raises(ConfigError, match=r"train.precision: 'bf61' must be one of auto, bf16, fp16, fp32 "
                                          r"\(did you mean 'bf16'\?\)"):
        load_config(path)


def test_a_hostfile_launch_needs_the_precision_said(run_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    config = write_config(tmp_path, run_data, out=tmp_path / "run")
    remote = [f"distributed.hostfile={hostfile}", "distributed.num_nodes=2", "distributed.num_gpus=1"]
    with pytest.raises(ConfigError, match=r"train.precision is 'auto' but the ranks run on the hosts of .*hostfile.*"
                                          r'set train.precision = "bf16"'):
        pretrain(str(config), remote, dry_run=True)
    pretrain(str(config), remote + ["train.precision=fp32"], dry_run=True)  # said: planned


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_dry_run_says_the_choice_and_why(run_data, tmp_path, capsys, cpu_bf16, native, expected):
    cpu_bf16(native)
    config = write_config(tmp_path, run_data, out=tmp_path / "run")
    pretrain(str(config), dry_run=True)
    out = capsys.readouterr().out
    resolved = json.loads(out.split("# resolved configuration\n", 1)[1].split("\n#", 1)[0])
    assert resolved["train"]["precision"] == expected  # what the ranks read
    assert f"# precision {expected} (train.precision = 'auto'): auto: {(NATIVE if native else EMULATED)[1]}" in out


# ---------------------------------------------------------------- the ranks, and resuming

@pytest.mark.slow
def test_forced_each_way_the_ranks_train_in_the_choice_and_a_resume_never_changes_it_silently(
        run_data, tmp_path, cpu_bf16):
    """Native: auto trains in bf16 (kept small: on a CPU without bf16 instructions this part is emulated).
    A rank dies mid-phase; the machine is then one without native bf16: auto now means fp32, and the resume
    continues the phase in fp32 through the universal checkpoint, saying so in the log and the run state,
    with the fp32 weights and LAMB's moments carried over (its step count goes on)."""
    config = run_config(tmp_path, run_data, out=tmp_path / "run", steps=(4, 1))
    config["phases"] = config["phases"][:1]  # one phase: a phase start is tests/test_checkpoint.py's
    settings = ["train.save_interval=2", "train.eval_batches=0"]
    cpu_bf16(True)
    os.environ["BERTSCALE_FAULT"] = "die-in-save:4:1"  # rank 1 dies saving step 4: step 2 is the last checkpoint
    try:
        with pytest.raises(RunFailed):
            pretrain(config, settings)
    finally:
        del os.environ["BERTSCALE_FAULT"]
    out = tmp_path / "run"
    first = ckpt.latest(out / "checkpoints")
    assert first.global_step == 2 and first.meta["precision"] == "bf16"  # the engine's own dtype
    decided = json.loads((out / "run_config.json").read_text())
    assert decided["train"]["precision"] == "bf16"
    assert decided["decided"]["precision"] == {"precision": "bf16", "requested": "auto", "reason": f"auto: {NATIVE[1]}"}

    cpu_bf16(False)
    pretrain(config, settings)
    decided = json.loads((out / "run_config.json").read_text())
    assert decided["train"]["precision"] == "fp32" and decided["decided"]["precision"]["reason"].startswith(
        f"auto: {EMULATED[1]}")
    log = (out / "train.log").read_text()
    assert f"precision fp32 (train.precision = 'auto'): auto: {EMULATED[1]}" in log
    assert "the phase continues in fp32, trained so far in bf16: converting" in log
    assert "precision changed from bf16 to fp32 at global step 2" in log and "no longer bit for bit" in log
    end1 = ckpt.final_of_phase(out / "checkpoints", 0)
    assert end1.meta["precision"] == "fp32" and end1.global_step == 4
    assert end1.meta["state"]["precision_changes"] == [{"global_step": 2, "from": "bf16", "to": "fp32"}]
    assert optimizer_steps(end1) == 4  # LAMB's moments came through: 2 steps in bf16, 2 in fp32
    # the DeepSpeed config a rank builds from that run_config.json: fp32, no precision table enabled
    ds = build_ds_config(decided["distributed"]["deepspeed_config"], load_config(out / "run_config.json").phases[0],
                         2, load_config(out / "run_config.json").optimizer, "cpu", decided["train"]["precision"])
    assert not ds.get("bf16", {}).get("enabled") and not ds.get("fp16", {}).get("enabled")
