"""`python -m workers download|embed [options]`: start one Celery worker of the fleet."""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from common.settings import Settings


def settings_with(**options: object) -> Settings:
    """The KOALA_* settings with the command's given options over them."""
    from pydantic import ValidationError

    from common.settings import Settings, get_settings

    given = {k: v for k, v in options.items() if v is not None}
    try:
        return Settings.model_validate({**get_settings().model_dump(), **given})
    except ValidationError as e:
        raise click.ClickException(str(e)) from e


@click.group()
def main() -> None:
    """Start a worker of the Koala fleet."""


@main.command()
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="downloads in flight (threads; default KOALA_DOWNLOAD_CONCURRENCY)",
)
@click.option(
    "--keep-originals",
    type=click.Path(file_okay=False),
    default=None,
    help="also save downloaded bytes as <md5>.<ext> here",
)
@click.option("--name", "-n", default=None, help="unique node name (default download-<pid>@<host>)")
@click.option("--loglevel", "-l", default="INFO")
def download(concurrency: int | None, keep_originals: str | None, name: str | None, loglevel: str) -> None:
    """Consume the download queue."""
    from workers.decoders import reuse_freed_memory

    # two heaps for its ~100 threads (glibc's default is 8 per core, each keeping its own peak):
    # peak RSS 310 -> 165 MB on the photos corpus, the same CPU per image
    reuse_freed_memory(arenas=2)
    from common.settings import use_settings

    keep = os.path.abspath(keep_originals) if keep_originals else None
    settings = settings_with(download_concurrency=concurrency, keep_originals=keep)
    use_settings(settings)  # before the app and its tasks exist: they read get_settings()
    from workers.tasks import app

    # the downloads of a chunk are all started at once (at most `download_concurrency` in flight); a
    # chunk holds its slot until its slowest URL ends (a dead host: connect timeout x attempts), so
    # sixteen chunks per `download_concurrency` worth of items keep the downloads going while many
    # chunks wait for one last URL (eight: the realistic mix of 2,000 URLs took 44 s instead of 39)
    chunks = max(8, math.ceil(16 * settings.download_concurrency / settings.chunk_size))
    app.worker_main(
        [
            "worker",
            "-Q",
            "download",
            "-P",
            "threads",
            "-c",
            str(chunks),
            "-n",
            name or f"download-{os.getpid()}@{socket.gethostname()}",
            "-E",
            "-l",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@main.command()
@click.option("--batch-size", "-b", type=int, default=None, help="images per model call")
@click.option(
    "--checkpoint",
    type=str,
    default=None,
    help="Inception-ResNet-v2 checkpoint: .ckpt file, .tar.gz release or URL",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="output folder of the shards, or an object store URL: s3://bucket/prefix (default KOALA_OUTPUT_DIR)",
)
@click.option("--examples-per-shard", type=int, default=None, help="records per shard")
@click.option(
    "--record-format",
    type=click.Choice(["lab", "compact"]),
    default=None,
    help="lab (the original schema) or compact (a PNG, ~7× smaller); default KOALA_RECORD_FORMAT",
)
@click.option("--name", "-n", default=None, help="unique node name (default embed@<host>); names the shards")
@click.option("--loglevel", "-l", default="INFO")
def embed(
    batch_size: int | None,
    checkpoint: str | None,
    out_dir: str | None,
    examples_per_shard: int | None,
    record_format: str | None,
    name: str | None,
    loglevel: str,
) -> None:
    """Consume the embed queue: Inception + Lab -> rotating TFRecord shards."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from workers.decoders import reuse_freed_memory

    reuse_freed_memory()
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    from common.model.checkpoint import CheckpointError
    from common.output.storage import is_url
    from common.settings import use_settings
    from workers.embed_worker import run_embed_worker

    settings = settings_with(
        batch_size=batch_size,
        checkpoint=checkpoint,
        output_dir=out_dir and (out_dir if is_url(out_dir) else os.path.abspath(out_dir)),
        examples_per_shard=examples_per_shard,
        record_format=record_format,
    )
    use_settings(settings)  # what reads get_settings() in this process sees the options too
    try:
        run_embed_worker(name or f"embed@{socket.gethostname()}", settings)
    except (RuntimeError, OSError, CheckpointError) as e:
        raise click.ClickException(str(e)) from e


if __name__ == "__main__":
    main()
