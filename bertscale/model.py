"""BERT for pretraining (MLM + NSP), in one file.

Module and parameter names match Hugging Face's ``BertForPreTraining`` so that
conversion to and from ``transformers`` is a key-for-key copy. This file knows
nothing of data, tokenizers or distribution.

Two batch layouts, one function. *Padded*: ``[B, S]`` rows with an attention mask (evaluation,
fine-tuning, ``transformers`` parity). *Unpadded* (training; built by ``bertscale.packing``, which
explains the choice and its figures): the real tokens of B samples end to end, ``[T]``, with
``cu_seqlens``. Every token-wise layer then runs on the T real tokens only, position ids restart
per sample, and attention stays within each sample: on CUDA through flash attention's
variable-length kernel on the token stream (``flash_varlen_attention``, dropout included), on CPU
through dense block-diagonal attention over rows the samples are laid into (``attention_rows``;
fastest there as measured). SDPA on jagged nested tensors is the third choice: the same flash
kernel on CUDA, but measured on an H200 its nested-tensor bookkeeping (Python subclass dispatch,
~5 ms of host time per layer) made a BERT-large step 1.8x *slower* than the padded one.
``PerfOptions.unpadded_attention`` picks the kernel; ``unpadded_attention_kernel`` is the dispatch.
The losses, counts and gradients are those of the padded path on the same samples
(tests/test_packing.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bertscale.masking import IGNORE_INDEX  # the label of positions that are not MLM targets (data side owns it)

UNPADDED_ATTENTION = ("auto", "varlen", "jagged", "rows")
"""Choices of ``PerfOptions.unpadded_attention``."""

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, what Hugging Face calls "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    """Architecture of a BERT model; field names are Hugging Face's ``config.json`` keys."""

    vocab_size: int
    """Number of WordPiece tokens; rows of the word embedding and MLM decoder."""
    hidden_size: int
    """Width of every hidden state (d_model)."""
    num_hidden_layers: int
    """Number of transformer layers (L)."""
    num_attention_heads: int
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int
    """Width of the feed-forward layer (usually 4 * hidden_size)."""
    hidden_act: str = "gelu"
    """Feed-forward and MLM-transform activation; "gelu" is the exact erf GELU."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and on each residual branch."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities (training only)."""
    max_position_embeddings: int = 512
    """Longest sequence the position embedding covers."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight init."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    pad_token_id: int = 0
    """Id of [PAD]; its word-embedding row starts at zero."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if (isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int)
                and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads):
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick heads so that hidden_size / heads is a whole head "
                f"size (e.g. 64)"
            )
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                problems.append(f"{name} must be in [0, 1), got {p!r}")
        if self.initializer_range <= 0:
            problems.append(f"initializer_range must be positive, got {self.initializer_range!r}")
        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if isinstance(self.vocab_size, int) and not 0 <= self.pad_token_id < max(self.vocab_size, 1):
            problems.append(f"pad_token_id {self.pad_token_id} is outside the vocabulary (vocab_size {self.vocab_size})")
        if problems:
            raise ValueError("invalid BertConfig:\n  - " + "\n  - ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents that ``transformers`` loads as a ``BertForPreTraining``."""
        d: dict[str, Any] = {
            "model_type": "bert",
            "architectures": ["BertForPreTraining"],
            **asdict(self),
            "tie_word_embeddings": True,
            "position_embedding_type": "absolute",
            "use_cache": True,
            "is_decoder": False,
            "add_cross_attention": False,
            "classifier_dropout": None,
            # transformers v5 reads "dtype"; v4 reads "torch_dtype".
            "dtype": "float32",
            "torch_dtype": "float32",
        }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dict, ignoring keys we do not model."""
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported; bertscale models absolute positions only")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        return cls(**kwargs)


@dataclass(frozen=True)
class PerfOptions:
    """How the model runs, never what it computes: none of these changes the parameter names, and each
    is checked against the plain path in tests/test_perf_levers.py. Not part of ``config.json``."""

    fused_qkv: bool = True
    """One [d, 3d] projection for query, key and value (weights concatenated per call; the three
    Hugging Face parameters stay)."""
    fast_dropout: bool = True
    """On CPU, draw dropout masks from 16-bit integers (p is rounded to 1/65536) instead of torch's
    Bernoulli sampler, and run attention as matmul-softmax-dropout-matmul while training, since SDPA's
    CPU path with dropout is its slow reference kernel. GPU always uses torch's dropout and SDPA."""
    skip_full_mask: bool = True
    """Drop an attention_mask with no padding so SDPA takes its mask-free kernel (one host sync)."""
    pad_vocab_multiple: int = 1
    """Pad the word embedding / MLM decoder rows to a multiple of this (64 for tensor cores). The extra
    rows start at zero, get no gradient, are sliced off the logits and are stripped on export."""
    sparse_last_layer: bool = True
    """With labels, run the last layer past attention only on masked positions and [CLS] (the only
    rows the heads read); keys and values still come from every position."""
    fused_mlm_loss: bool = True
    """The masked-LM cross-entropy and accuracy in one pass over the [masked, V] logits
    (``masked_lm_loss``) instead of log_softmax + nll + argmax."""
    compile: bool = False
    """torch.compile each encoder layer (fuses bias-GELU, dropout-residual-LayerNorm)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: less memory, about a third more compute."""
    unpadded_attention: str = "auto"
    """Attention kernel for unpadded batches (``bertscale.packing``): "varlen" (flash attention's
    variable-length kernel, CUDA only; fp32 activations, which flash does not take, go through
    "jagged"), "jagged" (SDPA on jagged nested tensors: flash / memory-efficient kernels on CUDA with
    host overhead per layer, a slow reference on CPU), "rows" (samples laid into rows, dense
    block-diagonal attention per row: fastest on CPU), or "auto": varlen on CUDA, rows elsewhere."""

    def __post_init__(self) -> None:
        if not isinstance(self.pad_vocab_multiple, int) or self.pad_vocab_multiple < 1:
            raise ValueError(f"pad_vocab_multiple must be a positive integer (1: no padding, 64 for tensor "
                             f"cores), got {self.pad_vocab_multiple!r}")
        if self.unpadded_attention not in UNPADDED_ATTENTION:
            raise ValueError(f"unpadded_attention must be one of {', '.join(UNPADDED_ATTENTION)}, "
                             f"got {self.unpadded_attention!r}")

    @classmethod
    def plain(cls) -> PerfOptions:
        """Every lever off: the reference path the levers are tested against."""
        return cls(fused_qkv=False, fast_dropout=False, skip_full_mask=False, sparse_last_layer=False,
                   fused_mlm_loss=False)

    @classmethod
    def for_device(cls, device_type: str) -> PerfOptions:
        """What pays where it was measured (tools/README.md): tensor-core vocab padding on GPU."""
        return cls(pad_vocab_multiple=64) if device_type == "cuda" else cls()

    def with_overrides(self, items: list[str]) -> PerfOptions:
        """Apply ``field=value`` strings (bench command line)."""
        kinds = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            key, _, value = item.partition("=")
            if key not in kinds:
                raise ValueError(f"unknown PerfOptions field {key!r}; choose from {', '.join(kinds)}")
            if kinds[key] == "int":
                changes[key] = int(value)
            elif kinds[key] == "str":
                changes[key] = value
            else:
                changes[key] = value.lower() in ("1", "true", "yes", "on")
        return replace(self, **changes)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(vocab_size / multiple) * multiple) if multiple > 1 else vocab_size


