"""The record formats: a `tf.train.Example` written straight in protobuf wire format, framed as TFRecord.

`lab` (the original project's schema, the default): features `image_name`, `image_l`, `image_ab`,
`image_embedding`, plus `image_key` and `image_source`. `compact`: `image_png` (the 299×299 RGB image,
a PNG from `common.pictures.images.encode_png`) instead of `image_l` and `image_ab`;
`common/output/dataset.py` gives
the `lab` tensors of either.
Serialized and framed by hand (crc32c from google-crc32c), without TensorFlow: building a
`tf.train.Example` from float lists copies every value through Python objects, while this writes the
float arrays' bytes as they are (`bench/records.py` measures both). Shard files are `common/output/shards.py`;
the training reader is `common/output/dataset.py`.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

if google_crc32c.implementation != "c":
    warnings.warn("google-crc32c runs without its C extension: TFRecord CRCs will be slow", stacklevel=1)

EMBEDDING_SIZE = 1001
KEY_FEATURE = b"image_key"
PNG_FEATURE = b"image_png"  # in `compact` records only
_MAX_RECORD = 1 << 31  # sanity cap on a record length read from an (already CRC-checked) header


# ---- TFRecord framing ------------------------------------------------------------------------------


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked crc32c of `data`."""
    crc = google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_pieces(data: bytes) -> tuple[bytes, bytes, bytes]:
    """A TFRecord as (uint64 length + its masked crc, data, masked crc of the data)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)), data, struct.pack("<I", masked_crc32c(data))


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of it, data, masked crc of the data."""
    return b"".join(frame_pieces(data))


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


def _decompressed(raw: BinaryIO, name: str) -> BinaryIO:
    """The TFRecord stream of an open file, by its name's extension (closing it closes `raw`, but
    for gzip: the caller closes `raw`)."""
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if name.endswith(".zlib"):
        return io.BufferedReader(_ZlibReader(raw), 1 << 20)
    return raw


def _open_read(path: Path) -> BinaryIO:
    """A file opened for reading its TFRecords: temp shards are raw, finals by extension."""
    name = Path(path).name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return _decompressed(open(path, "rb", buffering=1 << 20), name)


def iter_examples(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(offset, end, serialized example) of each valid record (offsets in the uncompressed stream)."""
    with _open_read(path) as f:
        yield from _read_records(f)


def read_stream(raw: BinaryIO, name: str) -> Iterator[bytes]:
    """The serialized examples of an open shard file (an object store's, say), compressed or not
    by its `name`'s extension."""
    f = _decompressed(raw, name)
    for _, _, data in _read_records(f):
        yield data


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


def serialize_compact(name: bytes, key: bytes, source: bytes, png: bytes, embedding: np.ndarray) -> bytes:
    """One `compact` record: the image as a PNG (not copied until the record is joined), the embedding."""
    return serialize_features(
        {
            b"image_embedding": _float_feature(embedding),
            b"image_key": _bytes_feature(bytes(key)),
            b"image_name": _bytes_feature(bytes(name)),
            PNG_FEATURE: _bytes_feature(png),
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


def record_format(serialized: bytes) -> str:
    """`compact` when the record holds an `image_png`, else `lab`."""
    try:
        feature_span(memoryview(serialized), PNG_FEATURE)
    except KeyError:
        return "lab"
    return "compact"
