"""Shard files: names, the rotating `ShardWriter`, durable publishing (fsync, rename), crash recovery of
temp shards, and the train / validation split.

A shard is written as a hidden, uncompressed `.<name>.tmp` and published under its final name
`lab_images_<node>_<n>.tfrecord[.gz|.zlib]` only when complete; records are `common/output/records.py`'s.
For an object store (`common/output/storage.py`) the temp file is local scratch and publishing is
one upload plus a manifest entry (`publish_to_store`, or the embed worker's own publisher).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from common.output.records import frame_pieces, iter_examples, scan_records
from common.output.storage import Store, is_url

SHARD_PREFIX = "lab_images_"
SHARD_GLOB = "lab_images_*.tfrecord*"  # what training reads: finalized shards only
EXTENSIONS = {"none": "", "gzip": ".gz", "zlib": ".zlib"}
_TEMP_RE = re.compile(r"\.lab_images_(?P<node>.+)_(?P<n>\d{5,})\.tfrecord(?:\.gz|\.zlib)?\.tmp")


# ---- files and names -------------------------------------------------------------------------------


def safe_node(node: str) -> str:
    """The node name as it appears in shard names: characters outside [A-Za-z0-9._-] become '-'."""
    if not node:
        raise ValueError("empty node name")
    return re.sub(r"[^A-Za-z0-9._-]", "-", node)


def shard_name(node: str, number: int, compression: str = "none") -> str:
    """`lab_images_<node>_<n:05d>.tfrecord[.gz|.zlib]`."""
    return f"{SHARD_PREFIX}{safe_node(node)}_{number:05d}.tfrecord{EXTENSIONS[compression]}"


def _node_re(node: str) -> re.Pattern[str]:
    """Any file of this node's numbering: finals (also renamed with a `val_`-like prefix), temps."""
    return re.compile(
        rf"\.?(?:[A-Za-z0-9]+_)?{SHARD_PREFIX}{re.escape(safe_node(node))}_(\d{{5,}})"
        r"\.tfrecord(?:\.gz|\.zlib)?(?:\.tmp)?(?:\.partial)?"
    )


def shard_token(path: Path) -> bytes:
    """4 bytes naming a shard in the job state (from its name without dot or extension)."""
    stem = path.name.lstrip(".").split(".")[0]
    return hashlib.md5(stem.encode()).digest()[:4]


def highest_number(out_dir: Path, node: str) -> int:
    """The highest shard number of this node on disk (final or temporary), -1 when none."""
    return highest_in(os.listdir(out_dir), node)


def highest_in(names: list[str], node: str) -> int:
    """The highest shard number of this node among file names, -1 when none."""
    pattern = _node_re(node)
    return max((int(m.group(1)) for name in names if (m := pattern.fullmatch(name))), default=-1)


def final_path(temp: Path, compression: str) -> Path:
    """The final name of a temp shard `.<name>.tmp` for the given compression."""
    name = temp.name
    if not (name.startswith(".") and name.endswith(".tmp")):
        raise ValueError(f"not a temporary shard name: {name}")
    base = re.sub(r"(\.gz|\.zlib)$", "", name[1:-4])
    return temp.with_name(base + EXTENSIONS[compression])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IOV_MAX = 1020  # below Linux's 1024 iovecs per writev


def _writev_all(fd: int, pieces: list[bytes]) -> None:
    """Write the pieces in order with writev, without joining them (records are ~1 MB each)."""
    views = [memoryview(p) for p in pieces if len(p)]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i : i + _IOV_MAX])
        while written:  # skip what was written; a partly written piece keeps its rest
            if written >= len(views[i]):
                written -= len(views[i])
                i += 1
            else:
                views[i], written = views[i][written:], 0


def _write_final(
    src: Path, dst: Path, compression: str, level: int, spans: list[tuple[int, int]] | None = None
) -> None:
    """Copy src (or only its byte `spans`) into dst, as a gzip or zlib stream (what TFRecordDataset's
    GZIP/ZLIB read) or plain, and fsync it."""
    z = (
        None
        if compression == "none"
        else zlib.compressobj(level, zlib.DEFLATED, 31 if compression == "gzip" else 15)
    )
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for start, end in [(0, os.fstat(fin.fileno()).st_size)] if spans is None else spans:
            fin.seek(start)
            while chunk := fin.read(min(1 << 20, end - fin.tell())):
                fout.write(z.compress(chunk) if z else chunk)
        if z:
            fout.write(z.flush())
        fout.flush()
        os.fsync(fout.fileno())


