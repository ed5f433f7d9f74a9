"""Deterministic generated test images (good and bad) and an independent reference decoder.

Everything is built from fixed numpy seeds, with no network. `good_images()` covers every mode
and format `common.pictures.images` supports; `bad_images()` gives bytes with the failure reason expected
from it; `reference_rgb` is a plain, slow re-implementation used to check the fast path.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, features

Image.MAX_IMAGE_PIXELS = None  # the reference decodes the corpus only; no bomb check wanted

# Marker colours the tests look for; photo() never produces values above 232, so white (255)
# always means padding or transparency.
RED = (220, 20, 20)
BLUE = (20, 20, 220)
KEY = (1, 2, 3)  # colour-key transparency of png_rgb_trns; photo() never produces it


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 [h, w, 3] image: smooth gradients, soft blobs, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 60 + 150 * x, 80 + 120 * y, 180 - 100 * x * y
    for _ in range(6):
        cx, cy, radius, soft = (float(v) for v in rng.uniform((0, 0, 0.08, 0.005), (1, 1, 0.3, 0.05)))
        colour = rng.uniform(20, 225, 3).astype(np.float32)
        dist = np.hypot((x - cx) * (w / max(w, h)), (y - cy) * (h / max(w, h)))
        mask = (1 / (1 + np.exp(np.clip((dist - radius) / soft, -50, 50))))[..., None]
        img += (colour - img) * mask
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3
    return np.clip(np.rint(img), 5, 232).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(photo(w, h, seed), "RGB")


def _marked(w: int, h: int) -> Image.Image:
    """Photo with a RED block in the top-left corner, to tell orientation apart."""
    arr = photo(w, h, 7)
    arr[: h // 3, : w // 4] = RED
    return Image.fromarray(arr, "RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA from the last axis), written by hand."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = arr.astype(">u2").reshape(h, -1).view(np.uint8)
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def tiff16_rgb(arr: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit RGB TIFF of a uint16 [h, w, 3] array, by hand."""
    h, w = arr.shape[:2]
    pixels = arr.astype("<u2").tobytes()
    tags = [
        (256, 3, 1, w),
        (257, 3, 1, h),
        (258, 3, 3, 0),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 0),
        (277, 3, 1, 3),
        (278, 3, 1, h),
        (279, 4, 1, len(pixels)),
    ]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: bits_at + 6}.get(tag, value)
        out += struct.pack("<HHI", tag, kind, count)
        out += struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
    return out + struct.pack("<I", 0) + struct.pack("<3H", 16, 16, 16) + pixels


def _deep(w: int, h: int, channels: int, seed: int) -> np.ndarray:
    """uint16 samples whose low bytes matter (so truncating to the high byte is visible)."""
    rng = np.random.default_rng(seed)
    high = photo(w, h, seed)[..., :channels].astype(np.int64)
    return (high * 257 + rng.integers(-128, 128, high.shape)).clip(0, 65535).astype(np.uint16)


def _jpeg_rgb() -> bytes:
    return _save(_rgb(640, 480, 1), "JPEG", quality=90)


def _jpeg_exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the wide file shows tall
    return _save(_marked(400, 200), "JPEG", quality=92, exif=exif.tobytes())


# An EXIF block with a bogus entry count: Orientation (6) still reads, but re-serialising it, as
# ImageOps.exif_transpose does, raises struct.error.
BROKEN_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08T\x02\x01\x07\x00\x02\x00\x00\x00\x04Cam\x00"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x96\x00\x00\x00\x00"
)


def _jpeg_bad_exif() -> bytes:
    return _save(_marked(320, 240), "JPEG", quality=90, exif=BROKEN_EXIF)


def _png_rgba() -> bytes:
    arr = photo(320, 240, 3)
    alpha = np.full((240, 320), 255, np.uint8)
    alpha[:, :80] = 0  # fully transparent left quarter, black underneath
    arr[:, :80] = 0
    alpha[:, 160:200] = 128  # half transparent band
    return _save(Image.fromarray(np.dstack([arr, alpha]), "RGBA"), "PNG")


def _png_la() -> bytes:
    grey = photo(320, 240, 4)[..., 1]
    alpha = np.tile(np.linspace(0, 255, 320).astype(np.uint8), (240, 1))
    return _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")


def _png_p_transparent() -> bytes:
    im = _rgb(320, 240, 5).quantize(32)
    arr = np.asarray(im).copy()
    arr[60:180, 80:240] = 31  # index 31 is the transparent one
    return _save(_with_palette(arr, im), "PNG", transparency=31)


