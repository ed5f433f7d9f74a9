"""Embed benchmark: the bare model against the embed worker end to end, and where a batch's time goes.

Run: .venv/bin/python -m bench.embed [--images 96] [--batch-size 16] [--json PATH] [--smoke]
     .venv/bin/python -m bench.embed --null-model [--images 3000] [--batch-size 128] [--rounds 3]

1. Bare model: `Embedder.embed` on uint8 arrays in memory, `batch_size` images per call, TensorFlow's
   default threads (as the worker), measured before and after the worker run (the machine is shared:
   the mean of both is the reference). Also a plain `model(x)` in a `tf.function` for reference.
2. Worker: a real redis-server, the `embed` queue pre-filled with N messages exactly as download
   workers publish them (items registered and marked downloaded first), a real `python -m workers
   embed` process. Throughput is taken between `written` >= one batch (model load and tracing done)
   and `written` = N, polling `koala:counts`; also reported from the first record to the shard
   finalized after SIGTERM.
3. Steps: `EmbedStage.process` run in this process on the same batches, real ShardWriter and Redis,
   its parts timed by wrapping functions (this process only); the queue side (receive, decode, ack)
   by the real `BatchConsumer` with a no-op process.
4. `--null-model`, the worker's ceiling: a real embed worker whose forward pass returns zeros
   (KOALA_NULL_MODEL=1), on local disk and tmpfs, with Lab on this CPU and off it.

The checkpoint is generated (testkit.checkpoint, ~230 MB, cached in bench/results/cache/): the model's
cost does not depend on the weights. Ratios, not absolute times, are what to compare.
"""

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
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"
CHECKPOINT_NAME = "inception_resnet_v2_2016_08_30.ckpt"
TARGET_RATIO = 0.95  # issue 9: the worker at least 0.95 x the bare model
NAME = "embed"


# ---- helpers shared with the other benchmarks ---------------------------------------------------


def md_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def proc_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class PeakSampler:
    """Samples VmHWM (peak RSS) of a process in a thread until stopped; keeps the largest value."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        kb = proc_kb(self.pid, "VmHWM")
        if kb:
            self.peak_kb = max(self.peak_kb, kb)
        return self.peak_kb

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def default_json(name: str, smoke: bool) -> Path:
    """bench/results/<name>.json; smoke runs go to bench/results/smoke/ so they never replace real ones."""
    return (RESULTS / "smoke" if smoke else RESULTS) / f"{name}.json"


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def machine_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy since boot, all cores, idle and iowait excluded;
    of which stolen by the hypervisor), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far."""
    return machine_cpu_s()[0]


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process so far (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# ---- inputs -------------------------------------------------------------------------------------


def ensure_checkpoint(cache: Path) -> Path:
    """The generated checkpoint, written once into the cache folder."""
    from testkit.checkpoint import fake_checkpoint_in

    if not (cache / CHECKPOINT_NAME).exists():
        log(f"writing a generated checkpoint to {cache / CHECKPOINT_NAME} (once, ~230 MB)")
    return fake_checkpoint_in(cache)


def make_images(n: int, distinct: int = 16) -> np.ndarray:
    """n photo-like uint8 299x299 RGB images (`distinct` different ones, repeated)."""
    from testkit.corpus import photo

    base = [photo(299, 299, seed) for seed in range(min(n, distinct))]
    return np.stack([base[i % len(base)] for i in range(n)])


def item_of(i: int) -> dict:
    url = f"http://bench.invalid/embed/{i}.jpg"
    return {"k": hashlib.md5(url.encode()).hexdigest(), "u": url}


def payloads_of(rgb: np.ndarray) -> list[dict]:
    """The embed messages' images, exactly as download workers build them (each distinct image
    encoded once)."""
    from common.messages import embed_image
    from common.pictures.images import encode_pixels

    encoded: dict[bytes, bytes] = {}
    out = []
    for i, img in enumerate(rgb):
        digest = hashlib.md5(img.tobytes()).digest()
        pixels = encoded[digest] = encoded.get(digest) or encode_pixels(img)
        out.append(embed_image(item_of(i), pixels))
    return out


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# ---- 1. bare model ------------------------------------------------------------------------------


def bare_embed(embedder, rgb: np.ndarray, batch_size: int) -> dict:
    """Embedder.embed in a loop, one call per batch (after one warm-up call)."""
    parts = batches(rgb, batch_size)
    embedder.embed(parts[0])
    start, cpu, busy = time.perf_counter(), time.process_time(), busy_seconds()
    for b in parts:
        embedder.embed(b)
    seconds, cpu, busy = time.perf_counter() - start, time.process_time() - cpu, busy_seconds() - busy
    return {
        "images": len(rgb),
        "seconds": round(seconds, 2),
        "img_s": round(len(rgb) / seconds, 3),
        "cpu_s_per_image": round(cpu / len(rgb), 3),
        "cores_used": round(cpu / seconds, 2),
        "other_processes_cores": round(max(0.0, busy - cpu) / seconds, 2),
    }


def plain_model(embedder, rgb: np.ndarray, batch_size: int) -> dict:
    """model(x) in a tf.function on preprocessed float32 input (the preprocessing left out)."""
    import tensorflow as tf

    from common.model.embedder import preprocess

    model = embedder.model
    call = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 299, 299, 3], tf.float32)]
    )
    parts = [tf.constant(preprocess(b)) for b in batches(rgb, batch_size)]
    call(parts[0]).numpy()
    start = time.perf_counter()
    for b in parts:
        call(b).numpy()
    seconds = time.perf_counter() - start
    return {"images": len(rgb), "seconds": round(seconds, 2), "img_s": round(len(rgb) / seconds, 3)}


