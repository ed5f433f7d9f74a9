"""The shapes of the messages between the stages (msgpack, Celery task protocol 2 envelopes).

`download` queue, task `koala.download`: args = [chunk], a list of items
    {"k": md5 key, "u": URL} or {"k": key, "p": path in the folder, "b": file bytes}.
`embed` queue, task `koala.embed`: args = [images], one message per download chunk, a list of
    {"key": md5 key, "name": record name, "source": URL or path, "pixels": images.encode_pixels}.
    A message of one image as a bare dict (args = [image], the format before chunks) is still read.
"""

from __future__ import annotations

from typing import Any, Required, TypedDict, cast


class ChunkItem(TypedDict, total=False):
    """One item of a download chunk: `k` its md5 key, and `u` its URL, or `p` its path in the folder
    with `b` the file's bytes (`_path`, the local file, only in the producer until it reads it)."""

    k: Required[str]
    u: str
    p: str
    b: bytes
    _path: str


class EmbedImage(TypedDict):
    """One 299×299 image on its way to the embed stage."""

    key: str
    name: str
    source: str
    pixels: bytes


def embed_image(item: ChunkItem, pixels: bytes) -> EmbedImage:
    """What the embed stage receives for one downloaded item of a chunk."""
    source = item.get("u") or item.get("p") or ""
    return {"key": item["k"], "name": item.get("p") or item["k"], "source": source, "pixels": pixels}


def images_of(body: object) -> list[EmbedImage]:
    """The images of an `embed` message body (task protocol 2: [args, kwargs, embed]); ValueError
    when it is not one of ours. Both the chunk format and the older one-image format are read."""
    try:
        args, _kwargs, _embed = cast(Any, body)  # any shape: a wrong one raises, caught below
        payload = args[0]
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"not an embed task body: {e}") from None
    found = payload if isinstance(payload, list) else [payload]
    if not all(isinstance(p, dict) and isinstance(p.get("key"), str) and "pixels" in p for p in found):
        raise ValueError("an embed image without a key or pixels")
    return found
