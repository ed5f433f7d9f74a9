"""Reading sources and enqueuing them: URL lists (file, .gz, or http(s) URL) and folders of images.

Order of writes, chosen for crashes: a chunk's items are registered and the chunk journaled
in one atomic step, then sent, then unjournaled. A producer killed in between leaves the
journal entry; the next `koala submit` (any source) sends the entry's still-pending items.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import msgpack
from celery import Celery

from common.fetching.sources import (
    READ_ERRORS,
    FileTooLarge,
    ListBroken,
    LocalFile,
    NotRegularFile,
    ParseCounts,
    UrlItem,
    is_url,
    iter_folder,
    iter_items,
    open_list,
    read_regular,
)
from common.fetching.urls import url_problem
from common.messages import DOWNLOAD_QUEUE, DOWNLOAD_TASK, ChunkItem, FetchItem, chunk_repr
from common.settings import Settings
from common.state.failures import Failure, record_failure
from common.state.job import JobState, Registered, room_for
from common.state.retries import BROKER_ERRORS, call_retrying, retry_on_broker

log = logging.getLogger("koala.submit")

Submitted = FetchItem | LocalFile  # an item as the producer journals it (a file's bytes not read yet)


def _journaled(item: dict) -> Submitted:
    """A journal entry's item (producers before `LocalFile` named the local path `_path`)."""
    if "_path" in item:
        item["path"] = item.pop("_path")
    return cast(Submitted, item)


@dataclass
class SubmitReport:
    """What one `koala submit` did."""

    read: int = 0
    new: int = 0
    requeued: int = 0
    recovered: int = 0
    known: int = 0
    failed_at_submit: int = 0
    rejected_lines: int = 0
    held_back_s: float = 0.0

    def as_dict(self) -> dict:
        """JSON form."""
        return dict(self.__dict__)