# ---- 2. the worker end to end -------------------------------------------------------------------


def register_downloaded(client, payloads: list[dict], prefix: str = "koala") -> None:
    """Register the items and mark them downloaded, as the producer and download workers would."""
    from common.state.job import JobState

    state = JobState(client, prefix)
    keys = [p["key"] for p in payloads]
    for i in range(0, len(keys), 1000):
        state.register(keys[i : i + 1000], state.new_run())
        state.mark_downloaded_many(keys[i : i + 1000])


def fill_embed_queue(redis_url: str, payloads: list[dict], chunk: int = 16) -> None:
    """One `koala.embed` message per `chunk` images, sent as workers.tasks.publish_embed sends a
    download chunk's images."""
    from common.celery_app import EMBED_QUEUE, EMBED_TASK, make_app
    from common.settings import Settings

    app = make_app(Settings(broker_url=redis_url))
    try:
        for i in range(0, len(payloads), chunk):
            images = payloads[i : i + chunk]
            app.send_task(EMBED_TASK, args=[images], queue=EMBED_QUEUE, argsrepr="[images]", kwargsrepr="{}")
    finally:
        app.close()


class EmbedWorker:
    """A `python -m workers embed` process against the bench's Redis and output folder."""

    def __init__(self, redis_url: str, out: Path, checkpoint: Path, batch_size: int, log_path: Path):
        from testkit.servers import worker_env

        env = worker_env(
            redis_url,
            out,
            KOALA_CHECKPOINT=str(checkpoint),
            KOALA_BATCH_SIZE=str(batch_size),
            KOALA_BATCH_WAIT="0.2",
            KOALA_EXAMPLES_PER_SHARD="500",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "embed", "-n", "embed@bench"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> float:
        """SIGTERM (finishes the batch, finalizes the shard); returns when it has exited."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(120)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._log.close()
        return time.monotonic()


class WorkerWatch(threading.Thread):
    """`watch_worker` in a thread, started with the worker: `join_result()` gives its result."""

    def __init__(self, worker: EmbedWorker, client, n: int, batch_size: int, timeout: float):
        super().__init__(daemon=True)
        self.args = (worker, client, n, batch_size, timeout)
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = watch_worker(*self.args)
        except BaseException as e:  # handed to the main thread
            self.error = e

    def join_result(self) -> dict:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def watch_worker(worker: EmbedWorker, client, n: int, batch_size: int, timeout: float) -> dict:
    """Poll `written` until it reaches n; timestamps of the first record, first batch and last one;
    then stop the worker (SIGTERM: the shard is finalized)."""
    first = batch = None
    w_batch = 0
    cpu_batch = cpu_done = busy_batch = busy_done = 0.0
    deadline = time.monotonic() + timeout
    with PeakSampler(worker.proc.pid) as rss:
        while True:
            written = int(client.hget("koala:counts", "written") or 0)
            t = time.monotonic()
            if written and first is None:
                first = t
            if written >= batch_size and batch is None:
                batch, w_batch, cpu_batch = t, written, cpu_seconds(worker.proc.pid) or 0.0
                busy_batch = busy_seconds()
            if written >= n:
                done, cpu_done, busy_done = t, cpu_seconds(worker.proc.pid) or 0.0, busy_seconds()
                break
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the embed worker exited ({worker.proc.returncode}):\n{worker.tail()}")
            if t > deadline:
                raise RuntimeError(f"the worker wrote {written}/{n} in {timeout:.0f}s:\n{worker.tail()}")
            time.sleep(0.05)
        peak = rss.sample()
    finalized = worker.stop()
    steady_images = n - w_batch
    steady_s = done - batch
    return {
        "images": n,
        "start_to_first_record_s": round(first - worker.started, 2),
        "steady_images": steady_images,
        "steady_s": round(steady_s, 2),
        "img_s": round(steady_images / steady_s, 3) if steady_images else None,
        "cpu_s_per_image": round((cpu_done - cpu_batch) / steady_images, 3) if steady_images else None,
        "cores_used": round((cpu_done - cpu_batch) / steady_s, 2) if steady_s else None,
        # everything else: this process polling, redis-server, and whatever else shares the machine
        "other_processes_cores": round(max(0.0, busy_done - busy_batch - cpu_done + cpu_batch) / steady_s, 2)
        if steady_s
        else None,
        "first_record_to_finalized_s": round(finalized - first, 2),
        "img_s_first_record_to_finalized": round((n - min(n, batch_size)) / (finalized - first), 3)
        if n > batch_size
        else None,
        "exit_code": worker.proc.returncode,
        "peak_rss_mb": round(peak / 1024),
    }


def count_records(out: Path) -> dict:
    """Records and distinct keys in the finalized shards (no TensorFlow), and leftover temp shards."""
    from common.output import records
    from common.output.shards import SHARD_GLOB

    keys = []
    shards = sorted(out.glob(SHARD_GLOB))
    for shard in shards:
        keys += [records.example_key(data) for _, _, data in records.iter_examples(shard)]
    return {
        "records": len(keys),
        "distinct": len(set(keys)),
        "shards": len(shards),
        "temp_shards": len(list(out.glob(".*.tmp"))),
    }


# ---- 3. where the time goes ---------------------------------------------------------------------


class Timers:
    """Durations per step name, from wrapped functions (thread-safe appends)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - start)

        return timed

    def total(self, name: str) -> float:
        return sum(self.seconds.get(name, []))


