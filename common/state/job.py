"""Job state in Redis: one entry per item (dedupe + progress), exact counters, failure details.

Per-item cost: items live in 65,536 hash buckets `<prefix>:i:<4 hex>`, field = the other
14 bytes of the md5, value = a state of 1-3 bytes. Small hashes are listpacks in Redis
(about 20 bytes per entry); the fleet's Redis runs with `hash-max-listpack-entries 1024`
so that buckets stay listpacks up to ~60 M items (see README, "Job state in Redis").
Failure reasons and records are `common/state/failures.py`; waiting out a lost Redis,
`common/state/retries.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, cast

import redis
from redis.typing import EncodableT

from common.state.failures import REASONS, Failure

if TYPE_CHECKING:
    from common.settings import Settings

# Item states. Pending states (s, d) carry a 2-byte submission-run tag after the letter, so a
# new run can tell items it registered itself from items an earlier (maybe killed) run left.
SUBMITTED = b"s"
DOWNLOADED = b"d"
WRITTEN = b"w"
FAILED = b"f"

# A producer refreshes its alive key at every chunk and while it holds back; a journaled chunk
# whose producer's key has expired is orphaned and sent by the next producer.
PRODUCER_ALIVE_S = 15
COUNTERS = (
    "submitted",
    "duplicates",
    "rejected_lines",
    "requeued",
    "retried",
    "downloaded",
    "written",
    "failed",
)

# KEYS: bucket per item. ARGV: counts key, run tag, requeue flag, journal key, journal field,
# journal value, producer-alive key, then one field per item. The chunk is journaled in the
# same step, so a producer killed before sending it leaves a record to send it from.
# Returns per item: 0 new, 1 left pending by an earlier run (sent again only when the
# requeue flag is 1), 2 nothing to do.
_REGISTER = """
local new, dup, requeued = 0, 0, 0
local out = {}
for i = 1, #KEYS do
  local field = ARGV[i + 7]
  local v = redis.call('HGET', KEYS[i], field)
  if not v then
    redis.call('HSET', KEYS[i], field, 's' .. ARGV[2])
    new = new + 1; out[i] = 0
  else
    dup = dup + 1
    local c = string.sub(v, 1, 1)
    if ARGV[3] == '1' and (c == 's' or c == 'd') and string.sub(v, 2) ~= ARGV[2] then
      redis.call('HSET', KEYS[i], field, c .. ARGV[2])
      requeued = requeued + 1; out[i] = 1
    else
      out[i] = 2
    end
  end
end
if new > 0 then redis.call('HINCRBY', ARGV[1], 'submitted', new) end
if dup > 0 then redis.call('HINCRBY', ARGV[1], 'duplicates', dup) end
if requeued > 0 then redis.call('HINCRBY', ARGV[1], 'requeued', requeued) end
if new + requeued > 0 and ARGV[5] ~= '' then
  redis.call('HSET', ARGV[4], ARGV[5], ARGV[6])
  redis.call('SET', ARGV[7], '1', 'EX', %(alive)d)
end
return out
"""

# KEYS: bucket per item. ARGV: counts key, reasons key, failures stream, run tag, journal key,
# journal field, journal value, producer-alive key, then (field, reason, stream id) per item.
# failed -> submitted again (for `koala retry`); returns per item 1 when it was failed.
_UNFAIL = """
local out = {}
local n = 0
for i = 1, #KEYS do
  local base = 8 + (i - 1) * 3
  local v = redis.call('HGET', KEYS[i], ARGV[base + 1])
  if v == 'f' then
    redis.call('HSET', KEYS[i], ARGV[base + 1], 's' .. ARGV[4])
    redis.call('HINCRBY', ARGV[1], 'failed', -1)
    redis.call('HINCRBY', ARGV[2], ARGV[base + 2], -1)
    redis.call('XDEL', ARGV[3], ARGV[base + 3])
    n = n + 1; out[i] = 1
  else
    out[i] = 0
  end
end
if n > 0 then
  redis.call('HINCRBY', ARGV[1], 'retried', n)
  redis.call('HSET', ARGV[5], ARGV[6], ARGV[7])
  redis.call('SET', ARGV[8], '1', 'EX', %(alive)d)
