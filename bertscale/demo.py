"""`bertscale demo`: the whole pipeline, end to end, on a small corpus and a tiny BERT.

corpus (the standard library's docstrings by default) -> WordPiece tokenizer -> shards at
128 and 512 -> two DeepSpeed ranks through both phases -> checkpoint -> Hugging Face model
-> held-out evaluation, ending with one JSON line.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from bertscale.config import RunConfig, config_from_data

log = logging.getLogger("bertscale.demo")

def demo_config(out: Path, ranks: int, steps1: int, steps2: int) -> dict:
    """The demo's run configuration, a scaled-down copy of the two-phase BERT recipe, as the nested dict a
    TOML file parses to (``pretrain`` takes it as it is; the run keeps it resolved in OUT/run_config.json)."""
    out = out.as_posix()
    phase = {"warmup": 0.1, "decay_power": 0.5}
    return {
        "run": {"name": "demo", "out_dir": out, "seed": 1234},
        "model": {"preset": "tiny", "tokenizer": f"{out}/tokenizer"},
        "distributed": {"deepspeed_config": default_ds_config().as_posix(), "accelerator": "auto", "num_gpus": ranks},
        "optimizer": {"name": "lamb", "weight_decay": 0.01, "grad_clip": 1.0},
        "train": {"log_interval": 50, "save_interval": 200, "keep_last": 2, "num_workers": 0, "eval_batches": 8},
        "phases": [
            {**phase, "name": "phase1", "seq_len": 128, "data": f"{out}/data128", "global_batch": 64,
             "micro_batch": 32, "steps": steps1, "lr": 1e-2},
            {**phase, "name": "phase2", "seq_len": 512, "data": f"{out}/data512", "global_batch": 32,
             "micro_batch": 16, "steps": steps2, "lr": 5e-3, "warmup": 0.2},
        ],
    }


def default_ds_config() -> Path:
    """ds_configs/zero2_bf16.json beside the package (source checkout) or shipped inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "ds_configs" / "zero2_bf16.json", here / "ds_configs" / "zero2_bf16.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("ds_configs/zero2_bf16.json not found beside the bertscale package")


def prepare_data(out: Path, corpus: list[str] | None = None, vocab_size: int = 8000,
                 documents: str = "blank-lines") -> list[str]:
    """Steps 1-3: corpus, tokenizer, shards at 128 and 512 under out; returns the corpus files.
    ``documents`` says how the corpus's .txt files split into documents (``corpus.DOCUMENT_MODES``).

    What is already there from the same corpus and options is reused (the tokenizer is
    reproducible and a finished shard build is not redone), so a second demo continues its run.
    """
    from bertscale.corpus import write_stdlib_corpus
    from bertscale.shards import build_shards
    from bertscale.tokenizer import train_tokenizer, trained_from

    if not corpus:
        path = out / "corpus" / "stdlib_docstrings.txt"
        log.info("[1/6] gathering the standard library's docstrings into %s", path)
        stats = write_stdlib_corpus(path)
        log.info("      %s", stats.summary())
        corpus = [str(path)]
    else:
        log.info("[1/6] corpus: %s", ", ".join(corpus))
    if trained_from(out / "tokenizer", corpus, vocab_size):
        log.info("[2/6] reusing the WordPiece tokenizer in %s (same corpus and options)", out / "tokenizer")
    else:
        log.info("[2/6] training a WordPiece tokenizer (vocab %d)", vocab_size)
        train_tokenizer(corpus, vocab_size=vocab_size, out_dir=out / "tokenizer")
    log.info("[3/6] building shards at seq_len 128 and 512 in one pass over the text")
    build_shards(corpus, out / "tokenizer", seq_len=[128, 512],
                 out_dirs={128: out / "data128", 512: out / "data512"},
                 samples_per_shard={128: 1000, 512: 500}, seed=1234, valid_fraction=0.03, documents=documents)
    return corpus


def demo_run_config(out: Path, ranks: int, steps1: int, steps2: int, overrides: list[str]) -> RunConfig:
    """The demo's run configuration (``demo_config``) with ``overrides`` applied and checked here, so a typo in
    a key fails at once, not after the data is built."""
    return config_from_data(demo_config(out, ranks, steps1, steps2), overrides, where="the demo's configuration")


def run_demo(corpus: list[str] | None = None, out: str | os.PathLike = "demo_out", vocab_size: int = 8000,
             steps1: int = 800, steps2: int = 60, ranks: int = 2, overrides: list[str] | None = None) -> dict:
    """Run the whole pipeline; returns (and the CLI prints) the summary dict. Run again, it continues.

    ``overrides``: ``KEY=VALUE`` settings applied to the demo's run configuration as ``pretrain --set``
    applies them (e.g. ``train.log_interval=5``); checked before any data is built."""
    from launcher.launch import pretrain

    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = demo_run_config(out, ranks, steps1, steps2, overrides or [])
    prepare_data(out, corpus, vocab_size)
    log.info("[4/6] pretraining with %d DeepSpeed ranks, both phases (the resolved configuration goes to %s; "
             "`bertscale pretrain --config` it to run again)", ranks, out / "run_config.json")
    run_dir = pretrain(config)
    summary = convert_and_evaluate(out, run_dir)
    summary.update(train_steps=steps1 + steps2, seconds=round(time.perf_counter() - start, 1))
    return summary


def convert_and_evaluate(out: str | os.PathLike, run_dir: Path) -> dict:
    """Steps 5-6: convert the run's final checkpoint to out/hf and evaluate it on out/data128's held-out
    split; returns the summary (every figure beside its baseline on the same positions)."""
    from bertscale.convert import convert_checkpoint
    from bertscale.evaluate import evaluate

    out = Path(out)
    log.info("[5/6] converting the final checkpoint to Hugging Face weights")
    hf_dir = convert_checkpoint(run_dir / "checkpoints", out / "hf")
    log.info("[6/6] evaluating %s on held-out data", hf_dir)
    results = evaluate(hf_dir, out / "data128", split="valid", batch_size=64)
    log.info("held-out MLM accuracy on the [MASK] positions %.3f vs %.3f for always predicting the most frequent "
             "token there (on all target positions, kept and randomised ones included: %.3f vs %.3f); NSP accuracy "
             "%.3f vs %.3f for always predicting the more frequent label", results["eval_mlm_accuracy"],
             results["baseline_mlm_accuracy"], results["eval_mlm_accuracy_all_positions"],
             results["baseline_mlm_accuracy_all_positions"], results["eval_nsp_accuracy"],
             results["baseline_nsp_accuracy"])
    return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
            "hf_model": str(hf_dir), "tensorboard": str(run_dir / "tensorboard")}
