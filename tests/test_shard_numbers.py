"""Shard numbers come from the job state, not only from the folder listing: shards moved out of the
output folder (to free space) never have their names, nor their shard tokens, used again."""

from __future__ import annotations

import signal
from pathlib import Path

from common.celery_app import make_app
from common.messages import EMBED_QUEUE, EMBED_TASK
from common.output.shards import SHARD_GLOB, ShardWriter, highest_number
from common.settings import Settings
from common.state.job import JobState
from testkit.fleet import Workers, embed_env, wait_for
from testkit.stage import payload
from workers.embed import shard_token


def test_next_shard_number_is_per_node_never_repeats_and_respects_the_folder(rclient):
    state = JobState(rclient)
    assert [state.next_shard_number("a") for _ in range(3)] == [0, 1, 2]
    assert state.next_shard_number("b") == 0  # per node
    assert state.next_shard_number("a", lowest=10) == 10  # the folder has higher ones
    assert state.next_shard_number("a", lowest=0) == 11  # never below what was handed out
    assert JobState(rclient, prefix="other").next_shard_number("a") == 0  # per job


def test_a_writer_with_durable_numbers_never_reuses_a_moved_shard_s_name(tmp_path: Path, rclient):
    state = JobState(rclient)
    out, moved = tmp_path / "out", tmp_path / "moved"
    moved.mkdir()
    names: list[str] = []
    for _ in range(3):  # write, move the shards away, restart
        with ShardWriter(
            out, "n", examples_per_shard=1, reserve_number=lambda lo: state.next_shard_number("n", lo)
        ) as w:
            w.append([b"a"])
            w.append([b"b"])
        for shard in sorted(out.glob(SHARD_GLOB)):
            names.append(shard.name)
            shard.rename(moved / shard.name)
    assert names == [f"lab_images_n_{i:05d}.tfrecord" for i in range(6)]
    # the folder still wins when it holds higher numbers (shards copied in from elsewhere)
    (out / "lab_images_n_00041.tfrecord").write_bytes(b"")
    with ShardWriter(out, "n", reserve_number=lambda lo: state.next_shard_number("n", lo)) as w:
        assert w.append([b"c"])[0].name == ".lab_images_n_00042.tfrecord.tmp"
    assert highest_number(out, "n") == 42


def queue(redis_url: str, state: JobState, images: list[dict]) -> None:
    """Register the images as downloaded and queue them in one message, as a download worker does."""
    keys = [p["key"] for p in images]
    state.register(keys, state.new_run())
    state.mark_downloaded_many(keys)
    app = make_app(Settings(broker_url=redis_url))
    app.send_task(EMBED_TASK, args=[images], queue=EMBED_QUEUE)
    app.close()


def test_a_restarted_worker_numbers_after_shards_that_were_moved_away(
    workers: Workers, redis_url, rclient, tmp_path
):
    state = JobState(rclient)
    moved = tmp_path / "moved"
    moved.mkdir()
    images = [payload(i) for i in range(8)]
    tokens = []
    for part in (images[:4], images[4:]):
        queue(redis_url, state, part)
        proc = workers.start("embed", "-n", "embed-a@test", **embed_env(None))
        written = state.counts()["written"] + len(part)
        wait_for(lambda w=written: state.counts()["written"] == w, 90, f"{written} records", workers.logs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, workers.logs()
        for shard in workers.out_dir.glob(SHARD_GLOB):  # the user frees space
            shard.rename(moved / shard.name)
        tokens.append(set(state.written_to([p["key"] for p in part])))
    names = sorted(p.name for p in moved.iterdir())  # a reused name would have replaced its namesake
    assert names == [f"lab_images_embed-a-test_{i:05d}.tfrecord" for i in range(2)], names
    assert not tokens[0] & tokens[1]  # no shard token names two files
    assert {shard_token(moved / n) for n in names} == tokens[0] | tokens[1]
