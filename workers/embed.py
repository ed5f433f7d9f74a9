"""The embed stage: a batch of 299x299 images -> Inception logits + Lab -> records in a shard.

Nothing here knows about the broker: `EmbedStage.process` takes the messages' payloads and
says which are done. The order of writes, chosen for crashes:
  1. records appended to the open (hidden, uncompressed) shard and fsynced;
  2. each item claimed in Redis as written into that shard (one-way; a loser drops its copy);
  3. the messages acked by the caller.
A worker killed anywhere leaves a temp shard whose records `recover` keeps (claiming the
unclaimed) or drops (claimed by another shard), then finalizes.
With an object-store output (`shards`: `workers/remote.py`), step 2 only reserves the items for
the open shard, which lives in local scratch, and the messages wait (`settled`) until the shard's
upload is committed; a killed worker's scratch is deleted (`clear_scratch`), its messages return.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.messages import EmbedImage, PayloadSizeError, decode_pixels
from common.output import records
from common.output.shards import (
    ShardWriter,
    finalize_temp,
    recover_temp_shards,
    rewrite_shard,
    safe_node,
    shard_token,
)
from common.settings import Settings
from common.stages import Model, compact_record_of, infer, record_of, start_lab, start_png
from common.state.failures import Failure, now, record_failure
from common.state.job import DOWNLOADED, SUBMITTED, JobState
from common.state.retries import call_retrying, is_storage_error, retry_on_broker, retry_on_disk
from workers.remote import RemoteShards

log = logging.getLogger("koala.embed")

__all__ = ["shard_token"]  # the shard's token in the job state, here as it always was


class NodeLock:
    """An exclusive lock on a node name in the output folder: two live writers never share one."""

    def __init__(self, out_dir: Path, node: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f".{safe_node(node)}.lock"
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RuntimeError(f"another embed worker named {node!r} is writing to {out_dir}") from None

    def release(self) -> None:
        os.close(self.fd)


@dataclass
class Batch:
    """The images of one or more `embed` messages on their way through the stage."""

    payloads: list[EmbedImage]
    messages: list = field(default_factory=list)  # the consumer's, acked once the batch is done
    todo: list[EmbedImage] = field(default_factory=list)  # pending, deduplicated, decodable images
    pixels: np.ndarray | None = None
    labs: list[Future] = field(default_factory=list)  # CPU Lab, when not computed with the model
    logits: np.ndarray | list = field(default_factory=list)  # per image of `todo`, once inferred
    l_channels: list = field(default_factory=list)
    ab_channels: list = field(default_factory=list)
    pngs: list[Future] = field(default_factory=list)  # compact records: each image's PNG
    written: int = 0
    received: float = field(default_factory=time.monotonic)
    held: bool = False  # its records wait in an object-store shard not committed yet


class EmbedStage:
    """Embeds batches and writes them exactly once into rotating shards, in three steps that a
    pipeline may run on different threads: `prepare` (state, decode, CPU Lab), `infer` (the
    model, and Lab when `embed_lab` computes it on the device), `write` (append + fsync, claim)."""

    def __init__(
        self,
        settings: Settings,
        state: JobState,
        node: str,
        model: Model,
        writer: ShardWriter,
        shards: RemoteShards | None = None,
    ):
        self.settings = settings
        self.state = state
        self.node = node
        self.model = model
        self.writer = writer
        self.shards = shards  # an object-store output: reservations, uploads, held batches
        self._last_write = time.monotonic()
        self._shard = Path()  # the shard of the last write
        self.lab_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), "lab")

    def process(self, payloads: list[EmbedImage]) -> int:
        """Write the records of a batch; returns how many were written. Every payload is done
        (written, failed, or already final) when this returns; it raises only on I/O or Redis errors."""
        batch = Batch(payloads)
        self.prepare(batch)
        self.infer(batch)
        self.write([batch])
        return batch.written

    def prepare(self, batch: Batch) -> None:
        """Keep the images still pending (once each), decode them, start their CPU Lab."""
        keys = [p["key"] for p in batch.payloads]
        if self.shards is not None:
            to_write = retry_on_broker(self.shards.pending)(keys)
        else:
            to_write = [s in (SUBMITTED, DOWNLOADED) for s in retry_on_broker(self.state.states)(keys)]
        pending = [p for p, todo in zip(batch.payloads, to_write, strict=True) if todo]
        todo = dedupe(pending)
        pixels = [self._pixels(p) for p in todo]
        batch.todo = [p for p, px in zip(todo, pixels, strict=True) if px is not None]
        if not batch.todo:
            return
        batch.pixels = np.stack([px for px in pixels if px is not None])
        batch.labs = start_lab(self.model, batch.pixels, self.settings.lab_size, self.lab_pool)

    def infer(self, batch: Batch) -> None:
        """The embeddings (and Lab channels, or for compact records the PNGs) of a prepared batch."""
        if batch.pixels is None:
            return
        if not self.model.lab:  # encoded on the pool while the model runs
            batch.pngs = start_png(batch.pixels, self.lab_pool)
        batch.logits, batch.l_channels, batch.ab_channels = infer(
            self.model, batch.pixels, self.settings.lab_size, batch.labs
        )
        batch.labs = []
        batch.pixels = None  # not needed any more: free it before the write

    def write(self, batches: list[Batch]) -> None:
        """Write the records of inferred batches with one append (one fsync) and one claim; sets
        each batch's `written`. Records another shard claimed first are left out."""
        todo = [b for b in batches if b.todo and len(b.logits)]
        serialized = [record for b in todo for record in self._records(b)]
        if not serialized:
            return
        claimed = self._write([p for b in todo for p in b.todo], serialized)
        for b in todo:
            b.written, claimed = sum(claimed[: len(b.todo)]), claimed[len(b.todo) :]
            b.logits, b.l_channels, b.ab_channels, b.pngs = [], [], [], []
            if self.shards is not None and b.written:
                for p in b.payloads:
                    p["pixels"] = b""  # held until the shard commits: keep only what the ack needs
                b.held = True
                self.shards.hold(b, self._shard)

    def _records(self, b: Batch) -> list[bytes]:
        """The serialized records of an inferred batch, in the settings' record format."""
        names = [(str(p["name"]), p["key"], str(p.get("source") or "")) for p in b.todo]
        if not self.model.lab:
            return [
                compact_record_of(*n, png.result(), embedding)
                for n, png, embedding in zip(names, b.pngs, b.logits, strict=True)
            ]
        return [
            record_of(*n, l_channel, ab, embedding)
            for n, l_channel, ab, embedding in zip(names, b.l_channels, b.ab_channels, b.logits, strict=True)
        ]

    def _pixels(self, payload: EmbedImage) -> np.ndarray | None:
        """The image of a payload at the model's size, or None after recording why it is unusable:
        whatever goes wrong with one image is that image's failure, never the batch's. The size its
        header declares is checked before anything is decompressed."""
        side = self.settings.image_size
        try:
            return decode_pixels(payload["pixels"], (side, side))
        except PayloadSizeError as e:
            hint = "a download worker with another KOALA_IMAGE_SIZE?"
            self.fail(payload, "wrong_size", f"{e}: this embed worker takes {side}x{side} ({hint})")
        except (ValueError, KeyError, TypeError) as e:
            self.fail(payload, "internal_error", f"unreadable image payload: {e}")
        except Exception as e:  # MemoryError included: a bug or a forged payload, still one image's
            log.exception("cannot decode the payload of %s", payload.get("key"))
            self.fail(payload, "internal_error", f"image payload: {type(e).__name__}: {e}"[:300])
        return None

    def _write(self, payloads: list[EmbedImage], serialized: list[bytes]) -> list[bool]:
        """Append + fsync, claim in Redis; returns per record whether this shard (`_shard`) owns it
        (the others are left out of the shard)."""
        path, start, _ = self.writer.append(serialized)
        self._shard, self._last_write = path, time.monotonic()
        try:
            claimed = self._claim([p["key"] for p in payloads], path)
        except BaseException:
            # unclaimed: the messages come back and are written again, so this copy must go
            self.writer.discard(start, [False] * len(serialized))
            raise
        if not all(claimed):
            log.info("leaving out %d records already written elsewhere", claimed.count(False))
            self.writer.discard(start, claimed)
        return claimed

    def rotate(self) -> None:
        """Finalize the open shard when full or old (an object-store one also when no record came
        for `KOALA_SHARD_IDLE_COMMIT` s: its messages wait for it); a shard the disk refuses to
        publish is logged and published by a later call. Raises the uploader's error."""
        if self.shards is not None and self.shards.error is not None:
            raise self.shards.error
        try:
            idle = time.monotonic() - self._last_write >= self.settings.shard_idle_commit
            if self.shards is not None and self.writer.path is not None and idle:
                self.writer.close()
            else:
                self.writer.maybe_rotate()
        except OSError as e:
            if not is_storage_error(e):
                raise
            log.warning("cannot publish a shard yet (%s); trying again later", e)

    def settled(self, batches: list[Batch]) -> list[Batch]:
        """The batches whose messages may be acked now: of `batches` those with nothing in an
        uncommitted object-store shard, and those held before whose shard has been committed."""
        if self.shards is None:
            return batches
        return [b for b in batches if not b.held] + self.shards.released()

    def flush(self, timeout: float | None = None) -> None:
        """Close the open shard and wait until it is published (an object store: committed)."""
        self.writer.close()
        if self.shards is not None and not self.shards.wait(timeout):
            log.warning("stopping before every shard was committed: their messages go back to the queue")

    def _claim(self, keys: list[str], path: Path) -> list[bool]:
        """Claim the items for the shard at `path`, waiting for a lost Redis; per item, whether this
        shard owns it (read back after a retry: a claim whose answer was lost may have been made).
        An object-store shard only reserves them until it is committed."""
        if self.shards is not None:
            return self.shards.reserve(keys, path)
        token = shard_token(path)
        claimed, retried = call_retrying(lambda: self.state.mark_written_many(keys, token))
        if retried:
            claimed = [owner == token for owner in retry_on_broker(self.state.written_to)(keys)]
        return claimed

    def fail(self, payload: EmbedImage, reason: str, detail: str) -> None:
        """Record an item that cannot become a record."""
        source = str(payload.get("source") or "")
        url, path = (source, "") if payload.get("kind") == "url" else ("", source)
        failure = Failure(payload["key"], reason, detail, url=url, path=path, node=self.node, time=now())
        pending = SUBMITTED + DOWNLOADED  # the embed stage may fail a downloaded item too
        record_failure(
            failure, lambda f: self.state.mark_failed(f, from_states=pending), self.settings.output_dir
        )

    def close(self) -> None:
        """Finalize the open shard."""
        self.writer.close()
        if self.shards is not None:
            self.shards.wait(60)
            self.shards.stop()
        self.lab_pool.shutdown()


