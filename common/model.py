"""Inception-ResNet-v2 (TF-slim 2016 layout) in Keras: checkpoint resolution, loading by name, embedding.

TensorFlow is imported lazily, inside functions: importing this module costs only numpy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np

PREFIX = "InceptionResnetV2/"
SEP = "."  # stands for "/" of a slim scope in Keras layer names (Keras 3 refuses "/")
IMAGE_SIZE = 299
NUM_CLASSES = 1001
BN_EPSILON = 0.001
# Training bookkeeping, not a weight: slim's training loop saves it beside the model variables, so a
# checkpoint saved by it may hold it. Tolerated (as a scalar) and never read.
TOLERATED_VARIABLES = frozenset({"global_step"})
_TABLE_MAGIC = 0xDB4775248B80FB57  # footer of an sstable: a V1 checkpoint file, or a V2 .index file
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """The checkpoint cannot be found, fetched, extracted, read, or does not fit the network."""


def _read_variable_list() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, ignored) name -> shape, from the package's copy of the slim variable list."""
    text = resources.files("common").joinpath("inception_resnet_v2_variables.tsv").read_text()
    required: dict[str, tuple[int, ...]] = {}
    ignored: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines()[1:]:
        name, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.split(",") if d)
        (ignored if name.startswith(PREFIX + "AuxLogits/") else required)[name] = dims
    return required, ignored


REQUIRED_VARIABLES, IGNORED_VARIABLES = _read_variable_list()


# ---------------------------------------------------------------- greyscale, exactly as TF on uint8


def _channel_tables() -> np.ndarray:
    """[3, 256] float32: weight_c * float32(v * float32(1/255)), as tf.image.rgb_to_grayscale computes."""
    levels = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
    weights = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    return weights[:, None] * levels[None, :]


_TABLES = _channel_tables()


def grayscale_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [..., 1] grey, bit-exact to `tf.image.rgb_to_grayscale` (TF CPU).

    TF: f = float32(x) * float32(1/255); s = (f_r*0.2989 + f_g*0.5870) + f_b*0.1140 in float32 (no FMA);
    g = uint8(trunc(s * 255.5)).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 [..., 3] RGB, got {rgb.dtype} {rgb.shape}")
    s = (_TABLES[0][rgb[..., 0]] + _TABLES[1][rgb[..., 1]]) + _TABLES[2][rgb[..., 2]]
    return (s * np.float32(255.5)).astype(np.uint8)[..., None]


def scale_grey(grey: np.ndarray) -> np.ndarray:
    """uint8 grey -> float32 `2*g/255 - 1`, in the original's float32 operation order."""
    return np.float32(2) * grey.astype(np.float32) / np.float32(255) - np.float32(1)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> the network's float32 input: greyscale, repeated on 3 channels, in [-1, 1]."""
    return np.repeat(scale_grey(grayscale_uint8(rgb)), 3, axis=-1)


_GREY_LUT: np.ndarray | None = None


def grey_lut() -> np.ndarray:
    """uint8 [2**24]: the grey level of every RGB colour, indexed by r<<16 | g<<8 | b (built once)."""
    global _GREY_LUT
    if _GREY_LUT is None:
        t = _TABLES  # the same float32 operations as grayscale_uint8, broadcast over r, g, b
        s = (t[0][:, None, None] + t[1][None, :, None]) + t[2][None, None, :]
        _GREY_LUT = (s * np.float32(255.5)).astype(np.uint8).reshape(-1)
    return _GREY_LUT


# ---------------------------------------------------------------- checkpoint: file, .tar.gz, URL


def resolve_checkpoint(spec: str | Path, cache_dir: Path) -> Path:
    """A readable checkpoint path from a .ckpt file / V2 prefix, a .tar.gz release, or an http(s) URL."""
    text = str(spec)
    cache_dir = Path(cache_dir).expanduser()
    if urlsplit(text).scheme in ("http", "https"):
        path = _download(text, cache_dir)
    else:
        path = Path(text).expanduser()
    if path.is_file() and _is_tarfile(path):
        path = _extract_checkpoint(path, cache_dir)
    return _check_checkpoint(path)