@contextlib.contextmanager
def patched(obj: object, attr: str, timers: Timers, name: str) -> Iterator[None]:
    """obj.attr wrapped with a timer for the duration (restored afterwards)."""
    original = getattr(obj, attr)
    setattr(obj, attr, timers.wrap(name, original))
    try:
        yield
    finally:
        setattr(obj, attr, original)


STEPS = [  # (name, what it is); main-thread steps add up to the process time, with "other"
    ("state lookup", "JobState.states: one pipelined HGET per item"),
    ("decode_pixels", "lossless payload -> uint8 array"),
    ("model", "Embedder.embed (preprocessing + Inception)"),
    ("lab wait", "waiting for the Lab threads after the model returned"),
    ("serialize", "records.serialize_example"),
    ("append+fsync", "ShardWriter.append (framing, write, fsync)"),
    ("claim", "JobState.mark_written_many (Lua per item, one pipeline)"),
    ("rotate", "ShardWriter.maybe_rotate"),
]


def stage_steps(embedder, redis_url: str, client, payloads: list[dict], batch_size: int, out: Path) -> dict:
    """EmbedStage.process on the batches with its parts timed, in this process."""
    from common.output import records
    from common.output.shards import ShardWriter
    from common.pictures import images, lab
    from common.settings import Settings
    from common.stages import Model
    from common.state.job import JobState
    from workers.embed import EmbedStage

    prefix = "benchsteps"
    register_downloaded(client, payloads, prefix)
    settings = Settings(broker_url=redis_url, output_dir=out)
    state = JobState(client, prefix)
    writer = ShardWriter(out, "steps@bench", examples_per_shard=500)
    timers = Timers()
    model = Model(timers.wrap("model", embedder.embed), None, embedder.device, batch_size)
    stage = EmbedStage(settings, state, "steps@bench", model, writer)
    stage.infer = timers.wrap("infer", stage.infer)  # model + lab wait
    stage.process(payloads[:batch_size])  # warm-up: threads, first fsync (a batch of its own items)
    timers.seconds.clear()
    written = 0
    with contextlib.ExitStack() as patches:
        patches.enter_context(patched(images, "decode_pixels", timers, "decode_pixels"))
        patches.enter_context(patched(lab, "lab_channels", timers, "lab (threads)"))
        patches.enter_context(patched(records, "serialize_example", timers, "serialize"))
        patches.enter_context(patched(state, "states", timers, "state lookup"))
        patches.enter_context(patched(state, "mark_written_many", timers, "claim"))
        patches.enter_context(patched(writer, "append", timers, "append+fsync"))
        patches.enter_context(patched(writer, "maybe_rotate", timers, "rotate"))
        start = time.perf_counter()
        for i in range(batch_size, len(payloads), batch_size):
            written += timers.wrap("process", stage.process)(payloads[i : i + batch_size])
        wall = time.perf_counter() - start
    stage.close()
    n = len(payloads) - batch_size
    seconds = {name: timers.total(name) for name, _ in STEPS if name != "lab wait"}
    seconds["lab wait"] = timers.total("infer") - timers.total("model")
    seconds["other"] = timers.total("process") - sum(seconds.values())
    return {
        "images": n,
        "written": written,
        "wall_s": round(wall, 2),
        "seconds": seconds,
        "lab_threads_s": timers.total("lab (threads)"),
    }


