"""Sources: URL-list lines to items (pure, `<id><TAB><url>` as in fall11_urls.txt or one URL a
line), URL checks, and opening a source (a list file, .gz too, an http(s) URL of one, a folder).

An item's URL is the last whitespace-separated token of a non-blank, non-comment line; its key is
the md5 hex digest of that token's UTF-8 bytes. Lines without a URL token are rejected, never fatal.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import os
import re
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from urllib3.exceptions import DecodeError, HTTPError

from common.messages import ChunkItem

if TYPE_CHECKING:
    from common.settings import Settings

__all__ = [
    "CORRUPT_ERRORS",
    "FileTooLarge",
    "MAX_LINE_BYTES",
    "MAX_URL_CHARS",
    "READ_ERRORS",
    "Kind",
    "ListBroken",
    "NotRegularFile",
    "ParseCounts",
    "SourceError",
    "UrlItem",
    "file_key",
    "is_url",
    "iter_folder",
    "iter_items",
    "key_of",
    "open_list",
    "open_regular",
    "parse_line",
    "read_regular",
    "url_problem",
]

MAX_LINE_BYTES = 64 * 1024  # longest line (without its ending) that can hold an item
MAX_URL_CHARS = 4096  # longest URL that may be fetched
_BOM = b"\xef\xbb\xbf"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_FETCHABLE_SCHEMES = frozenset({"http", "https"})
_PORT = re.compile(r"[0-9]+")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")  # WHATWG: host must then be IPv4
# RFC 3986 reg-name characters without %-escapes, plus any non-ASCII character (IDN)
_HOST_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=\u0080-\U0010ffff]+")
_AUTHORITY_END = re.compile(r"[/?#]")

Kind = Literal["item", "blank", "comment", "rejected"]


@dataclass(frozen=True, slots=True)
class UrlItem:
    """One URL of a list: `key` is the md5 hex of the URL token's UTF-8 bytes."""

    key: str
    url: str


@dataclass
class ParseCounts:
    """Lines read so far, by kind; `items` includes items passed over by `skip`."""

    items: int = 0
    blank: int = 0
    comments: int = 0
    rejected: int = 0


def key_of(token: str) -> str:
    """md5 hex digest of the UTF-8 bytes of `token`."""
    return hashlib.md5(token.encode("utf-8"), usedforsecurity=False).hexdigest()