def _with_palette(arr: np.ndarray, like: Image.Image) -> Image.Image:
    out = Image.fromarray(arr, "P")
    out.putpalette(like.getpalette())
    return out


def _png_rgb_trns() -> bytes:
    arr = photo(320, 240, 6)
    arr[40:120, 40:200] = KEY
    return _save(Image.fromarray(arr, "RGB"), "PNG", transparency=KEY)


def _png_16bit_gray() -> bytes:
    im = Image.fromarray(_deep(320, 240, 1, 8)[..., 0].astype(np.uint16))
    return _save(im, "PNG")  # fromarray(uint16) is I;16, which Pillow writes as 16-bit grey


def _frames(*colours: tuple[int, int, int], size=(160, 120)) -> list[Image.Image]:
    frames = []
    for colour in colours:
        arr = photo(*size, 9) // 4 + np.array(colour, np.uint8) // 4 * 3
        frames.append(Image.fromarray(arr.astype(np.uint8), "RGB"))
    return frames


def _animated(fmt: str, **params) -> bytes:
    first, *rest = _frames(RED, BLUE)
    return _save(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **params)


def _gif_transparent() -> bytes:
    im = _rgb(160, 120, 10).quantize(64)
    arr = np.asarray(im).copy()
    arr[:, :40] = 63
    return _save(_with_palette(arr, im), "GIF", transparency=63)


def _webp_lossless() -> bytes:
    arr = photo(320, 240, 11)
    alpha = np.full((240, 320), 255, np.uint8)
    alpha[:60] = 0
    return _save(Image.fromarray(np.dstack([arr, alpha]), "RGBA"), "WEBP", lossless=True)


def _tiff_float() -> bytes:
    arr = photo(320, 240, 12)[..., 0].astype(np.float32) / 255
    return _save(Image.fromarray(arr, "F"), "TIFF")


def _tiff_int32() -> bytes:
    # Values beyond 16 bits, so the decoder has to stretch min..max to 0..255.
    arr = photo(320, 240, 14)[..., 0].astype(np.int32) * 100_000 - 3_000_000
    return _save(Image.fromarray(arr, "I"), "TIFF")


def _pgm_16bit() -> bytes:
    arr = _deep(200, 150, 1, 15)[..., 0]
    return b"P5 200 150 65535\n" + arr.astype(">u2").tobytes()


GOOD: dict[str, Callable[[], bytes]] = {
    "jpeg_rgb": _jpeg_rgb,
    "jpeg_portrait": lambda: _save(_rgb(480, 640, 2), "JPEG", quality=90),
    "jpeg_small": lambda: _save(_rgb(200, 200, 3), "JPEG", quality=90),
    "jpeg_gray": lambda: _save(_rgb(640, 480, 4).convert("L"), "JPEG", quality=90),
    "jpeg_cmyk": lambda: _save(_rgb(320, 240, 5).convert("CMYK"), "JPEG", quality=92),
    "jpeg_exif_rotated": _jpeg_exif_rotated,
    "jpeg_bad_exif": _jpeg_bad_exif,
    "jpeg_progressive": lambda: _save(_rgb(800, 600, 6), "JPEG", quality=85, progressive=True),
    "jpeg_large": lambda: _save(_rgb(1600, 1200, 7), "JPEG", quality=85),
    "png_rgb": lambda: _save(_rgb(320, 240, 2), "PNG"),
    "png_rgba": _png_rgba,
    "png_la": _png_la,
    "png_p": lambda: _save(_rgb(320, 240, 5).quantize(64), "PNG"),
    "png_p_transparent": _png_p_transparent,
    "png_rgb_trns": _png_rgb_trns,
    "png_1bit": lambda: _save(_rgb(320, 240, 7).convert("1"), "PNG"),
    "png_16bit_gray": _png_16bit_gray,
    "png_48bit": lambda: png16(_deep(240, 180, 3, 16)),
    "png_64bit": lambda: png16(np.dstack([_deep(240, 180, 3, 17), _alpha16(240, 180)])),
    "apng": lambda: _animated("PNG"),
    "gif_animated": lambda: _animated("GIF"),
    "gif_transparent": _gif_transparent,
    "webp": lambda: _save(_rgb(320, 240, 8), "WEBP", quality=90),
    "webp_lossless": _webp_lossless,
    "webp_animated": lambda: _animated("WEBP", lossless=True),
    "bmp": lambda: _save(_rgb(320, 240, 9), "BMP"),
    "tiff": lambda: _save(_rgb(320, 240, 10), "TIFF", compression="tiff_deflate"),
    "tiff_cmyk": lambda: _save(_rgb(320, 240, 11).convert("CMYK"), "TIFF"),
    "tiff_lab": lambda: _save(_rgb(320, 240, 12).convert("LAB"), "TIFF"),
    "tiff_16bit_gray": lambda: _save(Image.fromarray(_deep(320, 240, 1, 18)[..., 0]), "TIFF"),
    "tiff_float": _tiff_float,
    "tiff_int32": _tiff_int32,
    "pgm_16bit": _pgm_16bit,
    "ppm": lambda: _save(_rgb(200, 150, 19), "PPM"),
}
if features.check("avif"):
    GOOD["avif"] = lambda: _save(_rgb(160, 120, 20), "AVIF", quality=90)


