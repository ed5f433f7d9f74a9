"""The record format, its serializer, the rotating shard writer, crash recovery and the reader.

A record is a `tf.train.Example` (features `image_name`, `image_l`, `image_ab`,
`image_embedding`, plus `image_key` and `image_source`) written here straight in protobuf wire
format and framed as TFRecord by hand (crc32c from google-crc32c). TensorFlow is imported only
by `read_dataset`.

Measured on the 2-core dev machine, one 299×299 record (1.08 MB), best of 5 runs:
  `serialize_example`:                                          0.053 ms
  tf.train.Example(FloatList(value=arr.ravel())) + serialize:  46 ms
  the same with `.tolist()`:                                    11 ms
  TFRecord framing (two crc32c + concat):                       0.064 ms (crc32c: 13 GiB/s)
  `example_key` on a serialized record:                         0.014 ms
  `ShardWriter.append` of 8 records with fsync:                 2.1 ms per record (disk bound)
  finalizing gzip/zlib: ~28 ms per record at level 1, ~34 ms at level 6 (Lab floats shrink 8-30%).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import google_crc32c
import numpy as np

if google_crc32c.implementation != "c":
    warnings.warn("google-crc32c runs without its C extension: TFRecord CRCs will be slow", stacklevel=1)

if TYPE_CHECKING:
    import tensorflow as tf

SHARD_PREFIX = "lab_images_"
SHARD_GLOB = "lab_images_*.tfrecord*"  # what training reads: finalized shards only
EXTENSIONS = {"none": "", "gzip": ".gz", "zlib": ".zlib"}
EMBEDDING_SIZE = 1001
KEY_FEATURE = b"image_key"
_TEMP_RE = re.compile(r"\.lab_images_(?P<node>.+)_(?P<n>\d{5,})\.tfrecord(?:\.gz|\.zlib)?\.tmp")
_MAX_RECORD = 1 << 31  # sanity cap on a record length read from an (already CRC-checked) header


# ---- TFRecord framing ------------------------------------------------------------------------------


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked crc32c of `data`."""
    crc = google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame_pieces(data: bytes) -> tuple[bytes, bytes, bytes]:
    """A TFRecord as (uint64 length + its masked crc, data, masked crc of the data)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)), data, struct.pack("<I", masked_crc32c(data))


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of it, data, masked crc of the data."""
    return b"".join(_frame_pieces(data))


def _read_records(f: BinaryIO, limit: int = _MAX_RECORD) -> Iterator[tuple[int, int, bytes]]:
    """(offset, end, data) of each valid record of a TFRecord stream, stopping at the first bad one."""
    offset = 0
    while True:
        header = f.read(12)
        if len(header) < 12:
            return
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc or length > limit:
            return
        body = f.read(length + 4)
        if len(body) < length + 4:
            return
        data = body[:length]
        if masked_crc32c(data) != struct.unpack("<I", body[length:])[0]:
            return
        end = offset + 16 + length
        yield offset, end, data
        offset = end


