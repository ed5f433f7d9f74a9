"""Records benchmark: our Example serializer vs tf.train.Example, and shard writing per compression, on
the Lab channels of photo-like images (uniform noise would not compress). --compact (issue 20): the record
formats side by side: bytes per record and codec costs on three corpora, a real null-model embed worker's
CPU per image writing each (rounds alternating), tf.data reading each from local disk.

Run: .venv/bin/python -m bench.records [--compact] [--n 500] [--rounds 3] [--json PATH] [--smoke]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.common import RESULTS, finish, load, make_images, medians, null_rounds, options
from common.output import records
from common.output.shards import ShardWriter

NAMES = (b"0" * 32, b"0" * 32, b"http://example.com/some/photo.jpg")  # name, key, source of a record


def tf_example(name: bytes, key: bytes, source: bytes, l, ab, emb) -> bytes:  # noqa: E741
    """The straightforward construction users would write."""
    import tensorflow as tf

    floats = lambda a: tf.train.Feature(float_list=tf.train.FloatList(value=a.ravel()))  # noqa: E731
    raw = lambda b: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))  # noqa: E731
    feature = {"image_name": raw(name), "image_key": raw(key), "image_source": raw(source)}
    feature |= {"image_l": floats(l), "image_ab": floats(ab), "image_embedding": floats(emb)}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def per_second(fn, n: int) -> float:
    """Calls of fn per second over n calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def writing(n: int, compression: str, data: list[bytes]) -> dict:
    """MB/s and shard size for one shard of n records with the given compression."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), "bench", examples_per_shard=n, compression=compression)
        start = time.perf_counter()
        for i in range(0, n, 16):
            writer.append(data[i : i + 16])
        size, seconds = writer.close().stat().st_size, time.perf_counter() - start
    mb_s = round(n * len(data[0]) / 1e6 / seconds, 1)
    return {"compression": compression, "records": n, "mb_per_s": mb_s, "shard_mb": round(size / 1e6, 1)}


def serializer(n: int) -> dict:
    """Examples per second of ours and of tf.train.Example, and shard writing per compression."""
    from common.pictures.lab import lab_channels

    rng = np.random.default_rng(0)
    made = [
        (f"{i:032x}".encode(), f"{i:032x}".encode(), f"http://example.com/{i}.jpg".encode())
        + (*lab_channels(rgb), rng.normal(size=1001).astype(np.float32))
        for i, rgb in enumerate(make_images(16))
    ]
    ours = per_second(lambda: records.serialize_example(*made[0]), n)
    theirs = per_second(lambda: tf_example(*made[0]), max(5, n // 10))
    serialized = [records.serialize_example(*made[i % len(made)]) for i in range(n)]
    speed = {"ours": round(ours), "tf_train_example": round(theirs, 1), "ratio": round(ours / theirs, 1)}
    return {"serialize_per_s": speed, "write": [writing(n, c, serialized) for c in ("none", "gzip", "zlib")]}


def corpora() -> dict[str, list[np.ndarray]]:
    """299×299 images as the fleet makes them: scikit-image's photos, bench.download's JPEGs, testkit's."""
    import skimage

    from common.pictures.images import load_rgb
    from testkit.corpus import imagenet_jpeg

    names = "astronaut.png chelsea.png coffee.png motorcycle_left.png rocket.jpg retina.jpg color.png"
    files = [Path(skimage.__file__).parent / "data" / f for f in [*names.split(), "hubble_deep_field.jpg"]]
    return {
        "photos (scikit-image)": [load_rgb(f.read_bytes()) for f in files],
        "bench.download corpus": [load_rgb(imagenet_jpeg(i)) for i in range(24)],
        "testkit photo": list(make_images(8)),
    }


