"""`koala resize SRC DST`: the original project's second step, on the fleet's decode and resize:
299×299 PNGs named like their sources."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import click

from common.pictures import images
from common.settings import Settings, get_settings
from common.stages import (
    pixels_of,
)
from producer.progress import progress_bar
from producer.steps.files import (
    FailureLog,
    LocalImage,
    bounded_map,
    identify,
    iter_image_files,
    parse_size,
    write_png,
)


def png_path(image: LocalImage, dst: Path) -> Path:
    """DST/<path relative to SRC, its suffix replaced by .png>."""
    rel = Path(image.source)
    return dst / rel.with_name(rel.stem + ".png")


def resize_one(
    image: LocalImage, dst: Path, size: tuple[int, int], mode: str, settings: Settings, failures: FailureLog
) -> str:
    """'resized', 'skipped' or 'failed' (recorded) for one file -> DST/<relative stem>.png."""
    out = png_path(image, dst)
    if out.exists():
        return "skipped"
    written = failures.attempt(
        image.key,
        lambda: write_png(out, pixels_of(image.path.read_bytes(), settings, size, mode)),
        path=image.source,
    )
    return "failed" if written is None else "resized"


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--size",
    callback=parse_size,
    default=None,
    help="W,H of the output (default KOALA_IMAGE_SIZE square: 299,299)",
)
@click.option(
    "--mode",
    type=click.Choice(images.RESIZE_MODES),
    default=None,
    help="contain (fit on white), crop or stretch (default KOALA_RESIZE_MODE: contain)",
)
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
def resize(src: Path, dst: Path, size: tuple[int, int] | None, mode: str | None, threads: int) -> None:
    """Resize every image file under SRC to DST/<same relative path, stem>.png (lossless PNG) with
    the fleet's decoder and resize. Existing outputs are skipped; unreadable images are listed in
    DST/failures.jsonl with the fleet's reasons."""
    settings = get_settings()
    size = size or (settings.image_size, settings.image_size)
    mode = mode or settings.resize_mode
    failures = FailureLog(dst)
    files, outcomes = unique_outputs(
        [identify(p, src) for p in iter_image_files(src, exclude=dst)], dst, failures
    )
    try:
        with progress_bar(total=len(files), desc="resizing", unit=" img") as bar:
            for outcome in bounded_map(
                lambda f: resize_one(f, dst, size, mode, settings, failures), files, threads
            ):
                outcomes[outcome] += 1
                bar.update()
    finally:
        failures.close()
    click.echo(
        f"resized {outcomes['resized']}, skipped {outcomes['skipped']} (already there), {failures.summary()}"
    )


def unique_outputs(
    files: list[LocalImage], dst: Path, failures: FailureLog
) -> tuple[list[LocalImage], Counter[str]]:
    """The files whose PNG no earlier file claims (a.jpg and a.png both give a.png: the second
    fails with io_error), and the counter of outcomes so far."""
    claimed: dict[Path, str] = {}
    kept, outcomes = [], Counter[str]()
    for image in files:
        first = claimed.setdefault(png_path(image, dst), image.source)
        if first == image.source:
            kept.append(image)
        else:
            failures.add(image.key, "io_error", f"same output as {first}", path=image.source)
            outcomes["failed"] += 1
    return kept, outcomes
