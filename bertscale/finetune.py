"""`bertscale finetune`: fine-tune a sequence classifier on a labelled task, the proof that pretraining helped.

task files (GLUE's TSV layout or jsonl) or in-memory ``TaskData`` -> the model directory's ``tokenizer.json``
([CLS] a [SEP] b [SEP], token types, longest-first truncation) -> our ``BertModel`` + dropout + linear on the
pooled [CLS] (Hugging Face's ``BertForSequenceClassification``, same parameter names; or on the mean of the
last layer, ``pooling="mean"``) -> AdamW with linear
warmup and decay -> accuracy, F1 and Matthews correlation on the dev set.

``from_scratch=True`` trains the same classifier from random weights of the same shape: the control
that says how much of the figure pretraining earned. Every random choice (classifier head, scratch
weights, shuffling, dropout) follows ``seed`` (through torch's global generator, which it reseeds), so
a figure can be reproduced: bit for bit on CPU, up to the non-deterministic kernels on a GPU. The head,
the order of batches and the dropout draws are the same with and without ``from_scratch``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from bertscale.hf_format import load_hf
from bertscale.model import BertForPreTraining, BertModel
from bertscale.packing import attention_mask, pad_rows
from bertscale.schedule import PhaseSpan, lr_at

log = logging.getLogger("bertscale.finetune")


class TaskFormatError(ValueError):
    """A task file or in-memory task that cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ task data

@dataclass(frozen=True)
class Example:
    """One labelled example: a sentence (``text``) or a sentence pair (``text``, ``text_b``)."""

    text: str
    label: str | int
    """The class; integers are kept as their decimal string (``1`` and ``"1"`` are one class)."""
    text_b: str | None = None
    where: str = ""
    """Where the example came from, e.g. ``task/dev.tsv:12`` or ``dev[3]``; errors name it."""

    def __post_init__(self) -> None:
        place = f"{self.where}: " if self.where else ""
        if not isinstance(self.text, str):
            raise TaskFormatError(f"{place}text must be a string, got {type(self.text).__name__}")
        if self.text_b is not None and not isinstance(self.text_b, str):
            raise TaskFormatError(f"{place}text_b must be a string or absent, got {type(self.text_b).__name__}")
        label = self.label
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise TaskFormatError(
                f"{place}label {label!r} is not a class: give a string or an integer class id "
                f"(finetune classifies; regression targets such as STS-B's scores are not supported)")
        label = str(label).strip()
        if not label:
            raise TaskFormatError(f"{place}the label is empty; every example needs its class")
        object.__setattr__(self, "label", label)


def _label_key(label: str) -> tuple[int, int | str]:
    """Sort integer-like labels numerically ("2" before "10"), other labels alphabetically after them."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


@dataclass(frozen=True)
class TaskData:
    """A classification task in memory: training and dev examples, checked once on construction.

    The demo builds one from its own held-out corpus; ``load_task`` builds one from files.
    """

    train: Sequence[Example]
    dev: Sequence[Example]
    name: str = "task"
    skipped: Sequence[str] = ()
    """Where rows were dropped for a wrong column count (``load_task(..., skip_malformed=True)``)."""

    def __post_init__(self) -> None:
        splits = {}
        for split in ("train", "dev"):
            examples = tuple(getattr(self, split))
            for i, ex in enumerate(examples):
                if not isinstance(ex, Example):
                    raise TaskFormatError(f"{split}[{i}] is a {type(ex).__name__}, not an Example(text, label, "
                                          f"text_b)")
            examples = tuple(ex if ex.where else replace(ex, where=f"{split}[{i}]") for i, ex in enumerate(examples))
            if not examples:
                raise TaskFormatError(f"task {self.name!r} has no {split} examples")
            object.__setattr__(self, split, examples)
            splits[split] = examples
        everything = splits["train"] + splits["dev"]
        first = everything[0]
        for ex in everything:
            if (ex.text_b is None) != (first.text_b is None):
                pair, single = (ex, first) if first.text_b is None else (first, ex)
                raise TaskFormatError(
                    f"{single.where} has one sentence but {pair.where} has a pair (text_b); a task is "
                    f"either single-sentence or sentence-pair throughout")
        seen = {ex.label for ex in splits["train"]}
        if len(seen) < 2:
            raise TaskFormatError(
                f"the training examples of task {self.name!r} all have label {first.label!r}; a classifier "
                f"needs at least two classes")
        for ex in splits["dev"]:
            if ex.label not in seen:
                raise TaskFormatError(
                    f"{ex.where}: label {ex.label!r} never occurs in the training examples (their labels: "
                    f"{', '.join(self.labels)}); the classifier could never predict it, so fix the label or "
                    f"add training examples of that class")

    @property
    def labels(self) -> tuple[str, ...]:
        """The classes, in the order of the classifier's outputs (integers numerically, then text)."""
        return tuple(sorted({ex.label for ex in self.train}, key=_label_key))

    @property
    def is_pair(self) -> bool:
        return self.train[0].text_b is not None