class _FastDropout(torch.autograd.Function):
    """Inverted dropout with the keep mask drawn from 16-bit random integers.

    torch's CPU dropout samples a Bernoulli per element; filling int64 words from the generator and
    reading them as four int16 lanes is several times cheaper. Uses (and advances) torch's default
    generator, so seeding and RNG-state checkpoints work as for nn.Dropout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
        lanes = words.view(torch.int16)[:n].view(x.shape)
        keep = lanes >= round(p * 65536) - 32768  # P(drop) = round(p * 65536) / 65536
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` with drop probability ``p`` (see ``_FastDropout``)."""
    return _FastDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout that uses ``fast_dropout`` on CPU while training when ``fast`` is set."""

    fast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self.training and self.p > 0 and x.device.type == "cpu":
            return fast_dropout(x, self.p)
        return super().forward(x)


class _MaskedLMLoss(torch.autograd.Function):
    """Summed cross-entropy of [m, V] logits and the number of correct argmax predictions, in fp32.

    The same values as ``F.cross_entropy(logits.float(), targets, reduction="sum")`` and
    ``(logits.argmax(-1) == targets).sum()``, with less traffic over the [m, V] matrix, the largest
    of the head: one max pass gives the maximum and the prediction, the exponentials are computed
    once and kept, and backward turns them into the gradient in place (softmax minus one-hot)
    instead of log_softmax's output plus a zero-filled one-hot gradient and their copies.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        x = logits.float()
        top, predicted = x.max(dim=1, keepdim=True)
        e = torch.sub(x, top)
        e.exp_()
        total = e.sum(dim=1, keepdim=True)
        loss = (top + total.log() - x.gather(1, targets[:, None])).sum()
        correct = (predicted.squeeze(1) == targets).sum()
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(e, total, targets)
        ctx.dtype, ctx.spent = logits.dtype, False
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct):
        if ctx.spent:  # backward turns the saved exponentials into the gradient in place
            raise RuntimeError("masked_lm_loss: backward through the same graph twice is not supported")
        ctx.spent = True
        e, total, targets = ctx.saved_tensors
        grad = e.mul_(grad_loss / total)
        rows = torch.arange(len(targets), device=targets.device)
        grad.view(-1)[rows * grad.shape[1] + targets] -= grad_loss
        return grad.to(ctx.dtype), None


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy, number of correct predictions) of [m, V] logits (see ``_MaskedLMLoss``)."""
    if logits.shape[0] == 0:
        return logits.float().sum(), torch.zeros((), dtype=torch.long, device=logits.device)
    return _MaskedLMLoss.apply(logits, targets)


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}
"""Named architectures (the tiny..medium sizes follow Turc et al., "Well-Read Students Learn Better")."""


def preset_config(name: str, vocab_size: int, **overrides: Any) -> BertConfig:
    """A ``BertConfig`` for preset ``name`` with the tokenizer's ``vocab_size`` and any field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return BertConfig(**{**PRESETS[name], "vocab_size": vocab_size, **overrides})


