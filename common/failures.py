"""The one exception of an item that failed for good (a download, an image)."""

from __future__ import annotations


class ItemError(Exception):
    """An item that cannot become a record; `reason` is from `state.REASONS`, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
