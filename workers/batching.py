"""The embed queue's consumer: collects messages into batches (size or maximum wait), hands
them to the embed stage, acks after it returns. A plain kombu consumer, not a Celery task,
so that acks follow the durable write exactly and nothing is buffered unacked for long."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from celery import Celery
from kombu import Message, Queue

from common.celery_app import EMBED_QUEUE

log = logging.getLogger("koala.embed")

Process = Callable[[list[dict]], int]


class BatchConsumer:
    """Consume the embed queue in batches until stopped (SIGTERM/SIGINT finish the batch)."""

    def __init__(self, app: Celery, process: Process, *, batch_size: int, max_wait: float,
                 on_idle: Callable[[], None] = lambda: None):
        self.app = app
        self.process = process
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_idle = on_idle
        self.stopping = threading.Event()
        self.buffer: list[tuple[dict, Message]] = []
        self.written = 0

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: finish the current batch, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff when the broker goes away."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self._consume()
                delay = 0.5
            except self.app.connection().connection_errors as e:
                self.buffer.clear()  # unacked: the broker gives them back after the visibility timeout
                log.warning("broker unreachable (%s); reconnecting in %.1fs", e, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30)

    def _consume(self) -> None:
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            queue = Queue(EMBED_QUEUE)
            with conn.Consumer(queue, callbacks=[self._on_message], accept=["msgpack"],
                               prefetch_count=self.batch_size, on_decode_error=self._on_decode_error):
                log.info("consuming %s in batches of %d", EMBED_QUEUE, self.batch_size)
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
                        self._flush()
                        first = 0.0
                    else:
                        self.on_idle()
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

    def _flush(self) -> None:
        batch, self.buffer = self.buffer, []
        self.written += self.process([payload for payload, _ in batch])
        for _, message in batch:
            message.ack()
