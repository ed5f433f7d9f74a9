"""Record format, serializer, shard writer, crash recovery and reader."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.output import dataset, records, shards
from common.pictures import lab

S = 16  # small Lab images keep the writer tests fast; the format does not depend on S


def fields(i: int, size: int = S) -> dict:
    """The serializer's arguments for item i (deterministic)."""
    rng = np.random.default_rng(i)
    url = f"http://images.example/{i}.jpg".encode()
    key = hashlib.md5(url).hexdigest().encode()
    return {
        "name": key,
        "key": key,
        "source": url,
        "l": rng.uniform(-1, 1, (size, size)).astype(np.float32),
        "ab": rng.uniform(-1, 1, (size, size, 2)).astype(np.float32),
        "embedding": rng.normal(size=records.EMBEDDING_SIZE).astype(np.float32),
    }


def record(i: int, size: int = S) -> bytes:
    return records.serialize_example(**fields(i, size))


def tf_example(f: dict, order: list[str] | None = None):
    """The slow way: a tf.train.Example built from the same values."""
    import tensorflow as tf

    def floats(a: np.ndarray) -> tf.train.Feature:
        return tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(a)))

    def one(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        "image_name": one(f["name"]),
        "image_key": one(f["key"]),
        "image_source": one(f["source"]),
        "image_l": floats(f["l"]),
        "image_ab": floats(f["ab"]),
        "image_embedding": floats(f["embedding"]),
    }
    order = order or list(feature)
    return tf.train.Example(features=tf.train.Features(feature={k: feature[k] for k in order}))


def keys_in(path: Path) -> list[bytes]:
    return [records.example_key(data) for _, _, data in records.iter_examples(path)]


def key(i: int) -> bytes:
    return fields(i)["key"]


# ---- serializer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [S, 224, 299])
def test_serializer_byte_identical_to_tf(size: int) -> None:
    f = fields(size, size)
    assert records.serialize_example(**f) == tf_example(f).SerializeToString(deterministic=True)


def test_serializer_with_real_lab_and_odd_values() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    l_channel, ab = lab.lab_channels(rgb)
    emb = np.array([0.0, -0.0, 1e-45, -3.4e38, np.inf, -np.inf] * 167, np.float32)[:1001]
    long_name = "dir/ünïcode/" * 20
    f = {
        "name": long_name.encode(),
        "key": b"k" * 200,
        "source": b"",
        "l": l_channel,
        "ab": ab,
        "embedding": emb,
    }
    assert records.serialize_example(**f) == tf_example(f).SerializeToString(deterministic=True)


def test_serializer_accepts_other_dtypes_and_layouts() -> None:
    f = fields(1)
    g = dict(f, l=f["l"].astype(np.float64), ab=np.asfortranarray(f["ab"]), embedding=list(f["embedding"]))
    assert records.serialize_example(**g) == records.serialize_example(**f)
    with pytest.raises(ValueError):
        records.serialize_example(**dict(f, ab=f["ab"][:, :4]))


@settings(max_examples=25, deadline=None)
@given(
    name=st.binary(max_size=300),
    source=st.binary(max_size=20),
    l_vals=st.lists(st.floats(width=32, allow_nan=False), max_size=40),
    emb=st.lists(st.floats(width=32, allow_nan=False), max_size=40),
)
def test_serializer_property(name: bytes, source: bytes, l_vals: list[float], emb: list[float]) -> None:
    l_arr = np.array(l_vals, np.float32)
    f = {
        "name": name,
        "key": name[:32],
        "source": source,
        "l": l_arr,
        "ab": np.concatenate([l_arr, -l_arr]),
        "embedding": np.array(emb, np.float32),
    }
    assert records.serialize_example(**f) == tf_example(f).SerializeToString(deterministic=True)


def test_parses_with_tensorflow_to_identical_values() -> None:
    import tensorflow as tf

    f = fields(3, 299)
    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_key": tf.io.FixedLenFeature([], tf.string),
        "image_source": tf.io.FixedLenFeature([], tf.string),
        "image_l": tf.io.FixedLenFeature([299 * 299], tf.float32),
        "image_ab": tf.io.FixedLenFeature([299 * 299 * 2], tf.float32),
        "image_embedding": tf.io.FixedLenFeature([1001], tf.float32),
    }
    parsed = tf.io.parse_single_example(records.serialize_example(**f), spec)
    assert parsed["image_name"].numpy() == f["name"]
    assert parsed["image_key"].numpy() == f["key"]
    assert parsed["image_source"].numpy() == f["source"]
    for name, arg in (("image_l", "l"), ("image_ab", "ab"), ("image_embedding", "embedding")):
        assert np.array_equal(parsed[name].numpy(), f[arg].ravel())


