"""The Hugging Face on-disk format (``config.json`` + ``model.safetensors``), both directions.

Our parameter names are Hugging Face's, so conversion is a key-for-key copy. Like
``transformers`` v5 ``save_pretrained``, we do not write the tied MLM decoder
(``cls.predictions.decoder.weight`` is the word embedding, ``cls.predictions.decoder.bias``
is ``cls.predictions.bias``); ``from_pretrained`` re-ties them and reports nothing missing.
Reading takes what ``transformers`` writes too (``read_hf_config``, ``read_hf_weights``: sharded
safetensors, a weights-only ``pytorch_model.bin``, TensorFlow-era LayerNorm names), for ``model.init_from``.
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
from bertscale.tokenizer import copy_tokenizer_files

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
    if tokenizer_dir is not None:  # None: weights only
        copy_tokenizer_files(tokenizer_dir, out, complete=False)

    # a crash (or a full disk) never leaves a half-written model behind
    with atomic_output(out / WEIGHTS_FILE) as tmp_weights:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    write_atomic(out / CONFIG_FILE, json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    return out


PT_WEIGHTS_FILE = "pytorch_model.bin"
PT_WEIGHTS_INDEX_FILE = "pytorch_model.bin.index.json"

FRESH_HEADS = ("bert.pooler.", "cls.seq_relationship.")
"""What a ``BertForMaskedLM`` directory lacks (the pooler and the NSP head); ``load_pretrained_into``
starts these from the model's own initialisation."""

_LEGACY_SUFFIXES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
"""Names of checkpoints converted from Google's TensorFlow BERT (``bert-base-uncased`` on the Hub), which
``transformers`` renames on load."""
_BUFFERS = ("bert.embeddings.position_ids",)
"""Buffers older ``transformers`` versions saved with the weights: no parameters, not loaded."""


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors first, sharded or not."""
    for single, index in ((WEIGHTS_FILE, WEIGHTS_INDEX_FILE), (PT_WEIGHTS_FILE, PT_WEIGHTS_INDEX_FILE)):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{model_dir / index}: not a weight index ({exc})") from None
            return [model_dir / name for name in sorted(set(weight_map.values()))]
    other = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack")]
    hint = f" (found {', '.join(other)}; re-save it with safetensors)" if other else ""
    raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_FILE}, {PT_WEIGHTS_FILE} or their .index.json{hint}")


def read_hf_weights(model_dir: str | os.PathLike, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory by its modern name: safetensors, or ``pytorch_model.bin``
    loaded weights-only (``bertscale.safe_load``: a pickle asking for code is refused, naming the file).
    ``shapes_only``: tensors on the meta device (names and shapes, no data read from safetensors)."""
    from bertscale import safe_load

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(model_dir)):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = (torch.empty(f.get_slice(key).get_shape(), device="meta") if shapes_only
                                  else f.get_tensor(key))
        else:
            loaded = safe_load.load(path, map_location="meta" if shapes_only else "cpu")
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
            state.update(loaded)
    renamed = {}
    for key, tensor in state.items():
        if key in _BUFFERS:
            continue
        for old, new in _LEGACY_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = tensor
    return renamed


def read_hf_config(model_dir: str | os.PathLike) -> BertConfig:
    """The ``BertConfig`` of a Hugging Face BERT directory; refuses, naming the file and every key, what our
    model cannot represent (another model type, relative positions, an activation we lack, a decoder,
    untied output embeddings)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no {CONFIG_FILE}; is this a Hugging Face model directory?")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    problems = []
    if hf.get("model_type", "bert") != "bert":
        problems.append(f"model_type {hf['model_type']!r}: not a BERT model")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r}: bertscale models "
                        f"absolute positions only")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            problems.append(f"{key} true: bertscale trains bidirectional encoders without cross-attention")
    if hf.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings false: bertscale ties the MLM decoder to the word embeddings")
    if not problems:
        try:
            return BertConfig.from_hf_dict(hf)
        except (ValueError, TypeError) as exc:
            problems.append(str(exc).replace("invalid BertConfig:\n  - ", "").replace("\n  - ", "; "))
    raise ValueError(f"{path}: bertscale cannot represent this model: " + "; ".join(problems))


def architectures(model_dir: str | os.PathLike) -> list[str]:
    """The ``architectures`` a Hugging Face ``config.json`` names (``BertForMaskedLM``, ...), for messages."""
    try:
        found = json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(a) for a in found] if isinstance(found, list) else []


def check_pretrained(model_dir: str | os.PathLike, config: BertConfig) -> list[str]:
    """What ``load_pretrained_into`` would refuse (the same ValueError), from the weights' names and shapes
    only; returns the keys it would start fresh."""
    state = read_hf_weights(model_dir, shapes_only=True)
    expected = expected_shapes(config)
    fresh = [k for k in expected if k.startswith(FRESH_HEADS) and k not in state]
    try:
        check_state_dict({**state, **{k: torch.empty(expected[k], device="meta") for k in fresh}}, config)
    except ValueError as exc:
        raise ValueError(f"cannot start from {model_dir}: {exc}") from None
    return fresh


def load_pretrained_into(model: BertForPreTraining, model_dir: str | os.PathLike) -> list[str]:
    """Load a Hugging Face ``BertForPreTraining`` or ``BertForMaskedLM`` directory into ``model`` (strictly,
    as ``load_state_dict_into``), except that heads a ``BertForMaskedLM`` lacks (``FRESH_HEADS``) keep the
    model's own initialisation. Returns the keys that did."""
    state = read_hf_weights(model_dir)
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(FRESH_HEADS) and k not in state]
    try:
        load_state_dict_into(model, {**state, **{k: own[k] for k in fresh}})
    except ValueError as exc:
        raise ValueError(f"cannot start from {model_dir}: {exc}") from None
    return fresh


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
    config = read_hf_config(d)
    state = read_hf_weights(d)
    # BertModel / BertForMaskedLM checkpoints lack heads; name what is missing rather than guess.
    model = BertForPreTraining(config, perf)
    try:
        load_state_dict_into(model, state)
    except ValueError as e:
        raise ValueError(f"cannot load {d} as BertForPreTraining: {e}") from None
    return model.to(dtype)
