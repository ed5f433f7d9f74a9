"""The Inception-ResNet-v2 checkpoint: its variable list; finding it (file, .tar.gz release, URL);
checking it and reading its tensors by name.

TensorFlow is imported lazily, by `load_weights` only: importing this module costs only numpy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np

PREFIX = "InceptionResnetV2/"  # the slim scope every variable of the network is under
# Training bookkeeping, not a weight: slim's training loop saves it beside the model variables, so a
# checkpoint saved by it may hold it. Tolerated (as a scalar) and never read.
TOLERATED_VARIABLES = frozenset({"global_step"})
_TABLE_MAGIC = 0xDB4775248B80FB57  # footer of an sstable: a V1 checkpoint file, or a V2 .index file
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """The checkpoint cannot be found, fetched, extracted, read, or does not fit the network."""


def _read_variable_list() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, ignored) name -> shape, from the package's copy of the slim variable list."""
    text = resources.files("common.model").joinpath("inception_resnet_v2_variables.tsv").read_text()
    required: dict[str, tuple[int, ...]] = {}
    ignored: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines()[1:]:
        name, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.split(",") if d)
        (ignored if name.startswith(PREFIX + "AuxLogits/") else required)[name] = dims
    return required, ignored


REQUIRED_VARIABLES, IGNORED_VARIABLES = _read_variable_list()


# ---------------------------------------------------------------- finding it: file, .tar.gz, URL


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
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name[:-5],
                disable=not sys.stderr.isatty(),  # no redraw stream in a log
            ) as bar,
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


# ---------------------------------------------------------------- checking and reading it, by name


def name_list(names: Iterable[str], limit: int = 5) -> str:
    """A short comma-separated list of names."""
    names = list(names)
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_variables(shapes: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming the missing, unknown and misshapen variables of a checkpoint's listing."""
    problems = []
    missing = [n for n in REQUIRED_VARIABLES if n not in shapes]
    if missing:
        problems.append(f"{len(missing)} missing: {name_list(missing)}")
    known = {**REQUIRED_VARIABLES, **IGNORED_VARIABLES}
    unknown = sorted(
        n for n, s in shapes.items() if n not in known and not (n in TOLERATED_VARIABLES and s == ())
    )
    if unknown:
        problems.append(f"{len(unknown)} unknown: {name_list(unknown)}")
    misshapen = [
        f"{n} expected {known[n]} found {shapes[n]}"
        for n in known
        if n in shapes and tuple(shapes[n]) != known[n]
    ]
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen: {name_list(misshapen)}")
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
        raise CheckpointError(f"not floating-point: {name_list(bad)}")
    return {n: np.asarray(reader.get_tensor(n), dtype=np.float32) for n in REQUIRED_VARIABLES}
