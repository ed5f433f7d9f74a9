"""`koala convert SRC DST --to lab|compact`: finished shards of one record format rewritten in the other.

One output shard per input shard, under the same name in DST, same compression: written as the hidden
`.<name>.tmp`, fsynced, renamed. A shard whose output exists is skipped, so a rerun after an
interruption converts what is left and never writes a record twice. Records already in the target
format are copied as they are.

`lab` -> `compact` needs the 299×299 RGB image, which a `lab` record holds only as Lab floats: the
image is rebuilt with `common.pictures.lab.rgb_from_lab` (exact for every 8-bit sRGB colour from the fleet's
Lab, numpy or TensorFlow: all 2^24 checked) and accepted only when its Lab is the record's within
1e-6. Records at 224 (a resized image) or whose channels are not the Lab of an 8-bit image are refused
with the reason. No TensorFlow here.
"""

from __future__ import annotations

import functools
import io
import math
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from PIL import Image

from common.output import records
from common.output.shards import finished_shards
from common.pictures import images, lab
from common.settings import LAB_SIZES, RECORD_FORMATS, get_settings

TOLERANCE = 1e-6  # the Lab of the rebuilt image against the record's channels
SIDE = 299  # of the image a compact record holds
CHUNK = 16  # records converted at once


class ConvertError(Exception):
    """A record that cannot be converted; the message names it and says why."""


def _bytes(serialized: bytes, name: bytes) -> bytes:
    """A bytes feature of a record, b"" when absent (records of older versions lack key and source)."""
    try:
        return records.example_bytes_feature(serialized, name)
    except KeyError:
        return b""


def rgb_of_png(png: bytes) -> np.ndarray:
    """uint8 [H, W, 3] of a compact record's PNG (`images.decode_png`; Pillow for a PNG of another writer)."""
    try:
        return images.decode_png(png)
    except ValueError:
        with Image.open(io.BytesIO(png)) as im:
            return np.asarray(im.convert("RGB"))


def _names(serialized: bytes) -> tuple[bytes, bytes, bytes]:
    return (
        _bytes(serialized, b"image_name"),
        _bytes(serialized, b"image_key"),
        _bytes(serialized, b"image_source"),
    )


def to_compact(serialized: bytes) -> bytes:
    """The `compact` record of a record of either format."""
    if records.record_format(serialized) == "compact":
        return serialized
    name = _names(serialized)[0].decode(errors="replace")
    l_flat = records.example_floats(serialized, b"image_l")
    side = math.isqrt(l_flat.size)
    if side != SIDE or side * side != l_flat.size:
        raise ConvertError(
            f"record {name}: Lab of {side}×{side}, not {SIDE}×{SIDE}: "
            "the Lab of a resized image, from which the 299×299 image cannot be rebuilt"
        )
    l_channel = l_flat.reshape(side, side)
    ab = records.example_floats(serialized, b"image_ab").reshape(side, side, 2)
    rgb = lab.rgb_from_lab(l_channel, ab)
    l_back, ab_back = lab.lab_channels(rgb, side)
    error = max(float(np.abs(l_back - l_channel).max()), float(np.abs(ab_back - ab).max()))
    if not error <= TOLERANCE:  # NaN too
        raise ConvertError(
            f"record {name}: its channels are not the Lab of an 8-bit RGB image (the nearest one's "
            f"differs by {error:.2g} > {TOLERANCE:g}): it cannot be stored losslessly as an image"
        )
    embedding = records.example_floats(serialized, b"image_embedding")
    return records.serialize_compact(*_names(serialized), images.encode_png(rgb), embedding)


def to_lab(serialized: bytes, lab_size: int) -> bytes:
    """The `lab` record (Lab channels at lab_size) of a record of either format."""
    if records.record_format(serialized) == "lab":
        side = math.isqrt(records.example_floats(serialized, b"image_l").size)
        if side != lab_size:
            raise ConvertError(f"a lab record at {side}×{side}, not at --lab-size {lab_size}")
        return serialized
    png = records.example_bytes_feature(serialized, records.PNG_FEATURE)
    l_channel, ab = lab.lab_channels(rgb_of_png(png), lab_size)
    embedding = records.example_floats(serialized, b"image_embedding")
    return records.serialize_example(*_names(serialized), l_channel, ab, embedding)


def _converted(src: Path, to: str, lab_size: int, pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """The records of src in format `to`, in order, converted a chunk at a time on the pool."""
    convert = to_compact if to == "compact" else functools.partial(to_lab, lab_size=lab_size)
    chunk: list[bytes] = []
    for _, _, data in records.iter_examples(src):
        chunk.append(data)
        if len(chunk) == CHUNK:
            yield from pool.map(convert, chunk)
            chunk = []
    yield from pool.map(convert, chunk)


def convert_shard(src: Path, dst: Path, to: str, lab_size: int, pool: ThreadPoolExecutor) -> int:
    """Write dst (atomically: temp, fsync, rename) with every record of src in format `to`; the
    number of records. Raises ConvertError (dst not written) for a record that cannot be converted."""
    temp = dst.with_name(f".{dst.name}.tmp")
    deflate = None
    if dst.name.endswith((".gz", ".zlib")):
        deflate = zlib.compressobj(6, zlib.DEFLATED, 31 if dst.name.endswith(".gz") else 15)
    n = 0
    try:
        with open(temp, "wb") as f:
            for data in _converted(src, to, lab_size, pool):
                framed = records.frame_record(data)
                f.write(deflate.compress(framed) if deflate else framed)
                n += 1
            if deflate:
                f.write(deflate.flush())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, dst)
    finally:
        if temp.exists():
            temp.unlink()
    fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def convert_folder(src_dir: Path, dst_dir: Path, to: str, lab_size: int, echo=print) -> dict[str, int]:
    """Convert every finished shard of src_dir (training and validation) not converted yet."""
    if dst_dir.resolve() == src_dir.resolve():
        raise ConvertError("the output folder must differ from the input folder")
    shards = finished_shards(src_dir)
    if not shards:
        raise ConvertError(f"no finished shards (lab_images_*.tfrecord*) in {src_dir}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    done = {"shards": 0, "records": 0, "skipped": 0}
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for shard in shards:
            target = dst_dir / shard.name
            if target.exists():
                done["skipped"] += 1
                continue
            try:
                n = convert_shard(shard, target, to, lab_size, pool)
            except ConvertError as e:
                raise ConvertError(f"{shard}: {e}") from None
            done["shards"] += 1
            done["records"] += n
            echo(f"{target}  {n} records")
    return done


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--to", "to", type=click.Choice(RECORD_FORMATS), required=True, help="the record format to write"
)
@click.option(
    "--lab-size",
    type=click.Choice([str(s) for s in LAB_SIZES]),
    default=None,
    help="--to lab: side of the Lab channels of converted compact records (default KOALA_LAB_SIZE)",
)
def convert(src: Path, dst: Path, to: str, lab_size: str | None) -> None:
    """Rewrite the finished shards of SRC in record format lab or compact into DST: one shard per
    shard, same names and compression, each record once; shards already in DST are skipped (run it
    again after an interruption). lab -> compact needs 299×299 lab records."""
    size = int(lab_size or get_settings().lab_size)
    try:
        done = convert_folder(src, dst, to, size, echo=click.echo)
    except ConvertError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"converted {done['records']} records in {done['shards']} shards to {to}; "
        f"{done['skipped']} shards already in {dst}",
        err=True,
    )