class Submitter:
    """Registers items in chunks and sends the new ones to the download queue."""

    def __init__(
        self,
        app: Celery,
        state: JobState,
        settings: Settings,
        node: str,
        on_item: Callable[[int], None] = lambda n: None,
        requeue: bool = False,
    ):
        self.app = app
        self.state = state
        self.settings = settings
        self.node = node
        self.on_item = on_item
        self.requeue = requeue
        self.run_tag = retry_on_broker(state.new_run)()
        self.producer = uuid.uuid4().hex[:12]
        self.sequence = 0
        self.report = SubmitReport()
        self._room = 0  # messages we may still send before looking at the queue again

    def recover_orphans(self) -> None:
        """Send the pending items of chunks that a killed producer journaled but never sent. An
        entry that cannot be recovered is logged, its pending items failed (when it can be read),
        and dropped: it never blocks the others, nor later submits."""
        for field, packed in retry_on_broker(self.state.orphaned_chunks)():
            try:
                retry_on_broker(self._recover_chunk)(field, packed)
            except Exception as e:
                detail = f"its journaled chunk could not be recovered: {type(e).__name__}: {e}"[:300]
                log.error("journal entry %s: %s; dropped", field, detail)
                retry_on_broker(self._fail_entry)(packed, detail)
                retry_on_broker(self.state.drop_orphan)(field)

    def _recover_chunk(self, field: str, packed: bytes) -> None:
        items = msgpack.unpackb(packed, raw=False)
        states = self.state.states([i["k"] for i in items])
        pending = [i for i, s in zip(items, states, strict=True) if s in (b"s", b"d")]
        ready = [self._ready_alone(_journaled(i)) for i in pending]
        self._send([r for r in ready if r is not None])
        self.report.recovered += len(pending)
        self.state.drop_orphan(field)

    def _ready_alone(self, item: Submitted) -> ChunkItem | None:
        """`_ready` of a journaled item, whatever it holds: an item whose check raises is failed
        (internal_error) instead of stopping the recovery of the others."""
        try:
            return self._ready(item)
        except BROKER_ERRORS:
            raise
        except Exception as e:
            self._fail(item, "internal_error", f"journaled item: {type(e).__name__}: {e}"[:300])
            return None

    def _fail_entry(self, packed: bytes, detail: str) -> None:
        """Fail the still-pending items of a journal entry that could not be recovered, as far as
        it can be read (an unreadable entry has nothing to fail)."""
        try:
            items = [i for i in msgpack.unpackb(packed, raw=False) if isinstance(i.get("k"), str)]
        except Exception:
            return
        states = self.state.states([i["k"] for i in items])
        for item, s in zip(items, states, strict=True):
            if s in (b"s", b"d"):
                self._fail(item, "internal_error", detail)

    def submit_urls(self, stream: BinaryIO, skip: int = 0, count: int | None = None) -> None:
        """Submit every item of a URL-list stream. When the stream breaks part way, the items read
        before the break are submitted, then ListBroken is raised."""
        counts = ParseCounts()
        chunk: list[Submitted] = []
        read_before = self.report.read
        broken: ListBroken | None = None
        try:
            for item in _until_broken(iter_items(stream, counts, skip=skip, count=count), counts):
                chunk.append({"k": item.key, "u": item.url})
                if len(chunk) >= self.settings.chunk_size:
                    self._send_chunk(chunk)
                    chunk = []
                    self._add_rejected(counts)
        except ListBroken as e:
            broken = e
        self._send_chunk(chunk)
        self._add_rejected(counts)
        if broken is not None:
            broken.items = self.report.read - read_before
            raise broken

    def submit_folder(self, root: Path, skip: int = 0, count: int | None = None) -> None:
        """Submit every file under root; the bytes travel in the message (no shared disk)."""
        chunk: list[Submitted] = []
        size = 0
        limit = max(1, min(self.settings.chunk_size, 64))
        for item in iter_folder(root, skip, count):
            chunk.append(item)
            size += os.path.getsize(item["path"]) if os.path.exists(item["path"]) else 0
            if len(chunk) >= limit or size >= 8_000_000:
                self._send_chunk(chunk)
                chunk, size = [], 0
        self._send_chunk(chunk)

    def _add_rejected(self, counts: ParseCounts) -> None:
        delta = counts.rejected - self.report.rejected_lines
        if delta:
            retry_on_broker(self.state.add)("rejected_lines", delta)
            self.report.rejected_lines = counts.rejected

    def retry(self, failures: list[dict]) -> None:
        """Send failed URL items again (files of folders can't be: their bytes are not kept)."""
        items = [f for f in failures if f.get("url")]
        for i in range(0, len(items), self.settings.chunk_size):
            part = items[i : i + self.settings.chunk_size]
            chunk: list[ChunkItem] = [{"k": f["key"], "u": f["url"]} for f in part]
            self.sequence += 1
            entry = str(self.sequence)
            journal = (self.producer, entry, msgpack.packb(chunk, use_bin_type=True))
            again = self.state.unfail(part, self.run_tag, journal)
            self._send([item for item, ok in zip(chunk, again, strict=True) if ok])
            self.state.unjournal(self.producer, entry)
            self.report.requeued += sum(again)
            self.on_item(len(part))
        self.report.known += len(failures) - len(items)

    def _send_chunk(self, chunk: Sequence[Submitted]) -> None:
        """Register and journal a chunk; send what is new (or requeued); fail bad ones."""
        if not chunk:
            return
        self.report.read += len(chunk)
        self.sequence += 1
        entry = str(self.sequence)
        journal = (self.producer, entry, msgpack.packb(chunk, use_bin_type=True))
        verdicts = self._register([i["k"] for i in chunk], journal)
        outgoing = []
        for item, verdict in zip(chunk, verdicts, strict=True):
            if verdict == Registered.KNOWN:
                self.report.known += 1
                continue
            if verdict == Registered.NEW:
                self.report.new += 1
            else:
                self.report.requeued += 1
            if (ready := self._ready(item)) is not None:
                outgoing.append(ready)
        retry_on_broker(self._send)(outgoing)
        retry_on_broker(self.state.unjournal)(self.producer, entry)
        self.on_item(len(chunk))

    def _register(self, keys: list[str], journal: tuple[str, str, bytes]) -> list[Registered]:
        """`JobState.register`, waiting for a lost Redis. An attempt whose answer was lost may have
        registered the keys: after a retry, keys pending in this run count as new."""
        verdicts, retried = call_retrying(
            lambda: self.state.register(keys, self.run_tag, requeue=self.requeue, journal=journal)
        )
        if retried:
            mine = retry_on_broker(self.state.pending_in_run)(keys, self.run_tag)
            verdicts = [
                Registered.NEW if v == Registered.KNOWN and m else v
                for v, m in zip(verdicts, mine, strict=True)
            ]
        return verdicts

    def _send(self, items: list[ChunkItem]) -> None:
        """One download message, once the queue has room."""
        if items:
            self._wait_for_room()
            self.app.send_task(
                DOWNLOAD_TASK, args=[items], queue=DOWNLOAD_QUEUE, argsrepr=chunk_repr(items), kwargsrepr="{}"
            )

    def _ready(self, item: Submitted) -> ChunkItem | None:
        """The item as it goes to the workers (a file's bytes read), or None once the failure of an
        item that can't go is recorded."""
        ready, problem = self._wire(item)
        if problem:
            self._fail(item, *problem)
        return ready

    def _wire(self, item: Submitted) -> tuple[ChunkItem | None, tuple[str, str] | None]:
        """(the item on the wire, None) or (None, why it can't go: bad URL, unreadable, oversized or
        not a regular file). A file is read only when regular, at most KOALA_MAX_BYTES of it: a FIFO
        or a device (/dev/zero) never blocks nor fills the producer."""
        if "u" in item:
            fetch = cast(FetchItem, item)
            problem = url_problem(fetch["u"])
            return (None, problem) if problem else (fetch, None)
        local = cast(LocalFile, item)
        try:
            data = read_regular(local["path"], self.settings.max_bytes)
        except NotRegularFile as e:
            return None, ("not_a_regular_file", str(e))
        except FileTooLarge as e:
            return None, ("too_large", str(e))
        except OSError as e:
            return None, ("io_error", f"cannot read {local['path']}: {e.strerror or e}")
        return {"k": local["k"], "p": local["p"], "b": data}, None

    def _fail(self, item: Submitted, reason: str, detail: str) -> None:
        failure = Failure.of_item(item, reason, detail, self.node)
        if record_failure(failure, retry_on_broker(self.state.mark_failed), self.settings.output_dir):
            self.report.failed_at_submit += 1

    def _wait_for_room(self) -> None:
        """Hold back while the download queue is at its high-water mark."""
        started = time.monotonic()
        while self._room <= 0:
            self._room = room_for(self.settings.download_queue_limit, self.state.queue_length(DOWNLOAD_QUEUE))
            if self._room <= 0:
                self.state.keep_alive(self.producer)
                time.sleep(0.5)
        self._room -= 1
        self.report.held_back_s += time.monotonic() - started


def submit_source(source: str, submitter: Submitter, skip: int = 0, count: int | None = None) -> SubmitReport:
    """Submit a folder, a URL-list file or a URL of one (after recovering orphaned chunks)."""
    submitter.recover_orphans()
    if not is_url(source) and Path(source).is_dir():
        submitter.submit_folder(Path(source), skip, count)
    else:
        try:
            with open_list(source, submitter.settings) as stream:
                submitter.submit_urls(stream, skip, count)
        except ListBroken as e:
            e.source = source
            raise
    return submitter.report


def _until_broken(items: Iterator[UrlItem], counts: ParseCounts) -> Iterator[UrlItem]:
    """`items`, a read error of the underlying stream becoming ListBroken (lines read before it)."""
    try:
        yield from items
    except READ_ERRORS as e:
        lines = counts.items + counts.blank + counts.comments + counts.rejected
        raise ListBroken(lines, e) from e
