"""The download stage: fetch (or take the submitted bytes), decode, resize, hand on or fail.

Nothing here knows about Celery: `DownloadStage.run` gets the chunk's items and a `publish`
function for the images, so the fleet and `koala download` share this code path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from common import images
from common.celery_app import EMBED_QUEUE
from common.fetch import FetchError, fetch, make_session, policy_from_settings
from common.settings import Settings
from common.state import FAILED, WRITTEN, Failure, JobState, append_failure_log, now, room_for

log = logging.getLogger("koala.download")

Publish = Callable[[dict], None]


def embed_message(item: dict, pixels: bytes) -> dict:
    """What the embed stage receives for one image."""
    name = item.get("p") or item["k"]
    return {"key": item["k"], "name": name, "source": item.get("u") or item.get("p"),
            "pixels": pixels}


class DownloadStage:
    """Per-process download state: settings, pooled HTTP session, job state."""

    def __init__(self, settings: Settings, state: JobState, node: str):
        self.settings = settings
        self.state = state
        self.node = node
        self.policy = policy_from_settings(settings)
        self.session = make_session(self.policy, pool_maxsize=settings.per_host_connections)
        self.size = (settings.image_size, settings.image_size)
        self._room = 0  # images we may still publish before looking at the queue again
        self._room_lock = threading.Lock()

    def run(self, items: list[dict], publish: Publish) -> None:
        """Process one chunk: every pending item is published or failed, exactly once."""
        for item, current in zip(items, self.state.states([i["k"] for i in items]), strict=True):
            if current in (WRITTEN, FAILED):
                continue  # already final: a re-delivered or re-submitted message
            self.process(item, publish)

    def process(self, item: dict, publish: Publish) -> None:
        """Download, decode and resize one item; publish the image or record the failure."""
        try:
            pixels = self.load(item)
        except (FetchError, images.ImageError) as e:
            self.fail(item, e.reason, e.detail)
            return
        except OSError as e:
            self.fail(item, "io_error", f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # a bug must still leave the item accounted for
            log.exception("unexpected error on %s", item.get("u") or item.get("p"))
            self.fail(item, "internal_error", f"{type(e).__name__}: {e}")
            return
        self.wait_for_room()
        publish(embed_message(item, pixels))
        self.state.mark_downloaded(item["k"])

    def load(self, item: dict) -> bytes:
        """The lossless 299x299 RGB payload of an item (a URL to fetch, or submitted bytes)."""
        if "b" in item:
            data = item["b"]
        else:
            data = fetch(item["u"], self.session, self.policy)
            if self.settings.keep_originals:
                images.save_original(self.settings.keep_originals, item["k"], data)
        rgb = images.load_rgb(data, size=self.size, mode=self.settings.resize_mode,
                              max_pixels=self.settings.max_pixels)
        return images.encode_pixels(rgb)

    def fail(self, item: dict, reason: str, detail: str) -> None:
        """Record a failed item once: in Redis (counted) and in this worker's JSON Lines log."""
        failure = Failure(key=item["k"], reason=reason, detail=detail, url=item.get("u", ""),
                          path=item.get("p", ""), node=self.node, time=now())
        if self.state.mark_failed(failure):
            try:
                append_failure_log(self.settings.output_dir, self.node, failure)
            except OSError as e:
                log.warning("cannot append to the failure log in %s: %s", self.settings.output_dir, e)

    def wait_for_room(self) -> None:
        """Hold back while the embed queue is at its high-water mark."""
        with self._room_lock:  # one thread looks at the queue; the others wait for its answer
            while self._room <= 0:
                self._room = room_for(self.settings.embed_queue_limit, self.state.r.llen(EMBED_QUEUE))
                if self._room <= 0:
                    time.sleep(0.5)
            self._room -= 1
