"""The embed queue's receiving end: delivery and "in flight" in one Redis step, leases that the
holder decides, and a count of starts per message.

The queue is kombu's Redis list `embed` (download workers publish to it with `send_task`, Flower
shows its length). A consumer takes an entry with BLMOVE into its own list `<prefix>:held:<id>`:
the entry is in the queue or in a held list at every instant, so a kill between the pop and any
bookkeeping loses nothing (kombu's BRPOP + `unacked` record was two steps). Acking removes it from
the held list. The consumer keeps `<prefix>:consumer:<id>` alive with its own lease; once that key
has expired, any consumer's sweep puts the dead consumer's held entries back on the queue, so the
holder's lease, not the restorer's settings, decides when a message is free again.

`pop_into` gives a Celery worker's kombu channel (the download queue's) the same atomic pop: its
BRPOP becomes a BLMOVE into an inbox's held list, left once kombu has recorded the message in its
own `unacked` hash (whose leases `common/state/leases.py` keeps).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from queue import Empty
from time import monotonic
from typing import Any, cast

import msgpack
import orjson
import pybase64
import redis

from common.messages import EMBED_QUEUE, EmbedImage, images_of, is_envelope

log = logging.getLogger("koala.embed")

# Put back every held entry of consumers whose lease key has expired; returns how many went back.
# In the same step their object-store shards (workers/remote.py) lose what the held messages
# backed: open ones become void (their reservations free), sealed ones orphaned (settled later).
# KEYS: consumers set, queue. ARGV: prefix.
_SWEEP = """
local n = 0
local ledger = ARGV[1] .. ':remote'
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':consumer:' .. id) == 0 then
    local held = ARGV[1] .. ':held:' .. id
    while redis.call('LMOVE', held, KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
    redis.call('SREM', KEYS[1], id)
    local writing = ARGV[1] .. ':writing:' .. id
    for _, token in ipairs(redis.call('SMEMBERS', writing)) do
      local v = redis.call('HGET', ledger, token) or ''
      local c = string.sub(v, 1, 1)
      if c == 'o' then redis.call('HDEL', ledger, token)
      elseif c == 's' then redis.call('HSET', ledger, token, 'x' .. string.sub(v, 2)) end
    end
    redis.call('DEL', writing)
  end
end
return n
"""

# Give held entries back to the queue (next in line), each only if still held. KEYS: held, queue.
_GIVE_BACK = """
local n = 0
for _, entry in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, entry) == 1 then
    redis.call('RPUSH', KEYS[2], entry)
    n = n + 1
  end
end
return n
"""


@dataclass
class Delivery:
    """One message taken from the queue: its raw entry (to ack), id, images and start count."""

    raw: bytes
    message_id: str
    images: list[EmbedImage]
    starts: int
    alone: bool


def parse(raw: bytes) -> tuple[str, list[EmbedImage], bool]:
    """(message id, images, alone) of a kombu envelope on the embed queue; ValueError saying what
    it is instead."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError:
        envelope = None
    if not is_envelope(envelope):
        raise ValueError("that is not a kombu message")
    if envelope.get("content-type") != "application/x-msgpack":
        raise ValueError(f"content type {envelope.get('content-type')!r} refused (msgpack only)")
    try:
        body = msgpack.unpackb(pybase64.b64decode(envelope["body"] or "", validate=True), raw=False)
    except (ValueError, TypeError) as e:  # binascii.Error and most of msgpack's are ValueErrors
        raise ValueError(f"a body that is not base64 msgpack ({e})") from None
    headers = envelope.get("headers") or {}
    message_id = str(headers.get("id") or envelope["properties"]["delivery_tag"])
    kwargs = body[1] if isinstance(body, list | tuple) and len(body) > 1 else {}
    return message_id, images_of(body), bool(isinstance(kwargs, dict) and kwargs.get("alone"))


