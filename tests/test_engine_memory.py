"""A CPU rank's address space stays flat from step to step under the launcher's malloc settings.

CPU ranks run with ``CPU_MALLOC_TUNABLES`` (glibc: no mmap, never trim). DeepSpeed's ZeRO 1/2 allocate a
fresh gradient bucket of ``reduce_bucket_size`` elements every micro step; at DeepSpeed's default (5e8,
1 GB in bf16) each landed in the heap and the heap's address space grew by ~1 GB per micro step until
the kernel refused to fork the next epoch's loader workers (ENOMEM). ``engine.right_sized_buckets`` sizes
the bucket to the model. The rank here is a real process started with the launcher's environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.environment import CPU_MALLOC_TUNABLES

REPO = Path(__file__).resolve().parent.parent

RANK = r"""
import json, os, sys
import torch
from bertscale.config import OptimizerSection, PhaseSection
from bertscale.engine import Engine, build_ds_config, init_distributed
from bertscale.model import BertForPreTraining, preset_config
from bertscale.hardware import choose

def vm_data_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) // 1024

torch.set_num_threads(1)
init_distributed("cpu")
phase = PhaseSection(global_batch=8, micro_batch=2, steps=20, lr=1e-3)
optimizer = OptimizerSection()
torch.manual_seed(0)
model = BertForPreTraining(preset_config("tiny", vocab_size=96, num_hidden_layers=1))
ds_config = build_ds_config(sys.argv[1], phase, 1, optimizer, "cpu", choose("auto", "cpu").name)
engine = Engine(model, ds_config, optimizer, "cpu", lr=1e-3)
gen = torch.Generator().manual_seed(0)
sizes = []
for step in range(16):
    ids = torch.randint(5, 96, (2, 24), generator=gen)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
             "labels": torch.where(torch.rand(ids.shape, generator=gen) < 0.2, ids, torch.full_like(ids, -100)),
             "next_sentence_label": torch.randint(0, 2, (2,), generator=gen)}
    engine.train_micro_batch(batch)
    sizes.append(vm_data_mib())
print(json.dumps({"vm_data_mib": sizes, "bucket": engine.ds_config["zero_optimization"].get("reduce_bucket_size")}))
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmData from /proc")
def test_cpu_rank_heap_does_not_grow_per_micro_step():
    env = {**os.environ, "GLIBC_TUNABLES": CPU_MALLOC_TUNABLES, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", RANK, str(REPO / "ds_configs" / "zero2.json")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = result["vm_data_mib"]
    # 12 micro steps after warm-up: at DeepSpeed's default bucket this grew by 4.8 GB (ZeRO-2: ~1 GB a micro
    # step; ZeRO-1 at each accumulation boundary); sized to the model, 73 MiB, flat after ~60 steps
    assert sizes[-1] - sizes[3] < 512, f"VmData per micro step (MiB): {sizes}; bucket {result['bucket']}"