def test_example_key_in_any_entry_order() -> None:
    f = fields(4)
    ours = records.serialize_example(**f)
    assert records.example_key(ours) == f["key"]
    assert records.example_bytes_feature(ours, b"image_source") == f["source"]
    orders = [
        None,
        ["image_key", "image_l", "image_ab", "image_embedding", "image_source", "image_name"],
        ["image_embedding", "image_source", "image_name", "image_ab", "image_l", "image_key"],
    ]
    for order in orders:
        ex = tf_example(f, order)
        for data in (ex.SerializeToString(), ex.SerializeToString(deterministic=True)):
            assert records.example_key(data) == f["key"]
            assert records.example_bytes_feature(data, b"image_name") == f["name"]


def test_example_key_missing_or_malformed() -> None:
    import tensorflow as tf

    ex = tf.train.Example(
        features=tf.train.Features(
            feature={"image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}
        )
    )
    with pytest.raises(KeyError):
        records.example_key(ex.SerializeToString())
    with pytest.raises(ValueError):
        records.example_key(record(1)[:-3000])  # a float list cut short
    with pytest.raises(ValueError):
        records.example_bytes_feature(record(1), b"image_l")  # not a bytes feature


def test_framing_matches_tf_writer(tmp_path: Path) -> None:
    import tensorflow as tf

    data = [record(i) for i in range(3)] + [b""]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for d in data:
            w.write(d)
    assert b"".join(records.frame_record(d) for d in data) == (tmp_path / "tf.tfrecord").read_bytes()


# ---- writer -----------------------------------------------------------------------------------------


def visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(shards.SHARD_GLOB))


def test_rotation_by_count(tmp_path: Path) -> None:
    w = shards.ShardWriter(tmp_path, "node-a", examples_per_shard=5)
    for b in range(5):  # batches of 2: a shard fills at 6 records, never split
        path, start, end = w.append([record(2 * b), record(2 * b + 1)])
        assert path.name.startswith(".lab_images_node-a_") and path.name.endswith(".tmp")
        assert end - start == sum(len(records.frame_record(record(i))) for i in (2 * b, 2 * b + 1))
        w.maybe_rotate()
    assert visible(tmp_path) == ["lab_images_node-a_00000.tfrecord"]
    assert w.count == 4 and w.path is not None
    w.close()
    assert visible(tmp_path) == ["lab_images_node-a_00000.tfrecord", "lab_images_node-a_00001.tfrecord"]
    assert [len(keys_in(p)) for p in w.finalized] == [6, 4]
    assert keys_in(w.finalized[0]) + keys_in(w.finalized[1]) == [key(i) for i in range(10)]


def test_full_shard_finalized_by_next_append(tmp_path: Path) -> None:
    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=2)
    first, _, _ = w.append([record(0), record(1)])
    assert visible(tmp_path) == []  # not inside the append that filled it
    second, _, _ = w.append([record(2)])
    assert second != first and visible(tmp_path) == ["lab_images_n_00000.tfrecord"]
    w.close()
    assert [len(keys_in(p)) for p in w.finalized] == [2, 1]


@pytest.mark.timing
def test_rotation_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # the writer's clock, moved by the test: no sleep, no dependence on speed
    monkeypatch.setattr(shards.time, "monotonic", lambda: clock[0])
    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=100, max_age=0.3)
    w.append([record(0)])
    clock[0] += 0.29
    assert w.maybe_rotate() is None
    clock[0] += 0.02
    final = w.maybe_rotate()
    assert final == tmp_path / "lab_images_n_00000.tfrecord" and w.path is None
    assert w.maybe_rotate() is None  # nothing open
    w.append([record(1)])
    assert w.close() == tmp_path / "lab_images_n_00001.tfrecord"


