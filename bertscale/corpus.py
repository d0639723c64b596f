"""Reading raw text corpora: documents as lists of sentences.

Supported inputs: ``.txt`` / ``.txt.gz`` and ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line
with a ``text`` field, one document each). A ``.txt`` file is read in one of ``DOCUMENT_MODES``:
``blank-lines`` (Google's one-sentence-per-line dumps: blank lines separate documents) or ``file``
(the whole file is one document, its paragraphs consecutive text; for corpora written in paragraphs).
Everything streams line by line; nothing loads a whole file into memory.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bertscale.files import write_atomic

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
_BINARY_PROBE_BYTES = 8192
_MAX_LINE_WARNINGS = 5

DOCUMENT_MODES = ("blank-lines", "file")
"""How a .txt file splits into documents: at blank lines, or not at all (one document per file)."""
PARAGRAPH_WORDS = 30
"""A median blank-line document shorter than this many words (or of one line) is a paragraph, not a document."""
_LAYOUT_PROBE_DOCUMENTS = 2000

# Split after . ! ? (and closing quotes/brackets) when whitespace follows; after CJK full stops
# (。！？ and their closing quotes/brackets) unconditionally, since CJK text has no spaces.
_SENTENCE_END = re.compile(
    r"(?<=[.!?])[\"'”’)\]]*\s+|[。！？｡]+[”’」』）】》\"')]*"
)


@dataclass
class CorpusStats:
    """Counters collected while reading a corpus."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    replaced_chars: int = 0
    """U+FFFD characters inserted while decoding non-UTF-8 bytes."""
    skipped_lines: int = 0
    """Malformed jsonl lines (not JSON, or no string ``text``)."""
    empty_documents: int = 0
    skipped_files: list[dict] = field(default_factory=list)
    """``{"file", "why"}`` of each file that gave no documents or was read only up to damage."""

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.files} files, {self.documents} documents, {self.sentences} sentences, "
            f"{self.empty_documents} empty documents skipped, {self.skipped_lines} bad lines skipped, "
            f"{self.replaced_chars} undecodable chars replaced, {len(self.skipped_files)} files skipped or cut short"
        )

    def add(self, other: CorpusStats | dict) -> None:
        """Add another file's (or group's) counters to these."""
        other = other if isinstance(other, dict) else other.__dict__
        for name, value in other.items():
            setattr(self, name, getattr(self, name) + value)


