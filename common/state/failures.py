"""Failed items: the reasons, the exception an item fails with, the failure record and its log file."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("koala.failures")

# Why an item failed for good: counted per reason in Redis; the README's reasons table lists each.
REASONS = (
    "bad_scheme",
    "invalid_url",
    "blocked_address",
    "dns_error",
    "connection_error",
    "timeout",
    "http_error",
    "too_large",
    "not_an_image",
    "truncated",
    "too_many_pixels",
    "too_many_scans",
    "wrong_size",
    "not_a_regular_file",
    "redirect_loop",
    "io_error",
    "internal_error",
    "worker_died",
)


class ItemError(Exception):
    """An item that cannot become a record; `reason` is from `REASONS`, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Failure:
    """One failed item: its key, URL or path, a reason from REASONS and a readable detail."""

    key: str
    reason: str
    detail: str
    url: str = ""
    path: str = ""
    node: str = ""
    time: float = 0.0

    @classmethod
    def of_item(cls, item: Mapping[str, Any], reason: str, detail: str, node: str) -> Failure:
        """The failure, now, of an item of a chunk (`u` its URL, or `p` its path in the folder)."""
        url, path = item.get("u", ""), item.get("p", "")
        return cls(key=item["k"], reason=reason, detail=detail, url=url, path=path, node=node, time=now())

    def as_dict(self) -> dict:
        """The JSON form: `url` for URL items, `path` for files of a folder."""
        source = {"path": self.path} if self.path else {"url": self.url}
        return {
            "key": self.key,
            **source,
            "reason": self.reason,
            "detail": self.detail,
            "node": self.node,
            "time": self.time,
        }


def append_failure_log(directory: Path, node: str, failure: Failure) -> None:
    """Append a failure to `<directory>/failures_<node>.jsonl` (all of them, unlike Redis)."""
    directory.mkdir(parents=True, exist_ok=True)
    line = json.dumps(failure.as_dict(), ensure_ascii=False) + "\n"
    path = directory / f"failures_{node.replace('@', '_').replace('/', '_')}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def record_failure(failure: Failure, mark: Callable[[Failure], bool], log_dir: Path | str) -> bool:
    """The one way a fleet stage records a failed item: `mark` moves it to failed in the job state
    (`JobState.mark_failed`, with the states it may leave), then the node's JSON Lines log gets
    the line (for an object-store output, in its local folder: `Settings.local_dir`). Whether it
    was recorded now (False: the item had ended already)."""
    if not mark(failure):
        return False
    from common.output.storage import local_folder
    from common.settings import get_settings

    log_dir = local_folder(log_dir, get_settings().scratch_root)
    try:
        append_failure_log(log_dir, failure.node, failure)
    except OSError as e:  # Redis holds the failure; the log is a convenience
        log.warning("cannot append to the failure log in %s: %s", log_dir, e)
    return True


def now() -> float:
    """Wall-clock seconds, for failure records."""
    return round(time.time(), 3)
