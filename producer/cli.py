"""The `koala` command line: submit sources, watch the job, list failures, start workers."""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from common.celery_app import make_app
from common.output.storage import is_url, local_folder
from common.settings import RECORD_FORMATS, Settings, get_settings
from common.state.failures import REASONS
from common.state.job import JobState
from producer.progress import progress_bar, resend_when_stalled, snapshot, watch, with_rates


def job_state(settings: Settings, broker: str | None = None) -> JobState:
    """The job state in the configured Redis; exits with one clear line when it is unreachable."""
    state = JobState.from_settings(settings, broker)
    try:
        state.ping()
    except Exception as e:  # redis raises several kinds; the user needs one line
        raise click.ClickException(f"cannot reach Redis at {_safe_url(settings.broker_url)}: {e}") from None
    return state


def _safe_url(url: str) -> str:
    """The broker URL without its password."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Location(click.ParamType):
    """An output location: a folder (a Path) or an object store URL (kept as text: `s3://…`)."""

    name = "folder|url"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        text = str(value)
        return text if is_url(text) else Path(text)


LOCATION = Location()


@contextmanager
def run_broker(out: Path | str | None) -> Iterator[str | None]:
    """The Redis of a `koala run` in out_dir: its running server, or started from its state for
    the duration (None when out_dir holds no run or a broker is configured explicitly). A run to
    an object store keeps its Redis in its local folder (`KOALA_SCRATCH_DIR`)."""
    out_dir = None if out is None else local_folder(out, current_settings().scratch_root)
    if out_dir is None or not (out_dir / ".redis").is_dir() or broker_given():
        yield None
        return
    url_file = out_dir / ".redis" / "url"
    if url_file.exists():
        yield url_file.read_text().strip()
        return
    from producer.run import EmbeddedRedis

    server = EmbeddedRedis(out_dir).start()
    try:
        yield server.url
    finally:
        server.stop()


# `--out` of the commands that read a job's state: a `koala run` folder holds its embedded Redis
RUN_FOLDER = click.option(
    "--out",
    "out_dir",
    type=LOCATION,
    default=None,
    help="the output folder of a `koala run` (finds its embedded Redis)",
)


class LazyGroup(click.Group):
    """A group whose heavier commands are imported when asked for (click's documented pattern):
    `koala submit` starts without numpy, Pillow or TensorFlow's helpers."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = lazy  # command name -> "module.attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, _, attribute = self.lazy[name].rpartition(".")
        return getattr(importlib.import_module(module), attribute)


STEPS = {  # the original project's steps standalone, a preview, and the record-format converter
    "download": "producer.steps.download.download",
    "resize": "producer.steps.resize.resize",
    "lab-batch": "producer.steps.lab_batch.lab_batch",
    "preview": "producer.steps.preview.preview",
    "convert": "producer.convert.convert",
}


@click.group(cls=LazyGroup, lazy=STEPS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker",
    envvar="KOALA_BROKER_URL",
    default=None,
    help="Redis URL (default KOALA_BROKER_URL or redis://127.0.0.1:6379/0)",
)
@click.pass_context
def main(ctx: click.Context, broker: str | None) -> None:
    """Koala fleet: URL lists and image folders to Lab + Inception TFRecord shards."""
    settings = get_settings()
    ctx.obj = settings.model_copy(update={"broker_url": broker}) if broker else settings
    ctx.meta["koala.broker_given"] = broker is not None  # --broker or KOALA_BROKER_URL


def current_settings() -> Settings:
    """The settings of this `koala` command: the KOALA_* variables, with --broker applied."""
    return click.get_current_context().find_root().obj


def broker_given() -> bool:
    """Whether a broker was named (--broker or KOALA_BROKER_URL): `koala run` then starts none."""
    return bool(click.get_current_context().meta.get("koala.broker_given"))


@main.command()
@click.argument("source")
@click.option("--count", type=int, default=None, help="submit at most N items")
@click.option("--skip", type=int, default=0, help="skip the first N items")
@click.option("--wait", is_flag=True, help="then show progress until nothing is pending")
@click.option(
    "--requeue-pending",
    is_flag=True,
    help="also send again items that earlier submissions left pending (after a lost queue)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def submit(
    source: str, count: int | None, skip: int, wait: bool, requeue_pending: bool, as_json: bool
) -> None:
    """Enqueue SOURCE: a URL-list file (.gz too), an http(s) URL of one, or a folder of images."""
    from common.fetching.sources import SourceError, is_url
    from producer.submit import Submitter, submit_source

    if not is_url(source) and not os.path.exists(source):
        raise click.ClickException(f"no such file or folder: {source}")
    settings = current_settings()
    state = job_state(settings)
    with progress_bar(desc="submitting", unit=" items", disable=as_json) as bar:
        submitter = Submitter(
            make_app(settings),
            state,
            settings,
            node=f"producer-{socket.gethostname()}",
            on_item=bar.update,
            requeue=requeue_pending,
        )
        try:
            report = submit_source(source, submitter, skip, count)
        except SourceError as e:
            raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(
            f"read {report.read} items: {report.new} new, {report.requeued} sent again "
            f"(left pending earlier), {report.recovered} recovered from a killed producer, "
            f"{report.known} already known, "
            f"{report.failed_at_submit} failed at once, "
            f"{report.rejected_lines} lines rejected"
        )
    if wait:

        def resend() -> None:
            again = Submitter(
                make_app(settings), state, settings, node=f"producer-{socket.gethostname()}", requeue=True
            )
            submit_source(source, again)
            click.echo(
                f"no progress for {settings.resend_after:.0f}s and nothing queued: sent "
                f"{again.report.requeued + again.report.recovered} pending items again",
                err=True,
            )

        watch(state, settings.output_dir, on_tick=resend_when_stalled(resend, settings.resend_after))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.option(
    "--out",
    "out_dir",
    type=LOCATION,
    default=None,
    help="output folder or object store URL whose shards to count (default KOALA_OUTPUT_DIR); "
    "finds the embedded Redis of a `koala run` there",
)
@click.option("--interval", type=float, default=1.0, help="seconds between the two reads for rates (0: none)")
def status(as_json: bool, out_dir: Path | str | None, interval: float) -> None:
    """Counts, queue depths, rates, shards and failures by reason."""
    settings = current_settings()
    with run_broker(out_dir) as broker:
        state = job_state(settings, broker)
        out_dir = out_dir or settings.output_dir
        snap = snapshot(state, out_dir)
        if interval > 0:
            time.sleep(interval)
            snap = with_rates(snap, snapshot(state, out_dir))
    if as_json:
        click.echo(json.dumps(snap))
        return
    for key in (
        "submitted",
        "downloaded",
        "written",
        "failed",
        "pending",
        "duplicates",
        "requeued",
        "retried",
        "rejected_lines",
        "shards",
    ):
        rate = snap.get("rates", {}).get(key)
        click.echo(f"{key:>15}  {snap[key]:>12,}" + (f"   {rate:,.1f}/s" if rate else ""))
    click.echo("queues: " + ", ".join(f"{k} {v:,}" for k, v in snap["queues"].items()))
    if snap["failures_by_reason"]:
        click.echo("failures: " + ", ".join(f"{k} {v:,}" for k, v in snap["failures_by_reason"].items()))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="a JSON array")
