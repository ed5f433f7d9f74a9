"""End to end through both stages: real Redis, download + embed worker processes, loopback
server. The first test runs the network of the generated checkpoint and checks the records against an
independent computation; the others, about delivery and not the network, run the stand-in model."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2lab

from common.pictures import images as img
from testkit.fleet import Workers, embed_env, koala, wait_for
from testkit.messages import push_pickle_message
from testkit.servers import ImageServer

GOOD = [
    "jpeg_rgb",
    "jpeg_portrait",
    "jpeg_small",
    "png_rgba",
    "png_p",
    "gif_animated",
    "webp",
    "png_16bit_gray",
]


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def read_records(out_dir: Path) -> list[dict]:
    from common.output.dataset import read_dataset

    files = sorted(str(p) for p in out_dir.glob("lab_images_*.tfrecord*"))
    return [{k: v.numpy() for k, v in r.items()} for r in read_dataset(files)] if files else []


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def test_urls_become_exactly_one_record_each(
    image_server: ImageServer, images, workers: Workers, redis_url, tmp_path, fake_checkpoint, embedder
):
    good = {f"{image_server.base}/img/{n}": images[n] for n in GOOD}
    bad = [f"{image_server.base}/status/404", f"{image_server.base}/html"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join([*good, *bad, next(iter(good))]))
    workers.start("download", "-c", "4")
    embed = workers.start("embed", **embed_env(fake_checkpoint))
    marker = tmp_path / "pickle-was-executed"
    push_pickle_message(redis_url, "koala.embed", "embed", marker)

    done = koala(workers.env(), "submit", str(listing), "--wait")
    assert done.returncode == 0, done.stderr + workers.logs()
    stop(embed)
    assert embed.returncode == 0, workers.logs()

    status = json.loads(koala(workers.env(), "status", "--json", "--interval", "0").stdout)
    assert (status["submitted"], status["written"], status["failed"], status["pending"]) == (
        len(good) + len(bad),
        len(good),
        len(bad),
        0,
    )
    assert not list(workers.out_dir.glob(".*.tmp")), "no temporary shard after a clean stop"
    assert not marker.exists(), "a pickle message must never be deserialized"
    shards = sorted(workers.out_dir.glob("lab_images_*.tfrecord"))
    assert len(shards) == status["shards"] >= 2  # 3 per shard, plus less than one batch of 4

    records = read_records(workers.out_dir)
    by_name = {r["image_name"].decode(): r for r in records}
    assert len(records) == len(by_name) == len(good)
    pixels = {url: img.load_rgb(data, max_pixels=50_000_000) for url, data in good.items()}
    logits = dict(zip(pixels, embedder.embed(np.stack(list(pixels.values()))), strict=True))
    for url, rgb in pixels.items():
        r = by_name[md5(url)]
        lab = rgb2lab(rgb)  # independent: skimage on the reference resize
        np.testing.assert_allclose(r["image_l"][..., 0], 2 * lab[..., 0] / 100 - 1, atol=1e-4)
        np.testing.assert_allclose(r["image_ab"], lab[..., 1:] / 127, atol=1e-4)
        np.testing.assert_allclose(r["image_embedding"], logits[url], rtol=1e-3, atol=1e-3)
        assert r["image_source"].decode() == url
    assert r["image_l"].shape == (299, 299, 1) and r["image_embedding"].shape == (1001,)


@pytest.mark.timing
def test_kill_9_embed_worker_then_restart_gives_exactly_one_record_each(
    image_server: ImageServer, images, workers: Workers, redis_url, rclient, tmp_path
):
    # two thirds of the images are held back by the server until the kill: it lands mid-run however
    # fast or slow the worker is
    gate = "embed-kill"
    base = image_server.base
    urls = [f"{base}/img/{n}?copy={i}" + (f"&hold={gate}" if i else "") for i in range(3) for n in GOOD[:6]]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    env = embed_env(None, KOALA_BATCH_SIZE="2", KOALA_VISIBILITY_TIMEOUT="5")  # the stand-in model
    # the embed worker's visibility timeout: a worker restores every message older than its own
    # timeout, a holder renews its leases by its own (README, KOALA_VISIBILITY_TIMEOUT: one per fleet)
    late = {"KOALA_READ_TIMEOUT": "60", "KOALA_DOWNLOAD_DEADLINE": "90", "KOALA_VISIBILITY_TIMEOUT": "5"}
    # every URL in flight at once: with fewer slots than held URLs, the held ones could take them all
    # (in whatever order the chunks reach the fetch threads) and nothing was written until they timed out
    every = {"KOALA_PER_HOST_CONNECTIONS": str(len(urls))}
    workers.start("download", "-c", str(len(urls)), **late, **every)
    first = workers.start("embed", "-n", "embed-a@test", **env)
    assert koala(workers.env(), "submit", str(listing)).returncode == 0

    def written() -> int:
        return int(rclient.hget("koala:counts", "written") or 0)

    wait_for(lambda: written() >= 4, 240, "a few records", workers.logs)
    first.kill()  # SIGKILL mid-run: an open temp shard, maybe half a record, unacked messages
    first.wait()
    assert written() <= 6, "only the images not held can have been written"
    image_server.open_gate(gate)
    second = workers.start("embed", "-n", "embed-a@test", **env)
    # nothing resent: what the killed worker had popped was in its held list (workers/inbox.py)
    wait_for(lambda: written() == len(urls), 300, "every record", workers.logs)
    stop(second)

    records = read_records(workers.out_dir)
    names = sorted(r["image_name"].decode() for r in records)
    assert names == sorted(md5(u) for u in urls)
    assert not list(workers.out_dir.glob(".*.tmp"))
    counts = {k.decode(): int(v) for k, v in rclient.hgetall("koala:counts").items()}
    assert counts["written"] == len(urls) and counts.get("failed", 0) == 0


def test_two_nodes_of_each_kind_share_one_redis_and_one_folder(
    image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    urls = [f"{image_server.base}/img/{n}?node={i}" for i in range(2) for n in GOOD]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls))
    env = embed_env(None, KOALA_BATCH_SIZE="2")  # the stand-in model
    workers.start("download", "-c", "2", "-n", "download-a@host1")
    workers.start("download", "-c", "2", "-n", "download-b@host2")
    a = workers.start("embed", "-n", "embed-a@host1", **env)
    b = workers.start("embed", "-n", "embed-b@host2", **env)
    wait_for(lambda: workers.logs().count("model ready") == 2, 240, "both embed workers", workers.logs)
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(
        lambda: rclient.hget("koala:counts", "written") == str(len(urls)).encode(),
        300,
        "every record",
        workers.logs,
    )
    stop(a)
    stop(b)
    shards = sorted(p.name for p in workers.out_dir.glob("lab_images_*.tfrecord"))
    assert any("embed-a-host1" in n for n in shards) and any("embed-b-host2" in n for n in shards)
    names = sorted(r["image_name"].decode() for r in read_records(workers.out_dir))
    assert names == sorted(md5(u) for u in urls)
    assert rclient.hget("koala:counts", "failed") in (None, b"0")
