"""The embed queue's consumer: collects messages into batches (size or maximum wait), hands them
to the embed stage's pipeline, acks each message once its batch is written. A plain kombu
consumer, not a Celery task, so that acks follow the durable write exactly and nothing is
buffered unacked for long.
It still shows in Flower: it sends Celery's worker and task events (a batch is one
`koala.embed` task) and answers the control commands Flower asks workers (`inspect`)."""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
import uuid

import redis
from celery import Celery
from kombu import Message, Queue
from kombu.exceptions import OperationalError

from common.celery_app import EMBED_QUEUE, EMBED_TASK
from common.leases import keep_leases
from common.messages import EmbedImage, images_of
from common.retries import is_storage_error
from workers.embed import Batch, EmbedStage
from workers.pipeline import Pipeline, one_line

log = logging.getLogger("koala.embed")


class BatchConsumer:
    """Consume the embed queue into batches for the pipeline until stopped (SIGTERM/SIGINT finish
    the batches in flight); ack each message once its batch is written."""

    def __init__(
        self,
        app: Celery,
        stage: EmbedStage,
        *,
        batch_size: int,
        max_wait: float,
        hostname: str = "embed",
        max_in_flight: int = 4,
    ):
        self.app = app
        self.hostname = hostname
        self.events: FlowerEvents | None = None
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.stopping = threading.Event()
        self.pipeline = Pipeline(stage, self.stopping, max_in_flight=max_in_flight)
        self.buffer: list[tuple[list[EmbedImage], Message]] = []  # received, not yet submitted
        self.buffered = 0  # images in the buffer
        self.written = 0
        self._first = 0.0  # when the buffer's first message came

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: finish the batches in flight, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff when the broker goes away."""
        delay = 0.5
        broker_errors = (
            *self.app.connection().connection_errors,
            OperationalError,
            redis.ConnectionError,
            redis.TimeoutError,
        )
        try:
            while not self.stopping.is_set():
                try:
                    self._consume()
                    delay = 0.5
                except broker_errors as e:
                    if is_storage_error(e):
                        raise  # not the broker's: the pipeline deals with the disk
                    # unacked: the broker gives them back after the visibility timeout (already
                    # written ones are then skipped), so batches in flight are not waited for
                    self.buffer, self.buffered = [], 0
                    log.warning("broker unreachable (%s); reconnecting in %.1fs", one_line(e), delay)
                    self.stopping.wait(delay)
                    delay = min(delay * 2, 30)
        finally:
            self.stopping.set()
            self.pipeline.close(timeout=60)
        if self.pipeline.error is not None:
            raise self.pipeline.error

    def _consume(self) -> None:
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            queue = Queue(EMBED_QUEUE)
            events = self.events = FlowerEvents(self.app, conn, self.hostname)
            control = control_node(self.app, conn, self.hostname, events)
            # Flow control is ours (we drain only while there is room); the prefetch limit only
            # has to exceed what we hold: one-image messages of every batch in flight.
            prefetch = self.batch_size * (self.pipeline.max_in_flight + 2)
            with conn.Consumer(
                queue,
                callbacks=[self._on_message],
                accept=["msgpack"],
                prefetch_count=prefetch,
                on_decode_error=self._on_decode_error,
            ) as consumer:
                log.info("consuming %s in batches of %d images", EMBED_QUEUE, self.batch_size)
                leases = keep_leases(self.app, consumer.channel)
                try:
                    self._loop(conn, events)
                finally:
                    leases.stop()
                    control.cancel()
                    events.close()

    def _loop(self, conn, events: FlowerEvents) -> None:
        """Drain messages into the buffer, submit it when full or due, ack what the pipeline wrote;
        return once stopping and nothing is held."""
        while True:
            stopping = self.stopping.is_set()
            self._ack(self.pipeline.finished())
            if self.pipeline.error is not None:
                return
            if not stopping and self.buffered < self.batch_size and self.pipeline.has_room():
                try:
                    conn.drain_events(timeout=0.05 if self.pipeline.in_flight else 0.2)
                except TimeoutError:
                    pass
            elif not self.pipeline.has_room():
                self._ack(self.pipeline.finished(timeout=0.05))
            if (
                not stopping
                and self.buffer
                and self.pipeline.has_room()
                and (self.buffered >= self.batch_size or time.monotonic() - self._first >= self.max_wait)
            ):
                self._submit()
            events.heartbeat(active=self.buffered + self.pipeline.in_flight)
            if stopping:
                self._let_go()
                if not self.pipeline.in_flight:
                    return

    def _on_message(self, body: object, message: Message) -> None:
        try:
            images = images_of(body)
        except ValueError as e:
            log.error("dropping a malformed embed message (%s): %.200r", e, body)
            message.ack()
            return
        if not self.buffer:
            self._first = time.monotonic()
        self.buffer.append((images, message))
        self.buffered += len(images)

    def _on_decode_error(self, message: Message, error: Exception) -> None:
        """Refused content (pickle, anything not msgpack) is dropped unexecuted."""
        log.error("refusing a message with content type %s: %s", message.content_type, error)
        message.ack()

    def _submit(self) -> None:
        batch = Batch(
            [image for images, _ in self.buffer for image in images], [message for _, message in self.buffer]
        )
        self.buffer, self.buffered = [], 0
        self.pipeline.submit(batch)

    def _ack(self, batches: list[Batch]) -> None:
        """Ack the messages of written batches (a failed ack only means a harmless re-delivery)."""
        for batch in batches:
            for message in batch.messages:
                try:
                    message.ack()
                except Exception as e:  # the connection they came on is gone: they come back
                    log.debug("cannot ack a message: %s", one_line(e))
            self.written += batch.written
            if self.events:
                self.events.batch(len(batch.payloads), batch.written, time.monotonic() - batch.received)

    def _let_go(self) -> None:
        """Stopping: what was received but not started stays unacked; kombu puts it back on the queue
        when the connection closes."""
        held = len(self.buffer) + sum(len(b.messages) for b in self.pipeline.let_go())
        self.buffer, self.buffered = [], 0
        if held:
            log.info("stopping: %d messages left unacknowledged for other workers", held)


class FlowerEvents:
    """Celery worker/task events for the embed consumer; sending never breaks the consumer."""

    def __init__(self, app: Celery, conn, hostname: str, freq: float = 5.0):
        self.freq = freq
        self.processed = 0
        self.last_beat = 0.0
        self.dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
        self.send("worker-online", freq=freq, sw_ident="koala-embed", sw_ver="0.1", sw_sys=platform.system())

    def send(self, kind: str, **fields) -> None:
        try:
            self.dispatcher.send(kind, **fields)
        except Exception as e:  # events are for the dashboard only
            log.debug("cannot send %s event: %s", kind, e)

    def heartbeat(self, active: int = 0) -> None:
        """A worker-heartbeat every `freq` seconds (Flower marks silent workers offline)."""
        if time.monotonic() - self.last_beat >= self.freq:
            self.last_beat = time.monotonic()
            self.send(
                "worker-heartbeat",
                freq=self.freq,
                active=active,
                processed=self.processed,
                loadavg=list(os.getloadavg()),
            )

    def batch(self, images: int, written: int, runtime: float) -> None:
        """One batch, as the life of one `koala.embed` task."""
        task_id = str(uuid.uuid4())
        self.processed += 1
        self.send(
            "task-received",
            uuid=task_id,
            name=EMBED_TASK,
            args=f"[{images} images]",
            kwargs="{}",
            retries=0,
            eta=None,
            root_id=task_id,
            parent_id=None,
        )
        self.send("task-started", uuid=task_id, pid=os.getpid())
        self.send(
            "task-succeeded", uuid=task_id, result=f"{written} records written", runtime=round(runtime, 3)
        )
        self.heartbeat()

    def close(self) -> None:
        self.send("worker-offline")
        self.dispatcher.close()


def control_node(app: Celery, conn, hostname: str, events: FlowerEvents):
    """Answer the `inspect` commands Flower sends, so the embed worker and its queue are listed."""
    queue = Queue(EMBED_QUEUE).as_dict(recurse=True)
    handlers = {
        "ping": lambda state, **_: {"ok": "pong"},
        "active_queues": lambda state, **_: [queue],
        "registered": lambda state, **_: [EMBED_TASK],
        "stats": lambda state, **_: {
            "pid": os.getpid(),
            "pool": {"max-concurrency": 1},
            "total": {EMBED_TASK: events.processed},
        },
        "active": lambda state, **_: [],
        "reserved": lambda state, **_: [],
        "scheduled": lambda state, **_: [],
        "revoked": lambda state, **_: [],
        "conf": lambda state, **_: {},
        # Flower asks every worker to turn task events on, every few seconds; ours always send them
        "enable_events": lambda state, **_: {"ok": "task events enabled"},
        "disable_events": lambda state, **_: {"ok": "task events stay enabled (Flower's view of batches)"},
    }
    node = app.control.mailbox(conn).Node(hostname, handlers=handlers, channel=conn.channel())
    return node.listen()