class NoStage:
    """Stands in for EmbedStage to time the queue side alone: each step does nothing."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[tuple[float, int]] = []  # (time, images) of each batch
        self.consumer = None

    def prepare(self, batch) -> None:
        self.seen.append((time.perf_counter(), len(batch.payloads)))
        if sum(k for _, k in self.seen) >= self.n:
            self.consumer.stopping.set()

    def infer(self, batch) -> None:
        pass

    def write(self, batches: list) -> None:
        pass

    def rotate(self) -> None:
        pass


def drain(
    redis_url: str,
    n: int,
    batch_size: int,
    hostname: str,
    timeout: float,
    start: Callable[[], None] = lambda: None,
) -> list[tuple[float, int]]:
    """The real BatchConsumer, its steps doing nothing, until n images came through (`start` runs
    just before it consumes); (time, images) of each batch."""
    from common.celery_app import make_app
    from common.settings import Settings
    from workers.batching import BatchConsumer

    app = make_app(Settings(broker_url=redis_url))
    stage = NoStage(n)
    consumer = stage.consumer = BatchConsumer(
        app,
        stage,
        batch_size=batch_size,
        max_wait=0.2,  # type: ignore
        hostname=hostname,
    )
    start()
    guard = threading.Timer(timeout, consumer.stopping.set)  # never hang the benchmark
    guard.start()
    try:
        consumer.run()
    finally:
        guard.cancel()
        app.close()
    return stage.seen


def receive_ack(redis_url: str, payloads: list[dict], batch_size: int) -> dict:
    """The worker's queue side alone: the real BatchConsumer draining the messages, steps doing nothing."""
    # a message per batch: the smoke's 4 images make two batches too (one 16-image message made one)
    fill_embed_queue(redis_url, payloads, batch_size)
    seen = drain(redis_url, len(payloads), batch_size, "receive@bench", 120)
    # from the first flush to the last: the messages of every batch but the first (no connection set-up)
    return {"images": sum(k for _, k in seen[1:]), "seconds": seen[-1][0] - seen[0][0]}


def steps_table_rows(steps: dict, receive: dict) -> tuple[dict, dict]:
    """ms per image and share of the worker's time (process + receive/ack) for each step."""
    per_image = {name: 1000 * s / steps["images"] for name, s in steps["seconds"].items()}
    per_image["receive+ack"] = 1000 * receive["seconds"] / receive["images"]
    total = sum(per_image.values())
    share = {name: ms / total for name, ms in per_image.items()}
    return ({k: round(v, 2) for k, v in per_image.items()}, {k: round(v, 4) for k, v in share.items()})


