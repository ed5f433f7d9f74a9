"""`koala lab-batch SRC OUT`: the original project's third step, on the fleet's model, Lab and
records (`common.stages`) and shard writer: the fleet's records from a folder of images."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from common.output.shards import ShardWriter, highest_in, publish_to_store
from common.output.storage import StorageError, Store, local_folder
from common.pictures import images
from common.settings import RECORD_FORMATS, Settings, get_settings
from common.stages import (
    Model,
    compact_record_of,
    infer,
    load_model,
    pixels_of,
    record_of,
    start_lab,
    start_png,
)
from producer.progress import progress_bar
from producer.steps.files import NODE, FailureLog, LocalImage, T, identify, iter_image_files


def batched(items: list[T], n: int) -> list[list[T]]:
    """Consecutive slices of n items."""
    return [items[i : i + n] for i in range(0, len(items), n)]


def append_exact(writer: ShardWriter, serialized: list[bytes]) -> None:
    """Append records so that every shard holds exactly examples_per_shard records (the last fewer)."""
    while serialized:
        room = writer.examples_per_shard - writer.count
        writer.append(serialized[:room])
        serialized = serialized[room:]
        writer.maybe_rotate()


class LabBatcher:
    """Files -> the fleet's pixels -> embedding + Lab -> records in rotating shards."""

    def __init__(
        self,
        settings: Settings,
        model: Model,
        mode: str,
        lab_size: int,
        writer: ShardWriter,
        failures: FailureLog,
    ):
        self.settings = settings
        self.model = model
        self.mode = mode
        self.lab_size = lab_size
        self.writer = writer
        self.failures = failures
        self.written = 0

    def load(self, image: LocalImage) -> np.ndarray | None:
        """The 299×299 pixels the fleet would embed (a no-op resize for 299×299 PNGs), or None."""
        return self.failures.attempt(
            image.key,
            lambda: pixels_of(image.path.read_bytes(), self.settings, mode=self.mode),
            path=image.source,
        )

    def write(
        self, pool: ThreadPoolExecutor, batch: list[LocalImage], pixels: list[np.ndarray | None]
    ) -> None:
        """Embed and write one batch (Lab computed on the pool while the model runs)."""
        kept = [(img, px) for img, px in zip(batch, pixels, strict=True) if px is not None]
        if not kept:
            return
        rgb = np.stack([px for _, px in kept])
        labs = start_lab(self.model, rgb, self.lab_size, pool)
        pngs = [] if self.model.lab else start_png(rgb, pool)  # compact records
        logits, l_channels, ab_channels = infer(self.model, rgb, self.lab_size, labs)
        if pngs:
            serialized = [
                compact_record_of(img.name, img.key, img.source, png.result(), embedding)
                for (img, _), png, embedding in zip(kept, pngs, logits, strict=True)
            ]
        else:
            serialized = [
                record_of(img.name, img.key, img.source, l_channel, ab, embedding)
                for (img, _), l_channel, ab, embedding in zip(
                    kept, l_channels, ab_channels, logits, strict=True
                )
            ]
        append_exact(self.writer, serialized)
        self.written += len(serialized)

    def run(self, files: list[LocalImage], batch_size: int, bar: tqdm) -> None:
        """All files, batch by batch, the next batch decoded while the current one is embedded."""
        batches = batched(files, batch_size)
        with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
            ahead = [pool.submit(self.load, f) for f in batches[0]] if batches else []
            for i, batch in enumerate(batches):
                current = ahead
                if i + 1 < len(batches):
                    ahead = [pool.submit(self.load, f) for f in batches[i + 1]]
                self.write(pool, batch, [f.result() for f in current])
                bar.update(len(batch))


