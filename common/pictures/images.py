"""Pure image functions: bytes -> 8-bit RGB -> fixed-size uint8 array, and the queue encoding.

JPEG (RGB or grey) is decoded by simplejpeg (libjpeg-turbo) at 1/2, 1/4 or 1/8 scale and resized by
cykooz.resizer's SIMD Lanczos-3; every other image, and any JPEG simplejpeg refuses, by Pillow.
Without those wheels Pillow does it all. No Celery, Redis or TensorFlow here. Every failure to
decode is an `ImageError` whose `reason` comes from the project's closed vocabulary: not_an_image,
truncated, too_many_pixels, too_many_scans (a JPEG's scans are counted from its markers before
decoding: each costs a pass over the whole picture). Icon files (ICO, CUR, ICNS) are refused as
not_an_image before any decoding. Pillow's peak memory is at most 8 bytes per source pixel plus a
few MB (see _to_rgb).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from common.state.failures import ItemError

try:
    import simplejpeg
except ImportError:  # no wheel for this platform: Pillow decodes every JPEG
    simplejpeg = None
try:
    from cykooz_resizer import CropBox, FilterType, ImageData, PixelType, ResizeAlg, ResizeOptions, Resizer
except ImportError:  # no wheel (Linux aarch64): Pillow resizes
    Resizer = None

# Our own max_pixels check (in decode) replaces Pillow's global one, which would otherwise warn
# or refuse images that a larger max_pixels allows.
Image.MAX_IMAGE_PIXELS = None

RESIZE_MODES = ("contain", "crop", "stretch")
DEFAULT_MAX_PIXELS = 89_478_485
# Scans a JPEG may have (KOALA_MAX_JPEG_SCANS). Encoders write 1 (baseline) to about 10
# (progressive: Pillow/libjpeg 10, mozjpeg up to ~15); libjpeg-turbo's own tools cap at 500. Each
# scan costs a pass over the whole picture: 100 scans of an 8000x8000 picture decode in ~1 s here,
# while 10,000 crafted empty scans (120 KB) took ~100 s.
DEFAULT_MAX_JPEG_SCANS = 100
_MAX_JPEG_SEGMENTS = 65_536  # marker segments walked before a JPEG is refused (a real one has < 100)
# In entropy-coded data, the next marker: 0xFF followed by neither a stuffed 0x00, a restart
# marker (RST0-7, part of the data) nor another 0xFF (fill).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length
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
_SWAPPING = (5, 6, 7, 8)  # orientations that show a w x h file as h x w
# Where a shown point (x, y) lies in the stored w x h image, per EXIF orientation.
_STORED_POINT = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (y, h - x),
    7: lambda x, y, w, h: (w - y, h - x),
    8: lambda x, y, w, h: (w - y, x),
}
# The same as array operations on stored pixels: flip rows, flip columns, then transpose.
_SHOW = {
    1: (False, False, False),
    2: (False, True, False),
    3: (True, True, False),
    4: (True, False, False),
    5: (False, False, True),
    6: (True, False, True),
    7: (True, True, True),
    8: (False, True, True),
}
Box = tuple[float, float, float, float]
_RESIZER = threading.local()
_LANCZOS3 = ResizeAlg.convolution(FilterType.lanczos3) if Resizer is not None else None
# Pillow keeps only the high byte of 16-bit RGB(A) samples; decoding again with the other byte
# order's rawmode yields the low bytes (same row stride, so PNG filters still line up).
_SWAP16 = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L",
    "RGBA;16L": "RGBA;16B",
}
_GREY_DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LOAD_ERRORS = (OSError, EOFError, SyntaxError, zlib.error, struct.error)
# Refused before Pillow sees them: ICO's Image.open decodes its largest frame, and an ICNS entry's
# PNG may be any size whatever its type says, so neither can be size-checked before decoding (an
# ICO saying 16x16 around a 20000x20000 PNG took 1.5 GB). CUR (BMP frames only, size-checked) goes
# with them: icons are not pictures to learn colours from. Every other format's first frame is
# sized by its own header before decoding (GIF widens the size to its first frame; later frames
# of GIF, APNG, WebP, MPO, TIFF, DCX, FLI, PSD are never read; a JP2 whose header disagrees with
# its codestream fails before decoding).
_ICONS = ("ICO", "CUR", "ICNS")
_COMMON_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_ICON_MAGIC = {b"\0\0\1\0": "ICO", b"\0\0\2\0": "CUR"}
_STRIP_BYTES = 1 << 20  # converted a strip of rows at a time: temporaries stay near this size


class ImageError(ItemError):
    """An image that cannot be used; `reason` is a failure-vocabulary word, `detail` says why."""


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid modes: {', '.join(RESIZE_MODES)}")


def _formats() -> list[str]:
    """Every format Pillow opens except EPS, whose loading runs Ghostscript on untrusted bytes,
    and the icon containers; the common ones first (Pillow tries them in this order, and a JPEG
    at its place in the registry waited ~0.03 ms for 20 other plugins to refuse it)."""
    Image.init()
    common = [f for f in _COMMON_FORMATS if f in Image.OPEN]
    return common + [f for f in Image.OPEN if f not in common and f != "EPS" and f not in _ICONS]


def _icon(data: bytes) -> str | None:
    """ "ICO", "CUR" or "ICNS" where `data` starts with that container's header, else None.

    ICO and CUR need a directory of at least one entry pointing past itself: an uncompressed TGA
    also starts 00 00 02 00, followed by zeros."""
    if data[:4] == b"icns":
        return "ICNS"
    kind = _ICON_MAGIC.get(data[:4])
    count = int.from_bytes(data[4:6], "little")
    end = 6 + 16 * count
    if kind is None or count == 0 or len(data) < end:
        return None
    offsets = (int.from_bytes(data[i + 12 : i + 16], "little") for i in range(6, end, 16))
    return kind if all(end <= offset < len(data) for offset in offsets) else None


def _open(data: bytes, max_pixels: int, max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> ImageFile.ImageFile:
    if Image.MAX_IMAGE_PIXELS is not None:  # someone restored Pillow's limit: ours applies
        Image.MAX_IMAGE_PIXELS = None
    icon = _icon(data)
    if icon is not None:
        raise ImageError(
            "not_an_image",
            f"{icon} icon file refused: its frames are decoded before "
            "their size can be checked, and icons are not photographs",
        )
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
    if img.format in ("JPEG", "MPO"):
        _check_scans(data, max_scans)
    return img


def _check_scans(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG of more than `max_scans` scans before decoding: libjpeg reads every scan over
    the whole picture, so a few bytes per scan cost seconds each at a large declared size."""
    if _sos_markers(data) <= max_scans:  # SOS markers anywhere (thumbnails too): at least the scans
        return  # ~40 us where the walk takes ~100 us over a photo's entropy-coded data
    scans = jpeg_scans(data, max_scans)
    if scans < 0:
        raise ImageError("too_many_scans", f"more than {_MAX_JPEG_SEGMENTS} marker segments")
    if scans > max_scans:
        raise ImageError("too_many_scans", f"more than {max_scans} scans (KOALA_MAX_JPEG_SCANS)")


