"""`koala download LIST OUT`: the original project's first step, on the fleet's fetch and acceptance
(`common.stages.item_bytes`, `pixels_of`): originals saved as <md5>.<ext>."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import click

from common.fetching.sources import ParseCounts, SourceError, UrlItem, is_url, iter_items, open_list
from common.pictures import images
from common.settings import Settings, get_settings
from common.stages import (
    item_bytes,
    pixels_of,
)
from producer.progress import progress_bar
from producer.steps.files import FailureLog, bounded_map, existing_keys


class Downloader:
    """Fetches URL items into <md5>.<ext> files, keeping only what the fleet would accept."""

    def __init__(self, settings: Settings, out_dir: Path, threads: int):
        from common.fetching.fetch import (
            make_session,
            policy_from_settings,
        )  # aiohttp: not for other commands

        self.settings = settings
        self.out_dir = out_dir
        self.policy = policy_from_settings(settings)
        self.session = make_session(self.policy, concurrency=threads)
        self.present = existing_keys(out_dir)
        self.failures = FailureLog(out_dir)

    def process(self, item: UrlItem) -> str:
        """'downloaded', 'skipped' or 'failed' (recorded) for one URL item."""
        if item.key in self.present:
            return "skipped"
        saved = self.failures.attempt(item.key, lambda: self.save(item), url=item.url)
        return "failed" if saved is None else "downloaded"

    def save(self, item: UrlItem) -> Path:
        """Fetch an item, check that the fleet would embed it, keep its bytes as <key>.<ext>."""
        data = item_bytes({"k": item.key, "u": item.url}, self.session, self.policy)
        pixels_of(data, self.settings)  # the fleet's acceptance: the pixels it would embed
        path = images.save_original(self.out_dir, item.key, data)
        self.present.add(item.key)
        return path


@click.command()
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=0), default=None, help="download at most N items")
@click.option("--skip", type=click.IntRange(min=0), default=0, help="skip the first N items")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="downloads at once (at most KOALA_PER_HOST_CONNECTIONS to one host)",
)
def download(source: str, out_dir: Path, count: int | None, skip: int, threads: int) -> None:
    """Download the images of a URL list (a file, .gz too, or an http(s) URL of one) into
    OUT_DIR/<md5 of the URL>.<ext from the bytes>, with the fleet's guards and acceptance.

    Files already there are skipped (re-run to resume); failures go to OUT_DIR/failures.jsonl
    with the fleet's reasons (one line per URL still failing)."""
    if not is_url(source) and not os.path.isfile(source):
        raise click.ClickException(f"no such file: {source}")
    settings = get_settings()
    loader = Downloader(settings, out_dir, threads)
    counts = ParseCounts()
    outcomes: Counter[str] = Counter()
    try:
        with open_list(source, settings) as stream, progress_bar(desc="downloading", unit=" img") as bar:
            for outcome in bounded_map(
                loader.process, iter_items(stream, counts, skip=skip, count=count), threads
            ):
                outcomes[outcome] += 1
                bar.update()
    except SourceError as e:
        raise click.ClickException(str(e)) from e
    finally:
        loader.failures.close()
        loader.session.close()
    click.echo(
        f"downloaded {outcomes['downloaded']}, skipped {outcomes['skipped']} (already there), "
        f"{loader.failures.summary()}, {counts.rejected} lines rejected"
    )
