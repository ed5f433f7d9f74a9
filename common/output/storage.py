"""Where a job's output goes: a local folder, or any fsspec URL (`s3://`, `gs://`, …): `Store`.

A local folder is written as it always was (`common/output/shards.py`: a hidden temp file, fsync,
rename; the folder listing is the truth). For a URL, a shard is written into a local scratch file
(`KOALA_SCRATCH_DIR`) and, once closed, sent as ONE upload (`Upload`: S3 multipart, a resumable
session elsewhere) completed only after its last part: the object appears under its final name
whole or not at all, and on S3 the completion carries `If-None-Match: *`, so no name is ever
overwritten. Any exception while sending aborts the upload (fsspec's own files commit a truncated
object on `__exit__`, even after an exception: not used for shards). `manifest.json` at the root
lists the committed shards (name, records, bytes); readers, `koala split` and `koala status` use
it instead of listing the bucket. On S3 it is changed by compare-and-swap (`If-Match` on its ETag),
so writers on many machines never lose each other's entries.

Credentials come from each library's standard chain (S3: botocore's, i.e. AWS_* variables,
~/.aws, instance roles; AWS_ENDPOINT_URL names an S3-compatible server), never from this code:
nothing here logs them or stores them in Redis. Throttling and 5xx answers are retried with
backoff (botocore's standard mode, 10 attempts; s3fs also retries SlowDown).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
PART_SIZE = 16 << 20  # bytes per uploaded part (S3: at least 5 MiB but the last, at most 10,000 parts)
UPLOAD_THREADS = 4  # parts in flight per upload
# botocore's standard retries (throttling, 5xx, with backoff); checksums only where S3 requires them:
# the flexible ones cost the client (and a small server) CPU per byte, and every TFRecord carries
# its own CRC32C, which the reader checks
_S3_OPTIONS = {
    "config_kwargs": {
        "retries": {"max_attempts": 10, "mode": "standard"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


class StorageError(RuntimeError):
    """The output location cannot be used (missing bucket, writes refused, …); one line says why."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether an output location is an fsspec URL (`file://` counts as a local folder)."""
    m = _URL.match(str(location))
    return m is not None and m.group(1).lower() != "file"


def normalize(location: str | os.PathLike) -> str:
    """A location as the settings keep it: a URL without trailing slash, or a local path."""
    text = str(location).strip()
    if text.lower().startswith("file://"):
        return text[len("file://") :] or "/"
    return text.rstrip("/") if is_url(text) else text