def _is_tarfile(path: Path) -> bool:
    """True when `path` is a (possibly compressed) tar archive."""
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _has_table_magic(path: Path) -> bool:
    """True when the file ends with the sstable magic number, as TF checkpoint (index) files do."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 48:
                return False
            f.seek(-8, os.SEEK_END)
            return int.from_bytes(f.read(8), "little") == _TABLE_MAGIC
    except OSError:
        return False


def _check_checkpoint(path: Path) -> Path:
    """`path` if it is a single-file (V1) checkpoint or a V2 prefix; CheckpointError otherwise."""
    index = path.with_name(path.name + ".index")
    if path.is_file():
        if not _has_table_magic(path):
            raise CheckpointError(f"not a TensorFlow checkpoint: {path}")
        return path
    if index.is_file():
        if not _has_table_magic(index):
            raise CheckpointError(f"not a TensorFlow checkpoint: {index}")
        return path
    raise CheckpointError(f"checkpoint not found: {path}")


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting this member could be unsafe, or None."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or name[1:2] == ":":
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path escapes the archive"
    if member.issym() or member.islnk():
        return "link"
    if member.isdev() or member.isfifo():
        return "device or fifo"
    return None


def _checkpoint_member(tar: tarfile.TarFile, archive: Path) -> tarfile.TarInfo:
    """The one `.ckpt` member of the release; the archive is refused if any member is unsafe."""
    found = []
    for member in tar:
        reason = _unsafe_reason(member)
        if reason:
            raise CheckpointError(f"refusing {archive}: unsafe member {member.name!r} ({reason})")
        if member.isfile() and member.name.endswith(".ckpt"):
            found.append(member)
    if len(found) != 1:
        names = ", ".join(m.name for m in found) or "none"
        raise CheckpointError(f"{archive} must hold exactly one .ckpt file, found: {names}")
    return found[0]


def _archive_id(archive: Path) -> dict[str, Any]:
    """What identifies an archive for the extraction cache."""
    st = archive.stat()
    return {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _extract_checkpoint(archive: Path, cache_dir: Path) -> Path:
    """Extract the release's `.ckpt` member into cache_dir once (atomically); reuse it afterwards."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker = cache_dir / f"{archive.name}.extracted.json"
    ident = _archive_id(archive)
    try:
        done = json.loads(marker.read_text())
        target = cache_dir / done["member"]
        if done["source"] == ident and target.is_file() and target.stat().st_size == done["bytes"]:
            return target
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tmp = cache_dir / f".{archive.name}.{os.getpid()}.tmp"
    try:
        with tarfile.open(archive) as tar:
            member = _checkpoint_member(tar, archive)
            target = cache_dir / PurePosixPath(member.name).name
            src = tar.extractfile(member)
            assert src is not None
            with src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot extract {archive}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(json.dumps({"source": ident, "member": target.name, "bytes": member.size}))
    return target


def _download(url: str, cache_dir: Path, attempts: int = 3) -> Path:
    """Fetch `url` into cache_dir once, resuming a `.part` file; the complete file is renamed into place."""
    final = cache_dir / (PurePosixPath(urlsplit(url).path).name or "checkpoint.tar.gz")
    if final.is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per cache: others wait, then find the file
        if not final.is_file():
            _download_locked(url, final, attempts)
    return final


def _download_locked(url: str, final: Path, attempts: int) -> None:
    """Up to `attempts` resumed fetches into `final`.part, then the rename into place."""
    import requests

    part = final.with_name(final.name + ".part")
    error: Exception | None = None
    for _ in range(attempts):
        try:
            _fetch(url, part)
            break
        except requests.HTTPError as e:
            raise CheckpointError(f"download of {url} failed: {e}") from e
        except (requests.RequestException, OSError, _urllib3_errors()) as e:
            error = e
    else:
        raise CheckpointError(f"download of {url} failed after {attempts} attempts: {error}")
    os.replace(part, final)