def test_names_continue_after_highest_on_disk(tmp_path: Path) -> None:
    for name in [
        "lab_images_n_00003.tfrecord",
        ".lab_images_n_00007.tfrecord.gz.tmp",
        "val_lab_images_n_00005.tfrecord.gz",
        "lab_images_other_00050.tfrecord",
        "lab_images_n_x_00090.tfrecord",
        "lab_images_n_00002.tfrecord.zlib",
    ]:
        (tmp_path / name).write_bytes(b"")
    assert shards.highest_number(tmp_path, "n") == 7
    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=1)
    assert w.append([record(0)])[0].name == ".lab_images_n_00008.tfrecord.tmp"
    w.append([record(1)])
    w.close()
    assert [p.name for p in w.finalized] == ["lab_images_n_00008.tfrecord", "lab_images_n_00009.tfrecord"]
    w2 = shards.ShardWriter(tmp_path, "n")
    w2.append([record(2)])
    assert w2.close() == tmp_path / "lab_images_n_00010.tfrecord"


def test_node_names_are_sanitised(tmp_path: Path) -> None:
    assert shards.safe_node("embed@host:1/gpu 0") == "embed-host-1-gpu-0"
    assert shards.safe_node("a.b_c-D9") == "a.b_c-D9"
    with pytest.raises(ValueError):
        shards.safe_node("")
    w = shards.ShardWriter(tmp_path, "embed@host")
    w.append([record(0)])
    assert w.close() == tmp_path / "lab_images_embed-host_00000.tfrecord"


@pytest.mark.parametrize("compression", ["none", "gzip", "zlib"])
def test_compressed_shards_read_back(tmp_path: Path, compression: str) -> None:
    import tensorflow as tf

    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=3, compression=compression)
    for i in range(0, 7, 2):
        w.append([record(i), record(i + 1)])
        w.maybe_rotate()
    w.close()
    ext = shards.EXTENSIONS[compression]
    assert visible(tmp_path) == [f"lab_images_n_{n:05d}.tfrecord{ext}" for n in range(2)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [k for p in w.finalized for k in keys_in(p)] == [key(i) for i in range(8)]
    ds = dataset.read_dataset(str(tmp_path / shards.SHARD_GLOB), lab_size=S)
    got = list(ds.as_numpy_iterator())
    assert len(got) == 8
    for i, ex in enumerate(got):
        f = fields(i)
        assert ex["image_l"].shape == (S, S, 1) and ex["image_ab"].shape == (S, S, 2)
        assert ex["image_embedding"].shape == (1001,) and ex["image_l"].dtype == np.float32
        assert np.array_equal(ex["image_l"][..., 0], f["l"]) and np.array_equal(ex["image_ab"], f["ab"])
        assert np.array_equal(ex["image_embedding"], f["embedding"])
        assert (ex["image_name"], ex["image_key"], ex["image_source"]) == (f["name"], f["key"], f["source"])
    assert isinstance(ds.element_spec["image_l"], tf.TensorSpec)


def test_read_dataset_mixed_files_and_missing_extras(tmp_path: Path) -> None:
    import tensorflow as tf

    for compression in ("none", "gzip"):
        with shards.ShardWriter(tmp_path, compression, compression=compression) as w:
            w.append([record(0 if compression == "none" else 1)])
    ex = tf_example(fields(2))
    del ex.features.feature["image_key"]
    del ex.features.feature["image_source"]
    with tf.io.TFRecordWriter(str(tmp_path / "old.tfrecord")) as tw:
        tw.write(ex.SerializeToString())
    files = [
        str(tmp_path / name)
        for name in ("lab_images_none_00000.tfrecord", "lab_images_gzip_00000.tfrecord.gz", "old.tfrecord")
    ]
    got = list(dataset.read_dataset(files, lab_size=S).as_numpy_iterator())
    assert [g["image_key"] for g in got] == [key(0), b"", key(1)]  # grouped by compression
    assert got[1]["image_source"] == b"" and got[1]["image_name"] == fields(2)["name"]
    with pytest.raises(FileNotFoundError):
        dataset.read_dataset(str(tmp_path / "nothing_*.tfrecord"))


def test_readers_never_see_half_a_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = shards._write_final

    def spy(src: Path, dst: Path, *args: object) -> None:
        before = visible(tmp_path)
        write(src, dst, *args)  # type: ignore[arg-type]
        assert dst.name.startswith(".") and visible(tmp_path) == before  # compressed, not yet published

    monkeypatch.setattr(shards, "_write_final", spy)
    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=4, compression="gzip")
    done: dict[str, int] = {}
    for b in range(9):
        w.append([record(b), record(100 + b)])
        for name in visible(tmp_path):  # every visible shard is complete from the moment it appears
            n = len(keys_in(tmp_path / name))
            assert done.setdefault(name, n) == n == 4
        w.maybe_rotate()
        assert not any(tmp_path.glob(".*.partial"))
    w.close()
    assert sum(len(keys_in(p)) for p in w.finalized) == 18


