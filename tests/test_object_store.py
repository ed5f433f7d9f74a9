"""Shards to an object store, against a real S3 server (moto's server mode, `testkit/s3.py`): the
store's primitives (an upload appears whole or not at all, the manifest's compare-and-swap, retries,
a refusing bucket), and the fleet writing to it: a worker SIGKILLed mid-shard with its scratch
deleted (a lost machine) leaves every image once in committed objects, nothing partial, no upload
left open; compact and lab shards read back as the same tensors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from common.output import records
from common.output.shards import ShardWriter, publish_to_store, split_store
from common.output.storage import StorageError, Store
from producer.steps.preview import shard_records
from testkit.fleet import Workers, embed_env, koala, wait_for
from testkit.s3 import FaultyProxy, S3Server
from testkit.servers import ImageServer

GOOD = ["jpeg_rgb", "jpeg_portrait", "jpeg_small", "png_rgba", "png_p", "gif_animated", "webp"]


def use_endpoint(monkeypatch: pytest.MonkeyPatch, s3: S3Server, endpoint: str | None = None) -> None:
    """This process talks to the test server (or a proxy of it) through the standard AWS variables."""
    import s3fs

    for name, value in s3.env(endpoint).items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per arguments, not per environment


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    use_endpoint(monkeypatch, s3)
    return s3


def committed(s3: S3Server, prefix: str) -> dict[str, list[bytes]]:
    """The records of every shard object under a prefix, checked against the manifest: the same
    names, each object whole (its records fill it exactly) and of the listed size and count."""
    objects = s3.objects("koala", prefix)
    manifest = json.loads(objects.pop("manifest.json"))["shards"] if "manifest.json" in objects else []
    objects.pop("summary.json", None)  # `koala run`'s
    assert sorted(objects) == sorted(e["name"] for e in manifest), "the manifest lists every object"
    out = {}
    for entry in manifest:
        data = objects[entry["name"]]
        items = list(records.read_stream(io.BytesIO(data), entry["name"]))
        assert len(data) == entry["bytes"] and len(items) == entry["records"]
        assert sum(len(r) + 16 for r in items) == len(data), f"{entry['name']} is whole, nothing torn"
        out[entry["name"]] = items
    return out


def keys_of(shards: dict[str, list[bytes]]) -> list[str]:
    return sorted(records.example_key(r).decode() for rs in shards.values() for r in rs)


# ---- the store ----------------------------------------------------------------------------------


def test_an_upload_appears_whole_or_not_at_all(aws: S3Server, tmp_path: Path):
    store = Store("s3://koala/run")
    src = tmp_path / "data"
    src.write_bytes(np.random.default_rng(0).bytes(20 << 20))  # two parts
    with pytest.raises(RuntimeError), store.upload("a.tfrecord") as upload:
        upload.begin()
        upload.send(src)
        raise RuntimeError("interrupted after every part was sent")
    assert aws.objects("koala") == {} and aws.incomplete_uploads("koala") == []
    with store.upload("a.tfrecord") as upload:
        upload.begin()
        upload.send(src)
        upload.complete()
    assert aws.objects("koala", "run/") == {"a.tfrecord": src.read_bytes()}
    # a name is never written twice: the completion carries If-None-Match
    src.write_bytes(b"other")
    with pytest.raises(FileExistsError), store.upload("a.tfrecord") as upload:
        upload.begin()
        upload.send(src)
        upload.complete()
    assert len(aws.objects("koala", "run/")["a.tfrecord"]) == 20 << 20
    assert aws.incomplete_uploads("koala") == []


def test_the_manifest_loses_no_entry_to_concurrent_writers(aws: S3Server):
    store = Store("s3://koala/run")

    def add(writer: int) -> None:
        for i in range(15):
            Store("s3://koala/run").add_to_manifest([{"name": f"w{writer}-{i}", "records": i, "bytes": 1}])

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
    assert sorted(e["name"] for e in store.manifest()) == names
    store.add_to_manifest([{"name": "w0-0", "records": 99, "bytes": 9}])  # listed already: unchanged
    assert [e["records"] for e in store.manifest() if e["name"] == "w0-0"] == [0]


def test_throttling_and_server_errors_are_retried(s3: S3Server, monkeypatch, tmp_path: Path):
    proxy = FaultyProxy(s3.endpoint)
    try:
        use_endpoint(monkeypatch, s3, proxy.endpoint)
        proxy.fail("PUT", 503, "SlowDown", 2)
        proxy.fail("POST", 500, "InternalError", 2)
        src = tmp_path / "data"
        src.write_bytes(b"x" * 1000)
        store = Store("s3://koala/run")
        with store.upload("lab_images_n_00000.tfrecord") as upload:
            upload.begin()
            upload.send(src)
            upload.complete()
        store.add_to_manifest([{"name": "lab_images_n_00000.tfrecord", "records": 1, "bytes": 1000}])
        assert proxy.faults == 4
        assert s3.objects("koala", "run/")["lab_images_n_00000.tfrecord"] == src.read_bytes()
    finally:
        proxy.stop()


def test_a_missing_or_refusing_bucket_is_one_line(s3: S3Server, monkeypatch):
    use_endpoint(monkeypatch, s3)
    with pytest.raises(StorageError, match=r"the bucket 'nope' does not exist") as missing:
        Store("s3://nope/run").check_writable()
    assert "\n" not in str(missing.value) and "koala-test-secret" not in str(missing.value)
    proxy = FaultyProxy(s3.endpoint)
    try:
        use_endpoint(monkeypatch, s3, proxy.endpoint)
        proxy.fail("PUT", 403, "AccessDenied", 100)
        with pytest.raises(StorageError, match=r"writes refused \(AccessDenied\)") as refused:
            Store("s3://koala/run").check_writable()
        assert "\n" not in str(refused.value)
    finally:
        proxy.stop()


def test_standalone_shards_go_to_the_store_and_split_there(aws: S3Server, tmp_path: Path):
    store = Store("s3://koala/run")
    publish = lambda temp, spans: publish_to_store(store, temp, spans)  # noqa: E731
    with ShardWriter(tmp_path / "scratch", "n", examples_per_shard=2, publisher=publish, durable=False) as w:
        for i in range(7):
            w.append([f"record {i}".encode()])
            w.maybe_rotate()
    names = [f"lab_images_n_{i:05d}.tfrecord" for i in range(4)]
    assert [e["name"] for e in store.manifest()] == names
    assert [e["records"] for e in store.manifest()] == [2, 2, 2, 1]
    assert list((tmp_path / "scratch").iterdir()) == [], "the scratch copies are gone"
    written = [r for n in names for r in shard_records(store.url(n))]
    assert written == [f"record {i}".encode() for i in range(7)]

    renamed = split_store("s3://koala/run", 0.5)
    assert len(renamed) == 2 and split_store("s3://koala/run", 0.5) == []  # a rerun changes nothing
    listed = sorted(e["name"] for e in store.manifest())
    assert sorted(aws.objects("koala", "run/")) == sorted([*listed, "manifest.json"])
    assert sum(n.startswith("val_") for n in listed) == 2


# ---- the fleet -------------------------------------------------------------------------------------


def fleet_env(s3: S3Server, out: str, **extra: str) -> dict[str, str]:
    return {**s3.env(), "KOALA_OUTPUT_DIR": out, "KOALA_VISIBILITY_TIMEOUT": "5", **extra}


def lose_a_machine(
    image_server: ImageServer, workers: Workers, tmp_path: Path, s3: S3Server, out: str, record_format: str
) -> tuple[list[str], dict[str, list[bytes]]]:
    """Two embed workers on two "machines" (scratch folders) write `urls` to `out`; the first is
    SIGKILLed while its shard is open and its scratch deleted; the other finishes the job."""
    gate = f"lost-{record_format}"
    base = image_server.base
    urls = [f"{base}/img/{n}?copy={i}" + (f"&hold={gate}" if i else "") for i in range(2) for n in GOOD]
    listing = tmp_path / f"urls-{record_format}.txt"
    listing.write_text("\n".join(urls))
    prefix = f"koala-{record_format}"
    common = fleet_env(s3, out, KOALA_STATE_PREFIX=prefix, KOALA_RECORD_FORMAT=record_format)
    late = {"KOALA_READ_TIMEOUT": "60", "KOALA_DOWNLOAD_DEADLINE": "90"}
    # every URL in flight at once, so that the held ones cannot take every fetch slot
    late["KOALA_PER_HOST_CONNECTIONS"] = str(len(urls))
    workers.start("download", "-c", str(len(urls)), **common, **late)
    scratch_a, scratch_b = tmp_path / f"machine-a-{record_format}", tmp_path / f"machine-b-{record_format}"
    # a shard that stays open: many records per shard, no commit for being idle
    a = workers.start(
        "embed",
        "-n",
        f"embed-a-{record_format}@test",
        **embed_env(None, KOALA_BATCH_SIZE="2", KOALA_EXAMPLES_PER_SHARD="50", KOALA_SHARD_IDLE_COMMIT="600"),
        **common,
        KOALA_SCRATCH_DIR=str(scratch_a),
    )
    assert koala(workers.env(**common), "submit", str(listing)).returncode == 0
    r = workers_redis(workers)

    def a_holds_an_open_shard() -> bool:
        return any(v.startswith(b"o") and b"embed-a-" in v for v in r.hgetall(f"{prefix}:remote").values())

    wait_for(a_holds_an_open_shard, 240, "worker a's open shard", workers.logs)
    a.send_signal(signal.SIGKILL)  # the machine is lost, with its disk
    a.wait()
    shutil.rmtree(scratch_a)
    assert int(r.hget(f"{prefix}:counts", "written") or 0) == 0, "nothing counts before a commit"
    b = workers.start(
        "embed",
        "-n",
        f"embed-b-{record_format}@test",
        **embed_env(None, KOALA_BATCH_SIZE="2", KOALA_SHARD_IDLE_COMMIT="1"),
        **common,
        KOALA_SCRATCH_DIR=str(scratch_b),
    )
    image_server.open_gate(gate)
    written = lambda: int(r.hget(f"{prefix}:counts", "written") or 0)  # noqa: E731
    wait_for(lambda: written() == len(urls), 300, "every record", workers.logs)
    b.send_signal(signal.SIGTERM)
    assert b.wait(120) == 0, workers.logs()
    return urls, committed(s3, out.split("/", 3)[3] + "/")


def workers_redis(workers: Workers):
    import redis

    return redis.Redis.from_url(workers.redis_url)


@pytest.mark.timing
def test_a_lost_machine_loses_nothing_and_compact_reads_as_lab(
    image_server: ImageServer, workers: Workers, tmp_path: Path, aws: S3Server
):
    s3 = aws
    shards = {}
    for fmt in ("lab", "compact"):
        urls, shards[fmt] = lose_a_machine(image_server, workers, tmp_path, s3, f"s3://koala/{fmt}", fmt)
        assert keys_of(shards[fmt]) == sorted(hashlib.md5(u.encode()).hexdigest() for u in urls)
        assert s3.incomplete_uploads("koala") == []
        assert not any(n.startswith(".") for n in s3.objects("koala", f"{fmt}/")), "no temp object"
        workers.stop_all()
        workers.procs.clear()
    size = {fmt: sum(len(r) for rs in shards[fmt].values() for r in rs) for fmt in shards}
    assert size["lab"] >= 7 * size["compact"], size

    from common.output.dataset import read_dataset

    def image(record) -> str:  # the same picture in both runs (their URLs differ by the gate)
        return record["image_source"].numpy().decode().split("&hold=")[0]

    read = {fmt: {image(r): r for r in read_dataset(f"s3://koala/{fmt}")} for fmt in shards}
    assert read["lab"].keys() == read["compact"].keys() and len(read["lab"]) == 2 * len(GOOD)
    # KOALA_TEST_PACE=fast (testkit/repeat.sh) makes the lab workers write zeros for Lab; a compact
    # record's Lab is computed from its pixels as it is read, so only the embeddings compare then
    fast = os.environ.get("KOALA_TEST_PACE") == "fast"
    features = ("image_embedding",) if fast else ("image_l", "image_ab", "image_embedding")
    for picture, lab in read["lab"].items():
        compact = read["compact"][picture]
        for feature in features:
            np.testing.assert_allclose(compact[feature].numpy(), lab[feature].numpy(), atol=1e-6)


def test_status_and_split_take_the_url(aws: S3Server, workers: Workers, tmp_path: Path):
    store = Store("s3://koala/run")
    src = tmp_path / ".lab_images_n_00000.tfrecord.tmp"
    src.write_bytes(records.frame_record(b"x"))
    publish_to_store(store, src, [(0, src.stat().st_size)])
    env = workers.env(**aws.env(), KOALA_OUTPUT_DIR="s3://koala/run")
    status = json.loads(koala(env, "status", "--json", "--interval", "0", check=True).stdout)
    assert status["shards"] == 1
    done = koala(env, "split", "--val-fraction", "0.5", "s3://koala/run", check=True)
    assert done.stdout.split() == ["val_lab_images_n_00000.tfrecord"]
    assert [e["name"] for e in store.manifest()] == ["val_lab_images_n_00000.tfrecord"]


@pytest.mark.timing
def test_run_writes_to_a_bucket(
    image_server: ImageServer, tmp_path: Path, fake_checkpoint: Path, aws: S3Server
):
    from tests.test_run import koala_run, listing_of, run_env

    listing, good, bad = listing_of(image_server, tmp_path)
    env = {**run_env(tmp_path), **aws.env(), "KOALA_SHARD_IDLE_COMMIT": "1"}
    proc = koala_run(listing, "s3://koala/run", fake_checkpoint, env)  # type: ignore[arg-type]
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(aws.objects("koala", "run/")["summary.json"])
    assert (summary["records"], summary["failed"], summary["pending"]) == (len(good), len(bad), 0)
    shards = committed(aws, "run/")
    assert summary["shards"] == sorted(shards)
    assert keys_of(shards) == sorted(hashlib.md5(u.encode()).hexdigest() for u in good)
    assert not (Path("s3:").exists() or (tmp_path / "s3:").exists()), "no local folder named after the URL"
    status = koala(env, "status", "--out", "s3://koala/run", "--json", "--interval", "0", check=True)
    assert json.loads(status.stdout)["written"] == len(good)


def test_lab_batch_and_preview_take_urls(aws: S3Server, tmp_path: Path):
    from PIL import Image

    from testkit.servers import worker_env

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (299, 299), (40 * i, 90, 200 - 30 * i)).save(src / f"{i}.png")
    env = worker_env(
        "unused", tmp_path / "unused", **aws.env(), KOALA_NULL_MODEL="1", KOALA_LAB_ON_DEVICE="0"
    )
    env["KOALA_CACHE_DIR"] = str(tmp_path / "cache")
    for _ in range(2):  # a second run continues the numbers after the store's highest
        koala(env, "lab-batch", src, "s3://koala/lb", "-b", "2", check=True)
    store = Store("s3://koala/lb")
    names = [f"lab_images_standalone_{i:05d}.tfrecord" for i in range(6)]
    assert store.shard_names() == names
    assert [e["records"] for e in store.manifest()] == [2, 2, 1] * 2
    assert keys_of(committed(aws, "lb/")) == sorted(
        2 * [hashlib.md5(str(src / f"{i}.png").encode()).hexdigest() for i in range(5)]
    )
    sheet = tmp_path / "sheet.png"
    koala(env, "preview", store.url(names[0]), "--out", sheet, check=True)
    assert Image.open(sheet).size[0] > 2 * 299
    missing = koala(env, "preview", store.url("lab_images_nope_00000.tfrecord"), "--out", sheet)
    assert missing.returncode == 1 and "no such shard" in missing.stderr


def test_compressed_shards_and_left_out_records_upload_as_their_final_bytes(aws: S3Server, tmp_path: Path):
    store = Store("s3://koala/gz")
    publish = lambda temp, spans: publish_to_store(store, temp, spans, "gzip")  # noqa: E731
    with ShardWriter(
        tmp_path, "n", examples_per_shard=10, publisher=publish, durable=False, compression="gzip"
    ) as w:
        _, start, _ = w.append([b"kept 0", b"dropped", b"kept 1"])
        w.discard(start, [True, False, True])  # another shard claimed the middle one first
    (entry,) = store.manifest()
    assert entry["name"] == "lab_images_n_00000.tfrecord.gz" and entry["records"] == 2
    assert list(shard_records(store.url(entry["name"]))) == [b"kept 0", b"kept 1"]
    assert list(tmp_path.iterdir()) == []


def test_the_embed_worker_stops_at_start_on_a_missing_bucket(s3: S3Server, redis_url: str, tmp_path: Path):
    import subprocess
    import sys

    from testkit import ROOT
    from testkit.servers import worker_env

    env = worker_env(redis_url, tmp_path, **s3.env(), KOALA_NULL_MODEL="1", KOALA_OUTPUT_DIR="s3://nope/run")
    done = subprocess.run(
        [sys.executable, "-m", "workers", "embed", "-n", "e@test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: cannot write to s3://nope/run at {s3.endpoint}: the bucket 'nope' does not exist "
        "(create it, or fix the URL)"
    ], done.stderr[-2000:]
    assert "koala-test-secret" not in done.stdout + done.stderr
