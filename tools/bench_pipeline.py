#!/usr/bin/env python3
"""How much of the bare training step's speed the whole trainer keeps (issue 12's pipeline efficiency).

    python tools/bench_pipeline.py --data demo_out --json            # the demo's shards and tokenizer
    python tools/bench_pipeline.py --data demo_out --seq-len 128 --steps 30

For each sequence length, in the same run:

* **trainer**: the real thing, ``bertscale pretrain`` through the ``deepspeed`` launcher: DeepSpeed
  ZeRO-2 in ``--precision`` (default ``auto``: bf16 where the CPU computes it natively, else fp32), our
  LAMB, ``--ranks`` CPU ranks, the loader with its shipped worker count, logging
  every ``--steps`` steps, no checkpoint until the end. Its ``throughput/tokens_per_s`` (real tokens, all
  ranks) over the logged intervals after the first (which holds start-up and warm-up) is the figure;
  ``throughput/data_wait_fraction`` says how much of it ranks spent waiting on the loader.
* **bare step**: ``--ranks`` processes with the trainer's threads each, each running only forward,
  backward and an optimizer step (our LAMB with the trainer's settings, built by the engine's own
  ``build_optimizer``, unsharded: each process steps the whole model) of the same model in the same precision on
  that rank's same micro batches, read into memory first: no DeepSpeed, no loader, no logging, no
  collectives.

``pipeline_efficiency`` = trainer real tokens/s / bare real tokens/s. What the gap holds: ZeRO's
gradient all-reduce and partitioned optimizer step, DeepSpeed's bookkeeping, the loader, host syncs
and logging. Both sides use the run's default batch layout (unpadded: ``train.unpadded``).

Two figures split the gap. Data-parallel ranks wait for each other every step (the gradient
all-reduce), so a step lasts as long as its busiest rank; unpadded micro batches of a fixed number of
samples hold different numbers of tokens on each rank. ``rank_token_balance`` = the ranks' mean real
tokens / the busiest rank's, summed over the timed steps: what a synchronous step can reach if time
follows real tokens (no measurement: the batches' own counts). ``bare_lockstep`` runs the same bare
steps with a barrier after each (the wait a collective imposes, and nothing else), so
``sync_efficiency`` = lockstep / free-running bare measures that wait, and
``trainer_vs_lockstep`` = trainer / lockstep what DeepSpeed, the loader and the loop add beyond it.

The machine may be shared and its load changes from minute to minute: ``--rounds N`` measures trainer
and bare N times, alternating, and reports the median of the rounds' ratios beside each round's.
``cpu_efficiency`` = real tokens per CPU second (every rank and its loader workers: the trainer's
``throughput/tokens_per_cpu_s``) of the trainer / of the bare step: what the loop costs in work, which
other jobs on the machine barely move; waiting (for a core, a peer rank, the loader) is not in it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MICRO = {128: 32, 512: 16}  # the demo's micro batches (bertscale.demo.demo_config)
LR = 1e-3  # the phase's peak lr; the optimizer's other settings are the config's defaults (no [optimizer])


def _config(out: Path, data: Path, tok: Path, seq_len: int, steps: int, ranks: int, port: int, unpadded: bool,
            preset: str = "tiny", precision: str = "auto") -> str:
    micro = MICRO.get(seq_len, 16)
    return f"""
[run]
name = "bench_pipeline"
out_dir = "{out.as_posix()}"
seed = 1
[model]
preset = "{preset}"
tokenizer = "{tok.as_posix()}"
[distributed]
deepspeed_config = "{(REPO / 'ds_configs' / 'zero2.json').as_posix()}"
accelerator = "cpu"
num_gpus = {ranks}
master_port = {port}
[train]
precision = "{precision}"
log_interval = {steps}
save_interval = {10 * steps}
eval_batches = 0
unpadded = {str(unpadded).lower()}
[[phases]]
name = "p{seq_len}"
seq_len = {seq_len}
data = "{data.as_posix()}"
global_batch = {micro * ranks}
micro_batch = {micro}
steps = {3 * steps}
lr = {LR}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_rate(data: Path, tok: Path, seq_len: int, steps: int, ranks: int, unpadded: bool, work: Path,
                 preset: str = "tiny", precision: str = "auto") -> dict:
    """Real tokens/s of ``bertscale pretrain`` over intervals 2 and 3 of 3 (``steps`` steps each)."""
    from bertscale.metrics import read_scalars
    from launcher.launch import pretrain

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"run{seq_len}"
    config = work / f"run{seq_len}.toml"
    config.write_text(_config(out, data, tok, seq_len, steps, ranks, free_port(), unpadded, preset, precision),
                      encoding="utf-8")
    pretrain(str(config))
    s = read_scalars(out / "tensorboard")
    tail = lambda tag: [v for _, v in s[tag]][1:]  # noqa: E731 - intervals after the first
    rates, waits = tail("throughput/tokens_per_s"), tail("throughput/data_wait_fraction")
    return {"real_tokens_per_s": sum(rates) / len(rates), "data_wait_fraction": sum(waits) / len(waits),
            "fill": sum(tail("throughput/fill")) / len(rates),
            "real_tokens_per_cpu_s": sum(tail("throughput/tokens_per_cpu_s")) / len(rates)}