def test_no_temp_after_close(tmp_path: Path) -> None:
    w = shards.ShardWriter(tmp_path, "n")
    assert w.close() is None and list(tmp_path.iterdir()) == []  # nothing was opened
    path, start, _ = w.append([record(0)])
    w.discard(start, [False])
    assert w.close() is None and list(tmp_path.iterdir()) == []  # a shard of discarded records leaves nothing
    w.append([record(1)])
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["lab_images_n_00001.tfrecord"]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_discard_drops_records_when_finalizing(tmp_path: Path, compression: str) -> None:
    w = shards.ShardWriter(tmp_path, "n", examples_per_shard=4, compression=compression)
    path, _, _ = w.append([record(0), record(1)])
    _, start, _ = w.append([record(2), record(3), record(4)])
    w.discard(start, [True, False, True])  # record 3 was claimed by another shard
    assert w.count == 4 and keys_in(path) == [key(i) for i in range(5)]  # on disk until finalized
    for bad_start, keep in ((start + 1, [True] * 3), (start, [True]), (0, [True] * 3)):
        with pytest.raises(ValueError):
            w.discard(bad_start, keep)
    final = w.maybe_rotate()
    assert final is not None and keys_in(final) == [key(i) for i in (0, 1, 2, 4)]
    _, start, _ = w.append([record(5)])
    w.discard(start, [False])
    _, start2, _ = w.append([record(6), record(7)])
    w.discard(start2, [False, False])
    assert w.count == 0 and w.close() is None  # every record left out: no shard
    assert visible(tmp_path) == [final.name] and [p.name for p in tmp_path.iterdir()] == [final.name]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        shards.ShardWriter(tmp_path, "n", compression="lz4")
    with pytest.raises(ValueError):
        shards.ShardWriter(tmp_path, "n", examples_per_shard=0)
    with pytest.raises(ValueError):
        shards.ShardWriter(tmp_path, "n").discard(0, [True])  # nothing open


# ---- recovery ---------------------------------------------------------------------------------------


def temp_shard(out: Path, node: str, n: int, items: list[int], tail: bytes = b"", ext: str = "") -> Path:
    """A temp shard as a killed writer leaves it: complete records, then maybe a torn tail."""
    path = out / f".lab_images_{node}_{n:05d}.tfrecord{ext}.tmp"
    path.write_bytes(b"".join(records.frame_record(record(i)) for i in items) + tail)
    return path


def spans_of(items: list[int]) -> list[tuple[int, int]]:
    out, offset = [], 0
    for i in items:
        end = offset + len(records.frame_record(record(i)))
        out.append((offset, end))
        offset = end
    return out


@pytest.mark.parametrize("cut", [1, 11, 12, 15, 16, 1000, -5, -4, -1])
def test_kill_mid_record_cuts_only_the_torn_one(tmp_path: Path, cut: int) -> None:
    torn = records.frame_record(record(9))
    path = temp_shard(tmp_path, "n", 0, [0, 1, 2], tail=torn[:cut])
    spans, end = records.scan_records(path)
    assert spans == spans_of([0, 1, 2]) and end == spans[-1][1]
    assert shards.recover_temp_shards(tmp_path, "n") == [path]
    assert path.stat().st_size == end and keys_in(path) == [key(i) for i in (0, 1, 2)]


def test_garbage_tail_and_corrupt_middle(tmp_path: Path) -> None:
    path = temp_shard(tmp_path, "n", 0, [0, 1], tail=os.urandom(5000))
    assert records.scan_records(path) == (spans_of([0, 1]), spans_of([0, 1])[-1][1])
    data = bytearray(b"".join(records.frame_record(record(i)) for i in range(5)))
    spans = spans_of(list(range(5)))
    data[spans[2][0] + 100] ^= 0x01  # a flipped bit in record 2's payload
    path.write_bytes(bytes(data))
    assert records.scan_records(path) == (spans[:2], spans[1][1])
    data[spans[2][0] + 100] ^= 0x01
    data[spans[3][0] + 12] ^= 0x80  # record 3's length CRC
    path.write_bytes(bytes(data))
    assert records.scan_records(path) == (spans[:3], spans[2][1])
    data[spans[3][0] + 12] ^= 0x80
    struct.pack_into("<Q", data, spans[1][0], 10**9)  # a length that the CRC rejects
    path.write_bytes(bytes(data))
    assert records.scan_records(path) == (spans[:1], spans[0][1])


