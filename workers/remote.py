"""The embed worker's shards in an object store (`KOALA_OUTPUT_DIR=s3://…`): exactly once without a
durable local disk.

A record is durable only once its shard's upload is committed, so the messages of an open shard
stay held (unacked; the inbox keeps renewing their lease) until then, and meanwhile the items are
only *reserved* for the shard: state `r` + the shard's token, which becomes `w` (counted as written)
in the step that forgets the shard, after the commit. The ledger `<prefix>:remote` (token → state)
says what a reservation is worth:

    o<owner>|<name>                                   open: consumer <owner> (inbox id) appends to it
    s<owner>|<name>|<records>|<bytes>|<upload id>     sealed: <owner> uploads it and may commit it
    x…  (the same fields)                              orphaned: <owner> was found dead while sealed
    c|<name>                                          committed, as another worker found out
    (absent)                                          void: whoever holds the item's message writes it

The inbox sweep (`workers/inbox.py` `_SWEEP`), in the Lua step that puts a dead consumer's held
messages back on the queue, voids its open shards and orphans its sealed ones (`<prefix>:writing:
<owner>` lists them): a reservation stays live exactly as long as the message it came from is held.
A consumer swept while alive finds its shard gone when it next reserves or seals, and stops. An
orphan is settled by the first worker that meets one of its items again (or by the upload sweep):
abort its upload, so that a stalled owner can no longer complete it, then: the object exists →
committed (listed in the manifest), else void.

One shard's steps, and a kill (the machine lost with its scratch disk) right after each:
1. records appended to the scratch temp (no fsync) → its messages come back (sweep), written again;
2. `reserve`: s/d, or r of a void shard → r + token; the first registers the shard `o` → the sweep
   voids the shard: the same;
3. upload begun (its id) → the same; the upload sweep aborts the upload (its shard is void);
4. `seal`: o → s (name, records, bytes, upload id) → its items are orphans: abort, no object →
   void, written again;
5. parts sent, upload completed (`If-None-Match: *`) → orphans: abort (too late), the object
   exists → committed, listed in the manifest;
6. manifest entry (compare-and-swap) → the same (the entry is there already);
7. `commit`: r + token → w + token (counted), the shard forgotten → messages come back, their
   items are `w`: acked, nothing written;
8. messages acked.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, cast

from common.output.shards import SHARD_PREFIX, final_path, shard_token, upload_source
from common.output.storage import Store
from common.state.job import DOWNLOADED, SUBMITTED, JobState
from common.state.retries import call_retrying, retry_on_broker

log = logging.getLogger("koala.embed")

RESERVED = b"r"
QUEUED = 2  # closed shards waiting for the uploader (one uploading, one next): then the writer waits

# KEYS: ledger, writing set, counts, then item buckets. ARGV: token, open entry, first ('1'/'0'), then
# item fields (ARGV[i] for KEYS[i], i >= 4). {0}: the shard is not (or no longer) this owner's open
# one; else {1, per item 1 reserved / 0 not}.
_RESERVE = """
local reg = redis.call('HGET', KEYS[1], ARGV[1])
if reg ~= ARGV[2] then
  if reg or ARGV[3] ~= '1' then return {0} end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
end
local out, fetched = {1}, 0
for i = 4, #KEYS do
  local v = redis.call('HGET', KEYS[i], ARGV[i])
  local ok = 0
  if v then
    local c = string.sub(v, 1, 1)
    if c == 's' or c == 'd' then
      ok = 1
      if c == 's' then fetched = fetched + 1 end
    elseif c == 'r' and string.sub(v, 2) ~= ARGV[1] and not redis.call('HGET', KEYS[1], string.sub(v, 2)) then
      ok = 1
    end
  end
  if ok == 1 then redis.call('HSET', KEYS[i], ARGV[i], 'r' .. ARGV[1]) end
  out[#out + 1] = ok
end
if fetched > 0 then redis.call('HINCRBY', KEYS[3], 'downloaded', fetched) end
return out
"""

# KEYS: ledger. ARGV: token, expected value, new value ('' deletes). Whether it was as expected.
_SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""

# KEYS: ledger, writing set (or the ledger again), counts, then item buckets. ARGV: token, forget
# ('1': the shard leaves the ledger, '0': only when it is committed), '', then item fields. Moves
# the items reserved for the shard to written (counted); returns how many.
_COMMIT = """
if ARGV[2] ~= '1' and string.sub(redis.call('HGET', KEYS[1], ARGV[1]) or '', 1, 1) ~= 'c' then return 0 end
local n = 0
for i = 4, #KEYS do
  if redis.call('HGET', KEYS[i], ARGV[i]) == 'r' .. ARGV[1] then
    redis.call('HSET', KEYS[i], ARGV[i], 'w' .. ARGV[1])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[3], 'written', n) end
if ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return n
"""


class ShardFenced(RuntimeError):
    """This worker's shard is no longer its own: its lease ran out and its messages went back."""


class RemoteShards:
    """The publisher of the embed worker's `ShardWriter` when the output is an object store: the
    items' reservations, one uploader thread committing closed shards, and the held batches
    released once their shard is committed."""

    def __init__(
        self, store: Store, state: JobState, *, compression: str, level: int = 6, sweep_every: float = 60
    ):
        self.store = store
        self.state = state
        self.compression = compression
        self.level = level
        self.sweep_every = sweep_every
        self.owner = ""  # the inbox id whose lease keeps the reservations alive: set before writing
        self.ledger = f"{state.prefix}:remote"
        self.error: BaseException | None = None
        self.committed = 0  # shards
        self._reserve = state.r.register_script(_RESERVE)
        self._swap = state.r.register_script(_SWAP)
        self._commit = state.r.register_script(_COMMIT)
        self._registered: set[Path] = set()
        self._keys: dict[Path, list[str]] = {}  # reserved per temp shard
        self._held: dict[Path, list[Any]] = {}  # what waits for each temp shard's commit
        self._released: list[Any] = []
        self._lock = threading.Lock()
        self._todo: queue.Queue[tuple[Path, list[tuple[int, int]]] | None] = queue.Queue()
        self._room = threading.BoundedSemaphore(QUEUED)  # backpressure: held messages stay bounded
        self._thread = threading.Thread(target=self._run, name="embed-upload", daemon=True)
        self._thread.start()

    @property
    def writing_key(self) -> str:
        return f"{self.state.prefix}:writing:{self.owner}"

    # ---- the write thread: reservations ---------------------------------------------------------

    def reserve(self, keys: list[str], temp: Path) -> list[bool]:
        """Reserve the items for the open shard `temp` (registered by the first call); per item
        whether this shard owns it. ShardFenced when the shard is no longer this owner's."""
        if not self.owner:
            raise RuntimeError("RemoteShards.owner is not set")
        token, entry = shard_token(temp), self._open_entry(temp)
        slots = [self.state._slot(k) for k in keys]
        first = "1" if temp not in self._registered else "0"
        args: list[Any] = [token, entry, first, *[f for _, f in slots]]
        out, retried = call_retrying(
            lambda: self._reserve(
                keys=[self.ledger, self.writing_key, self.state.counts_key, *[b for b, _ in slots]], args=args
            )
        )
        if not out[0]:
            raise ShardFenced(
                f"the job state no longer lists {final_path(temp, self.compression).name} as this worker's "
                "(its lease ran out and its messages went back to the queue): stopping"
            )
        self._registered.add(temp)
        claimed = [bool(x) for x in out[1:]]
        if retried:  # an attempt whose answer was lost may have reserved them: read back
            values = retry_on_broker(self.state._values)(keys)
            claimed = [v == RESERVED + token for v in values]
        self._keys.setdefault(temp, []).extend(k for k, ok in zip(keys, claimed, strict=True) if ok)
        return claimed

    def _open_entry(self, temp: Path) -> bytes:
        return f"o{self.owner}|{final_path(temp, self.compression).name}".encode()

    def hold(self, item: Any, temp: Path) -> None:
        """Keep `item` (a batch) until the shard `temp` is committed; then `released` gives it."""
        with self._lock:
            self._held.setdefault(temp, []).append(item)

    def released(self) -> list[Any]:
        """What was held for shards committed since the last call."""
        with self._lock:
            out, self._released = self._released, []
        return out

    # ---- the prepare step: what a reservation is worth ------------------------------------------

    def pending(self, keys: list[str]) -> list[bool]:
        """Per item whether it is still to be written: submitted or downloaded, or reserved for a
        void shard. Orphaned shards met on the way are settled; items of committed ones made written."""
        values = self.state._values(keys)
        tokens = sorted({v[1:] for v in values if v and v[:1] == RESERVED})
        status = dict(zip(tokens, self._states(tokens), strict=True))
        for token, value in status.items():
            if value and value[:1] == b"x":
                value = status[token] = self.settle_orphan(token, value)
            if value and value[:1] == b"c":
                mine = [k for k, v in zip(keys, values, strict=True) if v == RESERVED + token]
                self._finish(token, mine, forget=False)
        return [
            v is not None and (v[:1] in (SUBMITTED, DOWNLOADED) or (v[:1] == RESERVED and not status[v[1:]]))
            for v in values
        ]

    def settle_orphan(self, token: bytes, value: bytes) -> bytes | None:
        """Settle a shard whose owner died while uploading it: abort the upload (it can no longer
        be completed), then committed if its object exists, else void. Returns the new state."""
        _owner, name, records, size, upload_id = value[1:].decode().split("|", 4)
        if upload_id:
            self.store.abort(name, upload_id)
        found = self.store.size(name)
        new = f"c|{name}".encode() if found is not None else b""
        if found is not None:
            self.store.add_to_manifest([{"name": name, "records": int(records), "bytes": found}])
        self._swap(keys=[self.ledger], args=[token, value, new])
        log.info("shard %s of a dead worker: %s", name, "committed" if new else "never committed, void")
        return self._states([token])[0]

    def _states(self, tokens: list[bytes]) -> list[bytes | None]:
        """The ledger's value of each shard token (the client answers bytes)."""
        return cast("list[bytes | None]", self.state.r.hmget(self.ledger, tokens)) if tokens else []

    def _finish(self, token: bytes, keys: list[str], *, forget: bool) -> int:
        slots = [self.state._slot(k) for k in keys]
        second = self.writing_key if forget else self.ledger
        return int(
            self._commit(
                keys=[self.ledger, second, self.state.counts_key, *[b for b, _ in slots]],
                args=[token, "1" if forget else "0", "", *[f for _, f in slots]],
            )
        )

    # ---- the uploader thread ----------------------------------------------------------------------

    def publish(self, temp: Path, spans: list[tuple[int, int]]) -> None:
        """`ShardWriter`'s publisher: queue a closed temp shard for its upload; waits while `QUEUED`
        shards wait already (the store is slower than the model: the pipeline then holds back, and
        the messages held for uncommitted shards stay bounded). Raises the uploader's error."""
        while not self._room.acquire(timeout=1.0):
            if self.error is not None:
                raise self.error
        self._todo.put((temp, spans))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued shard is committed (or the uploader failed); whether it was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._todo.unfinished_tasks and self.error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return self.error is None

    def stop(self) -> None:
        """Stop the uploader after what is queued and one last sweep of uploads."""
        self._todo.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        """Upload what is queued; sweep at start, every `sweep_every` s and at the end."""
        next_sweep = time.monotonic()
        while True:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_every
                if not self._step(self.sweep_uploads):
                    return
            try:
                item = self._todo.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                continue
            if item is None:
                self._step(self.sweep_uploads)
                return
            temp, spans = item
            done = self._step(lambda: self._upload(temp, spans))  # noqa: B023  # called at once
            self._room.release()
            self._todo.task_done()
            if not done:
                return

    def _step(self, fn: Any) -> bool:
        """Run one step of the uploader; an error stops it (and, through `rotate`, the worker)."""
        try:
            fn()
            return True
        except BaseException as e:
            log.error("cannot commit shards to %s: %s", self.store.location, e)
            self.error = e
            return False

    def _upload(self, temp: Path, spans: list[tuple[int, int]]) -> None:
        """Upload a closed shard, seal it before completing, list it, then make its items written
        and release what waited for it."""
        name = final_path(temp, self.compression).name
        token = shard_token(temp)
        if spans:
            source = upload_source(temp, spans, self.compression, self.level)
            size = source.stat().st_size
            with self.store.upload(name) as upload:
                upload_id = upload.begin() or ""
                sealed = f"s{self.owner}|{name}|{len(spans)}|{size}|{upload_id}".encode()
                args = [token, self._open_entry(temp), sealed]
                if not retry_on_broker(self._swap)(keys=[self.ledger], args=args):
                    raise ShardFenced(f"{name}: the job state no longer lists it as this worker's: stopping")
                upload.send(source)
                upload.complete()
            self.store.add_to_manifest([{"name": name, "records": len(spans), "bytes": size}])
            if source != temp:
                source.unlink()
        written = retry_on_broker(self._finish)(token, self._keys.pop(temp, []), forget=True)
        temp.unlink(missing_ok=True)
        self._registered.discard(temp)
        with self._lock:
            self._released += self._held.pop(temp, [])
        if spans:
            self.committed += 1
            log.info("committed %s (%d records)", self.store.url(name), written)

    def sweep_uploads(self) -> int:
        """Abort the shard uploads nobody will complete: of void shards (their owner died before
        sealing) and of orphaned ones (settled here). Returns how many were aborted."""
        shards = [(n, u) for n, u in self.store.incomplete_uploads() if n.startswith(SHARD_PREFIX)]
        if not shards:
            return 0
        tokens = [shard_token(Path(n)) for n, _ in shards]
        values = self._states(tokens)
        aborted = 0
        for (name, upload_id), token, value in zip(shards, tokens, values, strict=True):
            if value and value[:1] in (b"o", b"s"):
                continue  # a live owner's (a dead one's is voided or orphaned by the inbox sweep first)
            self.store.abort(name, upload_id)
            if value and value[:1] == b"x":
                self.settle_orphan(token, value)
            aborted += 1
        if aborted:
            log.info("aborted %d shard uploads left by stopped workers", aborted)
        return aborted
