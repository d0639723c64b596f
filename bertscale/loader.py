"""Streaming pretraining batches from WebDataset shards, masked on the fly.

Every epoch is planned up front from the manifest's sample counts, identically on every rank and
at every world size:

* the shards are permuted from (seed, epoch) and concatenated into one virtual sample stream;
* the stream is cut into ``lanes`` = global batch / micro batch contiguous slices, each split into
  the same number of micro batches (``drop_last``: the tail of fewer than lanes x micro_batch
  samples waits for another epoch, whose shard order differs); whatever the shard sizes, no
  sample is read twice. Global step i of the epoch is batch i of every lane, so which samples make
  a global batch does not depend on the number of ranks;
* rank r of W holds the A = lanes / W lanes r*A .. r*A+A-1 (A is the gradient accumulation): its
  micro batch k is batch k // A of its lane k mod A;
* a lane's batch i comes from (logical) worker i mod W_k, which reads its own contiguous slice of
  the lane; each worker shuffles inside blocks of ``shuffle_buffer`` samples, seeded by the block's
  index.

So a position is just "global steps taken in this epoch", the same number on any world size: a
resumed loader (on the same or another number of ranks) works out every lane worker's shard and
sample offset, skips whole shards by their manifest counts, skips only the partial shard's leading
samples, and re-reads at most one shuffle block. No WebDataset pipeline stage
(node splitter, shard shuffle, ``with_epoch``, resampling) is involved, so none of their traps
apply.

Shards come from a local directory or a URL prefix (``storage.py``: http(s), gs, s3, ``pipe:``),
read whole by ``shard_format.read_shard``, which checks the bytes against the manifest's size and
CRC-32 and every sample's fields, so a damaged shard is known before any of its samples is used.
A remote shard resumed mid-way is downloaded whole again and its leading samples skipped (no byte
ranges). A shard that cannot be read (after bounded retries, for remote ones) or fails a check is
skipped: its place in the epoch is filled from the next readable shards, it is counted, and the log
names it once.

With workers (``num_workers`` > 0), torch's DataLoader runs the lane workers in processes; each batch
crosses to the rank as one shared-memory buffer (``OneBuffer``) and is unpacked into the same dict
of tensors the in-process loader gives.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bertscale.masking import IGNORE_INDEX, Masker
from bertscale.packing import attention_mask, pad_rows, unpadded_batch
from bertscale.shard_format import CorruptShardError, SampleRules, ShardIndex, load_manifest, read_shard, shard_paths
from bertscale.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)

STATE_VERSION = 3


# --- batches ---------------------------------------------------------------------------------


def collate(
    items: list[dict],
    pad_id: int,
    pad_to_multiple: int = 8,
    max_len: int | None = None,
    with_sample_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad masked samples into a batch of long tensors.

    Each item has ``input_ids`` and ``labels`` (int64 arrays), ``a_len``, ``nsp_label`` and
    ``sample_id``. The length is the longest item rounded up to pad_to_multiple, at most max_len.
    """
    length = _padded_length(max(len(it["input_ids"]) for it in items), pad_to_multiple, max_len)
    input_ids = pad_rows([it["input_ids"] for it in items], pad_id, length)
    labels = pad_rows([it["labels"] for it in items], IGNORE_INDEX, length)
    lengths = np.array([len(it["input_ids"]) for it in items])
    return _tensors(input_ids, labels, lengths, np.array([it["a_len"] for it in items]),
                    [it["nsp_label"] for it in items], [it["sample_id"] for it in items], with_sample_ids)


def _padded_length(longest: int, pad_to_multiple: int, max_len: int | None) -> int:
    length = -(-longest // pad_to_multiple) * pad_to_multiple if pad_to_multiple > 1 else longest
    if max_len is not None:
        length = max(min(length, max_len), longest)
    return length


def _tensors(input_ids, labels, lengths, a_lens, nsp, sample_ids, with_sample_ids) -> dict[str, torch.Tensor]:
    attention = attention_mask(lengths, input_ids.shape[1])
    token_type = attention - attention_mask(a_lens, input_ids.shape[1])  # 1 from segment B's start to the end
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "next_sentence_label": torch.tensor(nsp, dtype=torch.long),
    }
    if with_sample_ids:
        batch["sample_ids"] = torch.tensor(sample_ids, dtype=torch.long)
    return batch