def _sos_markers(data: bytes) -> int:
    """FF DA byte pairs anywhere in `data`, with numpy: 0.04 ms over a 200 KB photo, where
    `bytes.count` of the pair took 0.17 ms."""
    a = np.frombuffer(data, np.uint8)
    pairs = a[:-1] == 0xFF
    np.logical_and(pairs, a[1:] == 0xDA, out=pairs)
    return int(np.count_nonzero(pairs))


def jpeg_scans(data: bytes, stop_after: int = DEFAULT_MAX_JPEG_SCANS) -> int:
    """The scans (SOS markers) of a JPEG's first image, counted by walking its marker segments
    from SOI to EOI and searching past each scan's entropy-coded data; counting stops at
    `stop_after` + 1. -1 when the file holds more than _MAX_JPEG_SEGMENTS segments (so that the
    walk itself stays cheap: a few ms). A SOS inside another segment (an EXIF thumbnail) is not
    counted; what libjpeg would call corrupt is walked as it skips it (to the next marker)."""
    pos, scans, segments, end = 2, 0, 0, len(data)
    while pos + 1 < end and scans <= stop_after:
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            return -1
        if data[pos] != 0xFF:  # garbage between segments: libjpeg skips to the next marker
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xD9:  # EOI: the end of the first image
            break
        elif marker in _JPEG_STANDALONE:
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xDA:  # SOS: its header, then entropy-coded data up to the next marker
                scans += 1
                found = _JPEG_NEXT_MARKER.search(data, pos)
                if found is None:
                    break
                pos = found.start()
    return scans


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


