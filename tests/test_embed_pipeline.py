"""The pipelined embed worker as a real process (null model: no TensorFlow, so it is fast): chunk
and one-image messages, exactly once when killed between any two steps, the null-model switch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.celery_app import make_app
from common.messages import EMBED_QUEUE, EMBED_TASK
from common.output import records
from common.output.shards import SHARD_GLOB
from common.settings import Settings
from common.state.job import JobState
from testkit import ROOT
from testkit.fleet import Workers, wait_for
from testkit.messages import NOT_KOMBU, bad_base64_envelope
from testkit.servers import worker_env
from testkit.stage import payload

N = 48


def queue(redis_url: str, state: JobState, images: list[dict], per_message: int) -> None:
    """Register the images as downloaded and queue them as download workers do (per_message=0: the
    one-image format of before chunks)."""
    keys = [p["key"] for p in images]
    state.register(keys, state.new_run())
    state.mark_downloaded_many(keys)
    app = make_app(Settings(broker_url=redis_url))
    step = per_message or 1
    for i in range(0, len(images), step):
        args = [images[i : i + step]] if per_message else [images[i]]
        app.send_task(EMBED_TASK, args=args, queue=EMBED_QUEUE)
    app.close()


def keys_in_shards(out: Path) -> list[str]:
    return sorted(
        records.example_key(data).decode()
        for shard in out.glob(SHARD_GLOB)
        for _, _, data in records.iter_examples(shard)
    )


def null_env(**extra: str) -> dict[str, str]:
    """A null-model worker; Lab with numpy (no TensorFlow to import) unless asked."""
    return {
        "KOALA_NULL_MODEL": "1",
        "KOALA_BATCH_SIZE": "16",
        "KOALA_BATCH_WAIT": "0.2",
        "KOALA_VISIBILITY_TIMEOUT": "3",
        "KOALA_EXAMPLES_PER_SHARD": "20",
        "KOALA_LAB_ON_DEVICE": "0",
        **extra,
    }


def finish(workers: Workers, state: JobState, n: int, **env: str) -> None:
    """A healthy null-model worker (node embed<i>@test) writes what is left, then stops cleanly."""
    proc = workers.start("embed", **null_env(**env))

    def done() -> bool:
        queued = sum(state.queue_depths([EMBED_QUEUE]).values())  # waiting + unacked
        return state.counts()["written"] == n and not queued

    wait_for(done, 90, f"{n} records and every message acked", workers.logs)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, workers.logs()


def test_chunk_and_one_image_messages_both_become_records_once(workers, redis_url, rclient):
    state = JobState(rclient)
    images = [payload(i) for i in range(N)]
    queue(redis_url, state, images[:32], per_message=8)
    queue(redis_url, state, images[32:], per_message=0)
    queue(redis_url, state, images[:8], per_message=8)  # a re-sent chunk: already written or in flight
    finish(workers, state, N, KOALA_LAB_ON_DEVICE="1")  # the TensorFlow Lab, as on a GPU
    assert keys_in_shards(workers.out_dir) == sorted(p["key"] for p in images)
    assert state.counts()["pending"] == 0 and rclient.llen(EMBED_QUEUE) == 0 and not rclient.hlen("unacked")


@pytest.mark.timing
@pytest.mark.parametrize("point", ["received", "prepared", "inferred", "appended", "claimed"])
def test_killed_between_steps_every_image_ends_once(point, workers, redis_url, rclient, tmp_path):
    state = JobState(rclient)
    images = [payload(i) for i in range(N)]
    queue(redis_url, state, images, per_message=8)
    log = open(tmp_path / "dying.log", "wb")  # closed below
    dying = subprocess.run(
        [sys.executable, "-m", "testkit.dying_embed_worker", point, "embed0@test"],
        cwd=ROOT,
        env=worker_env(redis_url, workers.out_dir, **null_env()),
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    log.close()
    assert dying.returncode == -signal.SIGKILL, (tmp_path / "dying.log").read_text()
    # batches of 8 or 16 images (whole messages up to KOALA_BATCH_SIZE), each written on its own: the
    # kill came after the second batch's step, so at most two batches were claimed, or one before it
    claimed_batches = {
        "received": (0, 1),
        "prepared": (0, 1),
        "inferred": (0, 1),
        "appended": (1, 1),
        "claimed": (2, 2),
    }[point]
    low, high = claimed_batches
    assert 8 * low <= state.counts()["written"] <= 16 * high
    # the same node again (embed0@test): it recovers the temp shard, then takes the messages back
    # (with nothing resent: a message popped by the dead worker was in its held list all along)
    finish(workers, state, N)
    assert keys_in_shards(workers.out_dir) == sorted(p["key"] for p in images)
    assert not list(workers.out_dir.glob(".*.tmp")) and state.counts()["pending"] == 0


@pytest.mark.parametrize("value", [None, "0"])
def test_the_null_model_needs_its_variable(value, redis_url, tmp_path):
    env = worker_env(redis_url, tmp_path, **({"KOALA_NULL_MODEL": value} if value else {}))
    result = subprocess.run(
        [sys.executable, "-m", "workers", "embed", "-n", "e@test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "no checkpoint" in result.stderr
    assert "null model" not in result.stderr.lower()


def test_the_fast_wire_codecs_write_what_kombu_writes():
    import base64
    import datetime as dt
    import json

    from common.celery_app import FastBase64, _envelope_dumps

    body = bytes(range(256)) * 100
    assert FastBase64().encode(body) == base64.b64encode(body).decode()
    assert FastBase64().decode(base64.b64encode(body).decode()) == body
    assert FastBase64().decode("eyJh\neyJh") == b""  # outside the alphabet: refused, not skipped
    envelope = [
        {
            "body": "eyJh",
            "headers": {"task": "koala.embed", "eta": None, "retries": 0},
            "properties": {"priority": 0, "delivery_info": {"exchange": ""}},
        },
        "",
        "embed",
    ]
    assert json.loads(_envelope_dumps(envelope)) == envelope
    with_date = {"eta": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "n": 1 << 70}  # orjson refuses the int
    assert "2026-01-01" in str(_envelope_dumps(with_date))


def test_entries_that_are_not_kombu_messages_are_dropped_and_the_worker_lives(workers, redis_url, rclient):
    state = JobState(rclient)
    proc = workers.start("embed", **null_env())
    wait_for(lambda: "consuming embed" in workers.logs(), 60, "the consumer", workers.logs)
    for entry in [*NOT_KOMBU, bad_base64_envelope(EMBED_QUEUE)]:
        rclient.lpush(EMBED_QUEUE, entry)
    images = [payload(i) for i in range(8)]
    queue(redis_url, state, images, per_message=4)
    wait_for(lambda: state.counts()["written"] == 8, 60, "the real images written", workers.logs)
    assert proc.poll() is None
    logs = workers.logs()
    assert logs.count("that is not a kombu message") == len(NOT_KOMBU), logs[-3000:]
    assert "not base64" in logs and "Unrecoverable" not in logs


def test_the_embed_worker_answers_flowers_event_commands(workers, redis_url, rclient):
    workers.start("embed", **null_env())
    wait_for(lambda: "consuming embed" in workers.logs(), 60, "the consumer", workers.logs)
    app = make_app(Settings(broker_url=redis_url))
    node = f"embed{len(workers.procs) - 1}@test"
    assert app.control.enable_events(destination=[node], reply=True, timeout=10) == [
        {node: {"ok": "task events enabled"}}
    ]
    assert app.control.disable_events(destination=[node], reply=True, timeout=10)[0][node]["ok"]
    app.close()
    assert "pidbox command error" not in workers.logs()


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_an_output_folder_this_user_may_not_write_stops_the_worker_with_the_fix(tmp_path):
    # root passes every permission check: the check runs in a child that became `nobody`
    import os

    from workers.embed import check_permissions

    out = tmp_path / "tfrecords"
    out.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: never returns into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                check_permissions(out)
                message = "started"
            except RuntimeError as e:
                message = str(e)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert message.startswith(f"cannot write in {out} as uid 65534") and "chown -R APP_UID:APP_GID" in message
    check_permissions(out)  # the owner may


@pytest.mark.timing
def test_an_image_that_kills_the_worker_fails_alone_and_the_rest_is_written(workers, redis_url, rclient):
    state = JobState(rclient)
    images = [payload(i) for i in range(16)]  # payload(5) is all grey 50: the stand-in model dies on it
    queue(redis_url, state, images, per_message=8)
    env = null_env(KOALA_TEST_POISON_GREY="50")
    worker, deaths = workers.start("embed", "-n", "embed-p@test", **env), 0

    def supervised() -> bool:
        nonlocal worker, deaths
        if worker.poll() is not None:  # restarted as a supervisor would, under the same name
            deaths += 1
            worker = workers.start("embed", "-n", "embed-p@test", **env)
        c = state.counts()
        return c["written"] == 15 and c["failed"] == 1

    wait_for(supervised, 180, "15 records and one failure", workers.logs)
    assert [(f["key"], f["reason"]) for f in state.failures()] == [(images[5]["key"], "worker_died")]
    # killed with its batch at its first two starts (KOALA_MAX_DELIVERIES=2), then once alone
    assert deaths == 3, workers.logs()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    assert keys_in_shards(workers.out_dir) == sorted(p["key"] for i, p in enumerate(images) if i != 5)


def test_a_pipeline_error_stops_the_worker_with_its_cause(workers, redis_url, rclient, tmp_path):
    # an error that is no image's own (the output folder vanished under a file): logged, exit 1, no spin
    state = JobState(rclient)
    proc = workers.start("embed", **null_env())
    wait_for(lambda: "consuming embed" in workers.logs(), 60, "the consumer", workers.logs)
    blocker = workers.out_dir
    import shutil

    shutil.rmtree(blocker)
    blocker.write_text("not a folder")  # appending a shard now raises NotADirectoryError
    queue(redis_url, state, [payload(i) for i in range(4)], per_message=4)
    assert proc.wait(60) != 0
    logs = workers.logs()
    assert "the embed pipeline failed" in logs and "NotADirectoryError" in logs, logs[-3000:]
    assert logs.count("consuming embed") == 1  # no reconnect loop


def test_a_redis_out_of_memory_is_waited_out(workers, redis_url, rclient):
    # maxmemory reached with noeviction: every write is refused until it is lifted
    state = JobState(rclient)
    proc = workers.start("embed", **null_env())
    wait_for(lambda: "consuming embed" in workers.logs(), 60, "the consumer", workers.logs)
    rclient.config_set("maxmemory-policy", "noeviction")
    rclient.config_set("maxmemory", "1")
    try:
        wait_for(lambda: "OutOfMemoryError" in workers.logs(), 60, "the refusal to be noticed", workers.logs)
        assert proc.poll() is None
    finally:
        rclient.config_set("maxmemory", "0")
    images = [payload(i) for i in range(8)]
    queue(redis_url, state, images, per_message=4)
    wait_for(lambda: state.counts()["written"] == 8, 90, "8 records once Redis accepts writes", workers.logs)
    assert proc.poll() is None
