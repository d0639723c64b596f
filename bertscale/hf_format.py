"""The Hugging Face on-disk format (``config.json`` + ``model.safetensors``), both directions.

Our parameter names are Hugging Face's, so conversion is a key-for-key copy. Like
``transformers`` v5 ``save_pretrained``, we do not write the tied MLM decoder
(``cls.predictions.decoder.weight`` is the word embedding, ``cls.predictions.decoder.bias``
is ``cls.predictions.bias``); ``from_pretrained`` re-ties them and reports nothing missing.
This module never imports ``transformers``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bertscale.files import atomic_output, write_atomic
from bertscale.model import BertConfig, BertForPreTraining, PerfOptions
from bertscale.tokenizer import TOKENIZER_FILES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

TIED_KEYS: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
"""Tied key -> the key that owns the tensor. Tied keys are optional in a checkpoint and never written."""

VOCAB_KEYS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
              "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
"""Keys whose first dimension is the vocabulary; a model built with ``pad_vocab_multiple`` has extra rows."""

MAX_VOCAB_PADDING = 1024
"""Most extra vocabulary rows a checkpoint may carry (``PerfOptions.pad_vocab_multiple`` padding)."""


def resize_vocab_rows(state_dict: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """``state_dict`` with every vocabulary tensor cut or zero-padded to ``rows`` rows (others shared)."""
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        t = out.get(key)
        if t is None or t.shape[0] == rows:
            continue
        if t.shape[0] > rows:
            out[key] = t[:rows]
        else:
            out[key] = torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
    return out


def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a ``BertForPreTraining`` state dict for ``config`` and its shape (built on meta, no memory)."""
    with torch.device("meta"):
        model = BertForPreTraining(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_reason(key: str, config: BertConfig) -> str:
    """Which config fields decide the shape of ``key``, for error messages."""
    c = config
    if "word_embeddings" in key or key in ("cls.predictions.bias", "cls.predictions.decoder.bias",
                                           "cls.predictions.decoder.weight"):
        return f"vocab_size {c.vocab_size}, hidden_size {c.hidden_size}"
    if "position_embeddings" in key:
        return f"max_position_embeddings {c.max_position_embeddings}, hidden_size {c.hidden_size}"
    if "token_type_embeddings" in key:
        return f"type_vocab_size {c.type_vocab_size}, hidden_size {c.hidden_size}"
    if "intermediate" in key or ("output.dense" in key and "attention" not in key):
        return f"intermediate_size {c.intermediate_size}, hidden_size {c.hidden_size}"
    return f"hidden_size {c.hidden_size}"


def check_state_dict(state_dict: dict[str, torch.Tensor], config: BertConfig) -> None:
    """Raise one ValueError listing every missing, unexpected or mis-shaped key; tied keys may be absent."""
    expected = expected_shapes(config)
    problems: list[str] = []
    missing = [k for k in expected if k not in state_dict and k not in TIED_KEYS]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.", "model.")) for k in unexpected):
            hint = " (strip the wrapper prefix such as 'module.' or '_orig_mod.' before converting)"
        elif any(k.startswith("embeddings.") for k in unexpected):
            hint = " (this looks like a headless BertModel checkpoint: keys lack the 'bert.' prefix and the heads)"
        problems.append(f"unexpected keys: {', '.join(unexpected)}{hint}")
    for key, shape in expected.items():
        got_shape = tuple(state_dict[key].shape) if key in state_dict else shape
        if key in VOCAB_KEYS and got_shape[1:] == shape[1:] and 0 <= got_shape[0] - shape[0] <= MAX_VOCAB_PADDING:
            continue  # vocabulary padding (pad_vocab_multiple): stripped on export
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            got = ",".join(map(str, state_dict[key].shape))
            problems.append(
                f"checkpoint has {key} of shape [{got}] but the config says {_shape_reason(key, config)} "
                f"(expects [{','.join(map(str, shape))}])"
            )
    if problems:
        raise ValueError(
            "state dict does not match the BERT config:\n  - " + "\n  - ".join(problems)
            + "\nCheck that the config belongs to this checkpoint (preset, vocab_size, max_position_embeddings)."
        )


def _untie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied keys, refusing a checkpoint whose 'tied' tensors actually differ."""
    out = dict(state_dict)
    for tied, owner in TIED_KEYS.items():
        if tied in out:
            t = out.pop(tied)
            if owner in out and not torch.equal(t.detach().cpu(), out[owner].detach().cpu()):
                raise ValueError(
                    f"{tied} differs from {owner}, but BERT ties them; this checkpoint was trained with "
                    f"untied output embeddings, which bertscale does not model"
                )
    return out


def save_hf(
    state_dict: dict[str, torch.Tensor],
    config: BertConfig,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a ``transformers``-loadable BertForPreTraining directory; returns its path.

    Vocabulary padding rows (a model built with ``pad_vocab_multiple``) are stripped."""
    check_state_dict(state_dict, config)
    hf_state = resize_vocab_rows(_untie(state_dict), config.vocab_size)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf_state.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tok = Path(tokenizer_dir)
        present = [name for name in TOKENIZER_FILES if (tok / name).is_file()]
        if not present:
            raise FileNotFoundError(
                f"tokenizer_dir {tok} holds none of {', '.join(TOKENIZER_FILES)}; point it at the folder "
                f"the tokenizer was saved to, or pass tokenizer_dir=None to export weights only"
            )
        for name in present:
            write_atomic(out / name, (tok / name).read_bytes())

    # a crash (or a full disk) never leaves a half-written model behind
    with atomic_output(out / WEIGHTS_FILE) as tmp_weights:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    write_atomic(out / CONFIG_FILE, json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    return out


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    single, index = model_dir / WEIGHTS_FILE, model_dir / WEIGHTS_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        other = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack")]
        hint = f" (found {', '.join(other)}; re-save it with safetensors)" if other else ""
        raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def load_state_dict_into(model: BertForPreTraining, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load into ``model``: every non-tied key must be present with the right shape; ties are kept.

    Vocabulary rows are adapted to the model's: padding rows are dropped or added (as zeros), so
    padded and unpadded checkpoints load into padded and unpadded models alike."""
    check_state_dict(state_dict, model.config)
    rows = model.bert.embeddings.word_embeddings.num_embeddings
    result = model.load_state_dict(resize_vocab_rows(_untie(state_dict), rows), strict=False)
    leftover = [k for k in result.missing_keys if k not in TIED_KEYS]
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    model.tie_weights()


def load_hf(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
            perf: PerfOptions | None = None) -> BertForPreTraining:
    """Read a Hugging Face BERT directory (ours or ``transformers``') into our ``BertForPreTraining``
    (built with ``perf``, e.g. a padded vocabulary)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    config_path = d / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{d} has no {CONFIG_FILE}; is this a Hugging Face model directory?")
    hf = json.loads(config_path.read_text())
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{config_path} describes a {hf['model_type']!r} model, not 'bert'")
    config = BertConfig.from_hf_dict(hf)
    state = _read_safetensors(d)
    # BertModel / BertForMaskedLM checkpoints lack heads; name what is missing rather than guess.
    model = BertForPreTraining(config, perf)
    try:
        load_state_dict_into(model, state)
    except ValueError as e:
        raise ValueError(f"cannot load {d} as BertForPreTraining: {e}") from None
    return model.to(dtype)
