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
               GPU_CHECK_ONLY="build_data|bench_data_128|pretrain_base|convert")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "gpu_check.json").read_text())
    assert summary["passed"] and set(summary["steps"]) == {"build_data", "bench_data_128", "pretrain_base", "convert"}
    shards = summary["large_128_real_shards"]
    assert shards["unpadded_fill"] == 1.0 and 0 < shards["padded_fill"] < 1 and shards["attention_kernel"] == "rows"
    assert any("training finished" in line for line in summary["pretrain_last_lines"])
    assert "=== convert: exit 0" in (out / "steps.log").read_text()
    assert list(work.glob("gpu_check.*")) == []  # its work folder is removed
