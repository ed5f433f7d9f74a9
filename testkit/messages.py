"""Queue entries no worker may act on: a pickled task, entries that are not kombu messages, an
envelope whose body is not base64."""

from __future__ import annotations

import json
from pathlib import Path


class Booby:
    """Unpickling this makes a directory: the proof that pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def push_pickle_message(redis_url: str, task: str, queue: str, marker: Path) -> None:
    """Publish a Celery task message serialized with pickle straight into a queue."""
    from celery import Celery

    sender = Celery("attacker", broker=redis_url)
    sender.conf.task_serializer = "pickle"
    sender.send_task(task, args=[Booby(marker)], queue=queue, serializer="pickle")


NOT_KOMBU = ["not json", '{"a": 1}', "42", '{"properties": {"delivery_tag": 1}}']


def bad_base64_envelope(queue_name: str) -> str:
    """A well-formed kombu envelope whose base64 body is not base64."""
    return json.dumps(
        {
            "body": "!!!not base64",
            "content-encoding": "binary",
            "content-type": "application/x-msgpack",
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": "bad-1",
                "priority": 0,
                "delivery_info": {"exchange": queue_name, "routing_key": queue_name},
            },
        }
    )
