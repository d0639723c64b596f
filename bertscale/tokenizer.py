"""WordPiece tokenizer: training, loading, and the facts other modules need (ids, fingerprint).

Training is reproducible: the same corpus and options give byte-identical ``vocab.txt`` and
``tokenizer.json``, in one process or across processes. ``tokenizers``' WordPiece trainer (BPE
underneath) gives the ``##`` continuation piece of each character its id in hash-map order, and
breaks ties between equally frequent merges by those ids, so its vocabulary changes from run to
run. We hand it every ``##c`` the corpus can produce, sorted, as pre-assigned tokens; every id it
then assigns, and every tie, is decided by the corpus alone. The saved tokenizer is rebuilt from
the resulting vocabulary with only BERT's five special tokens registered as special.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bertscale.corpus import check_document_mode, expand_inputs, iter_documents, paragraph_layout
from bertscale.files import atomic_output, require_writable_dir, write_atomic

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
"""What a tokenizer directory holds for ``transformers``; copied beside converted models."""
TRAINING_RECORD = "bertscale_training.json"
"""Which inputs and options a tokenizer directory was trained from (not needed to use it)."""
MIN_VOCAB_SIZE = 100
MODEL_MAX_LENGTH = 512
CONTINUATION = "##"
_BATCH_SENTENCES = 1000


def _sentence_batches(inputs: Sequence[str | os.PathLike], documents: str = "blank-lines") -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in iter_documents(inputs, documents=documents):
        batch.extend(doc)
        if len(batch) >= _BATCH_SENTENCES:
            yield batch
            batch = []
    if batch:
        yield batch


def _new_tokenizer(lowercase: bool, vocab: dict[str, int] | None = None) -> Tokenizer:
    model = (models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION) if vocab is not None
             else models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=CONTINUATION))
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    return tok


def _continuation_pieces(inputs: Sequence[str | os.PathLike], tok: Tokenizer, documents: str) -> list[str]:
    """``##c`` for every character c of the normalized corpus that can continue a word, sorted."""
    raw: set[str] = set()
    for batch in _sentence_batches(inputs, documents):
        raw.update("".join(batch))
    chars: set[str] = set()
    for c in raw:  # character by character: context (a final sigma) is left to train_tokenizer's check
        chars.update(tok.normalizer.normalize_str(c))
    pieces = []
    for c in sorted(chars):
        word = tok.normalizer.normalize_str("a" + c)  # c after a letter: one word, or split off?
        split = tok.pre_tokenizer.pre_tokenize_str(word)
        if len(split) == 1 and split[0][0] == word and len(word) == 2:
            pieces.append(CONTINUATION + c)
    return pieces


def _train(inputs, lowercase: bool, vocab_size: int, min_frequency: int, pieces: list[str],
           show_progress: bool, documents: str) -> dict[str, int]:
    tok = _new_tokenizer(lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS + pieces,  # pre-assigned ids: see the module docstring
        continuing_subword_prefix=CONTINUATION,
        # off the terminal the Rust progress bar leaves only blank lines in logs and pipes
        show_progress=show_progress and sys.stderr.isatty(),
    )
    tok.train_from_iterator(_sentence_batches(inputs, documents), trainer=trainer)
    return tok.get_vocab(with_added_tokens=True)


def inputs_fingerprint(inputs: Sequence[str | os.PathLike]) -> str:
    """Identity of corpus inputs: every file's resolved path, size and modification time."""
    ids = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in expand_inputs(inputs)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _training_options(inputs, vocab_size: int, lowercase: bool, min_frequency: int) -> dict:
    return {"inputs": inputs_fingerprint(inputs), "vocab_size": vocab_size, "lowercase": lowercase,
            "min_frequency": min_frequency}