def _urllib3_errors() -> type[Exception]:
    """urllib3's base exception (raised by raw streams, outside requests' wrapping)."""
    from urllib3.exceptions import HTTPError

    return HTTPError


def _content_range(response: Any) -> tuple[int, int | None] | None:
    """(first byte, total size or None) of a 206 response's Content-Range, or None."""
    value = response.headers.get("Content-Range", "")
    if not value.startswith("bytes ") or "-" not in value:
        return None
    span, _, total = value[6:].partition("/")
    try:
        return int(span.split("-")[0]), (int(total) if total.strip().isdigit() else None)
    except ValueError:
        return None


def _fetch(url: str, part: Path) -> None:
    """One attempt: continue `part` with a Range request (start over if the server ignores it)."""
    import requests
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=(15, 60)) as r:
        if r.status_code == 416 and offset:
            if r.headers.get("Content-Range", "") == f"bytes */{offset}":
                return  # the part is already complete
            part.unlink()
            raise OSError("server refused the range; starting over")
        r.raise_for_status()
        if r.status_code == 206:
            span = _content_range(r)
            if span is None or span[0] != offset:
                part.unlink(missing_ok=True)
                raise OSError(f"unexpected Content-Range {r.headers.get('Content-Range')!r}; starting over")
            total = span[1]
        else:  # 200: the server ignored the range, start over
            offset, total = 0, _int_header(r, "Content-Length")
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5]) as bar,
        ):
            for chunk in r.raw.stream(_CHUNK, decode_content=False):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"incomplete download: {size} of {total} bytes")


def _int_header(response: Any, name: str) -> int | None:
    """An integer header, or None when absent or malformed."""
    value = response.headers.get(name, "")
    return int(value) if value.isdigit() else None


# ---------------------------------------------------------------- weights, by name


