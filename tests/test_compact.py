"""The `compact` record format: the PNG it holds, its serializer, the reader that gives the `lab`
tensors of it (and the README's paste-able copy), compared with the `lab` records real embed workers
write of the same images (null model: zero embeddings, real Lab, numpy and TensorFlow), `koala convert`
both ways, and the setting through `koala run`, the worker's option and `lab-batch`."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.celery_app import make_app
from common.messages import EMBED_QUEUE, EMBED_TASK, embed_image, encode_pixels
from common.output import records
from common.output.shards import SHARD_GLOB, finished_shards
from common.pictures import images, lab
from common.settings import Settings
from common.state.job import JobState
from testkit import ROOT
from testkit.corpus import photo
from testkit.fleet import koala, reached
from testkit.servers import RedisServer, worker_env

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "color.png")
# the fleet's Lab of each configuration: numpy (KOALA_LAB_ON_DEVICE=0) or TensorFlow's (1) at 299 and 224
LAB_RUNS = {
    ("numpy", 299): {"KOALA_LAB_ON_DEVICE": "0"},
    ("numpy", 224): {"KOALA_LAB_ON_DEVICE": "0", "KOALA_LAB_SIZE": "224"},
    ("tensorflow", 299): {"KOALA_LAB_ON_DEVICE": "1"},
    ("tensorflow", 224): {"KOALA_LAB_ON_DEVICE": "1", "KOALA_LAB_SIZE": "224"},
}
TOLERANCE = 1e-6


def natural_images() -> list[np.ndarray]:
    """299×299 images as the fleet makes them: photos (scikit-image's samples), a photo-like one, and
    the edges of the colour cube (black, white, every corner and step of 51, noise)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = [images.load_rgb((folder / name).read_bytes()) for name in SAMPLES]
    out.append(photo(299, 299, 7))
    steps = np.array(np.meshgrid(*[np.arange(0, 256, 51)] * 3, indexing="ij")).reshape(3, -1).T  # 216 colours
    cube = np.repeat(np.repeat(steps.reshape(12, 18, 3), 25, 0), 17, 1)[:299, :299]
    edges = np.zeros((299, 299, 3), np.uint8)
    edges[: cube.shape[0], : cube.shape[1]] = cube
    out += [edges, np.zeros((299, 299, 3), np.uint8), np.full((299, 299, 3), 255, np.uint8)]
    out.append(np.random.default_rng(3).integers(0, 256, (299, 299, 3), dtype=np.uint8))
    return out


def payloads(rgbs: list[np.ndarray]) -> list[dict]:
    return [
        embed_image(
            {"k": hashlib.md5(f"http://x/{i}".encode()).hexdigest(), "u": f"http://x/{i}"},
            encode_pixels(px),
        )
        for i, px in enumerate(rgbs)
    ]


def run_embed_worker(url: str, out: Path, items: list[dict], args: list[str], env: dict[str, str]) -> None:
    """A real embed worker (null model) writes `items` from its queue into `out`, then stops cleanly."""
    state = JobState.from_settings(Settings(broker_url=url))
    keys = [p["key"] for p in items]
    state.register(keys, state.new_run())
    state.mark_downloaded_many(keys)
    app = make_app(Settings(broker_url=url))
    for i in range(0, len(items), 3):
        app.send_task(EMBED_TASK, args=[items[i : i + 3]], queue=EMBED_QUEUE)
    app.close()
    worker_vars = {"KOALA_NULL_MODEL": "1", "KOALA_BATCH_SIZE": "4", "KOALA_BATCH_WAIT": "0.2"}
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "embed", "-n", f"{out.name}@test", *args],
            cwd=ROOT,
            env=worker_env(url, out, KOALA_EXAMPLES_PER_SHARD="4", **worker_vars, **env),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        done = reached(lambda: state.counts()["written"] == len(items) or proc.poll() is not None, 300)
        assert done and proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same images written by real embed workers: `lab` with each Lab path and size, and `compact`
    (asked by the worker's --record-format option); one Redis database each, the workers at once."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("compact-fleet")
    rgbs = natural_images()
    items = payloads(rgbs)
    server = RedisServer(tmp / "redis").start()
    runs: dict = {
        ("compact", 299): (["--record-format", "compact"], {}),
        **{k: ([], v) for k, v in LAB_RUNS.items()},
    }
    outs = {k: tmp / f"{k[0]}-{k[1]}" for k in runs}
    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            futures = [
                pool.submit(run_embed_worker, server.url[:-1] + str(db), outs[k], items, *runs[k])
                for db, k in enumerate(runs, start=1)
            ]
            for f in futures:
                f.result()
    finally:
        server.stop()
    names = {p["name"]: rgb for p, rgb in zip(items, rgbs, strict=True)}
    return {"outs": outs, "names": names}


def shard_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in finished_shards(folder))


