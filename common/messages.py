"""The wire between the stages: queue and task names, and the shapes of their messages (msgpack,
Celery task protocol 2 envelopes in kombu's Redis lists). Importing it patches nothing.

`download` queue, task `koala.download`: args = [chunk], kwargs = {} or {"alone": True} (a suspect
    run with nothing else in its worker), a chunk being a list of items, each one of
    `FetchItem` {"k": md5 key, "u": URL} or `FileItem` {"k": key, "p": path in the folder, "b": file bytes};
    `items_of` checks one.
`embed` queue, task `koala.embed`: args = [images], kwargs as above, one message per download chunk,
    a list of `EmbedImage` {"key", "name": record name, "source": URL or path, "kind": "url" or
    "path", "pixels": `common.pictures.images.encode_pixels`}; `images_of` checks one. A message of
    one image as a bare dict (args = [image], the format before chunks) is still read.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, TypeGuard, cast

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
