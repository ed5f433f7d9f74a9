"""`koala preview SHARD`: a contact sheet PNG of a shard's records (either format)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from common.output import records
from common.output.storage import filesystem, is_url
from common.pictures import lab

SHEET_PAD = 8  # pixels around and between the cells of a contact sheet
SHEET_LABEL = 16  # pixels of the name line under each cell
SHEET_BACKGROUND = (224, 224, 224)  # light grey, so that white padding shows where a cell ends


def record_images(serialized: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, greyscale L as RGB, colour rebuilt from Lab, or a compact record's image) of one record."""
    name = records.example_bytes_feature(serialized, b"image_name").decode(errors="replace")
    if records.record_format(serialized) == "compact":
        from producer.convert import rgb_of_png

        rgb = rgb_of_png(records.example_bytes_feature(serialized, records.PNG_FEATURE))
        l_channel, ab = lab.lab_channels(rgb, rgb.shape[0])
        return name, lab.rgb_from_lab(l_channel, np.zeros_like(ab)), rgb
    l_flat = records.example_floats(serialized, b"image_l")
    side = math.isqrt(l_flat.size)
    if side * side != l_flat.size or side == 0:
        raise ValueError(f"record {name}: image_l holds {l_flat.size} values, not a square")
    l_channel = l_flat.reshape(side, side)
    ab = records.example_floats(serialized, b"image_ab").reshape(side, side, 2)
    return name, lab.rgb_from_lab(l_channel, np.zeros_like(ab)), lab.rgb_from_lab(l_channel, ab)


def sheet_size(n: int, side: int, columns: int | None = None) -> tuple[int, int]:
    """(width, height) of a contact sheet of n records of side×side Lab channels."""
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return (SHEET_PAD + cols * (2 * side + SHEET_PAD), SHEET_PAD + rows * (side + SHEET_LABEL + SHEET_PAD))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """text, shortened from the left with '…' until it fits `width` pixels."""
    while len(text) > 1 and draw.textlength(text) > width:
        text = "…" + text[2:]
    return text


def contact_sheet(cells: list[tuple[str, np.ndarray, np.ndarray]], columns: int | None = None) -> Image.Image:
    """A Pillow image: each record's grey input beside its colour, its name under them, in a grid."""
    side = max(grey.shape[0] for _, grey, _ in cells)
    cols = columns or max(1, math.ceil(math.sqrt(len(cells))))
    sheet = Image.new("RGB", sheet_size(len(cells), side, cols), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (name, grey, colour) in enumerate(cells):
        x = SHEET_PAD + (i % cols) * (2 * side + SHEET_PAD)
        y = SHEET_PAD + (i // cols) * (side + SHEET_LABEL + SHEET_PAD)
        sheet.paste(Image.fromarray(grey, "RGB"), (x, y))
        sheet.paste(Image.fromarray(colour, "RGB"), (x + side, y))
        draw.text((x, y + side + 2), _fit(draw, name, 2 * side), fill=(0, 0, 0))
    return sheet


def shard_records(shard: str) -> Iterator[bytes]:
    """The serialized records of a shard file or of a shard's URL."""
    if not is_url(shard):
        if not Path(shard).is_file():
            raise click.ClickException(f"no such shard: {shard}")
        yield from (data for _, _, data in records.iter_examples(Path(shard)))
        return
    fs, path = filesystem(shard)
    try:
        with fs.open(path, "rb", block_size=8 << 20) as raw:
            yield from records.read_stream(raw, shard)
    except FileNotFoundError:
        raise click.ClickException(f"no such shard: {shard}") from None


@click.command()
@click.argument("shard")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("sheet.png"),
    show_default=True,
    help="PNG to write",
)
@click.option(
    "--max",
    "max_records",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="records shown (the first N)",
)
@click.option(
    "--columns", type=click.IntRange(min=1), default=None, help="cells per row (default: a square grid)"
)
def preview(shard: str, out: Path, max_records: int, columns: int | None) -> None:
    """Contact sheet of a shard (a file, or an object store URL: s3://bucket/prefix/lab_images_…):
    each record's greyscale input (L) beside the colour rebuilt from its Lab channels, its name
    underneath."""
    cells = []
    for data in shard_records(shard):
        cells.append(record_images(data))
        if len(cells) >= max_records:
            break
    if not cells:
        raise click.ClickException(f"no records in {shard}")
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(cells, columns).save(out, "PNG")
    click.echo(str(out))