def dedupe(payloads: list[EmbedImage]) -> list[EmbedImage]:
    """One payload per key (a re-sent image can sit twice in one batch)."""
    seen: dict[str, EmbedImage] = {}
    for p in payloads:
        seen.setdefault(p["key"], p)
    return list(seen.values())


def recover(out_dir: Path, node: str, state: JobState, compression: str) -> dict[str, int]:
    """Finish what a killed worker of this node left: claim the records nobody claimed, keep the
    first copy of each record its shard owns, drop the rest, cut an incomplete tail, finalize."""
    kept = dropped = shards = 0
    for temp in recover_temp_shards(out_dir, safe_node(node)):
        token = shard_token(temp)
        keys = [records.example_key(data).decode() for _, _, data in records.iter_examples(temp)]
        unclaimed = [k for k, owner in zip(keys, state.written_to(keys), strict=True) if owner is None]
        state.mark_written_many(unclaimed, token)
        owned = {k for k, owner in zip(keys, state.written_to(keys), strict=True) if owner == token}
        n = rewrite_shard(temp, first_copy_of(owned))
        kept, dropped = kept + n, dropped + len(keys) - n
        shards += finalize_temp(temp, compression) is not None
    return {"kept": kept, "dropped": dropped, "shards": shards}


def clear_scratch(scratch: Path, node: str) -> int:
    """An object-store output: delete the temp shards a killed worker of this node left in its
    scratch folder; their items were only reserved, and their messages come back to be written
    again (`workers/remote.py`). Returns how many there were."""
    temps = recover_temp_shards(scratch, safe_node(node))
    for temp in temps:
        temp.unlink()
    return len(temps)


def first_copy_of(keys: set[str]) -> Callable[[bytes], bool]:
    """A record filter keeping the first record of each of `keys`."""
    wanted = set(keys)

    def keep(data: bytes) -> bool:
        key = records.example_key(data).decode()
        if key in wanted:
            wanted.discard(key)
            return True
        return False

    return keep


def check_permissions(out: Path) -> None:
    """Refuse to start where this user may not write (a wrong owner does not pass with time); wait
    out, with a logged warning, a disk that refuses writes for now (read-only, full, I/O errors),
    as the worker does later on (`retry_on_disk`)."""
    retry_on_disk(_check_writable)(out)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except PermissionError as e:  # not retried: a RuntimeError is not a storage error
        raise RuntimeError(
            f"cannot write in {out} as uid {os.getuid()} gid {os.getgid()} ({e.strerror}): "
            "give the folder to this user (with docker compose: chown -R "
            "APP_UID:APP_GID ./data, the values of .env)"
        ) from e
