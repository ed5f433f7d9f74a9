"""The wire between the stages: queue and task names, and the shapes of their messages (msgpack,
Celery task protocol 2 envelopes in kombu's Redis lists). Importing it patches nothing.

`download` queue, task `koala.download`: args = [chunk], kwargs = {} or {"alone": True} (a suspect
    run with nothing else in its worker), a chunk being a list of items, each one of
    `FetchItem` {"k": md5 key, "u": URL} or `FileItem` {"k": key, "p": path in the folder, "b": file bytes};
    `items_of` checks one.
`embed` queue, task `koala.embed`: args = [images], kwargs as above, one message per download chunk,
    a list of `EmbedImage` {"key", "name": record name, "source": URL or path, "kind": "url" or
    "path", "pixels": `encode_pixels`}; `images_of` checks one. A message of
    one image as a bare dict (args = [image], the format before chunks) is still read.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeGuard, cast

import zstandard

if TYPE_CHECKING:  # numpy and Pillow only for the pixel payloads: `koala submit` starts without them
    import numpy as np

DOWNLOAD_QUEUE = "download"  # kombu keeps each queue as a Redis list of this name
EMBED_QUEUE = "embed"
DOWNLOAD_TASK = "koala.download"  # tasks are sent by name: senders need not import the workers
EMBED_TASK = "koala.embed"


class FetchItem(TypedDict):
    """An item of a URL list: its md5 key and the URL to fetch."""

    k: str
    u: str


class FileItem(TypedDict):
    """A file of a submitted folder: its key, its path in the folder, its bytes."""

    k: str
    p: str
    b: bytes


ChunkItem = FetchItem | FileItem


class EmbedImage(TypedDict):
    """One 299×299 image on its way to the embed stage; `source` is a URL or a path, as `kind` says."""

    key: str
    name: str
    source: str
    kind: Literal["url", "path"]
    pixels: bytes


def is_fetch(item: ChunkItem) -> TypeGuard[FetchItem]:
    """Whether a chunk item is a URL to fetch (else a file's bytes)."""
    return "u" in item


def source_of(item: ChunkItem) -> tuple[str, str]:
    """(url, path) of a chunk item: one of them empty."""
    return (item["u"], "") if is_fetch(item) else ("", cast(FileItem, item)["p"])


def chunk_repr(items: list[ChunkItem]) -> str:
    """How a download message shows in Celery's events and Flower (its `argsrepr`): the chunk's size
    and first item, not Celery's repr of the whole chunk (file bytes too: a third of a send)."""
    first = "".join(source_of(items[0]))[:200]
    return f"[{len(items)} item{'s' * (len(items) != 1)}, the first {first!r}]"


def embed_image(item: ChunkItem, pixels: bytes) -> EmbedImage:
    """What the embed stage receives for one downloaded item of a chunk."""
    if is_fetch(item):
        return {"key": item["k"], "name": item["k"], "source": item["u"], "kind": "url", "pixels": pixels}
    path = cast(FileItem, item)["p"]
    return {"key": item["k"], "name": path, "source": path, "kind": "path", "pixels": pixels}


def is_key(key: object) -> bool:
    """Whether `key` is an item key: the md5 hex digest of its URL or path."""
    return isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def items_of(chunk: object) -> list[ChunkItem]:
    """The items of a `download` message's chunk; ValueError when it is not a list of FetchItem or
    FileItem (the worker then drops the message: nothing in it can be accounted for)."""
    if not isinstance(chunk, list) or not chunk:
        raise ValueError("a download chunk is a non-empty list of items")
    for item in chunk:
        if not (isinstance(item, dict) and is_key(item.get("k"))):
            raise ValueError(f"an item without an md5 key: {item!r:.100}")
        fetch = set(item) == {"k", "u"} and isinstance(item["u"], str)
        file = set(item) == {"k", "p", "b"} and isinstance(item["p"], str) and isinstance(item["b"], bytes)
        if not (fetch or file):
            raise ValueError(f"an item that is neither a URL nor a file: {sorted(item)}")
    return cast(list[ChunkItem], chunk)


def images_of(body: object) -> list[EmbedImage]:
    """The images of an `embed` message body (task protocol 2: [args, kwargs, embed]); ValueError
    when it is not one of ours. Both the chunk format and the older one-image format are read."""
    try:
        args, _kwargs, _embed = cast(Any, body)  # any shape: a wrong one raises, caught below
        payload = args[0]
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"not an embed task body: {e}") from None
    found = payload if isinstance(payload, list) else [payload]
    if not all(isinstance(p, dict) and is_key(p.get("key")) and "pixels" in p for p in found):
        raise ValueError("an embed image without an md5 key or pixels")
    for image in found:  # messages from before `kind`: a file's record is named by its path
        image.setdefault("kind", "path" if image.get("name") == image.get("source") else "url")
    return found


