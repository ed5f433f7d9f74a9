"""Messages whose work kills the worker (as the out-of-memory killer would): counted, split, and the
item that kills ends as one failure while its siblings go on; a task that raises still accounts for
its items. Real worker processes, restarted when they die as a supervisor would."""

from __future__ import annotations

import hashlib
import json

import pytest

from testkit.fleet import Workers, koala, wait_for
from testkit.servers import ImageServer


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def counts(rclient) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rclient.hgetall("koala:counts").items()}


@pytest.mark.timing
def test_a_url_that_kills_its_worker_fails_alone_and_its_chunk_goes_on(
    image_server: ImageServer, workers: Workers, rclient, tmp_path
):
    siblings = [f"{image_server.base}/img/jpeg_small?sibling={i}" for i in range(15)]
    poison = f"{image_server.base}/poison/1"
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(siblings[:7] + [poison] + siblings[7:]))
    env = {"KOALA_CHUNK_SIZE": "16", "KOALA_VISIBILITY_TIMEOUT": "3"}  # one chunk; the dead's come back soon
    worker = workers.start("download", "-c", "4", **env)
    assert koala(workers.env(**env), "submit", str(listing)).returncode == 0
    deaths = 0

    def supervised() -> bool:
        nonlocal worker, deaths
        if worker.poll() is not None:  # restarted as a supervisor would
            deaths += 1
            worker = workers.start("download", "-c", "4", **env)
        c = counts(rclient)
        return c.get("downloaded", 0) == 15 and c.get("failed", 0) == 1

    wait_for(supervised, 180, "15 downloads and one failure", workers.logs)
    failures = json.loads(koala(workers.env(), "failures", "--json", check=True).stdout)
    assert [(f["url"], f["reason"]) for f in failures] == [(poison, "worker_died")]
    # killed with its chunk at its first two starts (KOALA_MAX_DELIVERIES=2), then once alone
    assert deaths == 3, workers.logs()
    assert counts(rclient)["submitted"] == 16 and not rclient.hlen("koala:deliveries")


def test_a_chunk_whose_task_raises_still_ends_every_item(redis_url, rclient, tmp_path, monkeypatch):
    # one function under test (the task body): the stage's run raises as it did under a memory limit
    from celery.utils.nodenames import gethostname

    from common.settings import get_settings
    from common.state.job import JobState
    from workers import tasks

    monkeypatch.setenv("KOALA_BROKER_URL", redis_url)
    monkeypatch.setenv("KOALA_OUTPUT_DIR", str(tmp_path))
    get_settings.cache_clear()
    tasks.download_stage.cache_clear()
    monkeypatch.setattr(
        tasks.DownloadStage, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("can't start new thread"))
    )
    items = [{"k": md5(f"http://127.0.0.1/{i}"), "u": f"http://127.0.0.1/{i}"} for i in range(3)]
    state = JobState(rclient)
    state.register([i["k"] for i in items], state.new_run())
    state.mark_downloaded_many([items[0]["k"]])  # handed on already: not failed
    try:
        assert tasks.download.apply(args=[items]).get() == 3
    finally:
        tasks.download_stage(gethostname()).close()  # the stage the eager task built, as Celery names it
        get_settings.cache_clear()
        tasks.download_stage.cache_clear()
    assert state.states([i["k"] for i in items]) == [b"d", b"f", b"f"]
    assert {f["reason"] for f in state.failures()} == {"internal_error"}
    assert "can't start new thread" in state.failures()[0]["detail"]


def test_a_worker_killed_between_the_pop_and_its_bookkeeping_loses_nothing(
    image_server: ImageServer, workers: Workers, rclient, tmp_path
):
    # the first worker dies the moment kombu hands it the chunk, before kombu records it as unacked
    urls = [f"{image_server.base}/img/jpeg_small?pop={i}" for i in range(4)]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    short = {"KOALA_VISIBILITY_TIMEOUT": "3"}
    dying = workers.start("download", "-c", "2", KOALA_TEST_DIE_ON_DELIVERY="download", **short)
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    assert dying.wait(60) == -9
    assert rclient.llen("download") == 0 and not rclient.hlen("unacked")  # popped: only its held list has it
    workers.start("download", "-c", "2", **short)  # sweeps the dead one's held list once its lease ends
    wait_for(lambda: counts(rclient).get("downloaded") == 4, 60, "4 downloads, nothing resent", workers.logs)


@pytest.mark.slow
def test_at_default_settings_a_poison_url_ends_within_5_minutes(
    image_server: ImageServer, workers: Workers, rclient, tmp_path
):
    # the check: default visibility timeout and delivery limit, workers restarted when they
    # die, one chunk of 16 with a URL that kills its worker; records written by a real embed worker
    import time

    siblings = [f"{image_server.base}/img/jpeg_small?default={i}" for i in range(15)]
    poison = f"{image_server.base}/poison/default"
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(siblings[:3] + [poison] + siblings[3:]))
    defaults = {"KOALA_CHUNK_SIZE": "16"}  # the default chunk size, which the test environment lowers
    embed = {"KOALA_NULL_MODEL": "1", "KOALA_LAB_ON_DEVICE": "0"}
    names = {"download": "download-d@test", "embed": "embed-d@test"}
    procs = {kind: workers.start(kind, "-n", name, **defaults, **embed) for kind, name in names.items()}
    start = time.monotonic()
    assert koala(workers.env(**defaults), "submit", str(listing)).returncode == 0
    deaths = 0

    def supervised() -> bool:
        nonlocal deaths
        for kind, proc in procs.items():
            if proc.poll() is not None:
                deaths += 1
                procs[kind] = workers.start(kind, "-n", names[kind], **defaults, **embed)
        c = counts(rclient)
        return c.get("written", 0) == 15 and c.get("failed", 0) == 1

    wait_for(supervised, 300, "15 records and one failure within 5 minutes", workers.logs)
    took = time.monotonic() - start
    print(f"poison URL at default settings: done {took:.0f} s after submit, {deaths} worker deaths")
    assert [f["reason"] for f in json.loads(koala(workers.env(), "failures", "--json").stdout)] == [
        "worker_died"
    ]
