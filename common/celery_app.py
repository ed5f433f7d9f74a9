"""The Celery app shared by the producer and the workers: queues, msgpack on the wire, no pickle."""

from __future__ import annotations

import logging
import time

import orjson
import pybase64
from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from common.messages import DOWNLOAD_QUEUE, DOWNLOAD_TASK, EMBED_QUEUE, EMBED_TASK, is_envelope
from common.settings import Settings, get_settings

log = logging.getLogger("koala.broker")


class BrokerLossInOneLine(logging.Filter):
    """Celery logs a lost broker connection with a chained traceback; keep it to one line (the
    worker reconnects by itself, and the traceback tells nothing more)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "Connection to broker lost" in str(record.msg):
            error = record.exc_info[1]
            record.msg = f"{str(record.msg).splitlines()[0]} ({type(error).__name__}: {error})"
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("celery.worker.consumer.consumer").addFilter(BrokerLossInOneLine())


class FastBase64:
    """kombu's base64 body codec, the same bytes through SIMD pybase64 (the stdlib's took ~1 ms per
    image on each side: a chunk message's body is megabytes)."""

    def encode(self, s: str | bytes) -> str:
        # straight to str: b64encode + decode("ascii") copied the megabytes once more
        return pybase64.b64encode_as_string(s.encode() if isinstance(s, str) else s)

    def decode(self, s: str | bytes) -> bytes:
        """The body; empty where it is not strict base64 (the consumer then refuses it as
        undecodable). Strict: kombu writes no other, and the lenient decoder, which skips
        characters outside the alphabet, took 3.7x as long (0.88 vs 0.24 ms per 2 MB body)."""
        try:
            return pybase64.b64decode(s, validate=True)
        except ValueError as e:
            log.error("a message body is not base64 (%s): %.100r", e, s)
            return b""


def _envelope_dumps(obj: object, _kombu_dumps=kombu_redis.dumps) -> bytes | str:
    """kombu's Redis envelope (written at publish, and again into `unacked` at delivery) as JSON by
    orjson: the stdlib encoder scanned each megabyte body string at ~200 MB/s. Anything orjson
    refuses goes to kombu's own encoder."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return _kombu_dumps(obj)


def _envelope_loads(s: str | bytes, _kombu_loads=kombu_redis.loads) -> object:
    """kombu's parse of a queue entry; text that is not JSON comes back as it is, for
    `_deliver_envelopes` to log and drop (kombu raised there, which stopped the worker)."""
    try:
        return _kombu_loads(s)
    except ValueError:
        return s if isinstance(s, str) else s.decode("utf-8", "replace")


def _deliver_envelopes(
    transport: virtual.Transport, message: object, queue: str, _deliver=virtual.Transport._deliver
) -> None:
    """Hand a queue entry to its consumer, or log and drop it when it is not a kombu message
    (`LPUSH download 'not json'` stopped every worker that popped it)."""
    if is_envelope(message):
        _deliver(transport, message, queue)
    else:
        text = message if isinstance(message, str) else repr(message)
        log.error(
            "dropped an entry of queue %r that is not a kombu message (%d characters): %.200r",
            queue,
            len(text),
            text,
        )


class DeadlineClock:
    """kombu's Redis transport scores each unacked message with `time()` at delivery and restores it
    once `time() - visibility_timeout` passes that score: a restorer's own timeout decided when
    another worker's message was free (one worker at 5 s re-delivered the messages of workers at
    60 s). With this clock, `time()` + this process's timeout, the score is the holder's deadline
    and a restorer's test reduces to "the deadline has passed" whatever its own timeout. Leases
    (`common/state/leases.py`) renew to the same deadline."""

    timeout = 0.0

    def __call__(self) -> float:
        return time.time() + self.timeout


deadline_clock = DeadlineClock()

# kombu patched on purpose: ours take other signatures than the ones they replace
virtual.Channel.codecs["base64"] = FastBase64()  # type: ignore[assignment]
kombu_redis.dumps = _envelope_dumps  # type: ignore[assignment]
kombu_redis.loads = _envelope_loads  # type: ignore[assignment]
kombu_redis.Transport._deliver = _deliver_envelopes  # type: ignore[method-assign]
kombu_redis.time = deadline_clock


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app for the fleet; tasks are sent by name so senders need not import workers."""
    settings = settings or get_settings()
    deadline_clock.timeout = settings.visibility_timeout
    app = Celery("koala", broker=settings.broker_url)
    app.conf.update(
        # msgpack carries image bytes natively; pickle is never accepted.
        task_serializer="msgpack",
        accept_content=["msgpack"],
        result_accept_content=["msgpack"],
        event_serializer="json",
        task_ignore_result=True,
        # no result backend, so one shared (disabled) backend: per thread, Celery looked it up through
        # the installed packages' entry points on each thread's first send (~6 ms each, 32 threads)
        result_backend_thread_safe=True,
        task_queues=(Queue(DOWNLOAD_QUEUE), Queue(EMBED_QUEUE)),
        task_default_queue=DOWNLOAD_QUEUE,
        task_routes={DOWNLOAD_TASK: {"queue": DOWNLOAD_QUEUE}, EMBED_TASK: {"queue": EMBED_QUEUE}},
        task_create_missing_queues=False,
        # Ack after the work is durable; a killed worker's messages come back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu's default sweep for expired unacked messages runs every 10 s x 10 calls;
            # make it follow the visibility timeout so a killed worker's work comes back soon.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 3)),
            "unacked_restore_throttle": 1,
            # The restore scan holds a Redis lock; a worker killed inside it left the lock for
            # kombu's default 300 s, blocking every restore. A scan takes milliseconds, and a
            # message restored twice is harmless (every state transition is one-way).
            "unacked_mutex_expire": 5,
        },
        worker_soft_shutdown_timeout=30.0,
    )
    return app


_apps: dict[str, Celery] = {}


def __getattr__(name: str) -> Celery:
    """`celery -A common.celery_app flower|inspect ...`: the fleet's app (msgpack control
    messages included), built from the settings on first use."""
    if name in ("app", "celery"):
        return _apps.setdefault(name, make_app())
    raise AttributeError(name)