def _alpha16(w: int, h: int) -> np.ndarray:
    alpha = np.full((h, w), 65535, np.uint16)
    alpha[:, : w // 4] = 0
    return alpha


@functools.cache
def good_images() -> dict[str, bytes]:
    """Name -> encoded bytes for every supported format and mode (built once per process)."""
    return {name: make() for name, make in GOOD.items()}


def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    """A valid 1-bit PNG of w x h black pixels: a few KB on disk, w*h pixels declared."""
    comp = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@functools.cache
def bad_images() -> dict[str, tuple[bytes, str]]:
    """Name -> (bytes, reason common.pictures.images must fail with, given max_pixels=50_000_000)."""
    good = good_images()
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>"
    return {
        "html": (html, "not_an_image"),
        "empty": (b"", "not_an_image"),
        "garbage": (np.random.default_rng(42).bytes(4096), "not_an_image"),
        "truncated_jpeg": (good["jpeg_rgb"][: len(good["jpeg_rgb"]) // 2], "truncated"),
        "truncated_png": (good["png_rgb"][: len(good["png_rgb"]) // 2], "truncated"),
        "truncated_gif": (good["gif_animated"][: len(good["gif_animated"]) // 3], "truncated"),
        "truncated_webp": (good["webp"][: len(good["webp"]) // 2], "truncated"),
        "bomb": (bomb_png(), "too_many_pixels"),
    }


# --- reference implementation: full decode, no draft, plain Pillow and numpy ---------------


def _png_samples16(data: bytes) -> np.ndarray | None:
    """Samples of a 16-bit PNG as uint16 [h, w, c], for filter-0 files like png16() writes."""
    if not data.startswith(b"\x89PNG") or data[24] != 16:
        return None
    w, h = struct.unpack(">II", data[16:24])
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[data[25]]
    idat, pos = b"", 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels * 2)
    if rows[:, 0].any():
        return None  # filtered rows: leave those to Pillow
    return rows[:, 1:].copy().view(">u2").reshape(h, w, channels).astype(np.uint16)


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """The documented scaling rules for single-channel I;16 / I / F images."""
    v = values.astype(np.float64)
    if values.dtype.kind == "f":
        v = np.nan_to_num(v)
        lo, hi = v.min(), v.max()
        if lo >= 0 and hi <= 1:
            return np.floor(v * 255 + 0.5).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.floor(v + 0.5).astype(np.uint8)
    else:
        lo, hi = v.min(), v.max()
        if lo >= 0 and hi <= 65535:
            return np.floor(v / 257 + 0.5).astype(np.uint8)
    if hi == lo:
        return np.full(v.shape, np.clip(lo, 0, 255), np.uint8)
    return np.floor((v - lo) * 255 / (hi - lo) + 0.5).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.floor(rgb * a + 255 * (1 - a) + 0.5).astype(np.uint8)


def reference_rgb(data: bytes, size: tuple[int, int] = (299, 299), mode: str = "contain") -> np.ndarray:
    """Straightforward decode + resize of a corpus image to uint8 [H, W, 3]."""
    deep = _png_samples16(data)
    if deep is not None:
        eight = np.floor(deep / 257 + 0.5).astype(np.uint8)
        if eight.shape[2] in (2, 4):
            rgb = _on_white(eight[..., :-1], eight[..., -1])
        else:
            rgb = eight
        im = Image.fromarray(np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb, "RGB")
    else:
        im = Image.open(io.BytesIO(data))
        im.load()
        im = _reference_transpose(im)
        im = _reference_to_rgb(im)
    if mode == "contain":
        im = ImageOps.pad(im, size, Image.Resampling.LANCZOS, color=(255, 255, 255))
    elif mode == "crop":
        im = ImageOps.fit(im, size, Image.Resampling.LANCZOS)
    else:
        im = im.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"))


def _reference_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # unwritable EXIF; the orientation tag itself may still be readable
        orientation = im.getexif().get(0x0112, 1)
        methods = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
        return im.transpose(methods[orientation]) if orientation in methods else im


def _reference_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(im)), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        return Image.fromarray(_on_white(rgba[..., :3], rgba[..., 3]), "RGB")
    return im.convert("RGB")


# Photos of the size users download (bench.download --corpus photos): shares of aspect ratios
# (landscape, square, portrait), about 1.0-1.45 Mpix (one in ten up to 3 Mpix).
PHOTO_ASPECTS = (
    (4, 3, 0.30),
    (3, 2, 0.25),
    (16, 9, 0.08),
    (1, 1, 0.07),
    (3, 4, 0.15),
    (2, 3, 0.12),
    (9, 16, 0.03),
)


def photo_jpeg(index: int) -> bytes:
    """A deterministic camera-like JPEG photo of at least 1 Mpix (about 200 KB, ~1.2 bits a pixel).

    Octaves of colour-correlated value noise, strong at low frequencies and weaker at fine ones
    (about a natural image's 1/f spectrum), sharp-edged objects, a slight blur and sensor noise;
    saved as cameras and web sites do: quality 80-93, mostly 4:2:0 (15 % 4:4:4), 30 % progressive,
    Huffman tables optimized. 0.2-0.7 s each to make."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng((21, index))
    aw, ah, _ = PHOTO_ASPECTS[rng.choice(len(PHOTO_ASPECTS), p=[s for *_, s in PHOTO_ASPECTS])]
    mpix = (
        float(np.exp(rng.uniform(0.0, np.log(1.45)))) if rng.random() < 0.9 else float(rng.uniform(1.45, 3.0))
    )
    w = round((mpix * 1e6 * aw / ah) ** 0.5)
    h = round(w * ah / aw)
    field = np.zeros((h, w, 3), np.float32)
    for k, cells in enumerate((3, 8, 24, 80, 260)):
        grid = rng.normal(
            0, 70.0 / 1.6**k, (max(2, cells * h // max(w, h)), max(2, cells * w // max(w, h)), 3)
        )
        grid[..., 1:] = 0.6 * grid[..., :1] + 0.4 * grid[..., 1:]  # colours correlate, as in photos
        for c in range(3):
            octave = Image.fromarray(grid[..., c].astype(np.float32), "F")
            field[..., c] += np.asarray(octave.resize((w, h), Image.Resampling.BICUBIC))
    field += rng.uniform(40, 200, 3).astype(np.float32)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(w // 20, w // 3)), y0 + int(rng.integers(h // 20, h // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, rng.uniform(1.5, 4.5), (h, w, 3)).astype(np.int16)
    options = {
        "quality": int(rng.integers(80, 94)),
        "progressive": bool(rng.random() < 0.3),
        "subsampling": 0 if rng.random() < 0.15 else 2,
        "optimize": True,
    }
    return _save(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), "JPEG", **options)


def is_progressive(img: Image.Image) -> bool:
    """Whether an opened JPEG is progressive (Pillow says so in either of two keys)."""
    return bool(img.info.get("progressive") or img.info.get("progression"))


def shrunk_jpeg(data: bytes, factor: float) -> bytes:
    """A JPEG resized by `factor` on each side (Lanczos), saved at quality 90, progressive where
    the original is (`bench.download --corpus small`: the photos at 0.4)."""
    with Image.open(io.BytesIO(data)) as img:
        progressive = is_progressive(img)
        w, h = img.size
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90, progressive=progressive)
    return out.getvalue()


def imagenet_jpeg(index: int) -> bytes:
    """One deterministic ImageNet-sized JPEG (400..1600 x 350..1200, a quarter portrait, near 100..300 KB):
    a smooth colour field, flat shapes, sensor noise (`bench.download --corpus imagenet`)."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(1000 + index)
    w = int(rng.integers(400, 1601))
    h = int(np.clip(w * rng.uniform(0.6, 0.95), 350, 1200))
    if rng.random() < 0.25:
        w, h = h, w
    field = rng.uniform(20, 235, (max(4, h // 24), max(4, w // 24), 3)).astype(np.uint8)
    img = Image.fromarray(field, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(img).astype(np.int16)
    arr += rng.normal(0, rng.uniform(3, 7), arr.shape).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    target, quality = rng.uniform(100_000, 300_000), 90
    for _ in range(3):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if 0.8 * target < buf.tell() < 1.25 * target:
            break
        quality = int(np.clip(quality + (6 if buf.tell() < target else -8), 60, 97))
    return buf.getvalue()
