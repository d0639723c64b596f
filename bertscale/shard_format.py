"""The shard format on disk: tar members, shard files, the ``index.json`` manifest, and the one reader.

A shard is a WebDataset tar file. Each sample is three members ``KEY.alen``, ``KEY.ids``,
``KEY.nsp`` (in that order, as webdataset writes fields sorted): ``ids`` holds the token ids
``[CLS] A [SEP] B [SEP]`` as little-endian uint16 (uint32 for vocabularies over 65,536), ``alen``
the length of ``[CLS] A [SEP]`` and ``nsp`` the pair label, both in ascii. ``KEY`` is 16 digits,
unique in its split; it seeds the sample's masking.

``index.json`` lists every shard of each split with its sample count, byte size and CRC-32, and
records how the shards were built (sequence length, tokenizer fingerprint, vocabulary size,
special ids, seed, pair task) plus a report of what the build produced. The builder
(``shards.py``), the loader (``loader.py``) and ``tools/inspect_shards.py`` all read through
``read_shard`` here, which checks the whole file before any sample is used: tar headers, sample
count, byte size and CRC-32 against the manifest, and every sample's fields (token ids within the
vocabulary, segment lengths within the sequence, labels 0 or 1, special tokens in place).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertscale import storage
from bertscale.files import atomic_output, write_atomic

log = logging.getLogger(__name__)

FORMAT = "bertscale-shards-v2"
READABLE_FORMATS = ("bertscale-shards-v1", FORMAT)
"""v1 manifests (no CRC-32, no special ids) are still read; their samples are checked field by field."""
SPLITS = ("train", "valid")
FIELDS = ("alen", "ids", "nsp")
KEY_DIGITS = 16
MIN_SAMPLE_TOKENS = 5
"""``[CLS] a [SEP] b [SEP]``: the shortest sample."""
_BLOCK = 512  # tar's block


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """``train/shard-000003.tar``: the name, relative to the shard directory, of a split's index-th shard."""
    return f"{split}/shard-{index:06d}.tar"


class UstarWriter:
    """Writes tar members exactly as ``webdataset.TarWriter(f, encoder=False, mtime=0)`` does in ustar
    format (members of a sample in sorted field order, mode 0444, owner ``bigdata``, closing zero
    blocks padded to tarfile's 10 KiB record), byte for byte, without a ``tarfile.TarInfo`` per member.

    webdataset's writer goes through ``tarfile`` (a TarInfo, a copy and ~25 field conversions per
    member) and, because it never hands ``tarfile`` its format, a PAX header before every member:
    that made up most of the builder's time (tools/bench_data.py). The header here is a template
    with only name, size and checksum filled in. tests/test_data_build.py checks the bytes against
    webdataset's own writer. Members can also be written without the end-of-archive marker (a
    fragment that ``ShardFile`` later copies into a shard).
    """

    RECORD = 20 * _BLOCK
    _FLUSH_BYTES = 1 << 20

    def __init__(self, file):
        self.file = file
        self.offset = 0
        template = tarfile.TarInfo("")
        template.mode, template.mtime, template.uname, template.gname = 0o444, 0, "bigdata", "bigdata"
        header = template.tobuf(tarfile.USTAR_FORMAT)
        # the fixed parts around name [0:100], size [124:136] and checksum [148:156]
        self._mid, self._after_size, self._tail = header[100:124], header[136:148], header[156:]
        self._fixed_sum = sum(self._mid) + sum(self._after_size) + sum(self._tail) + 8 * ord(" ")  # checksum: spaces
        self._suffixes: dict[str, tuple[bytes, int]] = {}
        self._zeros = bytes(_BLOCK)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def position(self) -> int:
        """Bytes written so far, counting those still buffered."""
        return self.offset + self._pending_bytes

    def write(self, sample: Mapping[str, object]) -> None:
        """One sample as webdataset's writer takes it: ``__key__`` plus fields of bytes."""
        self.add(str(sample["__key__"]), [(f, sample[f]) for f in sorted(sample) if not f.startswith("_")])

    def add(self, key: str, fields: Sequence[tuple[str, bytes]]) -> None:
        """One sample's members ``KEY.FIELD``, in the order given (webdataset's is sorted by field)."""
        key_bytes = key.encode()
        key_sum = sum(key_bytes)
        parts = self._pending
        for field, data in fields:
            suffix = self._suffixes.get(field)
            if suffix is None:
                dotted = b"." + field.encode()
                suffix = self._suffixes[field] = (dotted, sum(dotted))
            name = key_bytes + suffix[0]
            if len(name) > 100:
                raise ValueError(f"tar member name {name!r} is longer than ustar's 100 bytes")
            size = b"%011o\0" % len(data)
            checksum = self._fixed_sum + key_sum + suffix[1] + sum(size)
            pad = -len(data) % _BLOCK
            parts += (name, self._zeros[: 100 - len(name)], self._mid, size, self._after_size,
                      b"%06o\0 " % checksum, self._tail, data, self._zeros[:pad])
            self._pending_bytes += _BLOCK + len(data) + pad
        if self._pending_bytes >= self._FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        self.file.write(b"".join(self._pending))
        self.offset += self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0

    @classmethod
    def end_marker(cls, offset: int) -> bytes:
        """Two zero blocks, then zeros up to a whole tar record, for an archive of ``offset`` bytes."""
        end = 2 * _BLOCK
        return bytes(end + -(offset + end) % cls.RECORD)

    def close(self) -> None:
        """The end-of-archive marker."""
        self.flush()
        end = self.end_marker(self.offset)
        self.file.write(end)
        self.offset += len(end)