end
return out
"""

# KEYS[1] bucket; ARGV: counts key, field, target state, allowed source letters,
# then (for failures) reasons key, stream key, stream cap, reason, then stream field/value pairs.
_TRANSITION = """
local v = redis.call('HGET', KEYS[1], ARGV[2])
if not v then return 0 end
local c = string.sub(v, 1, 1)
if not string.find(ARGV[4], c, 1, true) then return 0 end
local target = string.sub(ARGV[3], 1, 1)
if target == 'd' then
  redis.call('HSET', KEYS[1], ARGV[2], 'd' .. string.sub(v, 2))
  redis.call('HINCRBY', ARGV[1], 'downloaded', 1)
elseif target == 'w' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('HINCRBY', ARGV[1], 'written', 1)
  if c == 's' then redis.call('HINCRBY', ARGV[1], 'downloaded', 1) end
elseif target == 'f' then
  redis.call('HSET', KEYS[1], ARGV[2], 'f')
  redis.call('HINCRBY', ARGV[1], 'failed', 1)
  redis.call('HINCRBY', ARGV[5], ARGV[8], 1)
  local entry = {}
  for i = 9, #ARGV do entry[#entry + 1] = ARGV[i] end
  redis.call('XADD', ARGV[6], 'MAXLEN', '~', ARGV[7], '*', unpack(entry))
end
return 1
"""


# KEYS[1] the shard-number hash; ARGV: node, lowest number allowed. Hands out the node's next
# shard number: the one after the last handed out, or the lowest allowed when higher.
_NEXT_SHARD = """
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local lowest = tonumber(ARGV[2])
if n < lowest then n = lowest end
redis.call('HSET', KEYS[1], ARGV[1], n + 1)
return n
"""


class Registered(IntEnum):
    """What `JobState.register` found for a key."""

    NEW = 0
    LEFT_PENDING = 1  # pending from an earlier run: sent again only when requeue was asked
    KNOWN = 2  # nothing to do


def connect(url: str) -> redis.Redis:
    """A Redis client for the broker URL, with timeouts so a dead server is noticed."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)


