"""Streaming pretraining batches from WebDataset shards, masked on the fly.

Shard order per epoch comes from (seed, epoch) and is identical on every rank; rank r takes
shards r, r + world_size, ...; each dataloader worker then takes every num_workers-th of those.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bertscale.masking import IGNORE_INDEX, mask_tokens
from bertscale.shards import load_manifest, shard_paths
from bertscale.tokenizer import TokenizerInfo


def decode_sample(raw: dict, dtype) -> tuple[int, np.ndarray, int, int]:
    """(sample_id, ids int64, a_len, nsp_label) from a raw webdataset sample of bytes."""
    try:
        sample_id = int(raw["__key__"])
        ids = np.frombuffer(raw["ids"], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64)
        return sample_id, ids, int(raw["alen"]), int(raw["nsp"])
    except (KeyError, ValueError) as e:
        where = raw.get("__url__", "?")
        raise ValueError(
            f"malformed sample {raw.get('__key__')!r} in {where}: {e!r}; rebuild the shards with `bertscale shards`"
        ) from e


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
    longest = max(len(it["input_ids"]) for it in items)
    length = -(-longest // pad_to_multiple) * pad_to_multiple if pad_to_multiple > 1 else longest
    if max_len is not None:
        length = max(min(length, max_len), longest)
    b = len(items)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    token_type = np.zeros((b, length), dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n] = it["input_ids"]
        labels[row, :n] = it["labels"]
        token_type[row, it["a_len"] : n] = 1
        attention[row, :n] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "next_sentence_label": torch.tensor([it["nsp_label"] for it in items], dtype=torch.long),
    }
    if with_sample_ids:
        batch["sample_ids"] = torch.tensor([it["sample_id"] for it in items], dtype=torch.long)
    return batch


class _Masker:
    """Decodes and masks raw samples for one epoch (picklable, for worker processes)."""

    def __init__(self, dtype: str, seed: int, epoch: int, tok: TokenizerInfo, mask_prob: float, max_predictions):
        self.dtype, self.seed, self.epoch, self.tok = dtype, seed, epoch, tok
        self.mask_prob, self.max_predictions = mask_prob, max_predictions

    def __call__(self, raw: dict) -> dict:
        sample_id, ids, a_len, nsp = decode_sample(raw, self.dtype)
        inputs, labels = mask_tokens(
            ids, seed=self.seed, epoch=self.epoch, sample_id=sample_id, vocab_size=self.tok.vocab_size,
            mask_id=self.tok.mask_id, special_ids=self.tok.special_ids, mask_prob=self.mask_prob,
            max_predictions=self.max_predictions,
        )
        return {"input_ids": inputs, "labels": labels, "a_len": a_len, "nsp_label": nsp, "sample_id": sample_id}


def _read(urls: list[str]) -> Iterator[dict]:
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle: fill a buffer, then emit a random element for each new one."""
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


class _EpochStream(IterableDataset):
    """One rank's batches for one epoch; splits its shards among dataloader workers."""

    def __init__(self, urls, masker: _Masker, *, rank, seed, epoch, micro_batch, shuffle_buffer,
                 pad_id, max_len, drop_last, with_sample_ids):
        super().__init__()
        self.urls, self.masker, self.rank, self.seed, self.epoch = urls, masker, rank, seed, epoch
        self.micro_batch, self.shuffle_buffer, self.pad_id = micro_batch, shuffle_buffer, pad_id
        self.max_len, self.drop_last, self.with_sample_ids = max_len, drop_last, with_sample_ids

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        items = (self.masker(raw) for raw in _read(urls))
        if self.shuffle_buffer > 1:
            items = _buffer_shuffle(items, self.shuffle_buffer, rng)
        batch: list[dict] = []
        for item in items:
            batch.append(item)
            if len(batch) == self.micro_batch:
                yield collate(batch, self.pad_id, max_len=self.max_len, with_sample_ids=self.with_sample_ids)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch, self.pad_id, max_len=self.max_len, with_sample_ids=self.with_sample_ids)


def epoch_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """This rank's shards for an epoch: a (seed, epoch)-seeded permutation, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[j] for k, j in enumerate(order) if k % world_size == rank]


class PretrainingLoader:
    """Infinite iterator of masked micro batches for one rank; epochs follow each other forever.

    ``drop_last`` drops each worker's incomplete final batch of an epoch so every batch has
    ``micro_batch`` rows. ``state_dict()`` records (epoch, batches taken in it); after
    ``load_state_dict`` the next iteration fast-forwards to the same position.
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
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.data_dir = str(data_dir)
        self.manifest = load_manifest(data_dir, expect_seq_len, tokenizer.fingerprint)
        self.urls = shard_paths(self.manifest, data_dir, split)
        need = world_size * max(1, num_workers)
        if len(self.urls) < need:
            raise ValueError(
                f"{data_dir} has {len(self.urls)} {split} shard(s) but {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) need at least {need}; rebuild with a smaller "
                "--samples-per-shard or use fewer dataloader workers"
            )
        self.split, self.micro_batch, self.rank, self.world_size = split, micro_batch, rank, world_size
        self.seed, self.tokenizer, self.mask_prob, self.max_predictions = seed, tokenizer, mask_prob, max_predictions
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.drop_last, self.with_sample_ids = drop_last, with_sample_ids
        self.seq_len = int(self.manifest["seq_len"])
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch (finite)."""
        masker = _Masker(self.manifest["dtype"], self.seed, epoch, self.tokenizer, self.mask_prob, self.max_predictions)
        stream = _EpochStream(
            epoch_shards(self.urls, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size),
            masker, rank=self.rank, seed=self.seed, epoch=epoch, micro_batch=self.micro_batch,
            shuffle_buffer=self.shuffle_buffer, pad_id=self.tokenizer.pad_id, max_len=self.seq_len,
            drop_last=self.drop_last, with_sample_ids=self.with_sample_ids,
        )
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, skip = self.epoch, self.batches_in_epoch
        while True:
            self.epoch, self.batches_in_epoch = epoch, 0
            produced = 0
            for i, batch in enumerate(self.epoch_batches(epoch)):
                produced += 1
                if i < skip:
                    continue
                self.batches_in_epoch = i + 1
                yield batch
            if produced == 0:
                raise ValueError(
                    f"rank {self.rank} got no batch of {self.micro_batch} samples in epoch {epoch} from "
                    f"{self.data_dir}; use a smaller micro batch or more data"
                )
            epoch, skip = epoch + 1, 0


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
) -> Iterator[dict[str, torch.Tensor]]:
    """Finite, deterministic batches of a split in manifest order with epoch-0 masks."""
    manifest = load_manifest(data_dir, expect_fingerprint=tokenizer.fingerprint)
    urls = shard_paths(manifest, data_dir, split)
    masker = _Masker(manifest["dtype"], seed, 0, tokenizer, mask_prob, max_predictions)
    batch: list[dict] = []
    produced = 0
    for raw in _read(urls) if urls else ():
        if max_batches is not None and produced >= max_batches:
            return
        batch.append(masker(raw))
        if len(batch) == batch_size:
            yield collate(batch, tokenizer.pad_id, max_len=manifest["seq_len"])
            produced += 1
            batch = []
    if batch and (max_batches is None or produced < max_batches):
        yield collate(batch, tokenizer.pad_id, max_len=manifest["seq_len"])