def sample_members(writer: UstarWriter, key: str, ids: np.ndarray, a_len: int, label: int, dtype: np.dtype) -> None:
    """One sample's three members (the layout ``read_shard`` expects)."""
    writer.add(key, (("alen", b"%d" % a_len), ("ids", ids.astype(dtype, copy=False).tobytes()),
                     ("nsp", b"%d" % label)))


class ShardFile:
    """One shard file being written from tar member bytes; appears under its name only when published.

    Keeps its byte count and CRC-32 as it goes, so closing returns the manifest entry. Closing and
    publishing are two steps, so a writer can record the shard before it becomes visible.
    """

    def __init__(self, directory: str | os.PathLike, name: str):
        self.name, self.path = name, Path(directory) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._output = atomic_output(self.path)
        self._file = open(self._output.__enter__(), "wb")
        self.samples = self.bytes = self._crc = 0

    def append(self, members: bytes | memoryview, samples: int) -> None:
        self._file.write(members)
        self._crc = zlib.crc32(members, self._crc)
        self.bytes += len(members)
        self.samples += samples

    def close(self) -> dict:
        """Write the end marker; returns the manifest entry ``{"name", "samples", "bytes", "crc32"}``."""
        end = UstarWriter.end_marker(self.bytes)
        self._file.write(end)
        self._crc = zlib.crc32(end, self._crc)
        self.bytes += len(end)
        self._file.close()
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "crc32": f"{self._crc:08x}"}

    def publish(self) -> None:
        """Rename the closed file into place."""
        self._output.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the partial file."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(BaseException):
            self._output.__exit__(RuntimeError, RuntimeError("aborted"), None)


# --- the manifest ---------------------------------------------------------------------------------


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    write_atomic(Path(directory) / "index.json", json.dumps(manifest, indent=2) + "\n")


def load_manifest(
    location: str | os.PathLike,
    expect_seq_len: int | None = None,
    expect_fingerprint: str | None = None,
    strict: bool = False,
) -> dict:
    """Read and check ``index.json`` of a shard directory or URL prefix: format, seq_len, tokenizer.

    For a local directory the shards are checked too: a listed shard that is missing is an error;
    one whose size differs from the manifest is a warning naming it (the loader then skips it), or
    an error with ``strict``. Remote shards are checked when they are read.
    """
    where = str(location)
    path = storage.join(where, "index.json")
    remote = storage.is_url(where)
    if not remote and not Path(path).is_file():
        raise FileNotFoundError(f"no index.json in {where}; build shards with `bertscale shards ... --out {where}`")
    try:
        text = storage.read_bytes(path)
    except storage.LocationError as e:
        raise FileNotFoundError(f"no readable index.json at {storage.describe(where)}: {e}; check the URL, or build "
                                "shards with `bertscale shards` and serve that folder") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{storage.describe(path)} is not valid JSON ({e}); rebuild the shards") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{storage.describe(path)} has format {got!r}, expected {FORMAT!r}; rebuild the shards")
    if expect_seq_len is not None and manifest["seq_len"] != expect_seq_len:
        raise ValueError(
            f"shards in {where} were built with seq_len {manifest['seq_len']} but the phase trains at "
            f"{expect_seq_len}; rebuild with --seq-len {expect_seq_len} or point the phase at the right folder"
        )
    if expect_fingerprint is not None and manifest["tokenizer_fingerprint"] != expect_fingerprint:
        raise ValueError(
            f"shards in {where} were built with tokenizer {manifest['tokenizer_fingerprint']} but the run uses "
            f"tokenizer {expect_fingerprint}; rebuild the shards with this tokenizer or use the tokenizer "
            "they were built with"
        )
    if remote:
        return manifest
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            f = Path(where) / shard["name"]
            if not f.is_file() or f.stat().st_size == 0:
                raise FileNotFoundError(
                    f"{path} lists {shard['name']} ({split}) but {f} is missing or empty; "
                    "copy the whole shard folder or rebuild it"
                )
    problems = [why for split in manifest["splits"] for _, why in shard_problems(manifest, where, split)]
    if problems:
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        if strict:
            raise ValueError(f"shards in {where} disagree with {path}: {listing}; rebuild or re-copy them")
        log.warning("shards in %s disagree with %s (they will be skipped): %s", where, path, listing)
    return manifest