@click.option("--reason", type=click.Choice(REASONS), default=None, help="only this reason")
@click.option("--limit", type=int, default=None, help="at most N")
@RUN_FOLDER
def failures(as_json: bool, reason: str | None, limit: int | None, out_dir: Path | str | None) -> None:
    """Failed items with their reasons (Redis keeps the latest KOALA_FAILURES_KEPT)."""
    with run_broker(out_dir) as broker:
        items = job_state(current_settings(), broker).failures(reason, limit)
    if as_json:
        click.echo(json.dumps(items, ensure_ascii=False))
        return
    for item in items:
        source = item.get("url") or item.get("path", "")
        click.echo(f"{item['reason']:<16} {source}  {item['detail']}")
    click.echo(f"{len(items)} failures", err=True)


@main.command()
@click.argument("source")
@click.option(
    "--out",
    "out_dir",
    type=LOCATION,
    required=True,
    help="output folder: shards, summary.json, and the embedded Redis's state",
)
@click.option(
    "--checkpoint",
    default=None,
    help="Inception checkpoint (.ckpt, .tar.gz or URL; default: "
    "KOALA_CHECKPOINT, else the official release, downloaded once)",
)
@click.option(
    "--download-workers",
    type=int,
    default=None,
    help="download worker processes (default: 2, or one per 4 cores when more)",
)
@click.option("--flower", is_flag=True, help="also start Flower on http://localhost:5555")
@click.option("--batch-size", type=int, default=None, help="images per model call")
@click.option(
    "--record-format",
    type=click.Choice(RECORD_FORMATS),
    default=None,
    help="lab (the original schema) or compact (a PNG, ~7× smaller); default KOALA_RECORD_FORMAT",
)
def run(
    source: str,
    out_dir: Path | str,
    checkpoint: str | None,
    download_workers: int | None,
    flower: bool,
    batch_size: int | None,
    record_format: str | None,
) -> None:
    """The whole job on this machine: embedded Redis, workers, submit, progress, summary."""
    from producer.run import RunError, run_job

    try:
        code = run_job(
            source,
            out_dir,
            checkpoint=checkpoint,
            download_workers=download_workers,
            flower=flower,
            batch_size=batch_size,
            record_format=record_format,
            echo=lambda m: click.echo(m, err=True),
            settings=current_settings(),
            broker_given=broker_given(),
        )
    except RunError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


