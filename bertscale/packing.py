"""Unpadded micro batches: the real tokens of a fixed number of samples, end to end, with their boundaries
(and ``pad_rows``, the one way the padded paths lay rows of ids side by side).

Batches padded to their longest sample spend most of their compute on padding: on the demo's
shards the mean sample fills 44 % of a 128 row and 12 % of a 512 row (49 % and 34 % of a batch of
32 / 16 padded to its longest). An *unpadded* batch holds only the real tokens of its samples, one
after another (``[T]`` instead of ``[B, S]``), and ``cu_seqlens``, where each sample starts.
``bertscale.model`` runs every token-wise layer (embeddings, the Q/K/V and output projections, the
feed-forward, LayerNorms, dropout, the heads) on those T tokens, and attention within each sample:

* **CUDA:** flash attention's variable-length kernel on the token stream and ``cu_seqlens``
  (``model.flash_varlen_attention``: aten's flash forward/backward in a small autograd Function,
  attention dropout included), so nothing is computed for padding. (``torch.nn.attention.varlen``
  has no dropout; FlexAttention needs ``torch.compile``; SDPA on jagged nested tensors reaches the
  same flash kernel but, measured on an H200, spends ~5 ms of host time per layer in nested-tensor
  dispatch, which made a BERT-large step slower than the padded one.) Measured on one H200
  (``tools/gpu_check.sh``: BERT-large, bf16, the demo's shards with a 30522 vocabulary, batch 256 at
  128 and 128 at 512): unpadded / padded real tokens per second 1.61x at 128 and 5.19x at 512;
  MFU of the samples' model FLOPs 27.6 % and 19.5 % (padded: 17.1 % and 3.8 %).
* **CPU:** the samples are laid into rows by first-fit decreasing (``model.attention_rows``) and
  each row runs one dense attention with a block-diagonal mask. A row costs its width squared
  whatever it holds, so rows come in up to three widths: the longest sample's, and narrower ones
  for the short samples where that saves more than one more kernel call costs.

Why unpadding, not packing whole rows (MLPerf's BERT: several samples per 512 row,
block-diagonal attention, positions restarting per sample). With the number of samples per micro
batch fixed, a packer's row count varies from batch to batch and rounds up, so its rows are 94 %
full at 128 but 80 – 86 % at 512, and every layer computes the empty slots; the unpadded stream
computes exactly the real tokens (fill 1.0) whatever the batch. Rows only pay where a kernel needs
them; on CPU that is attention, so the model packs rows for attention alone, as wide as the
batch's longest sample rather than the phase's length (92 – 94 % full at both lengths).

Measured on the 2-core development CPU (fp32, one thread, CPU seconds so that other jobs on the
machine do not skew the ratios; a training step = forward, backward, AdamW; the demo's shards and
micro batches, epoch-0 masks, dropout on; real tokens per CPU second relative to the padded path,
same run, steps alternating; wall-clock figures with two threads are in tools/README.md):

======  ====  =====  ===========  =================  ==================  ================
preset  seq   batch  padded fill  unpadded, rows     unpadded, jagged    packed rows of
                                  (CPU default)      (NJT, CPU math)     seq: fill
======  ====  =====  ===========  =================  ==================  ================
tiny    128   32     0.491        1.63x              1.03x               0.936
tiny    512   16     0.345        2.18x              1.15x               0.795
mini    128   32     0.496        1.76x              1.29x               0.941
mini    512   16     0.335        3.13x              1.66x               0.837
base    128   32     0.478        2.13x              1.81x               0.941
base    512   16     0.320        3.79x              2.61x               0.860
======  ====  =====  ===========  =================  ==================  ================

Attention alone (forward + backward per real token, against attention padded to the longest
sample) pointed the same way: dense block-diagonal rows were 1.8 – 2.4x at 128, a Python loop of
one SDPA call per sample 0.8 – 1.2x there (2.1 – 2.7x at 512, where a row of width 512 was only
1.0 – 1.7x: hence rows as wide as the longest sample), jagged tensors 0.2 – 0.3x (torch's CPU path
for them converts to a strided nested tensor and runs its reference kernel). Rows of several widths
(a power of two per sample) measured no faster than one width in a whole step: every width is one
more call per layer. Choosing the widths by cost instead (``attention_rows``: at most three, a new
one only where it saves more than a call's fixed cost, ~0.27 ms on this CPU) does pay at 512, where
one long sample made every row wide: on the demo's shards the rows computed 2.32x the score slots
the samples need, now 1.20x, and the tiny step's speed-up over padded rose from 3.1x to 3.6 – 3.8x
(30 batches, CPU clock; the FLOPs predict 4.04x, and the optimizer step, the same in both layouts,
is the rest), mini's from 4.4x to 5.1x (12 batches; FLOPs 4.77x); at 128 (1.80x → 1.27x the
slots) the step is as fast as before.

What bounds the ratio: the masked-only MLM head and the optimizer step cost the same in both
layouts, so the speed-up stays below the ratio of computed tokens; ``tools/bench_step.py --data``
prints the ratio the model FLOPs predict beside the measured one.

The trainer takes unpadded micro batches by default (``train.unpadded``; the loader assembles them
from the same masked samples as the padded ones), so a resumed run is as exact as before.

The batch (what ``unpadded_batch`` returns, all int64 unless said):

* ``input_ids``, ``labels``, ``token_type_ids``, ``position_ids``: ``[T]``, the samples' tokens in
  the given order; positions restart at 0 in every sample and the token type is 0 for the first
  ``a_len`` tokens ([CLS] A [SEP]), then 1.
* ``cu_seqlens``: ``[B + 1]`` int32, sample i is tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``; its
  first token is its [CLS], which the pooler and the NSP head read.
* ``max_seqlen``: a Python int, the longest sample, so that no kernel has to ask the device for it.
* ``next_sentence_label``: ``[B]``; ``sample_ids``: ``[B]`` when asked for.

``BertForPreTraining(**batch)`` takes it as it is (without ``sample_ids``). B is the number of
samples given, so a global batch stays a number of samples and the LAMB recipe and the
learning-rate schedule keep their meaning. Everything here is a pure, deterministic function of
its input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bertscale.masking import IGNORE_INDEX

UNPADDED_KEYS = ("input_ids", "labels", "token_type_ids", "position_ids", "cu_seqlens", "max_seqlen",
                 "next_sentence_label")
"""What ``unpadded_batch`` returns (plus ``sample_ids`` on request): the model's keyword arguments."""
PADDED_KEYS = ("input_ids", "labels", "token_type_ids", "attention_mask", "next_sentence_label")
"""The model's keyword arguments in a padded batch (``loader.collate``)."""


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], fill: int, width: int | None = None) -> np.ndarray:
    """Rows of ids side by side: an int64 ``[len(rows), width]`` array (``width``: the longest row's by default),
    each row padded on the right with ``fill`` (the pad id, or ``IGNORE_INDEX`` for labels)."""
    width = max(len(r) for r in rows) if width is None else width
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def attention_mask(lengths: Sequence[int] | np.ndarray, width: int) -> np.ndarray:
    """1 on each row's first ``lengths[i]`` positions, 0 on its padding: int64 ``[len(lengths), width]``."""
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def model_inputs(batch: Mapping[str, torch.Tensor | int]) -> dict[str, torch.Tensor | int]:
    """``BertForPreTraining``'s keyword arguments from a padded or unpadded batch (``sample_ids`` and
    other bookkeeping left out): ``model(**model_inputs(batch))`` whatever the layout."""
    keys = UNPADDED_KEYS if "cu_seqlens" in batch else PADDED_KEYS
    return {k: batch[k] for k in keys if k in batch}