def _need(stored: tuple[int, int], orientation: int, target: tuple[int, int], mode: str) -> tuple[int, int]:
    """Twice the picture's scaled size, in the file's (stored) orientation."""
    swap = orientation in _SWAPPING
    shown = stored[::-1] if swap else stored
    w, h = _scaled_size(shown, target, mode)
    need = (math.ceil(2 * w), math.ceil(2 * h))
    return (need[1], need[0]) if swap else need


def _dct_scale(stored: tuple[int, int], need: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 that keeps `need` pixels (Pillow's draft rule), else 1."""
    fits = min(stored[0] // need[0], stored[1] // need[1])
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _draft(img: Image.Image, target: tuple[int, int], mode: str, orientation: int) -> int:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping at least twice the scaled size; the scale."""
    width = img.size[0]
    drafted = img.draft("RGB", _need(img.size, orientation, target, mode))
    return 1 if drafted is None else round(width / drafted[1][2])


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except _LOAD_ERRORS as e:
        raise ImageError("truncated", f"{type(e).__name__}: {e}") from e


def _strips(size: tuple[int, int], bytes_per_pixel: int = 4) -> list[tuple[int, int, int, int]]:
    """Boxes of whole rows covering `size`, each about _STRIP_BYTES at `bytes_per_pixel`."""
    w, h = size
    rows = max(1, _STRIP_BYTES // (bytes_per_pixel * w))
    return [(0, top, w, min(top + rows, h)) for top in range(0, h, rows)]


def _round16(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """round((256 * high + low) / 257) for uint8 byte planes, without wide temporaries.

    That is high + round((low - high) / 257): one up where low - high >= 129, one down where <= -129."""
    diff = low.astype(np.int16) - high
    return (high + (diff >= 129) - (diff <= -129)).astype(np.uint8)


def _full_depth(data: bytes, img: ImageFile.ImageFile, max_pixels: int) -> ImageFile.ImageFile:
    """For 16-bit RGB(A) images, replace Pillow's high-byte truncation by round(v / 257), in place,
    a strip at a time: the high and low byte images (4 bytes a pixel each) are the peak."""
    tiles = img.tile
    if not tiles or any(t.codec_name not in ("zip", "raw") for t in tiles):
        return img
    # zip and raw tiles always carry args (Pillow types them optional)
    swapped = [_SWAP16.get(t.args if isinstance(t.args, str) else t.args[0]) for t in tiles]  # type: ignore[index]
    if None in swapped:
        return img
    low = _open(data, max_pixels)
    low.tile = [
        t._replace(args=raw if isinstance(t.args, str) else (raw, *t.args[1:]))  # type: ignore[index]
        for t, raw in zip(low.tile, swapped, strict=True)
    ]
    _load(img)
    _load(low)
    for box in _strips(img.size):
        rounded = _round16(np.asarray(img.crop(box)), np.asarray(low.crop(box)))
        img.paste(Image.fromarray(rounded), box[:2])
    low.close()  # frees its pixels now
    if isinstance(img.info.get("transparency"), tuple):  # a 16-bit colour key
        img.info["transparency"] = tuple((2 * v + 257) // 514 for v in img.info["transparency"])
    return img


def _grey_values(values: np.ndarray) -> np.ndarray:
    """Deep grey samples as float64 (NaN as 0) or int64."""
    return np.nan_to_num(values.astype(np.float64)) if values.dtype.kind == "f" else values.astype(np.int64)


def _grey_range(img: Image.Image) -> tuple[float, float]:
    """The smallest and largest sample of a deep grey image, read a strip at a time."""
    lo, hi = math.inf, -math.inf
    for box in _strips(img.size, 8):
        v = _grey_values(np.asarray(img.crop(box)))
        lo, hi = min(lo, v.min().item()), max(hi, v.max().item())
    return lo, hi


def _grey_to_uint8(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scale _grey_values to 0..255 by the whole image's range [lo, hi]: 16-bit /257, floats in
    [0,1] x255, else min-max."""
    if v.dtype.kind == "f":
        if lo >= 0 and hi <= 1:
            return np.floor(v * 255 + 0.5).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.floor(v + 0.5).astype(np.uint8)
    elif lo >= 0 and hi <= 65535:
        return ((2 * v + 257) // 514).astype(np.uint8)  # round(v / 257), exact in integers
    if hi == lo:
        return np.full(v.shape, min(max(lo, 0), 255), np.uint8)
    return np.floor((v - lo) * (255 / (hi - lo)) + 0.5).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: deep greys scaled, transparency composited on white.

    A strip of rows at a time, so the only full-size copy is the output (4 bytes a pixel)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    grey = _grey_range(img) if img.mode in _GREY_DEEP else None
    out = Image.new("RGB", img.size)
    for box in _strips(img.size, 8 if grey else 4):
        out.paste(_strip_to_rgb(img.crop(box), grey), box[:2])
    return out


def _strip_to_rgb(strip: Image.Image, grey: tuple[float, float] | None) -> Image.Image:
    if grey is not None:
        return Image.fromarray(_grey_to_uint8(_grey_values(np.asarray(strip)), *grey)).convert("RGB")
    if strip.mode in _ALPHA_MODES or "transparency" in strip.info:
        rgba = strip.convert("RGBA")
        out = Image.new("RGB", strip.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return strip.convert("RGB")


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_for: tuple[int, int] | None = None,
    mode: str = "contain",
    max_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> Image.Image:
    """Decode bytes to an 8-bit RGB Pillow image (first frame, EXIF applied, alpha on white);
    draft_for=(W,H) allows JPEG draft decoding for that target."""
    _check_mode(mode)
    try:
        data = bytes(data)
        img = _open(data, max_pixels, max_scans)
        rgb, orientation, _, _ = _decode_stored(data, img, max_pixels, draft_for, mode)
    except (ImageError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ImageError("not_an_image", f"{type(e).__name__}: {e}") from e
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation != 1 else rgb


def _decode_stored(
    data: bytes, img: ImageFile.ImageFile, max_pixels: int, draft_for: tuple[int, int] | None, mode: str
) -> tuple[Image.Image, int, int, tuple[int, int]]:
    """Pillow decode of an opened image in the file's orientation: RGB, EXIF orientation, DCT scale
    (1, 2, 4 or 8) and the original size."""
    stored = img.size
    jpeg = img.format in ("JPEG", "MPO")
    orientation = _orientation(img) if jpeg else None
    scale = 1
    if orientation is not None and draft_for is not None:  # a JPEG (orientation read above)
        scale = _draft(img, draft_for, mode, orientation)
    img = _full_depth(data, img, max_pixels)
    _load(img)
    if orientation is None:  # other formats may keep EXIF after the pixel data
        orientation = _orientation(img)
    rgb = _to_rgb(img)
    if rgb is not img:
        img.close()  # frees the decoded pixels before resizing
    return rgb, orientation, scale, stored


def load_rgb(
    data: bytes,
    *,
    size: tuple[int, int] = (299, 299),
    mode: str = "contain",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Bytes to uint8 [H, W, 3]: DCT-scaled decode (simplejpeg for JPEG, else Pillow), then Lanczos-3
    from the exact source box, geometry from the original size. Raises ImageError (pixels over
    `max_pixels`, a JPEG of more than `max_scans` scans: refused before decoding)."""
    _check_mode(mode)
    try:
        return _load_rgb(bytes(data), size, mode, max_pixels, max_scans)
    except (ImageError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ImageError("not_an_image", f"{type(e).__name__}: {e}") from e


def _load_rgb(data: bytes, size: tuple[int, int], mode: str, max_pixels: int, max_scans: int) -> np.ndarray:
    img = _open(data, max_pixels, max_scans)  # header only (and a JPEG's scans counted): nothing decoded
    if simplejpeg is not None and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
        orientation = _orientation(img)
        scale = _dct_scale(img.size, _need(img.size, orientation, size, mode))
        pixels = _simplejpeg(data, img.size, scale)
        if pixels is not None:
            return _fit(pixels, scale, img.size, orientation, size, mode)
    rgb, orientation, scale, stored = _decode_stored(data, img, max_pixels, size, mode)
    return _fit(rgb, scale, stored, orientation, size, mode)


def _simplejpeg(data: bytes, stored: tuple[int, int], scale: int) -> np.ndarray | None:
    """libjpeg-turbo's RGB decode at 1/scale; None where it refuses (corrupt data: Pillow then decides)."""
    w, h = stored
    shape = (-(-h // scale), -(-w // scale))
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_factor=scale, min_height=shape[0], min_width=shape[1]
        )
    except ValueError:
        return None
    return pixels if pixels.shape == (*shape, 3) else None


def resize(img: Image.Image, size: tuple[int, int] = (299, 299), mode: str = "contain") -> np.ndarray:
    """Resize an RGB image to uint8 [size[1], size[0], 3] with LANCZOS, by `mode`."""
    _check_mode(mode)
    if img.mode != "RGB":
        img = _to_rgb(img)
    return _fit(img, 1, img.size, 1, size, mode)


def _fit(
    picture: Image.Image | np.ndarray,
    scale: int,
    stored: tuple[int, int],
    orientation: int,
    size: tuple[int, int],
    mode: str,
) -> np.ndarray:
    """Resize a decoded picture (file orientation, 1/scale of `stored`) to uint8 [H, W, 3] by `mode`.

    The geometry comes from the original size; the resize reads the exact box at the decoded scale
    (a scaled decode rounds odd sizes up) and the small result is turned by the EXIF orientation."""
    swap = orientation in _SWAPPING
    box, inner, offset = _layout(stored[::-1] if swap else stored, size, mode)
    x0, y0, x1, y1 = (v / scale for v in _stored_box(box, orientation, stored))
    resized = _lanczos(picture, (x0, y0, x1, y1), inner[::-1] if swap else inner)
    return _place(_show(resized, orientation), size, offset)


def _layout(
    shown: tuple[int, int], size: tuple[int, int], mode: str
) -> tuple[Box, tuple[int, int], tuple[int, int]]:
    """The source box (original pixels), the size it is resized to, and its offset on the canvas."""
    (w, h), (tw, th) = shown, size
    if mode == "stretch":
        return (0, 0, w, h), size, (0, 0)
    if mode == "crop":
        return _crop_box(shown, size), size, (0, 0)
    if w / h > tw / th:
        inner = (tw, max(1, round(h / w * tw)))
    else:
        inner = (max(1, round(w / h * th)), th)
    return (0, 0, w, h), inner, (round((tw - inner[0]) * 0.5), round((th - inner[1]) * 0.5))


def _crop_box(src: tuple[int, int], size: tuple[int, int]) -> Box:
    """The centred source region with the target's aspect ratio (sub-pixel, as ImageOps.fit)."""
    (w, h), (tw, th) = src, size
    cw: float
    ch: float
    if w / h >= tw / th:
        cw, ch = tw / th * h, h
    else:
        cw, ch = w, w * th / tw
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def _stored_box(box: Box, orientation: int, stored: tuple[int, int]) -> Box:
    """A box of the shown picture as a box of the stored (not yet oriented) image."""
    (xa, ya), (xb, yb) = (_STORED_POINT[orientation](x, y, *stored) for x, y in (box[:2], box[2:]))
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)


def _show(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels as shown: the flips, then the transposition, of EXIF `orientation`."""
    rows, cols, swap = _SHOW[orientation]
    arr = arr[::-1] if rows else arr
    arr = arr[:, ::-1] if cols else arr
    return arr.transpose(1, 0, 2) if swap else arr


def _place(picture: np.ndarray, size: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """A new uint8 [H, W, 3] canvas of `size`, white, with `picture` at `offset` (x, y)."""
    (tw, th), (x, y), (h, w) = size, offset, picture.shape[:2]
    out = np.empty((th, tw, 3), np.uint8) if (w, h) == size else np.full((th, tw, 3), 255, np.uint8)
    out[y : y + h, x : x + w] = picture
    return out


def _lanczos(picture: Image.Image | np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Lanczos-3 resize of `box` of an RGB picture to `size`: a Pillow image with Pillow, an array
    with cykooz.resizer's SIMD convolution (Pillow where that is not installed)."""
    width, height = picture.size if isinstance(picture, Image.Image) else picture.shape[1::-1]
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)
    if isinstance(picture, np.ndarray):
        if Resizer is not None:
            return _simd_lanczos(picture, (x0, y0, x1, y1), size)
        picture = Image.fromarray(picture, "RGB")
    return np.asarray(picture.resize(size, LANCZOS, box=(x0, y0, x1, y1)))


def _simd_lanczos(pixels: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    if not hasattr(_RESIZER, "resizer"):  # one per thread: a Resizer keeps scratch buffers
        _RESIZER.resizer = Resizer()
    x0, y0, x1, y1 = box
    options = ResizeOptions(resize_alg=_LANCZOS3, crop_box=CropBox(x0, y0, x1 - x0, y1 - y0))
    src = ImageData(pixels.shape[1], pixels.shape[0], PixelType.U8x3, pixels.tobytes())
    dst = ImageData(size[0], size[1], PixelType.U8x3)
    _RESIZER.resizer.resize(src, dst, options)
    return np.frombuffer(dst.get_buffer(), np.uint8).reshape(size[1], size[0], 3)


def undo_up_filter(delta: np.ndarray) -> np.ndarray:
    """Rows' running sum mod 256 (the inverse of the Up filter), as a new array.

    In log2(rows) whole-array steps: numpy's cumsum along rows runs ~6x slower (no SIMD there).
    """
    out = delta.copy()
    step = 1
    while step < len(out):
        out[step:] += out[:-step]  # numpy buffers the overlap: each step adds the previous step's rows
        step *= 2
    return out


def inflate_whole(body: bytes, expected: int) -> bytes:
    """One whole zlib stream of at most `expected` bytes (ValueError otherwise): read no further."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, expected + 1)
    except zlib.error as e:
        raise ValueError(f"corrupt pixel payload: {e}") from e
    if not inflater.eof or inflater.unused_data:
        raise ValueError("corrupt pixel payload: not one whole zlib stream")
    return raw


# A PNG of the "Up"-filtered rows (filter type 2 on every row: the filter of the payload above),
# deflated with zlib level 1, strategy Z_RLE: what `compact` records hold (`tf.io.decode_png` reads
# it). Measured once on 299x299 images, 10 to 30 of each corpus (mean size, encode ms; 2-core VM):
#   scikit-image's photos (10, textures too)   Z_RLE 139.6 KB 2.1 ms   default strategy 124.2 KB 2.7 ms
#   bench.download's corpus                    Z_RLE 137.9 KB 1.9 ms   default strategy 147.1 KB 3.2 ms
#   testkit.corpus.photo                       Z_RLE 142.8 KB 2.0 ms   default strategy 164.8 KB 3.2 ms
# Pillow's PNG (adaptive filters): level 1 121-164 KB in 5-8 ms, level 6 115-142 KB in 13-18 ms.
# `python -m bench.records --compact` measures the records of each format.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_UP = 2  # PNG filter type "Up"
_IHDR_RGB8 = (8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(arr: np.ndarray) -> bytes:
    """A lossless PNG of a uint8 [H, W, 3] array, every row Up-filtered (see above)."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    h, w, _ = arr.shape
    flat = np.ascontiguousarray(arr).reshape(h, w * 3)
    rows = np.empty((h, 1 + w * 3), np.uint8)
    rows[:, 0] = _PNG_UP
    rows[:, 1:] = flat
    rows[1:, 1:] -= flat[:-1]  # wraps mod 256, as PNG's filters do
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = deflate.compress(rows.data) + deflate.flush()
    return b"".join(
        [
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", struct.pack(">II5B", w, h, *_IHDR_RGB8)),
            _png_chunk(b"IDAT", idat),
            _png_chunk(b"IEND", b""),
        ]
    )


def decode_png(data: bytes, max_pixels: int = 1 << 24) -> np.ndarray:
    """uint8 [H, W, 3] of a PNG written by `encode_png` (chunk CRCs checked); ValueError for any other
    PNG (Pillow reads those) or a corrupt one."""
    data = bytes(data)
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"not a PNG (starts with {data[:8]!r})")
    pos, header, idat, kind = 8, None, [], b""
    while pos + 12 <= len(data):
        (length,), kind = struct.unpack_from(">I", data, pos), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or len(data) < pos + 12 + length:
            break
        if struct.unpack_from(">I", data, pos + 8 + length)[0] != zlib.crc32(body, zlib.crc32(kind)):
            raise ValueError(f"corrupt PNG: bad CRC of {kind!r}")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">II5B", body) if length == 13 else None
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or header[2:] != _IHDR_RGB8 or kind != b"IEND":
        raise ValueError("not a PNG of encode_png (8-bit RGB, not interlaced, complete)")
    w, h = header[:2]
    if not 0 < w * h <= max_pixels:
        raise ValueError(f"the PNG declares {w}x{h} pixels (at most {max_pixels})")
    raw = inflate_whole(b"".join(idat), h * (1 + w * 3))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * 3) if len(raw) == h * (1 + w * 3) else None
    if rows is None or (rows[:, 0] != _PNG_UP).any():
        raise ValueError("not a PNG of encode_png (rows of another size or filter)")
    return undo_up_filter(rows[:, 1:].reshape(h, w, 3))


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
_NETPBM = {b"1": "pbm", b"4": "pbm", b"2": "pgm", b"5": "pgm", b"3": "ppm", b"6": "ppm", b"7": "pam"}
_FTYP = {
    b"avif": "avif",
    b"avis": "avif",
    b"heic": "heic",
    b"heix": "heic",
    b"mif1": "heic",
    b"msf1": "heic",
    b"hevc": "heic",
}


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
