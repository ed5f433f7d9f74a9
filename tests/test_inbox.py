"""The embed queue's receiving end (workers/inbox.py) against a real Redis: a held message is in a
list at every instant, the holder's lease decides when it is free, starts are counted."""

from __future__ import annotations

import time

from common.celery_app import make_app
from common.messages import EMBED_QUEUE, EMBED_TASK
from common.settings import Settings
from testkit.stage import payload
from workers.inbox import Inbox


def send(redis_url: str, n: int) -> None:
    app = make_app(Settings(broker_url=redis_url))
    for i in range(n):
        app.send_task(EMBED_TASK, args=[[payload(i)]], queue=EMBED_QUEUE)
    app.close()


def test_the_holders_lease_not_the_sweepers_decides_when_a_message_is_free(redis_url, rclient):
    send(redis_url, 1)
    holder, sweeper = Inbox(rclient, "koala", lease=30), Inbox(rclient, "koala", lease=1)
    holder.open()
    sweeper.open()
    try:
        delivery = holder.receive(timeout=1)
        assert delivery is not None and delivery.starts == 1
        assert rclient.llen(EMBED_QUEUE) == 0 and rclient.llen(holder.held_key) == 1
        time.sleep(1.5)  # longer than the sweeper's own lease: irrelevant, the holder's is alive
        assert sweeper.sweep() == 0 and rclient.llen(holder.held_key) == 1
        rclient.delete(f"koala:consumer:{holder.id}")  # the holder's lease ends (as on its death)
        assert sweeper.sweep() == 1 and rclient.llen(EMBED_QUEUE) == 1
        again = sweeper.receive(timeout=1)
        assert again is not None and again.message_id == delivery.message_id and again.starts == 2
        sweeper.ack(again)
        assert not rclient.hlen("koala:deliveries") and rclient.llen(sweeper.held_key) == 0
    finally:
        sweeper.close()
        holder._stopped.set()


def test_closing_gives_unstarted_messages_back_uncounted(redis_url, rclient):
    send(redis_url, 2)
    inbox = Inbox(rclient, "koala", lease=30)
    inbox.open()
    first, second = inbox.receive(timeout=1), inbox.receive(timeout=1)
    assert first is not None and second is not None
    assert inbox.give_back([second]) == 1
    inbox.close()  # the first, started, goes back too, still counted as started once
    assert rclient.llen(EMBED_QUEUE) == 2
    assert {k.decode(): int(v) for k, v in rclient.hgetall("koala:deliveries").items()} == {
        first.message_id: 1
    }
