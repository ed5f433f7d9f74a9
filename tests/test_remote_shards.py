"""The embed worker's object-store shards (`workers/remote.py`) against a real S3 server and a real Redis:
a reservation lives exactly as long as the message it came from is held; an upload its owner left
sealed is settled by its object (committed or void); and a real worker SIGKILLed at each step of a
shard's life (from the append to the commit) loses nothing and duplicates nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.messages import EMBED_QUEUE
from common.output import records
from common.output.storage import Store, Upload
from common.state.job import JobState
from testkit import ROOT
from testkit.fleet import Workers, wait_for
from testkit.s3 import S3Server
from testkit.servers import worker_env
from testkit.stage import payload, register, zero_record
from tests.test_embed_pipeline import null_env, queue
from tests.test_object_store import committed, keys_of, use_endpoint
from workers.inbox import Inbox
from workers.remote import RemoteShards, ShardFenced


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    use_endpoint(monkeypatch, s3)
    return s3


def writer_of(state: JobState, rclient, store: Store) -> tuple[RemoteShards, Inbox]:
    """A RemoteShards whose owner is a live consumer of the embed queue."""
    inbox = Inbox(rclient, state.prefix, 60)
    inbox.renew()
    shards = RemoteShards(store, state, compression="none")
    shards.owner = inbox.id
    return shards, inbox


def lose(rclient, inbox: Inbox, survivor: Inbox) -> None:
    """The consumer's lease ends (its process died); another consumer's sweep notices."""
    rclient.delete(f"{inbox.prefix}:consumer:{inbox.id}")
    survivor.sweep()


def temp_shard(folder: Path, node: str, payloads: list[dict]) -> tuple[Path, list[tuple[int, int]]]:
    folder.mkdir(exist_ok=True)
    temp = folder / f".lab_images_{node}_00000.tfrecord.tmp"
    temp.write_bytes(b"".join(records.frame_record(zero_record(p)) for p in payloads))
    spans, _ = records.scan_records(temp)
    return temp, spans


def test_a_reservation_lives_as_long_as_its_message_is_held(aws, rclient, tmp_path):
    state = JobState(rclient)
    items = [payload(i) for i in range(4)]
    register(state, items)
    keys = [p["key"] for p in items]
    store = Store("s3://koala/run")
    (a, inbox_a), (b, inbox_b) = writer_of(state, rclient, store), writer_of(state, rclient, store)
    temp_a, temp_b = (
        tmp_path / ".lab_images_a_00000.tfrecord.tmp",
        tmp_path / ".lab_images_b_00000.tfrecord.tmp",
    )
    try:
        assert a.reserve(keys[:2], temp_a) == [True, True]
        assert b.reserve(keys[1:3], temp_b) == [False, True]  # a live reservation wins
        assert b.pending(keys) == [False, False, False, True]
        assert state.counts()["written"] == 0 and state.counts()["pending"] == 4  # nothing durable yet
        lose(rclient, inbox_a, inbox_b)  # a's messages go back, and its open shard is void with them
        assert b.pending(keys) == [True, True, False, True]
        assert b.reserve(keys[:2], temp_b) == [True, True]
        with pytest.raises(ShardFenced):  # a, alive after all, finds its shard gone: it stops
            a.reserve(keys[3:], temp_a)
    finally:
        a.stop()
        b.stop()


class Died(BaseException):
    """Stands for a SIGKILL at this point: no cleanup runs (the upload is not aborted)."""


@pytest.mark.parametrize("after", ["sent", "completed"])
def test_an_upload_left_sealed_is_settled_by_its_object(after, aws, rclient, tmp_path, monkeypatch):
    state = JobState(rclient)
    items = [payload(i) for i in range(3)]
    register(state, items)
    keys = [p["key"] for p in items]
    store = Store("s3://koala/run")
    (a, inbox_a), (b, inbox_b) = writer_of(state, rclient, store), writer_of(state, rclient, store)
    temp, spans = temp_shard(tmp_path / "a", "a", items)
    try:
        assert a.reserve(keys, temp) == [True] * 3

        def die(*args, **kwargs):
            raise Died

        monkeypatch.setattr(Upload, "__exit__", lambda *args: None)  # a kill runs no cleanup
        if after == "sent":
            monkeypatch.setattr(Upload, "complete", die)
        else:
            monkeypatch.setattr(Store, "add_to_manifest", die)
        with pytest.raises(Died):
            a._upload(temp, spans)
        monkeypatch.undo()
        assert (aws.incomplete_uploads("koala") != []) == (after == "sent")
        lose(rclient, inbox_a, inbox_b)  # the sweep orphans the sealed shard
        pending = b.pending(keys)  # meeting its items again settles it
        assert aws.incomplete_uploads("koala") == []
        if after == "sent":  # never completed: void, to be written again
            assert pending == [True] * 3 and state.counts()["written"] == 0
            assert aws.objects("koala", "run/") == {}
        else:  # completed: committed, listed, its items written
            assert pending == [False] * 3 and state.counts()["written"] == 3
            assert keys_of(committed(aws, "run/")) == sorted(keys)
    finally:
        a.stop()
        b.stop()


# ---- a real worker killed at each step ------------------------------------------------------------

N = 24
POINTS = ["appended", "claimed", "begun", "sent", "completed", "listed", "committed"]


@pytest.mark.timing
@pytest.mark.parametrize("point", POINTS)
def test_a_worker_killed_at_any_step_of_a_shard_loses_nothing(
    point, s3, redis_url, rclient, workers: Workers, tmp_path
):
    state = JobState(rclient)
    images = [payload(i) for i in range(N)]
    queue(redis_url, state, images, per_message=4)
    out = {**s3.env(), "KOALA_OUTPUT_DIR": "s3://koala/run", "KOALA_SHARD_IDLE_COMMIT": "1"}
    env = null_env(KOALA_BATCH_SIZE="4", KOALA_EXAMPLES_PER_SHARD="6", **out)
    log = open(tmp_path / "dying.log", "wb")  # closed below
    scratch = tmp_path / "machine-a"
    dying = subprocess.run(
        [sys.executable, "-m", "testkit.dying_embed_worker", point, "embed-a@test"],
        cwd=ROOT,
        env=worker_env(redis_url, workers.out_dir, **env, KOALA_SCRATCH_DIR=str(scratch)),
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    log.close()
    assert dying.returncode == -signal.SIGKILL, (tmp_path / "dying.log").read_text()
    written = state.counts()["written"]
    # only a committed shard counts: 6 records per shard, plus less than one batch of 4
    assert (6 <= written < 10) if point == "committed" else written == 0, written
    if scratch.exists():  # the machine is lost with its disk
        subprocess.run(["rm", "-rf", str(scratch)], check=True)
    proc = workers.start("embed", **env, KOALA_SCRATCH_DIR=str(tmp_path / "machine-b"))

    def done() -> bool:
        queued = sum(state.queue_depths([EMBED_QUEUE]).values())  # waiting + unacked
        return state.counts()["written"] == N and not queued

    wait_for(done, 120, f"{N} records and every message acked", workers.logs)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, workers.logs()
    assert keys_of(committed(s3, "run/")) == sorted(p["key"] for p in images)  # each once, each whole
    assert s3.incomplete_uploads("koala") == [], "the survivor aborted what the dead worker began"
    assert rclient.hgetall("koala:remote") == {} or all(
        v.startswith(b"c") for v in rclient.hgetall("koala:remote").values()
    )