@dataclass
class PretrainingOutput:
    """What ``BertForPreTraining.forward`` returns; counts let callers aggregate accuracy across steps."""

    loss: torch.Tensor | None
    """mlm_loss + nsp_loss (float32 scalar); None when no labels were given."""
    mlm_loss: torch.Tensor | None
    """Mean cross-entropy over masked positions (0 when there are none)."""
    nsp_loss: torch.Tensor | None
    """Mean NSP cross-entropy over the batch (0 when no next_sentence_label)."""
    mlm_correct: torch.Tensor | None
    """Number of masked positions predicted right (int64 scalar)."""
    mlm_count: torch.Tensor | None
    """Number of masked positions (int64 scalar)."""
    nsp_correct: torch.Tensor | None
    """Number of NSP labels predicted right (int64 scalar)."""
    nsp_count: torch.Tensor | None
    """Number of NSP labels (int64 scalar)."""
    prediction_logits: torch.Tensor | None
    """[B, S, V] ([T, V] unpadded) MLM logits over all positions; only when labels is None."""
    seq_relationship_logits: torch.Tensor
    """[B, 2] NSP logits (0 = B follows A, 1 = random B)."""


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig, vocab_rows: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids (positions 0..S-1) or, with ``position_ids``, ids of any shape -> [..., d]."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


ROW_CALL_COST = 14_000
"""What one more attention call costs on CPU, in score-heads (one query-key score of one head, forward
and backward: ~19 ns on the development CPU; a call's fixed cost ~0.27 ms), for ``attention_rows``."""


