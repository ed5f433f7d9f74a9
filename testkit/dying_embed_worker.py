"""`python -m testkit.dying_embed_worker POINT NAME [CALLS]`: a real null-model embed worker that SIGKILLs
itself at POINT of its second batch (each batch written on its own): after `received` (popped, nothing
else done), `prepared`, `inferred`, `appended` (records fsynced, not claimed) or `claimed` (claimed, not
acked). With an object-store output, also at the steps of a shard's upload (`workers/remote.py`), by
default of its first shard: `begun` (upload id, not sealed), `sent` (sealed, every part sent, not
completed), `completed` (the object exists, not in the manifest), `listed` (in the manifest, items
still reserved), `committed` (items written, messages not acked). Test code only: the worker itself
has no such hook."""

from __future__ import annotations

import os
import signal
import sys

from common.output import storage
from common.output.shards import ShardWriter
from workers import embed, embed_worker, inbox, pipeline, remote


def die_after(owner: object, attr: str, calls: int) -> None:
    """Replace owner.attr by a wrapper that kills this process after its `calls`-th return (for
    `receive`, the `calls`-th that received something)."""
    original = getattr(owner, attr)
    seen = [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        seen[0] += attr != "receive" or result is not None
        if seen[0] == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, wrapper)


POINTS = {
    "received": (inbox.Inbox, "receive"),  # popped from the queue, nothing else done with it
    "prepared": (embed.EmbedStage, "prepare"),
    "inferred": (embed.EmbedStage, "infer"),
    "appended": (ShardWriter, "append"),
    "claimed": (embed.EmbedStage, "write"),
    "begun": (storage.Upload, "begin"),
    "sent": (storage.Upload, "send"),
    "completed": (storage.Upload, "complete"),
    "listed": (storage.Store, "add_to_manifest"),
    "committed": (remote.RemoteShards, "_finish"),
}
UPLOAD_POINTS = ("begun", "sent", "completed", "listed", "committed")

if __name__ == "__main__":
    point, name = sys.argv[1], sys.argv[2]
    # one batch per write: the writer groups the batches waiting for it, so on a fast machine the
    # second write could otherwise never come (every batch in the first)
    pipeline.MAX_GROUP = 1
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 1 if point in UPLOAD_POINTS else 2
    die_after(*POINTS[point], calls=calls)
    embed_worker.run_embed_worker(name)
