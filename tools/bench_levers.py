"""One speed lever's effect: our training step with the default PerfOptions against the same step with
one or more fields changed, alternating in one process on the same weights and batch, medians.

    python tools/bench_levers.py --preset mini --lever fused_mlm_loss=false
    python tools/bench_levers.py --preset base --iters 5 --lever sparse_last_layer=false --lever fused_qkv=false

A figure above 1 means the default is faster than the variant by that factor. The batch, the optimizer
(AdamW, foreach) and the thread count are those of tools/bench_step.py; measured effects are in
tools/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_step import VOCAB, make_batch, make_step, timed  # noqa: E402
from bertscale.hf_format import load_state_dict_into  # noqa: E402
from bertscale.model import BertForPreTraining, PerfOptions, preset_config  # noqa: E402


def bench_lever(preset: str, batch: int, seq_len: int, levers: list[str], iters: int = 8, warmup: int = 2,
                threads: int = 2) -> dict:
    """Median step seconds of the default and the variant, and default's speed-up over the variant."""
    torch.set_num_threads(threads)
    default = PerfOptions.for_device("cpu")
    variant = default.with_overrides(levers)
    torch.manual_seed(0)
    config = preset_config(preset, VOCAB, max_position_embeddings=max(512, seq_len))
    models = {"default": BertForPreTraining(config, default).train(),
              "variant": BertForPreTraining(config, variant).train()}
    load_state_dict_into(models["variant"], models["default"].state_dict())
    data = make_batch(batch, seq_len)
    steps = {name: make_step(m, torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True), data, None, hf=False)
             for name, m in models.items()}
    losses = {}
    for name, fn in steps.items():
        torch.manual_seed(1)  # the same dropout draws: the first losses agree where the lever is exact
        losses[name] = float(fn())
    for _ in range(warmup - 1):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            times[name].append(timed(fn, torch.device("cpu")))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "levers": levers, "iters": iters,
            "default_step_ms": med["default"] * 1e3, "variant_step_ms": med["variant"] * 1e3,
            "speedup": med["variant"] / med["default"],
            "speedup_paired": statistics.median(v / d for d, v in zip(times["default"], times["variant"])),
            "first_losses": losses, "default": asdict(default), "variant": asdict(variant)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini", choices=["tiny", "mini", "small", "base"])
    p.add_argument("--batch", type=int, default=None, help="default: 32 for tiny/mini, 8 otherwise")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lever", action="append", required=True, metavar="FIELD=VALUE",
                   help="a PerfOptions field of the variant, e.g. fused_mlm_loss=false (repeatable)")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = p.parse_args(argv)
    batch = a.batch or (32 if a.preset in ("tiny", "mini") else 8)
    r = bench_lever(a.preset, batch, a.seq_len, a.lever, a.iters, threads=a.threads)
    print(f"{a.preset} batch {batch} s={a.seq_len}: default {r['default_step_ms']:.0f} ms/step, variant "
          f"({', '.join(a.lever)}) {r['variant_step_ms']:.0f} ms/step: default {r['speedup']:.3f}x faster "
          f"(paired {r['speedup_paired']:.3f}x); first losses {r['first_losses']}")
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
