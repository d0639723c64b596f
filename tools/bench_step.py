"""Time one full training step of our BERT against Hugging Face's, on the same batch, in the same run.

    python tools/bench_step.py --preset mini                       # CPU, fp32, 2 threads
    python tools/bench_step.py --preset base --precision bf16
    python tools/bench_step.py --preset large --seq-len 512 --precision bf16 --json   # on a GPU
    python tools/bench_step.py --preset tiny --data demo_out --json   # real shards: padded vs unpadded

A step is forward, backward and ``torch.optim.AdamW(foreach=True)`` for both sides, so the
comparison is between models; our LAMB's own step time is reported on its own line. Steps
alternate ours / peer after warm-up and every iteration also times a large matrix product in the
same precision, so a noisy machine slows all three alike; figures are medians.

Precision: ``fp32`` runs both in float32. ``bf16`` (``fp16``) runs the peer under ``torch.autocast`` (fp32
weights) and ours the way DeepSpeed trains in bf16: the module cast to bfloat16 (DeepSpeed's fp32
master weights and their optimizer live outside the timed module; here AdamW updates the bf16
parameters directly). ``auto`` is what ``train.precision = "auto"`` picks on this machine
(``bertscale.hardware``: bf16 where the device computes it natively, else fp16 on a GPU, fp32 on a CPU).
The JSON names the CPU, its bf16 capability and the precision used: on a CPU without native bf16, bf16
figures are torch's emulation, ~40x slower than fp32.

Model FLOPs per sequence are ``bertscale.metrics.pretraining_flops`` with m = masked positions for
ours (the head runs on those only) and m = s for the peer (its head runs on every position).

``--data DIR`` times our step on real shards instead (``DIR`` a shard directory with its
``index.json``, or a folder of them such as the demo's output; repeatable): the same samples, read
and masked as training reads them (``bertscale.loader.eval_batches``, train split, epoch-0 masks),
once padded to each batch's longest sample and once unpadded (``bertscale.packing``), steps
alternating on the same model. It reports per sequence length ``real_tokens_per_s`` (non-padding
tokens per second), ``fill`` (real / computed token positions) and their ratio, and the ratio the
model FLOPs predict (padded FLOPs / unpadded FLOPs, both counted over the samples' own lengths);
the optimizer step timed alone (``optimizer_step_ms``: the same in both layouts, it holds the
measured ratio below the FLOPs') and the ratio without it; on CPU, how many score slots the
attention rows compute per slot the samples need (``attention_scores_vs_ideal``).
Measured figures and the commands that produced them are in tools/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bertscale.hf_format import resize_vocab_rows  # noqa: E402
from bertscale.lamb import Lamb  # noqa: E402
from bertscale.loader import eval_batches  # noqa: E402
from bertscale.masking import IGNORE_INDEX, mask_tokens  # noqa: E402
from bertscale.metrics import device_peak_tflops, pretraining_flops  # noqa: E402
from bertscale.model import (BertForPreTraining, PerfOptions, attention_rows, preset_config,  # noqa: E402
                             unpadded_attention_kernel)
from bertscale.packing import (batch_to, computed_tokens, model_inputs, real_tokens,  # noqa: E402
                               samples_from_padded, unpadded_batch)
from bertscale.hardware import choose, machine_report  # noqa: E402
from bertscale.shard_format import load_manifest  # noqa: E402
from bertscale.tokenizer import tokenizer_info  # noqa: E402

VOCAB = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # bert-base-uncased's special ids

DEFAULT_BATCH = {  # (device type, preset, seq_len) -> micro batch
    ("cpu", "mini", 128): 32, ("cpu", "base", 128): 8, ("cpu", "base", 512): 2, ("cpu", "large", 128): 4,
    ("cuda", "base", 128): 128, ("cuda", "base", 512): 32, ("cuda", "large", 128): 128, ("cuda", "large", 512): 32,
    ("cuda", "mini", 128): 256,
}


def make_batch(batch: int, seq_len: int, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-length ``[CLS] A [SEP] B [SEP]`` samples of random tokens, masked by ``mask_tokens`` (15%)."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("input_ids", "token_type_ids", "labels")}
    for i in range(batch):
        n_a = int(rng.integers(8, seq_len - 11))
        n_b = seq_len - 3 - n_a
        ids = np.concatenate([[CLS], rng.integers(999, vocab, n_a), [SEP], rng.integers(999, vocab, n_b), [SEP]])
        inputs, labels = mask_tokens(ids, seed=seed, epoch=0, sample_id=i, vocab_size=vocab, mask_id=MASK,
                                     special_ids=[PAD, UNK, CLS, SEP, MASK], mask_prob=0.15)
        rows["input_ids"].append(inputs)
        rows["labels"].append(labels)
        rows["token_type_ids"].append(np.r_[np.zeros(n_a + 2, np.int64), np.ones(n_b + 1, np.int64)])
    out = {k: torch.from_numpy(np.stack(v)) for k, v in rows.items()}
    out["attention_mask"] = torch.ones_like(out["input_ids"])  # as the loader delivers full-length rows
    out["next_sentence_label"] = torch.from_numpy(rng.integers(0, 2, batch))
    return out


def build_peer(ours: BertForPreTraining, attn: str = "sdpa"):
    """``transformers.BertForPreTraining`` with the same config and the same starting weights."""
    import transformers

    hf_cfg = {k: v for k, v in ours.config.to_hf_dict().items() if k not in ("architectures", "model_type",
                                                                             "torch_dtype", "dtype")}
    peer = transformers.BertForPreTraining(transformers.BertConfig(**hf_cfg, attn_implementation=attn))
    state = resize_vocab_rows(ours.state_dict(), ours.config.vocab_size)  # drop any vocabulary padding
    peer.load_state_dict(state, strict=True)
    peer.tie_weights()
    return peer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, opt, batch, autocast: torch.dtype | None, hf: bool):
    """A closure running one training step on ``batch`` (padded; or unpadded for ours)."""
    args = model_inputs(batch)
    device_type = batch["input_ids"].device.type

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            loss = model(**args).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device):
    """A closure timing one n x n x n product; returns its TFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run() -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12

    reps = 20 if device.type == "cuda" else 1
    run()
    return run


