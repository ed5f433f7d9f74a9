"""Sources: URL-list lines to items (pure, `<id><TAB><url>` as in fall11_urls.txt or one URL a
line), URL checks, and opening a source (a list file, .gz too, an http(s) URL of one, a folder).

An item's URL is the last whitespace-separated token of a non-blank, non-comment line; its key is
the md5 hex digest of that token's UTF-8 bytes. Lines without a URL token are rejected, never fatal.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, TypedDict

from common.fetching.urls import SCHEME

if TYPE_CHECKING:
    from common.settings import Settings

__all__ = [
    "CORRUPT_ERRORS",
    "FileTooLarge",
    "MAX_LINE_BYTES",
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
]

MAX_LINE_BYTES = 64 * 1024  # longest line (without its ending) that can hold an item
_BOM = b"\xef\xbb\xbf"

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
    if not SCHEME.match(url):
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


GZIP_MAGIC = b"\x1f\x8b"
# what reading a list may raise part way: a corrupt or cut gzip; a body cut off or badly encoded
# (an OSError from `fetch.open_stream`)
CORRUPT_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
READ_ERRORS = (*CORRUPT_ERRORS, OSError)


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


class LocalFile(TypedDict):
    """A file of a folder being submitted, as the producer journals it: its key, its path in the
    folder and on this machine (the bytes are read when it is sent: `FileItem` on the wire)."""

    k: str
    p: str
    path: str


def iter_folder(root: Path, skip: int = 0, count: int | None = None) -> Iterator[LocalFile]:
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
            yield {"k": file_key(path), "p": path.relative_to(root).as_posix(), "path": str(path)}


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
    a regular file (SourceError otherwise: /dev/zero would be read without end, a FIFO block); a
    URL that cannot be fetched is a SourceError too."""
    if is_url(source):
        from common.fetching.fetch import FetchError, open_stream, policy_from_settings

        with ExitStack() as stack:
            try:
                stream = stack.enter_context(open_stream(source, policy_from_settings(settings)))
            except FetchError as e:
                raise SourceError(f"cannot fetch the URL list {source}: {e.reason}: {e.detail}") from e
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
