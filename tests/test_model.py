"""The model: variable list, checkpoint resolution and loading by name, the network, greyscale, Embedder."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from common.model.checkpoint import (
    IGNORED_VARIABLES,
    REQUIRED_VARIABLES,
    CheckpointError,
    load_weights,
    resolve_checkpoint,
)
from common.model.embedder import Embedder, grayscale_uint8, preprocess, scale_grey
from testkit import ROOT
from testkit.checkpoint import (
    fake_weights,
    write_fake_checkpoint,
    write_v1_checkpoint,
    write_v1_checkpoint_with_saver,
)

# The variable list of the original 2016 slim checkpoint (inception_resnet_v2_2016_08_30.ckpt), read off
# the TF-slim definition: a copy of ../shared/reference/inception_resnet_v2_slim_variables.tsv (how it
# was made: tests/data/README.md)
REFERENCE = ROOT / "tests" / "data" / "inception_resnet_v2_slim_variables.tsv"
P = "InceptionResnetV2/"


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return {name: tuple(int(d) for d in shape.split(",") if d) for name, shape in rows}


def test_importing_the_model_modules_does_not_load_tensorflow():
    code = (
        "import sys, common.model.checkpoint, common.model.inception_resnet_v2, common.model.embedder; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_variable_lists():
    package = read_tsv(ROOT / "common" / "model" / "inception_resnet_v2_variables.tsv")
    assert len(REQUIRED_VARIABLES) == 898 and len(IGNORED_VARIABLES) == 10
    assert {**REQUIRED_VARIABLES, **IGNORED_VARIABLES} == package
    assert all(n.startswith(P + "AuxLogits/") for n in IGNORED_VARIABLES)
    biases = [n for n in REQUIRED_VARIABLES if n.endswith("/biases")]
    assert len(biases) == 41  # 40 residual up-projections + Logits/Logits
    reference = REFERENCE.read_text()
    assert len(reference.splitlines()) == 1 + 908  # the header, then every variable of the checkpoint
    assert reference == (ROOT / "common" / "model" / "inception_resnet_v2_variables.tsv").read_text()


# ---------------------------------------------------------------- greyscale and preprocessing


def all_colours(chunk: int) -> Iterator[np.ndarray]:
    """Every 24-bit RGB colour, `chunk` colours at a time, as uint8 [chunk, 3]."""
    for start in range(0, 1 << 24, chunk):
        codes = np.arange(start, start + chunk, dtype=np.uint32)
        yield np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8)


def test_grayscale_is_bit_exact_to_tensorflow_on_every_colour():
    import tensorflow as tf

    for rgb in all_colours(1 << 22):
        ours = grayscale_uint8(rgb)
        theirs = tf.image.rgb_to_grayscale(rgb).numpy()
        mismatch = np.flatnonzero(ours != theirs)
        assert mismatch.size == 0, f"{mismatch.size} colours differ, e.g. {rgb[mismatch[:3]].tolist()}"


def test_scaling_matches_the_original_float32_expression():
    import tensorflow as tf

    grey = np.arange(256, dtype=np.uint8)
    x = tf.cast(tf.constant(grey), tf.float32)
    assert np.array_equal(scale_grey(grey), (2 * x / 255 - 1).numpy())
    assert scale_grey(grey)[[0, 255]].tolist() == [-1.0, 1.0]


def test_numpy_preprocess_is_the_original_pipeline():
    import tensorflow as tf

    rgb = np.random.default_rng(3).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    grey3 = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(rgb))
    original = 2 * tf.cast(grey3, tf.float32) / 255 - 1
    assert np.array_equal(preprocess(rgb), original.numpy())


def test_embedder_preprocessing_equals_numpy_on_every_colour(embedder):
    for rgb in all_colours(1 << 22):
        ours = embedder.preprocess(rgb.reshape(1, 2048, 2048, 3)).numpy()
        assert ours.dtype == np.float32
        assert np.array_equal(ours, preprocess(rgb).reshape(ours.shape))


# ---------------------------------------------------------------- loading by name


def test_fake_checkpoint_is_a_single_v1_file(fake_checkpoint: Path):
    import tensorflow as tf

    assert [p.name for p in fake_checkpoint.parent.iterdir()] == [fake_checkpoint.name]
    shapes = tf.train.load_checkpoint(str(fake_checkpoint)).get_variable_to_shape_map()
    assert {n: tuple(s) for n, s in shapes.items()} == {**REQUIRED_VARIABLES, **IGNORED_VARIABLES}


def test_v1_save_op_writes_what_a_v1_saver_writes(tmp_path: Path):
    tensors = {
        "a/weights": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b/beta": np.ones(3, np.float32),
        "global_step": np.int64(3),
    }
    write_v1_checkpoint(tmp_path / "op.ckpt", tensors)
    write_v1_checkpoint_with_saver(tmp_path / "saver.ckpt", tensors)
    assert (tmp_path / "op.ckpt").read_bytes() == (tmp_path / "saver.ckpt").read_bytes()


def test_load_weights_reads_every_required_variable_by_name(fake_checkpoint: Path):
    loaded = load_weights(fake_checkpoint)
    expected = fake_weights(0)
    assert list(loaded) == list(REQUIRED_VARIABLES)
    for name, value in loaded.items():
        assert value.dtype == np.float32 and np.array_equal(value, expected[name]), name


@pytest.mark.parametrize("kind", ["missing", "unknown", "misshapen"])
def test_load_weights_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path, kind: str):
    name = P + "Repeat_1/block17_7/Branch_1/Conv2d_0b_1x7/weights"
    bad = {
        "missing": {"drop": [name]},
        "unknown": {"extra": {P + "Mixed_9z/weights": np.zeros((1, 1, 2, 2), np.float32)}},
        "misshapen": {"reshape": {name: (7, 1, 128, 160)}},
    }[kind]
    path = tmp_path / "bad.ckpt"
    write_fake_checkpoint(path, **bad)
    with pytest.raises(CheckpointError, match=kind) as info:
        load_weights(path)
    shown = P + "Mixed_9z/weights" if kind == "unknown" else name
    assert shown in str(info.value) and "\n" not in str(info.value)
    if kind == "misshapen":
        assert "(1, 7, 128, 160)" in str(info.value) and "(7, 1, 128, 160)" in str(info.value)


def test_aux_logits_are_optional_and_global_step_is_tolerated(tmp_path: Path):
    path = tmp_path / "ok.ckpt"
    write_fake_checkpoint(path, drop=list(IGNORED_VARIABLES), extra={"global_step": np.int64(7)})
    assert set(load_weights(path)) == set(REQUIRED_VARIABLES)


# ---------------------------------------------------------------- the network


def test_every_layer_holds_the_checkpoint_tensor_of_its_name(embedder):
    expected = fake_weights(0)
    slim = {"kernel": "weights", "bias": "biases"}
    seen = []
    for layer in embedder.model.layers:
        for var in layer.weights:
            leaf = var.path.rsplit("/", 1)[-1]
            name = P + layer.name.replace(".", "/") + "/" + slim.get(leaf, leaf)
            assert np.array_equal(np.asarray(var.numpy()), expected[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(REQUIRED_VARIABLES)


def slim_forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The 2016 slim Inception-ResNet-v2 written directly with tf.nn ops, from the weights by name."""
    import tensorflow as tf

    def conv(x, scope, stride=1, padding="SAME"):
        y = tf.nn.conv2d(x, w[f"{P}{scope}/weights"], stride, padding)
        bn = f"{P}{scope}/BatchNorm/"
        y = tf.nn.batch_normalization(
            y, w[bn + "moving_mean"], w[bn + "moving_variance"], w[bn + "beta"], None, 0.001
        )
        return tf.nn.relu(y)

    def chain(x, scope, convs):
        for c in convs:
            x = conv(x, f"{scope}/{c}")
        return x

    def block(x, scope, branches, scale, relu=True):
        mixed = tf.concat([chain(x, scope, b) for b in branches], 3)
        up_scope = f"{P}{scope}/Conv2d_1x1/"
        up = tf.nn.conv2d(mixed, w[up_scope + "weights"], 1, "SAME") + w[up_scope + "biases"]
        x = x + scale * up
        return tf.nn.relu(x) if relu else x

    def pool(x):
        return tf.nn.max_pool2d(x, 3, 2, "VALID")

    b35 = [
        ["Branch_0/Conv2d_1x1"],
        ["Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_3x3"],
        ["Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_0c_3x3"],
    ]
    b17 = [
        ["Branch_0/Conv2d_1x1"],
        ["Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x7", "Branch_1/Conv2d_0c_7x1"],
    ]
    b8 = [
        ["Branch_0/Conv2d_1x1"],
        ["Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x3", "Branch_1/Conv2d_0c_3x1"],
    ]
    x = conv(tf.constant(x), "Conv2d_1a_3x3", 2, "VALID")
    x = conv(x, "Conv2d_2a_3x3", 1, "VALID")
    x = pool(conv(x, "Conv2d_2b_3x3"))
    x = conv(x, "Conv2d_3b_1x1", 1, "VALID")
    x = pool(conv(x, "Conv2d_4a_3x3", 1, "VALID"))
    x = tf.concat(
        [
            chain(x, "Mixed_5b", ["Branch_0/Conv2d_1x1"]),
            chain(x, "Mixed_5b", ["Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_5x5"]),
            chain(
                x, "Mixed_5b", ["Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_0c_3x3"]
            ),
            conv(tf.nn.avg_pool2d(x, 3, 1, "SAME"), "Mixed_5b/Branch_3/Conv2d_0b_1x1"),
        ],
        3,
    )
    assert x.shape[1:] == (35, 35, 320)
    for i in range(1, 11):
        x = block(x, f"Repeat/block35_{i}", b35, 0.17)
    x = tf.concat(
        [
            conv(x, "Mixed_6a/Branch_0/Conv2d_1a_3x3", 2, "VALID"),
            conv(
                chain(x, "Mixed_6a", ["Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_3x3"]),
                "Mixed_6a/Branch_1/Conv2d_1a_3x3",
                2,
                "VALID",
            ),
            pool(x),
        ],
        3,
    )
    assert x.shape[1:] == (17, 17, 1088)
    for i in range(1, 21):
        x = block(x, f"Repeat_1/block17_{i}", b17, 0.10)
    x = tf.concat(
        [
            conv(conv(x, "Mixed_7a/Branch_0/Conv2d_0a_1x1"), "Mixed_7a/Branch_0/Conv2d_1a_3x3", 2, "VALID"),
            conv(conv(x, "Mixed_7a/Branch_1/Conv2d_0a_1x1"), "Mixed_7a/Branch_1/Conv2d_1a_3x3", 2, "VALID"),
            conv(
                chain(x, "Mixed_7a", ["Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3"]),
                "Mixed_7a/Branch_2/Conv2d_1a_3x3",
                2,
                "VALID",
            ),
            pool(x),
        ],
        3,
    )
    assert x.shape[1:] == (8, 8, 2080)
    for i in range(1, 10):
        x = block(x, f"Repeat_2/block8_{i}", b8, 0.20)
    x = block(x, "Block8", b8, 1.0, relu=False)
    x = tf.nn.avg_pool2d(conv(x, "Conv2d_7b_1x1"), 8, 1, "VALID")
    x = tf.reshape(x, [-1, 1536])
    return (tf.matmul(x, w[P + "Logits/Logits/weights"]) + w[P + "Logits/Logits/biases"]).numpy()


