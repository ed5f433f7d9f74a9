"""The embed stage's steps on three threads, so that they overlap: while the model runs a batch,
the next one is being decoded and the previous one written.

    submit ─► prepare (state, decode, CPU Lab) ─► infer (model) ─► write (append + fsync, claim) ─► done

Bounded: at most `max_in_flight` batches between `submit` and `done`. The writer groups the batches
waiting for it into one append (one fsync) and one claim. Batches come out of `done` in order,
written; the caller acks their messages then. Once `stopping` is set, batches not yet started by a
step come out of `abandoned` instead: the caller leaves their messages unacked (kombu gives them
back when the connection closes). A step that raises stops the pipeline: `error` holds the
exception and nothing more is written (the caller stops; unacked messages come back).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from common.state.retries import is_storage_error
from workers.embed import Batch, EmbedStage

log = logging.getLogger("koala.embed")

_STOP = object()
MAX_GROUP = 8  # batches written with one fsync at most


class Pipeline:
    """prepare → infer → write on their own threads with queues between them."""

    def __init__(
        self, stage: EmbedStage, stopping: threading.Event, *, max_in_flight: int = 4, idle_every: float = 1.0
    ):
        self.stage = stage
        self.stopping = stopping
        self.max_in_flight = max_in_flight
        self.idle_every = idle_every
        self.error: BaseException | None = None
        self.done: queue.Queue[Batch] = queue.Queue()
        self.abandoned: queue.Queue[Batch] = queue.Queue()  # let go unwritten while stopping
        self._in_flight = 0
        self._lock = threading.Lock()
        self._to_prepare: queue.Queue = queue.Queue()
        self._to_infer: queue.Queue = queue.Queue()
        self._to_write: queue.Queue = queue.Queue()
        self.disk_delay = 0.0  # current backoff while the output disk refuses writes
        self._threads = [
            threading.Thread(
                target=self._step,
                args=(stage.prepare, self._to_prepare, self._to_infer),
                name="embed-prepare",
                daemon=True,
            ),
            threading.Thread(
                target=self._step,
                args=(stage.infer, self._to_infer, self._to_write),
                name="embed-infer",
                daemon=True,
            ),
            threading.Thread(target=self._write_loop, name="embed-write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def in_flight(self) -> int:
        """Batches submitted and not yet out of `done` or `abandoned`."""
        return self._in_flight

    def has_room(self) -> bool:
        return self._in_flight < self.max_in_flight and self.error is None

    def submit(self, batch: Batch) -> None:
        """Start a batch through the steps."""
        with self._lock:
            self._in_flight += 1
        self._to_prepare.put(batch)

    def finished(self, timeout: float = 0.0) -> list[Batch]:
        """The batches written since the last call (waiting up to `timeout` for the first)."""
        out: list[Batch] = []
        try:
            out.append(self.done.get(timeout=timeout) if timeout > 0 else self.done.get_nowait())
            while True:
                out.append(self.done.get_nowait())
        except queue.Empty:
            pass
        self._release(len(out))
        return out

    def let_go(self) -> list[Batch]:
        """Batches abandoned unwritten (their messages are to be left unacked)."""
        out: list[Batch] = []
        while not self.abandoned.empty():
            out.append(self.abandoned.get_nowait())
        self._release(len(out))
        return out

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n

    def close(self, timeout: float | None = None) -> None:
        """Let the submitted batches finish, then stop the threads."""
        self._to_prepare.put(_STOP)
        for t in self._threads:
            t.join(timeout)

    def _step(self, fn: Callable[[Batch], None], inbox: queue.Queue, outbox: queue.Queue) -> None:
        """Run `fn` on each batch of `inbox` and pass it on; after an error, pass nothing on. Once
        stopping, batches not started are let go unwritten (a stop waits for one model call at most)."""
        while True:
            batch = inbox.get()
            if batch is _STOP or self.error is not None:
                outbox.put(_STOP)
                return
            if self.stopping.is_set():
                self.abandoned.put(batch)
                continue
            try:
                fn(batch)
            except BaseException as e:
                self._failed(e)
                outbox.put(_STOP)
                return
            outbox.put(batch)

    def _write_loop(self) -> None:
        """Write the batches as they come, several at once when several wait; rotate when idle."""
        stop = False
        while not stop:
            try:
                first = self._to_write.get(timeout=self.idle_every)
            except queue.Empty:
                first = None
            if first is _STOP:
                return
            group = [] if first is None else [first]
            while first is not None and len(group) < MAX_GROUP:
                try:
                    more = self._to_write.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            try:
                if group:
                    self._write(group)
                self.stage.rotate()
            except BaseException as e:
                self._failed(e)
                return

    def _write(self, group: list[Batch]) -> None:
        """Write a group, waiting (doubling up to 30 s) while the output disk refuses it; when
        stopping meanwhile, the group is abandoned unwritten."""
        while True:
            try:
                self.stage.write(group)
                self.disk_delay = 0.0
                for batch in group:
                    self.done.put(batch)
                return
            except OSError as e:
                if not is_storage_error(e):
                    raise
                held = sum(len(b.messages) for b in group)
                self.disk_delay = min(max(1.0, self.disk_delay * 2), 30.0)
                if self.stopping.is_set():
                    log.warning(
                        "output disk refuses writes (%s); stopping with %d messages unacknowledged",
                        one_line(e),
                        held,
                    )
                    for batch in group:
                        self.abandoned.put(batch)
                    return
                log.warning(
                    "output disk refuses writes (%s); not acknowledging %d messages, retrying in %.0fs",
                    one_line(e),
                    held,
                    self.disk_delay,
                )
                self.stopping.wait(self.disk_delay)

    def _failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


def one_line(error: BaseException) -> str:
    """An exception as one short line for the log."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]
