"""Storage benchmark (issue 20 B): the embed worker's ceiling (null model) writing its shards to a loopback
S3 server (moto, testkit/s3.py) vs local disk, per record format; variants alternate within each round.
Shards of 500: the rate from `written` >= 500 to the last sample before the final shard (an object-store
record counts once its shard's upload is committed); each round checks each image once in the shards.

Run: .venv/bin/python -m bench.storage [--images 3000] [--rounds 3] [--json PATH] [--smoke]
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import click

from bench import common as c

PER_SHARD = 500
TARGET = 0.8  # issue 20: the ceiling to S3 at least 0.8 x the ceiling to local disk
KEYS = ("images_per_s", "cpu_ms_per_image", "machine_busy_cores", "worker_peak_rss_mb")


def one_round(server, s3, payloads: list[dict], fmt: str, where: str, tmp: Path) -> dict:
    """One null-model embed worker run of one variant; rate and CPU in its steady window."""
    import s3fs

    from common.output.storage import Store

    server.client().flushall()
    shutil.rmtree(tmp, ignore_errors=True)
    env = {"KOALA_NULL_MODEL": "1", "KOALA_BATCH_SIZE": "128", "KOALA_RECORD_FORMAT": fmt}
    env |= {"KOALA_EXAMPLES_PER_SHARD": str(PER_SHARD), "KOALA_SCRATCH_DIR": str(tmp / "scratch")}
    if where == "s3":
        s3.reset()
        s3.make_bucket("bench")
        env |= {**s3.env(), "KOALA_OUTPUT_DIR": "s3://bench/run"}
    n = len(payloads)
    run = c.embed_worker_round(server, payloads, tmp / "out", env, 120 + n / 10, 0.01, (s3.proc.pid,))
    end = [x for x in run["samples"] if x[1] <= n - PER_SHARD][-1]  # before the last shard
    (t0, w0, cpu0, s3cpu0, busy0), (t1, w1, cpu1, s3cpu1, busy1) = c.first(run["samples"], PER_SHARD), end
    if w1 <= w0:
        raise RuntimeError("too few images for a steady window: use more (--images)")
    if where == "s3":  # reading gigabytes back from moto takes minutes: its manifest, and the job state
        os.environ.update(s3.env())
        s3fs.S3FileSystem.clear_instance_cache()
        manifest = Store("s3://bench/run").manifest()
        records = sum(e["records"] for e in manifest)
        written = int(server.client().hget("koala:counts", "written") or 0)
        run |= {
            "records": records,
            "distinct": written if written == records else -1,
            "shards": len(manifest),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "images_per_s": round((w1 - w0) / (t1 - t0), 1),
        "cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / (w1 - w0), 3),
        "s3_server_cpu_ms_per_image": round(1000 * (s3cpu1 - s3cpu0) / (w1 - w0), 3) if where == "s3" else "",
        "machine_busy_cores": round((busy1 - busy0) / (t1 - t0), 2),
        "timed_images": w1 - w0,
        "worker_peak_rss_mb": round(run["peak_kb"] / 1024),
        "each_image_once": run["records"] == run["distinct"] == n,
        "shards": run["shards"],
    }


def measure(n: int, rounds: int) -> dict:
    from testkit.s3 import S3Server

    payloads = c.payloads_of(c.make_images(n))
    runs: dict[str, list[dict]] = {f"{f} {w}": [] for f in ("lab", "compact") for w in ("local", "s3")}
    load = [c.load()]
    s3 = S3Server(c.RESULTS / "tmp" / "moto.log").start()
    try:
        with c.redis_server("storage") as server:
            for r in range(rounds):
                for variant in runs:
                    x = one_round(server, s3, payloads, *variant.split(), c.RESULTS / "tmp" / "storage")
                    runs[variant].append(x)
                    c.log(f"round {r + 1}/{rounds}, {variant}: {x['images_per_s']} images/s")
                load.append(c.load())
    finally:
        s3.stop()
    medians = {v: c.medians(rs, KEYS) for v, rs in runs.items()}
    ratios = {}
    for fmt in ("lab", "compact"):
        rates = zip(runs[f"{fmt} local"], runs[f"{fmt} s3"], strict=True)
        per_round = [s["images_per_s"] / loc["images_per_s"] for loc, s in rates]
        median = statistics.median(per_round)
        ratios[fmt] = {"s3_vs_local": round(median, 3), "per_round": [round(x, 3) for x in per_round]}
        ratios[fmt]["meets_0.8"] = median >= TARGET
    result = {"images": n, "rounds": rounds, "per_shard": PER_SHARD, "load_before_and_after_each_round": load}
    return result | {"medians": medians, "ratios": ratios, "runs": runs}


def table(result: dict) -> str:
    rows = []
    for variant, m in result["medians"].items():
        fmt, where = variant.split()
        runs = result["runs"][variant]
        s3_cpu = statistics.median(x["s3_server_cpu_ms_per_image"] for x in runs) if where == "s3" else ""
        rows.append(
            [variant, m["images_per_s"], result["ratios"][fmt]["s3_vs_local"] if where == "s3" else 1.0]
            + [m["cpu_ms_per_image"], s3_cpu, m["machine_busy_cores"], m["worker_peak_rss_mb"]]
            + [all(x["each_image_once"] for x in runs)]
        )
    cols = "format, output|images/s|vs local (same rounds)|worker CPU-ms/image|S3 server CPU-ms/image"
    cols += "|machine busy cores|worker peak RSS MB|each image once"
    load = ", ".join(f"{a[0]:.2f}" for a in result["load_before_and_after_each_round"])
    head = f"null-model embed worker, {result['images']} images, {result['rounds']} rounds, medians"
    return f"{head}; 1-min load before and after each round: {load}\n\n" + c.md_table(cols.split("|"), rows)


@click.command()
@click.option("--images", type=int, default=3000, help="images per run (a multiple of 500)")
@click.option("--rounds", type=int, default=3)
@c.options
def main(images: int, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """The embed worker's ceiling to a loopback S3 server vs local disk."""
    if smoke:
        images, rounds = 4 * PER_SHARD, 1
    if images % PER_SHARD:
        raise click.BadParameter(f"a multiple of {PER_SHARD}", param_hint="--images")
    result = measure(images, rounds)
    c.finish("storage", result, json_path, smoke, table(result))


if __name__ == "__main__":
    main()
