"""End to end: `koala submit` + a real download worker process + real Redis + loopback server."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest

from common.messages import decode_pixels
from common.pictures import images as img
from testkit import ROOT
from testkit.fleet import Workers, koala, wait_for
from testkit.messages import push_pickle_message
from testkit.servers import ImageServer, worker_env


def embed_messages(rclient) -> list[dict]:
    """Decode every image waiting on the embed queue (kombu envelope, msgpack body, a list of
    images per message)."""
    out = []
    for raw in rclient.lrange("embed", 0, -1):
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/x-msgpack"
        args, kwargs, _ = msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)
        assert envelope["headers"]["task"] == "koala.embed"
        assert isinstance(args[0], list) and args[0]  # one message per chunk, never empty
        out += args[0]
    return out


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def build_list(server: ImageServer, images: dict, bad_images: dict) -> tuple[bytes, dict, dict]:
    """A URL list mixing every good image, every bad one and every misbehaviour.

    Returns the list bytes, {url: expected image bytes} and {url: expected reason}.
    """
    base = server.base
    port = base.rsplit(":", 1)[1]
    good = {f"{base}/img/{name}": data for name, data in images.items()}
    good[f"{base}/flaky503/fleet"] = images["jpeg_rgb"]
    good[f"{base}/ratelimited/fleet"] = images["png_rgb"]
    good[f"{base}/to-image/jpeg_small"] = images["jpeg_small"]
    bad = {f"{base}/img/bad_{name}": reason for name, (_, reason) in bad_images.items()}
    bad.update(
        {
            f"{base}/status/404": "http_error",
            f"{base}/status/500": "http_error",
            f"{base}/html": "not_an_image",
            f"{base}/html-as-jpeg": "not_an_image",
            f"{base}/empty": "not_an_image",
            f"{base}/slow/3": "timeout",
            f"{base}/huge-declared": "too_large",
            f"{base}/huge-chunked": "too_large",
            f"{base}/lying-length": "truncated",
            f"{base}/loop/a": "redirect_loop",
            f"{base}/to-file": "bad_scheme",
            f"{base}/to-blocked": "blocked_address",
            f"http://127.0.0.2:{port}/img/jpeg_rgb": "blocked_address",
            "ftp://127.0.0.1/image.jpg": "bad_scheme",
            "http://[::1/broken": "invalid_url",
        }
    )
    lines = [b"# a comment", b""]
    for i, url in enumerate([*good, *bad]):
        # half in the fall11 layout `<id>\t<url>`, half as plain URLs
        lines.append(f"n{i:08d}_1\t{url}".encode() if i % 2 else url.encode())
    lines += [b"hello world", b"\xff\xfe not utf-8 \x80", b"   ", next(iter(good)).encode()]
    return b"\r\n".join(lines) + b"\n", good, bad


def test_submit_download_every_item_accounted_once(
    image_server: ImageServer, images, bad_images, workers: Workers, rclient, redis_url, tmp_path
):
    data, good, bad = build_list(image_server, images, bad_images)
    url_list = tmp_path / "urls.txt"
    url_list.write_bytes(data)
    workers.start("download", "-c", "8")

    result = koala(workers.env(), "submit", str(url_list), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["new"] == len(good) + len(bad)

    def status() -> dict:
        out = koala(workers.env(), "status", "--json", "--interval", "0")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    wait_for(
        lambda: (s := status())["downloaded"] + s["failed"] == s["submitted"],
        90,
        "every item downloaded or failed",
        workers.logs,
    )
    s = status()
    assert s["submitted"] == len(good) + len(bad)
    assert s["duplicates"] == 1
    assert s["rejected_lines"] == 2
    assert s["downloaded"] == len(good)
    assert s["failed"] == len(bad)
    assert s["pending"] == len(good)  # nothing is written until the embed stage runs
    assert 0 < s["queues"]["embed"] < len(good)  # messages: a chunk's images travel together

    # every good image reaches the embed queue once, with the pixels of the reference resize
    messages = embed_messages(rclient)
    by_key = {m["key"]: m for m in messages}
    assert len(by_key) == len(messages) == len(good)
    for url, original in good.items():
        message = by_key[md5(url)]
        assert message["source"] == url and message["name"] == md5(url)
        expected = img.load_rgb(original, size=(299, 299), mode="contain", max_pixels=50_000_000)
        np.testing.assert_array_equal(decode_pixels(message["pixels"]), expected, err_msg=url)

    # every bad one is in the failures once, with the right reason
    out = koala(workers.env(), "failures", "--json")
    failures = json.loads(out.stdout)
    assert sorted(f["url"] for f in failures) == sorted(bad)
    wrong = {f["url"]: (f["reason"], f["detail"]) for f in failures if f["reason"] != bad[f["url"]]}
    assert not wrong
    assert all(f["detail"] and f["key"] == md5(f["url"]) for f in failures)
    assert s["failures_by_reason"] == {r: list(bad.values()).count(r) for r in set(bad.values())}
    logged = [
        json.loads(line)
        for p in workers.out_dir.glob("failures_*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert sorted(f["url"] for f in logged) == sorted(bad)

    # submitting the same list again adds nothing
    again = koala(workers.env(), "submit", str(url_list), "--json")
    assert json.loads(again.stdout)["new"] == 0 and json.loads(again.stdout)["requeued"] == 0
    s2 = status()
    assert (s2["submitted"], s2["downloaded"], s2["failed"]) == (s["submitted"], s["downloaded"], s["failed"])
    assert s2["queues"]["download"] == 0 and len(embed_messages(rclient)) == len(good)

    # `koala failures --reason` filters
    only = json.loads(koala(workers.env(), "failures", "--json", "--reason", "timeout").stdout)
    assert [f["url"] for f in only] == [u for u, r in bad.items() if r == "timeout"]


def test_folder_submission_sends_bytes_and_names_by_relative_path(
    images, workers: Workers, rclient, redis_url, tmp_path
):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(images["jpeg_rgb"])
    (folder / "sub" / "b.png").write_bytes(images["png_rgba"])
    (folder / "notes.txt").write_bytes(b"not an image at all")
    workers.start("download", "-c", "2")
    result = koala(workers.env(), "submit", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    wait_for(
        lambda: len(embed_messages(rclient)) == 2 and rclient.hget("koala:counts", "failed") == b"1",
        60,
        "2 images and 1 failure",
        workers.logs,
    )
    by_name = {m["name"]: m for m in embed_messages(rclient)}
    assert set(by_name) == {"a.jpg", "sub/b.png"}
    expected = img.load_rgb(images["png_rgba"], max_pixels=50_000_000)
    np.testing.assert_array_equal(decode_pixels(by_name["sub/b.png"]["pixels"]), expected)
    failures = json.loads(koala(workers.env(), "failures", "--json").stdout)
    assert [(f["path"], f["reason"]) for f in failures] == [("notes.txt", "not_an_image")]


def test_url_list_over_http_with_count_and_skip(
    image_server: ImageServer, workers: Workers, rclient, redis_url, tmp_path
):
    names = ["jpeg_rgb", "png_rgb", "jpeg_small", "png_p", "webp"]
    image_server.files["__list__"] = "\n".join(f"{image_server.base}/img/{n}" for n in names).encode()
    result = koala(
        worker_env(redis_url, tmp_path),
        "submit",
        f"{image_server.base}/list/urls.txt",
        "--skip",
        "1",
        "--count",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new"] == 3
    assert rclient.hget("koala:counts", "submitted") == b"3"


def test_submit_reports_unreachable_redis_in_one_line(tmp_path):
    listing = tmp_path / "urls.txt"
    listing.write_text("http://127.0.0.1/x.jpg\n")
    result = koala(worker_env("redis://127.0.0.1:1/0", tmp_path), "submit", listing, timeout=60)
    assert result.returncode != 0
    assert "cannot reach Redis" in result.stderr


def test_pickle_is_not_accepted_by_the_app():
    from common.celery_app import make_app

    app = make_app()
    assert app.conf.accept_content == ["msgpack"]
    assert app.conf.task_serializer == "msgpack"


@pytest.mark.parametrize("mode", ["contain", "crop", "stretch"])
def test_resize_mode_setting_reaches_the_worker(mode, images, workers: Workers, rclient, redis_url, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "wide.jpg").write_bytes(images["jpeg_rgb"])
    workers.start("download", "-c", "1", KOALA_RESIZE_MODE=mode)
    assert koala(workers.env(), "submit", str(folder)).returncode == 0
    wait_for(lambda: len(embed_messages(rclient)) == 1, 60, "one image", workers.logs)
    got = decode_pixels(embed_messages(rclient)[0]["pixels"])
    np.testing.assert_array_equal(got, img.load_rgb(images["jpeg_rgb"], mode=mode, max_pixels=50_000_000))


@pytest.mark.timing
def test_producer_holds_back_at_the_queue_limit(
    image_server: ImageServer, workers: Workers, rclient, redis_url, tmp_path
):
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{image_server.base}/img/jpeg_small?{i}\n" for i in range(40)))
    env = worker_env(redis_url, workers.out_dir, KOALA_DOWNLOAD_QUEUE_LIMIT="2")
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer", "submit", str(listing)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: rclient.llen("download") == 2, 30, "the queue to reach its limit")
        time.sleep(2)
        assert producer.poll() is None, "the producer should be holding back"
        assert rclient.llen("download") == 2
        workers.start("download", "-c", "2")
        producer.wait(90)
        assert producer.returncode == 0
    finally:
        if producer.poll() is None:
            producer.kill()
    wait_for(lambda: rclient.hget("koala:counts", "downloaded") == b"40", 60, "40 downloads", workers.logs)


def test_keep_originals_writes_md5_named_files(
    image_server: ImageServer, images, workers: Workers, redis_url, rclient, tmp_path
):
    keep = tmp_path / "original"
    urls = [f"{image_server.base}/img/jpeg_rgb", f"{image_server.base}/img/png_rgb"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    workers.start("download", "--keep-originals", str(keep))
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: len(embed_messages(rclient)) == 2, 60, "two images", workers.logs)
    assert sorted(p.name for p in keep.iterdir()) == sorted([f"{md5(urls[0])}.jpg", f"{md5(urls[1])}.png"])
    assert (keep / f"{md5(urls[0])}.jpg").read_bytes() == images["jpeg_rgb"]


@pytest.mark.timing
def test_killed_worker_chunk_is_delivered_again_and_counted_once(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    # slow responses keep the chunks in flight when the worker is killed
    urls = [f"{image_server.base}/concurrent/kill{i}" for i in range(24)]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    fast_restore = {"KOALA_VISIBILITY_TIMEOUT": "3"}
    first = workers.start("download", "-c", "2", **fast_restore)
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: rclient.hlen("unacked") > 0, 30, "a chunk in flight", workers.logs)
    first.kill()  # SIGKILL: no chance to requeue or ack
    first.wait()
    workers.start("download", "-c", "4", **fast_restore)
    # nothing resent: a chunk popped by the killed worker was in its held list (workers/inbox.py)
    wait_for(
        lambda: rclient.hget("koala:counts", "downloaded") == b"24", 90, "all 24 downloaded", workers.logs
    )
    keys = {m["key"] for m in embed_messages(rclient)}
    assert keys == {md5(u) for u in urls}  # at least once on the queue, once in the counts
    counts = {k.decode(): int(v) for k, v in rclient.hgetall("koala:counts").items()}
    assert counts["submitted"] == 24 and counts.get("failed", 0) == 0


def assert_dropped_and_the_worker_goes_on(
    worker, image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
) -> None:
    """What was pushed into `download` is taken and dropped; then a real item still goes through."""
    wait_for(
        lambda: rclient.llen("download") == 0 and rclient.hlen("unacked") == 0,
        30,
        "the pushed entries to be taken and dropped",
        workers.logs,
    )
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{image_server.base}/img/png_rgb\n")
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: len(embed_messages(rclient)) == 1, 30, "the worker to go on working", workers.logs)
    assert worker.poll() is None


def test_entries_that_are_not_kombu_messages_are_dropped_and_the_worker_lives(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    from testkit.messages import NOT_KOMBU, bad_base64_envelope

    worker = workers.start("download", "-c", "2")
    for entry in [*NOT_KOMBU, bad_base64_envelope("download")]:
        rclient.lpush("download", entry)
    assert_dropped_and_the_worker_goes_on(worker, image_server, workers, redis_url, rclient, tmp_path)
    logs = workers.logs()
    assert logs.count("that is not a kombu message") == len(NOT_KOMBU), logs[-3000:]
    assert "not base64" in logs and "Unrecoverable" not in logs


@pytest.mark.timing
def test_a_worker_with_a_shorter_timeout_leaves_other_workers_chunks_alone(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    # the holder (60 s) renews every 15 s; a worker at 2 s restored what it held after 2 s (each
    # restorer used its own timeout): now the score is the holder's deadline
    slow_ok = {"KOALA_READ_TIMEOUT": "20", "KOALA_DOWNLOAD_DEADLINE": "40"}
    workers.start("download", "-c", "2", KOALA_VISIBILITY_TIMEOUT="60", **slow_ok)
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{image_server.base}/slow/8\n")
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: rclient.hlen("unacked") == 1, 30, "the chunk held by the first worker", workers.logs)
    workers.start("download", "-c", "2", KOALA_VISIBILITY_TIMEOUT="2", **slow_ok)
    wait_for(lambda: len(embed_messages(rclient)) == 1, 60, "the slow image", workers.logs)
    received = [ln for ln in workers.logs().splitlines() if "koala.download[" in ln and "received" in ln]
    assert len(received) == 1, workers.logs()[-3000:]


@pytest.mark.timing
def test_a_live_worker_keeps_its_chunk_past_the_visibility_timeout(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    # a 2 s visibility timeout and a chunk that takes 8 s: the lease is renewed, never re-delivered
    slow_ok = {"KOALA_VISIBILITY_TIMEOUT": "2", "KOALA_READ_TIMEOUT": "20", "KOALA_DOWNLOAD_DEADLINE": "40"}
    workers.start("download", "-c", "2", **slow_ok)
    workers.start("download", "-c", "2", **slow_ok)  # a second worker a re-delivery could go to
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{image_server.base}/slow/8\n")
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: len(embed_messages(rclient)) == 1, 60, "the slow image", workers.logs)
    time.sleep(1)
    received = [ln for ln in workers.logs().splitlines() if "koala.download[" in ln and "received" in ln]
    assert len(received) == 1, workers.logs()[-3000:]
    assert rclient.hget("koala:counts", "downloaded") == b"1"


def test_pickle_message_is_refused_and_never_executed(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    marker = tmp_path / "pickle-was-executed"
    worker = workers.start("download", "-c", "2")
    push_pickle_message(redis_url, "koala.download", "download", marker)
    assert_dropped_and_the_worker_goes_on(worker, image_server, workers, redis_url, rclient, tmp_path)
    assert not marker.exists()
    assert "pickle" in workers.logs().lower()


def test_a_download_waiting_to_retry_gives_its_slot_to_the_next_item(
    image_server: ImageServer, workers: Workers, rclient, tmp_path
):
    # one download at a time: the second URL can only start while the first waits out its backoff,
    # and the first one's retry is answered only once the second was served
    gate = f"retry-slot-{tmp_path.name}"
    urls = [f"{image_server.base}/busy-until/{gate}", f"{image_server.base}/img/jpeg_small?opens={gate}"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    workers.start("download", "-c", "1")
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: rclient.hget("koala:counts", "downloaded") == b"2", 60, "both downloaded", workers.logs)
    assert rclient.hget("koala:counts", "failed") is None
    assert image_server.behaviour.hits[f"/busy-until/{gate}"] == 2


def test_retry_sends_failed_items_again_after_an_outage(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    urls = [f"{image_server.base}/outage/{i}" for i in range(3)] + [f"{image_server.base}/status/404"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    workers.start("download", "-c", "4", KOALA_RETRIES="1")
    image_server.behaviour.outage = True
    try:
        assert koala(workers.env(), "submit", str(listing)).returncode == 0
        wait_for(lambda: rclient.hget("koala:counts", "failed") == b"4", 60, "4 failures", workers.logs)
    finally:
        image_server.behaviour.outage = False
    out = koala(workers.env(), "retry", "--reason", "http_error")
    assert out.returncode == 0, out.stderr
    assert "4 failed items sent again" in out.stdout
    wait_for(
        lambda: (
            rclient.hget("koala:counts", "downloaded") == b"3"
            and rclient.hget("koala:counts", "failed") == b"1"
        ),
        60,
        "3 downloads, 1 failure",
        workers.logs,
    )
    counts = json.loads(koala(workers.env(), "status", "--json", "--interval", "0").stdout)
    assert (counts["submitted"], counts["retried"], counts["pending"]) == (4, 4, 3)
    assert counts["failures_by_reason"] == {"http_error": 1}
    failures = json.loads(koala(workers.env(), "failures", "--json").stdout)
    assert [f["url"] for f in failures] == [urls[3]]


def test_redis_with_a_password(image_server: ImageServer, tmp_path):
    from testkit.servers import RedisServer

    server = RedisServer(tmp_path / "redis-auth", password="s3cret-for-tests").start()
    team = Workers(server.url, tmp_path / "out", tmp_path)
    try:
        team.start("download", "-c", "2")
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{image_server.base}/img/png_rgb\n")
        assert koala(team.env(), "submit", str(listing)).returncode == 0
        wait_for(lambda: len(embed_messages(server.client())) == 1, 30, "one image", team.logs)
        no_password = server.url.replace(":s3cret-for-tests@", "")
        refused = koala(worker_env(no_password, team.out_dir), "status", "--json", "--interval", "0")
        assert refused.returncode != 0 and "cannot reach Redis" in refused.stderr
        assert "s3cret" not in refused.stderr  # the password is never printed
    finally:
        team.stop_all()
        server.stop()


def test_the_download_gate_lets_in_at_most_its_slots_in_order():
    from functools import partial

    from workers.download import _Gate

    gate, started = _Gate(2), []
    for i in range(5):
        gate.enter(partial(started.append, i))
    assert started == [0, 1]  # the others wait for a slot
    gate.leave()
    assert started == [0, 1, 2]
    gate.leave()
    gate.leave()
    assert started == [0, 1, 2, 3, 4]
    gate.leave()
    gate.leave()  # every item has left: both slots are free again
    for i in (5, 6, 7):
        gate.enter(partial(started.append, i))
    assert started[5:] == [5, 6]
    gate.enter(partial(started.append, "back"), first=True)  # a download back from its pause
    gate.leave()
    assert started[7:] == ["back"]
    gate.leave()
    assert started[8:] == [7]
