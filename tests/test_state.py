"""Job state against a real Redis: dedupe, one-way transitions, exact counters, failures."""

from __future__ import annotations

import hashlib

import pytest

from common.state.failures import Failure
from common.state.job import JobState


def key(i: int) -> str:
    return hashlib.md5(f"http://example.test/{i}.jpg".encode()).hexdigest()


@pytest.fixture
def state(rclient) -> JobState:
    return JobState(rclient, "koala", failures_kept=1000)


def test_register_counts_new_and_duplicates(state: JobState):
    run = state.new_run()
    assert state.register([key(1), key(2), key(1)], run) == [0, 0, 2]
    c = state.counts()
    assert (c["submitted"], c["duplicates"], c["pending"]) == (2, 1, 2)


def test_requeue_sends_again_what_an_earlier_run_left_pending(state: JobState):
    first = state.new_run()
    state.register([key(1), key(2), key(3)], first)
    state.mark_downloaded_many([key(2)])[0]
    state.mark_failed(Failure(key(3), "http_error", "HTTP 404", url="u3"))
    second = state.new_run()
    assert second != first
    assert state.register([key(1), key(2), key(3)], second) == [2, 2, 2]  # default: no requeue
    third = state.new_run()
    assert state.register([key(1), key(2), key(3)], third, requeue=True) == [1, 1, 2]
    # within that run, a repeat is just a duplicate
    assert state.register([key(1), key(2)], third, requeue=True) == [2, 2]
    c = state.counts()
    assert (c["submitted"], c["requeued"], c["downloaded"], c["failed"]) == (3, 2, 1, 1)


def test_journaled_chunk_is_orphaned_only_when_its_producer_is_gone(state: JobState, rclient):
    run = state.new_run()
    state.register([key(1)], run, journal=("p1", "1", b"chunk-1"))
    state.register([key(2)], run, journal=("p1", "2", b"chunk-2"))
    state.unjournal("p1", "2")
    assert state.orphaned_chunks() == []  # p1 is alive
    rclient.delete("koala:producer:p1")  # what 60 s without a heartbeat does
    assert state.orphaned_chunks() == [("p1:1", b"chunk-1")]
    state.drop_orphan("p1:1")
    assert state.orphaned_chunks() == []


def test_transitions_are_one_way_and_counted_once(state: JobState):
    run = state.new_run()
    state.register([key(1), key(2)], run)
    assert state.mark_downloaded_many([key(1)])[0] is True
    assert state.mark_downloaded_many([key(1)])[0] is False
    assert state.mark_written_many([key(1)], b"")[0] is True
    assert state.mark_written_many([key(1)], b"")[0] is False
    failure = Failure(key(1), "timeout", "late", url="u1")
    assert state.mark_failed(failure) is False  # written is final
    # written straight from submitted (the embed stage overtook the download ack) counts both
    assert state.mark_written_many([key(2)], b"")[0] is True
    assert state.mark_downloaded_many([key(2)])[0] is False
    c = state.counts()
    assert (c["downloaded"], c["written"], c["failed"], c["pending"]) == (2, 2, 0, 0)
    assert state.mark_downloaded_many([key(99)])[0] is False  # unknown keys are never invented


def test_failures_are_kept_with_reason_and_detail(state: JobState):
    run = state.new_run()
    state.register([key(i) for i in range(5)], run)
    for i in range(5):
        reason = "http_error" if i % 2 else "timeout"
        assert state.mark_failed(Failure(key(i), reason, f"detail {i}", url=f"http://x/{i}"))
        assert not state.mark_failed(Failure(key(i), reason, "again", url=f"http://x/{i}"))
    assert state.failures_by_reason() == {"http_error": 2, "timeout": 3}
    items = state.failures()
    assert [f["key"] for f in items] == [key(i) for i in range(5)]
    assert items[1]["url"] == "http://x/1" and items[1]["detail"] == "detail 1"
    assert [f["key"] for f in state.failures(reason="http_error")] == [key(1), key(3)]
    assert len(state.failures(limit=2)) == 2


def test_unknown_reason_is_refused(state: JobState):
    with pytest.raises(ValueError, match="unknown failure reason"):
        state.mark_failed(Failure(key(1), "gremlins", "?"))


def test_reset_forgets_the_job(state: JobState):
    state.register([key(1)], state.new_run())
    assert state.reset() > 0
    assert state.counts()["submitted"] == 0 and state.states([key(1)]) == [None]