def finalize_temp(
    temp: Path, compression: str = "none", level: int = 6, spans: list[tuple[int, int]] | None = None
) -> Path | None:
    """Publish a temp shard (or only its record `spans`) under its final name, compressed if asked,
    atomically and durably; an empty one is deleted (None). Safe to repeat after a crash at any step:
    the temp is deleted only once the final is in place."""
    temp = Path(temp)
    final = final_path(temp, compression)
    if spans == [] or (spans is None and temp.stat().st_size == 0):
        temp.unlink()
        _fsync_dir(temp.parent)
        return None
    if compression == "none" and spans is None:
        _fsync_file(temp)
        os.replace(temp, final)
    else:
        partial = final.with_name(f".{final.name}.partial")
        _write_final(temp, partial, compression, level, spans)
        os.replace(partial, final)
    _fsync_dir(final.parent)
    plain = final_path(temp, "none")
    for ext in EXTENSIONS.values():  # a final left by an interrupted finalize with another setting
        sibling = plain.with_name(plain.name + ext)
        if sibling != final and sibling.exists():
            sibling.unlink()
    if temp.exists():
        temp.unlink()
    _fsync_dir(final.parent)
    return final


def upload_source(
    temp: Path, spans: list[tuple[int, int]], compression: str = "none", level: int = 6
) -> Path:
    """The local file to upload for a closed temp shard: the temp itself when it is to be sent whole
    and uncompressed, else `.<final name>.partial` beside it with only the record `spans`, compressed."""
    temp = Path(temp)
    if compression == "none" and spans and _contiguous(spans) and spans[-1][1] == temp.stat().st_size:
        return temp
    partial = temp.with_name(f".{final_path(temp, compression).name}.partial")
    _write_final(temp, partial, compression, level, spans)
    return partial


def _contiguous(spans: list[tuple[int, int]]) -> bool:
    return spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def publish_to_store(
    store: Store, temp: Path, spans: list[tuple[int, int]], compression: str = "none", level: int = 6
) -> str | None:
    """Upload a closed temp shard (its record `spans`) to an object store under its final name as
    one upload, aborted on any error; then list it in the manifest and delete the local files.
    Returns its URL (None for an empty shard, which is only deleted). For writers without a job
    state (`koala lab-batch`); the embed worker has its own, which holds the messages until here."""
    name = final_path(temp, compression).name
    if spans:
        source = upload_source(temp, spans, compression, level)
        with store.upload(name) as upload:
            upload.begin()
            upload.send(source)
            upload.complete()
        store.add_to_manifest([{"name": name, "records": len(spans), "bytes": source.stat().st_size}])
        if source != temp:
            source.unlink()
    temp.unlink()
    return store.url(name) if spans else None


def recover_temp_shards(out_dir: Path, node: str | None = None) -> list[Path]:
    """Cut every temp shard (of `node`, or all: only when no writer is live) to its valid prefix and
    delete stale compression temps; returns the temp shards, sorted. What to keep is the caller's job."""
    out_dir = Path(out_dir)
    pattern = _node_re(node) if node is not None else None
    temps: list[Path] = []
    for path in sorted(out_dir.iterdir()):
        if pattern is not None and not pattern.fullmatch(path.name):
            continue
        if path.name.endswith(".partial") and path.name.startswith(".") and SHARD_PREFIX in path.name:
            path.unlink()
        elif _TEMP_RE.fullmatch(path.name):
            _truncate_valid(path)
            temps.append(path)
    _fsync_dir(out_dir)
    return temps


def _truncate_valid(path: Path) -> int:
    """Cut a temp shard to its valid prefix (fsynced); returns the new size."""
    _, end = scan_records(path)
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != end:
            f.truncate(end)
        os.fsync(f.fileno())
    return end


def rewrite_shard(temp: Path, keep: Callable[[bytes], bool]) -> int:
    """Keep only the valid records for which keep(serialized) is true (new file, fsync, replace);
    returns how many were kept. Holds one record in memory at a time."""
    temp = Path(temp)
    spans = [(start, end, keep(data)) for start, end, data in iter_examples(temp)]
    kept = [(start, end) for start, end, ok in spans if ok]
    if len(kept) == len(spans) and temp.stat().st_size == (spans[-1][1] if spans else 0):
        return len(kept)
    partial = temp.with_name(temp.name + ".partial")
    _write_final(temp, partial, "none", 0, kept)
    os.replace(partial, temp)
    _fsync_dir(temp.parent)
    return len(kept)


# ---- the writer ---------------------------------------------------------------------------------


