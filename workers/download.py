"""The download stage: fetch (or take the submitted bytes), decode, resize, hand on or fail.

Nothing here knows about Celery: `DownloadStage.run` gets the chunk's items and a `publish`
function for a list of images (one `embed` message). Each item goes through the stage functions
of `common/stages.py`, which the standalone `koala download` and `koala resize` steps call too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from common.fetching.fetch import make_session, policy_from_settings
from common.messages import EMBED_QUEUE, ChunkItem, EmbedImage, embed_image, source_of
from common.settings import Settings
from common.stages import failure_of, item_bytes
from common.state.failures import Failure, record_failure
from common.state.job import FAILED, WRITTEN, JobState, room_for
from workers.decoders import Decoders

log = logging.getLogger("koala.download")

Publish = Callable[[list[EmbedImage]], None]
GROUP_WAIT = 2.0  # seconds the images of a chunk wait for its slowest download before going on without it


class DownloadStage:
    """Per-process download state: settings, pooled HTTP session, job state, and the threads that
    download (`download_concurrency` images in flight, shared by the chunks in progress)."""

    def __init__(self, settings: Settings, state: JobState, node: str):
        self.settings = settings
        self.state = state
        self.node = node
        self.policy = policy_from_settings(settings)
        self.session = make_session(self.policy, pool_maxsize=settings.per_host_connections)
        self.pool = ThreadPoolExecutor(settings.download_concurrency, "fetch")
        self._room = 0  # images we may still publish before looking at the queue again
        self._room_lock = threading.Lock()
        # decoding, resizing and encoding: in processes of their own, one per core (workers/decoders.py)
        size = (settings.image_size, settings.image_size)
        self.decoders = Decoders(size, settings.resize_mode, settings.max_pixels, settings.max_jpeg_scans)

    def run(self, items: list[ChunkItem], publish: Publish) -> None:
        """Process one chunk: its pending items downloaded at once, every one published or failed,
        exactly once; the images go out as one message (stragglers later, in their own)."""
        states = self.state.states([i["k"] for i in items])
        pending = [i for i, current in zip(items, states, strict=True) if current not in (WRITTEN, FAILED)]
        futures = {self.pool.submit(self.process, item): item for item in pending}
        ready: list[EmbedImage] = []
        first_ready = 0.0
        while futures:
            timeout = None if not ready else max(0.0, first_ready + GROUP_WAIT - time.monotonic())
            done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                item = futures.pop(future)
                if (pixels := future.result()) is not None:
                    first_ready = first_ready if ready else time.monotonic()
                    ready.append(embed_image(item, pixels))
            if ready and (not futures or time.monotonic() - first_ready >= GROUP_WAIT):
                self.hand_on(ready, publish)
                ready = []

    def hand_on(self, ready: list[EmbedImage], publish: Publish) -> None:
        """Publish images as one message once the embed queue has room, then count them downloaded."""
        self.wait_for_room(len(ready))
        publish(ready)
        self.state.mark_downloaded_many([image["key"] for image in ready])

    def process(self, item: ChunkItem) -> bytes | None:
        """Download, decode and resize one item: its payload, or None once its failure is recorded."""
        try:
            return self.load(item)
        except Exception as e:
            reason, detail = failure_of(e)
            if reason == "internal_error":  # a bug: logged whole, and the item still accounted for
                log.exception("unexpected error on %s", "".join(source_of(item)))
            self.fail(item, reason, detail)
        return None

    def load(self, item: ChunkItem) -> bytes:
        """The lossless 299x299 RGB payload of an item (a URL to fetch, or submitted bytes)."""
        data = item_bytes(item, self.session, self.policy, self.settings.keep_originals)
        return self.decoders.payload(data)

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