def batch_to(batch: Mapping[str, torch.Tensor | int], device: torch.device | str,
             non_blocking: bool = False) -> dict[str, torch.Tensor | int]:
    """The batch's tensors on ``device``; ``max_seqlen`` stays a host int (the kernels read it there)."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def unpadded_batch(samples: Sequence[Mapping], with_sample_ids: bool = False) -> dict[str, torch.Tensor | int]:
    """The unpadded batch of masked samples, in the order given (see the module docstring).

    Each sample has ``input_ids`` and ``labels`` (int64 arrays of one length), ``a_len`` (tokens
    of segment A: [CLS] A [SEP]), ``nsp_label`` and ``sample_id``, as ``loader.collate`` takes them.
    """
    if not samples:
        raise ValueError("unpadded_batch needs at least one sample")
    lengths = np.empty(len(samples), dtype=np.int64)
    for i, s in enumerate(samples):
        n, n_labels, a_len = len(s["input_ids"]), len(s["labels"]), int(s["a_len"])
        if n == 0 or n_labels != n:
            raise ValueError(f"sample {s.get('sample_id', i)!r} (position {i}): {n} input ids and {n_labels} "
                             f"labels; a sample needs at least its [CLS] and one label per token")
        if not 0 < a_len <= n:
            raise ValueError(f"sample {s.get('sample_id', i)!r} (position {i}): a_len {a_len} outside 1..{n}")
        lengths[i] = n
    cu = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    starts = np.repeat(cu[:-1], lengths)
    position = np.arange(cu[-1], dtype=np.int64) - starts
    a_lens = np.array([int(s["a_len"]) for s in samples], dtype=np.int64)
    token_type = (position >= np.repeat(a_lens, lengths)).astype(np.int64)
    batch: dict[str, torch.Tensor | int] = {
        "input_ids": torch.from_numpy(np.concatenate([np.asarray(s["input_ids"], dtype=np.int64) for s in samples])),
        "labels": torch.from_numpy(np.concatenate([np.asarray(s["labels"], dtype=np.int64) for s in samples])),
        "token_type_ids": torch.from_numpy(token_type),
        "position_ids": torch.from_numpy(position),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(lengths.max()),
        "next_sentence_label": torch.tensor([int(s["nsp_label"]) for s in samples], dtype=torch.long),
    }
    if with_sample_ids:
        batch["sample_ids"] = torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.long)
    return batch


def samples_from_padded(batch: Mapping[str, torch.Tensor]) -> list[dict]:
    """The masked samples of a padded batch (``loader.collate`` / ``loader.eval_batches``), row by row.

    A row's length is its ``attention_mask`` sum and its ``a_len`` the number of its real tokens of
    token type 0; ``sample_id`` is ``sample_ids`` when the batch has them, else the row number.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    a_lens = ((batch["token_type_ids"] == 0) & mask).sum(dim=1).tolist()
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    nsp = batch["next_sentence_label"].view(-1).tolist()
    sample_ids = batch["sample_ids"].tolist() if "sample_ids" in batch else list(range(len(lengths)))
    return [{"input_ids": ids[r, :n], "labels": labels[r, :n], "a_len": a, "nsp_label": y, "sample_id": sid}
            for r, (n, a, y, sid) in enumerate(zip(lengths, a_lens, nsp, sample_ids))]


