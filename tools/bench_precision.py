#!/usr/bin/env python3
"""Which precision trains faster on this CPU, and does ``train.precision = "auto"`` pick it?

    python tools/bench_precision.py --json                   # the demo's tiny model, 128 tokens, batch 32
    python tools/bench_precision.py --preset mini --iters 5 --json

One process, one batch (full ``[CLS] A [SEP] B [SEP]`` rows of random ids, masked as training masks them),
the same weights twice: in float32, and cast to bfloat16 as DeepSpeed's bf16 runs the module. Steps
(forward, backward, AdamW) alternate fp32 / bf16 after one warm-up step each, so a noisy machine slows
both alike; every iteration also times a 512x512 matrix product in each dtype. Figures are medians.
Where the CPU has no bf16 instructions (or torch's oneDNN is capped below them) bf16 is emulated and a
step runs many times slower: ``auto`` must then have picked fp32. The JSON names the CPU, its bf16
capability, ``auto``'s choice and why, both step times, ``bf16_vs_fp32`` (fp32 step time / bf16's: above
1, bf16 is faster) and ``auto_picks_the_faster``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import make_batch  # noqa: E402

from bertscale import hardware  # noqa: E402
from bertscale.model import BertForPreTraining, PerfOptions, preset_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _matmul_gflops(dtype: torch.dtype, n: int = 512) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = time.perf_counter()
    torch.mm(a, b)
    return 2 * n ** 3 / (time.perf_counter() - t) / 1e9


def bench(preset: str = "tiny", seq_len: int = 128, batch: int = 32, iters: int = 5, threads: int = 2,
          vocab: int = 8000) -> dict:
    """Time both precisions alternately; returns the figures (what ``--json`` prints)."""
    torch.set_num_threads(threads)
    choice = hardware.choose("auto", "cpu")
    torch.manual_seed(0)
    config = preset_config(preset, vocab, max_position_embeddings=max(512, seq_len))
    base = BertForPreTraining(config, PerfOptions.for_device("cpu"))
    data = make_batch(batch, seq_len, vocab)
    steps, times, matmul = {}, {name: [] for name in DTYPES}, {name: [] for name in DTYPES}
    for name, dtype in DTYPES.items():
        model = BertForPreTraining(config, PerfOptions.for_device("cpu"))
        model.load_state_dict(base.state_dict())
        model = model.to(dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step(model=model, opt=opt):
            model(**data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        steps[name] = step
    for _ in range(iters):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
            matmul[name].append(_matmul_gflops(DTYPES[name]))
    fp32, bf16 = (statistics.median(times[n]) for n in ("fp32", "bf16"))
    faster = "bf16" if bf16 < fp32 else "fp32"
    return {**hardware.machine_report(), "threads": threads, "auto": choice.name, "auto_reason": choice.reason,
            "preset": preset, "seq_len": seq_len, "batch": batch, "iters": iters,
            "fp32_step_ms": fp32 * 1e3, "bf16_step_ms": bf16 * 1e3, "bf16_vs_fp32": fp32 / bf16,
            "fp32_matmul_gflops": statistics.median(matmul["fp32"]),
            "bf16_matmul_gflops": statistics.median(matmul["bf16"]),
            "faster": faster, "auto_picks_the_faster": choice.name == faster}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "mini", "small", "base"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = p.parse_args(argv)
    r = bench(a.preset, a.seq_len, a.batch, a.iters, a.threads)
    print(f"{r['preset']} s={r['seq_len']} batch={r['batch']} on {r['cpu_model']} ({r['threads']} threads), bf16 "
          f"{r['cpu_bf16']}:\n  fp32 {r['fp32_step_ms']:.0f} ms/step, bf16 {r['bf16_step_ms']:.0f} ms/step: bf16 is "
          f"{r['bf16_vs_fp32']:.2f}x fp32's speed (512x512 matmul: {r['bf16_matmul_gflops']:.1f} vs "
          f"{r['fp32_matmul_gflops']:.1f} GFLOP/s)\n  auto picks {r['auto']} ({r['auto_reason']}): "
          f"{'the faster' if r['auto_picks_the_faster'] else 'NOT the faster'}")
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