def _bare_worker(rank: int, ranks: int, data: str, tok_dir: str, seq_len: int, steps: int, threads: int,
                 unpadded: bool, start, results, preset: str = "tiny", precision: str = "bf16") -> None:
    import torch

    from bertscale.config import OptimizerSection
    from bertscale.engine import build_optimizer, parameter_groups
    from bertscale.loader import PretrainingLoader
    from bertscale.model import BertForPreTraining, PerfOptions, preset_config
    from bertscale.packing import model_inputs, real_tokens
    from bertscale.tokenizer import tokenizer_info

    torch.set_num_threads(threads)
    tok = tokenizer_info(tok_dir)
    loader = PretrainingLoader(data, split="train", micro_batch=MICRO.get(seq_len, 16), rank=rank, world_size=ranks,
                               seed=1, tokenizer=tok, num_workers=0, unpadded=unpadded)
    it = iter(loader)
    batches = [model_inputs(next(it)) for _ in range(3 * steps)]
    torch.manual_seed(0)
    model = BertForPreTraining(preset_config(preset, tok.vocab_size), PerfOptions.for_device("cpu"))
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    # the trainer's optimizer with the trainer's settings, unsharded (the trainer's ZeRO-2 ranks each step
    # half of it, on fp32 master weights, and add the norm reductions LAMB's sharding needs)
    settings = OptimizerSection()
    opt = build_optimizer(parameter_groups(model, settings.weight_decay), settings, LR)

    def step(b):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:steps]:  # the trainer's first interval is left out too
        step(b)
    timed = batches[steps:]
    free = lockstep = cpu = 0.0
    for _ in range(2):  # free, lockstep, free, lockstep: neither pass is always the warmer or the luckier one
        start.wait()  # both ranks time together: they share the cores as the trainer's ranks do
        t, c = time.perf_counter(), time.process_time()
        for b in timed:
            step(b)
        free, cpu = free + time.perf_counter() - t, cpu + time.process_time() - c
        start.wait()
        t = time.perf_counter()
        for b in timed:  # lockstep: every rank waits for the others after each step, as at a collective
            step(b)
            start.wait()
        lockstep += time.perf_counter() - t
    results.put((rank, [real_tokens(b) for b in timed] * 2, free, lockstep, cpu))


def bare_rate(data: Path, tok: Path, seq_len: int, steps: int, ranks: int, unpadded: bool,
              preset: str = "tiny", precision: str = "bf16") -> dict:
    from bertscale.config import RunConfig
    from bertscale.recipe import cpu_threads

    threads = cpu_threads(RunConfig(), ranks)  # what the launcher gives each CPU rank
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(r, ranks, str(data), str(tok), seq_len, steps, threads, unpadded,
                                                    start, results, preset, precision)) for r in range(ranks)]
    for p in procs:
        p.start()
    got = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    per_step = list(zip(*(g[1] for g in got)))  # real tokens of each timed step (each twice: two passes), per rank
    tokens = sum(map(sum, per_step))
    return {"real_tokens_per_s": tokens / max(g[2] for g in got),
            "lockstep_real_tokens_per_s": tokens / max(g[3] for g in got),
            "real_tokens_per_cpu_s": tokens / sum(g[4] for g in got),
            "rank_token_balance": tokens / sum(ranks * max(step) for step in per_step),
            "threads_per_rank": threads}


def find(folder: Path, seq_len: int) -> Path:
    for candidate in (folder / f"data{seq_len}", folder / f"d{seq_len}", folder):
        if (candidate / "index.json").is_file():
            return candidate
    raise FileNotFoundError(f"no shards at seq_len {seq_len} under {folder} (expected data{seq_len}/index.json: "
                            f"the folder `bertscale demo --out` writes)")


