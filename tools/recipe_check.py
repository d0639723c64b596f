"""Is large-batch LAMB worth it here? LAMB vs AdamW at the same large global batch and sample count.

Runs the demo corpus (the standard library's docstrings) through the real `deepspeed` launcher twice
(2 CPU ranks by default, ZeRO-2, train.precision = "auto", gradient accumulation to reach the global batch),
one phase at sequence length 128 with the tiny model, and prints the held-out MLM accuracy of each run as JSON:

    .venv/bin/python tools/recipe_check.py --out /tmp/recipe_check
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

def run_config(out: Path, name: str, lr: float, args) -> dict:
    """One run's configuration: the tiny model, one phase at seq_len 128 on the demo corpus, optimizer ``name``."""
    return {
        "run": {"name": f"recipe-check-{name}", "out_dir": f"{out}/{name}", "seed": 1234},
        "model": {"preset": "tiny", "tokenizer": f"{out}/tokenizer"},
        "distributed": {"deepspeed_config": str(REPO / "ds_configs" / "zero2.json"), "accelerator": "cpu",
                        "num_gpus": args.ranks},
        "optimizer": {"name": name, "weight_decay": 0.01, "grad_clip": 1.0},
        "train": {"log_interval": 10, "save_interval": 100000, "num_workers": 0, "eval_batches": args.eval_batches},
        "phases": [{"name": "phase1", "seq_len": 128, "data": f"{out}/data128", "global_batch": args.global_batch,
                    "micro_batch": args.micro_batch, "steps": args.steps, "lr": lr, "warmup": args.warmup,
                    "decay_power": 0.5}],
    }


def prepare(out: Path, vocab_size: int) -> None:
    """Corpus, tokenizer and 128-token shards, once (reused when present)."""
    from bertscale.corpus import write_stdlib_corpus
    from bertscale.shards import build_shards
    from bertscale.tokenizer import train_tokenizer

    corpus = out / "corpus.txt"
    if not corpus.exists():
        write_stdlib_corpus(corpus)
    if not (out / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer([str(corpus)], vocab_size=vocab_size, out_dir=out / "tokenizer")
    if not (out / "data128" / "index.json").exists():
        build_shards([str(corpus)], out / "tokenizer", seq_len=128, out_dir=out / "data128",
                     samples_per_shard=1000, seed=1234, valid_fraction=0.03)


def run_one(out: Path, name: str, lr: float, args) -> dict:
    from bertscale.metrics import read_scalars
    from launcher.launch import pretrain

    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run each time (the launcher would resume it)
    t0 = time.perf_counter()
    run_dir = pretrain(run_config(out, name, lr, args))
    scalars = read_scalars(run_dir / "tensorboard")
    return {"optimizer": name, "lr": lr, "eval_mlm_accuracy": round(scalars["eval/mlm_accuracy"][-1][1], 4),
            "eval_mlm_loss": round(scalars["eval/mlm_loss"][-1][1], 4),
            "final_train_loss": round(scalars["loss/mlm"][-1][1], 4), "seconds": round(time.perf_counter() - t0, 1)}


def recipe_check(out: str | Path, *, global_batch: int = 256, micro_batch: int = 32, steps: int = 60,
                 lamb_lr: float = 2e-2, adamw_lr: float = 2e-3, warmup: float = 0.2, ranks: int = 2,
                 eval_batches: int = 20, vocab_size: int = 4000) -> dict:
    """Train LAMB and AdamW at the same global batch for the same samples; both held-out MLM accuracies."""
    args = argparse.Namespace(global_batch=global_batch, micro_batch=micro_batch, steps=steps, warmup=warmup,
                              ranks=ranks, eval_batches=eval_batches)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, vocab_size)
    runs = [run_one(out, "lamb", lamb_lr, args), run_one(out, "adamw", adamw_lr, args)]
    return {"global_batch": global_batch, "accumulation": global_batch // (micro_batch * ranks), "ranks": ranks,
            "steps": steps, "samples": steps * global_batch, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="recipe_check_out")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lamb-lr", type=float, default=1e-2)
    parser.add_argument("--adamw-lr", type=float, default=2e-3)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(json.dumps(recipe_check(args.out, global_batch=args.global_batch, micro_batch=args.micro_batch,
                                  steps=args.steps, lamb_lr=args.lamb_lr, adamw_lr=args.adamw_lr, ranks=args.ranks)))


if __name__ == "__main__":
    main()