def attention_rows(lengths: Sequence[int], multiple: int = 8, heads: int = 1,
                   call_cost: float = ROW_CALL_COST) -> AttentionRows:
    """Lay samples of these lengths (in the unpadded stream's order) into rows for block-diagonal attention.

    A row's attention costs its width squared whatever it holds, so a short sample in a row as wide as
    the longest one pays for the long one's width. Rows therefore come in up to three widths (multiples
    of ``multiple``): the longest sample's, and narrower ones chosen greedily while they lower the
    estimated cost, ``heads * sum(width**2 over rows) + call_cost * widths`` (every width is one more
    kernel call per layer, so a narrower width pays only when it saves enough). Samples go longest
    first into the first row (of any width) with room, else into a new row of the narrowest width
    that holds them (first-fit decreasing). Deterministic: ties keep the stream's order.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"attention_rows needs positive sample lengths, got {lengths}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def up(n: int) -> int:
        return -(-n // multiple) * multiple

    def place(widths: list[int]) -> tuple[float, list[int], list[tuple[int, int]]]:
        """(cost, row width per row, (row, offset) per sample) with rows of these widths (descending)."""
        row_width: list[int] = []
        free: list[int] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
        for i in order:
            n = lengths[i]
            row = next((r for r, room in enumerate(free) if room >= n), None)
            if row is None:
                row = len(free)
                w = min(w for w in widths if w >= n)
                row_width.append(w)
                free.append(w)
            where[i] = (row, row_width[row] - free[row])
            free[row] -= n
        used = set(row_width)
        return heads * sum(w * w for w in row_width) + call_cost * len(used), row_width, where

    widest = up(lengths[order[0]])
    candidates = sorted({up(lengths[i]) for i in order} | {up(max(1, widest >> k)) for k in range(1, 5)}, reverse=True)
    widths = [widest]
    best = place(widths)
    while len(widths) < 3:
        tries = [(place(sorted(widths + [w], reverse=True)), w) for w in candidates if w not in widths]
        if not tries:
            break
        trial, w = min(tries, key=lambda t: t[0][0])
        if trial[0] >= best[0]:
            break
        best, widths = trial, sorted(widths + [w], reverse=True)
    _, row_width, where = best
    # Group the rows by width (widest first), each group one [rows, width] block of slots.
    shapes, row_start, slots = [], {}, 0
    for w in sorted(set(row_width), reverse=True):
        rows = [r for r, rw in enumerate(row_width) if rw == w]
        row_start.update((r, slots + k * w) for k, r in enumerate(rows))
        shapes.append((len(rows), w))
        slots += len(rows) * w
    slot = np.concatenate([np.arange(lengths[i]) + row_start[where[i][0]] + where[i][1] for i in range(len(lengths))])
    index = np.zeros(slots, dtype=np.int64)
    index[slot] = np.arange(len(slot))
    segment = np.full(slots, -1, dtype=np.int64)
    segment[slot] = np.repeat(np.arange(len(lengths)), lengths)
    parts = np.split(segment, np.cumsum([n * w for n, w in shapes])[:-1])
    return AttentionRows(index=torch.from_numpy(index), back=torch.from_numpy(slot),
                         segments=tuple(torch.from_numpy(part.reshape(shape)) for part, shape in zip(parts, shapes)))


@dataclass(frozen=True)
class AttentionRows:
    """Where each token of an unpadded stream sits in the rows of the CPU attention kernel."""

    index: torch.Tensor
    """[slots] the stream position at each row slot, the groups' slots one after another (0 for an
    empty slot: masked out, output unused)."""
    back: torch.Tensor
    """[T] the slot of each stream position."""
    segments: tuple[torch.Tensor, ...]
    """Per group of rows of one width, widest first: [R, W] the sample at each slot, -1 where empty."""

    @property
    def fill(self) -> float:
        """Real tokens / row slots."""
        return self.back.numel() / self.index.numel()

    @property
    def scores(self) -> int:
        """Query-key pairs the rows compute per head (sum of width squared over rows)."""
        return sum(seg.shape[0] * seg.shape[1] ** 2 for seg in self.segments)

    def to(self, device: torch.device) -> AttentionRows:
        return replace(self, index=self.index.to(device), back=self.back.to(device),
                       segments=tuple(seg.to(device) for seg in self.segments))

    def block_bias(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Per group, [R, 1, W, W] additive mask: 0 within a sample, the dtype's minimum elsewhere
        (finite, so an empty slot's query row attends uniformly instead of producing NaN; its output
        is dropped)."""
        out = []
        for seg in self.segments:
            same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :]
            bias = torch.zeros(same.shape, dtype=dtype, device=seg.device)
            out.append(bias.masked_fill_(~same, torch.finfo(dtype).min)[:, None])
        return tuple(out)