def main(argv: list[str] | None = None) -> None:
    from bertscale import hardware
    from bertscale.model import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a demo output folder: data128/, data512/, tokenizer/")
    p.add_argument("--tokenizer", default=None, help="default: DATA/tokenizer")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per logged interval (3 intervals)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model size on both sides (tiny: the demo's)")
    p.add_argument("--padded", action="store_true", help="both sides on padded batches (train.unpadded = false)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="both sides (auto: bf16 where this CPU computes it natively, else fp32: bertscale.hardware)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure trainer and bare this many times, alternating; the figures are the rounds' medians")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1 (got {a.rounds})")
    folder = Path(a.data).resolve()
    tok = Path(a.tokenizer).resolve() if a.tokenizer else folder / "tokenizer"
    choice = hardware.choose(a.precision, "cpu")
    print(choice.line() + (f"\nwarning: {choice.warning}" if choice.warning else ""), flush=True)
    out: dict = {**hardware.machine_report(), "precision": choice.name, "preset": a.preset, "ranks": a.ranks,
                 "steps_timed": 2 * a.steps, "layout": "padded" if a.padded else "unpadded", "rounds": a.rounds,
                 "lengths": {}}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline.") as work:
        for seq_len in a.seq_len:
            data = find(folder, seq_len)
            rounds = []
            for i in range(a.rounds):
                trainer = trainer_rate(data, tok, seq_len, a.steps, a.ranks, not a.padded, Path(work) / f"round{i}",
                                       a.preset, choice.name)
                bare = bare_rate(data, tok, seq_len, a.steps, a.ranks, not a.padded, a.preset, choice.name)
                rounds.append(_ratios(trainer, bare))
                print(f"seq_len {seq_len} round {i + 1}/{a.rounds}: trainer {trainer['real_tokens_per_s']:.0f} real "
                      f"tok/s (data wait {trainer['data_wait_fraction']:.1%}, fill {trainer['fill']:.2f}), bare step "
                      f"{bare['real_tokens_per_s']:.0f} (lockstep {bare['lockstep_real_tokens_per_s']:.0f}) real tok/s "
                      f"-> pipeline efficiency {rounds[-1]['pipeline_efficiency']:.2f} (sync "
                      f"{rounds[-1]['sync_efficiency']:.2f} x trainer/lockstep {rounds[-1]['trainer_vs_lockstep']:.2f};"
                      f" rank token balance {bare['rank_token_balance']:.2f}); per CPU second: trainer "
                      f"{trainer['real_tokens_per_cpu_s']:.0f}, bare {bare['real_tokens_per_cpu_s']:.0f} real tokens "
                      f"-> cpu efficiency {rounds[-1]['cpu_efficiency']:.2f}", flush=True)
            r = {key: statistics.median(x[key] for x in rounds) for key in RATIOS}
            r.update(rounds=rounds, rank_token_balance=rounds[0]["bare"]["rank_token_balance"])
            out["lengths"][str(seq_len)] = r
            each = ", ".join(f"{x['pipeline_efficiency']:.2f}/{x['cpu_efficiency']:.2f}" for x in rounds)
            print(f"seq_len {seq_len}: pipeline efficiency {r['pipeline_efficiency']:.2f}, cpu efficiency "
                  f"{r['cpu_efficiency']:.2f} (medians of {a.rounds} round(s), wall/cpu: {each})", flush=True)
    if a.json:
        print(json.dumps(out))


RATIOS = ("pipeline_efficiency", "cpu_efficiency", "sync_efficiency", "trainer_vs_lockstep")


def _ratios(trainer: dict, bare: dict) -> dict:
    """One round's figures: both sides' rates and the four ``RATIOS`` (see the module docstring)."""
    rate, lockstep = bare["real_tokens_per_s"], bare["lockstep_real_tokens_per_s"]
    return {"trainer": trainer, "bare": bare, "pipeline_efficiency": trainer["real_tokens_per_s"] / rate,
            "cpu_efficiency": trainer["real_tokens_per_cpu_s"] / bare["real_tokens_per_cpu_s"],
            "sync_efficiency": lockstep / rate, "trainer_vs_lockstep": trainer["real_tokens_per_s"] / lockstep}


if __name__ == "__main__":
    main()