def _strip_ending(raw: bytes) -> bytes:
    """Drop a trailing LF, CRLF or CR and a leading UTF-8 BOM."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw[len(_BOM) :] if raw.startswith(_BOM) else raw


def parse_line(raw: bytes) -> UrlItem | Literal["blank", "comment", "rejected"]:
    """Classify one raw line (with or without its ending; CRLF and a leading BOM tolerated).

    Rejected: over MAX_LINE_BYTES, not UTF-8 (comments excepted), or a last token without a URI
    scheme. Only http/https are fetchable, but any scheme makes an item (see `url_problem`).
    """
    line = _strip_ending(raw)
    if len(line) > MAX_LINE_BYTES:
        return "rejected"
    if line.lstrip().startswith(b"#"):  # a comment's encoding does not matter
        return "comment"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "rejected"
    tokens = text.split()
    if not tokens:
        return "blank"
    if tokens[0].startswith("#"):
        return "comment"
    url = tokens[-1]
    if not _SCHEME.match(url):
        return "rejected"
    return UrlItem(key=key_of(url), url=url)


def _next_kind(stream: BinaryIO) -> UrlItem | Literal["blank", "comment", "rejected"] | None:
    """Parse the next line of `stream` (None at its end), holding at most ~64 KiB of it."""
    limit = MAX_LINE_BYTES + 2  # room for the longest accepted content and a CRLF
    chunk = stream.readline(limit)
    if not chunk:
        return None
    if len(chunk) < limit or chunk.endswith(b"\n"):
        return parse_line(chunk)
    while chunk and not chunk.endswith(b"\n"):  # too long: drain the rest, keeping none of it
        chunk = stream.readline(limit)
    return "rejected"


def _count(counts: ParseCounts, kind: UrlItem | Literal["blank", "comment", "rejected"]) -> None:
    """Add one line of the given kind to `counts`."""
    if isinstance(kind, UrlItem):
        counts.items += 1
    elif kind == "blank":
        counts.blank += 1
    elif kind == "comment":
        counts.comments += 1
    else:
        counts.rejected += 1


def iter_items(
    stream: BinaryIO,
    counts: ParseCounts | None = None,
    *,
    skip: int = 0,
    count: int | None = None,
) -> Iterator[UrlItem]:
    """Yield the items of a binary stream line by line (only LF ends a line).

    `skip` and `count` apply to items, as `download --skip N --count N` does; reading stops once
    `count` items were yielded. `counts` is updated as lines are read (skipped items included).
    """
    if skip < 0 or (count is not None and count < 0):
        raise ValueError("skip and count must not be negative")
    counts = counts if counts is not None else ParseCounts()
    seen = yielded = 0
    while count is None or yielded < count:
        kind = _next_kind(stream)
        if kind is None:
            return
        _count(counts, kind)
        if isinstance(kind, UrlItem):
            seen += 1
            if seen > skip:
                yielded += 1
                yield kind


def url_problem(url: str) -> tuple[str, str] | None:
    """('bad_scheme' | 'invalid_url', detail) when `url` can't be fetched, else None (no DNS)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return ("invalid_url", "no URI scheme")
    name = scheme.group()[:-1].lower()
    if name not in _FETCHABLE_SCHEMES:
        return ("bad_scheme", f"scheme {name!r} is not http or https")
    problem = _text_problem(url) or _authority_problem(url[scheme.end() :])
    return None if problem is None else ("invalid_url", problem)


def _text_problem(url: str) -> str | None:
    """Length, whitespace and control characters."""
    if len(url) > MAX_URL_CHARS:
        return f"URL longer than {MAX_URL_CHARS} characters"
    for char in url:
        if char.isspace() or ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
            return f"whitespace or control character {char!r} in URL"
    return None


def _authority_problem(rest: str) -> str | None:
    """Check the '//userinfo@host:port' part that follows 'http:'."""
    if not rest.startswith("//"):
        return "no '//' authority after the scheme"
    end = _AUTHORITY_END.search(rest, 2)
    authority = rest[2 : end.start() if end else len(rest)]
    host_port = authority.rpartition("@")[2]  # userinfo (credentials included) is allowed
    if host_port.startswith("["):
        host, sep, after = host_port[1:].partition("]")
        if not sep:
            return "unterminated IPv6 literal"
        return _ipv6_problem(host) or _port_problem(after)
    host, sep, port = host_port.partition(":")
    return _host_problem(host) or (_port_problem(sep + port) if sep else None)


def _ipv6_problem(host: str) -> str | None:
    """An IPv6 literal without a zone: a zone ('%25eth0') only names a link-local interface, and
    link-local addresses are always refused (see common.addresses)."""
    if "%" in host:
        return f"IPv6 zone ids are not supported ({host!r})"
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"unparseable IPv6 literal {host!r}"
    return None


def _port_problem(after: str) -> str | None:
    """What follows the host: nothing, ':' or ':<port 1..65535>'."""
    if after in ("", ":"):
        return None
    port = after[1:]
    if not after.startswith(":") or not _PORT.fullmatch(port):
        return f"bad port {after!r}"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} out of range"
    return None


def _host_problem(host: str) -> str | None:
    """A registered name or dotted IPv4 literal: no empty labels, no stray characters."""
    if not host:
        return "no host"
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if any(not label for label in labels):
        return f"empty label in host {host!r}"
    if not _HOST_CHARS.fullmatch(host):
        return f"bad character in host {host!r}"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            return f"invalid IPv4 address {host!r}"
    return None


# ---- opening sources: URL lists (file, .gz, http(s) URL) and folders of images ------------------