def _listing(names: Iterable[str], limit: int = 5) -> str:
    """A short comma-separated list of names."""
    names = list(names)
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_variables(shapes: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming the missing, unknown and misshapen variables of a checkpoint's listing."""
    problems = []
    missing = [n for n in REQUIRED_VARIABLES if n not in shapes]
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    known = {**REQUIRED_VARIABLES, **IGNORED_VARIABLES}
    unknown = sorted(
        n for n, s in shapes.items() if n not in known and not (n in TOLERATED_VARIABLES and s == ())
    )
    if unknown:
        problems.append(f"{len(unknown)} unknown: {_listing(unknown)}")
    misshapen = [
        f"{n} expected {known[n]} found {shapes[n]}"
        for n in known
        if n in shapes and tuple(shapes[n]) != known[n]
    ]
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen: {_listing(misshapen)}")
    if problems:
        raise CheckpointError("not the Inception-ResNet-v2 checkpoint: " + "; ".join(problems))


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The 898 required float32 tensors of a checkpoint, read by name; what does not fit is refused."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(path))
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    shapes = {n: tuple(s) for n, s in reader.get_variable_to_shape_map().items()}
    check_variables(shapes)
    dtypes = reader.get_variable_to_dtype_map()
    bad = [f"{n} ({dtypes[n].name})" for n in REQUIRED_VARIABLES if not dtypes[n].is_floating]
    if bad:
        raise CheckpointError(f"not floating-point: {_listing(bad)}")
    return {n: np.asarray(reader.get_tensor(n), dtype=np.float32) for n in REQUIRED_VARIABLES}


# ---------------------------------------------------------------- the network


def layer_name(scope: str) -> str:
    """Keras layer name of a slim scope ("Mixed_5b/Branch_0/Conv2d_1x1" -> "Mixed_5b.Branch_0.Conv2d_1x1")."""
    return scope.replace("/", SEP)


def slim_scope(name: str) -> str:
    """Slim scope of a Keras layer name: the inverse of layer_name, with the InceptionResnetV2/ prefix."""
    return PREFIX + name.replace(SEP, "/")


# Keras variable attribute -> slim variable name, per layer kind
_SLOTS = {
    "Conv2D": (("kernel", "weights"), ("bias", "biases")),
    "Dense": (("kernel", "weights"), ("bias", "biases")),
    "BatchNormalization": (
        ("beta", "beta"),
        ("moving_mean", "moving_mean"),
        ("moving_variance", "moving_variance"),
    ),
}


def model_variables(model: Any) -> list[tuple[str, Any]]:
    """(slim variable name, Keras variable) for every variable of the model, derived from layer names."""
    pairs = []
    for layer in model.layers:
        if not layer.weights:
            continue
        slots = _SLOTS[type(layer).__name__]
        owned = [
            (f"{slim_scope(layer.name)}/{slim}", getattr(layer, attr))
            for attr, slim in slots
            if getattr(layer, attr, None) is not None
        ]
        if len(owned) != len(layer.weights):
            raise AssertionError(f"layer {layer.name} has variables that are not mapped")
        pairs.extend(owned)
    return pairs


class _Net:
    """Builds the slim graph layer by layer; every variable-owning layer is named after its slim scope."""

    def __init__(self, dtype: str | None):
        import keras

        self.L = keras.layers
        self.dtype = dtype

    def conv(
        self,
        x: Any,
        scope: str,
        filters: int,
        kernel: int | tuple[int, int],
        strides: int = 1,
        padding: str = "same",
    ) -> Any:
        """slim.conv2d: convolution without bias, batch norm (no gamma), ReLU."""
        L, name = self.L, layer_name(scope)
        x = L.Conv2D(
            filters, kernel, strides=strides, padding=padding, use_bias=False, name=name, dtype=self.dtype
        )(x)
        x = L.BatchNormalization(
            epsilon=BN_EPSILON, center=True, scale=False, name=name + SEP + "BatchNorm", dtype=self.dtype
        )(x)
        return L.ReLU(name=name + SEP + "Relu", dtype=self.dtype)(x)

    def max_pool(self, x: Any, scope: str) -> Any:
        """3x3 stride-2 VALID max pool."""
        return self.L.MaxPooling2D(3, strides=2, padding="valid", name=layer_name(scope), dtype=self.dtype)(x)

    def concat(self, xs: list[Any], scope: str) -> Any:
        """Channel concatenation of the branches, in branch order."""
        return self.L.Concatenate(axis=-1, name=layer_name(scope + "/concat"), dtype=self.dtype)(xs)

    def residual(self, x: Any, branches: list[Any], scope: str, scale: float, relu: bool = True) -> Any:
        """net += scale * Conv2d_1x1(concat(branches)) (biased, no BN, linear), then ReLU if `relu`."""
        L, name = self.L, layer_name(scope)
        up = L.Conv2D(x.shape[-1], 1, use_bias=True, name=name + SEP + "Conv2d_1x1", dtype=self.dtype)(
            self.concat(branches, scope)
        )
        if scale != 1.0:
            up = L.Rescaling(scale, name=name + SEP + "mul", dtype=self.dtype)(up)
        x = L.Add(name=name + SEP + "add", dtype=self.dtype)([x, up])
        return L.ReLU(name=name + SEP + "Relu", dtype=self.dtype)(x) if relu else x

    def block35(self, x: Any, scope: str, scale: float) -> Any:
        """35x35 residual block (Inception-ResNet-A)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 32, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 32, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_3x3", 32, 3)
        b2 = self.conv(x, f"{scope}/Branch_2/Conv2d_0a_1x1", 32, 1)
        b2 = self.conv(b2, f"{scope}/Branch_2/Conv2d_0b_3x3", 48, 3)
        b2 = self.conv(b2, f"{scope}/Branch_2/Conv2d_0c_3x3", 64, 3)
        return self.residual(x, [b0, b1, b2], scope, scale)

    def block17(self, x: Any, scope: str, scale: float) -> Any:
        """17x17 residual block (Inception-ResNet-B)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 192, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 128, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_1x7", 160, (1, 7))
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0c_7x1", 192, (7, 1))
        return self.residual(x, [b0, b1], scope, scale)

    def block8(self, x: Any, scope: str, scale: float, relu: bool = True) -> Any:
        """8x8 residual block (Inception-ResNet-C)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 192, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 192, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_1x3", 224, (1, 3))
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0c_3x1", 256, (3, 1))
        return self.residual(x, [b0, b1], scope, scale, relu)

    def stem(self, x: Any) -> Any:
        """299x299x3 -> 35x35x192."""
        x = self.conv(x, "Conv2d_1a_3x3", 32, 3, strides=2, padding="valid")
        x = self.conv(x, "Conv2d_2a_3x3", 32, 3, padding="valid")
        x = self.conv(x, "Conv2d_2b_3x3", 64, 3)
        x = self.max_pool(x, "MaxPool_3a_3x3")
        x = self.conv(x, "Conv2d_3b_1x1", 80, 1, padding="valid")
        x = self.conv(x, "Conv2d_4a_3x3", 192, 3, padding="valid")
        return self.max_pool(x, "MaxPool_5a_3x3")

    def mixed_5b(self, x: Any) -> Any:
        """35x35x192 -> 35x35x320."""
        b0 = self.conv(x, "Mixed_5b/Branch_0/Conv2d_1x1", 96, 1)
        b1 = self.conv(x, "Mixed_5b/Branch_1/Conv2d_0a_1x1", 48, 1)
        b1 = self.conv(b1, "Mixed_5b/Branch_1/Conv2d_0b_5x5", 64, 5)
        b2 = self.conv(x, "Mixed_5b/Branch_2/Conv2d_0a_1x1", 64, 1)
        b2 = self.conv(b2, "Mixed_5b/Branch_2/Conv2d_0b_3x3", 96, 3)
        b2 = self.conv(b2, "Mixed_5b/Branch_2/Conv2d_0c_3x3", 96, 3)
        b3 = self.L.AveragePooling2D(
            3,
            strides=1,
            padding="same",
            dtype=self.dtype,
            name=layer_name("Mixed_5b/Branch_3/AvgPool_0a_3x3"),
        )(x)
        b3 = self.conv(b3, "Mixed_5b/Branch_3/Conv2d_0b_1x1", 64, 1)
        return self.concat([b0, b1, b2, b3], "Mixed_5b")

    def mixed_6a(self, x: Any) -> Any:
        """35x35x320 -> 17x17x1088."""
        b0 = self.conv(x, "Mixed_6a/Branch_0/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b1 = self.conv(x, "Mixed_6a/Branch_1/Conv2d_0a_1x1", 256, 1)
        b1 = self.conv(b1, "Mixed_6a/Branch_1/Conv2d_0b_3x3", 256, 3)
        b1 = self.conv(b1, "Mixed_6a/Branch_1/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b2 = self.max_pool(x, "Mixed_6a/Branch_2/MaxPool_1a_3x3")
        return self.concat([b0, b1, b2], "Mixed_6a")

    def mixed_7a(self, x: Any) -> Any:
        """17x17x1088 -> 8x8x2080."""
        b0 = self.conv(x, "Mixed_7a/Branch_0/Conv2d_0a_1x1", 256, 1)
        b0 = self.conv(b0, "Mixed_7a/Branch_0/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b1 = self.conv(x, "Mixed_7a/Branch_1/Conv2d_0a_1x1", 256, 1)
        b1 = self.conv(b1, "Mixed_7a/Branch_1/Conv2d_1a_3x3", 288, 3, strides=2, padding="valid")
        b2 = self.conv(x, "Mixed_7a/Branch_2/Conv2d_0a_1x1", 256, 1)
        b2 = self.conv(b2, "Mixed_7a/Branch_2/Conv2d_0b_3x3", 288, 3)
        b2 = self.conv(b2, "Mixed_7a/Branch_2/Conv2d_1a_3x3", 320, 3, strides=2, padding="valid")
        b3 = self.max_pool(x, "Mixed_7a/Branch_3/MaxPool_1a_3x3")
        return self.concat([b0, b1, b2, b3], "Mixed_7a")

    def logits(self, x: Any) -> Any:
        """Conv2d_7b_1x1, 8x8 VALID average pool, flatten, fully connected 1536 -> 1001 (float32 output)."""
        x = self.conv(x, "Conv2d_7b_1x1", 1536, 1)
        x = self.L.AveragePooling2D(
            8, padding="valid", name=layer_name("Logits/AvgPool_1a_8x8"), dtype=self.dtype
        )(x)
        x = self.L.Flatten(name=layer_name("Logits/Flatten"), dtype=self.dtype)(x)
        return self.L.Dense(NUM_CLASSES, name=layer_name("Logits/Logits"), dtype="float32")(x)

    def __call__(self, images: Any) -> Any:
        """The whole network, images in [-1, 1] -> logits."""
        x = self.mixed_5b(self.stem(images))
        for i in range(1, 11):
            x = self.block35(x, f"Repeat/block35_{i}", 0.17)
        x = self.mixed_6a(x)
        for i in range(1, 21):
            x = self.block17(x, f"Repeat_1/block17_{i}", 0.10)
        x = self.mixed_7a(x)
        for i in range(1, 10):
            x = self.block8(x, f"Repeat_2/block8_{i}", 0.20)
        x = self.block8(x, "Block8", 1.0, relu=False)
        return self.logits(x)


def build_model(weights: dict[str, np.ndarray] | None = None, *, mixed_precision: bool = False) -> Any:
    """Keras model: float32 [B, 299, 299, 3] in [-1, 1] -> float32 logits [B, 1001]; weights set by name."""
    import keras

    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="float32", name="images")
    net = _Net("mixed_float16" if mixed_precision else "float32")
    model = keras.Model(images, net(images), name="InceptionResnetV2")
    pairs = model_variables(model)
    names = [n for n, _ in pairs]
    if len(names) != len(set(names)) or set(names) != set(REQUIRED_VARIABLES):
        raise AssertionError("the model's variables are not the required ones, each once")
    wrong = [n for n, var in pairs if tuple(var.shape) != REQUIRED_VARIABLES[n]]
    if wrong:
        raise AssertionError(f"the model has other shapes than the checkpoint: {_listing(wrong)}")
    if weights is not None:
        assign_weights(pairs, weights)
    return model


def assign_weights(pairs: list[tuple[str, Any]], weights: dict[str, np.ndarray]) -> None:
    """Assign every (slim name, variable) from `weights` by name; each required tensor is used once."""
    missing = [n for n, _ in pairs if n not in weights]
    if missing:
        raise CheckpointError(f"{len(missing)} missing: {_listing(missing)}")
    used = set()
    for name, var in pairs:
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{name} expected {tuple(var.shape)} found {value.shape}")
        var.assign(value)
        used.add(name)
    if used != set(REQUIRED_VARIABLES) or len(used) != len(pairs):
        raise AssertionError("not every required variable was assigned exactly once")


# ---------------------------------------------------------------- the embedder


def default_cache_dir() -> Path:
    """Where a downloaded or extracted checkpoint is kept when no cache_dir is given."""
    return Path.home() / ".cache" / "koala"


GPU_BATCH_SIZE = 128
CPU_BATCH_SIZE = 16


def default_batch_size() -> int:
    """Images per model call when none is set: large on a GPU (it needs them to be busy), small on a CPU."""
    import tensorflow as tf

    return GPU_BATCH_SIZE if tf.config.list_physical_devices("GPU") else CPU_BATCH_SIZE


class Embedder:
    """uint8 RGB 299x299 images -> float32 Inception-ResNet-v2 logits of their greyscale version."""

    def __init__(
        self,
        checkpoint: str | Path,
        cache_dir: Path | None = None,
        *,
        batch_size: int = 16,
        mixed_precision: bool = False,
        xla: bool = False,
    ):
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = resolve_checkpoint(checkpoint, Path(cache_dir) if cache_dir else default_cache_dir())
        self.checkpoint = path
        self.batch_size = batch_size
        self.xla = xla
        self.model = build_model(load_weights(path), mixed_precision=mixed_precision)
        self._lut = tf.constant(scale_grey(grey_lut()))  # float32 network input of every RGB colour
        self.preprocess = tf.function(
            self._preprocess, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
        )
        spec = [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)]
        self._embed = tf.function(self._forward, input_signature=spec, jit_compile=xla or None)
        self._embed_lab = tf.function(self._forward_lab, input_signature=spec, jit_compile=xla or None)

    def _preprocess(self, rgb: Any) -> Any:
        """TF side of `preprocess`: a lookup table built by numpy, so that every device gives the same bits.

        (tf.image.rgb_to_grayscale is a float32 matmul: on a GPU it may round differently, e.g. with FMA.)
        """
        import tensorflow as tf

        c = tf.cast(rgb, tf.int32)
        grey = tf.gather(self._lut, c[..., 0] * 65536 + c[..., 1] * 256 + c[..., 2])
        return tf.repeat(grey[..., None], 3, axis=-1)

    def _forward(self, rgb: Any) -> Any:
        """Preprocess and run the model (inference mode), float32 logits."""
        import tensorflow as tf

        return tf.cast(self.model(self._preprocess(rgb), training=False), tf.float32)

    def _forward_lab(self, rgb: Any) -> tuple[Any, Any, Any]:
        """`_forward` and the Lab channels of the same input, in one function (so on the model's device)."""
        from common.lab_tf import lab_tf_padded

        return (self._forward(rgb), *lab_tf_padded(rgb, self.batch_size))

    @property
    def device(self) -> str:
        """Where the model runs: "GPU" when TensorFlow sees one, else "CPU"."""
        import tensorflow as tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, 299, 299, 3] -> float32 logits [B, 1001], `batch_size` images per model call."""
        out = self._batches(self._embed, _checked_images(rgb))
        return out[0] if out else np.zeros((0, NUM_CLASSES), np.float32)

    def embed_lab(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 RGB [B, 299, 299, 3] -> (logits [B, 1001], l [B, 299, 299], ab [B, 299, 299, 2]), float32.

        One function per `batch_size` images runs the model and the Lab channels of `common.lab.lab_channels`
        at 299 (`common.lab_tf`, within 1e-4 of skimage) on the same input, so on a GPU the Lab work is done
        there. Only for Lab at 299: KOALA_LAB_SIZE=224 (Lab of a LANCZOS-resized image) takes `embed` and
        `lab_channels` on the CPU.
        """
        out = self._batches(self._embed_lab, _checked_images(rgb))
        if not out:
            s = IMAGE_SIZE
            return (
                np.zeros((0, NUM_CLASSES), np.float32),
                np.zeros((0, s, s), np.float32),
                np.zeros((0, s, s, 2), np.float32),
            )
        return out[0], out[1], out[2]

    def _batches(self, fn: Any, rgb: np.ndarray) -> list[np.ndarray]:
        """The outputs of `fn` over `batch_size` chunks of rgb, concatenated; [] for no images."""
        parts = [self._run(fn, rgb[i : i + self.batch_size]) for i in range(0, len(rgb), self.batch_size)]
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _run(self, fn: Any, batch: np.ndarray) -> list[np.ndarray]:
        """One call of `fn` (every output a batch); under XLA a short batch is padded to batch_size (one
        compiled shape)."""
        import tensorflow as tf

        n = len(batch)
        if self.xla and n < self.batch_size:
            batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), np.uint8)])
        return [t.numpy()[:n] for t in tf.nest.flatten(fn(batch))]


def _checked_images(rgb: np.ndarray) -> np.ndarray:
    """rgb as an array, if it is a uint8 [B, 299, 299, 3] batch; ValueError otherwise."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 4 or rgb.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]: {rgb.dtype} {rgb.shape}")
    return rgb