@dataclass(frozen=True)
class _Columns:
    """Which TSV columns hold the text(s) and the label."""

    layout: str
    count: int
    text: int
    label: int
    text_b: int | None = None
    header: bool = True


# (first text, second text) column names, tried in order: QNLI has both `question` and `sentence`.
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                 ("#1 String", "#2 String"), ("text", "text_b"))
_SINGLE_COLUMNS = ("sentence", "text")
_LABEL_COLUMNS = ("label", "gold_label", "Quality", "is_duplicate")
_LAYOUT_HELP = (
    "give the file a header naming its columns: `sentence` + `label` (single sentence, as SST-2), "
    "`sentence1` + `sentence2` + `label` (pair, as RTE/WNLI; MNLI's `gold_label` works too), `question` + "
    "`sentence` + `label` (QNLI), `question1` + `question2` + `is_duplicate` (QQP), `Quality` + `#1 String` + "
    "`#2 String` (MRPC), or `text` [+ `text_b`] + `label`; CoLA's headerless 4 columns (source, label, "
    "original label, sentence) are recognised too. Or write jsonl with `text`, optional `text_b`, `label`")


def _recognise_columns(path: Path, fields: list[str]) -> _Columns:
    """The column layout from a TSV file's first line (a header, or CoLA's first example)."""
    names = [f.strip() for f in fields]
    label = next((n for n in _LABEL_COLUMNS if n in names), None)
    texts = next((pair for pair in _PAIR_COLUMNS if all(n in names for n in pair)), None)
    if texts is None:
        texts = next(((n,) for n in _SINGLE_COLUMNS if n in names), None)
    if label is not None and texts is not None:
        return _Columns(layout=" + ".join((*texts, label)), count=len(names), text=names.index(texts[0]),
                        text_b=names.index(texts[1]) if len(texts) > 1 else None, label=names.index(label))
    if label is None and texts is None and len(names) == 4 and names[1] in ("0", "1"):
        return _Columns(layout="CoLA (no header)", count=4, text=3, label=1, header=False)
    if "score" in names:
        raise TaskFormatError(f"{path}:1: a `score` column is a regression target (as STS-B); finetune "
                              f"classifies, so give class labels instead")
    missing = "label" if label is None else "text"
    raise TaskFormatError(f"{path}:1: the columns {names} include no {missing} column; {_LAYOUT_HELP}")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line, decoded strictly as UTF-8 (a BOM is dropped)."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # MRPC's files begin with a byte-order mark
        raw = raw[3:]
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise TaskFormatError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                f"re-save the file as UTF-8") from None
        if text.strip():
            lines.append((number, text))
    if not lines:
        raise TaskFormatError(f"{path} is empty; it needs one labelled example per line")
    return lines


def _read_tsv(path: Path, skipped: list[str] | None = None) -> list[Example]:
    """Examples of a GLUE-style TSV file; the layout is recognised from its header (see ``_LAYOUT_HELP``).

    A row with the wrong number of columns is an error, or, given a ``skipped`` list, recorded there."""
    lines = _read_lines(path)
    columns = _recognise_columns(path, lines[0][1].split("\t"))
    if columns.header:
        lines = lines[1:]
        if not lines:
            raise TaskFormatError(f"{path} has a header but no examples")
    examples = []
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != columns.count:
            if skipped is not None:
                skipped.append(f"{path}:{number}")
                continue
            raise TaskFormatError(
                f"{path}:{number}: {len(fields)} tab-separated columns, expected {columns.count} "
                f"(layout {columns.layout}); a tab inside a sentence or a missing field breaks the row. GLUE's "
                f"original QQP and SNLI files have a few such rows, which the reference scripts drop: pass "
                f"--skip-malformed (skip_malformed=True) to drop them too, counted in the output")
        examples.append(Example(text=fields[columns.text], label=fields[columns.label],
                                text_b=None if columns.text_b is None else fields[columns.text_b],
                                where=f"{path}:{number}"))
    if not examples:
        raise TaskFormatError(f"{path} has no well-formed rows ({len(skipped or ())} skipped)")
    return examples


