"""What the benchmarks share: paths, logging, result files, CPU and memory readings, photo-like images
queued as download workers queue them, a Redis of their own, and a real embed worker on that queue
(with the stand-in forward pass, KOALA_NULL_MODEL=1, in the ceiling's rounds)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"
_T0, TICK = time.monotonic(), os.sysconf("SC_CLK_TCK")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow quiet in every benchmark


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def options(fn: Callable) -> Callable:
    """The options of every benchmark: --json PATH and --smoke (a tiny run that checks the path works)."""
    fn = click.option("--smoke", is_flag=True, help="a tiny run that only checks the path works")(fn)
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))(fn)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def json_tables(obj: dict) -> str:
    """Markdown of a result: each table in it (a list of objects, or an object of flat objects: its keys
    the first column) as a table, every other value as a key/value row (nested keys joined by dots)."""
    cell = lambda v: json.dumps(v) if isinstance(v, (dict, list)) else str(v)  # noqa: E731
    flat = lambda x: isinstance(x, dict) and not any(isinstance(y, dict) for y in x.values())  # noqa: E731
    scalars, tables = [], []

    def walk(key: str, v: object) -> None:
        rows = v if isinstance(v, list) and v and all(isinstance(x, dict) for x in v) else None
        if isinstance(v, dict) and len(v) > 1 and all(flat(x) for x in v.values()):
            rows = [{"": k, **x} for k, x in v.items()]
        if rows:
            cols = list(dict.fromkeys(c for r in rows for c in r))
            body = [[cell(r.get(c, "")) for c in cols] for r in rows]
            tables.append(f"`{key}`:\n\n" + md_table(cols, body))
        elif isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{key}.{k}" if key else str(k), x)
        else:
            scalars.append([f"`{key}`", cell(v)])

    walk("", obj)
    return "\n\n".join(([md_table(["measurement", "value"], scalars)] if scalars else []) + tables)


def finish(name: str, result: dict, json_path: Path | None, smoke: bool, text: str | None = None) -> None:
    """Write the result (default bench/results/<name>.json; smoke runs under smoke/, never replacing a
    real one) and its markdown beside it (`python -m bench --reuse` reads that); print the markdown."""
    path = json_path or (RESULTS / "smoke" if smoke else RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = json_tables(result) if text is None else text
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


def paired(a: list[float], b: list[float], digits: int = 3) -> dict:
    """Median and range of a - b, paired by repetition."""
    d = sorted(x - y for x, y in zip(a, b, strict=True))
    return {
        "median": round(statistics.median(d), digits),
        "range": [round(d[0], digits), round(d[-1], digits)],
    }


def medians(runs: list[dict], keys: Iterable[str]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy since boot, all cores, idle and iowait excluded;
    of which stolen by the hypervisor), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK, steal / TICK


def proc_stat(pid: int) -> tuple[int, float, float, int] | None:
    """(ppid, CPU seconds of the process (all its threads), of its reaped children, RSS bytes) from
    /proc/<pid>/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # fields from the 3rd (state) on
    cpu, children = (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK
    return int(fields[1]), cpu, children, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process so far (all its threads)."""
    return st[1] if (st := proc_stat(pid)) else None


def proc_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def interleaved(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, this process's CPU s) of each call over `reps` repetitions, the calls interleaved (the
    same load for all), after one warm-up call each (tracing, compiling, work arrays)."""
    for call in calls.values():
        call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def stop(proc: subprocess.Popen, timeout: float = 120) -> float:
    """SIGTERM (an embed worker finishes its batch and finalizes its shard), killed after `timeout`;
    the time it had exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.monotonic()


def ensure_checkpoint(cache: Path = CACHE) -> Path:
    """The generated checkpoint (testkit.checkpoint, ~230 MB; the model's cost does not depend on the
    weights), written once into the cache folder."""
    from testkit.checkpoint import fake_checkpoint_in

    if not (cache / "inception_resnet_v2_2016_08_30.ckpt").exists():
        log(f"writing a generated checkpoint into {cache} (once, ~230 MB)")
    return fake_checkpoint_in(cache)


def make_images(n: int, distinct: int = 16) -> np.ndarray:
    """n photo-like uint8 299x299 RGB images (`distinct` different ones, repeated)."""
    from testkit.corpus import photo

    base = [photo(299, 299, seed) for seed in range(min(n, distinct))]
    return np.stack([base[i % len(base)] for i in range(n)])


def payloads_of(rgb: np.ndarray) -> list[dict]:
    """The embed messages' images as download workers build them (each distinct image encoded once)."""
    from common.messages import embed_image, encode_pixels

    encoded: dict[bytes, bytes] = {}
    out = []
    for i, img in enumerate(rgb):
        digest = hashlib.md5(img.tobytes()).digest()
        pixels = encoded[digest] = encoded.get(digest) or encode_pixels(img)
        url = f"http://bench.invalid/embed/{i}.jpg"
        out.append(embed_image({"k": hashlib.md5(url.encode()).hexdigest(), "u": url}, pixels))
    return out


@contextlib.contextmanager
def redis_server(name: str) -> Iterator:
    """A redis-server of the benchmark's own, in a temporary folder (`server.directory.parent`)."""
    from testkit.servers import RedisServer

    with tempfile.TemporaryDirectory(prefix=f"koala-bench-{name}-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            yield server
        finally:
            server.stop()


def register_downloaded(client, payloads: list[dict], prefix: str = "koala") -> None:
    """Register the items and mark them downloaded, as the producer and download workers would."""
    from common.state.job import JobState

    state = JobState(client, prefix)
    keys = [p["key"] for p in payloads]
    for i in range(0, len(keys), 1000):
        state.register(keys[i : i + 1000], state.new_run())
        state.mark_downloaded_many(keys[i : i + 1000])


def send_chunks(redis_url: str, chunks: Iterable[list[dict]]) -> None:
    """One `koala.embed` message per chunk of images, as workers.tasks.publish_embed sends a chunk's."""
    from common.celery_app import make_app
    from common.messages import EMBED_QUEUE, EMBED_TASK
    from common.settings import Settings

    app = make_app(Settings(broker_url=redis_url))
    try:
        for images in chunks:
            app.send_task(EMBED_TASK, args=[images], queue=EMBED_QUEUE, argsrepr="[images]", kwargsrepr="{}")
    finally:
        app.close()


def fill_embed_queue(redis_url: str, payloads: list[dict], chunk: int = 16) -> None:
    send_chunks(redis_url, (payloads[i : i + chunk] for i in range(0, len(payloads), chunk)))


class NoStage:
    """Stands in for EmbedStage to time the queue side alone: each step does nothing."""

    def __init__(self, n: int, settings) -> None:
        self.n, self.settings, self.consumer = n, settings, None
        self.seen: list[tuple[float, int]] = []  # (time, images) of each batch

    def prepare(self, batch) -> None:
        self.seen.append((time.perf_counter(), len(batch.payloads)))
        if sum(k for _, k in self.seen) >= self.n:
            self.consumer.stopping.set()

    def infer(self, *args, **kwargs) -> None: ...

    write = rotate = flush = infer

    def settled(self, batches: list) -> list:
        return batches


def drain(
    redis_url: str, n: int, batch_size: int, timeout: float, start: Callable[[], object] = lambda: None
) -> list[tuple[float, int]]:
    """The real BatchConsumer, its steps doing nothing, until n images came through (`start` runs
    just before it consumes); (time, images) of each batch."""
    from common.celery_app import make_app
    from common.settings import Settings
    from workers.batching import BatchConsumer

    settings = Settings(broker_url=redis_url)
    app = make_app(settings)
    stage = NoStage(n, settings)
    consumer = stage.consumer = BatchConsumer(
        app, stage, batch_size=batch_size, max_wait=0.2, hostname="drain@bench"
    )  # type: ignore
    start()
    guard = threading.Timer(timeout, consumer.stopping.set)  # never hang the benchmark
    guard.start()
    try:
        consumer.run()
    finally:
        guard.cancel()
        app.close()
    return stage.seen


def embed_worker_round(
    server, payloads: list[dict], out: Path, env: dict[str, str], timeout: float, poll: float, watch=()
) -> dict:
    """A real `python -m workers embed` on the queue pre-filled with the payloads as download workers
    send them (the items registered and marked downloaded first), SIGTERMed (it finalizes its shard)
    once every record is written. `samples`: (time, written, the worker's CPU s, each `watch` pid's
    CPU s, the machine's busy CPU s) at each change of `written`; its peak RSS; the records in `out`."""
    from testkit.servers import worker_env

    client, n = server.client(), len(payloads)
    register_downloaded(client, payloads)
    fill_embed_queue(server.url, payloads)
    log_path = server.directory.parent / "embed-worker.log"
    env = worker_env(server.url, out, **{"KOALA_BATCH_WAIT": "0.2", "KOALA_EXAMPLES_PER_SHARD": "500", **env})
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        command = [sys.executable, "-m", "workers", "embed", "-n", "embed@bench"]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    samples: list[tuple] = []
    try:
        while not samples or samples[-1][1] < n:
            written, t = int(client.hget("koala:counts", "written") or 0), time.monotonic()
            if not samples or written != samples[-1][1]:
                cpus = [cpu_seconds(pid) or 0.0 for pid in (proc.pid, *watch)]
                samples.append((t, written, *cpus, machine_cpu_s()[0]))
            if proc.poll() is not None or t - started > timeout:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the embed worker wrote {written}/{n} (exit {proc.poll()}):\n{tail}")
            time.sleep(poll)
        peak_kb = proc_kb(proc.pid, "VmHWM") or 0  # a high-water mark, read while the worker lives
    finally:
        finalized = stop(proc)
    run = {"samples": samples, "started": started, "finalized": finalized, "peak_kb": peak_kb}
    return run | {"exit_code": proc.returncode, **count_records(out)}


def first(samples: list[tuple], written: int) -> tuple:
    """The first sample of `embed_worker_round` with at least `written` records written."""
    return next(x for x in samples if x[1] >= written)


def count_records(out: Path) -> dict:
    """Records and distinct keys in the finalized shards (no TensorFlow), and leftover temp shards."""
    from common.output import records
    from common.output.shards import SHARD_GLOB

    shards = sorted(out.glob(SHARD_GLOB))
    keys = [records.example_key(data) for shard in shards for _, _, data in records.iter_examples(shard)]
    temps = len(list(out.glob(".*.tmp")))
    return {"records": len(keys), "distinct": len(set(keys)), "shards": len(shards), "temp_shards": temps}


def disk_write_mb_s(folder: Path, mb: int) -> float:
    """MB/s of a sequential write of `mb` MB in 8 MB blocks ended by fdatasync (`dd ... conv=fdatasync`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".disk-rate.tmp"
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(mb // 8):
            f.write(block)
        os.fdatasync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return mb / seconds


def null_round(
    server, payloads: list[dict], out: Path, batch_size: int, env: dict[str, str], disk_mb: int
) -> dict:
    """One ceiling measurement: a null-model embed worker from its first record to its last; the
    output folder's own write rate measured just before."""
    server.client().flushall()
    shutil.rmtree(out, ignore_errors=True)
    disk = disk_write_mb_s(out, disk_mb)
    env = {"KOALA_NULL_MODEL": "1", "KOALA_BATCH_SIZE": str(batch_size), **env}
    run = embed_worker_round(server, payloads, out, env, 60 + len(payloads) / 20, 0.01)
    (t0, w0, cpu0, busy0), (t1, w1, cpu1, busy1) = first(run["samples"], 1), run["samples"][-1]
    record_mb = sum(p.stat().st_size for p in out.glob("lab_images_*")) / max(1, run["records"]) / 1e6
    shutil.rmtree(out, ignore_errors=True)
    img_s = (w1 - w0) / (t1 - t0)
    return {
        "images": len(payloads),
        "timed_images": w1 - w0,
        "seconds": round(t1 - t0, 3),
        "images_per_s": round(img_s, 1),
        "cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / (w1 - w0), 3),
        "machine_busy_cores": round((busy1 - busy0) / (t1 - t0), 2),
        "disk_mb_per_s": round(disk, 1),
        "record_mb": round(record_mb, 4),
        "records_mb_per_s": round(img_s * record_mb, 1),
        "records_vs_disk": round(img_s * record_mb / disk, 3),
        **{k: run[k] for k in ("records", "distinct", "shards", "temp_shards")},
    }


def null_rounds(
    name: str, n: int, batch_size: int, rounds: int, variants: dict[str, tuple[Path, dict]], disk_mb: int = 64
) -> dict[str, list[dict]]:
    """`null_round` of each variant (its output folder, its worker's environment) on the same n
    photo-like images, `rounds` times, the variants alternating within each round."""
    payloads = payloads_of(make_images(n))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with redis_server(name) as server:
        for r in range(rounds):
            for v, (out, env) in variants.items():
                runs[v].append(x := null_round(server, payloads, out, batch_size, env, disk_mb))
                log(f"round {r + 1}/{rounds}, {v}: {x['images_per_s']} img/s, {x['cpu_ms_per_image']} CPU-ms")
    return runs