def timed(fn, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds ``fn`` takes by ``clock`` (wall time by default; ``time.process_time`` for CPU time)."""
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def saved_activation_bytes(step_fn) -> int:
    """Bytes autograd keeps for backward during one step (distinct storages): the activation memory."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    n = sum(p.numel() * p.element_size() * 2 for p in params)  # weights + grads
    n += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return n


def bench(preset: str = "mini", seq_len: int = 128, batch: int | None = None, precision: str = "fp32",
          threads: int | None = 2, iters: int = 10, warmup: int = 3, device: str | None = None,
          perf: PerfOptions | None = None, peer: bool = True, lamb: bool = True, matmul_n: int | None = None,
          seed: int = 0) -> dict:
    """Run the benchmark and return the figures (what ``--json`` prints)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    batch = batch or DEFAULT_BATCH.get((dev.type, preset, seq_len), 8)
    precision = resolve_precision(precision, dev)
    dtype = DTYPES[precision]
    perf = perf or PerfOptions.for_device(dev.type)
    torch.manual_seed(seed)
    config = preset_config(preset, VOCAB, max_position_embeddings=max(512, seq_len))
    ours = BertForPreTraining(config, perf).to(dev).train()
    peer_model = build_peer(ours).to(dev).train() if peer else None
    if dtype != torch.float32:
        ours = ours.to(dtype)  # DeepSpeed bf16: the module itself runs in bf16
    data = {k: v.to(dev) for k, v in make_batch(batch, seq_len, VOCAB, seed).items()}
    masked_per_seq = float((data["labels"] != IGNORE_INDEX).sum()) / batch
    tokens = batch * seq_len

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, foreach=True)
    step_ours = make_step(ours, opt_ours, data, None, hf=False)
    steps = {"ours": step_ours}
    if peer_model is not None:
        opt_peer = torch.optim.AdamW(peer_model.parameters(), lr=1e-5, foreach=True)
        steps["peer"] = make_step(peer_model, opt_peer, data, dtype if dtype != torch.float32 else None, hf=True)
    mm = matmul_tflops(matmul_n or (8192 if dev.type == "cuda" else 2048), dtype, dev)

    losses, t_compile = {}, {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        losses[name] = float(fn())  # first step: same weights, same batch on both sides
        t_compile[name] = time.perf_counter() - t0  # includes torch.compile's work when enabled
        for _ in range(warmup - 1):
            fn()
    times = {name: [] for name in steps}
    rates = []
    for _ in range(iters):
        for name, fn in steps.items():
            times[name].append(timed(fn, dev))
        rates.append(mm())

    out: dict = {"device": _device_name(dev), **machine_report(), "precision": precision,
                 "threads": torch.get_num_threads(),
                 "config": {"preset": preset, "seq_len": seq_len, "batch": batch, "layers": config.num_hidden_layers,
                            "hidden": config.hidden_size, "vocab": config.vocab_size,
                            "masked_per_seq": masked_per_seq, "iters": iters, "perf": asdict(perf)}}
    flops = {"ours": batch * pretraining_flops(config.num_hidden_layers, config.hidden_size, config.vocab_size,
                                               seq_len, masked_per_seq),
             "peer": batch * pretraining_flops(config.num_hidden_layers, config.hidden_size, config.vocab_size,
                                               seq_len, seq_len)}
    mm_rate = statistics.median(rates)
    out["matmul_tflops"] = mm_rate
    for name, ts in times.items():
        med = statistics.median(ts)
        out[f"{name}_step_ms"] = med * 1e3
        out[f"{name}_tokens_per_s"] = tokens / med
        out[f"{name}_tflops"] = flops[name] / med / 1e12
        out[f"{name}_first_step_s"] = t_compile[name]
        out[f"{name}_first_loss"] = losses[name]
    out["ours_model_flops_per_step"] = flops["ours"]
    out["ours_vs_matmul"] = out["ours_tflops"] / mm_rate
    if "peer" in times:
        out["ratio"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
        # per-iteration ratios are robust to load that drifts over the run
        out["ratio_median_paired"] = statistics.median(p / o for o, p in zip(times["ours"], times["peer"]))
    peak = device_peak_tflops() if dev.type == "cuda" else None
    if peak:
        out["ours_mfu"] = out["ours_tflops"] / peak
        out["peak_tflops"] = peak

    if lamb:
        params = [p for p in ours.parameters() if p.grad is not None]
        lamb_opt = Lamb(params, lr=1e-5)
        lamb_opt.step()
        out["lamb_step_ms"] = 1e3 * statistics.median(timed(lamb_opt.step, dev) for _ in range(5))
        out["adamw_step_ms"] = 1e3 * statistics.median(timed(opt_ours.step, dev) for _ in range(5))

    out.update(_memory(dev, ours, opt_ours, step_ours, "ours"))
    if peer_model is not None:
        out.update(_memory(dev, peer_model, opt_peer, steps["peer"], "peer"))
    out["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, dev: torch.device) -> str:
    """``precision`` itself, or for ``auto`` the training's choice on this device (``bertscale.hardware``)."""
    if precision not in (*DTYPES, "auto"):
        raise ValueError(f"precision must be one of {', '.join((*DTYPES, 'auto'))}, not {precision!r}")
    return choose(precision, dev.type).name if precision == "auto" else precision


DATA_BATCH = {128: 32, 512: 16}
"""Micro batch per sequence length in ``--data`` mode: the demo's (``bertscale.demo.demo_config``)."""


def shard_dirs_in(path: str | Path) -> list[Path]:
    """``path`` if it is a shard directory (has index.json), else its sub-directories that are, by name."""
    path = Path(path)
    if (path / "index.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/index.json"))
    if not found:
        raise FileNotFoundError(f"{path} holds no shard directory (no index.json in it or its sub-directories); "
                                f"build shards with `bertscale shards` or `bertscale demo`")
    return found


