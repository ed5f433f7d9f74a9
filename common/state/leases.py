"""Leases on unacknowledged messages: a live worker keeps what it holds, a dead one's comes back soon.

kombu's Redis transport files every delivered message in the `unacked_index` sorted set, scored
(with `common.celery_app.DeadlineClock`) by its holder's deadline, and gives it back to its queue
once that deadline has passed. A worker pushes the deadlines of the messages it still holds every
few seconds, so the timeout can be short (a SIGKILLed worker's messages return within about a
minute) however long a message's work takes. Renewing with ZADD XX never brings back a message
acked meanwhile. (The embed queue has leases of its own: `workers/inbox.py`.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

log = logging.getLogger("koala.leases")

UNACKED_INDEX = "unacked_index"  # kombu's default `unacked_index_key` (no global key prefix here)


def renew_every(visibility_timeout: float) -> float:
    """Seconds between renewals: a quarter of the timeout, so three may fail before it expires."""
    return max(0.5, min(15.0, visibility_timeout / 4))


def held_by(channel) -> Callable[[], list[str]]:
    """The delivery tags a kombu channel holds unacked (acked ones may linger: ZADD XX skips them)."""

    def held() -> list[str]:
        try:
            return list(channel.qos._delivered)
        except RuntimeError:  # changed during the copy: the next renewal gets it
            return []

    return held


def keep_leases(app, channel) -> LeaseKeeper:
    """Start renewing the messages a Celery app's kombu `channel` holds; `.stop()` when it closes."""
    from common.state.job import connect

    timeout = app.conf.broker_transport_options.get("visibility_timeout", 3600)
    keeper = LeaseKeeper(
        connect(app.conf.broker_url),
        held_by(channel),
        renew_every(timeout),
        getattr(channel, "unacked_index_key", UNACKED_INDEX),
        lease=timeout,
    )
    keeper.start()
    return keeper


class LeaseKeeper(threading.Thread):
    """A daemon thread renewing the leases of the messages `held()` returns, until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        held: Callable[[], Iterable[str]],
        every: float,
        index_key: str = UNACKED_INDEX,
        lease: float = 0.0,
    ):
        super().__init__(name="lease-keeper", daemon=True)
        self.lease = lease
        self.client = client
        self.held = held
        self.every = every
        self.index_key = index_key
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.every):
                try:
                    self.renew()
                except redis.RedisError as e:  # the broker is away: the next round tries again
                    log.warning("cannot renew message leases: %s", e)
        finally:
            self.client.close()  # one keeper per consumer connection: a reconnect starts another

    def renew(self) -> int:
        """Push the held messages' deadlines to now + lease; how many were held."""
        tags = list(self.held())
        if tags:
            deadline = time.time() + self.lease
            self.client.zadd(self.index_key, dict.fromkeys(tags, deadline), xx=True)
        return len(tags)

    def stop(self) -> None:
        self.stopped.set()
