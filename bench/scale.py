"""Scale benchmark: job state per URL in Redis (`used_memory` before and after a real `producer submit` of
a generated fall11-style list, workers stopped, then without the `download` list: the state alone), and
the producer's peak RSS (VmHWM) and rate.

Run: .venv/bin/python -m bench.scale [--sizes 10000,100000,1000000] [--json PATH] [--smoke]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from bench import common as c

TARGET_BYTES_PER_URL = 100


def write_url_list(path: Path, n: int) -> Path:
    """n distinct fall11-style lines `n<synset>_<i><TAB>http://farmX.static.flickr.com/...jpg`."""
    with open(path, "w", buffering=1 << 20) as f:
        for i in range(n):
            farm, server, secret = 1 + i % 9, 1000 + i % 9000, (i * 2654435761) & 0xFFFFFFFFFF
            f.write(
                f"n{1440764 + i // 1300:08d}_{i}\thttp://farm{farm}.static.flickr.com/{server}/{i}_{secret:010x}.jpg\n"
            )
    return path


def submit_size(client, redis_url: str, tmp: Path, n: int, timeout: float) -> dict:
    """Submit n URLs with the queue limit above every chunk; memory per URL, producer RSS and rate."""
    from testkit.servers import worker_env

    listing = write_url_list(tmp / f"urls_{n}.txt", n)
    client.flushall()
    baseline = client.info("memory")["used_memory"]
    counted = lambda: int(client.hget("koala:counts", "submitted") or 0)  # noqa: E731
    limit = str(n // 16 + 1001)  # above every chunk
    env = worker_env(redis_url, tmp / "out", KOALA_CHUNK_SIZE="16", KOALA_DOWNLOAD_QUEUE_LIMIT=limit)
    command = [sys.executable, "-m", "producer", "submit", str(listing), "--json"]
    started = time.monotonic()
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(command, cwd=c.ROOT, env=env, **pipes)
    first, first_count, peak_kb = 0.0, 0, 0
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:  # VmHWM sampled until it exits
            peak_kb = max(peak_kb, c.proc_kb(proc.pid, "VmHWM") or 0)
            if not first and (first_count := counted()):
                first = time.monotonic()
            time.sleep(0.05)
        timed_out = proc.poll() is None  # then its rate so far is reported
    finally:
        c.stop(proc, 60)
    stdout, stderr = proc.communicate()
    if not timed_out and proc.returncode != 0:
        raise RuntimeError(f"koala submit failed ({proc.returncode}): {stderr[-2000:]}")
    report = {} if timed_out else json.loads(stdout.strip().splitlines()[-1])
    ended, submitted = time.monotonic(), counted()
    queue_bytes = client.memory_usage("download", samples=0) or 0
    total = client.info("memory")["used_memory"] - baseline
    client.delete("download")
    state = client.info("memory")["used_memory"] - baseline
    bucket = next(client.scan_iter(match="koala:i:*", count=1000), None)
    seconds, per_url = ended - started, lambda b: round(b / max(submitted, 1), 1)
    return {
        "urls": n,
        "submitted": submitted,
        "timed_out": timed_out,
        "new": report.get("new"),
        "seconds": round(seconds, 1),
        "urls_per_s": round(submitted / seconds),
        "urls_per_s_after_startup": round((submitted - first_count) / (ended - first)) if first else None,
        "producer_peak_rss_mb": round(peak_kb / 1024, 1),
        "bytes_per_url_total": per_url(total),
        "bytes_per_url_state": per_url(state),
        "bytes_per_url_queue": per_url(queue_bytes),
        "bucket_encoding": client.object("encoding", bucket).decode() if bucket else None,
    }


@click.command()
@click.option("--sizes", help="URL counts to submit, comma separated (default 10000,100000,1000000)")
@click.option("--timeout", type=float, default=300.0, help="seconds per submission (then its rate so far)")
@c.options
def main(sizes: str | None, timeout: float, json_path: Path | None, smoke: bool) -> None:
    """Redis bytes per URL, producer memory and rate."""
    counts = [int(s) for s in (sizes or ("1000,5000" if smoke else "10000,100000,1000000")).split(",")]
    result: dict = {"smoke": smoke, "target_bytes_per_url": TARGET_BYTES_PER_URL}
    with c.redis_server("scale") as server:
        result["redis_version"] = server.client().info("server")["redis_version"]
        tmp, result["submit"] = server.directory.parent, []
        for n in counts:
            c.log(f"submitting {n} URLs")
            result["submit"].append(submit_size(server.client(), server.url, tmp, n, timeout))
    subs = result["submit"]
    big = max(subs, key=lambda s: s["submitted"])
    ratio = round(big["producer_peak_rss_mb"] / subs[0]["producer_peak_rss_mb"], 3)
    result["targets"] = {
        "bytes_per_url_state_at_largest": big["bytes_per_url_state"],
        "bytes_per_url_met": big["bytes_per_url_state"] <= TARGET_BYTES_PER_URL,
        "producer_rss_ratio_largest_vs_smallest": ratio,
        "producer_rss_flat": ratio <= 1.1,
    }
    c.finish("scale", result, json_path, smoke)


if __name__ == "__main__":
    main()