def test_images(n: int = 2) -> np.ndarray:
    """Structured uint8 RGB test images (a gradient, stripes, noise), so that logits differ between them."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:299, 0:299]
    base = [
        np.stack([xx * 255 // 298, yy * 255 // 298, (xx + yy) * 255 // 596], -1),
        np.stack([(xx // 20 % 2) * 255, (yy // 30 % 2) * 200, np.full_like(xx, 60)], -1),
    ]
    imgs = [*base, *(rng.integers(0, 256, (299, 299, 3)) for _ in range(max(0, n - 2)))]
    return np.stack(imgs[:n]).astype(np.uint8)


test_images.__test__ = False  # a helper, not a test


def test_logits_equal_an_independent_slim_computation(embedder):
    x = preprocess(test_images(2))
    ours = embedder.model(x, training=False).numpy()
    theirs = slim_forward(fake_weights(0), x)
    assert ours.shape == (2, 1001) and ours.dtype == np.float32
    assert np.isfinite(ours).all() and np.abs(ours).max() < 1e3 and ours.std(axis=1).min() > 0.1
    assert np.abs(ours[0] - ours[1]).max() > 0.05, "the logits must depend on the image"
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_embed_preprocesses_inside_and_batches(embedder):
    rgb = test_images(3)
    logits = embedder.embed(rgb)
    assert logits.shape == (3, 1001) and logits.dtype == np.float32
    direct = embedder.model(preprocess(rgb), training=False).numpy()
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    assert embedder.embed(rgb[:0]).shape == (0, 1001)
    with pytest.raises(ValueError):
        embedder.embed(rgb.astype(np.float32))


def test_embed_lab_gives_the_logits_of_embed_and_the_lab_channels(embedder):
    from common.pictures.lab import lab_channels

    rgb = test_images(3)  # batch_size 2: two model calls, the second short
    logits, l_channel, ab = embedder.embed_lab(rgb)
    assert logits.shape == (3, 1001) and l_channel.shape == (3, 299, 299) and ab.shape == (3, 299, 299, 2)
    assert logits.dtype == l_channel.dtype == ab.dtype == np.float32
    np.testing.assert_allclose(logits, embedder.embed(rgb), rtol=1e-5, atol=1e-5)
    for image, l_one, ab_one in zip(rgb, l_channel, ab, strict=True):
        l_ref, ab_ref = lab_channels(image)
        assert np.abs(l_one - l_ref).max() <= 1e-4 and np.abs(ab_one - ab_ref).max() <= 1e-4
    assert [a.shape for a in embedder.embed_lab(rgb[:0])] == [(0, 1001), (0, 299, 299), (0, 299, 299, 2)]
    with pytest.raises(ValueError):
        embedder.embed_lab(rgb[:, :224, :224])
    # KOALA_LAB_SIZE=224: the same call resizes as the original writer does (tests/test_lab.py: vs skimage)
    logits_224, l_224, ab_224 = embedder.embed_lab(rgb, 224)
    np.testing.assert_allclose(logits_224, logits, rtol=1e-5, atol=1e-5)
    for image, l_one, ab_one in zip(rgb, l_224, ab_224, strict=True):
        l_ref, ab_ref = lab_channels(image, 224)
        assert np.abs(l_one - l_ref).max() <= 1e-5 and np.abs(ab_one - ab_ref).max() <= 1e-5
    assert [a.shape for a in embedder.embed_lab(rgb[:0], 224)] == [(0, 1001), (0, 224, 224), (0, 224, 224, 2)]


@pytest.mark.slow  # 43 s: builds the network twice more (XLA, float16); both are opt-in settings
def test_xla_and_mixed_precision_are_opt_in_and_close(fake_checkpoint: Path, embedder):
    rgb = test_images(3)
    exact = embedder.embed(rgb)
    xla = Embedder(fake_checkpoint, batch_size=2, xla=True)
    np.testing.assert_allclose(xla.embed(rgb), exact, rtol=1e-4, atol=1e-4)  # the short batch is padded
    mixed = Embedder(fake_checkpoint, batch_size=2, mixed_precision=True)
    logits = mixed.embed(rgb)
    assert logits.dtype == np.float32 and mixed.model.get_layer("Conv2d_1a_3x3").compute_dtype == "float16"
    np.testing.assert_allclose(logits, exact, rtol=0.02, atol=0.1)


def test_device_is_where_the_model_runs(embedder):
    """`device` names the kind of device the model's outputs come from (the GPU where TensorFlow has
    one, else the CPU: the CPU on a machine without one), and the default batch size is that one's."""
    import tensorflow as tf

    from common.model.embedder import CPU_BATCH_SIZE, GPU_BATCH_SIZE, default_batch_size

    out = embedder.model(np.zeros((1, 299, 299, 3), np.float32), training=False)
    ran_on = tf.DeviceSpec.from_string(out.device).device_type  # from ".../device:CPU:0"
    assert ran_on in ("CPU", "GPU"), out.device
    assert embedder.device == ran_on
    assert default_batch_size() == {"CPU": CPU_BATCH_SIZE, "GPU": GPU_BATCH_SIZE}[ran_on]


