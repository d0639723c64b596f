"""tools/gpu_check.sh must run unchanged the first time a GPU is lent: its plumbing (wheel check, data
build, bench_step on real shards, a 2-phase pretrain through `python -m bertscale`, convert, the JSON
summary) runs here in its CPU smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step_and_summarises(tmp_path):
    out, work = tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), work.mkdir()
    env = dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=sys.executable, OUT=str(out), TMPDIR=str(work),
               GPU_CHECK_ONLY="build_data|bench_data_128|pretrain_base|convert|pretrain_fp16_compile|pretrain_zero3")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "gpu_check.json").read_text())
    assert summary["passed"] and set(summary["steps"]) == {"build_data", "bench_data_128", "pretrain_base", "convert",
                                                           "pretrain_fp16_compile", "pretrain_zero3", "convert_zero3"}
    shards = summary["large_128_real_shards"]
    assert shards["unpadded_fill"] == 1.0 and 0 < shards["padded_fill"] < 1 and shards["attention_kernel"] == "rows"
    for run in ("pretrain_last_lines", "zero3_last_lines"):
        assert any("training finished" in line for line in summary[run]), run
    # on CPU the fp16 step checks its config only (--dry-run; DeepSpeed has no fp16 there): its phase plan
    assert any("phase phase1: seq_len 128, 3 steps" in line for line in summary["fp16_compile_last_lines"])
    # where it ran and in what: the CPU, its bf16 capability, and the precision auto picked for the runs
    from bertscale.hardware import choose, cpu_info

    assert summary["cpu_model"] == cpu_info().model and summary["cpu_bf16"].startswith(("native", "emulated"))
    assert summary["precision"]["requested"] == "auto"
    assert summary["precision"]["used"] == choose("auto", "cpu").name
    assert summary["pretrain_precision"] == summary["zero3_precision"] == summary["precision"]["used"]
    steps_log = (out / "steps.log").read_text()
    assert "=== convert: exit 0" in steps_log and "=== convert_zero3: exit 0" in steps_log
    assert "ZeRO stage 3, optimizer lamb" in steps_log  # the ZeRO-3 step ran ZeRO-3
    assert list(work.glob("gpu_check.*")) == []  # its work folder is removed