def slug(url: str) -> str:
    """A folder name standing for a URL (`s3://koala/run` → `s3-koala-run`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-")


def local_folder(location: str | os.PathLike, scratch: Path) -> Path:
    """The local folder of an output location: the folder itself, or for a URL a folder under the
    scratch root named after it (temp shards, failure logs, a `koala run`'s Redis and logs)."""
    location = normalize(location)
    return Path(scratch) / slug(location) if is_url(location) else Path(location)


def error_code(error: BaseException) -> str:
    """The S3 error code behind an exception (s3fs keeps botocore's error as the cause), or ''."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        seen = seen.__cause__ or seen.__context__
    return ""


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL; S3 with botocore's standard retries."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options = _S3_OPTIONS if protocol in ("s3", "s3a") else {}
    return fsspec.core.url_to_fs(url, **options)


class Store:
    """An output location: a local folder, or a URL whose shards are uploads and whose manifest
    lists them. Names are relative to the location."""

    def __init__(self, location: str | os.PathLike):
        self.location = normalize(location)
        self.remote = is_url(self.location)
        self._fs: Any = None
        self._root = ""

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    @property
    def folder(self) -> Path:
        """The local folder (a local location only)."""
        if self.remote:
            raise ValueError(f"{self.location} is not a local folder")
        return Path(self.location)

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root = filesystem(self.location)
            self._root = self._root.rstrip("/")
        return self._fs

    @property
    def s3(self) -> bool:
        return self.remote and self.location.split("://", 1)[0].lower() in ("s3", "s3a")

    def path(self, name: str) -> str:
        """The filesystem path of a name (for fsspec calls)."""
        self.fs  # noqa: B018  # sets the root
        return f"{self._root}/{name}"

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, key = self.path(name).partition("/")
        return bucket, key

    def call(self, method: str, name: str, **kwargs: Any) -> Any:
        """One S3 call on the object `name` (s3fs: credentials, endpoint, retries)."""
        bucket, key = self._bucket_key(name)
        return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    # ---- start-up check ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and delete a probe object; StorageError with one line when the bucket is missing
        or refuses writes (nothing is retried here: that does not pass with time)."""
        if not self.remote:
            raise ValueError("check_writable is for URLs; a local folder is checked by its writer")
        probe = f".koala-write-test-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            self.fs.pipe_file(self.path(probe), b"ok")
            self.fs.rm_file(self.path(probe))
        except Exception as e:  # every kind the library raises: the user needs one line
            raise StorageError(self._refusal(e)) from None

    def _refusal(self, error: BaseException) -> str:
        code = error_code(error)
        bucket = self.path("x").split("/", 1)[0]
        if code == "NoSuchBucket" or (isinstance(error, FileNotFoundError) and not code):
            why = f"the bucket {bucket!r} does not exist (create it, or fix the URL)"
        elif code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            why = (
                f"writes refused ({code}): check the credentials (AWS_* variables, ~/.aws, the "
                "machine's role) and the bucket policy"
            )
        else:
            why = one_line(error)
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f" at {endpoint}" if endpoint and self.s3 else ""
        return f"cannot write to {self.location}{where}: {why}"

    # ---- objects ------------------------------------------------------------------------------------

    def size(self, name: str) -> int | None:
        """The size of a committed object (asked of the server, not a cached listing), None when absent."""
        try:
            if self.s3:
                return int(self.call("head_object", name)["ContentLength"])
            self.fs.invalidate_cache(self.path(name))
            return int(self.fs.info(self.path(name))["size"])
        except FileNotFoundError:
            return None

    def put(self, name: str, data: bytes) -> None:
        """Write a small object in one request (summaries: not shards)."""
        self.fs.pipe_file(self.path(name), data)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy where the store has one."""
        self.fs.copy(self.path(src), self.path(dst))

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self.path(name), "rb", block_size=8 << 20)

    # ---- uploads ------------------------------------------------------------------------------------

    def upload(self, name: str) -> Upload:
        return Upload(self, name)

    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """(name, upload id) of the multipart uploads begun and neither completed nor aborted under
        the location (S3; other stores keep none that this code could find)."""
        if not self.s3:
            return []
        bucket, prefix = self._bucket_key("")
        out: list[tuple[str, str]] = []
        marks: dict[str, str] = {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marks)
            out += [(u["Key"][len(prefix) :], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marks = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort(self, name: str, upload_id: str) -> None:
        """Abort an upload (one already completed or aborted is left as it is)."""
        try:
            self.call("abort_multipart_upload", name, UploadId=upload_id)
        except FileNotFoundError:  # NoSuchUpload
            pass

    # ---- the manifest -----------------------------------------------------------------------------

    def manifest(self) -> list[dict]:
        """The committed shards: [{"name", "records", "bytes"}], in the order they were added."""
        return self._read_manifest()[0]

    def shard_names(self) -> list[str]:
        return sorted(e["name"] for e in self.manifest())

    def add_to_manifest(self, entries: list[dict]) -> None:
        """List committed shards (an entry already listed under its name is left as it is)."""

        def add(current: list[dict]) -> list[dict]:
            names = {e["name"] for e in current}
            return current + [e for e in entries if e["name"] not in names]

        self.update_manifest(add)

    def update_manifest(self, change: Callable[[list[dict]], list[dict]], attempts: int = 100) -> list[dict]:
        """Apply `change` to the manifest: on S3 a compare-and-swap on its ETag, tried again when
        another writer got there first; elsewhere a plain read and write. Returns the new list."""
        for attempt in range(attempts):
            current, etag = self._read_manifest()
            new = change(list(current))
            if new == current:
                return current
            body = json.dumps({"format": "koala-manifest-1", "shards": new}, indent=0).encode()
            try:
                self._write_manifest(body, etag)
                return new
            except OSError as e:
                if error_code(e) not in _CONFLICTS and not isinstance(e, FileExistsError):
                    raise
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
        raise StorageError(f"cannot update {self.url(MANIFEST)}: {attempts} writers got there first")

    def _read_manifest(self) -> tuple[list[dict], str | None]:
        """(entries, ETag) of the manifest; ([], None) when there is none."""
        try:
            if self.s3:
                body, etag = self._get_with_etag(MANIFEST)
            else:
                body, etag = self.fs.cat_file(self.path(MANIFEST)), None
        except FileNotFoundError:
            return [], None
        return list(json.loads(body)["shards"]), etag

    def _get_with_etag(self, name: str) -> tuple[bytes, str]:
        """An object's bytes and the ETag of exactly those bytes (one GET)."""
        from fsspec.asyn import sync

        bucket, key = self._bucket_key(name)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return sync(self.fs.loop, get)

    def _write_manifest(self, body: bytes, etag: str | None) -> None:
        if self.s3:
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            self.call("put_object", MANIFEST, Body=body, ContentType="application/json", **condition)
        else:
            self.fs.pipe_file(self.path(MANIFEST), body)


class Upload:
    """One object written as one upload: `begin` (S3: an upload id that others may abort),
    `send` a local file, `complete`; `abort` on any error. As a context manager, an exception
    inside aborts it: nothing is committed that was not completed explicitly."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.upload_id: str | None = None
        self._parts: list[dict] = []
        self._file: Any = None  # a non-S3 store's uncommitted file

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if error is not None:
            try:
                self.abort()
            except Exception:  # the first error is the one to report
                pass

    def begin(self) -> str | None:
        """Start the upload; its id (S3), which the fleet's ledger keeps so that another worker
        can abort it (`Store.abort`) should this one die."""
        if self.store.s3:
            self.upload_id = str(self.store.call("create_multipart_upload", self.name)["UploadId"])
        else:
            self._file = self.store.fs.open(self.store.path(self.name), "wb", autocommit=False)
        return self.upload_id

    def send(self, src: Path) -> None:
        """Upload the bytes of a local file (S3: parts of `PART_SIZE`, a few at once)."""
        size = src.stat().st_size
        if not self.store.s3:
            with open(src, "rb") as f:
                while chunk := f.read(PART_SIZE):
                    self._file.write(chunk)
            return
        part = max(PART_SIZE, -(-size // 9_000))
        ranges = [(i + 1, start, min(part, size - start)) for i, start in enumerate(range(0, size, part))]
        fd = os.open(src, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, "upload-part") as pool:
                self._parts = list(pool.map(lambda r: self._send_part(fd, *r), ranges))
        finally:
            os.close(fd)

    def _send_part(self, fd: int, number: int, start: int, length: int) -> dict:
        body = os.pread(fd, length, start)
        out = self.store.call("upload_part", self.name, UploadId=self.upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": out["ETag"]}

    def complete(self) -> None:
        """Commit: the object appears, whole. S3: refused (FileExistsError) when the name exists."""
        if not self.store.s3:
            self._file.commit()
            self._file = None
            return
        self.store.call(
            "complete_multipart_upload",
            self.name,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self._parts},
            IfNoneMatch="*",
        )

    def abort(self) -> None:
        """Drop what was sent; the name stays free."""
        if self.store.s3 and self.upload_id:
            self.store.abort(self.name, self.upload_id)
        elif self._file is not None:
            self._file.discard()
            self._file = None
