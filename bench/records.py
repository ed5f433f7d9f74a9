"""Records benchmark: our Example serializer vs tf.train.Example, and shard writing per compression.

Run: .venv/bin/python -m bench.records [--n 500] [--json bench/results/records.json]
The records hold the Lab channels of 16 photo-like generated images (testkit/corpus.photo), so that
the compressed sizes mean something (uniform noise would not compress at all).
Ratios, not absolute times, are what to compare: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from common import records
from common.shards import ShardWriter


def samples(count: int = 16) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(L, ab, logits) of photo-like 299x299 images, as the embed stage would store them."""
    from common.lab import lab_channels
    from testkit.corpus import photo

    rng = np.random.default_rng(0)
    return [
        (*lab_channels(photo(299, 299, seed)), rng.normal(size=1001).astype(np.float32))
        for seed in range(count)
    ]


def tf_example(name: bytes, key: bytes, source: bytes, l, ab, emb) -> bytes:  # noqa: E741
    """The straightforward construction users would write."""
    import tensorflow as tf

    def floats(a: np.ndarray) -> tf.train.Feature:
        return tf.train.Feature(float_list=tf.train.FloatList(value=a.ravel()))

    def raw(b: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))

    feature = {
        "image_name": raw(name),
        "image_key": raw(key),
        "image_source": raw(source),
        "image_l": floats(l),
        "image_ab": floats(ab),
        "image_embedding": floats(emb),
    }
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
        final = writer.close()
        seconds = time.perf_counter() - start
        size = final.stat().st_size
    return {
        "compression": compression,
        "records": n,
        "seconds": round(seconds, 3),
        "mb_per_s": round(n * len(data[0]) / 1e6 / seconds, 1),
        "shard_mb": round(size / 1e6, 1),
    }


@click.command()
@click.option("--n", default=500, help="records per measurement (and per shard: 500 as the default shard)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(n: int, json_path: str | None) -> None:
    """Print and optionally save the records benchmark."""
    made = [
        (f"{i:032x}".encode(), f"{i:032x}".encode(), f"http://example.com/{i}.jpg".encode(), *lab)
        for i, lab in enumerate(samples())
    ]
    ours = per_second(lambda: records.serialize_example(*made[0]), n)
    theirs = per_second(lambda: tf_example(*made[0]), max(5, n // 10))
    serialized = [records.serialize_example(*made[i % len(made)]) for i in range(n)]
    result = {
        "serialize_per_s": {
            "ours": round(ours),
            "tf_train_example": round(theirs, 1),
            "ratio": round(ours / theirs, 1),
        },
        "write": [writing(n, c, serialized) for c in ("none", "gzip", "zlib")],
    }
    click.echo(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
