"""`bertscale convert`: a sharded DeepSpeed checkpoint to standard Hugging Face weights.

Consolidates the ZeRO shards (stage 1, 2 or 3) into full fp32 weights and writes
``config.json``, ``model.safetensors`` and the tokenizer files, which ``transformers``
loads as ``BertForPreTraining`` (or ``BertForMaskedLM`` / ``BertModel``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.engine import consolidated_state_dict
from bertscale.hf_format import save_hf
from bertscale.model import BertConfig

log = logging.getLogger(__name__)


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """Convert the latest complete checkpoint under ``checkpoint`` (or ``tag``) into ``out_dir``."""
    info = ckpt.resolve(checkpoint, tag)
    log.info("converting %s (global step %d, phase %s)", info.path, info.global_step, info.meta.get("phase"))
    weights = consolidated_state_dict(info.path.parent, info.tag)
    config = BertConfig.from_hf_dict(info.meta["model_config"])
    out = save_hf(weights, config, out_dir, tokenizer_dir=info.path / "tokenizer")
    log.info("wrote %s", out)
    return out
