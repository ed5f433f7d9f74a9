"""Unit tests of common.pictures.images: decoding every mode, resizing, failures, fuzzing, payloads."""

from __future__ import annotations

import functools
import io
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from common.pictures import images as img
from testkit import corpus, hostile

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data")

GOOD = corpus.good_images()
BAD = corpus.bad_images()
WHITE = 255


def _is_jpeg(name: str) -> bool:
    return name.startswith("jpeg")


# --- every good image, every mode, against the reference ----------------------------------


@pytest.mark.parametrize("mode", img.RESIZE_MODES)
@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_image_matches_reference(name: str, mode: str):
    out = img.load_rgb(GOOD[name], mode=mode)
    assert out.dtype == np.uint8 and out.shape == (299, 299, 3)
    diff = np.abs(out.astype(int) - corpus.reference_rgb(GOOD[name], mode=mode))
    if _is_jpeg(name):  # draft decoding (1/2 .. 1/8 scale IDCT) differs slightly
        assert diff.mean() < 1.5 and diff.max() <= 24, (diff.mean(), diff.max())
    else:
        assert diff.max() <= 1, diff.max()


@pytest.mark.parametrize("size", [(299, 299), (224, 160), (64, 128)])
def test_output_shape_is_height_width_3(size: tuple[int, int]):
    out = img.load_rgb(GOOD["jpeg_rgb"], size=size, mode="contain")
    assert out.shape == (size[1], size[0], 3)


# --- geometry ------------------------------------------------------------------------------


def _white_rows(out: np.ndarray) -> np.ndarray:
    return (out == WHITE).all(axis=(1, 2))


def _white_cols(out: np.ndarray) -> np.ndarray:
    return (out == WHITE).all(axis=(0, 2))


def test_contain_wide_image_has_white_bars_top_and_bottom():
    out = img.load_rgb(GOOD["jpeg_rgb"])  # 640x480 -> 299x224, 75 rows of padding
    rows = _white_rows(out)
    assert rows[:37].all() and rows[-37:].all()
    assert not rows[40:-40].any()
    assert not _white_cols(out).any()


def test_contain_tall_image_has_white_bars_left_and_right():
    out = img.load_rgb(GOOD["jpeg_portrait"])
    cols = _white_cols(out)
    assert cols[:37].all() and cols[-37:].all()
    assert not cols[40:-40].any()
    assert not _white_rows(out).any()


def test_small_square_image_is_enlarged_without_border():
    assert Image.open(io.BytesIO(GOOD["jpeg_small"])).size == (200, 200)
    out = img.load_rgb(GOOD["jpeg_small"])
    assert not _white_rows(out).any() and not _white_cols(out).any()


@pytest.mark.parametrize("mode", ["crop", "stretch"])
@pytest.mark.parametrize("name", ["jpeg_rgb", "jpeg_portrait", "png_rgb", "jpeg_small"])
def test_crop_and_stretch_leave_no_white_bars(name: str, mode: str):
    out = img.load_rgb(GOOD[name], mode=mode)
    assert not _white_rows(out).any() and not _white_cols(out).any()


def test_crop_takes_the_centre():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 80:220] = (10, 200, 10)  # green beyond the middle third (filter support), else black
    out = img.resize(Image.fromarray(arr), (50, 50), "crop")
    assert (np.abs(out.astype(int) - (10, 200, 10)) <= 2).all()


@pytest.mark.parametrize("name", ["jpeg_exif_rotated", "jpeg_bad_exif"])
def test_exif_orientation_is_applied(name: str):
    stored = Image.open(io.BytesIO(GOOD[name]))
    shown = img.decode(GOOD[name])
    assert shown.size == stored.size[::-1]  # orientation 6: wide file, tall picture
    # The RED block stored top-left is shown top-right after a 90 degree clockwise turn.
    w = shown.size[0]
    assert np.abs(np.subtract(shown.getpixel((w - 5, 5)), corpus.RED)).max() < 20
    out = img.load_rgb(GOOD[name])
    assert _white_cols(out)[:30].all() and not _white_rows(out).any()


# --- JPEG draft decoding -------------------------------------------------------------------


