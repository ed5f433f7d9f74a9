"""What the standalone steps share: their failure log, bounded thread maps, finding and naming image
files, writing PNGs."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
import numpy as np
from PIL import Image

from common.fetching.sources import file_key
from common.stages import (
    failure_of,
)
from common.state.failures import Failure, now

T = TypeVar("T")
R = TypeVar("R")

NODE = "standalone"  # node name of failures and of lab-batch's shards
FAILURES_FILE = "failures.jsonl"
MD5_STEM = re.compile(r"[0-9a-f]{32}")


class FailureLog:
    """`failures.jsonl` of one folder: lines appended as items fail; on close, one line per key
    that still fails (the latest), so a re-run that fixes an item drops its old line."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FAILURES_FILE
        self.earlier = {entry["key"] for entry in self._entries() if "key" in entry}
        self.resolved: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # closed by close()

    def _entries(self) -> list[dict]:
        """The parsed lines of the file (unparseable lines as {"line": text})."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            out.append(entry if isinstance(entry, dict) else {"line": line})
        return out

    def add(self, key: str, reason: str, detail: str, url: str = "", path: str = "") -> None:
        """Append one failure with a reason of the fleet's vocabulary."""
        entry = Failure(
            key=key, reason=reason, detail=detail, url=url, path=path, node=NODE, time=now()
        ).as_dict()
        with self._lock:
            self.counts[reason] += 1
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._file.flush()

    def attempt(self, key: str, step: Callable[[], R], url: str = "", path: str = "") -> R | None:
        """step()'s result, or None once its failure is recorded with the fleet's reason."""
        try:
            result = step()
        except Exception as e:  # a bug too: the item must still be accounted for
            self.add(key, *failure_of(e), url=url, path=path)
            return None
        self.resolve(key)
        return result

    def resolve(self, key: str) -> None:
        """An item that failed in an earlier run succeeded now."""
        if key in self.earlier:
            self.resolved.add(key)

    def close(self) -> None:
        """Keep the latest line of each key still failing (atomically replaced)."""
        self._file.close()
        latest: dict[str, dict] = {}
        for i, entry in enumerate(self._entries()):
            key = entry.get("key", f"\0{i}")
            latest.pop(key, None)  # the latest line of a key takes the latest place
            if key not in self.resolved:
                latest[key] = entry
        lines = [
            e["line"] if set(e) == {"line"} else json.dumps(e, ensure_ascii=False) for e in latest.values()
        ]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{FAILURES_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)
        if not lines:
            self.path.unlink()

    def summary(self) -> str:
        """'failed N (reason n, ...)'."""
        reasons = ", ".join(f"{r} {n}" for r, n in self.counts.most_common())
        return f"failed {sum(self.counts.values())}" + (f" ({reasons})" if reasons else "")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn over items on `threads` threads, at most 4×threads in flight; results in completion order."""
    with ThreadPoolExecutor(threads) as pool:
        pending: set[Future[R]] = set()
        try:
            for item in items:
                pending.add(pool.submit(fn, item))
                if len(pending) >= 4 * threads:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            yield from (f.result() for f in as_completed(pending))
        finally:  # stopped early (error, Ctrl-C): drop what has not started
            for future in pending:
                future.cancel()


def iter_image_files(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Every file under root, sorted (as `koala submit` walks a folder), without hidden files,
    failure logs, and the `exclude` folder (an output folder inside root)."""
    skip = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and (skip is None or (Path(dirpath) / d).resolve() != skip)
        )
        for name in sorted(filenames):
            if not name.startswith(".") and name != FAILURES_FILE:
                yield Path(dirpath) / name


@dataclass(frozen=True)
class LocalImage:
    """A file to turn into a record, with the record's key, name and source."""

    path: Path
    key: str
    name: str
    source: str


def identify(path: Path, root: Path) -> LocalImage:
    """A file named <md5>.<ext> (as `koala download` writes) is the URL item of that md5: key and
    name are the stem. Any other file is a folder item: name = path relative to root, key = md5 of
    its absolute path (as `koala submit FOLDER`). The source is the path relative to root."""
    rel = path.relative_to(root).as_posix()
    if MD5_STEM.fullmatch(path.stem):
        return LocalImage(path, path.stem, path.stem, rel)
    return LocalImage(path, file_key(path), rel, rel)


def parse_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """'W,H' (or 'S') to (W, H)."""
    if value is None:
        return None
    try:
        sides = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("expected W,H such as 299,299") from None
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < 1:
        raise click.BadParameter("expected two positive integers W,H")
    return sides[0], sides[1]


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Save uint8 RGB pixels as a lossless PNG, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(rgb, "RGB").save(f, "PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def existing_keys(directory: Path) -> set[str]:
    """md5 stems of the <md5>.<ext> files already in directory (one listing, not one per item)."""
    if not directory.is_dir():
        return set()
    return {
        stem
        for entry in os.scandir(directory)
        if not entry.name.startswith(".") and MD5_STEM.fullmatch(stem := entry.name.split(".")[0])
    }
