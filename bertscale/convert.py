"""`bertscale convert`: a sharded DeepSpeed checkpoint to standard weights.

Consolidates the ZeRO shards (stage 1, 2 or 3; bf16, fp16 or fp32 runs; any complete tag, mid-phase or
final) into full fp32 weights. Formats:

- ``hf`` (default): ``config.json``, ``model.safetensors`` and the tokenizer files, which
  ``transformers`` loads as ``BertForPreTraining`` (or ``BertForMaskedLM`` / ``BertModel``);
- ``torch``: ``model.pt``, a plain PyTorch state dict of our ``BertForPreTraining`` (tied decoder
  keys included, so ``load_state_dict(strict=True)`` works), plus ``config.json`` and the tokenizer.

DeepSpeed's consolidation memory-maps the shards and drops the optimizer moments, so peak memory
stays near the fp32 weights plus the page cache of the shards being read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import torch

from bertscale import checkpoint as ckpt
from bertscale.console import filtered_output
from bertscale.engine import consolidated_state_dict
from bertscale.files import WriteError, atomic_output, write_atomic, write_failure
from bertscale.hf_format import check_state_dict, resize_vocab_rows, save_hf
from bertscale.model import BertConfig
from bertscale.tokenizer import copy_tokenizer_files

log = logging.getLogger(__name__)

FORMATS = ("hf", "torch")


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None,
                       fmt: str = "hf") -> Path:
    """Convert the latest complete checkpoint under ``checkpoint`` (or ``tag``) into ``out_dir``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    info = ckpt.resolve(checkpoint, tag)
    log.info("converting %s (global step %d, phase %s, ZeRO stage %s)", info.path, info.global_step,
             info.meta.get("phase"), info.meta.get("zero_stage"))
    with filtered_output():  # DeepSpeed's per-file chatter and progress bar (console.NOISE)
        weights = consolidated_state_dict(info.path.parent, info.tag)  # weights-only loads (bertscale.safe_load)
    nonfinite = sorted(k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if nonfinite:
        raise ValueError(f"{info.path} holds non-finite weights ({', '.join(nonfinite[:5])}"
                         f"{' ...' if len(nonfinite) > 5 else ''}); it cannot be exported. Convert an earlier "
                         f"checkpoint (--tag); complete ones: {[c.tag for c in ckpt.complete_checkpoints(info.path.parent)]}")
    config = BertConfig.from_hf_dict(info.meta["model_config"])
    tokenizer = info.path / "tokenizer"
    out = Path(out_dir)
    try:
        if fmt == "hf":
            save_hf(weights, config, out, tokenizer_dir=tokenizer)
        else:
            _save_torch(weights, config, out, tokenizer)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors report a full disk in their own ways
        problem = write_failure(exc, out)
        if problem is None:
            raise
        raise WriteError(getattr(exc, "errno", None) or errno.EIO,
                      f"{problem}; {info.path} is unchanged. Free some space or choose another --out") from exc
    log.info("wrote %s", out)
    return out


def _save_torch(weights: dict[str, torch.Tensor], config: BertConfig, out: Path, tokenizer: Path) -> Path:
    check_state_dict(weights, config)
    weights = resize_vocab_rows(weights, config.vocab_size)  # strip tensor-core padding rows
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.pt") as tmp:
        torch.save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}, tmp)
    write_atomic(out / "config.json", json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(tokenizer, out, complete=False)
    return out
