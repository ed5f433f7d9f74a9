"""The wire's checks (common/messages.py): what a download or embed message may hold."""

from __future__ import annotations

import hashlib

import pytest

from common.messages import embed_image, images_of, items_of, source_of

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
