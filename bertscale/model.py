"""BERT for pretraining (MLM + NSP), in one file.

Module and parameter names match Hugging Face's ``BertForPreTraining`` so that
conversion to and from ``transformers`` is a key-for-key copy. This file knows
nothing of data, tokenizers or distribution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bertscale.masking import IGNORE_INDEX  # the label of positions that are not MLM targets (data side owns it)

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

    def __post_init__(self) -> None:
        if not isinstance(self.pad_vocab_multiple, int) or self.pad_vocab_multiple < 1:
            raise ValueError(f"pad_vocab_multiple must be a positive integer (1: no padding, 64 for tensor "
                             f"cores), got {self.pad_vocab_multiple!r}")

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
            changes[key] = int(value) if kinds[key] == "int" else value.lower() in ("1", "true", "yes", "on")
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
    """[B, S, V] MLM logits over all positions; only when labels is None."""
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

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        position_ids = torch.arange(seq_len, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        if self.fused_qkv:
            # One GEMM of width 3d instead of three of width d; the parameters stay Hugging Face's.
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias3 = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            q, k, v = F.linear(x, w, bias3).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                       for proj in (self.query, self.key, self.value))
        bias = None
        if keep is not None:
            # Additive mask in the query dtype (not boolean): a row with no real key then
            # attends uniformly instead of producing NaN, like Hugging Face.
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~keep, torch.finfo(q.dtype).min)
        p = self.dropout_p if self.training else 0.0
        if p > 0 and self.fast_dropout and x.device.type == "cpu":
            scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-1, -2))
            if bias is not None:
                scores = scores + bias
            out = torch.matmul(fast_dropout(torch.softmax(scores, dim=-1), p), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return out.transpose(1, 2).reshape(b, s, d)


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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self(x, keep)
        if rows is not None:  # keep only these flat positions from here on (keys and values saw all)
            h, x = h.flatten(0, 1).index_select(0, rows), x.flatten(0, 1).index_select(0, rows)
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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, keep, rows)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: flat positions the last layer computes past attention (all when None)."""
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            args = (x, keep) if rows is None or i < last else (x, keep, rows)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
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


class BertModel(nn.Module):
    """The encoder: embeddings, transformer layers and the [CLS] pooler."""

    def __init__(self, config: BertConfig, vocab_rows: int | None = None):
        super().__init__()
        self.config = config
        self.skip_full_mask = False
        self.embeddings = BertEmbeddings(config, vocab_rows or config.vocab_size)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sequence_output [B,S,d], pooled_output [B,d]).

        With ``output_rows`` (bool [B,S]) the last layer's output projection and feed-forward run only
        on those positions and on each first position (the pooler's), and sequence_output is
        [n, d]: the rows of ``output_rows | first position``, in row-major order.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; shorten the sequences or build the model with a "
                f"larger max_position_embeddings"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is not None and self.skip_full_mask and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: let SDPA run without a mask
        # [B,1,1,S]: broadcast over heads and query positions, never materialised per head.
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        if output_rows is None:
            h = self.encoder(x, keep)
            return h, self.pooler(h[:, 0])
        selected = output_rows.clone()
        selected[:, 0] = True
        h = self.encoder(x, keep, selected.flatten().nonzero().squeeze(1))
        counts = selected.sum(dim=1)
        return h, self.pooler(h.index_select(0, counts.cumsum(0) - counts))


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
    ) -> PretrainingOutput:
        """Run BERT; with ``labels`` the MLM head runs only on masked positions (labels != -100).

        ``attention_mask`` is 1 for real tokens and 0 for padding; pass None for unpadded
        batches so SDPA may pick its mask-free (flash) kernel on GPU.
        """
        prediction_logits = mlm_loss = mlm_correct = mlm_count = None
        if labels is None:
            seq, pooled = self.bert(input_ids, token_type_ids, attention_mask)
            prediction_logits = self.cls.predictions(seq)
        else:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {list(labels.shape)} must equal input_ids shape {list(input_ids.shape)}")
            masked = labels != IGNORE_INDEX
            if self.perf.sparse_last_layer:
                # Only masked positions and [CLS] feed the heads, so the last layer stops there too.
                seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, output_rows=masked)
                selected = masked.clone()
                selected[:, 0] = True
                head_in = seq[masked[selected]]
            else:
                seq, pooled = self.bert(input_ids, token_type_ids, attention_mask)
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
