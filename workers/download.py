"""The download stage: fetch (or take the submitted bytes), decode, resize, hand on or fail.

Nothing here knows about Celery: `DownloadStage.run` gets the chunk's items and a `publish`
function for a list of images (one `embed` message). Each item goes through the stage functions
of `common/stages.py`, which the standalone `koala download` and `koala resize` steps call too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import cast

from common.fetching.fetch import make_session, policy_from_settings
from common.messages import EMBED_QUEUE, ChunkItem, EmbedImage, FileItem, embed_image, is_fetch, source_of
from common.settings import Settings
from common.stages import failure_of, kept
from common.state.failures import Failure, record_failure
from common.state.job import FAILED, WRITTEN, JobState, room_for
from workers.decoders import Decoders

log = logging.getLogger("koala.download")

Publish = Callable[[list[EmbedImage]], None]
GROUP_WAIT = 2.0  # seconds the images of a chunk wait for its slowest download before going on without it


class DownloadStage:
    """Per-process download state: settings, job state, the HTTP client whose loop downloads
    (`download_concurrency` images in flight, shared by the chunks in progress) and the decoders."""

    def __init__(self, settings: Settings, state: JobState, node: str):
        self.settings = settings
        self.state = state
        self.node = node
        self.policy = policy_from_settings(settings)
        self.client = make_session(self.policy, concurrency=settings.download_concurrency)
        self._room = 0  # images we may still publish before looking at the queue again
        self._room_lock = threading.Lock()
        # decoding, resizing and encoding: in processes of their own, one per core (workers/decoders.py)
        size = (settings.image_size, settings.image_size)
        limits = (settings.resize_mode, settings.max_pixels, settings.max_jpeg_scans)
        self.decoders = Decoders(size, *limits, processes=settings.decoders)
        # the bytes go to a decoder from these threads: a full pipe must not stop the download loop
        self.handoff = ThreadPoolExecutor(self.decoders.processes + 1, "handoff")
        self.gate = _Gate(settings.download_concurrency)

    def close(self) -> None:
        """Stop the HTTP client's loop, the hand-off threads and the decoder processes."""
        self.client.close()
        self.handoff.shutdown()
        self.decoders.close()

    def run(self, items: list[ChunkItem], publish: Publish) -> None:
        """Process one chunk: its pending items downloaded at once, every one published or failed,
        exactly once; the images go out as one message (stragglers later, in their own)."""
        states = self.state.states([i["k"] for i in items])
        pending = [i for i, current in zip(items, states, strict=True) if current not in (WRITTEN, FAILED)]
        chunk = _Chunk(len(pending))
        for item in pending:
            self.gate.enter(partial(self.start, item, chunk))
        ready: list[EmbedImage] = []
        first_ready = 0.0
        left = len(pending)
        while left:
            timeout = None if not ready else max(0.0, first_ready + GROUP_WAIT - time.monotonic())
            chunk.changed.wait(timeout)
            outcomes, left = chunk.take()
            for item, outcome in outcomes:
                if isinstance(outcome, bytes):
                    first_ready = first_ready if ready else time.monotonic()
                    ready.append(embed_image(item, outcome))
                else:
                    self.failed(item, outcome)
            if ready and (not left or time.monotonic() - first_ready >= GROUP_WAIT):
                self.hand_on(ready, publish)
                ready = []
            chunk.wake_at_next(not ready)  # no group open: wake at the next outcome (else at its timeout)

    def hand_on(self, ready: list[EmbedImage], publish: Publish) -> None:
        """Publish images as one message once the embed queue has room, then count them downloaded."""
        self.wait_for_room(len(ready))
        publish(ready)
        self.state.mark_downloaded_many([image["key"] for image in ready])

    def start(self, item: ChunkItem, chunk: _Chunk) -> None:
        """Start an item that passed the gate: its download, or its submitted bytes to a decoder."""
        if is_fetch(item):
            self.client.submit(item["u"], partial(self.fetched, item, chunk), self.rest)
        else:
            self.handoff.submit(self.decode, item, cast(FileItem, item)["b"], chunk)

    def fetched(self, item: ChunkItem, chunk: _Chunk, outcome: bytes | Exception) -> None:
        """On the download loop: an item's bytes go on to a decoder; its error ends it in `chunk`."""
        if isinstance(outcome, Exception):
            chunk.end(item, outcome)
            self.gate.leave()
        else:
            self.handoff.submit(self.decode, item, outcome, chunk)

    async def rest(self, seconds: float) -> None:
        """On the loop, a download between attempts (a 503, a failed lookup): its slot goes to the
        next item meanwhile, and it takes the first one free after, ahead of the items waiting."""
        self.gate.leave()
        await asyncio.sleep(seconds)
        loop = asyncio.get_running_loop()
        back: asyncio.Future[None] = loop.create_future()
        self.gate.enter(partial(loop.call_soon_threadsafe, _wake, back), first=True)
        await back

    def decode(self, item: ChunkItem, data: bytes, chunk: _Chunk) -> None:
        """In a handoff thread: keep a download's original when asked, then have a decoder decode the
        bytes (its payload or its error ends the item in `chunk`, from the decoder's answer); the
        item leaves the gate once its bytes are in the decoder's pipe."""
        try:
            try:
                data = kept(item, data, self.settings.keep_originals) if is_fetch(item) else data
            except Exception as e:
                chunk.end(item, e)
                return
            self.decoders.decode(data, lambda outcome: chunk.end(item, outcome))
        finally:
            self.gate.leave()

    def failed(self, item: ChunkItem, error: Exception) -> None:
        """Record the failure of an item, named by its exception."""
        reason, detail = failure_of(error)
        if reason == "internal_error":  # a bug: logged whole, and the item still accounted for
            log.error("unexpected error on %s", "".join(source_of(item)), exc_info=error)
        self.fail(item, reason, detail)

    def fail(self, item: ChunkItem, reason: str, detail: str) -> None:
        """Record a failed item once: in Redis (counted) and in this worker's JSON Lines log."""
        failure = Failure.of_item(item, reason, detail, self.node)
        record_failure(failure, self.state.mark_failed, self.settings.output_dir)

    def wait_for_room(self, n: int) -> None:
        """Hold back while the embed queue is at its high-water mark (counted in images)."""
        with self._room_lock:  # one thread looks at the queue; the others wait for its answer
            while self._room <= 0:
                self._room = room_for(self.settings.embed_queue_limit, self.queued_images())
                if self._room <= 0:
                    time.sleep(0.5)
            self._room -= n

    def queued_images(self) -> int:
        """Images waiting in the embed queue, estimated as messages × chunk size."""
        return self.state.queue_length(EMBED_QUEUE) * self.settings.chunk_size