class Inbox:
    """One consumer's view of the embed queue (its id, held list and lease)."""

    def __init__(self, client: redis.Redis, prefix: str, lease: float, queue: str = EMBED_QUEUE):
        self.r = client
        self.prefix = prefix
        self.queue = queue
        self.lease_ms = max(1000, int(lease * 1000))
        self.id = uuid.uuid4().hex[:12]
        self.held_key = f"{prefix}:held:{self.id}"
        self.deliveries_key = f"{prefix}:deliveries"
        self._sweep = client.register_script(_SWEEP)
        self._give_back = client.register_script(_GIVE_BACK)
        self._stopped = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def consumers_key(self) -> str:
        return f"{self.prefix}:consumers:{self.queue}"

    def open(self) -> None:
        """Take the lease and keep it renewed (a quarter of it at a time) until `close`."""
        self.renew()
        self._renewer = threading.Thread(target=self._keep_renewing, name="inbox-lease", daemon=True)
        self._renewer.start()

    def renew(self) -> None:
        """Push the lease's end to now + lease (and be listed, in case a sweep dropped this id
        while Redis was away)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{self.prefix}:consumer:{self.id}", b"1", px=self.lease_ms)
        pipe.sadd(self.consumers_key, self.id)
        pipe.execute()

    def _keep_renewing(self) -> None:
        """Renew the lease, and sweep the messages of consumers whose lease ended, every quarter."""
        while not self._stopped.wait(self.lease_ms / 4000):
            try:
                self.renew()
                if back := self.sweep():
                    log.info("put %d messages of stopped consumers back on %r", back, self.queue)
            except redis.RedisError as e:  # the next round tries again
                log.warning("cannot renew the lease on %r: %s", self.queue, e)

    def receive(self, timeout: float) -> Delivery | None:
        """The next message (moved into this consumer's held list), or None after `timeout` s.
        Entries that are not embed messages are logged and dropped."""
        moved = self.r.blmove(self.queue, self.held_key, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        raw = cast("bytes | None", moved)  # Redis takes fractional seconds; redis-py's hint says int
        if raw is None:
            return None
        try:
            message_id, images, alone = parse(raw)
        except ValueError as e:
            log.error(
                "dropped an entry of queue %r that is not an embed message (%s): %.200r", self.queue, e, raw
            )
            self.r.lrem(self.held_key, 1, raw)  # type: ignore[arg-type]  # bytes are fine
            return None
        starts = int(self.r.hincrby(self.deliveries_key, message_id, 1))
        return Delivery(raw, message_id, images, starts, alone)

    def ack(self, delivery: Delivery) -> None:
        """The message's work is over: no longer held, its starts forgotten."""
        pipe = self.r.pipeline(transaction=True)
        pipe.lrem(self.held_key, 1, delivery.raw)  # type: ignore[arg-type]
        pipe.hdel(self.deliveries_key, delivery.message_id)
        pipe.execute()

    def forget_starts(self, deliveries: list[Delivery]) -> None:
        """Their work is done but for a commit (an object-store shard): a death from now on is not
        theirs, so their starts are not counted against them (they stay held until acked)."""
        if deliveries:
            self.r.hdel(self.deliveries_key, *[d.message_id for d in deliveries])

    def give_back(self, deliveries: list[Delivery]) -> int:
        """Put messages this consumer holds unstarted back on the queue (stopping, reconnecting)."""
        if not deliveries:
            return 0
        pipe = self.r.pipeline(transaction=True)
        for d in deliveries:
            pipe.hincrby(self.deliveries_key, d.message_id, -1)  # not started after all
        unstarted = [d.message_id for d, n in zip(deliveries, pipe.execute(), strict=True) if n <= 0]
        if unstarted:
            self.r.hdel(self.deliveries_key, *unstarted)
        return int(self._give_back(keys=[self.held_key, self.queue], args=[d.raw for d in deliveries]))

    def sweep(self) -> int:
        """Put the held messages of consumers whose lease expired back on the queue."""
        return int(self._sweep(keys=[self.consumers_key, self.queue], args=[self.prefix]))

    def close(self) -> None:
        """Stop renewing; what is still held goes back to the queue, and the lease is dropped."""
        self._stopped.set()
        if self._renewer is not None:
            self._renewer.join(5)
        self.r.delete(f"{self.prefix}:consumer:{self.id}")
        self.sweep()


def pop_into(channel: Any, inbox: Inbox) -> None:
    """Make a kombu Redis `channel` take each message of `inbox.queue` with BLMOVE into the inbox's
    held list, and drop it from there once kombu's `unacked` record holds it (a kill in between:
    the sweep gives it back; at worst it is delivered twice, which every stage shrugs off). While
    the channel consumes other queues too, kombu's own BRPOP is used."""
    from kombu.transport.redis import loads
    from kombu.utils.encoding import bytes_to_str

    brpop_start, brpop_read = channel._brpop_start, channel.handlers["BRPOP"]
    sent = [""]  # which command the pending reply answers

    def start(timeout: float | None = None) -> None:
        if list(channel.active_queues) != [inbox.queue]:
            sent[0] = "BRPOP"
            return brpop_start(timeout)
        sent[0] = "BLMOVE"
        channel._in_poll = channel.client.connection
        channel._brpop_sent_at = monotonic()
        timeout = channel.brpop_timeout if timeout is None else timeout
        channel.client.connection.send_command(
            "BLMOVE", inbox.queue, inbox.held_key, "RIGHT", "LEFT", timeout or 0
        )

    def read(**options: Any) -> bool:
        if sent[0] != "BLMOVE":
            return brpop_read(**options)
        try:
            try:
                item = channel.client.parse_response(channel.client.connection, "BLMOVE", **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()
                raise
            if not item:
                raise Empty()
            channel._queue_cycle.rotate(inbox.queue)
            channel.connection._deliver(loads(bytes_to_str(item)), inbox.queue)
            inbox.r.lrem(inbox.held_key, 1, item)
            return True
        finally:
            channel._in_poll = None
            channel._flush_brpop_reauth()

    channel._brpop_start = start
    channel.handlers["BRPOP"] = read
