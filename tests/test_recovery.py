"""Recovery paths the chaos runner found, one function at a time: a disk that refuses writes, a
Redis answer lost after the write was made, a stalled job."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import redis

from common.output import records, shards
from common.settings import Settings
from common.state.job import JobState
from common.state.retries import is_storage_error
from producer.progress import Stall
from producer.submit import Submitter
from testkit.stage import names_in, payload, register, stage
from workers.embed import Batch
from workers.pipeline import Pipeline

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_storage_errors_are_told_apart_from_bugs():
    assert is_storage_error(ENOSPC) and is_storage_error(OSError(errno.EROFS, "Read-only file system"))
    assert not is_storage_error(OSError(errno.EBADF, "bad fd")) and not is_storage_error(ValueError())


def test_a_shard_the_disk_refused_to_publish_is_published_later(tmp_path, monkeypatch):
    real = shards.finalize_temp
    calls = []

    def refuse_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ENOSPC
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "finalize_temp", refuse_once)
    writer = shards.ShardWriter(tmp_path, "n", examples_per_shard=2)
    writer.append([b"a", b"b"])
    with pytest.raises(OSError):
        writer.maybe_rotate()
    # closed and whole on disk, under its temporary name only: a reader sees no shard yet
    [temp] = tmp_path.glob(".*.tmp")
    assert [data for _, _, data in records.iter_examples(temp)] == [b"a", b"b"]
    assert not list(tmp_path.glob(shards.SHARD_GLOB))
    writer.append([b"c"])  # publishes the first, then writes into a new shard
    assert [p.name for p in tmp_path.glob(shards.SHARD_GLOB)] == [shards.final_path(temp, "none").name]
    writer.close()
    finals = sorted(tmp_path.glob(shards.SHARD_GLOB))
    assert [[data for _, _, data in records.iter_examples(s)] for s in finals] == [[b"a", b"b"], [b"c"]]
    assert not list(tmp_path.glob(".*.tmp"))


def refusing(append, refusals: int, error: OSError = ENOSPC):
    """`append` that raises `error` the first `refusals` times."""
    calls = []

    def refuse(records_: list[bytes]):
        calls.append(1)
        if len(calls) <= refusals:
            raise error
        return append(records_)

    return refuse


def test_the_pipeline_holds_a_batch_while_the_disk_refuses(tmp_path, rclient, monkeypatch, caplog):
    state = JobState(rclient)
    batch = [payload(i) for i in range(2)]
    register(state, batch)
    s = stage(tmp_path, state, "a")
    monkeypatch.setattr(s.writer, "append", refusing(s.writer.append, 1))
    pipeline = Pipeline(s, threading.Event())
    pipeline.submit(Batch(batch, messages=["m1", "m2"]))
    assert pipeline.finished(timeout=0.5) == []  # refused: held, nothing to ack
    assert "No space left on device" in caplog.text and "not acknowledging 2 messages" in caplog.text
    done = pipeline.finished(timeout=10)  # tried again after 1 s
    assert [(b.messages, b.written) for b in done] == [(["m1", "m2"], 2)] and pipeline.in_flight == 0
    pipeline.close()
    s.close()
    assert names_in(tmp_path) == sorted(p["key"] for p in batch)


def test_stopping_while_the_disk_refuses_lets_the_batch_go_unwritten(tmp_path, rclient, monkeypatch):
    state = JobState(rclient)
    batch = [payload(0)]
    register(state, batch)
    s = stage(tmp_path, state, "a")
    monkeypatch.setattr(s.writer, "append", refusing(s.writer.append, 99, OSError(errno.EROFS, "read-only")))
    stopping = threading.Event()
    stopping.set()
    pipeline = Pipeline(s, stopping)
    pipeline.submit(Batch(batch, messages=["m"]))
    pipeline.close(timeout=10)
    assert pipeline.finished() == [] and [b.messages for b in pipeline.let_go()] == [["m"]]
    assert pipeline.in_flight == 0 and state.counts()["written"] == 0


def test_a_claim_whose_answer_was_lost_keeps_its_records(tmp_path: Path, rclient, monkeypatch):
    state = JobState(rclient)
    batch = [payload(i) for i in range(3)]
    register(state, batch)
    s = stage(tmp_path, state, "a")
    real = state.mark_written_many
    lost = threading.Event()

    def claim_then_lose_the_answer(keys, shard):
        result = real(keys, shard)
        if not lost.is_set():
            lost.set()
            raise redis.ConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(state, "mark_written_many", claim_then_lose_the_answer)
    assert s.process(batch) == 3
    s.close()
    assert names_in(tmp_path) == sorted(p["key"] for p in batch)
    assert state.counts()["written"] == 3


class SentTasks:
    """Stands in for the Celery app: records what the producer sends."""

    def __init__(self) -> None:
        self.sent: list[list[dict]] = []

    def send_task(self, name: str, args: list, queue: str, **_reprs: str) -> None:
        self.sent.append(args[0])


def test_a_registration_whose_answer_was_lost_still_sends_the_chunk(rclient, monkeypatch):
    state = JobState(rclient)
    app = SentTasks()
    submitter = Submitter(app, state, Settings(chunk_size=2), node="p")
    real = state.register
    calls = []

    def register_then_lose_the_answer(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(state, "register", register_then_lose_the_answer)
    submitter._send_chunk([{"k": "0" * 32, "u": "http://x/0"}, {"k": "1" * 32, "u": "http://x/1"}])
    assert [[i["k"] for i in chunk] for chunk in app.sent] == [["0" * 32, "1" * 32]]
    assert state.counts()["submitted"] == 2 and state.orphaned_chunks() == []


def snap(written: int, queued: int = 0) -> dict:
    return {
        "submitted": 5,
        "downloaded": written,
        "written": written,
        "failed": 0,
        "queues": {"download": queued, "embed": 0, "unacked": 0},
    }


def test_stall_needs_no_progress_and_nothing_queued_for_the_whole_wait(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("producer.progress.time.monotonic", lambda: clock[0])
    stall = Stall(10)
    assert not stall.stalled(snap(1))
    clock[0] = 9
    assert not stall.stalled(snap(1))
    clock[0] = 11
    assert not stall.stalled(snap(1, queued=1))  # a message in a queue: not lost
    clock[0] = 20
    assert not stall.stalled(snap(1))
    clock[0] = 22
    assert stall.stalled(snap(1))  # 11 s with the same counts and nothing queued
    assert not stall.stalled(snap(1))  # once per period
    clock[0] = 40
    assert not stall.stalled(snap(2))  # progress resets it


def test_a_lost_broker_connection_is_logged_in_one_line():
    import logging

    from common.celery_app import BrokerLossInOneLine

    try:
        raise redis.ConnectionError("Connection closed by server.")
    except redis.ConnectionError:
        import sys

        record = logging.LogRecord(
            "celery.worker.consumer.consumer",
            logging.WARNING,
            __file__,
            1,
            "consumer: Connection to broker lost. Trying to re-establish the connection...",
            None,
            sys.exc_info(),
        )
    assert BrokerLossInOneLine().filter(record)
    assert record.exc_info is None and "ConnectionError: Connection closed by server." in record.getMessage()
