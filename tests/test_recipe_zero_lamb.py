"""LAMB under ZeRO is the same optimizer at any world size: 1 rank vs 2 ranks, ZeRO 1, 2 and 3, fp32.

Ranks are started in-process (torch.multiprocessing, gloo) around our ``Engine``: the point is the
optimizer, not the loader. Every rank draws the same global batch of every step from one seeded
stream and cuts it into micro batches; rank r takes micro batches r, r + world, r + 2 world, ...
(so 1 rank x 4 accumulation and 2 ranks x 2 accumulation see exactly the same micro batches and
DeepSpeed averages the same gradients). Dropout is off, so the only differences left are the order
of floating-point sums.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

STEPS = 20
GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB = 8, 2, 24, 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s global batch, identical on every rank."""
    gen = torch.Generator().manual_seed(1000 + step % 2)  # two batches in turn: learnable in 20 steps
    ids = torch.randint(5, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=gen) < 0.2
    masked[:, 1] = True  # at least one prediction per row
    labels[masked] = ids[masked]
    ids = ids.masked_fill(masked, 4)
    return {"input_ids": ids, "token_type_ids": (torch.arange(SEQ) >= SEQ // 2).long().expand(GLOBAL_BATCH, SEQ),
            "attention_mask": torch.ones_like(ids), "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen)}


def _worker(rank: int, world: int, port: int, stage: int, shard_lamb: bool, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from bertscale.config import OptimizerSection, PhaseSection
    from bertscale.engine import Engine, build_ds_config, init_distributed, zero_layouts
    from bertscale.model import BertForPreTraining, preset_config

    init_distributed("cpu")  # as bertscale.train joins the group (gloo)
    base = Path(out).with_suffix(".ds.json")
    if rank == 0:
        base.write_text(json.dumps({"zero_optimization": {"stage": stage, "overlap_comm": False,
                                                          "contiguous_gradients": True}}))
    torch.distributed.barrier()
    phase = PhaseSection(global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, steps=STEPS, lr=2e-2)
    optimizer = OptimizerSection(weight_decay=0.01, grad_clip=1.0)
    torch.manual_seed(3)
    model = BertForPreTraining(preset_config("tiny", vocab_size=VOCAB, num_hidden_layers=1,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    engine = Engine(model, build_ds_config(base, phase, world, optimizer, "cpu", "fp32"), optimizer, "cpu", lr=phase.lr)
    if not shard_lamb:  # the naive LAMB: trust ratios of whole flat partitions
        engine.engine.optimizer.optimizer.shard({}, reduce=None)
    split = split_over_ranks(zero_layouts(engine.engine.optimizer)[0], world)
    losses = []
    for step in range(STEPS):
        micro = [{k: v[j * MICRO_BATCH:(j + 1) * MICRO_BATCH] for k, v in global_batch(step).items()}
                 for j in range(GLOBAL_BATCH // MICRO_BATCH)]
        total = torch.zeros(1, dtype=torch.float64)
        for batch in micro[rank::world]:
            total += engine.train_micro_batch(batch).loss.detach().double()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / len(micro))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "split": split}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def split_over_ranks(layouts, world: int) -> bool:
    """Whether ZeRO cut some original tensor between ranks (each holds a piece of it)."""
    held = torch.cat([torch.zeros(layout.num_tensors).index_fill_(0, torch.tensor([t for _, _, t in layout.segments],
                                                                                  dtype=torch.long), 1.0)
                      for layout in layouts.values()])
    torch.distributed.all_reduce(held)
    return bool((held == world).any()) if world > 1 else False


def run(tmp: Path, world: int, stage: int, shard_lamb: bool = True) -> dict:
    out = tmp / f"w{world}-z{stage}-{int(shard_lamb)}.json"
    for attempt in (1, 2):
        try:
            mp.start_processes(_worker, args=(world, _free_port(), stage, shard_lamb, str(out)), nprocs=world,
                               join=True, start_method="spawn")
            break
        except mp.ProcessExitedException as exc:
            # Seen once in ~10 full runs on a loaded 2-core machine: a spawned rank aborting (SIGABRT)
            # inside DeepSpeed's CPU communication setup, before any step. One fresh start; a wrong
            # loss never raises this, so the comparison below still decides the test.
            if attempt == 2 or exc.signal_name != "SIGABRT":
                raise
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run(tmp_path_factory.mktemp("zero-lamb"), world=1, stage=2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(one_rank, tmp_path, stage):
    two = run(tmp_path, world=2, stage=stage)
    assert two["split"], "the test needs ZeRO to cut the model's tensors between the ranks"
    ref, got = torch.tensor(one_rank["losses"]), torch.tensor(two["losses"])
    assert ref[-1] < ref[0] - 1.0, f"the reference run did not learn: {ref.tolist()}"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_naive_per_partition_lamb_would_differ(one_rank, tmp_path):
    """Without the layout, trust ratios are per flat partition and the run depends on the world size."""
    naive = run(tmp_path, world=2, stage=2, shard_lamb=False)
    diff = (torch.tensor(naive["losses"]) - torch.tensor(one_rank["losses"])).abs().max().item()
    assert diff > 1e-2, diff