def shard_problems(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[tuple[int, str]]:
    """(index, reason) of a local split's shards whose size on disk is not the manifest's."""
    out = []
    for i, shard in enumerate(manifest["splits"].get(split, {}).get("shards", [])):
        if "bytes" not in shard:  # manifests of older builds do not record sizes
            continue
        f = Path(data_dir) / shard["name"]
        size = f.stat().st_size if f.is_file() else -1
        if size != shard["bytes"]:
            out.append((i, f"{shard['name']} has {size} bytes, the manifest says {shard['bytes']}"))
    return out


def shard_paths(manifest: dict, location: str | os.PathLike, split: str) -> list[str]:
    """Paths (or URLs) of a split's shards, in manifest order."""
    if split not in manifest["splits"]:
        raise ValueError(f"shards in {location} have no split {split!r}; available: {sorted(manifest['splits'])}")
    return [storage.join(location, s["name"]) for s in manifest["splits"][split]["shards"]]


# --- reading --------------------------------------------------------------------------------------


class CorruptShardError(ValueError):
    """A shard that cannot be used: unreadable, truncated, altered since the build, or holding a bad sample."""


@dataclass(frozen=True)
class SampleRules:
    """What every sample of a shard directory must satisfy (from its manifest)."""

    dtype: str
    seq_len: int | None = None
    vocab_size: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None

    @classmethod
    def of(cls, manifest: Mapping) -> SampleRules:
        return cls(dtype=str(manifest["dtype"]), seq_len=manifest.get("seq_len"), vocab_size=manifest.get("vocab_size"),
                   cls_id=manifest.get("cls_id"), sep_id=manifest.get("sep_id"))


class ShardIndex:
    """All samples of one shard file, parsed without copying: sample i is ``ids(i)``, ``alen[i]``, ..."""

    def __init__(self, path: str, data: bytes, keys, ids_off, ids_len, alen, nsp, dtype: np.dtype):
        self.path, self.data, self.dtype = path, data, dtype
        self.keys, self.ids_off, self.ids_len, self.alen, self.nsp = keys, ids_off, ids_len, alen, nsp

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, i: int) -> np.ndarray:
        return np.frombuffer(self.data, self.dtype, int(self.ids_len[i]), int(self.ids_off[i])).astype(np.int64)

    def sample(self, i: int) -> tuple[int, np.ndarray, int, int]:
        """(sample id, token ids as int64, a_len, pair label)."""
        return int(self.keys[i]), self.ids(i), int(self.alen[i]), int(self.nsp[i])


def read_shard(url: str | os.PathLike, rules: SampleRules | str | np.dtype, entry: Mapping | None = None) -> ShardIndex:
    """Read and check one shard (a path or URL) whole; raises CorruptShardError naming it.

    ``rules`` are the manifest's sample rules (or just the ids dtype); ``entry`` is the shard's
    manifest entry, whose ``samples``, ``bytes`` and ``crc32`` must match when present.
    """
    url = str(url)
    if not isinstance(rules, SampleRules):
        rules = SampleRules(dtype=str(np.dtype(rules)))
    entry = entry or {}

    def bad(why: str) -> CorruptShardError:
        return CorruptShardError(f"corrupt shard {storage.describe(url)}: {why}; rebuild it with `bertscale shards`")

    try:
        data = storage.read_bytes(url)
    except storage.LocationError as e:
        raise CorruptShardError(f"unreadable shard: {e}") from None
    if "bytes" in entry and len(data) != entry["bytes"]:
        raise bad(f"{len(data)} bytes, the manifest says {entry['bytes']}")
    if "crc32" in entry and f"{zlib.crc32(data):08x}" != entry["crc32"]:
        raise bad(f"its CRC-32 is {zlib.crc32(data):08x}, the manifest says {entry['crc32']} (altered since the build)")
    shard = _parse(url, data, np.dtype(rules.dtype).newbyteorder("<"), bad)
    if "samples" in entry and len(shard) != entry["samples"]:
        raise bad(f"holds {len(shard)} samples but the manifest lists {entry['samples']}")
    _check_samples(shard, rules, bad)
    return shard


