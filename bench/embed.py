"""Embed benchmark: the bare model (`Embedder.embed`, before and after: the mean) against a real embed
worker on the queue pre-filled as download workers fill it (steady from one batch written to N), and where
a batch's time goes (`EmbedStage.process` in this process, parts timed; the queue side by the real
`BatchConsumer`, no-op steps). --null-model: the worker's ceiling (KOALA_NULL_MODEL=1) on local disk and
tmpfs, Lab on this CPU and off it (KOALA_NULL_LAB=1, as a GPU worker's CPU sees it), medians.

Run: .venv/bin/python -m bench.embed [--images 96] [--batch-size 16] [--json PATH] [--smoke]
     .venv/bin/python -m bench.embed --null-model [--images 3000] [--batch-size 128] [--rounds 3]
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import click
import numpy as np

from bench import common as c

TARGET_RATIO = 0.95  # issue 9: the worker at least 0.95 x the bare model


def bare_embed(embedder, rgb: np.ndarray, batch_size: int) -> dict:
    """Embedder.embed in a loop, one call per batch (after one warm-up call)."""
    parts = [rgb[i : i + batch_size] for i in range(0, len(rgb), batch_size)]
    embedder.embed(parts[0])
    start, cpu, busy = time.perf_counter(), time.process_time(), c.machine_cpu_s()[0]
    for b in parts:
        embedder.embed(b)
    seconds, cpu, busy = time.perf_counter() - start, time.process_time() - cpu, c.machine_cpu_s()[0] - busy
    return {
        "img_s": round(len(rgb) / seconds, 3),
        "cpu_s_per_image": round(cpu / len(rgb), 3),
        "cores_used": round(cpu / seconds, 2),
        "other_processes_cores": round(max(0.0, busy - cpu) / seconds, 2),
    }


def worker_run(server, payloads: list[dict], out: Path, batch_size: int, checkpoint: Path) -> dict:
    """The worker steady (from its first full batch: model loaded and traced) to its last record."""
    n = len(payloads)
    c.log(f"the embed worker on {n} queued images")
    env = {"KOALA_CHECKPOINT": str(checkpoint), "KOALA_BATCH_SIZE": str(batch_size)}
    run = c.embed_worker_round(server, payloads, out, env, max(300.0, 5.0 * n), 0.05)
    first, batch, done = c.first(run["samples"], 1), c.first(run["samples"], batch_size), run["samples"][-1]
    images, seconds, cpu = n - batch[1], done[0] - batch[0], done[2] - batch[2]
    return {
        "images": n,
        "start_to_first_record_s": round(first[0] - run["started"], 2),
        "steady_images": images,
        "img_s": round(images / seconds, 3) if images else None,
        "cpu_s_per_image": round(cpu / images, 3) if images else None,
        "cores_used": round(cpu / seconds, 2) if images else None,
        # this process polling, redis-server, and whatever else shares the machine
        "other_processes_cores": round(max(0.0, done[3] - batch[3] - cpu) / seconds, 2) if images else None,
        "exit_code": run["exit_code"],
        "peak_rss_mb": round(run["peak_kb"] / 1024),
        **{k: run[k] for k in ("records", "distinct", "shards", "temp_shards")},
    }


STEPS = {  # name: what it is; the main thread's steps add up to the process time, with "other"
    "state lookup": "JobState.states: one pipelined HGET per item",
    "decode_pixels": "lossless payload -> uint8 array",
    "model": "Embedder.embed (preprocessing + Inception)",
    "lab wait": "waiting for the Lab threads after the model returned",
    "serialize": "records.serialize_example",
    "append+fsync": "ShardWriter.append (framing, write, fsync)",
    "claim": "JobState.mark_written_many (Lua per item, one pipeline)",
    "rotate": "ShardWriter.maybe_rotate",
    "other": "np.stack, dedupe, bookkeeping",
    "receive+ack": "BatchConsumer: receive, decode the message, ack (no-op process)",
}


def stage_steps(embedder, server, payloads: list[dict], batch_size: int, out: Path) -> dict:
    """EmbedStage.process on the batches with its parts timed, in this process: ms per image."""
    from common.output import records
    from common.output.shards import ShardWriter
    from common.pictures import lab
    from common.settings import Settings
    from common.stages import Model
    from common.state.job import JobState
    from workers import embed as worker

    c.register_downloaded(server.client(), payloads, "benchsteps")
    state = JobState(server.client(), "benchsteps")
    writer = ShardWriter(out, "steps@bench", examples_per_shard=500)
    times: defaultdict[str, list[float]] = defaultdict(list)  # durations per step (thread-safe appends)
    total = lambda name: sum(times.get(name, []))  # noqa: E731

    def timed(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - start)

        return run

    model = Model(timed("model", embedder.embed), None, embedder.device, batch_size)
    stage = worker.EmbedStage(
        Settings(broker_url=server.url, output_dir=str(out)), state, "steps@bench", model, writer
    )
    stage.infer = timed("infer", stage.infer)  # model + lab wait
    stage.process(payloads[:batch_size])  # warm-up: threads, first fsync (a batch of its own items)
    times.clear()
    wrapped = [
        (worker, "decode_pixels", "decode_pixels"),
        (lab, "lab_channels", "lab (threads)"),
        (records, "serialize_example", "serialize"),
        (state, "states", "state lookup"),
        (state, "mark_written_many", "claim"),
        (writer, "append", "append+fsync"),
        (writer, "maybe_rotate", "rotate"),
    ]
    with contextlib.ExitStack() as patches:
        for obj, attr, name in wrapped:
            patches.enter_context(mock.patch.object(obj, attr, timed(name, getattr(obj, attr))))
        for i in range(batch_size, len(payloads), batch_size):
            timed("process", stage.process)(payloads[i : i + batch_size])
    stage.close()
    seconds = {name: total(name) for _, _, name in wrapped if name != "lab (threads)"}
    seconds |= {"model": total("model"), "lab wait": total("infer") - total("model")}
    seconds["other"] = total("process") - sum(seconds.values())
    # the queue side alone: a message per batch, the real BatchConsumer draining them, steps doing nothing
    server.client().flushall()  # what the stopped worker may have given back to the queue
    c.fill_embed_queue(server.url, payloads, batch_size)
    seen = c.drain(server.url, len(payloads), batch_size, 120)
    n = len(payloads) - batch_size
    ms = {name: 1000 * s / n for name, s in seconds.items()}
    # from the first batch to the last: every message but the first (no connection set-up)
    ms["receive+ack"] = 1000 * (seen[-1][0] - seen[0][0]) / sum(k for _, k in seen[1:])
    return {"ms_per_image": ms, "lab_threads_ms_per_image": round(1000 * total("lab (threads)") / n, 2)}


def run(n: int, batch_size: int, smoke: bool) -> dict:
    checkpoint, rgb = c.ensure_checkpoint(), c.make_images(n)
    payloads = c.payloads_of(rgb)
    result: dict = {"bench": "embed", "smoke": smoke, "images": n, "batch_size": batch_size}
    with c.redis_server("embed") as server, ThreadPoolExecutor(1) as pool:
        tmp = server.directory.parent
        start_worker = lambda: pool.submit(worker_run, server, payloads, tmp / "out", batch_size, checkpoint)  # noqa: E731
        worker = start_worker() if smoke else None  # smoke: the worker loads its model while this one does
        from common.model.embedder import Embedder

        embedder = Embedder(checkpoint, batch_size=batch_size)
        result["device"] = embedder.device
        c.log("bare model")
        bare = [bare_embed(embedder, rgb, batch_size)]
        c.log("waiting for the worker")
        result["worker"] = w = (worker or start_worker()).result()
        c.log("steps inside EmbedStage.process")
        steps = stage_steps(embedder, server, payloads, batch_size, tmp / "steps")
        if not smoke:
            c.log("bare model again")
            bare.append(bare_embed(embedder, rgb, batch_size))
    bare_img_s = sum(b["img_s"] for b in bare) / len(bare)
    bare_cpu = sum(b["cpu_s_per_image"] for b in bare) / len(bare)
    result["bare"] = {"img_s": round(bare_img_s, 3), "cpu_s_per_image": round(bare_cpu, 3), "runs": bare}
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    w["ratio_vs_bare"] = ratio(w["img_s"], bare_img_s)
    w["cpu_ratio_vs_bare"] = ratio(bare_cpu, w["cpu_s_per_image"])
    w["target_met"] = bool(w["ratio_vs_bare"] and w["ratio_vs_bare"] >= TARGET_RATIO)
    per_image = steps["ms_per_image"]
    steps["share"] = {k: round(v / sum(per_image.values()), 4) for k, v in per_image.items()}
    steps["ms_per_image"] = {k: round(v, 2) for k, v in per_image.items()}
    result["steps"] = steps
    return result


def markdown(result: dict) -> str:
    """The tables of an embed result."""
    bare, w, s = result["bare"], result["worker"], result["steps"]
    runs = ", ".join(
        f"{r['img_s']} on {r['cores_used']} cores, others {r['other_processes_cores']}" for r in bare["runs"]
    )
    met = f"**{w['ratio_vs_bare']}** (target ≥ {TARGET_RATIO}: {'met' if w['target_met'] else 'NOT met'})"
    steady = f"{w['steady_images']} images after the first batch, on {w['cores_used']} cores"
    steady += f", others {w['other_processes_cores']}"
    t1 = [
        [f"bare `Embedder.embed` (runs: {runs})", bare["img_s"], "1.00 (reference)"],
        [f"embed worker, steady ({steady})", w["img_s"], met],
        [f"CPU-seconds per image: bare {bare['cpu_s_per_image']}, worker {w['cpu_s_per_image']}", "-"]
        + [f"**{w['cpu_ratio_vs_bare']}** (bare/worker)"],
    ]
    t2 = [
        ["start → first record (model load + first batch)", f"{w['start_to_first_record_s']} s"],
        ["records in finalized shards / distinct / shards / temp left"]
        + [f"{w['records']} / {w['distinct']} / {w['shards']} / {w['temp_shards']}"],
        ["peak RSS (VmHWM)", f"{w['peak_rss_mb']} MB"],
        ["exit code after SIGTERM", w["exit_code"]],
    ]
    t3 = [
        [name, s["ms_per_image"][name], f"{100 * s['share'][name]:.1f} %", what]
        for name, what in STEPS.items()
    ]
    lab = s["lab_threads_ms_per_image"]
    t3.append(["(lab in threads)", lab, "overlaps the model", "lab_channels in the stage's pool"])
    smoke = ", SMOKE" if result["smoke"] else ""
    head = f"### Embed ({result['images']} images, batch {result['batch_size']}, {result['device']}"
    head += f", generated weights{smoke})"
    tables = [c.md_table(["measurement", "images/s", "ratio"], t1), c.md_table(["worker", "value"], t2)]
    steps = c.md_table(["step", "ms/image", "share", "what"], t3)
    return "\n\n".join([head, *tables, "Share of time per step inside the worker (in-process):", steps])


def null_ceiling(n: int, batch_size: int, rounds: int) -> tuple[dict, str]:
    """The ceiling of the worker's own path on each output folder, rounds alternating, medians."""
    folders = {"local disk": c.RESULTS / "tmp", "tmpfs": Path("/dev/shm")}
    labs = {"Lab on this CPU": {}, "Lab off the CPU": {"KOALA_NULL_LAB": "1"}}
    variants = {
        f"{w}, {lab}": (f / "null-bench", env) for w, f in folders.items() for lab, env in labs.items()
    }
    load_before = c.load()
    runs = c.null_rounds("null", n, batch_size, rounds, variants, 1024 if n >= 1000 else 64)
    keys = ("images_per_s", "cpu_ms_per_image", "records_mb_per_s", "disk_mb_per_s", "records_vs_disk")
    outputs = {
        name: {
            "folder": str(variants[name][0].parent),
            "median": c.medians(rs, (*keys, "machine_busy_cores")),
            "runs": rs,
            "every_image_once": all(x["records"] == x["distinct"] == n and x["temp_shards"] == 0 for x in rs),
        }
        for name, rs in runs.items()
    }
    result = {"images": n, "batch_size": batch_size, "rounds": rounds, "load_average_before": load_before}
    result |= {"outputs": outputs, "load_average_after": c.load()}
    rows = [
        [name, o["folder"], *(o["median"][k] for k in (*keys, "machine_busy_cores"))]
        + ["yes" if o["every_image_once"] else "**NO**"]
        for name, o in outputs.items()
    ]
    head = f"### Embed worker ceiling (null model: {n} images, batch {batch_size}, medians of {rounds} rounds"
    head += f"; load before {', '.join(map(str, load_before))})"
    cols = "output|folder|images/s|worker CPU-ms/image|records MB/s|disk MB/s (fdatasync)|records / disk"
    cols += "|machine busy cores|each image once"
    return result, head + "\n\n" + c.md_table(cols.split("|"), rows)


@click.command()
@click.option("--images", "n", type=int, help="images (default 96, null model 3000; smoke 4, 64)")
@click.option("--batch-size", type=int, help="per model call (default 16, null model 128; smoke 2, 16)")
@click.option("--null-model", is_flag=True, help="the worker's ceiling: a forward pass that returns zeros")
@click.option("--rounds", type=int, default=3, show_default=True, help="null model: rounds per output")
@c.options
def main(
    n: int | None, batch_size: int | None, null_model: bool, rounds: int, json_path: Path | None, smoke: bool
):
    """Bare model vs embed worker, and the share of each step; or the worker's ceiling (--null-model)."""
    if null_model:
        n, batch_size = n or (64 if smoke else 3000), batch_size or (16 if smoke else 128)
        result, text = null_ceiling(n, batch_size, 1 if smoke else rounds)
        return c.finish("embed-null", result, json_path, smoke, text)
    batch_size = batch_size or (2 if smoke else 16)
    n = n or (2 * batch_size if smoke else 96)
    if n < 2 * batch_size:
        raise click.BadParameter("at least two batches of images", param_hint="--images")
    result = run(n, batch_size, smoke)
    c.finish("embed", result, json_path, smoke, markdown(result))


if __name__ == "__main__":
    main()
