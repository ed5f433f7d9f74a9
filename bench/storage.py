"""Storage benchmark (issue 20 B): the embed worker's ceiling (null model) writing its shards to a loopback
S3 server against writing them to local disk, per record format, with CPU per image.

Run: .venv/bin/python -m bench.storage [--images 3000] [--rounds 3] [--json PATH] [--smoke]

Each round runs a real null-model embed worker (`python -m workers embed`, KOALA_NULL_MODEL=1) on the
embed queue pre-filled with N photo-like images, once per variant, the variants alternating: `lab` and
`compact` records, to a local folder (bench/results/tmp) and to `s3://bench/run` on moto's server mode
in its own process (testkit/s3.py; loopback, everything in its memory). Shards of 500 records, N a
multiple of 500, so the last shard closes full: the rate is taken between `written` >= 500 and
`written` = N in both (an object-store record counts only once its shard's upload is committed, so
that is where its first one appears). CPU: the worker's, per image, over the same window; the S3
server's own CPU per image is reported beside it (on a real deployment it is someone else's machine).
Every round checks each image once in the finalized shards (local: read back; the bucket: records
its manifest lists == items the job state counts written == N, as reading gigabytes back from moto
takes minutes). Peak RSS of the worker is reported (held messages wait for their shard's upload).
Ratios of the same round, not absolute rates, are what to compare: the machine is shared.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import click

from bench.common import (
    RESULTS,
    ROOT,
    count_records,
    cpu_seconds,
    fill_embed_queue,
    finish,
    log,
    machine_cpu_s,
    make_images,
    md_table,
    payloads_of,
    proc_kb,
    redis_server,
    register_downloaded,
    stop,
)

PER_SHARD = 500
TARGET = 0.8  # issue 20: the ceiling to S3 at least 0.8 x the ceiling to local disk


def bucket_records(url: str, client) -> dict:
    """Records in the committed shards of a bucket location (its manifest; reading gigabytes back
    from moto takes minutes) and the items the job state has written: every record's item was
    reserved for its shard alone, so records == items written == n means each image once."""
    from common.output.storage import Store

    manifest = Store(url).manifest()
    written = int(client.hget("koala:counts", "written") or 0)
    records = sum(e["records"] for e in manifest)
    return {"records": records, "distinct": written if written == records else -1, "shards": len(manifest)}


def worker_round(server, s3, payloads: list[dict], out: Path, env: dict[str, str]) -> list[tuple]:
    """A real `python -m workers embed` on the queue pre-filled with the payloads (registered and
    marked downloaded first), SIGTERMed once every record is written; a sample (time, written, the
    worker's CPU s, the S3 server's CPU s, the machine's busy CPU s) at each change of `written`."""
    import subprocess
    import sys

    from testkit.servers import worker_env

    client = server.client()
    register_downloaded(client, payloads)
    fill_embed_queue(server.url, payloads)
    log_path = server.directory.parent / "embed-worker.log"
    env = worker_env(server.url, out, KOALA_BATCH_SIZE="128", KOALA_BATCH_WAIT="0.2", **env)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "embed", "-n", "embed@bench"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    samples: list[tuple] = []
    peak = [0]
    deadline = time.monotonic() + 120 + len(payloads) / 10
    try:
        while not samples or samples[-1][1] < len(payloads):
            written = int(client.hget("koala:counts", "written") or 0)
            peak[0] = max(peak[0], proc_kb(proc.pid, "VmHWM") or 0)
            if not samples or written != samples[-1][1]:
                cpu = (cpu_seconds(proc.pid) or 0.0, cpu_seconds(s3.proc.pid) or 0.0)
                samples.append((time.monotonic(), written, *cpu, machine_cpu_s()[0]))
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the embed worker wrote {written}/{len(payloads)}:\n{tail}")
            time.sleep(0.01)
    finally:
        stop(proc)
    return samples, peak[0]


def steady(samples: list[tuple], n: int) -> tuple[tuple, tuple]:
    """The samples that bound the steady state: from the first with a full shard written to the last
    before the final (partial) shard, the same rule for local disk and the store."""
    start = next(x for x in samples if x[1] >= PER_SHARD)
    end = [x for x in samples if x[1] <= n - PER_SHARD][-1]
    if end[1] <= start[1]:
        raise RuntimeError("too few images for a steady window: use more (--images)")
    return start, end


def one_round(server, s3, payloads: list[dict], variant: str, record_format: str, tmp: Path) -> dict:
    """One null-model embed worker run of one variant; rate and CPU in its steady window."""
    import s3fs

    server.client().flushall()
    out = tmp / "out"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {
        "KOALA_NULL_MODEL": "1",
        "KOALA_RECORD_FORMAT": record_format,
        "KOALA_EXAMPLES_PER_SHARD": str(PER_SHARD),
        "KOALA_SCRATCH_DIR": str(tmp / "scratch"),
    }
    if variant == "s3":
        s3.reset()
        s3.make_bucket("bench")
        env |= {**s3.env(), "KOALA_OUTPUT_DIR": "s3://bench/run"}
    samples, peak_kb = worker_round(server, s3, payloads, out, env)
    (t0, w0, cpu0, s3cpu0, busy0), (t1, w1, cpu1, s3cpu1, busy1) = steady(samples, len(payloads))
    if variant == "s3":
        for name, value in s3.env().items():
            os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()
        counts = bucket_records("s3://bench/run", server.client())
    else:
        counts = count_records(out)
    shutil.rmtree(tmp, ignore_errors=True)
    images = w1 - w0
    return {
        "images_per_s": round(images / (t1 - t0), 1),
        "cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / images, 3),
        "s3_server_cpu_ms_per_image": round(1000 * (s3cpu1 - s3cpu0) / images, 3)
        if variant == "s3"
        else None,
        "machine_busy_cores": round((busy1 - busy0) / (t1 - t0), 2),
        "timed_images": images,
        "worker_peak_rss_mb": round(peak_kb / 1024),
        "each_image_once": counts["records"] == counts["distinct"] == len(payloads),
        "shards": counts["shards"],
    }


def measure(n: int, rounds: int) -> dict:
    from testkit.s3 import S3Server

    payloads = payloads_of(make_images(n))
    variants = [(fmt, where) for fmt in ("lab", "compact") for where in ("local", "s3")]
    runs: dict[str, list[dict]] = {f"{fmt} {where}": [] for fmt, where in variants}
    tmp = RESULTS / "tmp" / "storage"
    load = [os.getloadavg()]
    s3 = S3Server(RESULTS / "tmp" / "moto.log").start()
    try:
        with redis_server("storage") as server:
            for r in range(rounds):
                for fmt, where in variants:
                    x = one_round(server, s3, payloads, where, fmt, tmp)
                    runs[f"{fmt} {where}"].append(x)
                    rate, cpu = x["images_per_s"], x["cpu_ms_per_image"]
                    log(f"round {r + 1}/{rounds}, {fmt} {where}: {rate} img/s, {cpu} worker CPU-ms/image")
                load.append(os.getloadavg())
    finally:
        s3.stop()
    medians = {
        v: {
            k: statistics.median(x[k] for x in rs)
            for k in ("images_per_s", "cpu_ms_per_image", "machine_busy_cores", "worker_peak_rss_mb")
        }
        for v, rs in runs.items()
    }
    ratios = {}
    for fmt in ("lab", "compact"):
        per_round = [
            s["images_per_s"] / loc["images_per_s"]
            for loc, s in zip(runs[f"{fmt} local"], runs[f"{fmt} s3"], strict=True)
        ]
        ratios[fmt] = {
            "s3_vs_local": round(statistics.median(per_round), 3),
            "per_round": [round(x, 3) for x in per_round],
            "meets_0.8": statistics.median(per_round) >= TARGET,
        }
    return {
        "images": n,
        "rounds": rounds,
        "per_shard": PER_SHARD,
        "load_before_and_after_each_round": load,
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }


def table(result: dict) -> str:
    rows = []
    for variant, m in result["medians"].items():
        fmt, where = variant.split()
        s3_cpu = [x["s3_server_cpu_ms_per_image"] for x in result["runs"][variant]]
        rows.append(
            [
                variant,
                m["images_per_s"],
                result["ratios"][fmt]["s3_vs_local"] if where == "s3" else 1.0,
                m["cpu_ms_per_image"],
                statistics.median(s3_cpu) if where == "s3" else "",
                m["machine_busy_cores"],
                m["worker_peak_rss_mb"],
                all(x["each_image_once"] for x in result["runs"][variant]),
            ]
        )
    headers = [
        "format, output",
        "images/s",
        "vs local (same rounds)",
        "worker CPU-ms/image",
        "S3 server CPU-ms/image",
        "machine busy cores",
        "worker peak RSS MB",
        "each image once",
    ]
    load = ", ".join(f"{a[0]:.2f}" for a in result["load_before_and_after_each_round"])
    head = f"null-model embed worker, {result['images']} images, {result['rounds']} rounds, medians"
    return f"{head}; 1-min load before and after each round: {load}\n\n" + md_table(headers, rows)


@click.command()
@click.option("--images", type=int, default=3000, help="images per run (a multiple of 500)")
@click.option("--rounds", type=int, default=3)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="2000 images, one round: checks the path works")
def main(images: int, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """The embed worker's ceiling to a loopback S3 server vs local disk."""
    if smoke:
        images, rounds = 4 * PER_SHARD, 1
    if images % PER_SHARD:
        raise click.BadParameter(f"a multiple of {PER_SHARD}", param_hint="--images")
    started = time.monotonic()
    result = measure(images, rounds)
    result["seconds"] = round(time.monotonic() - started, 1)
    finish("storage", result, json_path, smoke, table(result))


if __name__ == "__main__":
    main()
