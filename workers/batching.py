"""The embed queue's consumer: collects messages into batches (size or maximum wait), hands them
to the embed stage's pipeline, acks each message once its batch is written. Not a Celery task:
messages come through `workers.inbox` (delivery and "in flight" in one Redis step), so acks follow
the durable write exactly and nothing is lost between a pop and its bookkeeping.
Each message's starts are counted: past `max_deliveries` a message goes on as one message per
image, each run alone (nothing else in the pipeline), and an image whose worker died with it alone
fails as `worker_died`. An error of the pipeline that is not an image's own stops the worker with
its cause logged (its supervisor restarts it); nothing loops looking alive.
It still shows in Flower: it sends Celery's worker and task events (a batch is one `koala.embed`
task) and answers the control commands Flower asks workers (`inspect`)."""

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
from kombu import Queue

from common.messages import EMBED_QUEUE, EMBED_TASK
from common.state.job import connect
from common.state.retries import BROKER_ERRORS, is_storage_error, retry_on_broker
from workers.embed import Batch, EmbedStage
from workers.inbox import Delivery, Inbox
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
        self.stage = stage
        self.hostname = hostname
        self.events: FlowerEvents | None = None
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.max_deliveries = stage.settings.max_deliveries
        self.stopping = threading.Event()
        self.pipeline = Pipeline(stage, self.stopping, max_in_flight=max_in_flight)
        self.inbox = Inbox(
            connect(stage.settings.broker_url), stage.settings.state_prefix, stage.settings.visibility_timeout
        )
        self.buffer: list[Delivery] = []  # received, not yet submitted
        self.buffered = 0  # images in the buffer
        self.written = 0
        self._first = 0.0  # when the buffer's first message came

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: finish the batches in flight, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff when the broker goes away; raise the
        pipeline's error (the worker then exits with it logged)."""
        delay = 0.5
        broker_errors = (*self.app.connection().connection_errors, *BROKER_ERRORS)
        retry_on_broker(self.inbox.open)()
        try:
            while not self.stopping.is_set() and self.pipeline.error is None:
                try:
                    self._consume()
                    delay = 0.5
                except broker_errors as e:
                    if is_storage_error(e):
                        raise  # not the broker's: the pipeline deals with the disk
                    # what we hold stays ours (the lease is renewed once Redis is back)
                    log.warning("broker unreachable (%s); reconnecting in %.1fs", one_line(e), delay)
                    self.stopping.wait(delay)
                    delay = min(delay * 2, 30)
        finally:
            self.stopping.set()
            self.pipeline.close(timeout=60)
            self._flush()
            self._let_go()
            try:
                self.inbox.close()  # what is still held goes back on the queue
            except redis.RedisError as e:
                log.warning("cannot give held messages back (%s): they return when the lease ends", e)
        if self.pipeline.error is not None:
            log.error("stopping: the embed pipeline failed: %s", one_line(self.pipeline.error))
            raise self.pipeline.error

    def _consume(self) -> None:
        with self.app.connection_for_read() as conn, self.app.connection_for_read() as control_conn:
            conn.ensure_connection(max_retries=1)
            events = self.events = FlowerEvents(self.app, conn, self.hostname)
            control = ControlThread(self.app, control_conn, self.hostname, events)
            log.info("consuming %s in batches of %d images", EMBED_QUEUE, self.batch_size)
            try:
                self._loop(events)
            finally:
                control.stop()
                events.close()

    def _loop(self, events: FlowerEvents) -> None:
        """Receive messages into the buffer, submit it when full or due, ack what the pipeline
        wrote; return once stopping and nothing is held, or when the pipeline failed."""
        while not self.stopping.is_set():
            self._ack(self.pipeline.finished())
            if self.pipeline.error is not None:
                return
            if self.buffered < self.batch_size and self.pipeline.has_room():
                delivery = self.inbox.receive(timeout=0.05 if self.pipeline.in_flight else 0.2)
                if delivery is not None:
                    self._take(delivery)
            else:
                self._ack(self.pipeline.finished(timeout=0.05))
            if (
                self.buffer
                and self.pipeline.has_room()
                and (self.buffered >= self.batch_size or time.monotonic() - self._first >= self.max_wait)
            ):
                self._submit()
            events.heartbeat(active=self.buffered + self.pipeline.in_flight)

    def _take(self, delivery: Delivery) -> None:
        """Buffer a received message, or deal with one whose workers kept dying."""
        limit = 1 if delivery.alone else self.max_deliveries
        if delivery.starts > limit:
            self._give_up_on(delivery)
        elif delivery.alone:
            self._run_alone(delivery)
        else:
            if not self.buffer:
                self._first = time.monotonic()
            self.buffer.append(delivery)
            self.buffered += len(delivery.images)

    def _give_up_on(self, delivery: Delivery) -> None:
        """A message started more often than allowed: alone, its image fails; else its images go on
        as one message each, to be run alone."""
        deaths = delivery.starts - 1
        if delivery.alone:
            detail = f"the embed worker processing it alone died {deaths} time(s) (out of memory? a crash?)"
            for image in delivery.images:
                log.error("%s: %s", image.get("source") or image["key"], detail)
                retry_on_broker(self.stage.fail)(image, "worker_died", detail)
        else:
            log.warning(
                "a message outlived %d workers: its %d images go on one by one", deaths, len(delivery.images)
            )
            for image in delivery.images:
                retry_on_broker(self.app.send_task)(
                    EMBED_TASK,
                    args=[[image]],
                    kwargs={"alone": True},
                    queue=EMBED_QUEUE,
                    argsrepr="[1 image]",
                )
        retry_on_broker(self.inbox.ack)(delivery)

    def _run_alone(self, delivery: Delivery) -> None:
        """Run a suspect message with nothing else in the pipeline, so that a death names it."""
        if self.buffer:
            self._submit()
        self._drain()
        self.pipeline.submit(Batch(list(delivery.images), [delivery]))
        self._drain()

    def _drain(self) -> None:
        """Wait until every submitted batch is written (or the pipeline failed)."""
        while self.pipeline.in_flight and self.pipeline.error is None:
            self._ack(self.pipeline.finished(timeout=0.05))
            self._ack(self.pipeline.let_go())

    def _submit(self) -> None:
        batch = Batch([image for d in self.buffer for image in d.images], list(self.buffer))
        self.buffer, self.buffered = [], 0
        self.pipeline.submit(batch)

    def _flush(self) -> None:
        """Stopping: publish the open shard (an object store's: commit it) and ack what it held."""
        try:
            self.stage.flush(timeout=120)
            self._ack(self.pipeline.finished())
        except Exception as e:  # what is not acked goes back to the queue
            log.warning("stopping without publishing the open shard: %s", one_line(e))

    def _ack(self, batches: list[Batch]) -> None:
        """Ack the messages of written batches (a failed ack only means a harmless re-delivery);
        those waiting for an object-store shard's commit are acked once it is committed."""
        held = [d for b in batches if b.held for d in b.messages]
        if held:
            try:
                retry_on_broker(self.inbox.forget_starts)(held)
            except redis.RedisError as e:
                log.warning("cannot forget the starts of written messages (%s)", one_line(e))
        for batch in self.stage.settled(batches):
            for delivery in batch.messages:
                try:
                    retry_on_broker(self.inbox.ack)(delivery)
                except redis.RedisError as e:
                    log.warning("cannot ack a message (%s): it will be done again", one_line(e))
            self.written += batch.written
            if self.events:
                self.events.batch(len(batch.payloads), batch.written, time.monotonic() - batch.received)

    def _let_go(self) -> None:
        """Stopping: what was received but not written goes back on the queue, unstarted."""
        held = self.buffer + [d for b in self.pipeline.let_go() for d in b.messages]
        self.buffer, self.buffered = [], 0
        try:
            back = self.inbox.give_back(held)
        except redis.RedisError as e:
            log.warning("cannot give %d messages back (%s): they return when the lease ends", len(held), e)
            return
        if back:
            log.info("stopping: %d messages given back for other workers", back)


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


class ControlThread(threading.Thread):
    """Answers Flower's control commands on a connection of its own, until stopped."""

    def __init__(self, app: Celery, conn, hostname: str, events: FlowerEvents):
        super().__init__(name="embed-control", daemon=True)
        self.conn = conn
        self.stopped = threading.Event()
        conn.ensure_connection(max_retries=1)
        self.consumer = control_node(app, conn, hostname, events)
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
            except Exception as e:  # the dashboard only: the consumer reconnects on its own errors
                log.debug("control connection: %s", one_line(e))
                self.stopped.wait(1.0)

    def stop(self) -> None:
        self.stopped.set()
        self.join(2)
        try:
            self.consumer.cancel()
        except Exception as e:  # the connection is gone already
            log.debug("cannot cancel the control consumer: %s", one_line(e))


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