class _Masking:
    """Turns samples into a masked batch for one epoch, padded or unpadded (``bertscale.packing``);
    picklable, for worker processes. Masking is the same function of (seed, epoch, sample id) in both."""

    def __init__(self, seed: int, epoch: int, tok: TokenizerInfo, mask_prob: float, max_predictions: int | None,
                 whole_word: bool, max_len: int, with_sample_ids: bool, unpadded: bool = False):
        self.epoch, self.pad_id, self.max_len, self.with_sample_ids = epoch, tok.pad_id, max_len, with_sample_ids
        self.unpadded = unpadded
        self.masker = Masker(tok, seed=seed, epoch=epoch, mask_prob=mask_prob, max_predictions=max_predictions,
                             whole_word=whole_word)

    def batch(self, samples: list[tuple[int, np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
        if self.unpadded:
            masked = []
            for sid, ids, a_len, nsp in samples:
                inputs, labels = self.masker(ids, sid)
                masked.append({"input_ids": inputs, "labels": labels, "a_len": a_len, "nsp_label": nsp,
                               "sample_id": sid})
            return unpadded_batch(masked, with_sample_ids=self.with_sample_ids)
        lengths = np.array([len(s[1]) for s in samples])
        width = _padded_length(int(lengths.max()), 8, self.max_len)
        masked = [self.masker(ids, sid) for sid, ids, _, _ in samples]
        inputs = pad_rows([m[0] for m in masked], self.pad_id, width)
        labels = pad_rows([m[1] for m in masked], IGNORE_INDEX, width)
        return _tensors(inputs, labels, lengths, np.array([s[2] for s in samples]), [s[3] for s in samples],
                        [s[0] for s in samples], self.with_sample_ids)


# --- the epoch plan ---------------------------------------------------------------------------


def epoch_order(num_shards: int, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation, from (seed, epoch) only: identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


@dataclass
class WorkerPlan:
    start: int
    """First position of this worker's slice in the epoch's sample stream."""
    batch_sizes: list[int]


def plan_rank(total: int, *, rank: int, world_size: int, workers: int, micro_batch: int,
              drop_last: bool) -> list[WorkerPlan]:
    """Split an epoch of ``total`` samples into ``world_size`` slices (the loader's lanes): slice
    ``rank``'s logical workers, each a contiguous part of it.

    Every slice gets the same number of batches. With drop_last every batch has micro_batch rows
    and fewer than world_size x micro_batch samples are left for later epochs; without it every
    sample is used once and batch sizes differ by at most one.
    """
    if drop_last:
        batches = total // (world_size * micro_batch)
        sizes = [micro_batch] * batches
        rank_start = rank * batches * micro_batch
    else:
        batches = -(-total // (world_size * micro_batch))
        per_rank = total // world_size + (rank < total % world_size)
        rank_start = rank * (total // world_size) + min(rank, total % world_size)
        sizes = [per_rank // batches + (j < per_rank % batches) for j in range(batches)] if batches else []
    if batches == 0 or min(sizes) == 0:
        raise ValueError(
            f"an epoch of {total} samples cannot give each of {world_size} rank(s) a batch of {micro_batch}; "
            "use a smaller micro batch, fewer ranks or more data"
        )
    plans, start = [], rank_start
    for w in range(workers):
        mine = sizes[w::workers]
        plans.append(WorkerPlan(start=start, batch_sizes=mine))
        start += sum(mine)
    return plans


@dataclass
class _Epoch:
    """One rank's plan for one epoch (its lanes), shipped to the dataloader workers."""

    urls: list[str]
    entries: list[dict]
    """The shards' manifest entries (sample count, bytes, CRC-32), as urls."""
    order: list[int]
    lanes: list[int]
    """The global lane numbers this rank holds, in its accumulation order."""
    plans: list[list[WorkerPlan]]
    """Per lane of this rank: its logical workers' slices."""
    rules: SampleRules
    masking: _Masking
    seed: int
    shuffle_buffer: int
    strict: bool

    @property
    def shard_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([self.entries[j]["samples"] for j in self.order])])

    @property
    def lane_batches(self) -> int:
        """Batches of every lane in this epoch (global steps, when lanes x micro batch is the global batch)."""
        return sum(len(p.batch_sizes) for p in self.plans[0])

    def batch_source(self, k: int) -> tuple[int, int, int]:
        """(lane index on this rank, lane batch, logical worker) of this rank's micro batch ``k``."""
        a = len(self.lanes)
        return k % a, k // a, (k // a) % len(self.plans[0])

    def worker_done(self, lane: int, worker: int, rank_batches_done: int) -> int:
        """Batches a lane worker has delivered once this rank has taken ``rank_batches_done``."""
        lane_done = len(range(lane, rank_batches_done, len(self.lanes)))
        return len(range(worker, lane_done, len(self.plans[0])))

    def position(self, lane: int, worker: int, batches_done: int) -> dict:
        """Where a lane worker stands after ``batches_done`` of its batches: shard and sample offset."""
        plan = self.plans[lane][worker]
        consumed = sum(plan.batch_sizes[:batches_done])
        pos = plan.start + consumed
        starts = self.shard_starts
        k = min(int(np.searchsorted(starts, pos, side="right")) - 1, len(self.order) - 1)
        return {"lane": self.lanes[lane], "worker": worker, "batches": batches_done, "samples": consumed,
                "shard": self.entries[self.order[k]]["name"].rsplit("/", 1)[-1], "shard_offset": int(pos - starts[k])}


def _read_or_report(url: str, rules: SampleRules, entry: dict, strict: bool,
                    events: list[tuple[str, str]]) -> ShardIndex | None:
    """A checked shard, or None with (url, reason) appended to events; strict raises instead."""
    try:
        return read_shard(url, rules, entry)
    except CorruptShardError as e:
        if strict:
            raise CorruptShardError(f"{e} (strict mode; set data.strict_shards = false to skip damaged "
                                    "shards with a warning)") from None
        events.append((url, str(e)))
        return None


class _WorkerStream:
    """The samples and batches of one logical worker of one lane; corrupt shards are reported, not fatal."""

    def __init__(self, ep: _Epoch, lane: int, worker: int):
        self.ep, self.lane, self.worker = ep, lane, worker
        self.events: list[tuple[str, str]] = []
        self._bad: set[int] = set()  # shards of this epoch already found damaged: not read (downloaded) again

    def _shard(self, k: int) -> ShardIndex | None:
        """The k-th shard of the epoch, checked whole; None when it is unreadable or damaged."""
        j = self.ep.order[k]
        if j in self._bad:
            return None
        shard = _read_or_report(self.ep.urls[j], self.ep.rules, self.ep.entries[j], self.ep.strict, self.events)
        if shard is None:
            self._bad.add(j)
        return shard

    @staticmethod
    def _sample(shard: ShardIndex, i: int) -> tuple[int, np.ndarray, int, int]:
        return shard.sample(i)

    def _slice(self, k: int, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """Samples lo..hi-1 of the k-th shard of the epoch; a damaged shard's come from the filler."""
        shard = self._shard(k)
        if shard is not None:
            for i in range(lo, hi):
                yield self._sample(shard, i)
        else:
            yield from self._filler(k, lo, hi - lo)

    def _filler(self, k: int, offset: int, count: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """Stand-ins for a damaged shard's samples: the next readable shards of the epoch, cycling.

        They are repeats, but they keep every rank's batch count equal (no rank waits forever).
        Which shards are damaged depends on the files only, so a resumed run fills identically.
        """
        n = len(self.ep.order)
        position = 0
        while True:
            readable = False
            for q in ((k + step) % n for step in range(1, n)):
                shard = self._shard(q)
                if shard is None:
                    continue
                readable = True
                for i in range(max(0, offset - position), min(len(shard), offset + count - position)):
                    yield self._sample(shard, i)
                position += len(shard)
                if position >= offset + count:
                    return
            if not readable:
                raise RuntimeError(f"no readable shard is left to stand in for {self.ep.urls[self.ep.order[k]]}; "
                                   "rebuild the shards")

    def _samples(self, begin: int, end: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """Stream positions begin..end-1, skipping whole shards by their manifest counts."""
        starts = self.ep.shard_starts
        k = int(np.searchsorted(starts, begin, side="right")) - 1
        pos = begin
        while pos < end:
            lo = pos - int(starts[k])
            hi = min(int(starts[k + 1]), end) - int(starts[k])
            yield from self._slice(k, lo, hi)
            pos = int(starts[k]) + hi
            k += 1

    def batches(self, skip_batches: int) -> Iterator[dict]:
        ep, plan = self.ep, self.ep.plans[self.lane][self.worker]
        sizes = plan.batch_sizes
        length = sum(sizes)
        done = sum(sizes[:skip_batches])
        block = max(1, ep.shuffle_buffer)
        first_block = done // block
        source = self._samples(plan.start + first_block * block, plan.start + length)
        pending: list = []
        todo = iter(sizes[skip_batches:])
        want = next(todo, None)
        for b in range(first_block, -(-length // block)):
            items = [next(source) for _ in range(min(block, length - b * block))]
            if block > 1:
                rng = np.random.default_rng([ep.seed, ep.masking.epoch, ep.lanes[self.lane], self.worker, b])
                items = [items[i] for i in rng.permutation(len(items))]
            if b == first_block:
                items = items[done - b * block :]
            pending.extend(items)
            while want is not None and len(pending) >= want:
                batch = ep.masking.batch(pending[:want])
                del pending[:want]
                if self.events:
                    batch["_corrupt"] = self.events
                    self.events = []
                yield batch
                want = next(todo, None)
        assert want is None and not pending, "epoch plan and stream disagree"


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM (or a terminal's SIGINT) reaches every process of the job: the rank decides
    when to stop and save; a worker killed by it would crash the rank instead. Workers end with their
    rank (torch's worker watchdog), when their iterator is dropped, or at exit (``_stop_live_workers``)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_LIVE_WORKER_ITERATORS: weakref.WeakSet = weakref.WeakSet()
"""The DataLoader iterators (with worker processes) this process has made and not yet dropped."""


@atexit.register
def _stop_live_workers() -> None:
    """Stop the workers of iterators still alive when the interpreter exits.

    multiprocessing's own exit hook stops daemonic children with SIGTERM and then waits for them, and
    our workers ignore SIGTERM (``_ignore_stop_signals``): a script that still held a live iterator
    (``it = iter(loader); next(it)`` at module level) waited forever at exit. atexit runs hooks last
    registered first, and this module registers after torch and multiprocessing, so this runs before
    theirs: it shuts each iterator's workers down as torch does when the iterator is dropped (done event,
    then a join)."""
    for it in list(_LIVE_WORKER_ITERATORS):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _rank_batches(ep: _Epoch, skip: int, every: int = 1, offset: int = 0) -> Iterator[dict]:
    """This rank's micro batches ``skip + offset``, ``skip + offset + every``, ... of the epoch, in order.

    Each comes from its lane worker's stream (opened at its first use, positioned after what that
    worker delivered before ``skip``); a lane worker's batches all land in one residue class of
    ``every`` = the worker count, so each is read by one process only."""
    streams: dict[tuple[int, int], Iterator[dict]] = {}
    for k in range(skip + offset, len(ep.lanes) * ep.lane_batches, every):
        lane, _, worker = ep.batch_source(k)
        if (lane, worker) not in streams:
            streams[(lane, worker)] = _WorkerStream(ep, lane, worker).batches(ep.worker_done(lane, worker, skip))
        yield next(streams[(lane, worker)])


class _EpochDataset(IterableDataset):
    """A rank's epoch for torch's DataLoader: physical worker i serves this rank's micro batches
    skip + i, skip + i + W, ... (the order torch's DataLoader returns them in)."""

    def __init__(self, ep: _Epoch, skip: int, workers: int):
        super().__init__()
        self.ep, self.skip, self.workers = ep, skip, workers

    def __iter__(self) -> Iterator[OneBuffer]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return map(OneBuffer.of, _rank_batches(self.ep, self.skip, self.workers, physical))


@dataclass(frozen=True)
class OneBuffer:
    """A batch as it crosses from a loader worker to its rank: every tensor's bytes in one uint8
    ``buffer`` and a small ``header`` of ``(key, dtype, shape, byte offset)`` per tensor, in the
    batch's key order; other values (``max_seqlen``, a worker's ``_corrupt`` reports) ride in the
    header as they are, with a dtype of None.

    Why: torch's DataLoader sends each tensor through a shared-memory file of its own, and the
    receiving process fetches each file's descriptor from the worker in a round trip; a batch of
    seven tensors paid seven. ``batch()`` gives the same dict back (same keys, order, dtypes, shapes
    and values), its tensors views into the one buffer."""

    buffer: torch.Tensor
    header: tuple[tuple[str, torch.dtype | None, object, int], ...]  # key, dtype, shape (or the value), offset

    ALIGN = 16  # bytes: every field starts where any dtype may view it

    @classmethod
    def of(cls, batch: dict) -> OneBuffer:
        """Pack a batch (in the worker)."""
        header, offset = [], 0
        for key, value in batch.items():
            if torch.is_tensor(value):
                header.append((key, value.dtype, tuple(value.shape), offset))
                offset += -(-value.numel() * value.element_size() // cls.ALIGN) * cls.ALIGN
            else:
                header.append((key, None, value, -1))
        buffer = torch.empty(offset, dtype=torch.uint8)
        for key, dtype, _, start in header:
            if dtype is not None:
                raw = batch[key].contiguous().reshape(-1).view(torch.uint8)
                buffer[start : start + raw.numel()].copy_(raw)
        return cls(buffer, tuple(header))

    def batch(self) -> dict:
        """The batch again (in the rank): views into the buffer, no copy."""
        out = {}
        for key, dtype, shape_or_value, start in self.header:
            if dtype is None:
                out[key] = shape_or_value
                continue
            shape = shape_or_value
            nbytes = math.prod(shape) * dtype.itemsize
            out[key] = self.buffer[start : start + nbytes].view(dtype).view(shape)
        return out


# --- the loader -----------------------------------------------------------------------------


class PretrainingLoader:
    """Infinite iterator of masked micro batches for one rank; epochs follow each other forever.

    ``global_batch`` (default micro_batch x world_size) fixes the lanes (global_batch / micro_batch):
    the epoch's global batches are the same at any world size that divides them, and the rank
    takes global_batch / (micro_batch x world_size) micro batches per global step.
    ``state_dict()`` records the epoch and the global steps taken in it (plus, for people and
    checks, every lane worker's shard and offset); ``load_state_dict`` makes the next iteration
    start exactly there without reading the epoch from its start, on this or another number of
    ranks (at a global step boundary). ``data_dir`` is a local directory or a URL
    prefix (see ``storage.py``). ``corrupt_shards`` counts the distinct damaged or unreadable shards
    skipped so far (each is named once in the log, and remembered across a resume);
    ``strict_shards`` raises instead. ``unpadded``: micro batches in ``bertscale.packing``'s unpadded
    layout (the same samples and masks as the padded ones).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        split: str = "train",
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        tokenizer: TokenizerInfo,
        mask_prob: float = 0.15,
        max_predictions: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        expect_seq_len: int | None = None,
        drop_last: bool = True,
        with_sample_ids: bool = False,
        whole_word_masking: bool = False,
        strict_shards: bool = False,
        unpadded: bool = False,
        global_batch: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        global_batch = global_batch or micro_batch * world_size
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"a global batch of {global_batch} is not a whole number of micro batches of "
                             f"{micro_batch} on each of {world_size} rank(s); choose a world size that divides "
                             f"{global_batch // micro_batch if global_batch % micro_batch == 0 else global_batch}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = str(data_dir)
        self.manifest = load_manifest(data_dir, expect_seq_len, tokenizer.fingerprint)
        self.urls = shard_paths(self.manifest, data_dir, split)
        self.entries = list(self.manifest["splits"][split]["shards"])
        self.counts = [int(s["samples"]) for s in self.entries]
        if sum(self.counts) == 0:
            raise ValueError(f"{data_dir} has no {split} samples; rebuild the shards with more text")
        self.split, self.micro_batch, self.rank, self.world_size = split, micro_batch, rank, world_size
        self.seed, self.tokenizer, self.mask_prob, self.max_predictions = seed, tokenizer, mask_prob, max_predictions
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.drop_last, self.with_sample_ids = drop_last, with_sample_ids
        self.whole_word_masking, self.strict_shards = whole_word_masking, strict_shards
        self.unpadded = unpadded
        self.lanes = global_batch // micro_batch
        self.accumulation = self.lanes // world_size
        self.seq_len = int(self.manifest["seq_len"])
        self.epoch = 0
        self.batches_in_epoch = 0
        self.corrupt: set[str] = set()  # the shards found damaged (their paths or URLs)
        self._lane_plan(0)  # fail now, not at the first batch

    @property
    def workers(self) -> int:
        """Logical workers: the slices an epoch is cut into (1 when reading in-process)."""
        return max(1, self.num_workers)

    def _lane_plan(self, lane: int) -> list[WorkerPlan]:
        try:
            return plan_rank(sum(self.counts), rank=lane, world_size=self.lanes, workers=self.workers,
                             micro_batch=self.micro_batch, drop_last=self.drop_last)
        except ValueError:
            raise ValueError(f"an epoch of {sum(self.counts)} samples cannot give each of {self.lanes} lane(s) "
                             f"(global batch / micro batch) a batch of {self.micro_batch}, so no rank of "
                             f"{self.world_size} gets one; use a smaller micro batch or global batch, fewer "
                             f"ranks or more data") from None

    def _epoch(self, epoch: int) -> _Epoch:
        masking = _Masking(self.seed, epoch, self.tokenizer, self.mask_prob, self.max_predictions,
                           self.whole_word_masking, self.seq_len, self.with_sample_ids, self.unpadded)
        lanes = list(range(self.rank * self.accumulation, (self.rank + 1) * self.accumulation))
        return _Epoch(
            urls=self.urls, entries=self.entries,
            order=epoch_order(len(self.urls), seed=self.seed, epoch=epoch).tolist(),
            lanes=lanes, plans=[self._lane_plan(lane) for lane in lanes],
            rules=SampleRules.of(self.manifest), masking=masking, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, strict=self.strict_shards,
        )

    @property
    def corrupt_shards(self) -> int:
        """Distinct shards skipped as damaged or unreadable so far."""
        return len(self.corrupt)

    def eval_batches(self, *, split: str = "valid", batch_size: int | None = None,
                     max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Held-out batches of this loader's data, masked exactly as it masks (seed, mask_prob, max
        predictions, whole-word masking), so evaluation measures the task training optimises."""
        return eval_batches(self.data_dir, split=split, batch_size=batch_size or self.micro_batch, seed=self.seed,
                            tokenizer=self.tokenizer, max_batches=max_batches, mask_prob=self.mask_prob,
                            max_predictions=self.max_predictions, whole_word_masking=self.whole_word_masking,
                            strict=self.strict_shards)

    def batches_per_epoch(self) -> int:
        """Batches every rank gets per epoch (the same on all ranks)."""
        return self.batches_per_epoch_of(self.epoch)

    def state_dict(self) -> dict:
        """The position: ``global_steps_in_epoch`` (lane batches taken; the same on every rank and any
        world size) and, for people and checks, every lane worker's shard and offset on this rank."""
        ep = self._epoch(self.epoch)
        a = self.accumulation
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "global_steps_in_epoch": self.batches_in_epoch // a, "partial_step": self.batches_in_epoch % a,
            "samples_in_epoch": self.batches_in_epoch // a * self.lanes * self.micro_batch,
            "lanes": self.lanes, "world_size": self.world_size, "workers": self.workers,
            "micro_batch": self.micro_batch, "drop_last": self.drop_last, "corrupt_shards": self.corrupt_shards,
            "corrupt_shard_names": sorted(self.corrupt),
            "positions": [ep.position(j, v, ep.worker_done(j, v, self.batches_in_epoch))
                          for j in range(a) for v in range(self.workers)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; another world size is fine at a global step boundary."""
        if int(state.get("version", 1)) < 3:
            raise ValueError(
                f"the saved data position (loader state version {state.get('version', 1)}) was taken by an older "
                f"bertscale that cut epochs per rank; this one cuts them per global batch, so it cannot continue "
                f"that epoch exactly. Finish the phase with the bertscale that started it, or restart the phase")
        mismatched = [
            f"{key} {state[key]} (now {now})"
            for key, now in (("lanes", self.lanes), ("workers", self.workers),
                             ("micro_batch", self.micro_batch), ("drop_last", self.drop_last))
            if key in state and state[key] != now
        ]
        if mismatched:
            raise ValueError(
                "the saved data position was taken with " + ", ".join(mismatched) + "; an epoch is cut "
                "differently under other settings, so resume with the same global batch, dataloader workers "
                "(train.num_workers) and micro batch"
            )
        if state["world_size"] != self.world_size and state["partial_step"]:
            raise ValueError(
                f"the saved data position is {state['partial_step']} micro batch(es) into a global step on "
                f"{state['world_size']} rank(s); only a position at a global step boundary (every checkpoint's) "
                f"continues on another number of ranks ({self.world_size})")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["global_steps_in_epoch"]) * self.accumulation + int(state["partial_step"])
        self.corrupt = set(state.get("corrupt_shard_names", ()))

    def _batches_from(self, epoch: int, skip: int) -> Iterator[dict]:
        ep = self._epoch(epoch)
        if self.num_workers == 0:
            return _rank_batches(ep, skip)
        # Its own generator: torch draws the workers' base seed each time an iterator is created, by
        # default from the global RNG that also drives dropout, and a resumed run creates its iterator
        # at another step than the run that never stopped. (Workers use no torch randomness: their
        # shuffles are seeded from seed, epoch, rank, worker and block.)
        # Each batch crosses from its worker as one buffer (``OneBuffer``), unpacked here.
        workers = iter(DataLoader(_EpochDataset(ep, skip, self.num_workers), batch_size=None,
                                  num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                                  worker_init_fn=_ignore_stop_signals))
        _LIVE_WORKER_ITERATORS.add(workers)
        return map(OneBuffer.batch, workers)

    def _account(self, epoch: int, batch: dict) -> dict:
        for shard, reason in batch.pop("_corrupt", ()):
            if shard in self.corrupt:
                continue
            self.corrupt.add(shard)
            log.warning("skipped shard %s: %s; its samples are replaced by repeats from the next shards of each "
                        "epoch; set data.strict_shards = true to fail instead", shard, reason)
        return batch

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch (finite), from its start."""
        for batch in self._batches_from(epoch, 0):
            yield self._account(epoch, batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, skip = self.epoch, self.batches_in_epoch
        while True:
            if skip >= self.batches_per_epoch_of(epoch):
                epoch, skip = epoch + 1, 0
            self.epoch, self.batches_in_epoch = epoch, skip
            for batch in self._batches_from(epoch, skip):
                self.batches_in_epoch += 1
                yield self._account(epoch, batch)
            epoch, skip = epoch + 1, 0

    def batches_per_epoch_of(self, epoch: int) -> int:
        return self.accumulation * sum(len(p.batch_sizes) for p in self._lane_plan(0))


def eval_batches(
    data_dir: str | os.PathLike,
    *,
    split: str = "valid",
    batch_size: int,
    seed: int,
    tokenizer: TokenizerInfo,
    max_batches: int | None = None,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    whole_word_masking: bool = False,
    strict: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Finite, deterministic batches of a split in manifest order with epoch-0 masks.

    A damaged or unreadable shard is skipped with a warning naming it (``strict`` raises), so every
    rank, reading the same files, skips the same ones.
    """
    manifest = load_manifest(data_dir, expect_fingerprint=tokenizer.fingerprint)
    masking = _Masking(seed, 0, tokenizer, mask_prob, max_predictions, whole_word_masking,
                       int(manifest["seq_len"]), False)
    if max_batches is not None and max_batches <= 0:
        return
    batch: list = []
    produced = 0
    for shard in split_shards(manifest, data_dir, split, strict=strict, reader="evaluation"):
        for i in range(len(shard)):
            batch.append(shard.sample(i))
            if len(batch) == batch_size:
                yield masking.batch(batch)
                produced += 1
                batch = []
                if max_batches is not None and produced >= max_batches:
                    return  # before reading another shard
    if batch:
        yield masking.batch(batch)


def split_shards(manifest: dict, data_dir: str | os.PathLike, split: str, *, strict: bool = False,
                 reader: str = "evaluation") -> Iterator[ShardIndex]:
    """The checked shards of ``split`` in manifest order, each read when the caller asks for it. A damaged or
    unreadable shard is skipped with a warning naming it and ``reader`` (``strict`` raises), so every rank,
    reading the same files, skips the same ones."""
    rules = SampleRules.of(manifest)
    for url, entry in zip(shard_paths(manifest, data_dir, split), manifest["splits"][split]["shards"]):
        events: list[tuple[str, str]] = []
        shard = _read_or_report(url, rules, entry, strict, events)
        for name, reason in events:
            log.warning("%s skips shard %s: %s", reader, name, reason)
        if shard is not None:
            yield shard
