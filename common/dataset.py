"""The training reader: finished shards as a `tf.data.Dataset` of parsed examples.

TensorFlow is imported lazily, inside functions: importing this module does not load it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from common.records import EMBEDDING_SIZE

if TYPE_CHECKING:
    import tensorflow as tf


def _expand(pattern: str | list[str]) -> list[str]:
    import tensorflow as tf

    files: list[str] = []
    for p in [pattern] if isinstance(pattern, str | os.PathLike) else pattern:
        p = os.fspath(p)
        files += sorted(tf.io.gfile.glob(p)) if any(c in p for c in "*?[") else [p]
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files


def _compression_of(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else "ZLIB" if path.endswith(".zlib") else ""


def read_dataset(
    pattern: str | list[str], lab_size: int = 299, compression: str | None = None
) -> tf.data.Dataset:
    """The shards as a tf.data.Dataset of dicts: image_name, image_l [S,S,1], image_ab [S,S,2],
    image_embedding [1001], image_key, image_source. Compression from the extension unless given
    (`GZIP`/`ZLIB`/``, or the writer's `gzip`/`zlib`/`none`)."""
    import tensorflow as tf

    files = _expand(pattern)
    if compression is not None:
        given = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}.get(compression.lower(), compression.upper())
        groups = {given: files}
    else:
        groups = {}
        for f in files:
            groups.setdefault(_compression_of(f), []).append(f)
    datasets = [tf.data.TFRecordDataset(fs, compression_type=c) for c, fs in groups.items()]
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.concatenate(other)
    s = lab_size
    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_l": tf.io.FixedLenFeature([s, s, 1], tf.float32),
        "image_ab": tf.io.FixedLenFeature([s, s, 2], tf.float32),
        "image_embedding": tf.io.FixedLenFeature([EMBEDDING_SIZE], tf.float32),
        "image_key": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image_source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    return ds.map(lambda x: tf.io.parse_single_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