def unpad(batch: Mapping[str, torch.Tensor], with_sample_ids: bool = False) -> dict[str, torch.Tensor | int]:
    """The unpadded batch of the same samples as a padded one."""
    return unpadded_batch(samples_from_padded(batch), with_sample_ids)


def real_tokens(batch: Mapping[str, torch.Tensor | int]) -> int:
    """Non-padding tokens of a padded or unpadded batch."""
    if "cu_seqlens" in batch:
        return int(batch["input_ids"].numel())
    return int(batch["attention_mask"].sum())


def token_counts(batch: Mapping[str, torch.Tensor | int]) -> tuple[int, int, int, int]:
    """(samples, real tokens, computed tokens, sum of squared attention spans) of a batch on the host,
    read before it goes to the device, so that counting never waits for the device."""
    if "cu_seqlens" in batch:
        lengths = batch["cu_seqlens"].diff().long()
        real = int(batch["input_ids"].numel())
        return len(batch["next_sentence_label"]), real, real, int(lengths.square().sum())
    rows, width = batch["input_ids"].shape
    return rows, int(batch["attention_mask"].sum()), rows * width, rows * width ** 2


def computed_tokens(batch: Mapping[str, torch.Tensor | int]) -> int:
    """Token positions the encoder's token-wise layers compute for a padded or unpadded batch."""
    return int(batch["input_ids"].numel())


def masked_positions(batch: Mapping[str, torch.Tensor | int]) -> int:
    """MLM targets in a batch (either layout)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