def unpadded_attention_kernel(choice: str, device_type: str) -> str:
    """The kernel ``PerfOptions.unpadded_attention`` resolves to on a device: "varlen", "jagged" or "rows"."""
    if choice not in UNPADDED_ATTENTION:
        raise ValueError(f"unpadded_attention must be one of {', '.join(UNPADDED_ATTENTION)}, got {choice!r}")
    if choice == "varlen" and device_type != "cuda":
        raise ValueError(f"unpadded_attention = 'varlen' runs flash attention, which needs a CUDA device (this "
                         f"one is {device_type}); use 'auto' or 'rows'")
    if choice != "auto":
        return choice
    return "varlen" if device_type == "cuda" else "rows"


class _FlashVarlen(torch.autograd.Function):
    """Flash attention over samples laid end to end, ``[T, h, dh]`` with ``cu_seqlens``: no padding,
    no nested tensors, dropout included (the kernel's own Philox stream from the CUDA generator, which
    checkpoints save and ``torch.utils.checkpoint`` replays)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.dropout_p, ctx.scale = max_seqlen, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, ctx.dropout_p, False,
            seed, offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention within each sample of a token stream: q, k, v ``[T, h, dh]`` (fp16 / bf16 on CUDA),
    ``cu_seqlens`` int32 ``[B + 1]`` on the device, ``max_seqlen`` a host int -> ``[T, h, dh]``."""
    return _FlashVarlen.apply(q, k, v, cu_seqlens, max_seqlen, dropout_p, 1.0 / math.sqrt(q.shape[-1]))


