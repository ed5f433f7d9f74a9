"""Pure image functions: bytes -> 8-bit RGB -> fixed-size uint8 array, and the queue encoding.

No Celery, Redis or TensorFlow here. Every failure to decode is an `ImageError` whose `reason`
comes from the project's closed vocabulary: not_an_image, truncated, too_many_pixels.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

# Our own max_pixels check (in decode) replaces Pillow's global one, which would otherwise warn
# or refuse images that a larger max_pixels allows.
Image.MAX_IMAGE_PIXELS = None

RESIZE_MODES = ("contain", "crop", "stretch")
DEFAULT_MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
LANCZOS = Image.Resampling.LANCZOS

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow keeps only the high byte of 16-bit RGB(A) samples; decoding again with the other byte
# order's rawmode yields the low bytes (same row stride, so PNG filters still line up).
_SWAP16 = {
    "RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B",
}
_GREY_DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LOAD_ERRORS = (OSError, EOFError, SyntaxError, zlib.error, struct.error)


class ImageError(Exception):
    """An image that cannot be used; `reason` is a failure-vocabulary word, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid modes: {', '.join(RESIZE_MODES)}")


def _formats() -> list[str]:
    """Every format Pillow opens except EPS, whose loading runs Ghostscript on untrusted bytes."""
    Image.init()
    return [f for f in Image.OPEN if f != "EPS"]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if Image.MAX_IMAGE_PIXELS is not None:  # someone restored Pillow's limit: ours applies
        Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
    except Image.UnidentifiedImageError:
        detail = f"cannot identify image file (starts with {data[:16]!r})"
        raise ImageError("not_an_image", detail) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except (OSError, EOFError) as e:  # a plugin recognised the header, then the stream broke
        raise ImageError("truncated", f"{type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels > {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError("not_an_image", f"empty image {w}x{h}")
    return img


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or when the EXIF block is broken."""
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


def _scaled_size(size: tuple[int, int], target: tuple[int, int], mode: str) -> tuple[float, float]:
    """Size of the whole source image once scaled by `mode` for `target` (before crop/padding)."""
    (w, h), (tw, th) = size, target
    if mode == "stretch":
        return tw, th
    scale = min(tw / w, th / h) if mode == "contain" else max(tw / w, th / h)
    return w * scale, h * scale


def _draft(img: Image.Image, target: tuple[int, int], mode: str) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping at least twice the scaled size."""
    swap = _orientation(img) in (5, 6, 7, 8)
    shown = img.size[::-1] if swap else img.size
    need = tuple(math.ceil(2 * v) for v in _scaled_size(shown, target, mode))
    img.draft("RGB", need[::-1] if swap else need)


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except _LOAD_ERRORS as e:
        raise ImageError("truncated", f"{type(e).__name__}: {e}") from e


def _full_depth(data: bytes, img: Image.Image, max_pixels: int) -> Image.Image:
    """For 16-bit RGB(A) images, replace Pillow's high-byte truncation by round(v / 257)."""
    tiles = img.tile
    if not tiles or any(t.codec_name not in ("zip", "raw") for t in tiles):
        return img
    swapped = [_SWAP16.get(t.args if isinstance(t.args, str) else t.args[0]) for t in tiles]
    if None in swapped:
        return img
    low = _open(data, max_pixels)
    low.tile = [
        t._replace(args=raw if isinstance(t.args, str) else (raw, *t.args[1:]))
        for t, raw in zip(low.tile, swapped, strict=True)
    ]
    _load(img)
    _load(low)
    full = np.asarray(img).astype(np.uint32) * 256 + np.asarray(low)
    out = Image.fromarray(((2 * full + 257) // 514).astype(np.uint8), img.mode)
    out.info = dict(img.info)
    if isinstance(out.info.get("transparency"), tuple):  # a 16-bit colour key
        out.info["transparency"] = tuple((2 * v + 257) // 514 for v in out.info["transparency"])
    return out


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale one-channel deep samples to 0..255: 16-bit /257, floats in [0,1] x255, else min-max."""
    if values.dtype.kind == "f":
        v = np.nan_to_num(values.astype(np.float64))
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0 and hi <= 1:
            return np.floor(v * 255 + 0.5).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.floor(v + 0.5).astype(np.uint8)
    else:
        v = values.astype(np.int64)
        lo, hi = int(v.min()), int(v.max())
        if lo >= 0 and hi <= 65535:
            return ((2 * v + 257) // 514).astype(np.uint8)  # round(v / 257), exact in integers
    if hi == lo:
        return np.full(v.shape, min(max(lo, 0), 255), np.uint8)
    return np.floor((v - lo) * (255 / (hi - lo)) + 0.5).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: deep greys scaled, transparency composited on white."""
    if img.mode in _GREY_DEEP:
        return Image.fromarray(_grey_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           draft_for: tuple[int, int] | None = None, mode: str = "contain") -> Image.Image:
    """Decode bytes to an 8-bit RGB Pillow image (first frame, EXIF applied, alpha on white);
    draft_for=(W,H) allows JPEG draft decoding for that target."""
    _check_mode(mode)
    try:
        return _decode(data, max_pixels, draft_for, mode)
    except (ImageError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ImageError("not_an_image", f"{type(e).__name__}: {e}") from e


def _decode(data: bytes, max_pixels: int, draft_for: tuple[int, int] | None,
            mode: str) -> Image.Image:
    data = bytes(data)
    img = _open(data, max_pixels)
    if draft_for is not None and img.format in ("JPEG", "MPO"):
        _draft(img, draft_for, mode)
    orientation = _orientation(img) if img.format in ("JPEG", "MPO") else None
    img = _full_depth(data, img, max_pixels)
    _load(img)
    if orientation is None:  # other formats may keep EXIF after the pixel data
        orientation = _orientation(img)
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])
    return _to_rgb(img)


def resize(img: Image.Image, size: tuple[int, int] = (299, 299),
           mode: str = "contain") -> np.ndarray:
    """Resize an RGB image to uint8 [size[1], size[0], 3] with LANCZOS, by `mode`."""
    _check_mode(mode)
    if img.mode != "RGB":
        img = _to_rgb(img)
    if mode == "stretch":
        out = img.resize(size, LANCZOS)
    elif mode == "crop":
        out = img.resize(size, LANCZOS, box=_crop_box(img.size, size))
    else:
        out = _pad(img, size)
    return np.asarray(out.convert("RGB"), dtype=np.uint8)


def _crop_box(src: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred source region with the target's aspect ratio (sub-pixel, as ImageOps.fit)."""
    (w, h), (tw, th) = src, size
    if w / h >= tw / th:
        cw, ch = tw / th * h, h
    else:
        cw, ch = w, w * th / tw
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def _pad(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Fit inside `size` keeping the aspect ratio (enlarging if smaller), centred on white."""
    (w, h), (tw, th) = img.size, size
    if w / h > tw / th:
        inner = (tw, max(1, round(h / w * tw)))
    else:
        inner = (max(1, round(w / h * th)), th)
    scaled = img.resize(inner, LANCZOS)
    if inner == size:
        return scaled
    out = Image.new("RGB", size, WHITE)
    out.paste(scaled, (round((tw - inner[0]) * 0.5), round((th - inner[1]) * 0.5)))
    return out


def load_rgb(data: bytes, *, size: tuple[int, int] = (299, 299), mode: str = "contain",
             max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes to uint8 [H, W, 3]: decode (with JPEG draft) and resize. Raises ImageError."""
    return resize(decode(data, max_pixels=max_pixels, draft_for=size, mode=mode), size, mode)


# Queue payload: a tag, >HH (height, width), then the rows' "up" deltas (PNG's Up filter, mod 256)
# compressed: b"Z" zstd level 1 with a checksum (written), b"U" zlib (read only: what workers wrote
# before, still in a queue during an upgrade). The delta turns smooth areas and padding into
# near-zero runs. Measured on 299x299 from the photo-like 640x480 JPEG of tests/corpus.py (raw
# 268,203 B; size, encode ms, decode ms; Pillow 13, 2-core box):
#   PNG level 1      82,550 B  5.1 / 2.0
#   zlib 1 of raw   130,427 B  3.3 / 0.9
#   up + zlib 1      84,460 B  2.1 / 1.3
# and on 60 images of bench.download's corpus (mean size, encode ms, decode ms):
#   up + zlib 1 Z_RLE  130,414 B  3.16 / 1.42
#   up + zstd 1        131,081 B  0.96 / 0.42   <- chosen
_TAG_UP_ZSTD = b"Z"
_TAG_UP_ZLIB = b"U"
_HEADER = struct.Struct(">HH")
_ZSTD = threading.local()  # zstandard (de)compressors are not safe to share between threads


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    if not hasattr(_ZSTD, "pair"):
        _ZSTD.pair = (zstandard.ZstdCompressor(level=1, write_checksum=True), zstandard.ZstdDecompressor())
    return _ZSTD.pair


def encode_pixels(arr: np.ndarray) -> bytes:
    """Lossless, compact encoding of a uint8 [H, W, 3] array for the message queue."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    h, w, _ = arr.shape
    if max(h, w) > 0xFFFF:
        raise ValueError(f"{h}x{w} is too large for the pixel payload header")
    delta = np.array(arr)
    delta[1:] -= arr[:-1]  # uint8 arithmetic wraps mod 256, undone by a uint8 cumsum
    return _TAG_UP_ZSTD + _HEADER.pack(h, w) + _zstd()[0].compress(delta.data)


def decode_pixels(data: bytes) -> np.ndarray:
    """Exact inverse of encode_pixels; ValueError on a corrupt or unknown payload."""
    data = bytes(data)
    tag = data[:1]
    if len(data) < 1 + _HEADER.size or tag not in (_TAG_UP_ZSTD, _TAG_UP_ZLIB):
        raise ValueError(f"unknown pixel payload (starts with {data[:8]!r})")
    h, w = _HEADER.unpack_from(data, 1)
    expected = h * w * 3
    body = data[1 + _HEADER.size :]
    raw = _unzstd(body, expected) if tag == _TAG_UP_ZSTD else _unzlib(body, expected)
    if len(raw) != expected:
        raise ValueError(f"corrupt pixel payload: {len(raw)} bytes for {h}x{w}x3")
    delta = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
    return np.cumsum(delta, axis=0, dtype=np.uint8)


def _unzstd(body: bytes, expected: int) -> bytes:
    try:
        if zstandard.frame_content_size(body) != expected:
            raise ValueError(f"corrupt pixel payload: frame size is not {expected}")
        return _zstd()[1].decompress(body, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt pixel payload: {e}") from e


def _unzlib(body: bytes, expected: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, expected + 1)
    except zlib.error as e:
        raise ValueError(f"corrupt pixel payload: {e}") from e
    if not inflater.eof or inflater.unused_data:
        raise ValueError("corrupt pixel payload: not one whole zlib stream")
    return raw


_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"II+\x00", "tif"),
    (b"MM\x00+", "tif"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"8BPS", "psd"),
    (b"qoif", "qoi"),
    (b"DDS ", "dds"),
    (b"icns", "icns"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "j2k"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\xff\x0a", "jxl"),
    (b"BM", "bmp"),
)
_NETPBM = {b"1": "pbm", b"4": "pbm", b"2": "pgm", b"5": "pgm", b"3": "ppm", b"6": "ppm",
           b"7": "pam"}
_FTYP = {b"avif": "avif", b"avis": "avif", b"heic": "heic", b"heix": "heic", b"mif1": "heic",
         b"msf1": "heic", b"hevc": "heic"}


def guess_extension(data: bytes) -> str:
    """File extension ("jpg", "png", "gif", "webp", ...) from the magic bytes; "bin" if unknown."""
    head = bytes(data[:32])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP:
        return _FTYP[head[8:12]]
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in _NETPBM and head[2:3].isspace():
        return _NETPBM[head[1:2]]
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return "bin"


def save_original(directory: Path, key: str, data: bytes) -> Path:
    """Write the downloaded bytes as <md5>.<ext> atomically, like the original `download`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.{guess_extension(data)}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