@main.command()
@click.option("--val-fraction", type=float, required=True, help="share of shards for validation, e.g. 0.1")
@click.argument("directory", type=LOCATION)
def split(val_fraction: float, directory: Path | str) -> None:
    """Rename a deterministic choice of finalized shards in DIRECTORY (a folder, or an object store
    URL: there its manifest says which) to val_... (idempotent)."""
    from common.output.shards import split_store, split_validation

    if isinstance(directory, Path) and not directory.is_dir():
        raise click.ClickException(f"no such folder: {directory}")
    try:
        if isinstance(directory, str):
            renamed = [url.rsplit("/", 1)[-1] for url in split_store(directory, val_fraction)]
        else:
            renamed = [path.name for path in split_validation(directory, val_fraction)]
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    for name in renamed:
        click.echo(name)
    click.echo(f"{len(renamed)} shards renamed for validation", err=True)


@main.command()
@click.option("--reason", type=click.Choice(REASONS), default=None, help="only failures of this reason")
@RUN_FOLDER
def retry(reason: str | None, out_dir: Path | str | None) -> None:
    """Submit failed URLs again (all, or one reason), e.g. after a network outage."""
    from producer.submit import Submitter

    settings = current_settings()
    with run_broker(out_dir) as broker:
        state = job_state(settings, broker)
        failed = state.failures(reason)
        app = make_app(settings.model_copy(update={"broker_url": broker})) if broker else make_app(settings)
        submitter = Submitter(app, state, settings, node=f"producer-{socket.gethostname()}")
        submitter.recover_orphans()
        submitter.retry(failed)
    click.echo(
        f"{submitter.report.requeued} failed items sent again"
        + (
            f"; {submitter.report.known} files of folders can't be (submit the folder again)"
            if submitter.report.known
            else ""
        )
    )


@main.command()
@click.option("--yes", is_flag=True, help="do not ask")
def reset(yes: bool) -> None:
    """Forget the job: item states, counters and failures (queues are left alone)."""
    settings = current_settings()
    state = job_state(settings)
    if not yes:
        click.confirm(f"Delete every {settings.state_prefix}:* key?", abort=True)
    click.echo(f"deleted {state.reset()} keys")


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Start one worker: `koala worker download|embed [OPTIONS]` (`--help` after the kind)."""
    if not args or args[0] not in ("download", "embed"):
        click.echo(ctx.get_help())
        ctx.exit(0 if not args or args[0] in ("-h", "--help") else 2)
    os.execv(sys.executable, [sys.executable, "-m", "workers", *args])
