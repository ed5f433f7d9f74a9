"""The stages of one item as plain functions, the only implementation of each: the fleet's
workers and the standalone steps (`koala download`, `resize`, `lab-batch`) call these.

    item_bytes (fetch, or the submitted bytes) ─► pixels_of (decode, resize)
        ─► start_lab + infer (model, Lab) ─► record_of (one serialized example)
    (`compact` records: no Lab; start_png + infer (model) ─► compact_record_of)

`failure_of` names any exception raised on the way in the fleet's vocabulary of reasons.
Nothing here knows about Celery, Redis or threads of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from common.messages import ChunkItem, FileItem, is_fetch
from common.output import records
from common.pictures import images, lab
from common.settings import Settings
from common.state.failures import ItemError

if TYPE_CHECKING:  # aiohttp (~0.15 s to import) only where something is downloaded
    from common.fetching.fetch import Client, Policy

log = logging.getLogger("koala.stages")

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 [B, 299, 299, 3] -> logits [B, 1001]
# (uint8 [B, 299, 299, 3], Lab size S) -> (logits [B, 1001], l [B, S, S], ab [B, S, S, 2]) in one device call
EmbedLab = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def failure_of(error: Exception) -> tuple[str, str]:
    """(reason, detail) of an exception raised while turning one item into a record."""
    if isinstance(error, ItemError):
        return error.reason, error.detail
    if isinstance(error, OSError):
        return "io_error", f"{type(error).__name__}: {error}"
    return "internal_error", f"{type(error).__name__}: {error}"  # a bug: the item is still accounted for


def item_bytes(item: ChunkItem, client: Client, policy: Policy, keep_originals: Path | None = None) -> bytes:
    """The image file of a chunk item: its submitted bytes, or its URL fetched (and kept in
    `keep_originals` as <key>.<ext> when set)."""
    from common.fetching.fetch import fetch

    if not is_fetch(item):
        return cast(FileItem, item)["b"]
    return kept(item, fetch(item["u"], client, policy), keep_originals)


def kept(item: ChunkItem, data: bytes, keep_originals: Path | None) -> bytes:
    """The fetched bytes of an item, saved in `keep_originals` as <key>.<ext> first when set."""
    if keep_originals:
        images.save_original(keep_originals, item["k"], data)
    return data


def pixels_of(
    data: bytes, settings: Settings, size: tuple[int, int] | None = None, mode: str | None = None
) -> np.ndarray:
    """The uint8 RGB pixels the fleet embeds: decoded, oriented, resized (default: the settings'
    299×299 and resize mode). Raises ImageError for what the fleet refuses."""
    size = size or (settings.image_size, settings.image_size)
    return images.load_rgb(
        data,
        size=size,
        mode=mode or settings.resize_mode,
        max_pixels=settings.max_pixels,
        max_scans=settings.max_jpeg_scans,
    )


@dataclass
class Model:
    """What embeds a batch: logits alone (Lab with numpy beside it), or logits and Lab in one call."""

    embed: Embed
    embed_lab: EmbedLab | None  # None: Lab with numpy in the caller's threads
    device: str
    batch_size: int
    lab: bool = True  # False: the records need no Lab channels (KOALA_RECORD_FORMAT=compact)


class NullModel:
    """Benchmarks and tests of what is not the network (KOALA_NULL_MODEL=1): a forward pass that
    costs nothing and returns zeros; Lab still runs where it would. Its records are useless for training."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        return np.zeros((len(rgb), records.EMBEDDING_SIZE), np.float32)

    def zeros_lab(self, rgb: np.ndarray, lab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Zeros for the logits and the Lab channels (KOALA_NULL_LAB: a device's work, not the CPU's)."""
        n, s = len(rgb), lab_size
        return self.embed(rgb), np.zeros((n, s, s), np.float32), np.zeros((n, s, s, 2), np.float32)

    def embed_lab(self, rgb: np.ndarray, lab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Zeros and the TensorFlow Lab channels, as `Embedder.embed_lab` gives them."""
        import tensorflow as tf

        from common.pictures.lab_tf import lab_tf_padded

        parts = [
            lab_tf_padded(tf.constant(rgb[i : i + self.batch_size]), self.batch_size, lab_size)
            for i in range(0, len(rgb), self.batch_size)
        ]
        return (
            self.embed(rgb),
            np.concatenate([p[0].numpy() for p in parts]),
            np.concatenate([p[1].numpy() for p in parts]),
        )


def load_model(settings: Settings, checkpoint: str | None = None) -> Model:
    """The settings' model (the checkpoint given, else KOALA_CHECKPOINT), Lab on its device or
    not, and its batch size. TensorFlow is imported here, not before."""
    from common.model.embedder import CPU_BATCH_SIZE, Embedder, default_batch_size
    from common.pictures.lab_tf import lab_on_device_default

    lab = settings.record_format == "lab"  # compact records: no Lab at all
    if settings.null_model and settings.null_lab:  # no TensorFlow at all
        log.warning("KOALA_NULL_MODEL=1, KOALA_NULL_LAB=1: zeros for the logits and Lab (benchmark only)")
        null = NullModel(settings.batch_size or CPU_BATCH_SIZE)
        zeros_lab = null.zeros_lab if lab else None
        return Model(null.embed, zeros_lab, "nothing (null model, null Lab)", null.batch_size, lab)
    batch_size = settings.batch_size or default_batch_size()
    wanted = settings.lab_on_device
    on_device = lab and (lab_on_device_default() if wanted is None else wanted)
    if settings.null_model:
        log.warning("KOALA_NULL_MODEL=1: the forward pass is replaced by zeros (benchmarks and tests only)")
        null = NullModel(batch_size)
        device_lab = null.embed_lab if on_device else None
        return Model(null.embed, device_lab, "nothing (null model)", batch_size, lab)
    if settings.null_lab:
        raise RuntimeError("KOALA_NULL_LAB=1 is for benchmarks, with KOALA_NULL_MODEL=1 only")
    checkpoint = checkpoint or settings.checkpoint
    if not checkpoint:
        raise RuntimeError("no checkpoint: pass --checkpoint PATH|URL or set KOALA_CHECKPOINT")
    embedder = Embedder(
        checkpoint,
        settings.cache_dir,
        batch_size=batch_size,
        mixed_precision=settings.mixed_precision,
        xla=settings.xla,
    )
    return Model(embedder.embed, embedder.embed_lab if on_device else None, embedder.device, batch_size, lab)


def start_lab(model: Model, pixels: np.ndarray, lab_size: int, pool: Executor) -> list[Future]:
    """The CPU Lab channels of a batch, started on `pool` (none when the model computes them, or
    when the records need none)."""
    if model.embed_lab is not None or not model.lab:
        return []
    return [pool.submit(lab.lab_channels, px, lab_size) for px in pixels]


def start_png(pixels: np.ndarray, pool: Executor) -> list[Future]:
    """The PNGs of a batch's images for `compact` records (`images.encode_png`), started on `pool`."""
    return [pool.submit(images.encode_png, px) for px in pixels]


def infer(
    model: Model, pixels: np.ndarray, lab_size: int, labs: list[Future]
) -> tuple[np.ndarray, list, list]:
    """(logits, L channels, ab channels) of a batch; `labs` from `start_lab` on the same pixels
    (no channels when the records need none)."""
    if not model.lab:
        return model.embed(pixels), [], []
    if model.embed_lab is not None:
        logits, l_channels, ab_channels = model.embed_lab(pixels, lab_size)
        return logits, list(l_channels), list(ab_channels)
    logits = model.embed(pixels)
    channels = [f.result() for f in labs]
    return logits, [c[0] for c in channels], [c[1] for c in channels]


def record_of(
    name: str, key: str, source: str, l_channel: np.ndarray, ab: np.ndarray, embedding: np.ndarray
) -> bytes:
    """One serialized example with the original project's features (`records.serialize_example`)."""
    return records.serialize_example(
        name=name.encode("utf-8", "surrogateescape"),
        key=key.encode(),
        source=source.encode("utf-8", "surrogateescape"),
        l=l_channel,
        ab=ab,
        embedding=embedding,
    )


def compact_record_of(name: str, key: str, source: str, png: bytes, embedding: np.ndarray) -> bytes:
    """One serialized `compact` example (`records.serialize_compact`): the image's PNG, its embedding."""
    return records.serialize_compact(
        name=name.encode("utf-8", "surrogateescape"),
        key=key.encode(),
        source=source.encode("utf-8", "surrogateescape"),
        png=png,
        embedding=embedding,
    )