def ms_each(fn, items: list) -> float:
    """Best of 3 of the mean ms of fn over items."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - start) / len(items))
    return round(1000 * best, 2)


def formats_sizes() -> dict:
    """Mean bytes of a record of each format, and the per-image codec costs in ms (one thread)."""
    from common import messages
    from common.pictures import images, lab

    out = {}
    emb = np.zeros(records.EMBEDDING_SIZE, np.float32)
    for name, rgbs in corpora().items():
        size = lambda serialize, x: len(serialize(*NAMES, *x, emb))  # noqa: E731
        lab299 = np.mean([size(records.serialize_example, lab.lab_channels(x)) for x in rgbs])
        lab224 = np.mean([size(records.serialize_example, lab.lab_channels(x, 224)) for x in rgbs])
        compact = np.mean([size(records.serialize_compact, [images.encode_png(x)]) for x in rgbs])
        pngs, payloads = [images.encode_png(x) for x in rgbs], [messages.encode_pixels(x) for x in rgbs]
        out[name] = {"images": len(rgbs), "bytes lab 299": round(lab299), "bytes lab 224": round(lab224)}
        out[name] |= {"bytes compact": round(compact), "lab299_over_compact": round(lab299 / compact, 2)}
        out[name] |= {
            "ms encode_png": ms_each(images.encode_png, rgbs),
            "ms decode_png": ms_each(images.decode_png, pngs),
            "ms encode_pixels (zstd payload)": ms_each(messages.encode_pixels, rgbs),
            "ms decode_pixels (zstd payload)": ms_each(messages.decode_pixels, payloads),
        }
    return out


def embed_cpu(n: int, rounds: int) -> dict:
    """A real null-model embed worker writing each format, the same queue each time, rounds alternating."""
    out = RESULTS / "tmp" / "formats"
    variants = {
        "lab, numpy Lab": (out, {"KOALA_LAB_ON_DEVICE": "0"}),
        "lab, TF Lab (default)": (out, {}),
        "compact": (out, {"KOALA_RECORD_FORMAT": "compact"}),
    }
    keys = ("cpu_ms_per_image", "images_per_s", "record_mb", "machine_busy_cores")
    return {v: medians(rs, keys) for v, rs in null_rounds("formats", n, 32, rounds, variants).items()}


def reading(n: int) -> dict:
    """tf.data reading n records of each format from local disk: examples/s and per CPU-second."""
    import tensorflow as tf

    from common.output.dataset import read_dataset
    from common.pictures import images, lab

    rgbs, emb, nks = make_images(16), np.zeros(records.EMBEDDING_SIZE, np.float32), (b"n", b"k", b"s")
    (folder := RESULTS / "tmp" / "reading").mkdir(parents=True, exist_ok=True)
    made = {
        "lab299": [records.serialize_example(*nks, *lab.lab_channels(x), emb) for x in rgbs],
        "lab224": [records.serialize_example(*nks, *lab.lab_channels(x, 224), emb) for x in rgbs],
        "compact": [records.serialize_compact(*nks, images.encode_png(x), emb) for x in rgbs],
    }
    for name, data in made.items():
        (folder / name).write_bytes(b"".join(records.frame_record(data[i % 16]) for i in range(n)))
    cases = {
        "lab 299, record_format=lab (FixedLen, as before)": ("lab299", 299, "lab"),
        "lab 299, either format (per record)": ("lab299", 299, None),
        "lab 224, record_format=lab": ("lab224", 224, "lab"),
        "compact -> 299 (decode_png + Lab)": ("compact", 299, "compact"),
        "compact -> 224 (decode_png + resize + Lab)": ("compact", 224, "compact"),
    }
    out = {}
    for name, (file, size, fmt) in cases.items():
        ds = read_dataset(str(folder / file), lab_size=size, record_format=fmt).batch(32).prefetch(2)
        for _ in ds.take(2):  # tracing, warm caches
            pass
        start, cpu = time.perf_counter(), time.process_time()
        count = sum(int(b["image_l"].shape[0]) for b in ds)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        out[name] = {"examples_per_s": round(count / seconds, 1), "examples_per_cpu_s": round(count / cpu, 1)}
    tf.keras.backend.clear_session()
    return out


@click.command()
@click.option("--n", type=int, help="records per measurement (and per shard: 500 as the default shard)")
@click.option("--compact", is_flag=True, help="the record formats side by side instead (issue 20)")
@click.option("--rounds", default=3, help="--compact: rounds of the embed worker per format")
@options
def main(n: int | None, compact: bool, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """The records benchmark (smoke: --n 20; --compact: 96, one round), saved and printed as tables."""
    n = n or ((96 if compact else 20) if smoke else 500)
    if compact:
        result = {
            "load_before": load(),
            "sizes": formats_sizes(),
            "embed_worker": embed_cpu(n, 1 if smoke else rounds),
        }
        finish("records-compact", result | {"reading": reading(n), "load_after": load()}, json_path, smoke)
    else:
        finish("records", serializer(n), json_path, smoke)


if __name__ == "__main__":
    main()