class _Gate:
    """At most `slots` items between the start of their download and their bytes reaching a
    decoder's pipe, not counting downloads that wait out a retry's pause (`DownloadStage.rest`); the
    others wait their turn, in order. A worker so holds at most that many image files while its
    decoders are behind (else every item of its chunks in progress could be: 512 at the defaults, of
    up to KOALA_MAX_BYTES each)."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiting: collections.deque[Callable[[], object]] = collections.deque()
        self._lock = threading.Lock()

    def enter(self, start: Callable[[], object], first: bool = False) -> None:
        """Call `start` now if a slot is free, else when one is (`first`: before the others waiting)."""
        with self._lock:
            if not self._free:
                (self._waiting.appendleft if first else self._waiting.append)(start)
                return
            self._free -= 1
        start()

    def leave(self) -> None:
        """Give a slot back: to the next one waiting, if any."""
        with self._lock:
            start = self._waiting.popleft() if self._waiting else None
            if start is None:
                self._free += 1
        if start is not None:
            start()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # not cancelled (the client closing)
        future.set_result(None)


class _Chunk:
    """One chunk's items in progress: their outcomes (a payload or an exception) as the download
    loop and decoder answers end them, and the chunk's thread woken at the last one, and at the next one
    while it is `eager` (no group of images waiting for GROUP_WAIT): not at every one."""

    def __init__(self, items: int):
        self.left = items
        self.eager = True
        self.changed = threading.Event()
        self._outcomes: list[tuple[ChunkItem, bytes | Exception]] = []
        self._lock = threading.Lock()

    def end(self, item: ChunkItem, outcome: bytes | Exception) -> None:
        with self._lock:
            self._outcomes.append((item, outcome))
            self.left -= 1
            if self.eager or not self.left:
                self.changed.set()

    def take(self) -> tuple[list[tuple[ChunkItem, bytes | Exception]], int]:
        """The outcomes so far, and how many items are still running."""
        with self._lock:
            taken, self._outcomes = self._outcomes, []
            self.changed.clear()
            self.eager = False
            return taken, self.left

    def wake_at_next(self, eager: bool) -> None:
        with self._lock:
            self.eager = eager
            if (eager and self._outcomes) or not self.left:
                self.changed.set()
