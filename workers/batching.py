"""The embed queue's consumer: collects messages into batches (size or maximum wait), hands
them to the embed stage, acks after it returns. A plain kombu consumer, not a Celery task,
so that acks follow the durable write exactly and nothing is buffered unacked for long.
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
from collections.abc import Callable

import redis
from celery import Celery
from kombu import Message, Queue
from kombu.exceptions import OperationalError

from common.celery_app import EMBED_QUEUE, EMBED_TASK
from common.state import is_storage_error

log = logging.getLogger("koala.embed")

Process = Callable[[list[dict]], int]


class BatchConsumer:
    """Consume the embed queue in batches until stopped (SIGTERM/SIGINT finish the batch)."""

    def __init__(self, app: Celery, process: Process, *, batch_size: int, max_wait: float,
                 on_idle: Callable[[], None] = lambda: None, hostname: str = "embed"):
        self.app = app
        self.hostname = hostname
        self.events: FlowerEvents | None = None
        self.process = process
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_idle = on_idle
        self.stopping = threading.Event()
        self.buffer: list[tuple[dict, Message]] = []
        self.written = 0
        self.disk_delay = 0.0  # current backoff while the output disk refuses writes

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: finish the current batch, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff when the broker goes away."""
        delay = 0.5
        broker_errors = (*self.app.connection().connection_errors, OperationalError, redis.ConnectionError,
                         redis.TimeoutError)
        while not self.stopping.is_set():
            try:
                self._consume()
                delay = 0.5
            except broker_errors as e:
                if is_storage_error(e):
                    raise  # not the broker's: _flush and _idle deal with the disk
                self.buffer.clear()  # unacked: the broker gives them back after the visibility timeout
                log.warning("broker unreachable (%s); reconnecting in %.1fs", one_line(e), delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30)

    def _consume(self) -> None:
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            queue = Queue(EMBED_QUEUE)
            self.events = FlowerEvents(self.app, conn, self.hostname)
            control = control_node(self.app, conn, self.hostname, self)
            with conn.Consumer(queue, callbacks=[self._on_message], accept=["msgpack"],
                               prefetch_count=self.batch_size, on_decode_error=self._on_decode_error):
                log.info("consuming %s in batches of %d", EMBED_QUEUE, self.batch_size)
                try:
                    self._loop(conn)
                finally:
                    control.cancel()
                    self.events.close()

    def _loop(self, conn) -> None:
        """Drain messages into the buffer; flush when full, due, or stopping."""
        first = 0.0
        while True:
            stopping = self.stopping.is_set()
            if not stopping and len(self.buffer) < self.batch_size:
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
            if self.buffer and not first:
                first = time.monotonic()
            due = self.buffer and (len(self.buffer) >= self.batch_size or stopping
                                   or time.monotonic() - first >= self.max_wait)
            if due:
                if self._flush():
                    first = 0.0
            else:
                self._idle()
            self.events.heartbeat(active=len(self.buffer))
            if stopping and not self.buffer:
                return

    def _on_message(self, body: object, message: Message) -> None:
        try:
            args, _kwargs, _embed = body  # Celery task protocol 2
            payload = args[0]
            payload["key"]  # noqa: B018 - a payload without a key is not ours
        except (TypeError, ValueError, KeyError, IndexError):
            log.error("dropping a malformed embed message: %.200r", body)
            message.ack()
            return
        self.buffer.append((payload, message))

    def _on_decode_error(self, message: Message, error: Exception) -> None:
        """Refused content (pickle, anything not msgpack) is dropped unexecuted."""
        log.error("refusing a message with content type %s: %s", message.content_type, error)
        message.ack()

    def _flush(self) -> bool:
        """Process the buffer and ack it; True when done. When the output disk refuses (full,
        read-only), nothing is acked: the batch is kept and tried again after a backoff."""
        batch = self.buffer
        started = time.monotonic()
        try:
            written = self.process([payload for payload, _ in batch])
        except OSError as e:
            if not is_storage_error(e):
                raise
            self._disk_refused(e, len(batch))
            return False
        self.buffer = []
        self.disk_delay = 0.0
        for _, message in batch:
            message.ack()
        self.written += written
        if self.events:
            self.events.batch(len(batch), written, time.monotonic() - started)
        return True

    def _idle(self) -> None:
        """The idle hook (age rotation), its disk errors logged, not raised."""
        try:
            self.on_idle()
            self.disk_delay = 0.0
        except OSError as e:
            if not is_storage_error(e):
                raise
            self._disk_refused(e, 0)

    def _disk_refused(self, error: OSError, held: int) -> None:
        """Log why nothing is acked, then wait (doubling up to 30 s). Stopping: the held messages
        are let go unacked; the broker gives them back."""
        self.disk_delay = min(max(1.0, self.disk_delay * 2), 30.0)
        if self.stopping.is_set():
            log.warning("output disk refuses writes (%s); stopping with %d messages unacknowledged",
                        one_line(error), held)
            self.buffer = []
            return
        log.warning("output disk refuses writes (%s); not acknowledging %d messages, retrying in %.0fs",
                    one_line(error), held, self.disk_delay)
        self.stopping.wait(self.disk_delay)


