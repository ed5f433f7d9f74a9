"""The training reader: finished shards of either record format as a `tf.data.Dataset` of the `lab`
tensors (`read_dataset`), and `compact_to_lab`, the map function that turns `compact` records into them
(the README holds a copy to paste into other training code). Shards in an object store are read
through fsspec (TensorFlow itself has no s3:// any more): the output location's manifest names them.

TensorFlow is imported lazily, inside functions: importing this module does not load it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from common.output.records import EMBEDDING_SIZE
from common.output.storage import Store, filesystem, is_url
from common.settings import RECORD_FORMATS

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_SIZE = 299  # the side of a compact record's image


def _expand(pattern: str | list[str]) -> list[str]:
    import tensorflow as tf

    files: list[str] = []
    for p in [pattern] if isinstance(pattern, str | os.PathLike) else pattern:
        p = os.fspath(p)
        if is_url(p) and ".tfrecord" not in p.rsplit("/", 1)[-1]:  # an output location: its manifest
            store = Store(p)
            files += [store.url(name) for name in store.shard_names()]
        elif is_url(p) and any(c in p for c in "*?["):
            fs, path = filesystem(p)
            files += sorted(fs.unstrip_protocol(f) for f in fs.glob(path))
        else:
            files += sorted(tf.io.gfile.glob(p)) if any(c in p for c in "*?[") else [p]
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files


def _compression_of(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else "ZLIB" if path.endswith(".zlib") else ""


def _spec(record_format: str | None, lab_size: int) -> dict[str, Any]:
    """The features to parse: a `lab` record's channels at their size, or (format None) those as flat
    lists and a `compact` record's PNG (a record holds one or the other)."""
    import tensorflow as tf

    s = lab_size
    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_embedding": tf.io.FixedLenFeature([EMBEDDING_SIZE], tf.float32),
        "image_key": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image_source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if record_format == "lab":
        spec["image_l"] = tf.io.FixedLenFeature([s, s, 1], tf.float32)
        spec["image_ab"] = tf.io.FixedLenFeature([s, s, 2], tf.float32)
    else:
        spec["image_l"] = tf.io.RaggedFeature(tf.float32)  # no partitions: a plain 1-D tensor
        spec["image_ab"] = tf.io.RaggedFeature(tf.float32)
        spec["image_png"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec


def compact_to_lab(serialized: Any, lab_size: int = 299) -> dict[str, Any]:
    """A tf.data map function: one serialized `compact` record -> the `lab` record's tensors
    image_name, image_l [S,S,1], image_ab [S,S,2] (S = lab_size: 299 or 224), image_embedding [1001],
    image_key, image_source; within 1e-6 of the `lab` record the fleet writes of the same image
    (`common/output/compact_reader.py`, the README's snippet)."""
    from common.output.compact_reader import compact_to_lab as to_lab

    return to_lab(serialized, lab_size)


def _either_to_lab(serialized: Any, lab_size: int) -> dict[str, Any]:
    """The `lab` tensors of a record of either format (told apart by its `image_png`)."""
    import tensorflow as tf

    from common.output.compact_reader import lab_of_rgb

    s = lab_size
    example = tf.io.parse_single_example(serialized, _spec(None, lab_size))
    png, l_flat, ab_flat = example.pop("image_png"), example.pop("image_l"), example.pop("image_ab")
    example["image_l"], example["image_ab"] = tf.cond(
        tf.strings.length(png) > 0,
        lambda: lab_of_rgb(
            tf.ensure_shape(tf.io.decode_png(png, channels=3), [IMAGE_SIZE, IMAGE_SIZE, 3]), s
        ),
        lambda: (tf.reshape(l_flat, [s, s, 1]), tf.reshape(ab_flat, [s, s, 2])),
    )
    return example


def _url_records(urls: list[str], compression: str | None) -> tf.data.Dataset:
    """The serialized records of shards in an object store (read with fsspec, a few at once)."""
    import tensorflow as tf

    from common.output import records

    suffix = {"gzip": ".gz", "zlib": ".zlib"}.get((compression or "").lower(), "")

    def shard(url: bytes):
        text = url.decode()
        fs, path = filesystem(text)
        with fs.open(path, "rb", block_size=8 << 20) as raw:
            yield from records.read_stream(raw, text + suffix if compression is not None else text)

    def one(url: tf.Tensor) -> tf.data.Dataset:
        spec = tf.TensorSpec([], tf.string)
        return tf.data.Dataset.from_generator(shard, args=(url,), output_signature=spec)

    return tf.data.Dataset.from_tensor_slices(urls).interleave(
        one, cycle_length=min(4, len(urls)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def read_dataset(
    pattern: str | list[str],
    lab_size: int = 299,
    compression: str | None = None,
    record_format: str | None = None,
) -> tf.data.Dataset:
    """The shards as a tf.data.Dataset of dicts: image_name, image_l [S,S,1], image_ab [S,S,2],
    image_embedding [1001], image_key, image_source, from `lab` records (written at size S) and
    `compact` ones (Lab computed here at S = 299 or 224) alike; `record_format` ("lab" or "compact")
    skips telling them apart per record. Compression from the extension unless given
    (`GZIP`/`ZLIB`/``, or the writer's `gzip`/`zlib`/`none`). `pattern` may also be an object
    store's output location (`s3://bucket/run`: the shards its manifest lists), shard URLs, or a
    URL with wildcards (that one lists the bucket)."""
    import tensorflow as tf

    if record_format not in (None, *RECORD_FORMATS):
        raise ValueError(
            f"record_format must be one of {', '.join(RECORD_FORMATS)} (or None), not {record_format!r}"
        )
    files = _expand(pattern)
    if compression is not None:
        given = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}.get(compression.lower(), compression.upper())
        groups = {given: files}
    else:
        groups = {}
        for f in files:
            groups.setdefault(_compression_of(f), []).append(f)
    if any(is_url(f) for f in files):
        ds = _url_records(files, compression)
    else:
        datasets = [tf.data.TFRecordDataset(fs, compression_type=c) for c, fs in groups.items()]
        ds = datasets[0]
        for other in datasets[1:]:
            ds = ds.concatenate(other)
    if record_format == "lab":
        spec = _spec("lab", lab_size)
        return ds.map(lambda x: tf.io.parse_single_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
    parse = compact_to_lab if record_format == "compact" else _either_to_lab
    return ds.map(lambda x: parse(x, lab_size), num_parallel_calls=tf.data.AUTOTUNE)