def _read_jsonl(path: Path) -> list[Example]:
    """Examples of a jsonl file: one object per line with `text`, optional `text_b`, and `label`."""
    examples = []
    for number, line in _read_lines(path):
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise TaskFormatError(f"{where}: expected an object with `text`, optional `text_b` and `label`, "
                                  f"got {got}")
        examples.append(Example(text=row["text"], label=row["label"], text_b=row.get("text_b"), where=where))
    return examples


def load_task(task_dir: str | os.PathLike, skip_malformed: bool = False) -> TaskData:
    """Read ``train`` and ``dev`` files of one format (``.tsv`` or ``.jsonl``) from ``task_dir``.

    MNLI's dev set is ``dev_matched.tsv``; it is used when there is no ``dev.tsv``. ``skip_malformed``
    drops TSV rows with the wrong number of columns (listed in ``TaskData.skipped``) instead of refusing.
    """
    d = Path(task_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"task directory {d} does not exist; give the folder that holds train.tsv and "
                                f"dev.tsv (or train.jsonl and dev.jsonl)")
    found = [ext for ext in (".tsv", ".jsonl") if (d / f"train{ext}").is_file()]
    if not found:
        raise FileNotFoundError(f"{d} has no train.tsv or train.jsonl; a task directory holds train.tsv + "
                                f"dev.tsv (GLUE's layout) or train.jsonl + dev.jsonl")
    if len(found) > 1:
        raise TaskFormatError(f"{d} holds both train.tsv and train.jsonl; keep one format so it is clear "
                              f"which is meant")
    ext = found[0]
    dev = next((d / name for name in (f"dev{ext}", f"dev_matched{ext}") if (d / name).is_file()), None)
    if dev is None:
        raise FileNotFoundError(f"{d} has train{ext} but no dev{ext} (MNLI's dev_matched{ext} is also "
                                f"accepted); finetune reports its figures on the dev set, so provide one")
    skipped: list[str] | None = [] if skip_malformed else None

    def read(path: Path) -> list[Example]:
        return _read_tsv(path, skipped) if ext == ".tsv" else _read_jsonl(path)

    train = read(d / f"train{ext}")
    return TaskData(train=train, dev=read(dev), name=d.name, skipped=tuple(skipped or ()))


# ------------------------------------------------------------------------------------------------ metrics

