"""What a run configuration means, for the launcher and the ranks alike: the model it builds (a preset with
overrides, or ``model.init_from``'s Hugging Face config, checked against the tokenizer and the phases), its
speed options, where its first weights come from, the precision it trains in, each CPU rank's threads, and
its shape (``RunShape``: what a checkpoint is matched against before a resume).

The launcher imports this module, never ``bertscale.train`` (the rank's loop): both sides derive these facts
from the same configuration the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from bertscale import checkpoint as ckpt
from bertscale import hardware
from bertscale.config import ARCHITECTURE_OVERRIDES, ConfigError, RunConfig
from bertscale.engine import json_precision, load_ds_config, zero_stage
from bertscale.hf_format import architectures, check_pretrained, load_pretrained_into, read_hf_config
from bertscale.model import BertConfig, BertForPreTraining, PerfOptions, preset_config
from bertscale.tokenizer import TokenizerInfo, tokenizer_info


DEFAULT_PRESET = "base"
"""The model size of a run that names no ``model.preset`` and no ``model.init_from``."""


def model_config(cfg: RunConfig, vocab_size: int) -> BertConfig:
    """The run's architecture: ``model.init_from``'s ``config.json`` (checked against the tokenizer and the
    phases), else the preset with ``[model]``'s overrides; ``model.dropout`` applies to both."""
    m = cfg.model
    dropout = {} if m.dropout is None else {"hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout}
    if m.init_from:
        try:
            config = read_hf_config(m.init_from)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
        problems = _init_from_problems(cfg, config, vocab_size)
        if problems:
            raise ConfigError(f"model.init_from {m.init_from} cannot start this run:\n  " + "\n  ".join(problems))
        return dataclasses.replace(config, **dropout)
    overrides = {k: getattr(m, k) for k in ARCHITECTURE_OVERRIDES if getattr(m, k) is not None}
    return preset_config(m.preset or DEFAULT_PRESET, vocab_size=vocab_size, **overrides, **dropout)


def _init_from_problems(cfg: RunConfig, config: BertConfig, vocab_size: int) -> list[str]:
    """What keeps ``init_from``'s model from training this run: another tokenizer than its own, a vocabulary
    that is not the tokenizer's, positions shorter than a phase."""
    m, problems = cfg.model, []
    source = Path(m.init_from)
    if m.tokenizer and Path(m.tokenizer) != source:
        try:
            own = tokenizer_info(source).fingerprint
        except (OSError, ValueError):
            own = None  # the directory has no tokenizer of its own: model.tokenizer is the run's
        if own is not None and own != tokenizer_info(m.tokenizer).fingerprint:
            problems.append(f"model.tokenizer {m.tokenizer} is not the tokenizer of model.init_from {source} (another "
                            f"vocabulary): the model was trained with its own; remove model.tokenizer")
    if config.vocab_size != vocab_size:
        problems.append(f"{source / 'config.json'}: vocab_size {config.vocab_size}, but the tokenizer "
                        f"({m.tokenizer}) has {vocab_size} tokens; a model and its tokenizer must agree")
    try:
        check_pretrained(source, config)  # names and shapes only: a rank reads the weights themselves
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    for i, phase in enumerate(cfg.phases):
        if phase.seq_len > config.max_position_embeddings:
            problems.append(f"phases[{i}] ({phase.name}).seq_len {phase.seq_len} is longer than max_position_embeddings "
                            f"{config.max_position_embeddings} of {source / 'config.json'}")
    return problems


def model_name(cfg: RunConfig) -> str:
    """The model in words for logs and ``--dry-run``: its preset, or where ``init_from`` takes it from."""
    return f"from {cfg.model.init_from}" if cfg.model.init_from else (cfg.model.preset or DEFAULT_PRESET)


def initial_model(cfg: RunConfig, config: BertConfig, accelerator: str, init_from: str = "",
                  ) -> tuple[BertForPreTraining, list[str]]:
    """Step 0's model: seeded fresh weights of ``config``, or those of the Hugging Face directory ``init_from``
    with the heads it lacks (a ``BertForMaskedLM``'s pooler and NSP head) fresh; returns the fresh keys too."""
    torch.manual_seed(cfg.run.seed)
    model = BertForPreTraining(config, perf_options(cfg, accelerator))
    fresh = load_pretrained_into(model, init_from) if init_from else []
    return model, fresh


def init_from_for(cfg: RunConfig, phase_index: int, plan: ckpt.ResumePlan) -> str:
    """The Hugging Face directory phase ``phase_index`` starts from: ``model.init_from`` for the first phase of
    a fresh run, else "" (a resumed phase continues its checkpoint, a later phase the previous one's weights)."""
    return cfg.model.init_from if phase_index == 0 and plan.resume is None and plan.previous is None else ""


def initial_weights(cfg: RunConfig) -> str:
    """Where the first phase of a fresh run takes its weights from, in words (``--dry-run``)."""
    m = cfg.model
    if not m.init_from:
        return f"random (seed {cfg.run.seed})"
    fresh = check_pretrained(m.init_from, model_config(cfg, tokenizer_info(m.tokenizer).vocab_size))
    return (f"{'/'.join(architectures(m.init_from)) or 'Hugging Face BERT'} in {m.init_from}; "
            + (f"not in it, initialised fresh: {', '.join(fresh)}" if fresh else "every weight from it")
            + " (a resumed run continues from its checkpoint instead)")


def perf_options(cfg: RunConfig, accelerator: str) -> PerfOptions:
    """The model's runtime levers from ``[model]``; vocabulary padding defaults per accelerator."""
    m = cfg.model
    pad = m.pad_vocab_multiple or PerfOptions.for_device(accelerator).pad_vocab_multiple
    return PerfOptions(fused_qkv=m.fused_qkv, fast_dropout=m.fast_dropout, pad_vocab_multiple=pad,
                       sparse_last_layer=m.sparse_last_layer, fused_mlm_loss=m.fused_mlm_loss, compile=m.compile,
                       gradient_checkpointing=m.gradient_checkpointing)


def run_precision(cfg: RunConfig, accelerator: str) -> str:
    """bf16, fp16 or fp32: what this configuration trains in. The launcher has already put its choice in
    ``train.precision``; a DeepSpeed JSON that sets one wins (as ``build_ds_config`` applies it); ``auto``
    (a configuration that did not come through the launcher) is decided here as the launcher would."""
    fixed = json_precision(load_ds_config(cfg.distributed.deepspeed_config))
    if fixed is not None:
        return fixed
    if cfg.train.precision != "auto":
        return cfg.train.precision
    devices = torch.cuda.device_count() if accelerator == "cuda" else 1
    return hardware.choose("auto", accelerator, devices).name


def run_shape(cfg: RunConfig, accelerator: str, world_size: int,
              tokenizer: TokenizerInfo | None = None) -> ckpt.RunShape:
    """The model, vocabulary rows, ranks, ZeRO stage and precision this configuration trains with (checked
    against a checkpoint before resuming it; the launcher checks the same before starting any rank)."""
    tokenizer = tokenizer or tokenizer_info(cfg.model.tokenizer)
    config = model_config(cfg, tokenizer.vocab_size)
    multiple = perf_options(cfg, accelerator).pad_vocab_multiple
    stage = zero_stage(load_ds_config(cfg.distributed.deepspeed_config))
    return ckpt.RunShape(model_config=config.to_hf_dict(), tokenizer_fingerprint=tokenizer.fingerprint,
                         vocab_rows=-(-config.vocab_size // multiple) * multiple,  # with tensor-core padding
                         world_size=world_size, zero_stage=stage, precision=run_precision(cfg, accelerator))


def cpu_threads(cfg: RunConfig, local_ranks: int) -> int:
    """torch intra-op threads of each CPU rank: ``distributed.threads_per_rank``, else this machine's cores
    shared among the ``local_ranks`` ranks of the node."""
    return cfg.distributed.threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_ranks))
