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

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.embed import CACHE, ROOT, PeakSampler, default_json, log, md_table, proc_kb, save_json

TARGET_BYTES_PER_URL = 100
NAME = "scale"
BIG = (4000, 3000)


# ---- inputs -------------------------------------------------------------------------------------


def start_submit(listing: Path, env: dict[str, str]) -> subprocess.Popen:
    """`koala submit LIST --json` in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "producer", "submit", str(listing), "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_url_list(path: Path, n: int) -> int:
    """n distinct fall11-style lines `n<synset>_<i><TAB>http://farmX.static.flickr.com/...jpg`; its bytes."""
    with open(path, "w", buffering=1 << 20) as f:
        for start in range(0, n, 10_000):
            f.write(
                "".join(
                    f"n{1440764 + i // 1300:08d}_{i}\t"
                    f"http://farm{1 + i % 9}.static.flickr.com/{1000 + i % 9000}/"
                    f"{i}_{(i * 2654435761) & 0xFFFFFFFFFF:010x}.jpg\n"
                    for i in range(start, min(n, start + 10_000))
                )
            )
    return path.stat().st_size


def producer_env(redis_url: str, out: Path, **extra: str) -> dict[str, str]:
    from testkit.servers import worker_env

    return worker_env(redis_url, out, **{"KOALA_CHUNK_SIZE": "16", **extra})  # 16: the default chunk size


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


# ---- 1. submission memory, RSS, rate ------------------------------------------------------------


def submit_size(client, redis_url: str, tmp: Path, n: int, timeout: float) -> dict:
    """Submit n URLs with the queue limit above every chunk; memory per URL, producer RSS and rate."""
    listing = tmp / f"urls_{n}.txt"
    list_bytes = write_url_list(listing, n)
    client.flushall()
    baseline = used_memory(client)
    chunks = -(-n // 16)
    env = producer_env(redis_url, tmp / "out", KOALA_DOWNLOAD_QUEUE_LIMIT=str(chunks + 1000))
    started = time.monotonic()
    proc = start_submit(listing, env)
    first = None
    first_count = 0
    timed_out = False
    try:
        with PeakSampler(proc.pid) as rss:
            while proc.poll() is None:
                count = int(client.hget("koala:counts", "submitted") or 0)
                if count and first is None:
                    first, first_count = time.monotonic(), count
                if time.monotonic() - started > timeout:
                    timed_out = True
                    proc.terminate()
                    break
                time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic()
    if proc.returncode != 0 and not timed_out:
        raise RuntimeError(f"koala submit failed ({proc.returncode}): {stderr[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1]) if not timed_out and stdout.strip() else {}
    submitted = int(client.hget("koala:counts", "submitted") or 0)
    depth = client.llen("download")
    queue_bytes = client.memory_usage("download", samples=0) or 0
    total = used_memory(client)
    client.delete("download")
    state_only = used_memory(client)
    bucket = next(client.scan_iter(match="koala:i:*", count=1000), None)
    seconds = ended - started
    steady = (submitted - first_count) / (ended - first) if first and ended > first else None
    return {
        "urls": n,
        "list_mb": round(list_bytes / 1e6, 1),
        "submitted": submitted,
        "timed_out": timed_out,
        "chunks_queued": depth,
        "new": report.get("new"),
        "held_back_s": report.get("held_back_s"),
        "seconds": round(seconds, 1),
        "urls_per_s": round(submitted / seconds),
        "urls_per_s_after_startup": round(steady) if steady else None,
        "producer_peak_rss_mb": round(rss.peak_kb / 1024, 1),
        "redis_delta_total_bytes": total - baseline,
        "redis_queue_bytes": queue_bytes,
        "redis_delta_state_bytes": state_only - baseline,
        "bytes_per_url_total": round((total - baseline) / max(submitted, 1), 1),
        "bytes_per_url_state": round((state_only - baseline) / max(submitted, 1), 1),
        "bytes_per_url_queue": round(queue_bytes / max(submitted, 1), 1),
        "keys": client.dbsize(),
        "bucket_encoding": client.object("encoding", bucket).decode() if bucket else None,
        "journal_left": client.hlen("koala:journal"),
    }


# ---- 2. backpressure ----------------------------------------------------------------------------


def backpressure(client, redis_url: str, tmp: Path, n: int, limit: int, hold_s: float) -> dict:
    """Submit n URLs with queue limit `limit`: sample the depth while nothing consumes, then while a
    stand-in consumer pops a few messages every 50 ms, until the producer is done."""
    listing = tmp / f"urls_bp_{n}.txt"
    write_url_list(listing, n)
    client.flushall()
    env = producer_env(redis_url, tmp / "out", KOALA_DOWNLOAD_QUEUE_LIMIT=str(limit))
    proc = start_submit(listing, env)
    try:
        return _backpressure(client, proc, n, limit, hold_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _backpressure(client, proc: subprocess.Popen, n: int, limit: int, hold_s: float) -> dict:
    samples = []
    max_depth = 0
    popped = 0

    def sample() -> int:
        nonlocal max_depth
        depth = client.llen("download")
        samples.append(depth)
        max_depth = max(max_depth, depth)
        return depth

    deadline = time.monotonic() + 60
    while sample() < limit and proc.poll() is None:  # fill up to the limit
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the producer never filled the queue to its limit")
        time.sleep(0.01)
    held_from = time.monotonic()
    submitted_at_hold = int(client.hget("koala:counts", "submitted") or 0)
    while time.monotonic() - held_from < hold_s:  # nobody consumes: the producer must wait
        sample()
        time.sleep(0.01)
    alive_after_hold = proc.poll() is None
    submitted_after_hold = int(client.hget("koala:counts", "submitted") or 0)
    deadline = time.monotonic() + 300
    i = 0
    while proc.poll() is None:  # a consumer of about 100 chunks/s
        if i % 5 == 0:
            popped += len(client.rpop("download", 5) or [])
        sample()
        i += 1
        time.sleep(0.01)
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the producer did not finish while its queue was consumed")
    stdout, stderr = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"koala submit failed ({proc.returncode}): {stderr[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    remaining = client.llen("download")
    return {
        "urls": n,
        "chunks": -(-n // 16),
        "limit": limit,
        "max_depth": max_depth,
        "over_limit_by": max(0, max_depth - limit),
        "samples": len(samples),
        "hold_s": hold_s,
        "producer_waiting_after_hold": alive_after_hold,
        "submitted_at_hold_start": submitted_at_hold,
        "submitted_at_hold_end": submitted_after_hold,
        "popped_by_stand_in_consumer": popped,
        "left_in_queue": remaining,
        "all_chunks_sent": popped + remaining == -(-n // 16),
        "producer_held_back_s": report.get("held_back_s"),
        "submitted": report.get("new"),
    }


# ---- 3. download worker on 4000x3000 JPEGs ------------------------------------------------------


def big_jpegs(count: int, cache: Path) -> dict[str, bytes]:
    """`count` 4000x3000 photo-like JPEGs (quality 90, a few MB each), generated once into the cache."""
    import io

    from PIL import Image

    from testkit.corpus import photo

    folder = cache / "big-jpegs"
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
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)
        files[path.name] = path.read_bytes()
    return files


def wait_for_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} from the worker:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def download_round(
    client, redis_url: str, tmp: Path, urls: list[str], worker: subprocess.Popen, timeout: float
) -> dict:
    """Submit urls (one per chunk) and wait until each is downloaded or failed; the worker's peak RSS."""
    listing = tmp / f"big_{len(urls)}_{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(urls) + "\n")
    before = {k: int(client.hget("koala:counts", k) or 0) for k in ("downloaded", "failed")}
    env = producer_env(redis_url, tmp / "out", KOALA_CHUNK_SIZE="1")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "producer", "submit", str(listing), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"koala submit failed: {done.stderr[-2000:]}")
    deadline = time.monotonic() + timeout
    while True:
        now = {k: int(client.hget("koala:counts", k) or 0) - before[k] for k in before}
        if now["downloaded"] + now["failed"] >= len(urls):
            break
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"download worker: {now} of {len(urls)} (exit {worker.poll()})")
        time.sleep(0.1)
    seconds = time.monotonic() - started
    return {
        "images": len(urls),
        "downloaded": now["downloaded"],
        "failed": now["failed"],
        "seconds": round(seconds, 1),
        "img_s": round(len(urls) / seconds, 2),
        "peak_rss_mb": round((proc_kb(worker.pid, "VmHWM") or 0) / 1024, 1),
        "rss_mb": round((proc_kb(worker.pid, "VmRSS") or 0) / 1024, 1),
    }