def scan_records(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, end) of every complete, CRC-valid record of an uncompressed TFRecord file, and the
    offset where that valid prefix ends (a torn or corrupt record and everything after it is cut)."""
    spans: list[tuple[int, int]] = []
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        for start, end, _ in _read_records(f, limit=size):
            spans.append((start, end))
    return spans, spans[-1][1] if spans else 0


class _ZlibReader(io.RawIOBase):
    """A readable stream of a zlib-compressed file (TFRecord's ZLIB option)."""

    def __init__(self, raw: BinaryIO):
        self._raw, self._z, self._buf = raw, zlib.decompressobj(), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._z.unconsumed_tail or (b"" if self._z.eof else self._raw.read(1 << 16))
            if not data:
                return 0
            self._buf = self._z.decompress(data, 1 << 20)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_read(path: Path) -> BinaryIO:
    """A file opened for reading its TFRecords: temp shards are raw, finals by extension."""
    name = Path(path).name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zlib"):
        return io.BufferedReader(_ZlibReader(open(path, "rb")), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def iter_examples(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(offset, end, serialized example) of each valid record (offsets in the uncompressed stream)."""
    with _open_read(path) as f:
        yield from _read_records(f)


# ---- protobuf wire format: writing --------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_head(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(length)


def _bytes_feature(value: bytes) -> tuple[int, list]:
    """Feature{bytes_list: BytesList{value: [value]}}: (field number in Feature, payload pieces)."""
    return 1, [_len_head(1, len(value)), value]


def _float_feature(values: np.ndarray) -> tuple[int, list]:
    """Feature{float_list: FloatList{value: packed floats}}, the float data not copied."""
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return 2, ([_len_head(1, data.nbytes), data] if data.size else [])


def _nbytes(pieces: list) -> int:
    return sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in pieces)


def serialize_features(features: dict[bytes, tuple[int, list]]) -> bytes:
    """A serialized tf.train.Example of prebuilt features, map entries sorted by name (as protobuf's
    deterministic serialization orders them)."""
    body: list = []
    for name in sorted(features):
        kind, payload = features[name]
        payload_len = _nbytes(payload)
        key = _len_head(1, len(name)) + name
        feature_head = _len_head(kind, payload_len)
        value_head = _len_head(2, len(feature_head) + payload_len)
        entry_len = len(key) + len(value_head) + len(feature_head) + payload_len
        body += [_len_head(1, entry_len), key, value_head, feature_head, *payload]
    return b"".join([_len_head(1, _nbytes(body)), *body])


def serialize_example(
    name: bytes,
    key: bytes,
    source: bytes,
    l: np.ndarray,  # noqa: E741
    ab: np.ndarray,
    embedding: np.ndarray,
) -> bytes:
    """One record, byte-identical to `tf.train.Example(...).SerializeToString(deterministic=True)`."""
    if np.size(ab) != 2 * np.size(l):
        raise ValueError(f"image_ab has {np.size(ab)} values for {np.size(l)} of image_l (expected 2×)")
    return serialize_features(
        {
            b"image_ab": _float_feature(ab),
            b"image_embedding": _float_feature(embedding),
            b"image_key": _bytes_feature(bytes(key)),
            b"image_l": _float_feature(l),
            b"image_name": _bytes_feature(bytes(name)),
            b"image_source": _bytes_feature(bytes(source)),
        }
    )


# ---- protobuf wire format: reading one bytes feature ------------------------------------------


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed protobuf: bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value_end = _read_varint(buf, pos)[1]
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value_end = pos + length
        elif wire in (1, 5):
            value_end = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"malformed protobuf: wire type {wire}")
        if value_end > end:
            raise ValueError("malformed protobuf: field runs past its message")
        yield tag >> 3, wire, pos, value_end
        pos = value_end


def _sub(buf: memoryview, start: int, end: int, field: int) -> Iterator[tuple[int, int]]:
    """Spans of the length-delimited occurrences of `field` in buf[start:end]."""
    for number, wire, s, e in _fields(buf, start, end):
        if number == field and wire == 2:
            yield s, e


def feature_span(buf: memoryview, name: bytes) -> tuple[int, int]:
    """Span of the Feature message named `name` in a serialized Example (the last entry wins)."""
    found = None
    for fs, fe in _sub(buf, 0, len(buf), 1):  # Example.features
        for es, ee in _sub(buf, fs, fe, 1):  # Features.feature map entries
            key = value = None
            for number, wire, s, e in _fields(buf, es, ee):
                if wire == 2 and number == 1:
                    key = bytes(buf[s:e])
                elif wire == 2 and number == 2:
                    value = (s, e)
            if key == name:
                found = value or (0, 0)
    if found is None:
        raise KeyError(name.decode(errors="replace"))
    return found


def example_floats(serialized: bytes, name: bytes) -> np.ndarray:
    """The float_list values of feature `name` of a serialized Example, without TensorFlow."""
    buf = memoryview(serialized)
    start, end = feature_span(buf, name)
    parts = [
        np.frombuffer(buf[vs:ve], "<f4")
        for ls, le in _sub(buf, start, end, 2)  # Feature.float_list
        for number, wire, vs, ve in _fields(buf, ls, le)
        if number == 1 and wire in (2, 5)
    ]  # packed, or one fixed32 value
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def example_bytes_feature(serialized: bytes, name: bytes) -> bytes:
    """First value of the bytes feature `name` of a serialized Example, without TensorFlow
    (any map entry order; the last entry of a repeated name wins, as protobuf merges maps)."""
    buf = memoryview(serialized)
    start, end = feature_span(buf, name)
    for ls, le in _sub(buf, start, end, 1):  # Feature.bytes_list
        for vs, ve in _sub(buf, ls, le, 1):  # BytesList.value
            return bytes(buf[vs:ve])
    raise ValueError(f"feature {name!r} holds no bytes value")


def example_key(serialized: bytes) -> bytes:
    """The `image_key` (md5 item key) of a serialized example."""
    return example_bytes_feature(serialized, KEY_FEATURE)


# ---- files and names -------------------------------------------------------------------------------


def safe_node(node: str) -> str:
    """The node name as it appears in shard names: characters outside [A-Za-z0-9._-] become '-'."""
    if not node:
        raise ValueError("empty node name")
    return re.sub(r"[^A-Za-z0-9._-]", "-", node)


def shard_name(node: str, number: int, compression: str = "none") -> str:
    """`lab_images_<node>_<n:05d>.tfrecord[.gz|.zlib]`."""
    return f"{SHARD_PREFIX}{safe_node(node)}_{number:05d}.tfrecord{EXTENSIONS[compression]}"


def _node_re(node: str) -> re.Pattern[str]:
    """Any file of this node's numbering: finals (also renamed with a `val_`-like prefix), temps."""
    return re.compile(
        rf"\.?(?:[A-Za-z0-9]+_)?{SHARD_PREFIX}{re.escape(safe_node(node))}_(\d{{5,}})"
        r"\.tfrecord(?:\.gz|\.zlib)?(?:\.tmp)?(?:\.partial)?"
    )


def highest_number(out_dir: Path, node: str) -> int:
    """The highest shard number of this node on disk (final or temporary), -1 when none."""
    pattern = _node_re(node)
    numbers = [int(m.group(1)) for name in os.listdir(out_dir) if (m := pattern.fullmatch(name))]
    return max(numbers, default=-1)


def final_path(temp: Path, compression: str) -> Path:
    """The final name of a temp shard `.<name>.tmp` for the given compression."""
    name = temp.name
    if not (name.startswith(".") and name.endswith(".tmp")):
        raise ValueError(f"not a temporary shard name: {name}")
    base = re.sub(r"(\.gz|\.zlib)$", "", name[1:-4])
    return temp.with_name(base + EXTENSIONS[compression])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_IOV_MAX = 1020  # below Linux's 1024 iovecs per writev


def _writev_all(fd: int, pieces: list[bytes]) -> None:
    """Write the pieces in order with writev, without joining them (records are ~1 MB each)."""
    views = [memoryview(p) for p in pieces if len(p)]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i : i + _IOV_MAX])
        while written:  # skip what was written; a partly written piece keeps its rest
            if written >= len(views[i]):
                written -= len(views[i])
                i += 1
            else:
                views[i], written = views[i][written:], 0


def _write_final(
    src: Path, dst: Path, compression: str, level: int, spans: list[tuple[int, int]] | None = None
) -> None:
    """Copy src (or only its byte `spans`) into dst, as a gzip or zlib stream (what TFRecordDataset's
    GZIP/ZLIB read) or plain, and fsync it."""
    z = (
        None
        if compression == "none"
        else zlib.compressobj(level, zlib.DEFLATED, 31 if compression == "gzip" else 15)
    )
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for start, end in [(0, os.fstat(fin.fileno()).st_size)] if spans is None else spans:
            fin.seek(start)
            while chunk := fin.read(min(1 << 20, end - fin.tell())):
                fout.write(z.compress(chunk) if z else chunk)
        if z:
            fout.write(z.flush())
        fout.flush()
        os.fsync(fout.fileno())


def finalize_temp(
    temp: Path, compression: str = "none", level: int = 6, spans: list[tuple[int, int]] | None = None
) -> Path | None:
    """Publish a temp shard (or only its record `spans`) under its final name, compressed if asked,
    atomically and durably; an empty one is deleted (None). Safe to repeat after a crash at any step:
    the temp is deleted only once the final is in place."""
    temp = Path(temp)
    final = final_path(temp, compression)
    if spans == [] or (spans is None and temp.stat().st_size == 0):
        temp.unlink()
        _fsync_dir(temp.parent)
        return None
    if compression == "none" and spans is None:
        _fsync_file(temp)
        os.replace(temp, final)
    else:
        partial = final.with_name(f".{final.name}.partial")
        _write_final(temp, partial, compression, level, spans)
        os.replace(partial, final)
    _fsync_dir(final.parent)
    plain = final_path(temp, "none")
    for ext in EXTENSIONS.values():  # a final left by an interrupted finalize with another setting
        sibling = plain.with_name(plain.name + ext)
        if sibling != final and sibling.exists():
            sibling.unlink()
    if temp.exists():
        temp.unlink()
    _fsync_dir(final.parent)
    return final


def recover_temp_shards(out_dir: Path, node: str | None = None) -> list[Path]:
    """Cut every temp shard (of `node`, or all: only when no writer is live) to its valid prefix and
    delete stale compression temps; returns the temp shards, sorted. What to keep is the caller's job."""
    out_dir = Path(out_dir)
    pattern = _node_re(node) if node is not None else None
    temps: list[Path] = []
    for path in sorted(out_dir.iterdir()):
        if pattern is not None and not pattern.fullmatch(path.name):
            continue
        if path.name.endswith(".partial") and path.name.startswith(".") and SHARD_PREFIX in path.name:
            path.unlink()
        elif _TEMP_RE.fullmatch(path.name):
            _truncate_valid(path)
            temps.append(path)
    _fsync_dir(out_dir)
    return temps


def _truncate_valid(path: Path) -> int:
    """Cut a temp shard to its valid prefix (fsynced); returns the new size."""
    _, end = scan_records(path)
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != end:
            f.truncate(end)
        os.fsync(f.fileno())
    return end


def rewrite_shard(temp: Path, keep: Callable[[bytes], bool]) -> int:
    """Keep only the valid records for which keep(serialized) is true (new file, fsync, replace);
    returns how many were kept. Holds one record in memory at a time."""
    temp = Path(temp)
    spans = [(start, end, keep(data)) for start, end, data in iter_examples(temp)]
    kept = [(start, end) for start, end, ok in spans if ok]
    if len(kept) == len(spans) and temp.stat().st_size == (spans[-1][1] if spans else 0):
        return len(kept)
    partial = temp.with_name(temp.name + ".partial")
    _write_final(temp, partial, "none", 0, kept)
    os.replace(partial, temp)
    _fsync_dir(temp.parent)
    return len(kept)


# ---- the writer ---------------------------------------------------------------------------------


class ShardWriter:
    """Appends records to a hidden, uncompressed temp shard and publishes it as
    `lab_images_<node>_<n>.tfrecord[.gz|.zlib]` when full, too old, or on close.

    A batch is never split: `append` finalizes first a shard that an earlier batch filled, so a
    shard holds `examples_per_shard` records plus less than one batch. A shard is never finalized
    inside the `append` that wrote to it, so the caller can still drop records of that batch
    (dedupe) from the shard whose path `append` returned: `discard` (crash-safe: the records stay
    on disk until the shard is finalized without them) or `truncate_to` then `append` the survivors
    (a kill in between loses the survivors). Age rotation happens only in `maybe_rotate` (call it
    after each append and when idle). Not thread-safe.
    """

    def __init__(
        self,
        out_dir: Path,
        node: str,
        *,
        examples_per_shard: int = 500,
        max_age: float = 600,
        compression: str = "none",
        compression_level: int = 6,
    ):
        if compression not in EXTENSIONS:
            raise ValueError(f"unknown compression {compression!r}; valid: {', '.join(EXTENSIONS)}")
        if examples_per_shard < 1:
            raise ValueError("examples_per_shard must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.node = safe_node(node)
        self.examples_per_shard = examples_per_shard
        self.max_age = max_age
        self.compression = compression
        self.compression_level = compression_level
        self.finalized: list[Path] = []
        self.path: Path | None = None  # the open temp shard
        self.count = 0  # records in it, not counting discarded ones
        self.offset = 0  # its size
        self._ends: list[int] = []
        self._discarded: set[int] = set()  # start offsets of records left out when finalizing
        self._fd: int | None = None
        self._opened = 0.0
        self._last_number = -1
        self._unpublished: list[tuple[Path, list[tuple[int, int]] | None]] = []  # closed, not yet renamed

    @property
    def age(self) -> float:
        """Seconds since the open shard was created (0 when none is open)."""
        return time.monotonic() - self._opened if self._fd is not None else 0.0

    def _open(self) -> None:
        number = max(self._last_number, highest_number(self.out_dir, self.node)) + 1
        while True:
            final = self.out_dir / shard_name(self.node, number, self.compression)
            path = final.with_name(f".{final.name}.tmp")
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                number += 1
        _fsync_dir(self.out_dir)
        self._last_number, self.path, self.count, self.offset = number, path, 0, 0
        self._ends, self._discarded = [], set()
        self._opened = time.monotonic()

    def append(self, records: list[bytes]) -> tuple[Path, int, int]:
        """Append serialized examples to the open temp shard, fsynced before returning;
        returns (temp path, offset before the batch, offset after)."""
        self._publish()
        if self._fd is not None and self.count >= self.examples_per_shard:
            self._finalize()
        if self._fd is None:
            self._open()
        assert self._fd is not None and self.path is not None
        start = self.offset
        try:
            _writev_all(self._fd, [piece for r in records for piece in _frame_pieces(r)])
            os.fsync(self._fd)
        except BaseException:
            try:
                self._cut(start)  # leave no partial batch behind
            except OSError:
                pass
            raise
        for r in records:
            self.offset += len(r) + 16
            self._ends.append(self.offset)
        self.count = len(self._ends) - len(self._discarded)
        return self.path, start, self.offset

    def _cut(self, offset: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        os.fsync(self._fd)

    def truncate_to(self, offset: int) -> None:
        """Drop every record after `offset` (a record boundary) in the open temp shard, fsynced."""
        if self._fd is None or (offset != 0 and offset not in self._ends):
            raise ValueError(f"{offset} is not a record boundary of the open shard")
        self._cut(offset)
        self._ends = [e for e in self._ends if e <= offset]
        self._discarded = {s for s in self._discarded if s < offset}
        self.count, self.offset = len(self._ends) - len(self._discarded), offset

    def _spans(self) -> list[tuple[int, int]]:
        return list(zip([0, *self._ends[:-1]], self._ends, strict=True))

    def discard(self, start: int, keep: list[bool]) -> None:
        """Leave out of the final shard the records of the batch appended at `start` whose keep flag
        is False. They stay in the temp shard until it is finalized (recovery decides by key)."""
        batch = [span for span in self._spans() if span[0] >= start]
        if self._fd is None or not batch or batch[0][0] != start or len(batch) != len(keep):
            raise ValueError(f"no batch of {len(keep)} records starts at {start} in the open shard")
        self._discarded.update(s for (s, _), ok in zip(batch, keep, strict=True) if not ok)
        self.count = len(self._ends) - len(self._discarded)

    def maybe_rotate(self) -> Path | None:
        """Finalize the open shard if it is full or older than max_age; returns its final path."""
        published = self._publish()
        if self._fd is not None and (self.count >= self.examples_per_shard or self.age >= self.max_age):
            return self._finalize()
        return published

    def _finalize(self) -> Path | None:
        assert self._fd is not None and self.path is not None
        os.fsync(self._fd)
        os.close(self._fd)
        spans = [sp for sp in self._spans() if sp[0] not in self._discarded] if self._discarded else None
        self._unpublished.append((self.path, spans))
        self._fd, self.path, self.count, self.offset = None, None, 0, 0
        self._ends, self._discarded = [], set()
        return self._publish()

    def _publish(self) -> Path | None:
        """Publish the closed temp shards; one the disk refused (full, read-only) stays queued and
        the OSError propagates, so a later call publishes it. Returns the last final path."""
        final = None
        while self._unpublished:
            temp, spans = self._unpublished[0]
            if temp.exists():
                final = finalize_temp(temp, self.compression, self.compression_level, spans)
            else:  # renamed (or deleted, when empty) by an attempt whose later steps failed
                final = final_path(temp, self.compression)
                final = final if final.exists() else None
            self._unpublished.pop(0)
            if final is not None and final not in self.finalized:
                self.finalized.append(final)
        return final

    @property
    def unpublished(self) -> int:
        """Closed temp shards waiting to be published."""
        return len(self._unpublished)

    def close(self) -> Path | None:
        """Finalize the open shard (an empty one is deleted) and publish any left; returns the last
        final path."""
        return self._finalize() if self._fd is not None else self._publish()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- train / validation split ---------------------------------------------------------------

VAL_PREFIX = "val_"


def finished_shards(out_dir: Path) -> list[Path]:
    """Finalized training and validation shards in out_dir, sorted by name (none when it is missing)."""
    return sorted([*out_dir.glob(SHARD_GLOB), *out_dir.glob(VAL_PREFIX + SHARD_GLOB)])


def split_validation(out_dir: Path, fraction: float) -> list[Path]:
    """Rename a deterministic choice of finalized shards to `val_<name>` so that about `fraction`
    of them (at least one) are validation shards; shards already renamed count, so running it
    again changes nothing. Returns the shards renamed now."""
    if not 0 < fraction < 1:
        raise ValueError("the validation fraction must be between 0 and 1")
    out_dir = Path(out_dir)
    train = sorted(out_dir.glob(SHARD_GLOB))
    val = sorted(out_dir.glob(VAL_PREFIX + SHARD_GLOB))
    wanted = max(1, round(fraction * (len(train) + len(val))))
    # the choice depends on the names only: the same shards on every machine and every run
    chosen = sorted(train, key=lambda p: hashlib.md5(p.name.encode()).hexdigest())[
        : max(0, wanted - len(val))
    ]
    renamed = []
    for shard in chosen:
        target = shard.with_name(VAL_PREFIX + shard.name)
        os.replace(shard, target)
        renamed.append(target)
    if renamed:
        _fsync_dir(out_dir)
    return renamed


# ---- the reader ---------------------------------------------------------------------------------


def _expand(pattern: str | list[str]) -> list[str]:
    import tensorflow as tf

    files: list[str] = []
    for p in [pattern] if isinstance(pattern, str | os.PathLike) else pattern:
        p = os.fspath(p)
        files += sorted(tf.io.gfile.glob(p)) if any(c in p for c in "*?[") else [p]
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files


def _compression_of(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else "ZLIB" if path.endswith(".zlib") else ""


def read_dataset(
    pattern: str | list[str], lab_size: int = 299, compression: str | None = None
) -> tf.data.Dataset:
    """The shards as a tf.data.Dataset of dicts: image_name, image_l [S,S,1], image_ab [S,S,2],
    image_embedding [1001], image_key, image_source. Compression from the extension unless given
    (`GZIP`/`ZLIB`/``, or this module's `gzip`/`zlib`/`none`)."""
    import tensorflow as tf

    files = _expand(pattern)
    if compression is not None:
        given = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}.get(compression.lower(), compression.upper())
        groups = {given: files}
    else:
        groups = {}
        for f in files:
            groups.setdefault(_compression_of(f), []).append(f)
    datasets = [tf.data.TFRecordDataset(fs, compression_type=c) for c, fs in groups.items()]
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.concatenate(other)
    s = lab_size
    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_l": tf.io.FixedLenFeature([s, s, 1], tf.float32),
        "image_ab": tf.io.FixedLenFeature([s, s, 2], tf.float32),
        "image_embedding": tf.io.FixedLenFeature([EMBEDDING_SIZE], tf.float32),
        "image_key": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image_source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    return ds.map(lambda x: tf.io.parse_single_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
