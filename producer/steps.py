"""The original project's three steps, standalone (no broker, no Redis), plus a preview.

`koala download`, `koala resize` and `koala lab-batch` run the fleet's stage functions
(`common/stages.py`: fetch, decode and resize, model and Lab, record; failures named alike) and its
shard writer, so downloading, resizing and lab-batching a list gives the fleet's records.
`koala preview` draws a contact sheet of a shard. TensorFlow is imported only by `lab-batch`.
"""

from __future__ import annotations

import json
import math
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
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.fetching.fetch import FetchError, make_session, policy_from_settings
from common.fetching.sources import ParseCounts, UrlItem, file_key, is_url, iter_items, open_list
from common.output import records
from common.output.shards import ShardWriter
from common.pictures import images, lab
from common.settings import Settings, get_settings
from common.stages import (
    Model,
    compact_record_of,
    failure_of,
    infer,
    item_bytes,
    load_model,
    pixels_of,
    record_of,
    start_lab,
    start_png,
)
from common.state.failures import Failure, now
from producer.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")

NODE = "standalone"  # node name of failures and of lab-batch's shards
FAILURES_FILE = "failures.jsonl"
MD5_STEM = re.compile(r"[0-9a-f]{32}")
SHEET_PAD = 8  # pixels around and between the cells of a contact sheet
SHEET_LABEL = 16  # pixels of the name line under each cell
SHEET_BACKGROUND = (224, 224, 224)  # light grey, so that white padding shows where a cell ends


def register(main: click.Group) -> None:
    """Add download, resize, lab-batch and preview to the `koala` group."""
    for command in (download, resize, lab_batch, preview):
        main.add_command(command)


# ---- shared helpers ------------------------------------------------------------------------------


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


# ---- koala download ------------------------------------------------------------------------------


def existing_keys(directory: Path) -> set[str]:
    """md5 stems of the <md5>.<ext> files already in directory (one listing, not one per item)."""
    if not directory.is_dir():
        return set()
    return {
        stem
        for entry in os.scandir(directory)
        if not entry.name.startswith(".") and MD5_STEM.fullmatch(stem := entry.name.split(".")[0])
    }


class Downloader:
    """Fetches URL items into <md5>.<ext> files, keeping only what the fleet would accept."""

    def __init__(self, settings: Settings, out_dir: Path, threads: int):
        self.settings = settings
        self.out_dir = out_dir
        self.policy = policy_from_settings(settings)
        self.session = make_session(self.policy, pool_maxsize=threads)
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
    except FetchError as e:
        raise click.ClickException(f"cannot fetch the URL list {source}: {e.reason}: {e.detail}") from e
    finally:
        loader.failures.close()
        loader.session.close()
    click.echo(
        f"downloaded {outcomes['downloaded']}, skipped {outcomes['skipped']} (already there), "
        f"{loader.failures.summary()}, {counts.rejected} lines rejected"
    )


# ---- koala resize --------------------------------------------------------------------------------


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


# ---- koala lab-batch -----------------------------------------------------------------------------


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


@click.command("lab-batch")
@click.option(
    "-c",
    "--checkpoint",
    default=None,
    help="Inception-ResNet-v2 checkpoint: .ckpt file, .tar.gz release or URL (default KOALA_CHECKPOINT)",
)
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
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
    type=click.Choice(records.RECORD_FORMATS),
    default=None,
    help="lab (the original schema) or compact (a PNG, ~7× smaller); default KOALA_RECORD_FORMAT",
)
def lab_batch(
    checkpoint: str | None,
    src: Path,
    out: Path,
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
    image_source is the path relative to SRC. Unreadable images go to OUT/failures.jsonl."""
    settings = get_settings()
    if batch_size:
        settings = settings.model_copy(update={"batch_size": batch_size})
    if record_format:
        settings = settings.model_copy(update={"record_format": record_format})
    checkpoint = checkpoint or settings.checkpoint
    if not checkpoint and not settings.null_model:
        raise click.ClickException("no checkpoint: pass -c PATH|URL or set KOALA_CHECKPOINT")
    files = [identify(p, src) for p in iter_image_files(src, exclude=out)]
    if not files:
        raise click.ClickException(f"no image files under {src}")
    model = load_model(settings, checkpoint)
    failures = FailureLog(out)
    per_shard = examples_per_shard or settings.examples_per_shard
    writer = ShardWriter(
        out, NODE, examples_per_shard=per_shard, max_age=math.inf, compression=settings.compression
    )
    mode = mode or settings.resize_mode
    batcher = LabBatcher(settings, model, mode, int(lab_size or settings.lab_size), writer, failures)
    try:
        with writer, progress_bar(total=len(files), desc="lab-batch", unit=" img") as bar:
            batcher.run(files, model.batch_size, bar)
    finally:
        failures.close()
    for path in writer.finalized:
        click.echo(str(path))
    click.echo(f"wrote {batcher.written} records in {len(writer.finalized)} shards, {failures.summary()}")


# ---- koala preview -------------------------------------------------------------------------------


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


@click.command()
@click.argument("shard", type=click.Path(exists=True, dir_okay=False, path_type=Path))
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
def preview(shard: Path, out: Path, max_records: int, columns: int | None) -> None:
    """Contact sheet of a shard: each record's greyscale input (L) beside the colour rebuilt from
    its Lab channels, its name underneath."""
    cells = []
    for _, _, data in records.iter_examples(shard):
        cells.append(record_images(data))
        if len(cells) >= max_records:
            break
    if not cells:
        raise click.ClickException(f"no records in {shard}")
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(cells, columns).save(out, "PNG")
    click.echo(str(out))
