"""Unit tests of common.fetching.sources: URL-list lines to items, URL checks, the streaming reader."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.fetching.sources import (
    MAX_LINE_BYTES,
    FileTooLarge,
    NotRegularFile,
    ParseCounts,
    SourceError,
    UrlItem,
    iter_items,
    key_of,
    open_list,
    open_regular,
    parse_line,
    read_regular,
)
from common.fetching.urls import MAX_URL_CHARS, url_problem
from common.settings import Settings

FLICKR = "http://farm1.static.flickr.com/145/430300483_21e993670c.jpg"


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def items_of(blob: bytes, counts: ParseCounts | None = None, **kw: int | None) -> list[str]:
    return [item.url for item in iter_items(io.BytesIO(blob), counts, **kw)]


# --- parse_line ------------------------------------------------------------------------------


def test_fall11_line() -> None:
    item = parse_line(f"n00015388_12\t{FLICKR}\n".encode())
    assert item == UrlItem(key=md5(FLICKR), url=FLICKR)
    assert item.key == key_of(FLICKR) == "588da98d8f5fc9966c2d43b8eaadd2c6"


@pytest.mark.parametrize(
    "raw",
    [
        FLICKR.encode(),
        f"{FLICKR}\n".encode(),
        f"{FLICKR}\r\n".encode(),
        f"{FLICKR}\r".encode(),
        f"  {FLICKR}  \n".encode(),
        f"n00015388_12\t{FLICKR}\r\n".encode(),
        f"n00015388_12   extra words\t{FLICKR}".encode(),
        b"\xef\xbb\xbf" + FLICKR.encode() + b"\n",
        b"\xef\xbb\xbfn00015388_12\t" + FLICKR.encode() + b"\r\n",
    ],
)
def test_item_lines(raw: bytes) -> None:
    assert parse_line(raw) == UrlItem(key=md5(FLICKR), url=FLICKR)


def test_key_is_of_the_token_as_written() -> None:
    url = "HTTP://Example.COM/ä%20b?q=1#frag"
    item = parse_line(f"id\t{url}\n".encode())
    assert isinstance(item, UrlItem)
    assert item.url == url
    assert item.key == hashlib.md5(url.encode("utf-8")).hexdigest()
    assert item.key != key_of("http://example.com/ä%20b?q=1#frag")


@pytest.mark.parametrize("raw", [b"", b"\n", b"\r\n", b"   \t  \r\n", b"\xef\xbb\xbf\n", b"\x0b\x0c\n"])
def test_blank_lines(raw: bytes) -> None:
    assert parse_line(raw) == "blank"


@pytest.mark.parametrize(
    "raw",
    [
        b"# comment\n",
        b"   # indented http://x/y\n",
        b"\t#\n",
        b"#http://x/y",
        b"\xef\xbb\xbf# c\n",
        b"# caf\xe9 (latin-1)\n",
        "\u00a0# after a no-break space".encode(),
    ],
)
def test_comment_lines(raw: bytes) -> None:
    assert parse_line(raw) == "comment"


@pytest.mark.parametrize(
    "raw",
    [
        b"hello world\n",
        b"n00000001_1\n",
        b"http://ok/ then-junk\n",  # the URL must be the LAST token
        b"//example.com/a.jpg\n",
        b"1http://x/\n",
        b"\xff\xfe http://x/\n",  # not UTF-8
        b"n0001\thttp://x/\xe9.jpg\n",  # latin-1 byte in the URL
        b"http://x/\xed\xa0\x80\n",  # encoded surrogate
        b"x" * (MAX_LINE_BYTES + 1),
        b"n1\thttp://x/" + b"a" * MAX_LINE_BYTES + b"\n",
    ],
)
def test_rejected_lines(raw: bytes) -> None:
    assert parse_line(raw) == "rejected"


def test_line_at_the_cap_is_accepted() -> None:
    url = "http://x/" + "a" * (MAX_LINE_BYTES - 9)
    assert len(url) == MAX_LINE_BYTES
    assert parse_line(url.encode() + b"\r\n") == UrlItem(key=md5(url), url=url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://ftp.example.com/a.jpg",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "mailto:a@b.c",
        "gopher://x/",
        "localhost:8080/a.jpg",
    ],
)
def test_other_schemes_are_items_then_bad_scheme(url: str) -> None:
    item = parse_line(f"n1\t{url}\n".encode())
    assert item == UrlItem(key=md5(url), url=url)
    problem = url_problem(url)
    assert problem is not None and problem[0] == "bad_scheme"


def test_nul_bytes_do_not_break_parsing() -> None:
    item = parse_line(b"n1\thttp://x/a\x00b.jpg\n")
    assert isinstance(item, UrlItem)
    problem = url_problem(item.url)
    assert problem == ("invalid_url", "whitespace or control character '\\x00' in URL")
    assert parse_line(b"\x00\x00\n") == "rejected"


# --- url_problem ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        FLICKR,
        "https://example.com",
        "HTTPS://EXAMPLE.COM/A.JPG",
        "hTtP://example.com:8080/a.jpg?x=1&y=2#f",
        "http://example.com:/a.jpg",
        "http://example.com./a.jpg",
        "http://user:secret@example.com/a.jpg",
        "http://user@example.com/a.jpg",
        "http://93.184.216.34/a.jpg",
        "http://127.0.0.1:65535/",  # addresses are judged later, after resolution
        "http://[2606:4700:4700::1111]/a.jpg",
        "http://[::1]:8080/",
        "http://bücher.de/ä.jpg",
        "http://xn--bcher-kva.de/",
        "http://a_b.example.com/",
        "http://example.com/a%20b.jpg",
        "http://example.com/path/with:colon@at",
        "http://x/" + "a" * (MAX_URL_CHARS - 9),
    ],
)
def test_fetchable_urls(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http:example.com", "authority"),
        ("http:/example.com", "authority"),
        ("http:\\\\example.com", "authority"),
        ("http://", "no host"),
        ("http:///a.jpg", "no host"),
        ("http://?q", "no host"),
        ("http://user:pw@/a.jpg", "no host"),
        ("http://:80/", "no host"),
        ("http://example.com:0/", "out of range"),
        ("http://example.com:65536/", "out of range"),
        ("http://example.com:99999999999999999999/", "out of range"),
        ("http://example.com:-1/", "bad port"),
        ("http://example.com:http/", "bad port"),
        ("http://example.com:٨٠/", "bad port"),
        ("http://example.com:80:80/", "bad port"),
        ("http://[::1/", "IPv6"),
        ("http://[::1]x/", "bad port"),
        ("http://[not-ipv6]/", "IPv6"),
        ("http://[v1.fe]/", "IPv6"),
        ("http://[192.168.0.1]/", "IPv6"),
        ("http://[fe80::1%25eth0]/", "zone ids are not supported"),
        ("http://[fe80::1%eth0]:8080/", "zone ids are not supported"),
        ("http://[2606:4700::1111%251]/a.jpg", "zone ids are not supported"),
        ("http://::1/", "no host"),
        ("http://a..b/", "empty label"),
        ("http://.example.com/", "empty label"),
        ("http://example.com../", "empty label"),
        ("http://./", "empty label"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/a b.jpg", "whitespace"),
        ("http://example.com/a\tb", "whitespace"),
        ("http://example.com/a\x00", "control"),
        ("http://example.com/a\x7f", "control"),
        ("http://example.com/a\x85", "control"),
        ("http://example.com/\u00a0", "whitespace"),
        ("http://exa<mple.com/", "bad character"),
        ("http://exa%6dple.com/", "bad character"),
        ("http://a\\b.com/", "bad character"),
        ("http://127.1/", "IPv4"),
        ("http://2130706433/", "IPv4"),
        ("http://0x7f.0.0.1/", "IPv4"),
        ("http://example.0x7f/", "IPv4"),
        ("http://256.0.0.1/", "IPv4"),
        ("http://010.0.0.1/", "IPv4"),
        ("http://x/" + "a" * (MAX_URL_CHARS - 8), "longer than"),
        ("example.com/a.jpg", "scheme"),
        ("", "scheme"),
    ],
)
def test_invalid_urls(url: str, fragment: str) -> None:
    problem = url_problem(url)
    assert problem is not None
    reason, detail = problem
    assert reason == "invalid_url"
    assert fragment in detail


@pytest.mark.parametrize("url", ["FTP://x/", "File:///etc/passwd", "JavaScript:void(0)", "ws://x/"])
def test_bad_scheme_is_case_insensitive(url: str) -> None:
    problem = url_problem(url)
    assert problem is not None and problem[0] == "bad_scheme"
    assert url.split(":")[0].lower() in problem[1]


# --- iter_items ------------------------------------------------------------------------------

BLOB = (
    b"\xef\xbb\xbfn1\thttp://a/1.jpg\r\n"
    b"# a comment\n"
    b"\n"
    b"junk line\n"
    b"n2\thttp://a/2.jpg\n"
    b"   \n"
    b"\xff\xfe\n"
    b"n3\tftp://a/3.jpg\n"
    b"http://a/4.jpg\n"
    b"n5\thttp://a/5.jpg"  # no final newline
)
ALL = ["http://a/1.jpg", "http://a/2.jpg", "ftp://a/3.jpg", "http://a/4.jpg", "http://a/5.jpg"]


def test_iter_items_and_counts() -> None:
    counts = ParseCounts()
    assert items_of(BLOB, counts) == ALL
    assert counts == ParseCounts(items=5, blank=2, comments=1, rejected=2)


def test_iter_items_without_counts() -> None:
    assert items_of(BLOB) == ALL


@pytest.mark.parametrize(
    ("skip", "count", "expected"),
    [
        (0, None, ALL),
        (2, None, ALL[2:]),
        (0, 2, ALL[:2]),
        (1, 3, ALL[1:4]),
        (4, 10, ALL[4:]),
        (5, None, []),
        (99, 1, []),
        (0, 0, []),
        (3, 0, []),
    ],
)
def test_skip_and_count_apply_to_items(skip: int, count: int | None, expected: list[str]) -> None:
    assert items_of(BLOB, skip=skip, count=count) == expected


def test_reading_stops_after_count_items() -> None:
    stream = io.BytesIO(b"http://a/1\nhttp://a/2\nhttp://a/3\n")
    counts = ParseCounts()
    assert [i.url for i in iter_items(stream, counts, skip=1, count=1)] == ["http://a/2"]
    assert counts.items == 2
    assert stream.read() == b"http://a/3\n"


def test_counts_update_as_lines_are_read() -> None:
    counts = ParseCounts()
    gen = iter_items(io.BytesIO(b"# c\n\nhttp://a/1\nbad\nhttp://a/2\n"), counts)
    next(gen)
    assert counts == ParseCounts(items=1, blank=1, comments=1)
    next(gen)
    assert counts == ParseCounts(items=2, blank=1, comments=1, rejected=1)


@pytest.mark.parametrize(("skip", "count"), [(-1, None), (0, -1)])
def test_negative_skip_or_count(skip: int, count: int | None) -> None:
    with pytest.raises(ValueError):
        list(iter_items(io.BytesIO(b""), skip=skip, count=count))


def test_empty_stream() -> None:
    counts = ParseCounts()
    assert items_of(b"", counts) == []
    assert counts == ParseCounts()


class _Tracking(io.BytesIO):
    """A stream that records the largest readline() result."""

    largest = 0

    def readline(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        line = super().readline(size)
        self.largest = max(self.largest, len(line))
        return line


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_huge_lines_are_rejected_in_bounded_memory(ending: bytes) -> None:
    huge = b"n1\thttp://a/" + b"x\x00" * (3 * MAX_LINE_BYTES) + ending
    tail = b"http://a/2\n" if ending else b""
    stream = _Tracking(b"http://a/1\n" + huge + tail)
    counts = ParseCounts()
    urls = [item.url for item in iter_items(stream, counts)]
    assert urls == (["http://a/1", "http://a/2"] if ending else ["http://a/1"])
    assert counts.rejected == 1
    assert stream.largest <= MAX_LINE_BYTES + 2


@pytest.mark.parametrize("extra", [-1, 0, 1, 2])
def test_lines_around_the_cap(extra: int) -> None:
    url = "http://x/" + "a" * (MAX_LINE_BYTES - 9 + extra)
    kept = [url] if extra <= 0 else []
    for ending in (b"\n", b"\r\n"):
        assert items_of(url.encode() + ending + b"http://next/") == [*kept, "http://next/"]
    assert items_of(url.encode()) == kept


def test_only_lf_ends_a_line() -> None:
    counts = ParseCounts()
    assert items_of(b"http://a/1\rhttp://a/2\r", counts) == ["http://a/2"]
    assert counts.items == 1


# --- properties -----------------------------------------------------------------------------

LINE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"#", b"http://", b"\t", b" ", b"\r", b"\xef\xbb\xbf", b"a:", b"\x00"]),
)
BLOBS = st.lists(st.one_of(LINE_BYTES, st.just(b"\n")), max_size=30).map(b"".join)


def _line_count(blob: bytes) -> int:
    return blob.count(b"\n") + (0 if blob == b"" or blob.endswith(b"\n") else 1)


@given(st.lists(LINE_BYTES, max_size=4).map(b"".join))
def test_parse_line_never_raises(raw: bytes) -> None:
    result = parse_line(raw)
    assert isinstance(result, UrlItem) or result in ("blank", "comment", "rejected")
    if isinstance(result, UrlItem):
        assert result.key == hashlib.md5(result.url.encode()).hexdigest()
        assert result.url and not any(c.isspace() for c in result.url)
        assert result.url in raw.decode("utf-8")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(BLOBS, st.integers(0, 5), st.one_of(st.none(), st.integers(0, 5)))
def test_iter_items_counts_every_line(blob: bytes, skip: int, count: int | None) -> None:
    counts = ParseCounts()
    items = list(iter_items(io.BytesIO(blob), counts))
    assert counts.items + counts.blank + counts.comments + counts.rejected == _line_count(blob)
    assert len(items) == counts.items
    expected = [parse_line(line) for line in blob.split(b"\n")[: _line_count(blob)]]
    assert items == [item for item in expected if isinstance(item, UrlItem)]
    window = items[skip:] if count is None else items[skip : skip + count]
    assert list(iter_items(io.BytesIO(blob), skip=skip, count=count)) == window


@given(st.text(max_size=300))
def test_url_problem_never_raises(url: str) -> None:
    problem = url_problem(url)
    assert problem is None or problem[0] in ("bad_scheme", "invalid_url")


URLISH = st.builds(
    "".join,
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "http://",
                    "https://",
                    "HTTP://",
                    "ftp://",
                    "[",
                    "]",
                    ":",
                    "@",
                    "/",
                    "%25",
                    ".",
                    "::1",
                    "127.0.0.1",
                    "0x",
                    "65536",
                    "example.com",
                    "?",
                    "#",
                    " ",
                    "\\",
                ]
            ),
            st.text(max_size=5),
        ),
        max_size=8,
    ),
)


@given(URLISH)
def test_url_problem_never_raises_on_url_like_text(url: str) -> None:
    problem = url_problem(url)
    if problem is None:
        assert url.lower().startswith(("http://", "https://"))
        assert not any(c.isspace() for c in url)


def _stream(blob: bytes) -> BinaryIO:
    return io.BufferedReader(io.BytesIO(blob), buffer_size=7)  # type: ignore[arg-type]


@given(BLOBS)
def test_iter_items_on_a_buffered_reader(blob: bytes) -> None:
    assert list(iter_items(_stream(blob))) == list(iter_items(io.BytesIO(blob)))


# --- local files: regular files only, read within bounds --------------------------------------


def _returns(call: Callable[[], object]) -> object:
    """call() on a thread, failing the test instead of hanging when it blocks (on a FIFO)."""
    result: list = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a guard against a hang, not a speed: each call here takes microseconds
    assert result, "blocked"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture
def specials(tmp_path: Path) -> dict[str, Path]:
    """A FIFO without a writer, a symlink to /dev/zero, a socket, a folder, a regular file and a
    symlink to it."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    yield {name: tmp_path / name for name in ("fifo", "zero", "sock", "dir", "file", "link")}
    sock.close()