def trained_from(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], vocab_size: int,
                 lowercase: bool = True, min_frequency: int = 2) -> bool:
    """True when out_dir holds a tokenizer trained from exactly these inputs and options (reusable as is)."""
    d = Path(out_dir)
    try:
        record = json.loads((d / TRAINING_RECORD).read_text())
        info = tokenizer_info(d)
    except (OSError, ValueError):
        return False
    return (record.get("options") == _training_options(inputs, vocab_size, lowercase, min_frequency)
            and record.get("fingerprint") == info.fingerprint and (d / "tokenizer.json").is_file())


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    lowercase: bool = True,
    min_frequency: int = 2,
    show_progress: bool = True,
    documents: str = "blank-lines",
    check_layout: bool = True,
) -> Path:
    """Train a BERT WordPiece tokenizer on the corpus and write HF-compatible files to out_dir.

    Byte-identical files for the same corpus and options. The vocabulary can come out smaller than
    ``vocab_size`` when the corpus has no more pairs seen ``min_frequency`` times (logged).
    ``documents`` (one of ``corpus.DOCUMENT_MODES``) reads .txt files as ``bertscale shards`` will; the
    vocabulary comes from sentences, which both modes read alike, so the mode only decides whether the
    paragraph layout is warned about (in ``blank-lines`` mode, as ``build_shards`` warns, unless
    ``check_layout`` is false) and is not part of the training record.
    """
    check_document_mode(documents)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} "
            "(BERT uses 30522; small tests use a few hundred)"
        )
    out = require_writable_dir(out_dir, "tokenizer output directory")  # before minutes of training
    options = _training_options(inputs, vocab_size, lowercase, min_frequency)
    layout = paragraph_layout(expand_inputs(inputs)) if documents == "blank-lines" and check_layout else None
    if layout is not None:
        log.warning("%s", layout)
    pieces = _continuation_pieces(inputs, _new_tokenizer(lowercase), documents)
    vocab = _train(inputs, lowercase, vocab_size, min_frequency, pieces, show_progress, documents)
    stray = sorted(t for t in vocab if t.startswith(CONTINUATION) and len(t) == len(CONTINUATION) + 1
                   and t not in set(pieces))
    if stray:  # a piece the character scan missed would get a hash-order id: train again with it
        log.info("retraining with %d more continuation pieces (%s) for a reproducible vocabulary", len(stray),
                 " ".join(stray[:10]))
        vocab = _train(inputs, lowercase, vocab_size, min_frequency, sorted(pieces + stray), show_progress, documents)
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if ordered[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise AssertionError(f"special tokens did not get ids 0-4: {ordered[:5]}")
    tok = _new_tokenizer(lowercase, {t: i for i, t in enumerate(ordered)})
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    with atomic_output(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_atomic(out / "vocab.txt", "".join(t + "\n" for t in ordered))
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
    write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
    fingerprint = tokenizer_info(out).fingerprint
    write_atomic(out / TRAINING_RECORD, json.dumps({"options": options, "fingerprint": fingerprint}, indent=2) + "\n")
    if len(ordered) < vocab_size:
        log.warning("the vocabulary has %d entries, fewer than the %d asked: the corpus has no more pairs seen at "
                    "least %d times", len(ordered), vocab_size, min_frequency)
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


def _vocab_bytes(d: Path) -> bytes:
    """The bytes of ``vocab.txt``, one token per line in id order. A directory that ``transformers`` v5
    saved holds ``tokenizer.json`` only: the same bytes are rebuilt from its WordPiece vocabulary, so the
    fingerprint names the vocabulary whichever file holds it (shards built with our tokenizer match)."""
    if (d / "vocab.txt").is_file():
        return (d / "vocab.txt").read_bytes()
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no vocab.txt in {d} (nor a tokenizer.json); train a tokenizer with `bertscale tokenizer ... --out {d}`"
        )
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"] if model.get("type") == "WordPiece" else None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable tokenizer file ({exc})") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: the model is {model.get('type')!r}, not BERT's WordPiece; bertscale trains "
                         f"WordPiece vocabularies only")
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(f"{path}: the WordPiece ids are not 0..{len(tokens) - 1} without gaps")
    return "".join(t + "\n" for t in tokens).encode("utf-8")


def tokenizer_info(dir: str | os.PathLike) -> TokenizerInfo:
    """Read vocab and config of a tokenizer directory written by ``train_tokenizer`` (or by ``transformers``:
    ``tokenizer.json`` without ``vocab.txt``)."""
    d = Path(dir)
    vocab_bytes = _vocab_bytes(d)
    if not (d / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer_config.json in {d}; train a tokenizer with `bertscale tokenizer ... --out {d}`"
        )
    tokens = vocab_bytes.decode("utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    ids = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"the vocabulary of {d} lacks special tokens {missing}; retrain the tokenizer")
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


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, complete: bool = True) -> None:
    """Copy the tokenizer files there are (into a checkpoint, next to an exported model), each written whole.
    ``complete``: ``tokenizer_info`` must be able to read the copy (``tokenizer_config.json`` and ``vocab.txt`` or
    ``tokenizer.json``); otherwise at least one file must be there."""
    src, dst = Path(src_dir), Path(dst_dir)
    present = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not complete and not present:
        raise FileNotFoundError(f"tokenizer directory {src} holds none of {', '.join(TOKENIZER_FILES)}; point it at "
                                f"the folder the tokenizer was saved to")
    if complete and ("tokenizer_config.json" not in present or not {"vocab.txt", "tokenizer.json"} & set(present)):
        raise FileNotFoundError(f"tokenizer directory {src} has only {present or 'none of ' + str(list(TOKENIZER_FILES))}; "
                                f"it needs tokenizer_config.json and vocab.txt or tokenizer.json (retrain with "
                                f"`bertscale tokenizer`)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in present:
        with atomic_output(dst / name) as tmp:
            shutil.copyfile(src / name, tmp)