# ---- the benchmark ------------------------------------------------------------------------------


def run(n: int, batch_size: int, smoke: bool, cache: Path) -> dict:
    quiet_tensorflow()
    from testkit.servers import RedisServer

    checkpoint = ensure_checkpoint(cache)
    rgb = make_images(n)
    payloads = payloads_of(rgb)
    result: dict = {
        "bench": "embed",
        "smoke": smoke,
        "images": n,
        "batch_size": batch_size,
        "checkpoint": {
            "path": str(checkpoint),
            "generated_weights": True,
            "bytes": checkpoint.stat().st_size,
        },
    }
    worker: tuple[EmbedWorker, WorkerWatch] | None = None
    with tempfile.TemporaryDirectory(prefix="koala-bench-embed-") as tmp:
        tmp_path = Path(tmp)
        server = RedisServer(tmp_path / "redis").start()
        try:
            client = server.client()

            def start_worker() -> tuple[EmbedWorker, WorkerWatch]:
                register_downloaded(client, payloads)
                fill_embed_queue(server.url, payloads)
                log(f"{n} embed messages queued; starting the embed worker")
                proc = EmbedWorker(
                    server.url, tmp_path / "out", checkpoint, batch_size, tmp_path / "worker.log"
                )
                return proc, WorkerWatch(proc, server.client(), n, batch_size, timeout=max(300.0, 5.0 * n))

            # smoke: the worker loads its model while this process loads its own (timings overlap)
            worker = start_worker() if smoke else None
            import tensorflow as tf

            from common.model.embedder import Embedder

            started = time.perf_counter()
            embedder = Embedder(checkpoint, batch_size=batch_size)
            result["model_load_s"] = round(time.perf_counter() - started, 1)
            result["device"] = embedder.device
            threads = tf.config.threading
            result["tf_threads"] = {
                "intra_op": threads.get_intra_op_parallelism_threads() or "default",
                "inter_op": threads.get_inter_op_parallelism_threads() or "default",
            }
            log("bare model")
            bare = [bare_embed(embedder, rgb, batch_size)]
            plain = None
            if not smoke:  # one more trace: seconds the smoke can't spare
                log("plain model(x)")
                plain = plain_model(embedder, rgb, batch_size)
            if worker is None:
                worker = start_worker()
            log("waiting for the worker")
            result["worker"] = worker[1].join_result()
            result["worker"].update(count_records(tmp_path / "out"))
            log("steps inside EmbedStage.process")
            steps = stage_steps(embedder, server.url, client, payloads, batch_size, tmp_path / "steps")
            receive = receive_ack(server.url, payloads, batch_size)
            if not smoke:
                log("bare model again")
                bare.append(bare_embed(embedder, rgb, batch_size))
        finally:
            if worker is not None:
                worker[0].stop()
            server.stop()
    bare_img_s = sum(b["img_s"] for b in bare) / len(bare)
    result["bare"] = {
        "embedder_embed": {"img_s": round(bare_img_s, 3), "runs": bare},
        "plain_model_call": plain or "skipped in the smoke run",
        "embed_vs_plain_ratio": round(bare_img_s / plain["img_s"], 3) if plain else None,
    }
    w = result["worker"]
    w["ratio_vs_bare"] = round(w["img_s"] / bare_img_s, 3) if w["img_s"] else None
    w["ratio_first_record_to_finalized_vs_bare"] = (
        round(w["img_s_first_record_to_finalized"] / bare_img_s, 3)
        if w["img_s_first_record_to_finalized"]
        else None
    )
    bare_cpu = sum(b["cpu_s_per_image"] for b in bare) / len(bare)
    result["bare"]["embedder_embed"]["cpu_s_per_image"] = round(bare_cpu, 3)
    w["cpu_ratio_vs_bare"] = round(bare_cpu / w["cpu_s_per_image"], 3) if w["cpu_s_per_image"] else None
    w["ratio_vs_each_bare_run"] = [round(w["img_s"] / b["img_s"], 3) for b in bare] if w["img_s"] else None
    w["target_ratio"] = TARGET_RATIO
    w["target_met"] = bool(w["ratio_vs_bare"] and w["ratio_vs_bare"] >= TARGET_RATIO)
    w["target_met_cpu"] = bool(w["cpu_ratio_vs_bare"] and w["cpu_ratio_vs_bare"] >= TARGET_RATIO)
    per_image, share = steps_table_rows(steps, receive)
    in_process_img_s = 1000 / sum(per_image.values())
    result["steps"] = {
        "images": steps["images"],
        "written": steps["written"],
        "ms_per_image": per_image,
        "share": share,
        "lab_threads_ms_per_image": round(1000 * steps["lab_threads_s"] / steps["images"], 2),
        "in_process_img_s": round(in_process_img_s, 3),
        "in_process_ratio_vs_bare": round(in_process_img_s / bare_img_s, 3),
        "model_in_stage_vs_bare_ratio": round(1000 / per_image["model"] / bare_img_s, 3),
    }
    result["gpu"] = (
        "not measured: no GPU on this machine"
        if result["device"] != "GPU"
        else "measured above (TensorFlow saw a GPU)"
    )
    if smoke:
        result["note"] = "smoke: tiny sizes, the worker ran while this process measured: timings meaningless"
    return result