GZIP_MAGIC = b"\x1f\x8b"
# what reading a list may raise part way: a corrupt or cut gzip, a body cut off or badly encoded
CORRUPT_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, DecodeError)
READ_ERRORS = (*CORRUPT_ERRORS, OSError, HTTPError, HTTPException)


class SourceError(Exception):
    """The source itself can't be read (missing file, unreachable URL list)."""


class ListBroken(SourceError):
    """A URL list that could not be read to its end (corrupt or truncated gzip, a body cut off);
    the items before the break were submitted."""

    def __init__(self, lines: int, error: BaseException):
        super().__init__()
        self.lines = lines
        self.error = error
        self.items = 0
        self.source = "the URL list"

    def message(self, again: str = "submit it again") -> str:
        """One line for the user; `again` says how to resume."""
        corrupt = isinstance(self.error, CORRUPT_ERRORS)
        what = "is corrupt" if corrupt else "could not be read to its end"
        fix = "fix the file and " if corrupt else ""
        items = "1 item" if self.items == 1 else f"{self.items} items"
        why = (str(self.error) or type(self.error).__name__)[:200]
        were = "was" if self.items == 1 else "were"
        return (
            f"{self.source} {what} after line {self.lines} ({why}): the {items} before it "
            f"{were} submitted; {fix}{again}, already-known items are skipped"
        )

    def __str__(self) -> str:
        return self.message()


def is_url(source: str) -> bool:
    """True for an http(s) URL of a URL list."""
    return source.lower().startswith(("http://", "https://"))


def file_key(path: Path) -> str:
    """Key of a local file: md5 of its absolute path (the record's name is the relative path)."""
    return hashlib.md5(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()


def iter_folder(root: Path, skip: int = 0, count: int | None = None) -> Iterator[ChunkItem]:
    """Items of every file under root, sorted, without their bytes (read when sent)."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            seen += 1
            if seen <= skip:
                continue
            if count is not None and seen > skip + count:
                return
            path = Path(dirpath) / name
            yield {"k": file_key(path), "p": path.relative_to(root).as_posix(), "_path": str(path)}


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """A path that is not a regular file (a FIFO, a device, a socket, a folder, or a link to one)."""


def _not_regular(path: str | Path, mode: int) -> NotRegularFile:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return NotRegularFile(f"{path} is {kind}, not a regular file")


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading (binary), or raise NotRegularFile without blocking: a FIFO
    or a device (also behind a symlink) is refused by its stat before any open, and the opened
    descriptor is checked again (O_NONBLOCK: a FIFO put in its place meanwhile does not block the
    open). Other failures raise their OSError."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class FileTooLarge(ValueError):
    """A file over the byte limit."""


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (FileTooLarge past it, also when it grows
    while read); never blocks on, or reads without end from, a FIFO or a device (NotRegularFile)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLarge(f"{size} bytes exceeds {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(f"more than {max_bytes} bytes (the file grew while it was read)")
    return data


@contextmanager
def open_list(source: str, settings: Settings) -> Iterator[BinaryIO]:
    """A binary stream of a URL list: local file (gzip by extension) or http(s) URL (gzip when
    the body, once its Content-Encoding is undone, starts as gzip does). A local source must be
    a regular file (SourceError otherwise: /dev/zero would be read without end, a FIFO block)."""
    if is_url(source):
        from common.fetch import open_stream, policy_from_settings  # fetch imports url_problem from here

        with open_stream(source, policy_from_settings(settings)) as stream:
            try:
                gzipped = stream.peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] == GZIP_MAGIC
            except READ_ERRORS as e:
                raise ListBroken(0, e) from e
            if not gzipped:
                yield stream
                return
            with gzip.GzipFile(fileobj=stream) as unzipped:
                yield unzipped  # type: ignore[misc]  # a binary stream; typeshed's GzipFile is no BinaryIO
        return
    try:
        f = open_regular(source)
    except NotRegularFile as e:
        raise SourceError(f"{e}: a URL list is a file (.gz too) or an http(s) URL") from None
    with f:
        if source.endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]  # as above
        else:
            yield f