def _check_predictions(pred: Sequence[int], gold: Sequence[int]) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need as many predictions as gold labels, at least one (got {len(pred)} and {len(gold)})")


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of predictions equal to the gold label."""
    _check_predictions(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def f1_score(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of class ``positive``: 2·TP / (2·TP + FP + FN); 0 when that class is neither predicted nor present."""
    _check_predictions(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    wrong = sum((p == positive) != (g == positive) for p, g in zip(pred, gold))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, for any number of classes (Gorodkin's R_K; the usual MCC for two).

    With c correct of s, t_k gold and p_k predicted examples of class k:
    (c·s − Σ p_k·t_k) / sqrt((s² − Σ p_k²)·(s² − Σ t_k²)); 0 when either factor is 0 (one class only).
    """
    _check_predictions(pred, gold)
    classes = set(pred) | set(gold)
    s = len(gold)
    c = sum(p == g for p, g in zip(pred, gold))
    t = {k: sum(g == k for g in gold) for k in classes}
    p = {k: sum(q == k for q in pred) for k in classes}
    denominator = (s * s - sum(v * v for v in p.values())) * (s * s - sum(v * v for v in t.values()))
    if denominator == 0:
        return 0.0
    return (c * s - sum(p[k] * t[k] for k in classes)) / math.sqrt(denominator)


def classification_metrics(pred: Sequence[int], gold: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy and Matthews correlation always; for two classes also F1 of the positive class, which is
    the label sorting last (``1`` of 0/1 labels, as GLUE scores MRPC and QQP), named in ``positive_label``."""
    metrics: dict[str, Any] = {"accuracy": accuracy(pred, gold), "mcc": matthews_corrcoef(pred, gold)}
    if len(labels) == 2:
        metrics["f1"] = f1_score(pred, gold, positive=1)
        metrics["positive_label"] = labels[1]
    return metrics


# ------------------------------------------------------------------------------------------------ model

POOLINGS = ("cls", "mean")
"""What the classifier reads: the pooled [CLS] output (BERT's, Hugging Face's) or the mean of the last
layer over the real tokens (uses what the encoder learned of every word, not only what NSP put into the
pooler; the pooler's weights are then unused)."""


class BertForSequenceClassification(nn.Module):
    """Our ``BertModel`` with dropout and a linear classifier on the pooled [CLS] output (``pooling="cls"``)
    or on the mean of the last layer over the real tokens (``pooling="mean"``).

    Parameter names are Hugging Face's ``BertForSequenceClassification`` (``bert.*``, ``classifier.weight``,
    ``classifier.bias``), so its state dict loads there unchanged; with ``cls`` it also computes the same.
    """

    def __init__(self, bert: BertModel, num_labels: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        config = bert.config
        self.config, self.num_labels, self.pooling = config, num_labels, pooling
        self.bert = bert
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_labels] logits; ``attention_mask`` is 1 for real tokens, 0 for padding."""
        sequence, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        if self.pooling == "mean":
            mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).unsqueeze(-1)
            pooled = (sequence * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(self.dropout(pooled))


def build_classifier(model_dir: str | os.PathLike, num_labels: int, from_scratch: bool = False,
                     seed: int = 42, pooling: str = "cls") -> BertForSequenceClassification:
    """The pretrained encoder of ``model_dir`` (or, ``from_scratch``, random weights of the same shape)
    with a fresh classifier head; the head depends only on ``seed``, so both variants start from the same one."""
    pretrained = load_hf(model_dir)
    bert = pretrained.bert
    if from_scratch:
        # BertForPreTraining's own initialisation, so the control starts as pretraining itself did.
        torch.manual_seed(seed + 1)
        bert = BertForPreTraining(pretrained.config, pretrained.perf).bert
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert, num_labels, pooling)


# ------------------------------------------------------------------------------------------------ data path

def load_pair_tokenizer(model_dir: str | os.PathLike, max_seq_len: int) -> Tokenizer:
    """The model directory's ``tokenizer.json``, truncating longest-first to ``max_seq_len`` tokens in all.

    Refuses a tokenizer that does not add BERT's [CLS] a [SEP] b [SEP] with token types 0 and 1."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; `bertscale convert` writes it beside the "
                                f"weights (or copy the files of the tokenizer the model was trained with there)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_seq_len, strategy="longest_first")
    probe = tok.encode("a", "b")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if (cls_id is None or probe.ids[0] != cls_id or probe.ids[-1] != sep_id or probe.ids.count(sep_id) != 2
            or probe.type_ids[-1] != 1):
        raise ValueError(f"{path} does not turn a pair into [CLS] a [SEP] b [SEP] with token types 0 and 1; "
                         f"use a BERT tokenizer (`bertscale tokenizer` writes one)")
    return tok


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    type_ids: list[int]
    label: int


def _encode(tok: Tokenizer, examples: Sequence[Example], label_ids: dict[str, int]) -> tuple[list[_Row], int]:
    """Tokenized rows and how many examples were truncated."""
    inputs = [ex.text if ex.text_b is None else (ex.text, ex.text_b) for ex in examples]
    encodings = tok.encode_batch(inputs)
    rows = [_Row(e.ids, e.type_ids, label_ids[ex.label]) for e, ex in zip(encodings, examples)]
    return rows, sum(bool(e.overflowing) for e in encodings)


def _collate(rows: Sequence[_Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch (not to max_seq_len: short tasks train faster)."""
    ids = torch.from_numpy(pad_rows([r.ids for r in rows], pad_id))
    type_ids = torch.from_numpy(pad_rows([r.type_ids for r in rows], 0))
    mask = torch.from_numpy(attention_mask([len(r.ids) for r in rows], ids.shape[1]))
    return {"input_ids": ids.to(device), "token_type_ids": type_ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.tensor([r.label for r in rows], device=device)}


def _batches(rows: Sequence[_Row], batch_size: int, order: Sequence[int] | None = None) -> Iterator[list[_Row]]:
    order = range(len(rows)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield [rows[i] for i in order[start:start + batch_size]]


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (pretraining's ``engine.parameter_groups``),
    as BERT's fine-tuning recipe."""
    from bertscale.engine import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)


def _resolve_device(device: str) -> torch.device:
    from bertscale.hardware import accelerator

    return torch.device(accelerator(device, setting="--device"))


@torch.inference_mode()
def _predict(model: BertForSequenceClassification, rows: Sequence[_Row], batch_size: int, pad_id: int,
             device: torch.device) -> list[int]:
    model.eval()
    predictions: list[int] = []
    for batch in _batches(rows, batch_size):
        b = _collate(batch, pad_id, device)
        logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        predictions.extend(logits.argmax(dim=-1).tolist())
    return predictions


def _check_settings(epochs: int, lr: float, batch_size: int, max_seq_len: int, warmup: float,
                    weight_decay: float, pooling: str) -> None:
    problems = []
    if pooling not in POOLINGS:
        problems.append(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not isinstance(epochs, int) or epochs < 1:
        problems.append(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        problems.append(f"lr must be positive, got {lr!r} (BERT fine-tuning uses 2e-5 to 5e-5)")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        problems.append(f"max_seq_len must be an integer of at least 8, got {max_seq_len!r}")
    if not 0 <= warmup < 1:
        problems.append(f"warmup is a fraction of the training steps in [0, 1), got {warmup!r}")
    if not weight_decay >= 0:
        problems.append(f"weight_decay must be at least 0, got {weight_decay!r}")
    if problems:
        raise ValueError("invalid finetune settings:\n  - " + "\n  - ".join(problems))


def finetune(model_dir: str | os.PathLike, task: str | os.PathLike | TaskData, *, from_scratch: bool = False,
             epochs: int = 3, lr: float = 5e-5, batch_size: int = 32, max_seq_len: int = 128,
             warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 42, device: str = "auto",
             skip_malformed: bool = False, pooling: str = "cls") -> dict[str, Any]:
    """Fine-tune a classifier on ``task`` (a task directory or ``TaskData``) and score it on the dev set.

    Returns a flat dict: the metrics (``accuracy``, ``mcc``; ``f1`` and ``positive_label`` for two
    classes), ``init`` (``pretrained`` or ``scratch``), the settings, example counts and ``seconds``.
    ``skip_malformed`` is passed to ``load_task``; the rows it dropped are counted in ``skipped_rows``.
    ``pooling`` (one of ``POOLINGS``) says what the classifier reads.
    """
    _check_settings(epochs, lr, batch_size, max_seq_len, warmup, weight_decay, pooling)
    started = time.perf_counter()
    data = task if isinstance(task, TaskData) else load_task(task, skip_malformed=skip_malformed)
    if data.skipped:
        log.warning("skipped %d rows with the wrong number of columns: %s%s", len(data.skipped),
                    ", ".join(data.skipped[:5]), " ..." if len(data.skipped) > 5 else "")
    dev = _resolve_device(device)
    tok = load_pair_tokenizer(model_dir, max_seq_len)
    model = build_classifier(model_dir, len(data.labels), from_scratch=from_scratch, seed=seed, pooling=pooling)
    config = model.config
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; use --max-seq-len {config.max_position_embeddings} "
                         f"or less")
    if tok.get_vocab_size() > config.vocab_size:
        raise ValueError(f"{model_dir}/tokenizer.json has {tok.get_vocab_size()} tokens but the model only "
                         f"{config.vocab_size}; the tokenizer belongs to another model")
    model.to(dev)

    label_ids = {label: i for i, label in enumerate(data.labels)}
    train_rows, train_cut = _encode(tok, data.train, label_ids)
    dev_rows, dev_cut = _encode(tok, data.dev, label_ids)
    if train_cut or dev_cut:
        log.info("truncated %d of %d training and %d of %d dev examples to %d tokens", train_cut,
                 len(train_rows), dev_cut, len(dev_rows), max_seq_len)

    # Same seed for both variants from here: identical batch order and dropout draws.
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, lr, weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    spans = [PhaseSpan(0, 0, epochs * steps_per_epoch)]
    step = 0
    for epoch in range(epochs):
        model.train()
        loss_sum = torch.zeros((), device=dev)
        order = torch.randperm(len(train_rows), generator=shuffler).tolist()
        for batch in _batches(train_rows, batch_size, order):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, spans, [lr], [warmup], [1.0])  # linear warmup, then linear decay
            b = _collate(batch, config.pad_token_id, dev)
            logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
            loss = F.cross_entropy(logits.float(), b["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            step += 1
        train_loss = loss_sum.item() / len(train_rows)
        log.info("finetune %s (%s) epoch %d/%d: train loss %.4f", data.name,
                 "scratch" if from_scratch else "pretrained", epoch + 1, epochs, train_loss)

    predictions = _predict(model, dev_rows, batch_size, config.pad_token_id, dev)
    metrics = classification_metrics(predictions, [r.label for r in dev_rows], data.labels)
    return {
        "task": data.name,
        "init": "scratch" if from_scratch else "pretrained",
        **metrics,
        "train_loss": train_loss,
        "labels": list(data.labels),
        "train_examples": len(train_rows),
        "dev_examples": len(dev_rows),
        "truncated_examples": train_cut + dev_cut,
        "skipped_rows": len(data.skipped),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_seq_len": max_seq_len, "pooling": pooling,
        "warmup": warmup, "weight_decay": weight_decay, "seed": seed,
        "device": dev.type,
        "model": str(model_dir),
        "seconds": round(time.perf_counter() - started, 2),
    }
