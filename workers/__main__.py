"""`python -m workers download|embed [options]`: start one Celery worker of the fleet."""

from __future__ import annotations

import os
import socket

import click


@click.group()
def main() -> None:
    """Start a worker of the Koala fleet."""


@main.command()
@click.option("--concurrency", "-c", type=int, default=None, help="chunks downloaded at once (threads)")
@click.option("--keep-originals", type=click.Path(file_okay=False), default=None,
              help="also save downloaded bytes as <md5>.<ext> here")
@click.option("--name", "-n", default=None, help="unique node name (default download-<pid>@<host>)")
@click.option("--loglevel", "-l", default="INFO")
def download(concurrency: int | None, keep_originals: str | None, name: str | None,
             loglevel: str) -> None:
    """Consume the download queue."""
    if keep_originals:
        os.environ["KOALA_KEEP_ORIGINALS"] = os.path.abspath(keep_originals)
    from common.settings import get_settings

    settings = get_settings()
    from workers.tasks import app

    app.worker_main([
        "worker", "-Q", "download", "-P", "threads",
        "-c", str(concurrency or settings.download_concurrency),
        "-n", name or f"download-{os.getpid()}@{socket.gethostname()}",
        "-E", "-l", loglevel, "--without-gossip", "--without-mingle",
    ])


if __name__ == "__main__":
    main()