def by_name(dataset) -> dict[str, dict[str, np.ndarray]]:
    return {r["image_name"].numpy().decode(): {k: v.numpy() for k, v in r.items()} for r in dataset}


def assert_same_lab(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, record in want.items():
        for feature in ("image_l", "image_ab"):
            assert got[name][feature].shape == record[feature].shape, feature
            np.testing.assert_allclose(
                got[name][feature], record[feature], rtol=0, atol=TOLERANCE, err_msg=name
            )
        for feature in ("image_embedding", "image_key", "image_source"):
            np.testing.assert_array_equal(got[name][feature], record[feature])


# ---- the PNG and the serializer ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(299, 299), (1, 1), (5, 7), (64, 3)])
def test_png_is_lossless_and_read_by_pillow_and_tensorflow(shape: tuple[int, int]) -> None:
    import tensorflow as tf

    rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    png = images.encode_png(rgb)
    np.testing.assert_array_equal(images.decode_png(png), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)
    np.testing.assert_array_equal(tf.io.decode_png(png, channels=3).numpy(), rgb)


def test_png_decoder_refuses_what_it_did_not_write() -> None:
    png = images.encode_png(photo(40, 30, 1))
    flipped = bytearray(png)
    flipped[60] ^= 1  # inside the IDAT data: its CRC fails
    other = io.BytesIO()
    Image.fromarray(photo(40, 30, 1)).save(other, "PNG")  # Pillow's adaptive filters
    for bad in (bytes(flipped), png[:-20], other.getvalue(), b"\x89PNG\r\n\x1a\n", b"not a png"):
        with pytest.raises(ValueError):
            images.decode_png(bad)


def test_compact_serializer_byte_identical_to_tf_and_told_apart() -> None:
    import tensorflow as tf

    png = images.encode_png(photo(299, 299, 2))
    emb = np.random.default_rng(0).normal(size=records.EMBEDDING_SIZE).astype(np.float32)
    ours = records.serialize_compact(b"name", b"k" * 32, "http://x/é".encode(), png, emb)
    feature = {
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"name"])),
        "image_key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"k" * 32])),
        "image_source": tf.train.Feature(bytes_list=tf.train.BytesList(value=["http://x/é".encode()])),
        "image_png": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "image_embedding": tf.train.Feature(float_list=tf.train.FloatList(value=emb)),
    }
    theirs = tf.train.Example(features=tf.train.Features(feature=feature))
    assert ours == theirs.SerializeToString(deterministic=True)
    assert records.record_format(ours) == "compact"
    assert records.example_bytes_feature(ours, records.PNG_FEATURE) == png
    assert records.example_key(ours) == b"k" * 32
    lab_record = records.serialize_example(b"n", b"k", b"s", *lab.lab_channels(photo(299, 299, 2)), emb)
    assert records.record_format(lab_record) == "lab"


# ---- the reader against the fleet's lab records -----------------------------------------------------


@pytest.mark.parametrize("size", [299, 224])
def test_compact_records_read_as_the_lab_records_the_fleet_writes(fleet: dict, size: int) -> None:
    from common.output.dataset import read_dataset

    compact = shard_files(fleet["outs"]["compact", 299])
    got = by_name(read_dataset(compact, lab_size=size))
    assert_same_lab(by_name(read_dataset(compact, lab_size=size, record_format="compact")), got)
    for lab_path in ("numpy", "tensorflow"):
        want = by_name(read_dataset(shard_files(fleet["outs"][lab_path, size]), lab_size=size))
        assert_same_lab(got, want)
        explicit = by_name(
            read_dataset(shard_files(fleet["outs"][lab_path, size]), size, record_format="lab")
        )
        assert_same_lab(explicit, want)
    # one dataset of both formats: each record read as what it is
    both = list(read_dataset(compact + shard_files(fleet["outs"]["numpy", size]), lab_size=size))
    assert len(both) == 2 * len(want)
    for half in (both[: len(want)], both[len(want) :]):
        assert_same_lab(by_name(half), want)


def test_compact_records_hold_the_exact_images(fleet: dict) -> None:
    seen = {}
    for shard in fleet["outs"]["compact", 299].glob(SHARD_GLOB):
        for _, _, data in records.iter_examples(shard):
            name = records.example_bytes_feature(data, b"image_name").decode()
            seen[name] = images.decode_png(records.example_bytes_feature(data, records.PNG_FEATURE))
    assert sorted(seen) == sorted(fleet["names"])
    for name, rgb in fleet["names"].items():
        np.testing.assert_array_equal(seen[name], rgb)


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- compact_to_lab -->\s*```python\n(.*?)```", text, re.S)
    assert found, "README: the reader snippet after <!-- compact_to_lab -->"
    return found.group(1)


