"""WordPiece tokenizer: training, loading, and the facts other modules need (ids, fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bertscale.corpus import iter_documents

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MIN_VOCAB_SIZE = 100
MODEL_MAX_LENGTH = 512
_BATCH_SENTENCES = 1000


def _sentence_batches(inputs: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in iter_documents(inputs):
        batch.extend(doc)
        if len(batch) >= _BATCH_SENTENCES:
            yield batch
            batch = []
    if batch:
        yield batch


def _new_tokenizer(lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    lowercase: bool = True,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Path:
    """Train a BERT WordPiece tokenizer on the corpus and write HF-compatible files to out_dir."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} "
            "(BERT uses 30522; small tests use a few hundred)"
        )
    out = Path(out_dir)
    tok = _new_tokenizer(lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    tok.train_from_iterator(_sentence_batches(inputs), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise AssertionError(f"special token {token} did not get id {i}")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    with open(out / "vocab.txt", "w", encoding="utf-8") as f:
        for token, _ in vocab:
            f.write(token + "\n")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "BertTokenizerFast",
        "do_lower_case": lowercase,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "model_max_length": MODEL_MAX_LENGTH,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def load_tokenizer(dir: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.json`` from a tokenizer directory."""
    path = Path(dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {dir}; train one with `bertscale tokenizer ... --out {dir}`"
        )
    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids and identity of a trained tokenizer."""

    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    lowercase: bool
    fingerprint: str
    """sha256 prefix of vocab.txt and the lowercase flag; shards record it."""
    continuation_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """Ids of ``##`` word pieces (whole-word masking keeps them with the piece before)."""

    @property
    def continuation(self) -> np.ndarray:
        """A bool per vocabulary id: True for ``##`` continuation pieces."""
        out = np.zeros(self.vocab_size, dtype=bool)
        out[list(self.continuation_ids)] = True
        return out

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)


def tokenizer_info(dir: str | os.PathLike) -> TokenizerInfo:
    """Read vocab and config of a tokenizer directory written by ``train_tokenizer``."""
    d = Path(dir)
    for name in ("vocab.txt", "tokenizer_config.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"no {name} in {d}; train a tokenizer with `bertscale tokenizer ... --out {d}`"
            )
    vocab_bytes = (d / "vocab.txt").read_bytes()
    tokens = vocab_bytes.decode("utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    ids = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"{d / 'vocab.txt'} lacks special tokens {missing}; retrain the tokenizer")
    lowercase = bool(json.loads((d / "tokenizer_config.json").read_text()).get("do_lower_case", True))
    digest = hashlib.sha256(vocab_bytes + f"\nlowercase={int(lowercase)}".encode()).hexdigest()
    return TokenizerInfo(
        vocab_size=len(tokens),
        pad_id=ids["[PAD]"],
        unk_id=ids["[UNK]"],
        cls_id=ids["[CLS]"],
        sep_id=ids["[SEP]"],
        mask_id=ids["[MASK]"],
        lowercase=lowercase,
        fingerprint=digest[:16],
        continuation_ids=tuple(i for i, t in enumerate(tokens) if t.startswith("##") and len(t) > 2),
    )


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """Copy the tokenizer files (e.g. next to an exported model)."""
    src, dst = Path(src_dir), Path(dst_dir)
    missing = [n for n in TOKENIZER_FILES if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer directory {src} lacks {missing}; retrain with train_tokenizer")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)
