"""`bertscale convert`: a sharded DeepSpeed checkpoint to standard weights.

Consolidates the ZeRO shards (stage 1, 2 or 3; bf16 or fp16 runs; any complete tag, mid-phase or
final) into full fp32 weights. Formats:

- ``hf`` (default): ``config.json``, ``model.safetensors`` and the tokenizer files, which
  ``transformers`` loads as ``BertForPreTraining`` (or ``BertForMaskedLM`` / ``BertModel``);
- ``torch``: ``model.pt``, a plain PyTorch state dict of our ``BertForPreTraining`` (tied decoder
  keys included, so ``load_state_dict(strict=True)`` works), plus ``config.json`` and the tokenizer.

DeepSpeed's consolidation memory-maps the shards and drops the optimizer moments, so peak memory
stays near the fp32 weights plus the page cache of the shards being read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from bertscale import checkpoint as ckpt
from bertscale.engine import consolidated_state_dict
from bertscale.hf_format import check_state_dict, resize_vocab_rows, save_hf
from bertscale.model import BertConfig
from bertscale.tokenizer import TOKENIZER_FILES

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
    weights = consolidated_state_dict(info.path.parent, info.tag)
    config = BertConfig.from_hf_dict(info.meta["model_config"])
    tokenizer = info.path / "tokenizer"
    if fmt == "hf":
        out = save_hf(weights, config, out_dir, tokenizer_dir=tokenizer)
    else:
        out = _save_torch(weights, config, Path(out_dir), tokenizer)
    log.info("wrote %s", out)
    return out


def _save_torch(weights: dict[str, torch.Tensor], config: BertConfig, out: Path, tokenizer: Path) -> Path:
    check_state_dict(weights, config)
    weights = resize_vocab_rows(weights, config.vocab_size)  # strip tensor-core padding rows
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.pt.tmp"
    torch.save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}, tmp)
    os.replace(tmp, out / "model.pt")
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)
    return out