def test_recovery_keeps_chosen_and_finalizes(tmp_path: Path) -> None:
    mine = temp_shard(tmp_path, "n", 4, [0, 1, 2, 3, 4], tail=b"\x07" * 20, ext=".gz")
    other = temp_shard(tmp_path, "n_x", 0, [5], tail=b"junk")
    partial = tmp_path / ".lab_images_n_00004.tfrecord.gz.partial"
    partial.write_bytes(b"half a gzip")
    assert shards.recover_temp_shards(tmp_path, "n") == [mine]
    assert not partial.exists() and other.read_bytes().endswith(b"junk")  # other nodes untouched
    keep = {key(1), key(3)}
    assert shards.rewrite_shard(mine, lambda d: records.example_key(d) in keep) == 2
    assert keys_in(mine) == [key(1), key(3)] and not any(tmp_path.glob("*.partial"))
    final = shards.finalize_temp(mine, "gzip")
    assert final == tmp_path / "lab_images_n_00004.tfrecord.gz" and not mine.exists()
    got = list(dataset.read_dataset(str(final), lab_size=S).as_numpy_iterator())
    assert [g["image_key"] for g in got] == [key(1), key(3)]
    assert shards.recover_temp_shards(tmp_path) == [other]  # all nodes
    assert keys_in(other) == [key(5)]


def test_finalize_temp_edge_cases(tmp_path: Path) -> None:
    empty = temp_shard(tmp_path, "n", 0, [])
    assert shards.finalize_temp(empty, "gzip") is None and not empty.exists()
    # a crash between publishing a final and deleting the temp, then a restart with another setting
    temp = temp_shard(tmp_path, "n", 1, [0, 1])
    (tmp_path / "lab_images_n_00001.tfrecord.zlib").write_bytes(b"stale")
    assert shards.rewrite_shard(temp, lambda d: True) == 2
    assert shards.finalize_temp(temp, "none") == tmp_path / "lab_images_n_00001.tfrecord"
    assert visible(tmp_path) == ["lab_images_n_00001.tfrecord"] and not temp.exists()
    assert keys_in(tmp_path / "lab_images_n_00001.tfrecord") == [key(0), key(1)]
    with pytest.raises(ValueError):
        shards.finalize_temp(tmp_path / "lab_images_n_00001.tfrecord")


def test_writer_after_a_killed_writer(tmp_path: Path) -> None:
    dead = shards.ShardWriter(tmp_path, "n")
    path, _, _ = dead.append([record(0), record(1)])
    with open(path, "ab") as f:  # the kill tore the next write
        f.write(records.frame_record(record(2))[:777])
    w = shards.ShardWriter(tmp_path, "n")  # a restart does not collide with the leftover temp
    w.append([record(3)])
    assert w.close() == tmp_path / "lab_images_n_00001.tfrecord"
    (temp,) = shards.recover_temp_shards(tmp_path, "n")
    assert temp == path and shards.finalize_temp(temp, "none") == tmp_path / "lab_images_n_00000.tfrecord"
    assert keys_in(tmp_path / "lab_images_n_00000.tfrecord") == [key(0), key(1)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), data=st.data())
def test_truncation_anywhere_keeps_exactly_the_whole_records(sizes: list[int], data: st.DataObject) -> None:
    payloads = [bytes([n % 251]) * n for n in sizes]
    frames = [records.frame_record(p) for p in payloads]
    blob = b"".join(frames)
    cut = data.draw(st.integers(0, len(blob)), label="cut")
    ends = np.cumsum([len(f) for f in frames]).tolist()
    whole = [(start, end) for start, end in zip([0] + ends[:-1], ends, strict=True) if end <= cut]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ".lab_images_p_00000.tfrecord.tmp"
        path.write_bytes(blob[:cut])
        assert records.scan_records(path) == (whole, whole[-1][1] if whole else 0)
        shards.recover_temp_shards(Path(d), "p")
        assert [e[2] for e in records.iter_examples(path)] == payloads[: len(whole)]
        assert path.stat().st_size == (whole[-1][1] if whole else 0)