def download_memory(
    client, redis_url: str, tmp: Path, count: int, copies: tuple[int, int], cache: Path
) -> dict:
    """A download worker (-c 32) fed `count` 4000x3000 JPEGs, `copies[0]`x then `copies[1]`x more."""
    from testkit.servers import ImageServer, worker_env

    files = big_jpegs(count, cache)
    server = ImageServer(files).start()
    client.flushall()
    log_path = tmp / "download-worker.log"
    env = worker_env(
        redis_url,
        tmp / "out",
        KOALA_MAX_BYTES="25000000",
        KOALA_CONNECT_TIMEOUT="10",
        KOALA_READ_TIMEOUT="20",
        KOALA_DOWNLOAD_DEADLINE="60",
        KOALA_PER_HOST_CONNECTIONS="32",
        KOALA_EMBED_QUEUE_LIMIT="100000",
    )
    with open(log_path, "wb") as log_file:
        command = [sys.executable, "-m", "workers", "download", "-c", "32", "-n", "download@bench"]
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_log(log_path, "ready", worker, 120)
            time.sleep(1)
            idle = {
                "rss_mb": round((proc_kb(worker.pid, "VmRSS") or 0) / 1024, 1),
                "peak_rss_mb": round((proc_kb(worker.pid, "VmHWM") or 0) / 1024, 1),
            }
            names = sorted(files)
            rounds = []
            for r, k in enumerate(copies):
                urls = [f"{server.base}/img/{name}?round={r}&copy={c}" for c in range(k) for name in names]
                rounds.append(
                    download_round(client, redis_url, tmp, urls, worker, timeout=60 + 10 * len(urls))
                )
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            server.stop()
    sizes = [len(b) for b in files.values()]
    full_decode_mb = BIG[0] * BIG[1] * 3 / 2**20
    return {
        "jpegs": count,
        "resolution": f"{BIG[0]}x{BIG[1]}",
        "jpeg_mb_mean": round(np.mean(sizes) / 1e6, 2),
        "concurrency": 32,
        "per_host_connections": 32,
        "idle": idle,
        "rounds": rounds,
        "peak_growth_ratio": round(rounds[-1]["peak_rss_mb"] / rounds[0]["peak_rss_mb"], 3),
        "full_decode_mb_per_image": round(full_decode_mb, 1),
        "full_decode_mb_x32": round(32 * full_decode_mb),
    }


