"""Scale benchmark: job state per URL in Redis, the producer's memory and rate, its backpressure, and a
download worker's memory on 4000x3000 photos.

Run: .venv/bin/python -m bench.scale [--sizes 10000,100000,1000000] [--json PATH] [--smoke]

1. Submission (workers stopped): a generated URL list in fall11 layout (`<id><TAB><url>`) submitted by
   a real `python -m producer submit` subprocess, the download-queue limit high enough for every
   chunk. Redis `used_memory` before and after, then again with the `download` list deleted: the
   second delta is the job state alone. The producer's peak RSS (VmHWM, sampled from /proc) and rate.
2. Backpressure: the same with KOALA_DOWNLOAD_QUEUE_LIMIT small and nobody consuming: the depth of
   the `download` list is sampled while the producer waits, then while a stand-in consumer pops
   messages until the producer is done.
3. A `python -m workers download -c 32` process fed 4000x3000 JPEGs from a loopback HTTP server in
   this process: its peak RSS (VmHWM) after one round of images and after a second, larger round.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from bench.common import CACHE, ROOT, finish, log, proc_kb, redis_server, stop

TARGET_BYTES_PER_URL = 100
BIG = (4000, 3000)
DOWNLOAD_ENV = {  # the download worker of part 3: room for 4000x3000 JPEGs of a few MB, 32 at once
    "KOALA_MAX_BYTES": "25000000",
    "KOALA_CONNECT_TIMEOUT": "10",
    "KOALA_READ_TIMEOUT": "20",
    "KOALA_DOWNLOAD_DEADLINE": "60",
    "KOALA_PER_HOST_CONNECTIONS": "32",
    "KOALA_EMBED_QUEUE_LIMIT": "100000",
}


def submit(listing: Path, redis_url: str, out: Path, **env: str) -> subprocess.Popen:
    """`koala submit LIST --json` in the background (chunks of 16, the default), its output piped."""
    from testkit.servers import worker_env

    env = worker_env(redis_url, out, **{"KOALA_CHUNK_SIZE": "16", **env})
    command = [sys.executable, "-m", "producer", "submit", str(listing), "--json"]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def report_of(proc: subprocess.Popen, timeout: float = 60, check: bool = True) -> dict:
    """The producer's JSON report, once it has exited (none unless `check`: it was stopped)."""
    stdout, stderr = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"koala submit failed ({proc.returncode}): {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]) if check else {}


def write_url_list(path: Path, n: int) -> Path:
    """n distinct fall11-style lines `n<synset>_<i><TAB>http://farmX.static.flickr.com/...jpg`."""
    with open(path, "w", buffering=1 << 20) as f:
        for start in range(0, n, 10_000):
            f.writelines(
                f"n{1440764 + i // 1300:08d}_{i}\thttp://farm{1 + i % 9}.static.flickr.com/{1000 + i % 9000}/"
                f"{i}_{(i * 2654435761) & 0xFFFFFFFFFF:010x}.jpg\n"
                for i in range(start, min(n, start + 10_000))
            )
    return path


def counted(client, name: str) -> int:
    return int(client.hget("koala:counts", name) or 0)


# ---- 1. submission memory, RSS, rate ------------------------------------------------------------