def markdown(result: dict) -> str:
    """The tables of an embed result."""
    bare, w, s = result["bare"], result["worker"], result["steps"]
    runs = ", ".join(
        f"{r['img_s']} on {r['cores_used']} cores, others {r['other_processes_cores']}"
        for r in bare["embedder_embed"]["runs"]
    )
    met = "met" if w["target_met"] else "NOT met"
    each = ", ".join(str(r) for r in w["ratio_vs_each_bare_run"] or [])
    head = (
        f"### Embed ({result['images']} images, batch {result['batch_size']}, {result['device']}, "
        f"generated weights{', SMOKE' if result['smoke'] else ''})"
    )
    t1 = md_table(
        ["measurement", "images/s", "ratio"],
        [
            [f"bare `Embedder.embed` (runs: {runs})", bare["embedder_embed"]["img_s"], "1.00 (reference)"],
            [
                "plain `model(x)` in tf.function",
                *(
                    [bare["plain_model_call"]["img_s"], f"{1 / bare['embed_vs_plain_ratio']:.2f}"]
                    if bare["embed_vs_plain_ratio"]
                    else ["skipped (smoke)", "-"]
                ),
            ],
            [
                f"embed worker, steady ({w['steady_images']} images after the first batch, "
                f"on {w['cores_used']} cores, others {w['other_processes_cores']})",
                w["img_s"],
                f"**{w['ratio_vs_bare']}** (vs each bare run: {each}; target ≥ {w['target_ratio']}: {met})",
            ],
            [
                "embed worker, first record → shard finalized",
                w["img_s_first_record_to_finalized"],
                w["ratio_first_record_to_finalized_vs_bare"],
            ],
            [
                f"CPU-seconds per image: bare {bare['embedder_embed']['cpu_s_per_image']}, worker "
                f"{w['cpu_s_per_image']} (less sensitive to other load)",
                "-",
                f"**{w['cpu_ratio_vs_bare']}** (bare/worker; "
                f"target {'met' if w['target_met_cpu'] else 'NOT met'})",
            ],
            [
                "`EmbedStage.process` in-process + receive/ack",
                s["in_process_img_s"],
                s["in_process_ratio_vs_bare"],
            ],
        ],
    )
    t2 = md_table(
        ["worker", "value"],
        [
            ["start → first record (model load + first batch)", f"{w['start_to_first_record_s']} s"],
            [
                "records in finalized shards / distinct / shards / temp left",
                f"{w['records']} / {w['distinct']} / {w['shards']} / {w['temp_shards']}",
            ],
            ["peak RSS (VmHWM)", f"{w['peak_rss_mb']} MB"],
            ["exit code after SIGTERM", w["exit_code"]],
        ],
    )
    rows = [
        [name, s["ms_per_image"][name], f"{100 * s['share'][name]:.1f} %", what]
        for name, what in [
            *STEPS,
            ("other", "np.stack, dedupe, bookkeeping"),
            ("receive+ack", "BatchConsumer: BRPOP, msgpack, base64, ack (no-op process)"),
        ]
    ]
    rows.append(
        [
            "(lab in threads)",
            s["lab_threads_ms_per_image"],
            "overlaps the model",
            "common.pictures.lab.lab_channels in the stage's thread pool",
        ]
    )
    t3 = md_table(["step", "ms/image", "share", "what"], rows)
    return "\n\n".join(
        [head, t1, t2, "Share of time per step inside the worker (in-process):", t3, f"GPU: {result['gpu']}."]
    )