class ShardWriter:
    """Appends records to a hidden, uncompressed temp shard and publishes it as
    `lab_images_<node>_<n>.tfrecord[.gz|.zlib]` when full, too old, or on close.

    A batch is never split: `append` finalizes first a shard that an earlier batch filled, so a
    shard holds `examples_per_shard` records plus less than one batch. A shard is never finalized
    inside the `append` that wrote to it, so the caller can still drop records of that batch
    (dedupe) from the shard whose path `append` returned: `discard` (crash-safe: the records stay
    on disk until the shard is finalized without them). Age rotation happens only in `maybe_rotate` (call it
    after each append and when idle). Not thread-safe.

    Numbers continue after the highest of this node in the folder; with `reserve_number` (the
    fleet's: a counter in the job state) also after every number handed out before, so shards
    moved out of the folder (to free space) never have their names, nor their tokens in the job
    state, used again.

    `publisher(temp, spans)` replaces the rename (an object store: the folder is local scratch);
    it gets the closed temp shard and its kept record spans, and returns where the shard went (or
    None: later, or nowhere). `durable=False` skips the fsyncs (scratch a crash may lose).
    """

    def __init__(
        self,
        out_dir: Path,
        node: str,
        *,
        examples_per_shard: int = 500,
        max_age: float = 600,
        compression: str = "none",
        compression_level: int = 6,
        reserve_number: Callable[[int], int] | None = None,
        publisher: Callable[[Path, list[tuple[int, int]]], Path | str | None] | None = None,
        durable: bool = True,
    ):
        if compression not in EXTENSIONS:
            raise ValueError(f"unknown compression {compression!r}; valid: {', '.join(EXTENSIONS)}")
        if examples_per_shard < 1:
            raise ValueError("examples_per_shard must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.node = safe_node(node)
        self.examples_per_shard = examples_per_shard
        self.max_age = max_age
        self.compression = compression
        self.compression_level = compression_level
        self.finalized: list[Path | str] = []
        self.path: Path | None = None  # the open temp shard
        self.count = 0  # records in it, not counting discarded ones
        self.offset = 0  # its size
        self._ends: list[int] = []
        self._discarded: set[int] = set()  # start offsets of records left out when finalizing
        self._fd: int | None = None
        self._opened = 0.0
        self._last_number = -1
        # durable numbering: given the lowest number the folder allows, a number at least that
        # high never handed out before (JobState.next_shard_number); None: the folder alone decides
        self._reserve = reserve_number or (lambda lowest: lowest)
        self._unpublished: list[tuple[Path, list[tuple[int, int]] | None]] = []  # closed, not yet renamed
        self._publisher = publisher
        self.durable = durable

    @property
    def age(self) -> float:
        """Seconds since the open shard was created (0 when none is open)."""
        return time.monotonic() - self._opened if self._fd is not None else 0.0

    def _open(self) -> None:
        number = self._reserve(max(self._last_number, highest_number(self.out_dir, self.node)) + 1)
        while True:
            final = self.out_dir / shard_name(self.node, number, self.compression)
            path = final.with_name(f".{final.name}.tmp")
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                number = self._reserve(number + 1)
        if self.durable:
            _fsync_dir(self.out_dir)
        self._last_number, self.path, self.count, self.offset = number, path, 0, 0
        self._ends, self._discarded = [], set()
        self._opened = time.monotonic()

    def append(self, records: list[bytes]) -> tuple[Path, int, int]:
        """Append serialized examples to the open temp shard, fsynced before returning;
        returns (temp path, offset before the batch, offset after)."""
        self._publish()
        if self._fd is not None and self.count >= self.examples_per_shard:
            self._finalize()
        if self._fd is None:
            self._open()
        assert self._fd is not None and self.path is not None
        start = self.offset
        try:
            _writev_all(self._fd, [piece for r in records for piece in frame_pieces(r)])
            if self.durable:
                os.fsync(self._fd)
        except BaseException:
            try:
                self._cut(start)  # leave no partial batch behind
            except OSError:
                pass
            raise
        for r in records:
            self.offset += len(r) + 16
            self._ends.append(self.offset)
        self.count = len(self._ends) - len(self._discarded)
        return self.path, start, self.offset

    def _cut(self, offset: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        if self.durable:
            os.fsync(self._fd)

    def _spans(self) -> list[tuple[int, int]]:
        return list(zip([0, *self._ends[:-1]], self._ends, strict=True)) if self._ends else []

    def discard(self, start: int, keep: list[bool]) -> None:
        """Leave out of the final shard the records of the batch appended at `start` whose keep flag
        is False. They stay in the temp shard until it is finalized (recovery decides by key)."""
        batch = [span for span in self._spans() if span[0] >= start]
        if self._fd is None or not batch or batch[0][0] != start or len(batch) != len(keep):
            raise ValueError(f"no batch of {len(keep)} records starts at {start} in the open shard")
        self._discarded.update(s for (s, _), ok in zip(batch, keep, strict=True) if not ok)
        self.count = len(self._ends) - len(self._discarded)

    def maybe_rotate(self) -> Path | str | None:
        """Finalize the open shard if it is full or older than max_age; returns its final path."""
        published = self._publish()
        if self._fd is not None and (self.count >= self.examples_per_shard or self.age >= self.max_age):
            return self._finalize()
        return published

    def _finalize(self) -> Path | str | None:
        assert self._fd is not None and self.path is not None
        if self.durable:
            os.fsync(self._fd)
        os.close(self._fd)
        spans: list[tuple[int, int]] | None = [sp for sp in self._spans() if sp[0] not in self._discarded]
        if not self._discarded and self._publisher is None:
            spans = None  # all of it: renamed as it is
        self._unpublished.append((self.path, spans))
        self._fd, self.path, self.count, self.offset = None, None, 0, 0
        self._ends, self._discarded = [], set()
        return self._publish()

    def _publish(self) -> Path | str | None:
        """Publish the closed temp shards; one the disk refused (full, read-only) stays queued and
        the OSError propagates, so a later call publishes it. Returns the last final path."""
        final: Path | str | None = None
        while self._unpublished:
            temp, spans = self._unpublished[0]
            if self._publisher is not None:
                final = self._publisher(temp, spans or [])
            elif temp.exists():
                final = finalize_temp(temp, self.compression, self.compression_level, spans)
            else:  # renamed (or deleted, when empty) by an attempt whose later steps failed
                final = final_path(temp, self.compression)
                final = final if final.exists() else None
            self._unpublished.pop(0)
            if final is not None and final not in self.finalized:
                self.finalized.append(final)
        return final

    def close(self) -> Path | str | None:
        """Finalize the open shard (an empty one is deleted) and publish any left; returns the last
        final path."""
        return self._finalize() if self._fd is not None else self._publish()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- train / validation split ---------------------------------------------------------------

VAL_PREFIX = "val_"


def finished_shards(out_dir: Path) -> list[Path]:
    """Finalized training and validation shards in out_dir, sorted by name (none when it is missing)."""
    return sorted([*out_dir.glob(SHARD_GLOB), *out_dir.glob(VAL_PREFIX + SHARD_GLOB)])


def count_shards(location: Path | str) -> int:
    """How many finalized shards an output location holds (an object store: its manifest lists)."""
    return len(Store(location).manifest()) if is_url(location) else len(finished_shards(Path(location)))


def shard_listing(location: Path | str) -> list[tuple[str, int]]:
    """(name, bytes) of the finalized shards of an output location, sorted by name."""
    if is_url(location):
        return sorted((e["name"], e["bytes"]) for e in Store(location).manifest())
    return [(p.name, p.stat().st_size) for p in finished_shards(Path(location))]


def _choose_val(train: list[str], val: int, fraction: float) -> list[str]:
    """The training shard names to make validation ones: chosen by name only, the same on every
    machine and every run."""
    if not 0 < fraction < 1:
        raise ValueError("the validation fraction must be between 0 and 1")
    wanted = max(1, round(fraction * (len(train) + val)))
    return sorted(train, key=lambda n: hashlib.md5(n.encode()).hexdigest())[: max(0, wanted - val)]


def split_validation(out_dir: Path, fraction: float) -> list[Path]:
    """Rename a deterministic choice of finalized shards to `val_<name>` so that about `fraction`
    of them (at least one) are validation shards; shards already renamed count, so running it
    again changes nothing. Returns the shards renamed now. (An object store: `split_store`.)"""
    out_dir = Path(out_dir)
    train = sorted(out_dir.glob(SHARD_GLOB))
    val = sorted(out_dir.glob(VAL_PREFIX + SHARD_GLOB))
    names = set(_choose_val([p.name for p in train], len(val), fraction))
    chosen = [p for p in train if p.name in names]
    renamed = []
    for shard in chosen:
        target = shard.with_name(VAL_PREFIX + shard.name)
        os.replace(shard, target)
        renamed.append(target)
    if renamed:
        _fsync_dir(out_dir)
    return renamed


def split_store(location: str, fraction: float) -> list[str]:
    """`split_validation` in an object store: copy each chosen shard to its `val_` name, swap the
    names in the manifest (compare-and-swap), delete the old objects; returns their new URLs. A
    rerun after a crash at any step finishes it: the choice depends on the manifest's names only."""
    store = Store(location)
    entries = store.manifest()
    train = [e["name"] for e in entries if e["name"].startswith(SHARD_PREFIX)]
    val = [e["name"] for e in entries if e["name"].startswith(VAL_PREFIX + SHARD_PREFIX)]
    chosen = _choose_val(train, len(val), fraction)
    for name in chosen:
        store.copy(name, VAL_PREFIX + name)

    def rename(current: list[dict]) -> list[dict]:
        return [{**e, "name": VAL_PREFIX + e["name"]} if e["name"] in chosen else e for e in current]

    store.update_manifest(rename)
    for name in [*chosen, *(v[len(VAL_PREFIX) :] for v in val)]:
        store.delete(name)  # also what a split killed after its manifest change left
    return [store.url(VAL_PREFIX + name) for name in chosen]
