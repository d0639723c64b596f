"""Where shards live: a local directory or a URL prefix, read whole through ``webdataset.gopen``.

A data location is either a local directory or a URL prefix:

- ``http://`` / ``https://``: read with ``curl`` (webdataset's command) but with our own bounded
  retries: webdataset's ``curl`` handler retries a failing request 30 times, 2 s apart, which is a
  minute per missing shard, per rank and epoch;
- ``gs://`` (``gsutil``), ``ais://`` and any scheme registered in ``webdataset.gopen.gopen_schemes``:
  webdataset's own handler, so users' WebDataset setups (``GOPEN_REWRITE``, ``USE_AIS_FOR``, custom
  handlers) carry over;
- ``s3://``: ``aws s3 cp URL -`` unless a handler for ``s3`` is registered;
- ``pipe:COMMAND``: the command's standard output; ``{}`` in the command stands for the file's path
  relative to the location (``pipe:aws s3 cp s3://bucket/seq128/{} -``), otherwise ``/PATH`` is
  appended.

Files are only ever read, never written, at a location.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_ATTEMPTS = 3
"""Tries per remote file before it counts as unreadable (the loader then skips the shard)."""
RETRY_DELAY_S = 0.5
"""Wait before the second try; doubled before each further one."""
CURL_CONNECT_TIMEOUT_S = 30
_CURL_STATUS = {6: "could not resolve the host", 7: "could not connect", 22: "the server answered with an HTTP error",
                28: "timed out", 35: "TLS handshake failed", 56: "the connection broke"}


class LocationError(OSError):
    """A file at a data location could not be read (after the retries, for remote ones)."""


def is_url(location: str | os.PathLike) -> bool:
    """True for URL prefixes (``scheme://...`` or ``pipe:...``), False for local paths."""
    s = str(location)
    return s.startswith("pipe:") or bool(_SCHEME.match(s))


def join(location: str | os.PathLike, name: str) -> str:
    """The location of ``name`` (a relative path such as ``train/shard-000000.tar``) under ``location``."""
    s = str(location)
    if s.startswith("pipe:"):
        return s.replace("{}", name) if "{}" in s else f"{s.rstrip('/')}/{name}"
    if is_url(s):
        return f"{s.rstrip('/')}/{name}"
    return str(Path(s) / name)


def describe(location: str | os.PathLike) -> str:
    """A location as people read it (pipe commands shortened)."""
    s = str(location)
    return s if len(s) <= 200 else s[:197] + "..."


def _open(url: str):
    # the module (the package exports a function of the same name)
    gopen = importlib.import_module("webdataset.gopen")

    url = gopen.rewrite_url(url)
    scheme = url.split("://", 1)[0].lower() if _SCHEME.match(url) else ""
    handler = gopen.gopen_schemes.get(scheme)
    if scheme in ("http", "https") and handler is gopen.gopen_curl:
        # webdataset's own curl command, minus its minute of built-in retries (we retry, bounded)
        return gopen.Pipe(["curl", "--connect-timeout", str(CURL_CONNECT_TIMEOUT_S), "-f", "-s", "-L", url],
                          mode="rb", ignore_status=[141, 23])
    if scheme == "s3" and handler is None:
        return gopen.Pipe(["aws", "s3", "cp", "--quiet", url, "-"], mode="rb", ignore_status=[141])
    return gopen.gopen(url, "rb")


def _why(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"exit (\d+)", text)
    if m and "curl" in text:
        code = int(m.group(1))
        return f"curl exit status {code}: {_CURL_STATUS.get(code, 'see `man curl`')}"
    if m:
        return f"the command exited with status {m.group(1)}"
    return text or type(exc).__name__


def read_bytes(url: str, *, attempts: int = READ_ATTEMPTS, delay_s: float = RETRY_DELAY_S) -> bytes:
    """The whole file at ``url`` (a local path or a URL); remote reads are tried ``attempts`` times.

    Raises LocationError naming the file and, for a remote one, the number of tries.
    """
    if not is_url(url):
        try:
            return Path(url).read_bytes()
        except OSError as e:
            raise LocationError(f"cannot read {url}: {e.strerror or e}") from e
    last: BaseException | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(delay_s * 2 ** (attempt - 1))
        try:
            with _open(url) as stream:
                return stream.read()
        except (OSError, ValueError) as e:  # a Pipe raises OSError on a failed command, gopen ValueError
            last = e
    raise LocationError(f"cannot read {describe(url)} after {max(1, attempts)} tries ({_why(last)})")