def test_the_readme_snippet_is_the_reader_module() -> None:
    source = (ROOT / "common" / "output" / "compact_reader.py").read_text()
    body = source[source.index("import numpy as np") :]
    assert readme_snippet().strip() == body.strip()


@pytest.mark.parametrize("size", [299, 224])
def test_the_pasted_map_function_on_a_plain_tfrecord_dataset(fleet: dict, size: int) -> None:
    import tensorflow as tf

    from common.output.dataset import compact_to_lab, read_dataset

    pasted: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), pasted)  # as a user pastes it
    files = shard_files(fleet["outs"]["compact", 299])
    want = by_name(read_dataset(shard_files(fleet["outs"]["numpy", size]), lab_size=size))
    for to_lab in (pasted["compact_to_lab"], compact_to_lab):
        dataset = tf.data.TFRecordDataset(files).map(lambda x, f=to_lab: f(x, size)).batch(4)
        got = {
            name.decode(): {k: v[i] for k, v in batch.items()}
            for batch in ({k: v.numpy() for k, v in b.items()} for b in dataset)
            for i, name in enumerate(batch["image_name"])
        }
        assert_same_lab(got, want)


# ---- koala convert ---------------------------------------------------------------------------------------


def keys_of(folder: Path) -> list[bytes]:
    return sorted(
        records.example_key(d) for s in finished_shards(folder) for _, _, d in records.iter_examples(s)
    )


def test_convert_lab_to_compact_and_back_exactly_once(fleet: dict, tmp_path: Path) -> None:
    from common.output.dataset import read_dataset

    env = worker_env("redis://127.0.0.1:9/0", tmp_path)
    for lab_path in ("numpy", "tensorflow"):
        src, compact = fleet["outs"][lab_path, 299], tmp_path / f"compact-{lab_path}"
        done = koala(env, "convert", src, compact, "--to", "compact", check=True)
        assert [p.name for p in finished_shards(compact)] == [p.name for p in finished_shards(src)], (
            done.stderr
        )
        assert keys_of(compact) == keys_of(src) and len(set(keys_of(compact))) == len(fleet["names"])
        # the images come back exactly, and so does the Lab of them
        for shard in compact.glob(SHARD_GLOB):
            for _, _, data in records.iter_examples(shard):
                name = records.example_bytes_feature(data, b"image_name").decode()
                png = records.example_bytes_feature(data, records.PNG_FEATURE)
                np.testing.assert_array_equal(images.decode_png(png), fleet["names"][name])
        want = by_name(read_dataset(shard_files(src)))
        assert_same_lab(by_name(read_dataset(shard_files(compact))), want)

    # compact -> lab: numpy's Lab, as the worker wrote it with KOALA_LAB_ON_DEVICE=0, at both sizes
    for size in (299, 224):
        back = tmp_path / f"lab-{size}"
        koala(
            env,
            "convert",
            fleet["outs"]["compact", 299],
            back,
            "--to",
            "lab",
            "--lab-size",
            str(size),
            check=True,
        )
        written = {
            records.example_key(d): d for s in finished_shards(back) for _, _, d in records.iter_examples(s)
        }
        fleet_lab = {
            records.example_key(d): d
            for s in finished_shards(fleet["outs"]["numpy", size])
            for _, _, d in records.iter_examples(s)
        }
        assert written == fleet_lab  # byte for byte


def test_convert_again_after_an_interruption_writes_each_record_once(fleet: dict, tmp_path: Path) -> None:
    env = worker_env("redis://127.0.0.1:9/0", tmp_path)
    src, dst = tmp_path / "compact", tmp_path / "lab"
    src.mkdir()
    written = [
        d for s in finished_shards(fleet["outs"]["compact", 299]) for _, _, d in records.iter_examples(s)
    ]
    for i in range(0, len(written), 2):  # two records a shard, some gzipped
        ext = ".gz" if i % 4 else ""
        framed = b"".join(records.frame_record(d) for d in written[i : i + 2])
        (src / f"lab_images_t_{i:05d}.tfrecord{ext}").write_bytes(gzip.compress(framed) if ext else framed)
    koala(env, "convert", src, dst, "--to", "lab", check=True)
    shards = finished_shards(dst)
    assert [p.name for p in shards] == [p.name for p in finished_shards(src)]
    # as a kill would leave it: one shard never renamed (its temp half written), one not started
    shards[0].rename(shards[0].with_name(f".{shards[0].name}.tmp"))
    shards[0].with_name(f".{shards[0].name}.tmp").write_bytes(shards[1].read_bytes()[:1000])
    shards[-1].unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards[1:-1]}
    again = koala(env, "convert", src, dst, "--to", "lab", check=True)
    assert "converted" in again.stderr and f"{len(shards) - 2} shards already" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in finished_shards(dst)[1:-1]} == before  # untouched
    assert keys_of(dst) == keys_of(src) and len(set(keys_of(dst))) == len(fleet["names"])
    assert not list(dst.glob(".*"))
    third = koala(env, "convert", src, dst, "--to", "lab", check=True)
    assert f"converted 0 records in 0 shards to lab; {len(shards)} shards already" in third.stderr


