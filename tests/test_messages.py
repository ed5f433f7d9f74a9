"""The wire's checks (common/messages.py): what a download or embed message may hold."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest

from common.messages import (
    PayloadSizeError,
    decode_pixels,
    embed_image,
    encode_pixels,
    images_of,
    items_of,
    source_of,
)
from common.pictures.images import load_rgb
from testkit import corpus

KEY = hashlib.md5(b"http://x/1").hexdigest()


def test_a_chunk_holds_urls_or_files_each_with_its_key():
    chunk = [{"k": KEY, "u": "http://x/1"}, {"k": KEY, "p": "a/b.jpg", "b": b"\xff\xd8"}]
    assert items_of(chunk) == chunk
    assert [source_of(i) for i in chunk] == [("http://x/1", ""), ("", "a/b.jpg")]


@pytest.mark.parametrize(
    "chunk",
    [
        [],
        "not a list",
        [{"u": "http://x/1"}],
        [{"k": "not-a-key", "u": "http://x/1"}],
        [{"k": KEY}],
        [{"k": KEY, "u": "http://x/1", "p": "both"}],
        [{"k": KEY, "p": "a.jpg", "b": "not bytes"}],
        [{"k": KEY, "p": "a.jpg", "b": b"", "_path": "/local/a.jpg"}],  # producer-only data never travels
    ],
)
def test_anything_else_is_refused(chunk):
    with pytest.raises(ValueError):
        items_of(chunk)


def test_an_embed_image_says_what_its_source_is():
    url = embed_image({"k": KEY, "u": "http://x/1"}, b"px")
    path = embed_image({"k": KEY, "p": "a/b.jpg", "b": b""}, b"px")
    assert (url["kind"], url["name"], url["source"]) == ("url", KEY, "http://x/1")
    assert (path["kind"], path["name"], path["source"]) == ("path", "a/b.jpg", "a/b.jpg")
    old = {"key": KEY, "name": "a/b.jpg", "source": "a/b.jpg", "pixels": b""}  # before `kind`
    assert images_of([[old], {}, {}])[0]["kind"] == "path"
    with pytest.raises(ValueError, match="md5"):
        images_of([[{**old, "key": "zz"}], {}, {}])


# --- the pixel payload of an embed image ----------------------------------------------------


@pytest.mark.parametrize("shape", [(299, 299, 3), (1, 1, 3), (7, 300, 3), (0, 5, 3)])
def test_pixels_round_trip_exactly(shape: tuple[int, int, int]):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    back = decode_pixels(encode_pixels(arr))
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_pixels_round_trip_non_contiguous_and_shrink():
    arr = load_rgb(corpus.good_images()["jpeg_rgb"])
    flipped = arr[:, ::-1]
    np.testing.assert_array_equal(decode_pixels(encode_pixels(flipped)), flipped)
    assert len(encode_pixels(arr)) < 0.5 * arr.nbytes


def test_encode_pixels_rejects_other_arrays():
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(ValueError):
            encode_pixels(bad)


def _corrupt_payloads() -> dict[str, bytes]:
    good = encode_pixels(corpus.photo(40, 30, 33))
    return {
        "empty": b"",
        "unknown tag": b"X" + good[1:],
        "header only": good[:5],
        "cut": good[: len(good) // 2],
        "wrong height": good[:1] + (31).to_bytes(2, "big") + good[3:],
        "flipped byte": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
        "trailing junk": good + b"junk",
    }


@pytest.mark.parametrize("name", sorted(_corrupt_payloads()))
def test_corrupt_pixel_payload_is_a_value_error(name: str):
    with pytest.raises(ValueError):
        decode_pixels(_corrupt_payloads()[name])


def _huge_payload(tag: bytes = b"Z") -> bytes:
    """A payload whose header (and zstd frame) declares 65535x65535: 12.9 GB once decompressed."""
    size = 65535 * 65535 * 3
    frame = b"\x28\xb5\x2f\xfd\xe0" + size.to_bytes(8, "little") + b"\x01\x00\x00"  # one empty block
    return tag + struct.pack(">HH", 65535, 65535) + (frame if tag == b"Z" else zlib.compress(b""))


@pytest.mark.parametrize("tag", [b"Z", b"U"])
def test_a_payload_declaring_a_huge_size_is_refused_before_anything_is_allocated(tag: bytes):
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(PayloadSizeError, match="65535x65535"):
            decode_pixels(_huge_payload(tag))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the old decoder allocated the 12.9 GB its header declared


def test_a_payload_of_another_size_than_expected_is_refused_before_decompressing():
    arr = corpus.photo(40, 30, 33)  # 40 wide, 30 high
    np.testing.assert_array_equal(decode_pixels(encode_pixels(arr), (40, 30)), arr)
    with pytest.raises(PayloadSizeError, match="40x30, not 30x40"):
        decode_pixels(encode_pixels(arr), (30, 40))
    with pytest.raises(PayloadSizeError):
        decode_pixels(encode_pixels(arr), max_pixels=40 * 30 - 1)
    assert issubclass(PayloadSizeError, ValueError)


def _zlib_payload(arr: np.ndarray) -> bytes:
    """The payload earlier workers wrote (tag U, zlib), built independently here."""
    delta = np.array(arr)
    delta[1:] -= arr[:-1]
    return b"U" + struct.pack(">HH", *arr.shape[:2]) + zlib.compress(delta.tobytes(), 1)


def test_earlier_zlib_payload_still_decodes():
    arr = corpus.photo(40, 30, 33)
    assert encode_pixels(arr)[:1] == b"Z"
    np.testing.assert_array_equal(decode_pixels(_zlib_payload(arr)), arr)
    for bad in (_zlib_payload(arr) + b"junk", _zlib_payload(arr)[:-10]):
        with pytest.raises(ValueError):
            decode_pixels(bad)