def find_tokenizer(data_dir: Path) -> Path:
    """The tokenizer beside the shards (the layout `bertscale demo` writes: OUT/tokenizer, OUT/data128)."""
    for candidate in (data_dir.parent / "tokenizer", data_dir.parent.parent / "tokenizer"):
        if (candidate / "vocab.txt").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer found beside {data_dir}; pass --tokenizer DIR (the one the shards were "
                            f"built with)")


def batch_flops(config, batch: dict) -> float:
    """Model FLOPs of a batch: every row at its padded length, or every sample at its own length."""
    layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if "cu_seqlens" in batch:
        lengths = batch["cu_seqlens"].diff().tolist()
        masked = [int((batch["labels"][a:b] != IGNORE_INDEX).sum())
                  for a, b in zip(batch["cu_seqlens"][:-1].tolist(), batch["cu_seqlens"][1:].tolist())]
    else:
        rows, width = batch["input_ids"].shape
        lengths = [width] * rows
        masked = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    return sum(pretraining_flops(layers, d, vocab, n, m) for n, m in zip(lengths, masked))


def bench_data_length(model, data_dir: Path, tok, batch: int | None, iters: int, warmup: int,
                      dev: torch.device, seed: int = 0, clock=time.perf_counter) -> dict:
    """Padded vs unpadded steps of ``model`` on one shard directory's samples; see the module docstring."""
    seq_len = int(load_manifest(data_dir, expect_fingerprint=tok.fingerprint)["seq_len"])
    batch = batch or DATA_BATCH.get(seq_len, 16)
    padded = list(eval_batches(data_dir, split="train", batch_size=batch, seed=seed, tokenizer=tok,
                               max_batches=warmup + iters))
    padded = [b for b in padded if len(b["input_ids"]) == batch]  # a short last batch would skew the rates
    if not padded:
        raise ValueError(f"{data_dir} has fewer than {batch} training samples; pass a smaller --batch")
    t0 = time.perf_counter()
    unpadded = [batch_to(unpadded_batch(samples_from_padded(b)), dev) for b in padded]
    pack_ms = 1e3 * (time.perf_counter() - t0) / len(padded)
    padded = [{k: v.to(dev) for k, v in b.items()} for b in padded]
    layouts = {"padded": padded, "unpadded": unpadded}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    steps = {name: [make_step(model, opt, b, None, hf=False) for b in bl] for name, bl in layouts.items()}
    n = len(padded)
    for i in range(min(warmup, n)):
        for name in steps:
            steps[name][i]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for it in range(iters):
        i = (warmup + it) % n
        for name in (order if it % 2 == 0 else order[::-1]):  # alternate who goes first: drift hits both
            times[name].append(timed(steps[name][i], dev, clock))
    timed_batches = [(warmup + it) % n for it in range(iters)]
    out: dict = {"dir": str(data_dir), "seq_len": seq_len, "batch": batch, "batches": len(set(timed_batches))}
    # MFU counts the model FLOPs the samples need (each at its own length), whatever a layout computes.
    useful_flops = sum(batch_flops(model.config, unpadded[i]) for i in timed_batches)
    peak = device_peak_tflops() if dev.type == "cuda" else None
    for name, bl in layouts.items():
        real = sum(real_tokens(bl[i]) for i in timed_batches)
        computed = sum(computed_tokens(bl[i]) for i in timed_batches)
        total = sum(times[name])
        out[name] = {"step_ms": 1e3 * total / iters, "real_tokens_per_s": real / total,
                     "samples_per_s": batch * iters / total, "fill": real / computed,
                     "real_tokens_per_step": real / iters, "computed_tokens_per_step": computed / iters,
                     "model_tflops": useful_flops / total / 1e12}
        if peak:
            out[name]["mfu"] = out[name]["model_tflops"] / peak
    kernel = unpadded_attention_kernel(model.perf.unpadded_attention, dev.type)
    out["unpadded"]["attention_kernel"] = kernel
    if kernel == "rows":  # the CPU kernel attends over rows of samples; how full are they
        plans = [attention_rows(unpadded[i]["cu_seqlens"].diff().tolist(), heads=model.config.num_attention_heads)
                 for i in timed_batches]
        out["unpadded"]["attention_fill"] = sum(p.back.numel() for p in plans) / sum(p.index.numel() for p in plans)
        out["unpadded"]["attention_scores_vs_ideal"] = (sum(p.scores for p in plans) / sum(
            (unpadded[i]["cu_seqlens"].diff() ** 2).sum().item() for i in timed_batches))
    out["unpadded"]["pack_ms_per_batch"] = pack_ms
    # The optimizer step costs the same in both layouts (per parameter, not per token): timed alone (the
    # gradients of the last step are still there), it says what part of the gap to the FLOP ratio it is.
    opt_times = sorted(timed(opt.step, dev, clock) for _ in range(max(3, min(iters, 10))))
    out["optimizer_step_ms"] = 1e3 * statistics.median(opt_times)
    out["speedup"] = out["unpadded"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    opt_s = out["optimizer_step_ms"] / 1e3
    out["speedup_without_optimizer"] = ((out["padded"]["step_ms"] / 1e3 - opt_s)
                                        / max(out["unpadded"]["step_ms"] / 1e3 - opt_s, 1e-9))
    out["speedup_paired"] = statistics.median(p / u for p, u in zip(times["padded"], times["unpadded"]))
    out["flop_ratio"] = (sum(batch_flops(model.config, padded[i]) for i in timed_batches)
                         / sum(batch_flops(model.config, unpadded[i]) for i in timed_batches))
    return out


def bench_data(data: list[str | Path], preset: str = "tiny", batch: int | None = None, precision: str = "fp32",
               threads: int | None = 2, iters: int = 10, warmup: int = 2, device: str | None = None,
               perf: PerfOptions | None = None, tokenizer: str | Path | None = None, seed: int = 0,
               clock: str = "wall") -> dict:
    """``--data`` mode: padded vs unpadded steps on real shards, per sequence length (what ``--json`` prints).

    ``clock="cpu"`` times by this process's CPU time (``time.process_time``): on a CPU shared with
    other jobs, with one thread, it measures the work rather than the waiting for a core."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if clock not in ("wall", "cpu") or (clock == "cpu" and dev.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' on a CPU device; got {clock!r} on {dev.type}")
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    dirs = [d for path in data for d in shard_dirs_in(path)]
    tok = tokenizer_info(tokenizer or find_tokenizer(dirs[0]))
    perf = perf or PerfOptions.for_device(dev.type)
    longest = max(int(load_manifest(d)["seq_len"]) for d in dirs)
    torch.manual_seed(seed)
    config = preset_config(preset, tok.vocab_size, max_position_embeddings=max(512, longest))
    model = BertForPreTraining(config, perf).to(dev).train()  # shipped defaults: dropout on
    precision = resolve_precision(precision, dev)
    model = model.to(DTYPES[precision])
    out: dict = {"device": _device_name(dev), **machine_report(), "precision": precision,
                 "threads": torch.get_num_threads(),
                 "clock": clock,
                 "config": {"preset": preset, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                            "vocab": config.vocab_size, "iters": iters, "perf": asdict(perf)},
                 "lengths": {}}
    for d in dirs:
        r = bench_data_length(model, d, tok, batch, iters, warmup, dev, seed,
                              time.process_time if clock == "cpu" else time.perf_counter)
        out["lengths"][str(r["seq_len"])] = r
    return out


def format_data_report(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['preset']} L={c['layers']} d={c['hidden']} V={c['vocab']} {r['precision']} on {r['device']} "
             f"(CPU {r['cpu_model']}, bf16 {r['cpu_bf16']}); real shards, padded to each batch's longest sample vs "
             f"unpadded; {r['clock']} clock"]
    for s, x in r["lengths"].items():
        p, u = x["padded"], x["unpadded"]
        att = (f", attention rows {u['attention_fill']:.2f} full, {u['attention_scores_vs_ideal']:.2f}x the "
               f"samples' score slots" if "attention_fill" in u else "")
        lines.append(f"  s={s} batch={x['batch']} ({x['batches']} batches of {x['dir']}):")
        lines.append(f"    padded:   {p['step_ms']:8.1f} ms/step {p['real_tokens_per_s']:9.0f} real tok/s, "
                     f"fill {p['fill']:.3f}")
        lines.append(f"    unpadded: {u['step_ms']:8.1f} ms/step {u['real_tokens_per_s']:9.0f} real tok/s, "
                     f"fill {u['fill']:.3f}{att} ({u['attention_kernel']} attention); packing "
                     f"{u['pack_ms_per_batch']:.2f} ms/batch")
        if "mfu" in u:
            lines.append(f"    MFU (model FLOPs of the samples / bf16 peak): padded {p['mfu']:.1%}, "
                         f"unpadded {u['mfu']:.1%}")
        lines.append(f"    unpadded / padded: {x['speedup']:.2f}x (paired median {x['speedup_paired']:.2f}x; "
                     f"model FLOPs predict {x['flop_ratio']:.2f}x); without the optimizer step "
                     f"({x['optimizer_step_ms']:.1f} ms, the same in both): {x['speedup_without_optimizer']:.2f}x")
    return "\n".join(lines)


def _memory(dev: torch.device, model, opt, step_fn, name: str) -> dict:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_fn()
        torch.cuda.synchronize()
        return {f"{name}_peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    # CPU has no allocator statistics: weights + grads + optimizer state + what autograd saves.
    act = saved_activation_bytes(step_fn)
    return {f"{name}_activations_gib": act / 2 ** 30,
            f"{name}_peak_mem_gib": (act + state_bytes(model, opt)) / 2 ** 30}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_report(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['preset']} L={c['layers']} d={c['hidden']} s={c['seq_len']} batch={c['batch']} "
             f"{r['precision']} on {r['device']} (CPU {r['cpu_model']}, bf16 {r['cpu_bf16']}); "
             f"{c['masked_per_seq']:.1f} masked/seq; perf {c['perf']}",
             f"  ours: {r['ours_step_ms']:8.1f} ms/step {r['ours_tokens_per_s']:9.0f} tok/s "
             f"{r['ours_tflops']:.3f} TFLOP/s ({100 * r['ours_vs_matmul']:.0f}% of matmul), "
             f"first step {r['ours_first_step_s']:.1f} s, peak mem {r['ours_peak_mem_gib']:.2f} GiB"]
    if "peer_step_ms" in r:
        lines.append(f"  peer: {r['peer_step_ms']:8.1f} ms/step {r['peer_tokens_per_s']:9.0f} tok/s "
                     f"{r['peer_tflops']:.3f} TFLOP/s (its full head), peak mem {r['peer_peak_mem_gib']:.2f} GiB")
        lines.append(f"  ratio ours/peer: {r['ratio']:.2f}x (paired median {r['ratio_median_paired']:.2f}x); "
                     f"first-step losses {r['ours_first_loss']:.4f} / {r['peer_first_loss']:.4f}")
    lines.append(f"  matmul reference: {r['matmul_tflops']:.3f} TFLOP/s")
    if "ours_mfu" in r:
        lines.append(f"  MFU: {100 * r['ours_mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s dense bf16")
    if "lamb_step_ms" in r:
        lines.append(f"  optimizer alone: LAMB {r['lamb_step_ms']:.1f} ms, AdamW {r['adamw_step_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini", choices=["tiny", "mini", "base", "large"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="default: per device and preset")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                   help="auto: what train.precision = auto picks on this machine (bertscale.hardware)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (0: leave torch's default)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--no-peer", action="store_true", help="time ours only (e.g. to compare levers)")
    p.add_argument("--no-lamb", action="store_true")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the reference matrix product")
    p.add_argument("--perf", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a PerfOptions field for ours, e.g. --perf compile=true --perf fast_dropout=false")
    p.add_argument("--plain", action="store_true", help="ours with every lever off except the masked-only head")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="real shards (a shard directory, or a folder of them like the demo's output; repeatable): "
                        "time our step padded vs unpadded on their samples instead of ours vs the peer")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="with --data: the shards' tokenizer (default: a 'tokenizer' folder beside them)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="with --data: time steps by wall clock or by this process's CPU time (steadier on a "
                        "shared CPU with --threads 1)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = p.parse_args(argv)
    dev_type = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    perf = PerfOptions.plain() if a.plain else PerfOptions.for_device(dev_type)
    perf = perf.with_overrides(a.perf)
    if a.data:
        r = bench_data(a.data, a.preset, a.batch, a.precision, a.threads or None, a.iters, a.warmup, a.device,
                       perf, a.tokenizer, clock=a.clock)
        print(format_data_report(r))
        if a.json:
            print(json.dumps(r))
        return
    r = bench(a.preset, a.seq_len, a.batch, a.precision, a.threads or None, a.iters, a.warmup, a.device,
              perf, peer=not a.no_peer, lamb=not a.no_lamb, matmul_n=a.matmul_n)
    print(format_report(r))
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