@functools.cache
def _rotated_large_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(corpus.photo(1600, 800, 21)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("mode", img.RESIZE_MODES)
@pytest.mark.parametrize("target", [(299, 299), (100, 400), (400, 100), (64, 64)])
@pytest.mark.parametrize("name", ["jpeg_large", "jpeg_progressive", "rotated_large"])
def test_draft_keeps_twice_the_needed_size(name: str, target: tuple[int, int], mode: str):
    data = _rotated_large_jpeg() if name == "rotated_large" else GOOD[name]
    full_size = _shown_size(data)
    drafted = img.decode(data, draft_for=target, mode=mode)
    need_w, need_h = img._scaled_size(full_size, target, mode)
    assert drafted.size == full_size or (drafted.size[0] >= 2 * need_w and drafted.size[1] >= 2 * need_h), (
        drafted.size
    )


@functools.cache
def _shown_size(data: bytes) -> tuple[int, int]:
    return img.decode(data).size


def test_draft_actually_reduces_large_jpeg():
    assert img.decode(GOOD["jpeg_large"]).size == (1600, 1200)
    assert img.decode(GOOD["jpeg_large"], draft_for=(299, 299)).size == (800, 600)
    assert img.decode(GOOD["jpeg_large"], draft_for=(64, 64)).size == (200, 150)


# --- DCT-scaled JPEG decoding: exact box, geometry from the original size, fast path ---------
# Backends of load_rgb: simplejpeg + cykooz.resizer (fast), simplejpeg + Pillow LANCZOS (where
# cykooz.resizer has no wheel), Pillow throughout (where simplejpeg has none, and for what it refuses).

BACKENDS = ("fast", "simplejpeg_pillow", "pillow")
_INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """load_rgb as it runs with both wheels, without cykooz.resizer, and without simplejpeg."""
    if request.param != "pillow" and getattr(img, "simplejpeg", None) is None:
        pytest.skip("simplejpeg is not installed")
    if request.param == "fast" and getattr(img, "Resizer", None) is None:
        pytest.skip("cykooz.resizer is not installed")
    if request.param == "simplejpeg_pillow":
        monkeypatch.setattr(img, "Resizer", None, raising=False)
    if request.param == "pillow":
        monkeypatch.setattr(img, "simplejpeg", None, raising=False)
    return request.param


def _jpeg(arr: np.ndarray, orientation: int = 1, quality: int = 95) -> bytes:
    """A 4:4:4 JPEG whose picture, once EXIF `orientation` is applied, is `arr`."""
    im, params = Image.fromarray(arr), {}
    if orientation != 1:
        im = im.transpose(_INVERSE[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=0, **params)
    return buf.getvalue()


def _layout(shown: tuple[int, int], size: tuple[int, int], mode: str):
    """DESIGN's geometry from the original size: source box, picture size, offset on the canvas."""
    (w, h), (tw, th) = shown, size
    if mode == "stretch":
        return (0, 0, w, h), size, (0, 0)
    if mode == "crop":
        cw, ch = (tw / th * h, h) if w / h >= tw / th else (w, w * th / tw)
        return ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2), size, (0, 0)
    inner = (tw, max(1, round(h / w * tw))) if w / h > tw / th else (max(1, round(w / h * th)), th)
    return (0, 0, w, h), inner, (round((tw - inner[0]) / 2), round((th - inner[1]) / 2))


@functools.cache
def _float_reference(data: bytes, mode: str, size: tuple[int, int] = (299, 299), scale: int = 1):
    """Float Lanczos-3 of the decode at 1/scale (libjpeg's DCT scaling; 1: the full decode) with the
    exact geometry, EXIF applied: picture, offset. A centred box only (every mode's is)."""
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(0x0112, 1)
    swap = orientation in (5, 6, 7, 8)
    stored = im.size
    if scale > 1:
        im.draft("RGB", (stored[0] // scale, stored[1] // scale))  # Pillow's rule: sides // wanted
        assert im.size == (-(-stored[0] // scale), -(-stored[1] // scale))
    box, inner, offset = _layout(stored[::-1] if swap else stored, size, mode)
    if swap:  # the box and size in the file's orientation; the result is turned at the end
        box, inner = (box[1], box[0], box[3], box[2]), inner[::-1]
    rgb = np.asarray(im.convert("RGB"), np.float32)
    channels = [
        Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize(
            inner, Image.Resampling.LANCZOS, box=tuple(v / scale for v in box)
        )
        for c in range(3)
    ]
    channels = [_shown(c, orientation) for c in channels]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0, 255), offset


def _shown(channel: Image.Image, orientation: int) -> Image.Image:
    """A picture in the file's orientation as shown: Pillow's ImageOps.exif_transpose."""
    channel.getexif()[0x0112] = orientation
    return ImageOps.exif_transpose(channel)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def _picture_psnr(out: np.ndarray, reference) -> float:
    """PSNR over the picture's area (not the letterbox) against a float reference."""
    picture, (x, y) = reference
    h, w = picture.shape[:2]
    assert out.shape[0] >= y + h and out.shape[1] >= x + w
    return _psnr(out[y : y + h, x : x + w], picture)


def _checker(w: int, h: int, cell: int = 60) -> np.ndarray:
    """Sharp-edged coloured squares everywhere: any sub-pixel shift costs PSNR."""
    y, x = np.mgrid[:h, :w]
    c = ((x // cell + y // cell) % 2 * 200 + 30).astype(np.uint8)
    return np.stack([c, c // 2 + 60, 255 - c], axis=-1)


@functools.cache
def _checker_jpeg(w: int, h: int, orientation: int) -> bytes:
    return _jpeg(_checker(w, h, w // 10), orientation)


SMALL = (64, 64)  # a small target reaches the 1/8 scale with small images
# (width, height, mode, DCT scale load_rgb decodes at for SMALL)
SCALED_CASES = [
    (301, 201, "contain", 2),
    (601, 401, "contain", 4),
    (1201, 801, "contain", 8),
    (1201, 801, "crop", 4),
    (603, 1205, "crop", 4),
    (1201, 801, "stretch", 4),
]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("w, h, mode, scale", SCALED_CASES)
def test_scaled_decode_reads_the_exact_box(
    backend: str, w: int, h: int, mode: str, scale: int, orientation: int
):
    # A scaled decode rounds an odd side up (1201 -> 151 at 1/8); resizing all of it shifted and
    # stretched the picture by up to half an output pixel. Against a float Lanczos-3 of the exact box
    # of the same scaled decode, the shift shows alone, whatever detail the scale loses.
    data = _checker_jpeg(w, h, orientation)
    stored = Image.open(io.BytesIO(data)).size
    assert img._dct_scale(stored, img._need(stored, orientation, SMALL, mode)) == scale
    out = img.load_rgb(data, mode=mode, size=SMALL)
    assert _picture_psnr(out, _float_reference(data, mode, SMALL, scale)) >= 45  # 56+; shifted: 37 or less


@functools.cache
def _edge_jpeg(w: int, h: int) -> bytes:
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[:, w * 11 // 12 :] = (0, 40, 80)  # white | dark, near the right side
    return _jpeg(arr)


@pytest.mark.parametrize("w, h, size", [(1201, 801, (299, 299)), (1201, 801, SMALL), (2403, 1603, SMALL)])
def test_scaled_decode_does_not_move_an_edge(backend: str, w: int, h: int, size: tuple[int, int]):
    data = _edge_jpeg(w, h)
    out = img.load_rgb(data, size=size)
    picture, (x, y) = _float_reference(data, "contain", size)
    rows = slice(picture.shape[0] // 2 - 5, picture.shape[0] // 2 + 5)
    got = _crossing(out[y : y + picture.shape[0], x : x + picture.shape[1]][rows])
    assert abs(got - _crossing(picture[rows])) < 0.05  # the old path was 0.2-0.5 px off


def _crossing(rows: np.ndarray) -> float:
    """Sub-pixel column where the mean row first falls below 128."""
    row = rows.astype(np.float64).mean(axis=(0, 2))
    i = int(np.argmax(row < 128))
    return i - 1 + (row[i - 1] - 128) / (row[i - 1] - row[i])


@functools.cache
def _portrait_jpeg(orientation: int) -> bytes:
    return _jpeg(corpus.photo(859, 1288, 41), orientation, quality=90)


@pytest.mark.parametrize("orientation", [1, 6])
def test_contain_geometry_comes_from_the_original_size(backend: str, orientation: int):
    # 859x1288 fits as 199x299 (199.41); its 1/2-scale decode, 430x644, would give 200 (199.64).
    out = img.load_rgb(_portrait_jpeg(orientation))
    white = _white_cols(out)
    assert (~white).sum() == 199
    assert white[:50].all() and white[-50:].all() and not white[50:249].any()
    assert not _white_rows(out).any()


@pytest.mark.parametrize("mode", img.RESIZE_MODES)
@pytest.mark.parametrize(
    "name",
    [
        "jpeg_rgb",
        "jpeg_portrait",
        "jpeg_small",
        "jpeg_gray",
        "jpeg_progressive",
        "jpeg_large",
        "jpeg_exif_rotated",
    ],
)
def test_fast_path_agrees_with_pillow(monkeypatch: pytest.MonkeyPatch, name: str, mode: str):
    calls = _count_fast_decodes(monkeypatch)
    fast = img.load_rgb(GOOD[name], mode=mode)
    assert calls == [True]  # simplejpeg decoded it
    monkeypatch.setattr(img, "simplejpeg", None)
    pillow = img.load_rgb(GOOD[name], mode=mode)
    assert _psnr(fast, pillow) >= 40
    if name == "jpeg_gray":
        assert (fast[..., 0] == fast[..., 1]).all() and (fast[..., 1] == fast[..., 2]).all()


def _count_fast_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each simplejpeg decode load_rgb tries, whether it was used."""
    if getattr(img, "simplejpeg", None) is None:
        pytest.skip("simplejpeg is not installed")
    calls: list[bool] = []
    real = img._simplejpeg

    def spy(*args):
        pixels = real(*args)
        calls.append(pixels is not None)
        return pixels

    monkeypatch.setattr(img, "_simplejpeg", spy)
    return calls


def test_cmyk_jpeg_goes_through_pillow(monkeypatch: pytest.MonkeyPatch):
    calls = _count_fast_decodes(monkeypatch)
    out = img.load_rgb(GOOD["jpeg_cmyk"])
    assert calls == []  # simplejpeg's CMYK -> RGB ignores Adobe's inverted CMYK
    diff = np.abs(out.astype(int) - corpus.reference_rgb(GOOD["jpeg_cmyk"]))
    assert diff.mean() < 1.5


def test_a_jpeg_simplejpeg_refuses_falls_back_to_pillow(monkeypatch: pytest.MonkeyPatch):
    if getattr(img, "simplejpeg", None) is None:
        pytest.skip("simplejpeg is not installed")
    data = GOOD["jpeg_large"]

    def refuse(*args, **kwargs):
        raise ValueError("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9")

    monkeypatch.setattr(img.simplejpeg, "decode_jpeg", refuse)
    got = img.load_rgb(data)
    monkeypatch.setattr(img, "simplejpeg", None)
    np.testing.assert_array_equal(got, img.load_rgb(data))


@pytest.mark.parametrize("mode", img.RESIZE_MODES)
@pytest.mark.parametrize("w, h", [(1, 1), (2, 3), (3000, 5), (5, 3000), (17, 9), (4801, 3)])
def test_extreme_sizes_on_every_backend(backend: str, w: int, h: int, mode: str):
    data = _jpeg(corpus.photo(w, h, 42))
    out = img.load_rgb(data, mode=mode, size=(64, 48))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert _picture_psnr(out, _float_reference(data, mode, (64, 48))) >= 35


# --- modes and transparency ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, region",
    [
        ("png_rgba", (slice(100, 200), slice(5, 60))),  # left quarter alpha 0, black underneath
        ("png_64bit", (slice(100, 200), slice(5, 60))),
        ("png_p_transparent", (slice(110, 190), slice(110, 190))),
        ("png_rgb_trns", (slice(85, 140), slice(50, 170))),
        ("gif_transparent", (slice(100, 200), slice(5, 60))),
        ("webp_lossless", (slice(42, 90), slice(0, 299))),
        ("png_la", (slice(100, 200), slice(0, 2))),  # alpha ramps from 0 at the left edge
    ],
)
def test_transparency_becomes_white(name: str, region: tuple[slice, slice]):
    out = img.load_rgb(GOOD[name])
    assert out[region].min() >= 250, out[region].min()


def test_half_transparent_pixels_blend_with_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 3] = 128
    out = img.decode(_png(Image.fromarray(rgba, "RGBA")))
    assert set(np.unique(np.asarray(out))) <= {127, 128}


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_16bit_grey_is_scaled_not_clipped():
    arr = np.array([[65535, 32768, 1000, 65280, 0, 257]], np.uint16)
    expected = [255, 128, 4, 254, 0, 1]  # round(v / 257); clipping would give 255 for all but 0
    for data in (corpus.png16(arr), _png(Image.fromarray(arr))):
        assert np.asarray(img.decode(data))[0, :, 0].tolist() == expected
        assert Image.open(io.BytesIO(data)).mode == "I;16"


def test_48bit_rgb_is_rounded_not_truncated():
    arr = np.array([[[65535, 32768, 1000], [65280, 0, 257]]], np.uint16)
    # Pillow alone keeps the high byte: 1000 -> 3, 65280 -> 255.
    assert np.asarray(Image.open(io.BytesIO(corpus.png16(arr))))[0, :, 2].tolist() == [3, 1]
    out = np.asarray(img.decode(corpus.png16(arr)))
    assert out.tolist() == [[[255, 128, 4], [254, 0, 1]]]


def test_48bit_tiff_is_rounded_not_truncated():
    arr = np.array([[[65535, 32768, 1000], [65280, 0, 257]]], np.uint16)
    data = corpus.tiff16_rgb(arr)
    assert np.asarray(Image.open(io.BytesIO(data)))[0, :, 2].tolist() == [3, 1]
    assert np.asarray(img.decode(data)).tolist() == [[[255, 128, 4], [254, 0, 1]]]


def test_64bit_rgba_is_rounded_and_composited():
    arr = np.array([[[65280, 32768, 1000, 65535], [0, 0, 0, 0]]], np.uint16)
    assert np.asarray(img.decode(corpus.png16(arr))).tolist() == [[[254, 128, 4], [255] * 3]]


def test_16bit_pgm_opens_as_I_and_is_scaled():
    data = b"P5 3 1 65535\n" + np.array([65535, 32768, 1000], ">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.asarray(img.decode(data))[0, :, 0].tolist() == [255, 128, 4]


def test_float_and_32bit_images_are_scaled():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(img.decode(_tiff(floats)))[0, :, 0].tolist() == [0, 128, 255]
    ints = Image.fromarray(np.array([[-1_000_000, 0, 1_000_000]], np.int32), "I")
    assert np.asarray(img.decode(_tiff(ints)))[0, :, 0].tolist() == [0, 128, 255]


def _tiff(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, seed, tolerance",
    [
        ("jpeg_cmyk", 5, 6),
        ("tiff_cmyk", 11, 1),
        ("tiff_lab", 12, 3),
        ("webp", 8, 6),
        ("png_rgb", 2, 0),
        ("bmp", 9, 0),
        ("tiff", 10, 0),
        ("ppm", 19, 0),
    ],
)
def test_colour_spaces_decode_to_the_right_rgb(name: str, seed: int, tolerance: float):
    decoded = np.asarray(img.decode(GOOD[name])).astype(int)
    expected = corpus.photo(*decoded.shape[1::-1], seed)
    assert np.abs(decoded - expected).mean() <= tolerance


def test_grey_and_bilevel_images_are_grey_rgb():
    grey = np.asarray(img.decode(GOOD["jpeg_gray"]))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    bilevel = np.asarray(img.decode(GOOD["png_1bit"]))
    assert set(np.unique(bilevel)) == {0, 255}


@pytest.mark.parametrize("name", ["gif_animated", "apng", "webp_animated"])
def test_animation_uses_the_first_frame(name: str):
    assert Image.open(io.BytesIO(GOOD[name])).n_frames == 2
    red, _, blue = np.asarray(img.decode(GOOD[name])).reshape(-1, 3).mean(axis=0)
    assert red > blue + 80  # first frame red, second blue


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "CMYK", "RGBX", "RGBa", "P"])
def test_resize_accepts_any_pillow_mode(mode: str):
    src = Image.new("RGB", (40, 20), (200, 100, 50))
    out = img.resize(src.quantize(4) if mode == "P" else src.convert(mode), (16, 16), "stretch")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (200, 100, 50)).max() <= 6


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_fails_with_its_reason(name: str):
    data, reason = BAD[name]
    for call in (
        lambda: img.load_rgb(data, max_pixels=50_000_000),
        lambda: img.decode(data, max_pixels=50_000_000),
    ):
        with pytest.raises(img.ImageError) as info:
            call()
        assert info.value.reason == reason
        assert info.value.detail and isinstance(info.value.detail, str)


def test_not_an_image_detail_shows_the_first_bytes():
    with pytest.raises(img.ImageError) as info:
        img.decode(b"<html><body>nope</body></html>")
    assert "cannot identify image file" in info.value.detail
    assert "<html>" in info.value.detail


def test_bomb_is_refused_before_decoding():
    start = time.perf_counter()
    with pytest.raises(img.ImageError) as info:
        img.load_rgb(BAD["bomb"][0])  # the default limit refuses 400 Mpixels too
    assert info.value.reason == "too_many_pixels"
    assert time.perf_counter() - start < 0.5


def test_a_jpeg_of_many_scans_is_refused_before_decoding():
    # 10,000 empty scans over 8000x8000 (120 KB): ~100 s of libjpeg before the scans were counted
    data = hostile.many_scan_jpeg(10_000)
    assert len(data) < 200_000
    for call in (lambda: img.load_rgb(data), lambda: img.decode(data)):
        with pytest.raises(img.ImageError) as info:
            call()
        assert info.value.reason == "too_many_scans"
        assert "more than 100 scans" in info.value.detail


def test_the_scan_limit_is_a_parameter_and_a_setting():
    from common.settings import Settings
    from common.stages import pixels_of

    data = hostile.many_scan_jpeg(6, 64, 48)
    assert img.load_rgb(data, max_scans=6).shape == (299, 299, 3)
    with pytest.raises(img.ImageError, match="more than 5 scans"):
        img.load_rgb(data, max_scans=5)
    with pytest.raises(img.ImageError, match="more than 5 scans"):
        img.decode(data, max_scans=5)
    assert pixels_of(data, Settings(max_jpeg_scans=6)).shape == (299, 299, 3)
    with pytest.raises(img.ImageError, match="KOALA_MAX_JPEG_SCANS"):
        pixels_of(data, Settings(max_jpeg_scans=5))


def _jpeg_with_thumbnail() -> bytes:
    """A progressive JPEG whose EXIF block holds a JPEG thumbnail (with its own scan)."""
    thumb = io.BytesIO()
    Image.fromarray(corpus.photo(32, 24, 36)).save(thumb, "JPEG", quality=80)
    exif = Image.Exif()
    exif[0x010E] = "a description"  # a text tag, so the thumbnail bytes sit inside APP1
    app1_body = b"Exif\0\0" + exif.tobytes() + thumb.getvalue()
    app1 = b"\xff\xe1" + struct.pack(">H", len(app1_body) + 2) + app1_body
    out = io.BytesIO()
    Image.fromarray(corpus.photo(320, 240, 37)).save(out, "JPEG", quality=90, progressive=True)
    return out.getvalue()[:2] + app1 + out.getvalue()[2:]


def test_jpeg_scans_counts_the_first_image_s_scans_only():
    assert img.jpeg_scans(GOOD["jpeg_rgb"]) == 1
    assert img.jpeg_scans(GOOD["jpeg_progressive"]) == 10  # Pillow's progressive script
    data = _jpeg_with_thumbnail()
    assert data.count(b"\xff\xda") == 11 and img.jpeg_scans(data) == 10  # not the thumbnail's
    assert img.load_rgb(data, max_scans=10).shape == (299, 299, 3)
    # restart markers and stuffed 0xFF bytes inside a scan's data are not markers
    restarts = io.BytesIO()
    Image.fromarray(corpus.photo(64, 64, 38)).save(restarts, "JPEG", quality=100, restart_marker_blocks=1)
    assert any(restarts.getvalue().count(bytes((0xFF, m))) for m in range(0xD0, 0xD8))
    assert img.jpeg_scans(restarts.getvalue()) == 1
    # counting stops past the limit; a cut file counts what it has
    assert img.jpeg_scans(hostile.many_scan_jpeg(1000), stop_after=50) == 51
    assert img.jpeg_scans(hostile.many_scan_jpeg(40)[:-300]) < 40


@given(st.lists(st.sampled_from([b"\xff", b"\xda", b"\x00", b"\xff\xda"]), max_size=40))
def test_sos_markers_counts_every_ff_da_pair(parts):
    data = b"".join(parts)
    assert img._sos_markers(data) == data.count(b"\xff\xda")


def test_common_formats_are_tried_first_and_the_refused_ones_never():
    formats = img._formats()
    assert formats[:4] == ["JPEG", "PNG", "WEBP", "GIF"]
    assert "EPS" not in formats and not set(formats) & {"ICO", "CUR", "ICNS"}
    assert len(formats) == len(set(formats))


def test_a_jpeg_of_too_many_marker_segments_is_refused_without_a_long_walk():
    # COM segments holding an SOS marker's two bytes: cheap for libjpeg, not for a Python loop
    comments = b"\xff\xfe\x00\x04\xff\xda" * 70_000
    data = GOOD["jpeg_rgb"][:2] + comments + GOOD["jpeg_rgb"][2:]
    assert img.jpeg_scans(data) == -1
    with pytest.raises(img.ImageError, match="marker segments") as info:
        img.load_rgb(data)
    assert info.value.reason == "too_many_scans"
    # no more SOS bytes in the file than the limit allows scans: nothing is walked, libjpeg decodes
    empty_comments = b"\xff\xfe\x00\x02" * 70_000
    plain = GOOD["jpeg_rgb"][:2] + empty_comments + GOOD["jpeg_rgb"][2:]
    assert img.jpeg_scans(plain) == -1
    assert img.load_rgb(plain).shape == (299, 299, 3)


def _bmp_icon(kind: int) -> bytes:
    """A real 32x32 ICO (kind 1) or CUR (kind 2) with a BMP frame, as Pillow writes icons."""
    buf = io.BytesIO()
    Image.fromarray(corpus.photo(32, 32, 34)).save(buf, "ICO", sizes=[(32, 32)], bitmap_format="bmp")
    return buf.getvalue()[:2] + struct.pack("<H", kind) + buf.getvalue()[4:]


@pytest.mark.parametrize("name", ["ico_bomb", "icns_bomb", "favicon", "cursor"])
def test_icon_containers_are_refused_before_decoding(name: str, tmp_path):
    # ICO's Image.open decodes its frame, and an ICNS entry's PNG may be any size whatever its
    # type says: 1.6 GB and 8 s for the ICO bomb before its size could be checked.
    data = {
        "ico_bomb": lambda: hostile.ico(hostile.png(20_000, 20_000)),
        "icns_bomb": lambda: hostile.icns(hostile.png(12_000, 12_000)),
        "favicon": lambda: _bmp_icon(1),
        "cursor": lambda: _bmp_icon(2),
    }[name]()
    got = hostile.decode_peak(data, tmp_path)
    assert got["reason"] == "not_an_image", got
    assert got["peak_mb"] < 20 and got["seconds"] < 1, got
    with pytest.raises(img.ImageError, match="refused"):
        img.decode(data)


def test_cursors_are_refused_but_a_tga_that_starts_like_one_is_not():
    with pytest.raises(img.ImageError, match="CUR"):
        img.load_rgb(_bmp_icon(2))
    buf = io.BytesIO()
    Image.fromarray(corpus.photo(48, 32, 35)).save(buf, "TGA")
    assert buf.getvalue()[:4] == b"\0\0\2\0"  # CUR's magic: a magic-only check would refuse it
    np.testing.assert_array_equal(np.asarray(img.decode(buf.getvalue())), corpus.photo(48, 32, 35))


# Peak memory of load_rgb, in bytes per source pixel, beyond a fixed allowance: the decoded image
# (4 bytes a pixel in Pillow, whatever its mode) and one 8-bit RGB copy; 16-bit RGB(A) holds its
# high and low bytes at once instead.
BYTES_PER_PIXEL = 8
FIXED_MB = 24


@pytest.mark.parametrize("side", [3000, pytest.param(9000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("depth", [8, 16])
def test_decode_memory_is_bounded_per_source_pixel(side: int, depth: int, tmp_path):
    got = hostile.decode_peak(hostile.png(side, side, "RGBA", depth), tmp_path)
    assert got["reason"] is None, got
    assert got["peak_mb"] <= side * side * BYTES_PER_PIXEL / 2**20 + FIXED_MB, got


def test_16bit_rounding_is_exact_for_every_value():
    high, low = (a.astype(np.uint8) for a in np.divmod(np.arange(65536), 256))
    expected = (2 * np.arange(65536) + 257) // 514  # round(v / 257)
    np.testing.assert_array_equal(img._round16(high, low), expected)


def test_16bit_image_taller_than_a_strip_is_rounded_everywhere(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(img, "_STRIP_BYTES", 1000)  # a few rows per strip
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    arr = np.stack([values, values[::-1], values.T, np.full_like(values, 65535)], axis=-1)
    out = np.asarray(img.decode(corpus.png16(arr))).astype(int)
    np.testing.assert_array_equal(out, (2 * arr[..., :3].astype(int) + 257) // 514)


def test_max_pixels_is_inclusive():
    data = GOOD["jpeg_small"]  # 200x200
    assert img.load_rgb(data, max_pixels=40_000).shape == (299, 299, 3)
    with pytest.raises(img.ImageError, match="too_many_pixels"):
        img.load_rgb(data, max_pixels=39_999)


def test_pillow_global_limit_is_not_used(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse > 2000 pixels
    assert img.load_rgb(GOOD["jpeg_small"]).shape == (299, 299, 3)
    large = corpus.bomb_png(12_000, 10_000)  # 120 Mpixels: over Pillow's default limit
    with pytest.raises(img.ImageError, match="too_many_pixels"):
        img.decode(large, max_pixels=100_000_000)


def test_invalid_mode_is_a_value_error_naming_the_modes():
    for call in (
        lambda: img.load_rgb(GOOD["png_rgb"], mode="fill"),
        lambda: img.decode(GOOD["png_rgb"], mode="fill"),
        lambda: img.resize(Image.new("RGB", (4, 4)), mode="fill"),
    ):
        with pytest.raises(ValueError, match="contain, crop, stretch"):
            call()


def _small(fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(corpus.photo(48, 32, 30)).save(buf, fmt, **params)
    return buf.getvalue()


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def _palette_with_transparency() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(corpus.photo(48, 32, 31)).quantize(8).save(buf, "PNG", transparency=0)
    return buf.getvalue()


FUZZ_SEEDS = {
    "jpeg": _small("JPEG", quality=80, exif=_rotated_exif()),
    "png": _small("PNG"),
    "png_p_trns": _palette_with_transparency(),
    "png_48bit": corpus.png16(corpus.photo(24, 16, 32).astype(np.uint16) * 257),
    "gif": _small("GIF"),
    "webp": _small("WEBP", quality=80),
    "bmp": _small("BMP"),
    "tiff": _small("TIFF"),
}

_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in edits:
        pos %= max(len(buf), 1)
        if op == "flip" and buf:
            buf[pos] = arg
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([arg]) * (1 + arg % 16)
        elif op == "delete":
            del buf[pos : pos + arg]
    return bytes(buf)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=200,
    deadline=2000,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(sorted(FUZZ_SEEDS)),
    edits=st.lists(_edits, min_size=1, max_size=6),
    mode=st.sampled_from(img.RESIZE_MODES),
)
def test_mutated_images_only_ever_raise_image_error(seed: str, edits, mode: str):
    data = _mutate(FUZZ_SEEDS[seed], edits)
    try:
        out = img.load_rgb(data, size=(32, 32), mode=mode, max_pixels=1_000_000)
    except img.ImageError as e:
        assert e.reason in ("not_an_image", "truncated", "too_many_pixels")
    else:
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3)


# --- extension guessing --------------------------------------------------------------------


def _expected_extension(name: str) -> str:
    prefix = name.split("_")[0]
    return {"jpeg": "jpg", "apng": "png", "tiff": "tif", "pgm": "pgm"}.get(prefix, prefix)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_guess_extension_of_good_images(name: str):
    assert img.guess_extension(GOOD[name]) == _expected_extension(name)


@pytest.mark.parametrize("name", ["html", "empty", "garbage"])
def test_guess_extension_of_non_images_is_bin(name: str):
    assert img.guess_extension(BAD[name][0]) == "bin"