class JobState:
    """Item states, counters and failures of the job kept in one Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "koala", failures_kept: int = 100_000):
        self.r = client
        self.prefix = prefix
        self.failures_kept = failures_kept
        self.counts_key = f"{prefix}:counts"
        self.reasons_key = f"{prefix}:reasons"
        self.failures_key = f"{prefix}:failures"
        self.journal_key = f"{prefix}:journal"
        self._register = client.register_script(_REGISTER % {"alive": PRODUCER_ALIVE_S})
        self._transition = client.register_script(_TRANSITION)
        self._unfail = client.register_script(_UNFAIL % {"alive": PRODUCER_ALIVE_S})
        self._next_shard = client.register_script(_NEXT_SHARD)

    @classmethod
    def from_settings(cls, settings: Settings, broker: str | None = None) -> JobState:
        """The job state in the settings' Redis (or in `broker`, a Redis URL, when given)."""
        return cls(connect(broker or settings.broker_url), settings.state_prefix, settings.failures_kept)

    def _slot(self, key: str) -> tuple[str, bytes]:
        """The bucket and field of an item key (md5 hex)."""
        return f"{self.prefix}:i:{key[:4]}", bytes.fromhex(key[4:])

    def new_run(self) -> bytes:
        """A 2-byte tag for a submission run, different from the previous run's."""
        n = self.r.hincrby(f"{self.prefix}:meta", "runs", 1)
        return (n % 65536).to_bytes(2, "big")

    def register(
        self,
        keys: Sequence[str],
        run: bytes,
        *,
        requeue: bool = False,
        journal: tuple[str, str, bytes] | None = None,
    ) -> list[Registered]:
        """Record submitted keys; per key what was found (new, left pending by an earlier run, known).

        `journal` = (producer id, entry id, chunk): kept until `unjournal` confirms the send.
        """
        if not keys:
            return []
        slots = [self._slot(k) for k in keys]
        producer, entry, chunk = journal or ("", "", b"")
        args: list[EncodableT] = [
            self.counts_key,
            run,
            int(requeue),
            self.journal_key,
            f"{producer}:{entry}" if journal else "",
            chunk,
            self._alive_key(producer),
            *[f for _, f in slots],
        ]
        return [Registered(v) for v in self._register(keys=[b for b, _ in slots], args=args)]

    def unfail(self, failures: Sequence[dict], run: bytes, journal: tuple[str, str, bytes]) -> list[bool]:
        """Failed -> submitted again (with the entries from `failures()`, which carry their stream
        id); counters and the kept details are updated, the chunk journaled. Per item: was it failed."""
        if not failures:
            return []
        slots = [self._slot(f["key"]) for f in failures]
        producer, entry, chunk = journal
        args: list[EncodableT] = [
            self.counts_key,
            self.reasons_key,
            self.failures_key,
            run,
            self.journal_key,
            f"{producer}:{entry}",
            chunk,
            self._alive_key(producer),
        ]
        for (_, field), f in zip(slots, failures, strict=True):
            args += [field, f["reason"], f["id"]]
        return [bool(x) for x in self._unfail(keys=[b for b, _ in slots], args=args)]

    def _alive_key(self, producer: str) -> str:
        return f"{self.prefix}:producer:{producer}"

    def keep_alive(self, producer: str) -> None:
        """Tell other producers this one is alive (its journal is not orphaned)."""
        self.r.set(self._alive_key(producer), 1, ex=PRODUCER_ALIVE_S)

    def unjournal(self, producer: str, entry: str) -> None:
        """The journaled chunk was sent: forget it."""
        self.r.hdel(self.journal_key, f"{producer}:{entry}")

    def orphaned_chunks(self) -> list[tuple[str, bytes]]:
        """Journaled chunks of producers that died before confirming them sent."""
        out = []
        for field, chunk in self._hgetall(self.journal_key).items():
            producer = field.decode().split(":", 1)[0]
            if not self.r.exists(self._alive_key(producer)):
                out.append((field.decode(), chunk))
        return out

    def drop_orphan(self, field: str) -> None:
        """Forget an orphaned chunk once it has been dealt with."""
        self.r.hdel(self.journal_key, field)

    def add(self, counter: str, n: int = 1) -> None:
        """Add to a counter (e.g. rejected_lines)."""
        if n:
            self.r.hincrby(self.counts_key, counter, n)

    def states(self, keys: Sequence[str]) -> list[bytes | None]:
        """State letters of many items in one round trip."""
        return [v[:1] if v else None for v in self._values(keys)]

    def pending_in_run(self, keys: Sequence[str], run: bytes) -> list[bool]:
        """Per key: still pending (submitted or downloaded) and tagged with submission run `run`."""
        return [
            v is not None and v[:1] in (SUBMITTED, DOWNLOADED) and v[1:] == run for v in self._values(keys)
        ]

    def _values(self, keys: Sequence[str]) -> list[bytes | None]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hget(*self._slot(key))
        return pipe.execute()

    # The client is made without decode_responses, so Redis answers bytes (typed bytes | str).
    def _hgetall(self, key: str) -> dict[bytes, bytes]:
        return cast("dict[bytes, bytes]", self.r.hgetall(key))

    def _xrange(self, first: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Up to 1000 failure entries from stream id `first` on."""
        batch = self.r.xrange(self.failures_key, min=first, max="+", count=1000)
        return cast("list[tuple[bytes, dict[bytes, bytes]]]", batch)

    def _move(self, key: str, target: bytes, sources: bytes, extra: Iterable = ()) -> bool:
        bucket, field = self._slot(key)
        args = [self.counts_key, field, target, sources, *extra]
        return bool(self._transition(keys=[bucket], args=args))

    def mark_downloaded_many(self, keys: Sequence[str]) -> list[bool]:
        """submitted -> downloaded, per item (False when it was not pending submission); one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            bucket, field = self._slot(key)
            self._transition(keys=[bucket], args=[self.counts_key, field, DOWNLOADED, SUBMITTED], client=pipe)
        return [bool(x) for x in pipe.execute()]

    def mark_written_many(self, keys: Sequence[str], shard: bytes) -> list[bool]:
        """submitted/downloaded -> written into `shard` (a short token), per item (False when already
        final); one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            bucket, field = self._slot(key)
            self._transition(
                keys=[bucket],
                args=[self.counts_key, field, WRITTEN + shard, SUBMITTED + DOWNLOADED],
                client=pipe,
            )
        return [bool(x) for x in pipe.execute()]

    def written_to(self, keys: Sequence[str]) -> list[bytes | None]:
        """The shard token each item was written to (None when it is not written)."""
        return [v[1:] if v and v[:1] == WRITTEN else None for v in self._values(keys)]

    def mark_failed(self, failure: Failure, *, from_states: bytes = SUBMITTED) -> bool:
        """Pending -> failed with its reason; counts it and keeps its detail (capped) in a stream."""
        if failure.reason not in REASONS:
            raise ValueError(f"unknown failure reason {failure.reason!r}")
        entry = failure.as_dict()
        fields = [x for k, v in entry.items() for x in (k, str(v))]
        extra = [self.reasons_key, self.failures_key, self.failures_kept, failure.reason, *fields]
        return self._move(failure.key, FAILED, from_states, extra)

    def counts(self) -> dict[str, int]:
        """Counters of the job, with pending = submitted - written - failed."""
        raw = self._hgetall(self.counts_key)
        counts = {name: int(raw.get(name.encode(), 0)) for name in COUNTERS}
        counts["pending"] = counts["submitted"] - counts["written"] - counts["failed"]
        return counts

    def failures_by_reason(self) -> dict[str, int]:
        """Failed items per reason."""
        raw = sorted(self._hgetall(self.reasons_key).items())
        return {k.decode(): int(v) for k, v in raw if int(v)}

    def failures(self, reason: str | None = None, limit: int | None = None) -> list[dict]:
        """Failure details kept in Redis, oldest first, optionally of one reason."""
        out: list[dict] = []
        last = "-"
        while limit is None or len(out) < limit:
            batch = self._xrange(last)
            if last != "-":
                batch = batch[1:]
            if not batch:
                break
            for entry_id, fields in batch:
                item: dict = {k.decode(): v.decode() for k, v in fields.items()}
                item["time"] = float(item.get("time") or 0)
                item["id"] = entry_id.decode()
                if reason is None or item.get("reason") == reason:
                    out.append(item)
            last = batch[-1][0].decode()
        return out[:limit] if limit is not None else out

    def next_shard_number(self, node: str, lowest: int = 0) -> int:
        """A shard number for `node` never handed out before in this job, at least `lowest` (the
        folder's highest + 1): shards moved away never have their numbers used again."""
        return int(self._next_shard(keys=[f"{self.prefix}:shards"], args=[node, lowest]))

    def count_delivery(self, message_id: str) -> int:
        """One more start of a message's work; how many starts it has had (kept until forgotten)."""
        return int(self.r.hincrby(f"{self.prefix}:deliveries", message_id, 1))

    def forget_delivery(self, message_id: str) -> None:
        """The message's work is over (done, split or failed): its starts are no longer counted."""
        self.r.hdel(f"{self.prefix}:deliveries", message_id)

    def ping(self) -> None:
        """Raise a redis error when the server does not answer."""
        self.r.ping()

    def queue_length(self, queue: str) -> int:
        """Messages waiting in one broker queue."""
        return self.r.llen(queue)

    def queue_depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages waiting in each broker queue (kombu keeps a Redis list per queue), and those
        delivered but not acknowledged (`unacked`)."""
        pipe = self.r.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        pipe.hlen("unacked")
        for q in queues:
            pipe.smembers(f"{self.prefix}:consumers:{q}")
        results = pipe.execute()
        depths, unacked, consumers = results[: len(queues)], results[len(queues)], results[len(queues) + 1 :]
        # messages in consumers' held lists (workers/inbox.py) are unacknowledged too
        held = sum(self.r.llen(f"{self.prefix}:held:{c.decode()}") for ids in consumers for c in ids)
        return {**dict(zip(queues, depths, strict=True)), "unacked": unacked + held}

    def reset(self) -> int:
        """Delete every key of this job (items, counters, failures); returns how many went."""
        n = 0
        for key in self.r.scan_iter(match=f"{self.prefix}:*", count=10_000):
            n += self.r.delete(key)
        return n


def room_for(limit: int, depth: int) -> int:
    """Messages a sender may send before looking at a queue again: a tenth of the free room,
    so that several senders together overshoot the high-water mark by little."""
    free = limit - depth
    return min(free, max(1, limit // 10)) if free > 0 else 0
