"""The job's progress: one snapshot of counts, queues and shards, and the live bars of
`koala submit --wait` and `koala run` (`progress_bar`: a redrawn bar on a terminal, a line every
few seconds in a log)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from common.messages import DOWNLOAD_QUEUE, EMBED_QUEUE
from common.state.job import JobState
from common.state.retries import retry_on_broker

STAGES = ("downloaded", "written", "failed")
LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
_CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LogLines:
    """A stream for tqdm when stderr is not a terminal: each redraw becomes one line of its own
    (no carriage returns, no cursor moves), so `koala submit 2>log` reads as a log."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = _CURSOR_CODES.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar on stderr: redrawn on a terminal; elsewhere a plain line every `LOG_EVERY` s."""
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, **options)
    options.pop("position", None)
    return tqdm(file=LogLines(sys.stderr), mininterval=LOG_EVERY, ncols=100, ascii=True, **options)


def snapshot(state: JobState, out_dir: Path | str) -> dict:
    """Everything `koala status --json` reports, read once."""
    from common.output.shards import count_shards  # numpy: not for `koala submit`

    counts = state.counts()
    return {
        **counts,
        "queues": state.queue_depths([DOWNLOAD_QUEUE, EMBED_QUEUE]),
        "shards": count_shards(out_dir),
        "failures_by_reason": state.failures_by_reason(),
        "time": time.time(),
    }


def with_rates(before: dict, after: dict) -> dict:
    """Add per-second rates of the stages between two snapshots."""
    dt = max(after["time"] - before["time"], 1e-6)
    rates = {
        k: round((after[k] - before[k]) / dt, 2) for k in ("submitted", "downloaded", "written", "failed")
    }
    return {**after, "rates": rates}


def watch(
    state: JobState, out_dir: Path | str, *, poll: float = 1.0, on_tick: Callable[[dict], None] | None = None
) -> dict:
    """Show a bar per stage until nothing is pending (waiting out a lost Redis); returns the last
    snapshot. `on_tick(snapshot)` runs after each look that still finds items pending."""
    read = retry_on_broker(snapshot)
    first = read(state, out_dir)
    bars = {
        name: progress_bar(desc=f"{name:>10}", total=first["submitted"], unit=" img", position=i, leave=True)
        for i, name in enumerate(STAGES)
    }
    try:
        while True:
            now = read(state, out_dir)
            _show(bars, now)
            if now["pending"] <= 0:
                return now
            if on_tick:
                on_tick(now)
            time.sleep(poll)
    finally:
        for bar in bars.values():
            bar.close()


def _show(bars: dict[str, tqdm], snap: dict) -> None:
    """Move each stage's bar to the snapshot's counts, queue depths beside it."""
    for name, bar in bars.items():
        bar.total = snap["submitted"]
        bar.n = snap[name]
        bar.set_postfix(
            queue_download=snap["queues"][DOWNLOAD_QUEUE],
            queue_embed=snap["queues"][EMBED_QUEUE],
            refresh=False,
        )
        bar.refresh()


class Stall:
    """Tells when a job has pending items, no message anywhere, and no progress for a while."""

    def __init__(self, after: float):
        self.after = after
        self.progress: tuple | None = None
        self.since = time.monotonic()

    def stalled(self, snap: dict) -> bool:
        """True once per `after` seconds of no progress with empty queues and nothing unacked."""
        progress = tuple(snap[k] for k in ("submitted", "downloaded", "written", "failed"))
        if progress != self.progress or any(snap["queues"].values()):
            self.progress, self.since = progress, time.monotonic()
            return False
        if time.monotonic() - self.since >= self.after:
            self.since = time.monotonic()
            return True
        return False


def resend_when_stalled(resend: Callable[[], None], after: float) -> Callable[[dict], None]:
    """A `watch` hook that calls `resend` when items stay pending with nothing queued or
    unacknowledged for `after` seconds: their messages were lost (a crash between a broker's pop
    and its unacked record, a Redis that lost its queues)."""
    stall = Stall(after)

    def check(snap: dict) -> None:
        if stall.stalled(snap):
            retry_on_broker(resend)()

    return check
