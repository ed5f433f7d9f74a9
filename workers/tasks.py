"""Celery tasks: thin wrappers that give the stage functions their per-process context.

A message whose work kills its worker comes back (acks are late); each start is counted in the job
state. Past `max_deliveries` starts a chunk goes on as one message per item, each run alone in its
worker (nothing else in flight there), so that a worker dying again names the item that killed it:
that item fails as `worker_died`, its siblings are written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import redis
from celery import bootsteps
from celery.signals import worker_ready

from common.celery_app import make_app
from common.messages import (
    DOWNLOAD_QUEUE,
    DOWNLOAD_TASK,
    EMBED_QUEUE,
    EMBED_TASK,
    ChunkItem,
    EmbedImage,
    chunk_repr,
    items_of,
    source_of,
)
from common.settings import get_settings
from common.state.job import SUBMITTED, JobState, connect
from common.state.leases import LeaseKeeper, keep_leases
from common.state.retries import retry_on_broker
from workers.download import DownloadStage
from workers.inbox import Inbox, pop_into

log = logging.getLogger("koala.worker")
app = make_app()
# A task-sent event per image costs a publish and nobody needs it: the embed worker reports
# its own task events, and the repr of an image message is never worth computing.
app.conf.task_send_sent_event = False


class RenewLeases(bootsteps.StartStopStep):
    """Keep the download messages this worker holds from being re-delivered while it lives, and take
    them from the queue atomically (`workers.inbox.pop_into`)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.keeper: LeaseKeeper | None = None
        self.inbox: Inbox | None = None

    def start(self, parent) -> None:
        channel = parent.task_consumer.channel
        self.keeper = keep_leases(parent.app, channel)
        settings = get_settings()
        client = connect(settings.broker_url)
        self.inbox = Inbox(client, settings.state_prefix, settings.visibility_timeout, DOWNLOAD_QUEUE)
        retry_on_broker(self.inbox.open)()
        pop_into(channel, self.inbox)  # popped and in flight in one step

    def stop(self, parent) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.inbox is not None:
            try:
                self.inbox.close()
            except redis.RedisError as e:  # the sweep of a live worker gives them back later
                log.warning("cannot give held messages back: %s", e)


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
    """Build the stage (TLS roots, pools, decoder processes) when the worker starts, not inside the
    first job."""
    download_stage(sender.hostname).decoders.ready()


@retry_on_broker
def publish_embed(images: list[EmbedImage]) -> None:
    """Send a chunk's images to the embed queue as one message."""
    app.send_task(
        EMBED_TASK, args=[images], queue=EMBED_QUEUE, argsrepr=f"[{len(images)} images]", kwargsrepr="{}"
    )


class Alone:
    """Chunks share a worker process; a suspect item runs alone in it (the others wait)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0  # suspects waiting: new chunks wait behind them

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._alone and not self._shared)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


running = Alone()


@app.task(name=DOWNLOAD_TASK, bind=True)
def download(self, items: list[ChunkItem], alone: bool = False) -> int:
    """Download a chunk of items and pass the images on; returns how many it handled. `alone`: a
    suspect (its chunk outlived `max_deliveries` workers) run with nothing else in flight here."""
    try:
        items = items_of(items)
    except ValueError as e:  # nothing in it can be accounted for: dropped, as kombu drops non-messages
        log.error("dropping a malformed download message: %s", e)
        return 0
    stage = download_stage(self.request.hostname or "download")
    message = str(self.request.id)
    with running.alone() if alone else running.shared():
        starts = retry_on_broker(stage.state.count_delivery)(message)
        if starts > (1 if alone else stage.settings.max_deliveries):
            give_up_on(stage, items, alone, starts - 1)
        else:
            try:
                retry_on_broker(stage.run)(items, publish_embed)
            except Exception as e:  # a bug or a starved process: the items still end, as failures
                log.exception("a chunk of %d items failed", len(items))
                fail_pending(stage, items, "internal_error", f"{type(e).__name__}: {e}"[:300])
    retry_on_broker(stage.state.forget_delivery)(message)
    return len(items)


def give_up_on(stage: DownloadStage, items: list[ChunkItem], alone: bool, deaths: int) -> None:
    """A message whose workers died `deaths` times: alone, its item fails; a chunk goes on as one
    message per item, each to be run alone."""
    if alone:
        detail = f"the worker processing it alone died {deaths} time(s) (out of memory? a crash?)"
        log.error("%s: %s", ["".join(source_of(i)) for i in items], detail)
        fail_pending(stage, items, "worker_died", detail)
        return
    log.warning("a chunk outlived %d workers: its %d items go on one by one, each alone", deaths, len(items))
    for item in items:
        retry_on_broker(app.send_task)(
            DOWNLOAD_TASK,
            args=[[item]],
            kwargs={"alone": True},
            queue=DOWNLOAD_QUEUE,
            argsrepr=chunk_repr([item]),
        )


def fail_pending(stage: DownloadStage, items: list[ChunkItem], reason: str, detail: str) -> None:
    """Fail the items that are still only submitted (the others were handed on or ended)."""
    states = retry_on_broker(stage.state.states)([i["k"] for i in items])
    for item, state in zip(items, states, strict=True):
        if state == SUBMITTED:
            retry_on_broker(stage.fail)(item, reason, detail)