def test_convert_refuses_what_cannot_become_compact(fleet: dict, tmp_path: Path) -> None:
    env = worker_env("redis://127.0.0.1:9/0", tmp_path)
    refused = koala(env, "convert", fleet["outs"]["numpy", 224], tmp_path / "out224", "--to", "compact")
    assert refused.returncode != 0 and "Lab of 224×224, not 299×299" in refused.stderr
    assert not finished_shards(tmp_path / "out224") and not list((tmp_path / "out224").glob(".*"))

    # channels that are not the Lab of an 8-bit image (nudged by 1e-3)
    shard = finished_shards(fleet["outs"]["numpy", 299])[0]
    data = next(records.iter_examples(shard))[2]
    l_channel = records.example_floats(data, b"image_l").reshape(299, 299) + np.float32(1e-3)
    ab = records.example_floats(data, b"image_ab")
    nudged = records.serialize_example(b"nudged", b"k", b"s", l_channel, ab, np.zeros(1001, np.float32))
    src = tmp_path / "nudged"
    src.mkdir()
    (src / "lab_images_x_00001.tfrecord").write_bytes(records.frame_record(nudged))
    refused = koala(env, "convert", src, tmp_path / "out-nudged", "--to", "compact")
    assert (
        refused.returncode != 0
        and "record nudged: its channels are not the Lab of an 8-bit" in refused.stderr
    )
    assert not list((tmp_path / "out-nudged").iterdir())

    to_224 = koala(
        env, "convert", fleet["outs"]["numpy", 299], tmp_path / "o", "--to", "lab", "--lab-size", "224"
    )
    assert to_224.returncode != 0 and "not at --lab-size 224" in to_224.stderr
    assert koala(env, "convert", src, src, "--to", "lab").returncode != 0


# ---- the setting through koala run and lab-batch ------------------------------------------------------


def test_record_format_from_the_environment_through_koala_run(tmp_path: Path, fake_checkpoint: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rgbs = natural_images()[:3]
    for i, rgb in enumerate(rgbs):
        Image.fromarray(rgb).save(folder / f"{i}.png")
    env = worker_env(
        "unused", tmp_path, KOALA_NULL_MODEL="1", KOALA_RECORD_FORMAT="compact", KOALA_BATCH_WAIT="0.2"
    )
    del env["KOALA_BROKER_URL"]  # koala run starts its own Redis
    out = tmp_path / "out"
    koala(
        env,
        "run",
        folder,
        "--out",
        out,
        "--checkpoint",
        fake_checkpoint,
        "--download-workers",
        "1",
        check=True,
    )
    got = {
        records.example_bytes_feature(d, b"image_name").decode(): d
        for s in finished_shards(out)
        for _, _, d in records.iter_examples(s)
    }
    assert sorted(got) == [f"{i}.png" for i in range(3)]
    for i, rgb in enumerate(rgbs):
        assert records.record_format(got[f"{i}.png"]) == "compact"
        np.testing.assert_array_equal(
            images.decode_png(records.example_bytes_feature(got[f"{i}.png"], records.PNG_FEATURE)), rgb
        )


def test_lab_batch_writes_compact_records(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rgbs = natural_images()[:2]
    for i, rgb in enumerate(rgbs):
        Image.fromarray(rgb).save(folder / f"{i}.png")
    env = worker_env("unused", tmp_path, KOALA_NULL_MODEL="1", KOALA_LAB_ON_DEVICE="0")
    koala(env, "lab-batch", folder, tmp_path / "out", "--record-format", "compact", check=True)
    got = [d for s in finished_shards(tmp_path / "out") for _, _, d in records.iter_examples(s)]
    assert [records.record_format(d) for d in got] == ["compact", "compact"]
    by = {records.example_bytes_feature(d, b"image_name").decode(): d for d in got}
    for i, rgb in enumerate(rgbs):
        png = records.example_bytes_feature(by[f"{i}.png"], records.PNG_FEATURE)
        np.testing.assert_array_equal(images.decode_png(png), rgb)


def test_preview_draws_compact_records(fleet: dict, tmp_path: Path) -> None:
    shard = finished_shards(fleet["outs"]["compact", 299])[0]
    count = sum(1 for _ in records.iter_examples(shard))
    env = worker_env("redis://127.0.0.1:9/0", tmp_path)
    koala(env, "preview", shard, "--out", tmp_path / "sheet.png", "--columns", "1", check=True)
    from producer.steps.preview import sheet_size

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == sheet_size(min(count, 16), 299, 1)