@dataclass(frozen=True)
class UnpaddedLayout:
    """An unpadded batch's sample boundaries, prepared once per forward for every layer's attention."""

    cu_seqlens: torch.Tensor
    """[B + 1] start of each sample in the token stream, and the end."""
    max_seqlen: int
    """Longest sample (host int: the variable-length kernels need it without a device sync)."""
    kernel: str
    """"varlen", "jagged" or "rows" (``unpadded_attention_kernel``)."""
    rows: AttentionRows | None = None
    """The rows kernel's layout."""
    bias: tuple[torch.Tensor, ...] | None = None
    """The rows kernel's block-diagonal masks (one per row width), in the activations' dtype."""

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, kernel: str, dtype: torch.dtype,
              heads: int = 1) -> UnpaddedLayout:
        """The layout every layer's attention uses (the rows kernel's plan is made here, once per forward)."""
        if kernel == "varlen":  # flash takes int32 offsets
            return cls(cu_seqlens.int(), max_seqlen, kernel)
        if kernel == "jagged":
            # nested tensors take int64 offsets; torch hands the kernels their int32 copy itself
            return cls(cu_seqlens.long(), max_seqlen, kernel)
        # a sync if forced on a GPU
        rows = attention_rows(cu_seqlens.diff().tolist(), heads=heads).to(cu_seqlens.device)
        return cls(cu_seqlens, max_seqlen, kernel, rows, rows.block_bias(dtype))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.fused_qkv = False
        self.fast_dropout = False

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 3d]: query, key and value side by side."""
        if self.fused_qkv:
            # One GEMM of width 3d instead of three of width d; the parameters stay Hugging Face's.
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias3 = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            return F.linear(x, w, bias3)
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[n, h, L, dh] each, ``bias`` additive over the scores (or None) -> [n, h, L, dh]."""
        p = self.dropout_p if self.training else 0.0
        if p > 0 and self.fast_dropout and q.device.type == "cpu":
            scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-1, -2))
            if bias is not None:
                scores = scores + bias
            return torch.matmul(fast_dropout(torch.softmax(scores, dim=-1), p), v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | UnpaddedLayout | None) -> torch.Tensor:
        """Padded: x [B, S, d] and ``attn`` the key mask [B, 1, 1, S] (or None). Unpadded: x [T, d]
        and ``attn`` the batch's layout; each token attends within its own sample."""
        if isinstance(attn, UnpaddedLayout):
            return self._unpadded(x, attn)
        b, s, d = x.shape
        q, k, v = self._qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = None
        if attn is not None:
            # Additive mask in the query dtype (not boolean): a row with no real key then
            # attends uniformly instead of producing NaN, like Hugging Face.
            bias = torch.zeros(attn.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~attn, torch.finfo(q.dtype).min)
        return self._attend(q, k, v, bias).transpose(1, 2).reshape(b, s, d)

    def _unpadded(self, x: torch.Tensor, layout: UnpaddedLayout) -> torch.Tensor:
        t, d = x.shape
        qkv = self._qkv(x)
        p = self.dropout_p if self.training else 0.0
        if layout.kernel == "varlen" and qkv.dtype in (torch.float16, torch.bfloat16):
            q, k, v = (part.contiguous() for part in qkv.view(t, 3, self.num_heads, self.head_dim).unbind(1))
            return flash_varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, p).reshape(t, d)
        if layout.kernel in ("varlen", "jagged"):  # fp32 on CUDA: flash takes half precision only
            # Jagged nested tensors over the stream: on CUDA, SDPA runs flash / memory-efficient
            # attention in their variable-length form (cu_seqlens), dropout included. Contiguous
            # [T, h, dh] buffers are what every backend takes as is (the CPU reference insists);
            # min_seqlen 1 (every sample has its [CLS]) and the host max_seqlen spare torch a
            # device sync to find them.
            q, k, v = (torch.nested.nested_tensor_from_jagged(
                part.contiguous(), layout.cu_seqlens.long(), min_seqlen=1, max_seqlen=layout.max_seqlen,
            ).transpose(1, 2) for part in qkv.view(t, 3, self.num_heads, self.head_dim).unbind(1))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            return out.transpose(1, 2).values().reshape(t, d)
        slots = qkv.index_select(0, layout.rows.index)
        outs, start = [], 0
        for seg, bias in zip(layout.rows.segments, layout.bias):  # one dense call per row width
            n, w = seg.shape
            g = slots[start:start + n * w].view(n, w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            outs.append(self._attend(g[0], g[1], g[2], bias).transpose(1, 2).reshape(n * w, d))
            start += n * w
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, layout.rows.back)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | UnpaddedLayout | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self(x, attn)
        if rows is not None:  # keep only these flat positions from here on (keys and values saw all)
            d = x.shape[-1]
            h, x = h.reshape(-1, d).index_select(0, rows), x.reshape(-1, d).index_select(0, rows)
        return self.output(h, x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | UnpaddedLayout | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, attn, rows)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attn: torch.Tensor | UnpaddedLayout | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: flat positions the last layer computes past attention (all when None)."""
        last = len(self.layer) - 1
        # The recompute check compares the shapes of saved tensors, which nested tensors (the jagged
        # kernel's) cannot always give; the recomputation itself is the same.
        check = "none" if isinstance(attn, UnpaddedLayout) and attn.kernel in ("jagged", "varlen") else "default"
        for i, layer in enumerate(self.layer):
            args = (x, attn) if rows is None or i < last else (x, attn, rows)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False, determinism_check=check)
            else:
                x = layer(*args)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """[B, d] hidden states of the first ([CLS]) position -> [B, d]."""
        return torch.tanh(self.dense(cls_hidden))


def _with_first_positions(rows: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """``rows`` (bool, [B, S] padded or [T] unpadded) with every sample's first ([CLS]) position set."""
    selected = rows.clone()
    if cu_seqlens is None:
        selected[:, 0] = True
    else:
        selected[cu_seqlens[:-1].long()] = True
    return selected