@pytest.mark.parametrize(
    ("name", "kind"),
    [("fifo", "a FIFO"), ("zero", "a character device"), ("sock", "a socket"), ("dir", "a folder")],
)
def test_only_regular_files_are_opened(specials: dict[str, Path], name: str, kind: str) -> None:
    with pytest.raises(NotRegularFile, match=f"is {kind}.*, not a regular file"):
        _returns(lambda: open_regular(specials[name]))
    with pytest.raises(NotRegularFile):
        _returns(lambda: read_regular(specials[name], 100))
    assert _returns(lambda: read_regular(specials["link"], 100)) == b"12345"  # a link to a file is fine


def test_a_fifo_swapped_in_after_the_check_does_not_block(
    specials: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = os.stat(specials["file"])
    monkeypatch.setattr(
        "common.fetching.sources.os.stat", lambda path: regular
    )  # "it was a file a moment ago"
    with pytest.raises(NotRegularFile, match="FIFO"):
        _returns(lambda: open_regular(specials["fifo"]))


def test_read_regular_is_bounded(specials: dict[str, Path]) -> None:
    assert read_regular(specials["file"], 5) == b"12345"
    with pytest.raises(FileTooLarge, match="5 bytes exceeds 4"):
        read_regular(specials["file"], 4)
    with pytest.raises(FileNotFoundError):
        read_regular(specials["dir"] / "missing", 4)


@pytest.mark.parametrize("name", ["fifo", "zero", "sock"])
def test_a_url_list_must_be_a_regular_file(specials: dict[str, Path], name: str) -> None:
    def read() -> None:
        with open_list(str(specials[name]), Settings()) as stream:
            stream.read(1)

    with pytest.raises(SourceError, match="not a regular file: a URL list is a file"):
        _returns(read)
    for source in ("/dev/zero", "/dev/null"):
        with pytest.raises(SourceError, match="character device"):
            _returns(lambda source=source: open_list(source, Settings()).__enter__())


def test_a_url_list_file_and_its_gzip_still_open(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "urls.txt").write_bytes(b"http://a/1\n")
    (tmp_path / "urls.txt.gz").write_bytes(gzip.compress(b"http://a/2\n"))
    for name, url in (("urls.txt", "http://a/1"), ("urls.txt.gz", "http://a/2")):
        with open_list(str(tmp_path / name), Settings()) as stream:
            assert [i.url for i in iter_items(stream)] == [url]