# ---- the benchmark ------------------------------------------------------------------------------


def run(sizes: list[int], smoke: bool, cache: Path, timeout: float) -> dict:
    from testkit.servers import RedisServer

    result: dict = {
        "bench": "scale",
        "smoke": smoke,
        "chunk_size": 16,
        "target_bytes_per_url": TARGET_BYTES_PER_URL,
    }
    with tempfile.TemporaryDirectory(prefix="koala-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp / "redis").start()
        try:
            client = server.client()
            result["redis_version"] = client.info("server")["redis_version"]
            result["submit"] = []
            for n in sizes:
                log(f"submitting {n} URLs")
                result["submit"].append(submit_size(client, server.url, tmp, n, timeout))
            log("backpressure")
            result["backpressure"] = backpressure(
                client,
                server.url,
                tmp,
                1000 if smoke else 4000,
                limit=20 if smoke else 50,
                hold_s=1.0 if smoke else 3.0,
            )
            log("download worker on 4000x3000 JPEGs")
            result["download_rss"] = download_memory(
                client, server.url, tmp, 4 if smoke else 20, (1, 2) if smoke else (2, 4), cache
            )
        finally:
            server.stop()
    subs = result["submit"]
    big = max(subs, key=lambda s: s["submitted"])
    result["targets"] = {
        "bytes_per_url_state_at_largest": big["bytes_per_url_state"],
        "bytes_per_url_met": big["bytes_per_url_state"] <= TARGET_BYTES_PER_URL,
        "producer_rss_ratio_largest_vs_smallest": round(
            big["producer_peak_rss_mb"] / subs[0]["producer_peak_rss_mb"], 3
        ),
        "backpressure_over_limit_by": result["backpressure"]["over_limit_by"],
        "download_peak_growth_ratio": result["download_rss"]["peak_growth_ratio"],
    }
    if smoke:
        result["note"] = "smoke: tiny sizes; per-URL memory is dominated by per-key overhead there"
    return result


def markdown(result: dict) -> str:
    """The tables of a scale result."""
    head = f"### Scale{' (SMOKE)' if result['smoke'] else ''} — Redis {result['redis_version']}, chunks of 16"
    rows = []
    for s in result["submit"]:
        rows.append(
            [
                f"{s['urls']:,}" + (" (timed out)" if s["timed_out"] else ""),
                f"{s['submitted']:,}",
                s["bytes_per_url_state"],
                s["bytes_per_url_queue"],
                s["bytes_per_url_total"],
                s["bucket_encoding"],
                s["producer_peak_rss_mb"],
                s["seconds"],
                f"{s['urls_per_s']:,}",
                f"{s['urls_per_s_after_startup'] or 0:,}",
            ]
        )
    t1 = md_table(
        [
            "URLs",
            "submitted",
            "B/URL job state",
            "B/URL queue",
            "B/URL total",
            "bucket encoding",
            "producer peak RSS MB",
            "submit s",
            "URLs/s",
            "URLs/s after start-up",
        ],
        rows,
    )
    t = result["targets"]
    first = result["submit"][0]
    t1b = md_table(
        ["target", "measured", "met"],
        [
            [
                f"job state ≤ {result['target_bytes_per_url']} B/URL (largest size)",
                t["bytes_per_url_state_at_largest"],
                "yes" if t["bytes_per_url_met"] else "no",
            ],
            [
                f"producer RSS flat: largest / {first['urls']:,} URLs",
                t["producer_rss_ratio_largest_vs_smallest"],
                "yes" if t["producer_rss_ratio_largest_vs_smallest"] <= 1.1 else "no",
            ],
        ],
    )
    b = result["backpressure"]
    t2 = md_table(
        ["backpressure (nobody consuming, then a stand-in consumer)", "value"],
        [
            ["URLs / chunks / KOALA_DOWNLOAD_QUEUE_LIMIT", f"{b['urls']} / {b['chunks']} / {b['limit']}"],
            ["max `download` depth observed (samples)", f"**{b['max_depth']}** ({b['samples']})"],
            ["over the limit by", b["over_limit_by"]],
            [
                f"producer still waiting after {b['hold_s']} s with nobody consuming",
                b["producer_waiting_after_hold"],
            ],
            [
                "submitted at start / end of that hold",
                f"{b['submitted_at_hold_start']} / {b['submitted_at_hold_end']}",
            ],
            ["producer's own held-back time", f"{b['producer_held_back_s']:.1f} s"],
            ["every chunk sent in the end", b["all_chunks_sent"]],
        ],
    )
    d = result["download_rss"]
    rows = [["idle (after start)", "-", "-", "-", d["idle"]["rss_mb"], d["idle"]["peak_rss_mb"]]]
    total = 0
    for i, r in enumerate(d["rounds"], 1):
        total += r["images"]
        rows.append(
            [
                f"round {i} (total {total})",
                r["images"],
                f"{r['downloaded']} / {r['failed']}",
                r["img_s"],
                r["rss_mb"],
                r["peak_rss_mb"],
            ]
        )
    t3 = md_table(
        [
            "download worker -c 32",
            "images",
            "downloaded / failed",
            "images/s",
            "RSS MB",
            "peak RSS (VmHWM) MB",
        ],
        rows,
    )
    note = (
        f"{d['jpegs']} distinct {d['resolution']} JPEGs (mean {d['jpeg_mb_mean']} MB), per-host "
        f"limit {d['per_host_connections']}; peak after the last round / after the first: "
        f"{d['peak_growth_ratio']}. A full decode is {d['full_decode_mb_per_image']} MB per image "
        f"({d['full_decode_mb_x32']} MB for 32 at once)."
    )
    return "\n\n".join([head, t1, t1b, t2, t3, note])


@click.command()
@click.option(
    "--sizes", default=None, help="URL counts to submit, comma separated (default 10000,100000,1000000)"
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="a tiny run that only checks the path works")
@click.option(
    "--timeout", type=float, default=300.0, help="seconds allowed per submission (then its rate is reported)"
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE,
    help="where the generated JPEGs are kept",
)
def main(sizes: str | None, json_path: Path | None, smoke: bool, timeout: float, cache: Path) -> None:
    """Redis bytes per URL, producer memory and backpressure, download worker memory."""
    sizes = sizes or ("1000,5000" if smoke else "10000,100000,1000000")
    result = run([int(s) for s in sizes.split(",")], smoke, cache, timeout)
    path = json_path or default_json(NAME, smoke)
    save_json(result, path)
    text = markdown(result)
    path.with_suffix(".md").write_text(text + "\n")  # beside the JSON: `python -m bench --reuse` reads it
    click.echo(text)


if __name__ == "__main__":
    main()