def split_sentences(text: str) -> list[str]:
    """Split a line into sentences, keeping end punctuation (Latin . ! ?, CJK 。！？); drops empty pieces."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve files and directories (recursively, sorted) into a list of corpus files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"corpus input {path} does not exist; check the path")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_of(p))
            if not found:
                raise ValueError(
                    f"corpus directory {path} holds no files ending in {', '.join(SUPPORTED_SUFFIXES)}"
                )
            files.extend(found)
        elif _suffix_of(path) is None:
            raise ValueError(
                f"unsupported corpus file {path}: expected one of {', '.join(SUPPORTED_SUFFIXES)}; "
                "rename it or convert it to plain text / jsonl"
            )
        else:
            files.append(path)
    return files


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


_DAMAGE = (EOFError, zlib.error, OSError)  # gzip.BadGzipFile is an OSError


def _head(path: Path) -> bytes:
    """Up to the first _BINARY_PROBE_BYTES bytes; raises only when not even one can be read."""
    out = bytearray()
    with _open_binary(path) as f:
        try:
            while len(out) < _BINARY_PROBE_BYTES:
                chunk = f.read1(_BINARY_PROBE_BYTES - len(out))
                if not chunk:
                    break
                out += chunk
        except _DAMAGE:
            if not out:
                raise
    return bytes(out)


def refuse_binary_files(files: Sequence[Path]) -> None:
    """Raise naming the first input that looks binary (a NUL byte near its start), before any work."""
    for path in files:
        try:
            head = _head(path)
        except _DAMAGE:
            continue  # damaged, not binary: reported (and skipped) when it is read
        if b"\x00" in head:
            raise ValueError(
                f"{path} looks like a binary file (NUL byte in its first {_BINARY_PROBE_BYTES} bytes); "
                "remove it from the corpus inputs"
            )


def _readable(path: Path, stats: CorpusStats) -> bool:
    """False (recorded as skipped) when the file cannot even be opened as (gzip) text; raises on binary files."""
    try:
        _head(path)
    except _DAMAGE as e:
        _skip(path, stats, f"unreadable from its start ({e}); is it a valid (gzip) text file?")
        return False
    refuse_binary_files([path])
    return True


def _skip(path: Path, stats: CorpusStats, why: str) -> None:
    stats.skipped_files.append({"file": str(path), "why": why})
    log.warning("corpus file %s: %s", path, why)


def _decoded_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    """Yield decoded lines; invalid UTF-8 is replaced, counted and warned about once.

    A damaged file (a truncated or corrupt ``.gz``, a read error) is used up to the last whole line
    before the damage; the file and that line are named in a warning and in ``stats.skipped_files``.
    """
    warned = False
    lineno = 0
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _DAMAGE as e:
                _skip(path, stats, f"damaged after line {lineno} ({e}); lines 1-{lineno} are used, the rest "
                                   "is skipped")
                return
            lineno += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.replaced_chars += line.count("\ufffd") - raw.count("\ufffd".encode())
                if not warned:
                    log.warning(
                        "%s:%d is not valid UTF-8; undecodable bytes replaced with U+FFFD "
                        "(further lines of this file not reported)", path, lineno,
                    )
                    warned = True
                yield line


def _sentences_of_text(text: str) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        out.extend(split_sentences(line))
    return out


def _txt_documents(path: Path, stats: CorpusStats, documents: str = "blank-lines") -> Iterator[list[str]]:
    doc: list[str] = []
    blank_seen = False
    for line in _decoded_lines(path, stats):
        if not line.strip():
            blank_seen = True
            continue
        if blank_seen and documents == "blank-lines":
            if doc:
                yield doc
            doc = []
        blank_seen = False
        doc.extend(split_sentences(line))
    if doc:
        yield doc


def _jsonl_documents(path: Path, stats: CorpusStats, documents: str = "blank-lines") -> Iterator[list[str]]:
    warnings = 0
    for lineno, line in enumerate(_decoded_lines(path, stats), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj.get("text") if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            text = None
        if not isinstance(text, str):
            stats.skipped_lines += 1
            if warnings < _MAX_LINE_WARNINGS:
                log.warning("%s:%d skipped: not a JSON object with a string 'text' field", path, lineno)
                warnings += 1
            continue
        sentences = _sentences_of_text(text)
        if sentences:
            yield sentences
        else:
            stats.empty_documents += 1


def check_document_mode(documents: str) -> str:
    """``documents`` if it is one of ``DOCUMENT_MODES``, else a ValueError naming them."""
    if documents not in DOCUMENT_MODES:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENT_MODES)}, got {documents!r}")
    return documents


def file_documents(path: str | os.PathLike, stats: CorpusStats | None = None,
                   documents: str = "blank-lines") -> Iterator[list[str]]:
    """Stream the documents of one corpus file (binary files refused with their name); ``documents``
    (one of ``DOCUMENT_MODES``) says how a .txt file splits into documents.

    A file that gives no documents (empty, or unreadable from its start) is recorded in
    ``stats.skipped_files`` with the reason.
    """
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    stats.files += 1
    if not _readable(path, stats):
        return
    reader = _jsonl_documents if _suffix_of(path) in JSONL_SUFFIXES else _txt_documents
    found = 0
    for doc in reader(path, stats, check_document_mode(documents)):
        stats.documents += 1
        stats.sentences += len(doc)
        found += 1
        yield doc
    if found == 0 and not any(s["file"] == str(path) for s in stats.skipped_files[-1:]):
        _skip(path, stats, "no documents (empty, or only blank lines or bad jsonl lines)")


def iter_documents(
    paths: Sequence[str | os.PathLike], stats: CorpusStats | None = None, documents: str = "blank-lines"
) -> Iterator[list[str]]:
    """Stream documents (lists of non-empty sentences) from txt/jsonl files or directories."""
    stats = stats if stats is not None else CorpusStats()
    files = expand_inputs(paths)
    refuse_binary_files(files)
    yielded = 0
    for path in files:
        for doc in file_documents(path, stats, documents):
            yielded += 1
            yield doc
    if yielded == 0:
        names = ", ".join(str(p) for p in files[:10]) + (" ..." if len(files) > 10 else "")
        raise ValueError(f"corpus inputs yielded no documents: {names}; are the files empty?")


def paragraph_layout(files: Sequence[Path]) -> str | None:
    """A warning when the .txt files read at blank lines give paragraphs rather than documents: the
    median of their first documents is one line or under ``PARAGRAPH_WORDS`` words. None otherwise."""
    lines, words = [], []
    for path in files:
        if _suffix_of(path) not in TEXT_SUFFIXES:
            continue
        for doc in _txt_lines_per_document(path):
            lines.append(len(doc))
            words.append(sum(len(line.split()) for line in doc))
            if len(lines) >= _LAYOUT_PROBE_DOCUMENTS:
                break
        if len(lines) >= _LAYOUT_PROBE_DOCUMENTS:
            break
    if not lines:
        return None
    median_lines, median_words = sorted(lines)[len(lines) // 2], sorted(words)[len(words) // 2]
    if median_lines > 1 and median_words >= PARAGRAPH_WORDS:
        return None
    return (f"read with blank lines between documents, the median document of the .txt inputs is "
            f"{median_lines} line(s) and {median_words} words (first {len(lines)} documents): blank lines "
            f"here separate paragraphs, not documents, so samples stay short and pairs cross topics. If each "
            f"file is one document written in paragraphs, use --documents file")


def _txt_lines_per_document(path: Path) -> Iterator[list[str]]:
    """The non-blank lines of each blank-line-separated block of a .txt file (errors left to the reader)."""
    doc: list[str] = []
    try:
        with _open_binary(path) as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    doc.append(line)
                elif doc:
                    yield doc
                    doc = []
    except _DAMAGE:  # the reader names the damage when the build reads the file
        pass
    if doc:
        yield doc


# --- the embedded default corpus -------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_MIN_DOCSTRING_CHARS = 40


def _looks_like_code(paragraph: list[str]) -> bool:
    first = paragraph[0]
    if any(line.lstrip().startswith((">>>", "...")) for line in paragraph):
        return True
    # Indented blocks in a cleaned docstring are examples or tables, not prose.
    return all(line.startswith("    ") for line in paragraph) or first.rstrip().endswith("::")


def _docstring_paragraphs(doc: str) -> list[str]:
    paragraphs: list[str] = []
    block: list[str] = []
    for line in doc.splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        if block and not _looks_like_code(block):
            text = " ".join(" ".join(block).split())
            if text:
                paragraphs.append(text)
        block = []
    return paragraphs


def _stdlib_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out)


def _docstrings_of(source: str) -> Iterator[str]:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                yield doc


PROBE_FAMILIES = ("tkinter", "asyncio", "email", "logging", "xml", "_pydecimal", "unittest", "turtle")
"""Standard-library packages the demo's downstream probe tells apart: the largest ones (150+ docstrings
each) whose subjects barely overlap (GUI widgets, coroutines, mail messages, log handlers, XML trees,
decimal arithmetic, test cases, turtle graphics)."""
PROBE_DOCS_PER_FAMILY = 60
"""Docstrings of each probe family held out of the corpus for the probe (chosen by a hash of their place)."""


def _stdlib_docstrings(root: Path) -> Iterator[tuple[str, str, str]]:
    """(package or module the file belongs to, ``path:n`` of the n-th kept docstring, its corpus text)."""
    for path in _stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            docs = list(_docstrings_of(source))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        rel = path.relative_to(root)
        kept = 0
        for doc in docs:
            paragraphs = _docstring_paragraphs(doc)
            if paragraphs:
                yield rel.parts[0].removesuffix(".py"), f"{rel.as_posix()}:{kept}", "\n".join(paragraphs)
                kept += 1


@functools.lru_cache(maxsize=1)
def _all_stdlib_docstrings(root: Path) -> tuple[tuple[str, str, str], ...]:
    """Every ``_stdlib_docstrings`` of ``root``, parsed once per process: the corpus and the probe are chosen
    from the same list, and parsing the whole library takes seconds."""
    return tuple(_stdlib_docstrings(root))


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_order(place: str) -> bytes:
    return hashlib.blake2b(place.encode(), digest_size=8).digest()


def _probe_choice(families: Sequence[tuple[str, str, str]], per_family: int) -> set[str]:
    """The places of ``per_family`` docstrings of each ``PROBE_FAMILIES`` package, picked by hash (a fixed
    choice that does not favour the start of a file)."""
    chosen: set[str] = set()
    for family in PROBE_FAMILIES:
        chosen.update(sorted((place for fam, place, _ in families if fam == family), key=_hash_order)[:per_family])
    return chosen


def write_stdlib_corpus(out_path: Path, max_documents: int | None = None,
                        probe_path: Path | None = None) -> CorpusStats:
    """Write the docstrings of the Python standard library as a ``.txt`` corpus (no imports).

    With ``probe_path``, the docstrings ``write_stdlib_probe`` writes there are left out of the corpus:
    a labelled task whose texts pretraining never sees. An existing file with the same text is left
    untouched, so its identity (size, modification time) still matches what was built from it.
    """
    out_path = Path(out_path)
    stats = CorpusStats(files=1)
    if probe_path is None and max_documents is not None:
        docstrings: Iterable[tuple[str, str, str]] = _stdlib_docstrings(_stdlib_root())  # parsed up to the cut
    else:
        docstrings = _all_stdlib_docstrings(_stdlib_root())
    probe = _write_probe(probe_path, docstrings) if probe_path is not None else set()
    # by text too: a docstring repeated elsewhere in the library (an overridden method's, say) is held out
    probe_texts = {text for _, place, text in docstrings if place in probe} if probe else set()
    parts: list[str] = []
    for _, place, text in docstrings:
        if text in probe_texts:
            continue
        parts.append(text + "\n\n")
        stats.documents += 1
        stats.sentences += sum(len(split_sentences(p)) for p in text.split("\n"))
        if max_documents is not None and stats.documents >= max_documents:
            break
    _write_if_changed(out_path, "".join(parts).encode("utf-8"))
    return stats


def write_stdlib_probe(probe_path: Path) -> int:
    """Write ``PROBE_DOCS_PER_FAMILY`` docstrings of each of ``PROBE_FAMILIES`` to ``probe_path`` as jsonl
    (``text``, ``label``: the package, ``where``: ``file:n``), family by family, each in a fixed hashed
    order (so its first rows spread over the package's files); returns how many."""
    return len(_write_probe(probe_path, _all_stdlib_docstrings(_stdlib_root())))


def _write_probe(probe_path: Path, docstrings: Sequence[tuple[str, str, str]]) -> set[str]:
    chosen = _probe_choice(docstrings, PROBE_DOCS_PER_FAMILY)
    rows = sorted(((PROBE_FAMILIES.index(family), _hash_order(place)), json.dumps(
        {"text": text, "label": family, "where": place}) + "\n") for family, place, text in docstrings if place in chosen)
    _write_if_changed(Path(probe_path), "".join(line for _, line in rows).encode("utf-8"))
    return chosen


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