# ---------------------------------------------------------------- resolving a checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "inception_resnet_v2_2016_08_30.ckpt"
    path.parent.mkdir()
    write_v1_checkpoint(path, {"a/weights": np.ones((2, 2), np.float32)})
    return path


def make_tar(path: Path, members: dict[str, bytes], kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(data), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


def test_resolve_a_plain_file_and_refuse_what_is_not_one(tiny_checkpoint: Path, tmp_path: Path):
    assert resolve_checkpoint(tiny_checkpoint, tmp_path / "cache") == tiny_checkpoint
    assert not (tmp_path / "cache").exists()
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope.ckpt", tmp_path / "cache")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"x" * 1000)
    with pytest.raises(CheckpointError, match="not a TensorFlow checkpoint"):
        resolve_checkpoint(junk, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(junk)


def test_resolve_a_release_extracts_the_ckpt_once(tiny_checkpoint: Path, tmp_path: Path):
    data = tiny_checkpoint.read_bytes()
    archive = make_tar(tmp_path / "release.tar.gz", {"README": b"hi", tiny_checkpoint.name: data})
    cache = tmp_path / "cache"
    got = resolve_checkpoint(archive, cache)
    assert got == cache / tiny_checkpoint.name and got.read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == [got.name, "release.tar.gz.extracted.json"]

    first = got.stat()
    assert resolve_checkpoint(str(archive), cache) == got
    again = got.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "extracted again"
    got.unlink()
    assert resolve_checkpoint(archive, cache).read_bytes() == data


@pytest.mark.parametrize(
    "name, kind",
    [
        ("../evil.ckpt", tarfile.REGTYPE),
        ("/tmp/evil.ckpt", tarfile.REGTYPE),
        ("a/../../evil.ckpt", tarfile.REGTYPE),
        ("x.ckpt", tarfile.SYMTYPE),
        ("x.ckpt", tarfile.LNKTYPE),
        ("x.ckpt", tarfile.CHRTYPE),
    ],
)
def test_resolve_refuses_an_unsafe_release(tmp_path: Path, name: str, kind: bytes):
    archive = make_tar(
        tmp_path / "bad.tar.gz", {name: b"" if kind != tarfile.REGTYPE else b"data"}, kind, "/etc/passwd"
    )
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="unsafe member"):
        resolve_checkpoint(archive, cache)
    assert not (tmp_path / "evil.ckpt").exists() and not list(cache.glob("*.ckpt"))


def test_resolve_refuses_a_release_without_one_ckpt(tmp_path: Path):
    archive = make_tar(tmp_path / "r.tar.gz", {"a.txt": b"1"})
    with pytest.raises(CheckpointError, match="exactly one .ckpt"):
        resolve_checkpoint(archive, tmp_path / "cache")


class ReleaseServer:
    """A loopback HTTP server of one file, with Range support (optional) and a request log."""

    def __init__(self, data: bytes, ranges: bool = True, cut_first: int | None = None):
        self.data, self.ranges, self.cut_first = data, ranges, cut_first
        self.requests: list[str | None] = []  # the Range header of each request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server's name
                server.requests.append(self.headers.get("Range"))
                if self.path != "/models/release.tar.gz":
                    self.send_error(404)
                    return
                start = 0
                if server.ranges and self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].rstrip("-"))
                body = server.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    size = len(server.data)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first is not None and len(server.requests) == 1:
                    body = body[: server.cut_first]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/release.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def release(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    members = {tiny_checkpoint.name: tiny_checkpoint.read_bytes()}
    return make_tar(tmp_path / "release.tar.gz", members).read_bytes()


def serve(data: bytes, **kwargs) -> Iterator[ReleaseServer]:
    server = ReleaseServer(data, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def test_download_resumes_a_partial_file_and_is_cached(release: bytes, tmp_path: Path, tiny_checkpoint: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "release.tar.gz.part").write_bytes(release[:100])
    for server in serve(release):
        got = resolve_checkpoint(server.url, cache)
        assert server.requests == ["bytes=100-"]
        assert (cache / "release.tar.gz").read_bytes() == release
        assert got.read_bytes() == tiny_checkpoint.read_bytes()
        assert not (cache / "release.tar.gz.part").exists()
        assert not list(cache.glob("*.tmp"))
        assert resolve_checkpoint(server.url, cache) == got
        assert len(server.requests) == 1, "fetched again although cached"


def test_download_continues_after_a_cut_connection(release: bytes, tmp_path: Path):
    for server in serve(release, cut_first=150):
        resolve_checkpoint(server.url, tmp_path / "cache")
        assert server.requests == [None, "bytes=150-"]
        assert (tmp_path / "cache" / "release.tar.gz").read_bytes() == release


def test_download_starts_over_when_the_server_ignores_range(release: bytes, tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "release.tar.gz.part").write_bytes(b"garbage" * 20)
    for server in serve(release, ranges=False):
        resolve_checkpoint(server.url, cache)
        assert server.requests == ["bytes=140-"]
        assert (cache / "release.tar.gz").read_bytes() == release


def test_download_failure_is_a_checkpoint_error(release: bytes, tmp_path: Path):
    for server in serve(release):
        with pytest.raises(CheckpointError, match="download of .* failed"):
            resolve_checkpoint(server.url.replace("release", "missing"), tmp_path / "cache")
        assert not (tmp_path / "cache" / "missing.tar.gz").exists()
    with pytest.raises(CheckpointError, match="after 3 attempts"):
        resolve_checkpoint(server.url, tmp_path / "cache")  # the server is gone: connection refused