def _parse(url: str, data: bytes, dt: np.dtype, bad) -> ShardIndex:
    n = len(data)
    pos = 0
    headers: list[int] = []
    keys: list[str] = []
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    ended = False
    while pos + _BLOCK <= n:
        h = data[pos : pos + _BLOCK]
        if h[0] == 0 and not h.strip(b"\0"):
            ended = True
            break
        try:
            size = int(h[124:136].strip(b" \0") or b"0", 8)
        except ValueError:
            raise bad(f"unreadable tar header at byte {pos}") from None
        kind = h[156:157]
        start = pos + _BLOCK
        pos = start + -(-size // _BLOCK) * _BLOCK
        if pos > n:
            raise bad(f"truncated inside a member at byte {start} ({n} bytes in all)")
        headers.append(start - _BLOCK)
        if kind in (b"x", b"g"):  # pax headers carry no sample data
            continue
        if kind not in (b"0", b"\0"):
            raise bad(f"unexpected tar member type {kind!r} at byte {start - _BLOCK}")
        name = h[:100].rstrip(b"\0").decode("utf-8", "replace")
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if key not in samples:
            samples[key] = {}
            keys.append(key)
        samples[key][ext] = (start, size)
    if not ended:
        raise bad(f"truncated: no end-of-archive marker ({n} bytes in all)")
    if headers:
        hdr = np.frombuffer(data, np.uint8)[np.asarray(headers)[:, None] + np.arange(_BLOCK)]
        stored = [int(data[o + 148 : o + 156].strip(b" \0") or b"-1", 8) for o in headers]
        computed = hdr[:, :148].sum(1, dtype=np.int64) + hdr[:, 156:].sum(1, dtype=np.int64) + 8 * 32
        if not np.array_equal(computed, np.asarray(stored, dtype=np.int64)):
            first = headers[int(np.flatnonzero(computed != np.asarray(stored))[0])]
            raise bad(f"tar header checksum mismatch at byte {first}")
    m = len(keys)
    key_arr, ids_off, ids_len, alen, nsp = (np.empty(m, np.int64) for _ in range(5))
    for i, key in enumerate(keys):
        fields = samples[key]
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise bad(f"sample {key!r} lacks {missing}")
        try:
            key_arr[i] = int(key)
            (o, s), (ao, asz), (no, nsz) = fields["ids"], fields["alen"], fields["nsp"]
            alen[i] = int(data[ao : ao + asz])
            nsp[i] = int(data[no : no + nsz])
        except ValueError:
            raise bad(f"sample {key!r} has a non-numeric key, alen or nsp") from None
        if s % dt.itemsize:
            raise bad(f"sample {key!r} has {s} id bytes, not a multiple of {dt.itemsize}")
        ids_off[i], ids_len[i] = o, s // dt.itemsize
    return ShardIndex(url, data, key_arr, ids_off, ids_len, alen, nsp, dt)


def _check_samples(shard: ShardIndex, rules: SampleRules, bad) -> None:
    """Every sample's fields, at once: the model must never see an id or label it cannot take."""
    if not len(shard):
        return
    n, a, label = shard.ids_len, shard.alen, shard.nsp

    def first(mask: np.ndarray, why) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise bad(f"sample {int(shard.keys[i]):0{KEY_DIGITS}d} {why(i)}")

    first(n < MIN_SAMPLE_TOKENS, lambda i: f"has {n[i]} tokens, fewer than {MIN_SAMPLE_TOKENS}")
    if rules.seq_len is not None:
        first(n > rules.seq_len, lambda i: f"has {n[i]} tokens, more than the sequence length {rules.seq_len}")
    first((a < 3) | (a > n - 2), lambda i: f"has segment A length {a[i]} in {n[i]} tokens (needs 3 <= alen <= {n[i] - 2})")
    first((label != 0) & (label != 1), lambda i: f"has pair label {label[i]} (needs 0 or 1)")
    # every id of every sample, gathered from the buffer in one go (members start on 512-byte blocks)
    item = shard.dtype.itemsize
    view = np.frombuffer(shard.data, shard.dtype, len(shard.data) // item)
    start = shard.ids_off // item
    if rules.vocab_size is not None:
        before = np.concatenate([[0], np.cumsum(n)[:-1]])
        flat = view[np.repeat(start - before, n) + np.arange(int(n.sum()))]
        if len(flat) and int(flat.max()) >= rules.vocab_size:
            top = np.maximum.reduceat(flat, before)
            first(top >= rules.vocab_size, lambda i: f"has token id {top[i]}, outside the vocabulary of "
                                                     f"{rules.vocab_size}")
    if rules.cls_id is not None and rules.sep_id is not None:
        first(view[start] != rules.cls_id, lambda i: f"does not start with [CLS] (id {rules.cls_id})")
        first((view[start + a - 1] != rules.sep_id) | (view[start + n - 1] != rules.sep_id),
              lambda i: f"lacks [SEP] (id {rules.sep_id}) after segment A or at its end")