# ---- 4. the ceiling: the worker with a null model ------------------------------------------------


def disk_write_mb_s(folder: Path, mb: int = 1024) -> float:
    """MB/s of a sequential write of `mb` MB in 8 MB blocks ended by fdatasync (`dd ... conv=fdatasync`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".disk-rate.tmp"
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, np.uint8).tobytes()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mb // 8):
            os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return mb / seconds


LAB_VARIANTS = {  # how the null-model worker computes Lab
    "Lab on this CPU": {},
    "Lab off the CPU": {"KOALA_NULL_LAB": "1"},  # zeros: what a GPU worker's CPU does
}


def start_null_worker(
    redis_url: str, out: Path, batch_size: int, log_path: Path, extra: dict[str, str]
) -> subprocess.Popen:
    """`python -m workers embed` with KOALA_NULL_MODEL=1 (no checkpoint)."""
    from testkit.servers import worker_env

    env = worker_env(
        redis_url,
        out,
        KOALA_NULL_MODEL="1",
        KOALA_BATCH_SIZE=str(batch_size),
        KOALA_BATCH_WAIT="0.2",
        KOALA_EXAMPLES_PER_SHARD="500",
        **extra,
    )
    command = [sys.executable, "-m", "workers", "embed", "-n", "null@bench"]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def null_round(
    server,
    payloads: list[dict],
    out: Path,
    batch_size: int,
    log_path: Path,
    extra: dict[str, str],
    disk_mb: int = 1024,
) -> dict:
    """One ceiling measurement: the queue pre-filled, the worker started, first record to last."""
    client = server.client()
    client.flushall()
    shutil.rmtree(out, ignore_errors=True)
    disk = disk_write_mb_s(out, disk_mb)
    register_downloaded(client, payloads)
    fill_embed_queue(server.url, payloads)
    n = len(payloads)
    proc = start_null_worker(server.url, out, batch_size, log_path, extra)
    first = last = None
    deadline = time.monotonic() + 60 + n / 20
    try:
        while True:
            written, t = int(client.hget("koala:counts", "written") or 0), time.monotonic()
            if written and first is None:
                first = (t, written, cpu_seconds(proc.pid) or 0.0, busy_seconds())
            if written >= n:
                last = (t, written, cpu_seconds(proc.pid) or 0.0, busy_seconds())
                break
            if proc.poll() is not None or t > deadline:
                raise RuntimeError(f"null worker wrote {written}/{n}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    images = last[1] - first[1]
    seconds = last[0] - first[0]
    counted = count_records(out)
    record_mb = sum(p.stat().st_size for p in out.glob("lab_images_*")) / max(1, counted["records"]) / 1e6
    shutil.rmtree(out, ignore_errors=True)
    img_s = images / seconds
    return {
        "images": n,
        "timed_images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(img_s, 1),
        "cpu_ms_per_image": round(1000 * (last[2] - first[2]) / images, 3),
        "machine_busy_cores": round((last[3] - first[3]) / seconds, 2),
        "disk_mb_per_s": round(disk, 1),
        "record_mb": round(record_mb, 4),
        "records_mb_per_s": round(img_s * record_mb, 1),
        "records_vs_disk": round(img_s * record_mb / disk, 3),
        **counted,
    }


def null_ceiling(n: int, batch_size: int, rounds: int, outs: dict[str, Path]) -> dict:
    """The ceiling of the worker's own path on each output folder, rounds alternating, medians."""
    from testkit.servers import RedisServer

    variants = LAB_VARIANTS
    rgb = make_images(n)
    payloads = payloads_of(rgb)
    del rgb
    result: dict = {
        "bench": "embed-null-model",
        "images": n,
        "batch_size": batch_size,
        "rounds": rounds,
        "load_average_before": os.getloadavg(),
        "outputs": {},
    }
    with tempfile.TemporaryDirectory(prefix="koala-bench-null-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            runs: dict[tuple[str, str], list[dict]] = {(o, v): [] for o in outs for v in variants}
            for r in range(rounds):
                for (name, variant), rs in runs.items():
                    log(f"round {r + 1}/{rounds}: {name} ({outs[name]}), {variant}")
                    rs.append(
                        null_round(
                            server,
                            payloads,
                            outs[name] / "null-bench",
                            batch_size,
                            Path(tmp) / f"{name}-{r}.log",
                            variants[variant],
                            1024 if n >= 1000 else 64,
                        )
                    )
                    log(f"  {rs[-1]['images_per_s']} images/s, {rs[-1]['cpu_ms_per_image']} CPU-ms/image")
        finally:
            server.stop()
    keys = (
        "images_per_s",
        "cpu_ms_per_image",
        "disk_mb_per_s",
        "records_mb_per_s",
        "records_vs_disk",
        "machine_busy_cores",
    )
    for (name, variant), rs in runs.items():
        ok = all(x["records"] == x["distinct"] == n and x["temp_shards"] == 0 for x in rs)
        result["outputs"][f"{name}, {variant}"] = {
            "folder": str(outs[name]),
            "median": {k: statistics.median(x[k] for x in rs) for k in keys},
            "runs": rs,
            "every_image_once": ok,
        }
    result["load_average_after"] = os.getloadavg()
    return result


def null_markdown(result: dict) -> str:
    rows = [
        [
            name,
            o["folder"],
            o["median"]["images_per_s"],
            o["median"]["cpu_ms_per_image"],
            o["median"]["records_mb_per_s"],
            o["median"]["disk_mb_per_s"],
            o["median"]["records_vs_disk"],
            o["median"]["machine_busy_cores"],
            "yes" if o["every_image_once"] else "**NO**",
        ]
        for name, o in result["outputs"].items()
    ]
    head = (
        f"### Embed worker ceiling (null model: {result['images']} images, batch {result['batch_size']}, "
        f"medians of {result['rounds']} rounds; load before "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_before'])})"
    )
    return (
        head
        + "\n\n"
        + md_table(
            [
                "output",
                "folder",
                "images/s",
                "worker CPU-ms/image",
                "records MB/s",
                "disk MB/s (fdatasync)",
                "records / disk",
                "machine busy cores",
                "each image once",
            ],
            rows,
        )
    )


@click.command()
@click.option(
    "--images",
    "n",
    type=int,
    default=None,
    help="images per measurement (default 96, null model 3000; smoke 4, null model 64)",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="images per model call (default 16, null model 128; smoke 2, null model 16)",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="a tiny run (seconds) that only checks the path works")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE,
    help="where the generated checkpoint is kept",
)
@click.option(
    "--null-model",
    is_flag=True,
    help="the worker's ceiling: a real embed worker whose forward pass returns zeros at once",
)
@click.option("--rounds", type=int, default=3, show_default=True, help="null model: rounds per output")
def main(
    n: int | None,
    batch_size: int | None,
    json_path: Path | None,
    smoke: bool,
    cache: Path,
    null_model: bool,
    rounds: int,
) -> None:
    """Bare model vs embed worker, and the share of each step; or the worker's ceiling (--null-model)."""
    if null_model:
        ceiling_main(n, batch_size, 1 if smoke else rounds, json_path, smoke)
        return
    batch_size = batch_size or (2 if smoke else 16)
    n = n or (2 * batch_size if smoke else 96)
    if n < 2 * batch_size:
        raise click.BadParameter("at least two batches of images", param_hint="--images")
    result = run(n, batch_size, smoke, cache)
    path = json_path or default_json(NAME, smoke)
    save_json(result, path)
    text = markdown(result)
    path.with_suffix(".md").write_text(text + "\n")  # beside the JSON: `python -m bench --reuse` reads it
    click.echo(text)


def ceiling_main(
    n: int | None, batch_size: int | None, rounds: int, json_path: Path | None, smoke: bool
) -> None:
    """--null-model: the ceiling on local disk (bench/results/tmp) and tmpfs (/dev/shm), saved and printed."""
    folders = {"local disk": RESULTS / "tmp", "tmpfs": Path("/dev/shm")}
    result = null_ceiling(n or (64 if smoke else 3000), batch_size or (16 if smoke else 128), rounds, folders)
    path = json_path or default_json(NAME + "-null", smoke)
    save_json(result, path)
    text = null_markdown(result)
    path.with_suffix(".md").write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