def shard_writer(store: Store, folder: Path, per_shard: int, settings: Settings) -> ShardWriter:
    """The writer of `lab-batch`: shards renamed in a folder, or uploaded to an object store (its
    numbers after the highest its manifest lists)."""
    if not store.remote:
        return ShardWriter(
            folder, NODE, examples_per_shard=per_shard, max_age=math.inf, compression=settings.compression
        )
    try:
        store.check_writable()
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    floor = highest_in(store.shard_names(), NODE) + 1
    return ShardWriter(
        folder,
        NODE,
        examples_per_shard=per_shard,
        max_age=math.inf,
        compression=settings.compression,
        reserve_number=lambda lowest: max(lowest, floor),
        publisher=lambda temp, spans: publish_to_store(store, temp, spans, settings.compression),
        durable=False,
    )


@click.command("lab-batch")
@click.option(
    "-c",
    "--checkpoint",
    default=None,
    help="Inception-ResNet-v2 checkpoint: .ckpt file, .tar.gz release or URL (default KOALA_CHECKPOINT)",
)
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out")
@click.option(
    "-b",
    "--examples-per-shard",
    type=click.IntRange(min=1),
    default=None,
    help="records per shard, as the original lab_batch -b (default KOALA_EXAMPLES_PER_SHARD)",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="images per model call (default KOALA_BATCH_SIZE)",
)
@click.option(
    "--lab-size",
    type=click.Choice(["299", "224"]),
    default=None,
    help="side of the Lab channels (default KOALA_LAB_SIZE)",
)
@click.option(
    "--mode",
    type=click.Choice(images.RESIZE_MODES),
    default=None,
    help="resize of images that are not 299×299 yet (default KOALA_RESIZE_MODE)",
)
@click.option(
    "--record-format",
    type=click.Choice(RECORD_FORMATS),
    default=None,
    help="lab (the original schema) or compact (a PNG, ~7× smaller); default KOALA_RECORD_FORMAT",
)
def lab_batch(
    checkpoint: str | None,
    src: Path,
    out: str,
    examples_per_shard: int | None,
    batch_size: int | None,
    lab_size: str | None,
    mode: str | None,
    record_format: str | None,
) -> None:
    """Turn the images under SRC (originals, or 299×299 PNGs from `koala resize`) into TFRecord
    shards OUT/lab_images_standalone_<n>.tfrecord, records as the fleet writes them.

    Names: a file named <md5>.<ext> (what `koala download` and `koala resize` write) is the URL
    item of that md5, so image_name = image_key = the stem, as the fleet names a URL's record; any
    other file gets image_name = its path relative to SRC (key: md5 of its absolute path).
    image_source is the path relative to SRC. Unreadable images go to OUT/failures.jsonl.
    OUT may be an object store URL (s3://bucket/prefix): each shard is uploaded whole when full and
    listed in OUT/manifest.json; the shard being written waits in KOALA_SCRATCH_DIR."""
    settings = get_settings()
    if batch_size:
        settings = settings.model_copy(update={"batch_size": batch_size})
    if record_format:
        settings = settings.model_copy(update={"record_format": record_format})
    checkpoint = checkpoint or settings.checkpoint
    if not checkpoint and not settings.null_model:
        raise click.ClickException("no checkpoint: pass -c PATH|URL or set KOALA_CHECKPOINT")
    store, folder = Store(out), local_folder(out, settings.scratch_root)
    files = [identify(p, src) for p in iter_image_files(src, exclude=folder)]
    if not files:
        raise click.ClickException(f"no image files under {src}")
    model = load_model(settings, checkpoint)
    failures = FailureLog(folder)
    writer = shard_writer(store, folder, examples_per_shard or settings.examples_per_shard, settings)
    mode = mode or settings.resize_mode
    batcher = LabBatcher(settings, model, mode, int(lab_size or settings.lab_size), writer, failures)
    try:
        with writer, progress_bar(total=len(files), desc="lab-batch", unit=" img") as bar:
            batcher.run(files, model.batch_size, bar)
    finally:
        failures.close()
        if store.remote and (folder / "failures.jsonl").exists():
            store.put("failures.jsonl", (folder / "failures.jsonl").read_bytes())
    for path in writer.finalized:
        click.echo(str(path))
    click.echo(f"wrote {batcher.written} records in {len(writer.finalized)} shards, {failures.summary()}")