def one_line(error: BaseException) -> str:
    """An exception as one short line for the log."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


class FlowerEvents:
    """Celery worker/task events for the embed consumer; sending never breaks the consumer."""

    def __init__(self, app: Celery, conn, hostname: str, freq: float = 5.0):
        self.freq = freq
        self.processed = 0
        self.last_beat = 0.0
        self.dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
        self.send("worker-online", freq=freq, sw_ident="koala-embed", sw_ver="0.1",
                  sw_sys=platform.system())

    def send(self, kind: str, **fields) -> None:
        try:
            self.dispatcher.send(kind, **fields)
        except Exception as e:  # events are for the dashboard only
            log.debug("cannot send %s event: %s", kind, e)

    def heartbeat(self, active: int = 0) -> None:
        """A worker-heartbeat every `freq` seconds (Flower marks silent workers offline)."""
        if time.monotonic() - self.last_beat >= self.freq:
            self.last_beat = time.monotonic()
            self.send("worker-heartbeat", freq=self.freq, active=active, processed=self.processed,
                      loadavg=list(os.getloadavg()))

    def batch(self, images: int, written: int, runtime: float) -> None:
        """One batch, as the life of one `koala.embed` task."""
        task_id = str(uuid.uuid4())
        self.processed += 1
        self.send("task-received", uuid=task_id, name=EMBED_TASK, args=f"[{images} images]",
                  kwargs="{}", retries=0, eta=None, root_id=task_id, parent_id=None)
        self.send("task-started", uuid=task_id, pid=os.getpid())
        self.send("task-succeeded", uuid=task_id, result=f"{written} records written",
                  runtime=round(runtime, 3))
        self.heartbeat()

    def close(self) -> None:
        self.send("worker-offline")
        self.dispatcher.close()


def control_node(app: Celery, conn, hostname: str, consumer: BatchConsumer):
    """Answer the `inspect` commands Flower sends, so the embed worker and its queue are listed."""
    queue = Queue(EMBED_QUEUE).as_dict(recurse=True)
    handlers = {
        "ping": lambda state, **_: {"ok": "pong"},
        "active_queues": lambda state, **_: [queue],
        "registered": lambda state, **_: [EMBED_TASK],
        "stats": lambda state, **_: {"pid": os.getpid(), "pool": {"max-concurrency": 1},
                                     "total": {EMBED_TASK: consumer.events.processed}},
        "active": lambda state, **_: [],
        "reserved": lambda state, **_: [],
        "scheduled": lambda state, **_: [],
        "revoked": lambda state, **_: [],
        "conf": lambda state, **_: {},
    }
    node = app.control.mailbox(conn).Node(hostname, handlers=handlers, channel=conn.channel())
    return node.listen()