def is_envelope(message: object) -> bool:
    """Whether a queue entry has what kombu reads from a message before any handler sees it."""
    if not isinstance(message, dict) or not isinstance(props := message.get("properties"), dict):
        return False
    info, body = props.get("delivery_info"), message.get("body")
    return (
        isinstance(props.get("delivery_tag"), str)
        and isinstance(info, dict)
        and {"exchange", "routing_key"} <= info.keys()
        and isinstance(body, str | None)
    )


# --- the pixels of an EmbedImage ------------------------------------------------------------------

# Queue payload: a tag, >HH (height, width), then the rows' "up" deltas (PNG's Up filter, mod 256)
# compressed: b"Z" zstd level 1 with a checksum (written), b"U" zlib (read only: what workers wrote
# before, still in a queue during an upgrade). The delta turns smooth areas and padding into
# near-zero runs. Measured on 299x299 from the photo-like 640x480 JPEG of testkit/corpus.py (raw
# 268,203 B; size, encode ms, decode ms; Pillow 13, 2-core box):
#   PNG level 1      82,550 B  5.1 / 2.0
#   zlib 1 of raw   130,427 B  3.3 / 0.9
#   up + zlib 1      84,460 B  2.1 / 1.3
# and on 60 images of bench.download's corpus (mean size, encode ms, decode ms):
#   up + zlib 1 Z_RLE  130,414 B  3.16 / 1.42
#   up + zstd 1        131,081 B  0.96 / 0.42   <- chosen
# with level 1's hash table cut to 2^12 entries and matches of 7 bytes or more (150 299x299 images
# of the photos corpus: 120.6 KB vs 120.4 KB, 0.36 vs 0.45 ms; the decoder needs nothing new)
_TAG_UP_ZSTD = b"Z"
_TAG_UP_ZLIB = b"U"
_HEADER = struct.Struct(">HH")
# Largest image a payload may declare when no exact size is expected: the header allows 65535 x
# 65535 (12.9 GB decoded), far beyond any image size the fleet sends.
MAX_PAYLOAD_PIXELS = 4096 * 4096
_ZSTD = threading.local()  # zstandard (de)compressors are not safe to share between threads


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    if not hasattr(_ZSTD, "pair"):
        params = zstandard.ZstdCompressionParameters.from_level(  # sized for 299x299 (any size encodes)
            1, source_size=299 * 299 * 3, hash_log=12, min_match=7, write_checksum=1
        )
        _ZSTD.pair = (zstandard.ZstdCompressor(compression_params=params), zstandard.ZstdDecompressor())
    return _ZSTD.pair


def encode_pixels(arr: np.ndarray) -> bytes:
    """Lossless, compact encoding of a uint8 [H, W, 3] array for the message queue."""
    import numpy as np

    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    h, w, _ = arr.shape
    if max(h, w) > 0xFFFF:
        raise ValueError(f"{h}x{w} is too large for the pixel payload header")
    delta = np.array(arr)
    delta[1:] -= arr[:-1]  # uint8 arithmetic wraps mod 256, undone by a uint8 cumsum
    return _TAG_UP_ZSTD + _HEADER.pack(h, w) + _zstd()[0].compress(delta.data)


class PayloadSizeError(ValueError):
    """A pixel payload whose header declares a size other than the one expected (or too large)."""


def decode_pixels(
    data: bytes, size: tuple[int, int] | None = None, max_pixels: int = MAX_PAYLOAD_PIXELS
) -> np.ndarray:
    """Exact inverse of encode_pixels; ValueError on a corrupt or unknown payload. The size its
    header declares is checked before anything is decompressed: it must be `size` (width, height)
    when given, and at most `max_pixels` (PayloadSizeError, a ValueError)."""
    import numpy as np

    from common.pictures.images import inflate_whole, undo_up_filter

    data = bytes(data)
    tag = data[:1]
    if len(data) < 1 + _HEADER.size or tag not in (_TAG_UP_ZSTD, _TAG_UP_ZLIB):
        raise ValueError(f"unknown pixel payload (starts with {data[:8]!r})")
    h, w = _HEADER.unpack_from(data, 1)
    if size is not None and (w, h) != tuple(size):
        raise PayloadSizeError(f"the image is {w}x{h}, not {size[0]}x{size[1]}")
    if h * w > max_pixels:
        raise PayloadSizeError(f"the payload declares {w}x{h} = {w * h} pixels > {max_pixels}")
    expected = h * w * 3
    body = data[1 + _HEADER.size :]
    raw = _unzstd(body, expected) if tag == _TAG_UP_ZSTD else inflate_whole(body, expected)
    if len(raw) != expected:
        raise ValueError(f"corrupt pixel payload: {len(raw)} bytes for {h}x{w}x3")
    return undo_up_filter(np.frombuffer(raw, np.uint8).reshape(h, w, 3))


def _unzstd(body: bytes, expected: int) -> bytes:
    try:
        if zstandard.frame_content_size(body) != expected:
            raise ValueError(f"corrupt pixel payload: frame size is not {expected}")
        return _zstd()[1].decompress(body, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt pixel payload: {e}") from e
