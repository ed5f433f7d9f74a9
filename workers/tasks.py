"""Celery tasks: thin wrappers that give the stage functions their per-process context."""

from __future__ import annotations

import logging
from functools import cache

import tenacity
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.celery_app import DOWNLOAD_TASK, EMBED_QUEUE, EMBED_TASK, make_app
from common.settings import get_settings
from common.state import JobState, connect
from workers.download import DownloadStage

log = logging.getLogger("koala.worker")
app = make_app()

# A worker that loses Redis waits for it (with backoff, logged) instead of losing the chunk.
_broker_retry = tenacity.retry(
    retry=tenacity.retry_if_exception_type((RedisConnectionError, RedisTimeoutError, OperationalError)),
    wait=tenacity.wait_exponential(multiplier=0.5, max=30),
    before_sleep=lambda s: log.warning("Redis unreachable (%s); retrying in %.1fs",
                                       s.outcome.exception(), s.next_action.sleep),
    reraise=True,
)


@cache
def download_stage(node: str) -> DownloadStage:
    """The download stage of this process (one HTTP session, one Redis client)."""
    settings = get_settings()
    state = JobState(connect(settings.broker_url), settings.state_prefix, settings.failures_kept)
    return DownloadStage(settings, state, node)


@_broker_retry
def publish_embed(message: dict) -> None:
    """Send one image to the embed queue."""
    app.send_task(EMBED_TASK, args=[message], queue=EMBED_QUEUE)


@app.task(name=DOWNLOAD_TASK, bind=True)
def download(self, items: list[dict]) -> int:
    """Download a chunk of items and pass the images on; returns how many it handled."""
    stage = download_stage(self.request.hostname or "download")
    _broker_retry(stage.run)(items, publish_embed)
    return len(items)