def submit_size(client, redis_url: str, tmp: Path, n: int, timeout: float) -> dict:
    """Submit n URLs with the queue limit above every chunk; memory per URL, producer RSS and rate."""
    listing = write_url_list(tmp / f"urls_{n}.txt", n)
    client.flushall()
    baseline = client.info("memory")["used_memory"]
    started = time.monotonic()
    proc = submit(listing, redis_url, tmp / "out", KOALA_DOWNLOAD_QUEUE_LIMIT=str(-(-n // 16) + 1000))
    first, first_count, timed_out, peak_kb = 0.0, 0, False, 0
    try:
        while proc.poll() is None and not timed_out:  # VmHWM sampled until the producer exits
            peak_kb = max(peak_kb, proc_kb(proc.pid, "VmHWM") or 0)
            if (c := counted(client, "submitted")) and not first:
                first, first_count = time.monotonic(), c
            timed_out = time.monotonic() - started > timeout  # then its rate is reported
            time.sleep(0.05)
        if timed_out:
            proc.terminate()
        report = report_of(proc, check=not timed_out)
    finally:
        stop(proc, 60)
    ended = time.monotonic()
    submitted, depth = counted(client, "submitted"), client.llen("download")
    queue_bytes = client.memory_usage("download", samples=0) or 0
    total = client.info("memory")["used_memory"] - baseline
    client.delete("download")
    state = client.info("memory")["used_memory"] - baseline
    bucket = next(client.scan_iter(match="koala:i:*", count=1000), None)
    seconds, per_url = ended - started, lambda b: round(b / max(submitted, 1), 1)
    return {
        "urls": n,
        "list_mb": round(listing.stat().st_size / 1e6, 1),
        "submitted": submitted,
        "timed_out": timed_out,
        "chunks_queued": depth,
        "new": report.get("new"),
        "held_back_s": report.get("held_back_s"),
        "seconds": round(seconds, 1),
        "urls_per_s": round(submitted / seconds),
        "urls_per_s_after_startup": round((submitted - first_count) / (ended - first)) if first else None,
        "producer_peak_rss_mb": round(peak_kb / 1024, 1),
        "redis_delta_total_bytes": total,
        "redis_queue_bytes": queue_bytes,
        "redis_delta_state_bytes": state,
        "bytes_per_url_total": per_url(total),
        "bytes_per_url_state": per_url(state),
        "bytes_per_url_queue": per_url(queue_bytes),
        "keys": client.dbsize(),
        "bucket_encoding": client.object("encoding", bucket).decode() if bucket else None,
        "journal_left": client.hlen("koala:journal"),
    }


# ---- 2. backpressure ----------------------------------------------------------------------------


def backpressure(client, redis_url: str, tmp: Path, n: int, limit: int, hold_s: float) -> dict:
    """Submit n URLs with queue limit `limit`: sample the depth while nothing consumes, then while a
    stand-in consumer pops a few messages every 50 ms, until the producer is done."""
    listing = write_url_list(tmp / f"urls_bp_{n}.txt", n)
    client.flushall()
    proc = submit(listing, redis_url, tmp / "out", KOALA_DOWNLOAD_QUEUE_LIMIT=str(limit))
    samples: list[int] = []
    popped, chunks = 0, -(-n // 16)

    def sample() -> int:
        samples.append(client.llen("download"))
        return samples[-1]

    try:
        deadline = time.monotonic() + 60
        while sample() < limit and proc.poll() is None:  # fill up to the limit
            if time.monotonic() > deadline:
                raise RuntimeError("the producer never filled the queue to its limit")
            time.sleep(0.01)
        held_from, at_hold = time.monotonic(), counted(client, "submitted")
        while time.monotonic() - held_from < hold_s:  # nobody consumes: the producer must wait
            sample()
            time.sleep(0.01)
        waiting, after_hold = proc.poll() is None, counted(client, "submitted")
        deadline, i = time.monotonic() + 300, 0
        while proc.poll() is None:  # a consumer of about 100 chunks/s
            popped += len(client.rpop("download", 5) or []) if i % 5 == 0 else 0
            sample()
            i += 1
            time.sleep(0.01)
            if time.monotonic() > deadline:
                raise RuntimeError("the producer did not finish while its queue was consumed")
        report = report_of(proc, 30)
    finally:
        stop(proc, 0)  # killed if it is still running
    left = client.llen("download")
    return {
        "urls": n,
        "chunks": chunks,
        "limit": limit,
        "max_depth": max(samples),
        "over_limit_by": max(0, max(samples) - limit),
        "samples": len(samples),
        "hold_s": hold_s,
        "producer_waiting_after_hold": waiting,
        "submitted_at_hold_start": at_hold,
        "submitted_at_hold_end": after_hold,
        "popped_by_stand_in_consumer": popped,
        "left_in_queue": left,
        "all_chunks_sent": popped + left == chunks,
        "producer_held_back_s": report.get("held_back_s"),
        "submitted": report.get("new"),
    }


# ---- 3. download worker on 4000x3000 JPEGs ------------------------------------------------------


def big_jpegs(count: int) -> dict[str, bytes]:
    """`count` 4000x3000 photo-like JPEGs (quality 90, a few MB each), generated once into the cache."""
    from PIL import Image

    from testkit.corpus import photo

    folder = CACHE / "big-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed in range(count):
        path = folder / f"big_{seed:02d}.jpg"
        if not path.exists():
            small = Image.fromarray(photo(BIG[0] // 10, BIG[1] // 10, seed), "RGB")
            arr = np.asarray(small.resize(BIG, Image.Resampling.BICUBIC), np.int16)
            rng = np.random.default_rng(seed)
            tile = rng.integers(-8, 9, (500, 500, 3), dtype=np.int16)  # fine grain, as a sensor gives
            arr = np.clip(arr + np.tile(tile, (BIG[1] // 500, BIG[0] // 500, 1)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
            path.with_suffix(".tmp").write_bytes(buf.getvalue())
            path.with_suffix(".tmp").replace(path)
        files[path.name] = path.read_bytes()
    return files


def rss_mb(pid: int) -> dict:
    return {
        k: round((proc_kb(pid, f) or 0) / 1024, 1) for k, f in (("rss_mb", "VmRSS"), ("peak_rss_mb", "VmHWM"))
    }


def download_round(client, redis_url: str, tmp: Path, urls: list[str], worker: subprocess.Popen) -> dict:
    """Submit urls (one per chunk) and wait until each is downloaded or failed; the worker's peak RSS."""
    listing = tmp / f"big_{len(urls)}_{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(urls) + "\n")
    before = {k: counted(client, k) for k in ("downloaded", "failed")}
    started = time.monotonic()
    report_of(submit(listing, redis_url, tmp / "out", KOALA_CHUNK_SIZE="1"), 120)
    deadline = time.monotonic() + 60 + 10 * len(urls)
    while sum((now := {k: counted(client, k) - before[k] for k in before}).values()) < len(urls):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"download worker: {now} of {len(urls)} (exit {worker.poll()})")
        time.sleep(0.1)
    seconds = time.monotonic() - started
    done = {"images": len(urls), **now, "seconds": round(seconds, 1), "img_s": round(len(urls) / seconds, 2)}
    return done | rss_mb(worker.pid)


def download_memory(client, redis_url: str, tmp: Path, count: int, copies: tuple[int, int]) -> dict:
    """A download worker (-c 32) fed `count` 4000x3000 JPEGs, `copies[0]`x then `copies[1]`x more."""
    from testkit.servers import ImageServer, worker_env

    files = big_jpegs(count)
    server = ImageServer(files).start()
    client.flushall()
    log_path = tmp / "download-worker.log"
    env = worker_env(redis_url, tmp / "out", **DOWNLOAD_ENV)
    command = [sys.executable, "-m", "workers", "download", "-c", "32", "-n", "download@bench"]
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "ready" not in (text := log_path.read_text(errors="replace")):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker is not ready:\n{text[-3000:]}")
            time.sleep(0.1)
        time.sleep(1)
        idle = rss_mb(worker.pid)
        rounds = []
        for r, k in enumerate(copies):
            urls = [
                f"{server.base}/img/{name}?round={r}&copy={c}" for c in range(k) for name in sorted(files)
            ]
            rounds.append(download_round(client, redis_url, tmp, urls, worker))
    finally:
        stop(worker, 60)
        server.stop()
    full_decode_mb = BIG[0] * BIG[1] * 3 / 2**20
    return {
        "jpegs": count,
        "resolution": f"{BIG[0]}x{BIG[1]}",
        "jpeg_mb_mean": round(np.mean([len(b) for b in files.values()]) / 1e6, 2),
        "concurrency": 32,
        "per_host_connections": 32,
        "idle": idle,
        "rounds": rounds,
        "peak_growth_ratio": round(rounds[-1]["peak_rss_mb"] / rounds[0]["peak_rss_mb"], 3),
        "full_decode_mb_per_image": round(full_decode_mb, 1),
        "full_decode_mb_x32": round(32 * full_decode_mb),
    }


# ---- the benchmark ------------------------------------------------------------------------------


def run(sizes: list[int], smoke: bool, timeout: float) -> dict:
    result: dict = {"bench": "scale", "smoke": smoke, "target_bytes_per_url": TARGET_BYTES_PER_URL}
    with redis_server("scale") as server:
        client, tmp = server.client(), server.directory.parent
        result["redis_version"] = client.info("server")["redis_version"]
        result["submit"] = []
        for n in sizes:
            log(f"submitting {n} URLs")
            result["submit"].append(submit_size(client, server.url, tmp, n, timeout))
        log("backpressure")
        bp = (1000, 20, 1.0) if smoke else (4000, 50, 3.0)
        result["backpressure"] = backpressure(client, server.url, tmp, *bp)
        log("download worker on 4000x3000 JPEGs")
        big = (4, (1, 2)) if smoke else (20, (2, 4))
        result["download_rss"] = download_memory(client, server.url, tmp, *big)
    subs = result["submit"]
    big = max(subs, key=lambda s: s["submitted"])
    ratio = round(big["producer_peak_rss_mb"] / subs[0]["producer_peak_rss_mb"], 3)
    result["targets"] = {
        "bytes_per_url_state_at_largest": big["bytes_per_url_state"],
        "bytes_per_url_met": big["bytes_per_url_state"] <= TARGET_BYTES_PER_URL,
        "producer_rss_ratio_largest_vs_smallest": ratio,
        "producer_rss_flat": ratio <= 1.1,
        "backpressure_over_limit_by": result["backpressure"]["over_limit_by"],
        "download_peak_growth_ratio": result["download_rss"]["peak_growth_ratio"],
    }
    if smoke:
        result["note"] = "smoke: tiny sizes; per-URL memory is dominated by per-key overhead there"
    return result


@click.command()
@click.option("--sizes", help="URL counts to submit, comma separated (default 10000,100000,1000000)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--smoke", is_flag=True, help="a tiny run that only checks the path works")
@click.option(
    "--timeout", type=float, default=300.0, help="seconds per submission (then its rate is reported)"
)
def main(sizes: str | None, json_path: Path | None, smoke: bool, timeout: float) -> None:
    """Redis bytes per URL, producer memory and backpressure, download worker memory."""
    sizes = sizes or ("1000,5000" if smoke else "10000,100000,1000000")
    finish("scale", run([int(s) for s in sizes.split(",")], smoke, timeout), json_path, smoke)


if __name__ == "__main__":
    main()
