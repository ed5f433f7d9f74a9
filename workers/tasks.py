"""Celery tasks: thin wrappers that give the stage functions their per-process context."""

from __future__ import annotations

import logging
from functools import cache

from celery import bootsteps
from celery.signals import worker_ready

from common.celery_app import DOWNLOAD_TASK, EMBED_QUEUE, EMBED_TASK, make_app
from common.leases import LeaseKeeper, keep_leases
from common.messages import ChunkItem, EmbedImage
from common.retries import retry_on_broker
from common.settings import get_settings
from common.state import JobState
from workers.download import DownloadStage

log = logging.getLogger("koala.worker")
app = make_app()
# A task-sent event per image costs a publish and nobody needs it: the embed worker reports
# its own task events, and the repr of an image message is never worth computing.
app.conf.task_send_sent_event = False


class RenewLeases(bootsteps.StartStopStep):
    """Keep the download messages this worker holds from being re-delivered while it lives."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.keeper: LeaseKeeper | None = None

    def start(self, parent) -> None:
        self.keeper = keep_leases(parent.app, parent.task_consumer.channel)

    def stop(self, parent) -> None:
        if self.keeper is not None:
            self.keeper.stop()


app.steps["consumer"].add(RenewLeases)


@cache
def download_stage(node: str) -> DownloadStage:
    """The download stage of this process (one HTTP session, one Redis client)."""
    settings = get_settings()
    state = JobState.from_settings(settings)
    stage = DownloadStage(settings, state, node)
    log.info("%s: download stage ready, %d downloads in flight", node, settings.download_concurrency)
    return stage


@worker_ready.connect
def _start_download_stage(sender, **_kwargs) -> None:
    """Build the stage (TLS roots, pools) when the worker starts, not inside the first job."""
    download_stage(sender.hostname)


@retry_on_broker
def publish_embed(images: list[EmbedImage]) -> None:
    """Send a chunk's images to the embed queue as one message."""
    app.send_task(
        EMBED_TASK, args=[images], queue=EMBED_QUEUE, argsrepr=f"[{len(images)} images]", kwargsrepr="{}"
    )


@app.task(name=DOWNLOAD_TASK, bind=True)
def download(self, items: list[ChunkItem]) -> int:
    """Download a chunk of items and pass the images on; returns how many it handled."""
    stage = download_stage(self.request.hostname or "download")
    retry_on_broker(stage.run)(items, publish_embed)
    return len(items)