class BertModel(nn.Module):
    """The encoder: embeddings, transformer layers and the [CLS] pooler."""

    def __init__(self, config: BertConfig, vocab_rows: int | None = None):
        super().__init__()
        self.config = config
        self.skip_full_mask = False
        self.unpadded_attention = "auto"
        self.embeddings = BertEmbeddings(config, vocab_rows or config.vocab_size)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_rows: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sequence_output, pooled_output [B, d]) of a padded or an unpadded batch.

        Padded: ``input_ids`` [B, S] with ``attention_mask`` (1 real, 0 padding; None: no padding);
        sequence_output is [B, S, d]. Unpadded (``bertscale.packing``): ``input_ids`` [T], the
        samples' real tokens end to end, ``cu_seqlens`` [B + 1] where each starts, ``max_seqlen``
        the longest (computed from ``cu_seqlens`` when None: a device sync on GPU) and
        ``position_ids`` [T] (restarting at 0 per sample; derived when None); sequence_output is
        [T, d] and attention stays within each sample.

        With ``output_rows`` (bool, the shape of ``input_ids``) the last layer's output projection and
        feed-forward run only on those positions and on each sample's first position (the pooler's),
        and sequence_output is [n, d]: the rows of ``output_rows | first position``, in flat order.
        """
        if cu_seqlens is not None:
            x, attn = self._unpadded_input(input_ids, token_type_ids, attention_mask, position_ids, cu_seqlens,
                                           max_seqlen)
            first = cu_seqlens[:-1].long()
        else:
            x, attn = self._padded_input(input_ids, token_type_ids, attention_mask)
            first = None
        if output_rows is None:
            h = self.encoder(x, attn)
            return h, self.pooler(h[:, 0] if first is None else h.index_select(0, first))
        selected = _with_first_positions(output_rows, cu_seqlens)
        h = self.encoder(x, attn, selected.flatten().nonzero().squeeze(1))
        if first is None:
            counts = selected.sum(dim=1)
            return h, self.pooler(h.index_select(0, counts.cumsum(0) - counts))
        return h, self.pooler(h.index_select(0, (selected.cumsum(0) - 1).index_select(0, first)))

    def _check_length(self, seq_len: int) -> None:
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; shorten the sequences or build the model with a "
                f"larger max_position_embeddings"
            )

    def _padded_input(self, input_ids, token_type_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)} (an unpadded "
                             f"batch of shape [tokens] needs cu_seqlens)")
        self._check_length(input_ids.shape[1])
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is not None and self.skip_full_mask and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: let SDPA run without a mask
        # [B,1,1,S]: broadcast over heads and query positions, never materialised per head.
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return self.embeddings(input_ids, token_type_ids), keep

    def _unpadded_input(self, input_ids, token_type_ids, attention_mask, position_ids, cu_seqlens,
                        max_seqlen) -> tuple[torch.Tensor, UnpaddedLayout]:
        if input_ids.dim() != 1 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
            raise ValueError(f"an unpadded batch has input_ids [tokens] and cu_seqlens [samples + 1], got shapes "
                             f"{list(input_ids.shape)} and {list(cu_seqlens.shape)}; build it with "
                             f"bertscale.packing.unpadded_batch")
        if attention_mask is not None:
            raise ValueError("an unpadded batch (cu_seqlens) has no padding: pass attention_mask=None")
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())
        self._check_length(int(max_seqlen))
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            lengths = cu_seqlens.diff().long()
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=input_ids.numel())
            position_ids = torch.arange(input_ids.numel(), device=input_ids.device) - starts
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        kernel = unpadded_attention_kernel(self.unpadded_attention, x.device.type)
        return x, UnpaddedLayout.build(cu_seqlens, int(max_seqlen), kernel, x.dtype,
                                       heads=self.config.num_attention_heads)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, vocab_rows: int):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(vocab_rows))
        self.decoder = nn.Linear(config.hidden_size, vocab_rows)
        self.decoder.bias = self.bias  # one parameter under two names, as in Hugging Face

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.transform(x))
        # Padded vocabulary rows are not tokens: drop their logits so the softmax is the plain one.
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, vocab_rows: int):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, vocab_rows)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM and next-sentence heads; the MLM decoder is tied to the word embeddings.

    ``perf`` chooses how it runs (see ``PerfOptions``); the default is the fast CPU path with
    Hugging Face shapes. Only ``pad_vocab_multiple`` changes a shape (vocabulary rows), and
    ``bertscale.hf_format`` strips or adds those rows on the way out and in.
    """

    def __init__(self, config: BertConfig, perf: PerfOptions | None = None):
        super().__init__()
        self.config = config
        perf = perf or PerfOptions()
        vocab_rows = padded_vocab_size(config.vocab_size, perf.pad_vocab_multiple)
        self.bert = BertModel(config, vocab_rows)
        self.cls = BertPreTrainingHeads(config, vocab_rows)
        self.apply(self._init_weights)
        self.tie_weights()
        if vocab_rows > config.vocab_size:
            with torch.no_grad():  # padded rows stay zero: no input uses them and their logits are dropped
                self.bert.embeddings.word_embeddings.weight[config.vocab_size:].zero_()
        self.perf = PerfOptions()
        self.set_perf_options(perf)

    def set_perf_options(self, perf: PerfOptions) -> None:
        """Switch the runtime levers (all but the vocabulary padding, fixed at construction)."""
        rows = self.bert.embeddings.word_embeddings.num_embeddings
        if padded_vocab_size(self.config.vocab_size, perf.pad_vocab_multiple) != rows:
            raise ValueError(f"this model has {rows} vocabulary rows; pad_vocab_multiple "
                             f"{perf.pad_vocab_multiple} is fixed when the model is built")
        for module in self.modules():
            if isinstance(module, Dropout):
                module.fast = perf.fast_dropout
            elif isinstance(module, BertSelfAttention):
                module.fused_qkv, module.fast_dropout = perf.fused_qkv, perf.fast_dropout
        self.bert.skip_full_mask = perf.skip_full_mask
        self.bert.unpadded_attention = perf.unpadded_attention
        self.set_gradient_checkpointing(perf.gradient_checkpointing)
        if perf.compile != self.perf.compile:
            for layer in self.bert.encoder.layer:
                if perf.compile:
                    layer.compile(dynamic=False)
                else:
                    layer._compiled_call_impl = None  # what nn.Module.compile set
        self.perf = perf

    def tie_weights(self) -> None:
        """Make the MLM decoder use the word embedding matrix (the same Parameter object)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is self.cls.predictions.decoder:
            return  # its weight is the word embedding, its bias the head bias; both initialised elsewhere
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward to trade compute for memory."""
        self.bert.encoder.gradient_checkpointing = enabled

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> PretrainingOutput:
        """Run BERT; with ``labels`` the MLM head runs only on masked positions (labels != -100).

        A padded batch: ``input_ids`` [B, S] and ``attention_mask`` 1 for real tokens and 0 for
        padding (None when nothing is padded, so SDPA may pick its mask-free kernel). An unpadded
        batch (``bertscale.packing.unpadded_batch``, passed as ``**batch``): ``input_ids``, ``labels``,
        ``token_type_ids``, ``position_ids`` [T], ``cu_seqlens``, ``max_seqlen``; the losses are the
        same function of the same samples (``BertModel.forward``).
        """
        unpadded = dict(position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        prediction_logits = mlm_loss = mlm_correct = mlm_count = None
        if labels is None:
            seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, **unpadded)
            prediction_logits = self.cls.predictions(seq)
        else:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {list(labels.shape)} must equal input_ids shape {list(input_ids.shape)}")
            masked = labels != IGNORE_INDEX
            if self.perf.sparse_last_layer:
                # Only masked positions and [CLS] feed the heads, so the last layer stops there too.
                seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, output_rows=masked, **unpadded)
                head_in = seq[masked[_with_first_positions(masked, cu_seqlens)]]
            else:
                seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, **unpadded)
                head_in = seq[masked]
            # Gather before the transform: the head's cost scales with ~15% of positions, not all.
            targets = labels[masked]
            mlm_count = masked.sum()
            logits = self.cls.predictions(head_in)
            if self.perf.fused_mlm_loss:
                mlm_sum, mlm_correct = masked_lm_loss(logits, targets)
            else:
                logits = logits.float()
                mlm_sum = F.cross_entropy(logits, targets, reduction="sum")
                mlm_correct = (logits.argmax(dim=-1) == targets).sum()
            mlm_loss = mlm_sum / mlm_count.clamp(min=1)

        nsp_logits = self.cls.seq_relationship(pooled)
        nsp_loss = nsp_correct = nsp_count = None
        if next_sentence_label is not None:
            nsp_targets = next_sentence_label.view(-1)
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_targets)
            nsp_correct = (nsp_logits.argmax(dim=-1) == nsp_targets).sum()
            nsp_count = torch.tensor(nsp_targets.numel(), device=nsp_targets.device)
        elif labels is not None:
            nsp_loss = torch.zeros((), device=seq.device)
            nsp_correct = torch.zeros((), dtype=torch.long, device=seq.device)
            nsp_count = torch.zeros((), dtype=torch.long, device=seq.device)

        loss = None if mlm_loss is None else mlm_loss + nsp_loss
        return PretrainingOutput(
            loss=loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
            mlm_correct=mlm_correct, mlm_count=mlm_count,
            nsp_correct=nsp_correct, nsp_count=nsp_count,
            prediction_logits=prediction_logits, seq_relationship_logits=nsp_logits,
        )


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Count distinct parameters (a tied weight once); optionally without the embedding tables."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    # parameters() yields a shared Parameter only once, so the tied decoder is not double-counted.
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
