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

The checkpoint is generated (bench.common.ensure_checkpoint). Ratios, not absolute times, are what to
compare.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import click
import numpy as np

from bench.common import (
    RESULTS,
    drain,
    embed_worker_round,
    ensure_checkpoint,
    fill_embed_queue,
    finish,
    log,
    machine_cpu_s,
    make_images,
    md_table,
    medians,
    null_rounds,
    payloads_of,
    quiet_tensorflow,
    redis_server,
    register_downloaded,
)

TARGET_RATIO = 0.95  # issue 9: the worker at least 0.95 x the bare model


# ---- 1. bare model ------------------------------------------------------------------------------


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def bare_embed(embedder, rgb: np.ndarray, batch_size: int) -> dict:
    """Embedder.embed in a loop, one call per batch (after one warm-up call)."""
    parts = batches(rgb, batch_size)
    embedder.embed(parts[0])
    start, cpu, busy = time.perf_counter(), time.process_time(), machine_cpu_s()[0]
    for b in parts:
        embedder.embed(b)
    seconds, cpu, busy = time.perf_counter() - start, time.process_time() - cpu, machine_cpu_s()[0] - busy
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


def worker_run(server, payloads: list[dict], out: Path, batch_size: int, checkpoint: Path) -> dict:
    """The worker from its start to its last record (steady: from the first batch, model load and
    tracing done), and to its shard finalized after SIGTERM."""
    n = len(payloads)
    log(f"the embed worker on {n} queued images")
    env = {"KOALA_CHECKPOINT": str(checkpoint), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = embed_worker_round(server, payloads, out, batch_size, env, max(300.0, 5.0 * n), 0.05)
    first, batch, done = run.pop("marks")
    steady_images, steady_s, cpu = n - batch[1], done[0] - batch[0], done[2] - batch[2]
    whole = run["finalized"] - first[0]
    return {
        "images": n,
        "start_to_first_record_s": round(first[0] - run["started"], 2),
        "steady_images": steady_images,
        "steady_s": round(steady_s, 2),
        "img_s": round(steady_images / steady_s, 3) if steady_images else None,
        "cpu_s_per_image": round(cpu / steady_images, 3) if steady_images else None,
        "cores_used": round(cpu / steady_s, 2) if steady_s else None,
        # everything else: this process polling, redis-server, and whatever else shares the machine
        "other_processes_cores": round(max(0.0, done[3] - batch[3] - cpu) / steady_s, 2)
        if steady_s
        else None,
        "first_record_to_finalized_s": round(whole, 2),
        "img_s_first_record_to_finalized": round((n - min(n, batch_size)) / whole, 3)
        if n > batch_size
        else None,
        "exit_code": run["exit_code"],
        "peak_rss_mb": round(run["peak_kb"] / 1024),
        **{k: run[k] for k in ("records", "distinct", "shards", "temp_shards")},
    }


# ---- 3. where the time goes ---------------------------------------------------------------------


STEPS = [  # (name, what it is); main-thread steps add up to the process time, with "other"
    ("state lookup", "JobState.states: one pipelined HGET per item"),
    ("decode_pixels", "lossless payload -> uint8 array"),
    ("model", "Embedder.embed (preprocessing + Inception)"),
    ("lab wait", "waiting for the Lab threads after the model returned"),
    ("serialize", "records.serialize_example"),
    ("append+fsync", "ShardWriter.append (framing, write, fsync)"),
    ("claim", "JobState.mark_written_many (Lua per item, one pipeline)"),
    ("rotate", "ShardWriter.maybe_rotate"),
    ("other", "np.stack, dedupe, bookkeeping"),
    ("receive+ack", "BatchConsumer: receive, decode the message, ack (no-op process)"),
]


def stage_steps(embedder, redis_url: str, client, payloads: list[dict], batch_size: int, out: Path) -> dict:
    """EmbedStage.process on the batches with its parts timed, in this process: ms per image."""
    from common.output import records
    from common.output.shards import ShardWriter
    from common.pictures import images, lab
    from common.settings import Settings
    from common.stages import Model
    from common.state.job import JobState
    from workers.embed import EmbedStage

    register_downloaded(client, payloads, "benchsteps")
    state = JobState(client, "benchsteps")
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
    stage = EmbedStage(
        Settings(broker_url=redis_url, output_dir=str(out)), state, "steps@bench", model, writer
    )
    stage.infer = timed("infer", stage.infer)  # model + lab wait
    stage.process(payloads[:batch_size])  # warm-up: threads, first fsync (a batch of its own items)
    times.clear()
    wrapped = [
        (images, "decode_pixels", "decode_pixels"),
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
        written = sum(
            timed("process", stage.process)(payloads[i : i + batch_size])
            for i in range(batch_size, len(payloads), batch_size)
        )
    stage.close()
    seconds = {name: total(name) for _, _, name in wrapped if name != "lab (threads)"}
    seconds["model"] = total("model")
    seconds["lab wait"] = total("infer") - total("model")
    seconds["other"] = total("process") - sum(seconds.values())
    n = len(payloads) - batch_size
    return {
        "images": n,
        "written": written,
        "ms_per_image": {name: 1000 * s / n for name, s in seconds.items()},
        "lab_threads_ms_per_image": round(1000 * total("lab (threads)") / n, 2),
    }


def receive_ms_per_image(server, payloads: list[dict], batch_size: int) -> float:
    """The worker's queue side alone: the real BatchConsumer draining the messages, steps doing nothing."""
    server.client().flushall()  # what the stopped worker may have given back to the queue
    # a message per batch: the smoke's 4 images make two batches too (one 16-image message made one)
    fill_embed_queue(server.url, payloads, batch_size)
    seen = drain(server.url, len(payloads), batch_size, 120)
    # from the first flush to the last: the messages of every batch but the first (no connection set-up)
    return 1000 * (seen[-1][0] - seen[0][0]) / sum(k for _, k in seen[1:])


# ---- the benchmark ------------------------------------------------------------------------------


def run(n: int, batch_size: int, smoke: bool) -> dict:
    quiet_tensorflow()
    checkpoint = ensure_checkpoint()
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
    with redis_server("embed") as server, ThreadPoolExecutor(1) as pool:
        tmp = server.directory.parent
        start_worker = lambda: pool.submit(worker_run, server, payloads, tmp / "out", batch_size, checkpoint)  # noqa: E731
        worker = (
            start_worker() if smoke else None
        )  # smoke: the worker loads its model while this process does
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
        plain = None if smoke else plain_model(embedder, rgb, batch_size)  # smoke: one trace less
        log("waiting for the worker")
        result["worker"] = (worker or start_worker()).result()
        log("steps inside EmbedStage.process")
        steps = stage_steps(embedder, server.url, server.client(), payloads, batch_size, tmp / "steps")
        steps["ms_per_image"]["receive+ack"] = receive_ms_per_image(server, payloads, batch_size)
        if not smoke:
            log("bare model again")
            bare.append(bare_embed(embedder, rgb, batch_size))
    return summarize(result, bare, plain, steps)


def summarize(result: dict, bare: list[dict], plain: dict | None, steps: dict) -> dict:
    """Ratios against the bare model's mean rate, and the share of each step."""
    bare_img_s = sum(b["img_s"] for b in bare) / len(bare)
    bare_cpu = sum(b["cpu_s_per_image"] for b in bare) / len(bare)
    embed = {"img_s": round(bare_img_s, 3), "runs": bare, "cpu_s_per_image": round(bare_cpu, 3)}
    result["bare"] = {
        "embedder_embed": embed,
        "plain_model_call": plain or "skipped in the smoke run",
        "embed_vs_plain_ratio": round(bare_img_s / plain["img_s"], 3) if plain else None,
    }
    w = result["worker"]
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    w["ratio_vs_bare"] = ratio(w["img_s"], bare_img_s)
    w["ratio_first_record_to_finalized_vs_bare"] = ratio(w["img_s_first_record_to_finalized"], bare_img_s)
    w["cpu_ratio_vs_bare"] = ratio(bare_cpu, w["cpu_s_per_image"])
    w["ratio_vs_each_bare_run"] = [ratio(w["img_s"], b["img_s"]) for b in bare] if w["img_s"] else None
    w["target_ratio"] = TARGET_RATIO
    w["target_met"] = bool(w["ratio_vs_bare"] and w["ratio_vs_bare"] >= TARGET_RATIO)
    w["target_met_cpu"] = bool(w["cpu_ratio_vs_bare"] and w["cpu_ratio_vs_bare"] >= TARGET_RATIO)
    per_image = steps["ms_per_image"]
    total = sum(per_image.values())
    steps["share"] = {k: round(v / total, 4) for k, v in per_image.items()}
    steps["ms_per_image"] = {k: round(v, 2) for k, v in per_image.items()}
    steps["in_process_img_s"] = round(1000 / total, 3)
    steps["in_process_ratio_vs_bare"] = round(1000 / total / bare_img_s, 3)
    steps["model_in_stage_vs_bare_ratio"] = round(1000 / per_image["model"] / bare_img_s, 3)
    result["steps"] = steps
    gpu = result["device"] == "GPU"
    result["gpu"] = "measured above (TensorFlow saw a GPU)" if gpu else "not measured: no GPU on this machine"
    if result["smoke"]:
        result["note"] = "smoke: tiny sizes, the worker ran while this process measured: timings meaningless"
    return result


def markdown(result: dict) -> str:
    """The tables of an embed result."""
    bare, w, s = result["bare"]["embedder_embed"], result["worker"], result["steps"]
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    runs = ", ".join(
        f"{r['img_s']} on {r['cores_used']} cores, others {r['other_processes_cores']}" for r in bare["runs"]
    )
    plain = result["bare"]["embed_vs_plain_ratio"]
    plain_row = (
        [result["bare"]["plain_model_call"]["img_s"], f"{1 / plain:.2f}"]
        if plain
        else ["skipped (smoke)", "-"]
    )
    each = ", ".join(map(str, w["ratio_vs_each_bare_run"] or []))
    t1 = [
        [f"bare `Embedder.embed` (runs: {runs})", bare["img_s"], "1.00 (reference)"],
        ["plain `model(x)` in tf.function", *plain_row],
        [
            f"embed worker, steady ({w['steady_images']} images after the first batch, on {w['cores_used']} "
            f"cores, others {w['other_processes_cores']})",
            w["img_s"],
            f"**{w['ratio_vs_bare']}** (vs each bare run: {each}; target ≥ {TARGET_RATIO}: "
            f"{met(w['target_met'])})",
        ],
        ["embed worker, first record → shard finalized", w["img_s_first_record_to_finalized"]]
        + [w["ratio_first_record_to_finalized_vs_bare"]],
        [
            f"CPU-seconds per image: bare {bare['cpu_s_per_image']}, worker {w['cpu_s_per_image']} (less "
            "sensitive to other load)",
            "-",
            f"**{w['cpu_ratio_vs_bare']}** (bare/worker; target {met(w['target_met_cpu'])})",
        ],
        [
            "`EmbedStage.process` in-process + receive/ack",
            s["in_process_img_s"],
            s["in_process_ratio_vs_bare"],
        ],
    ]
    t2 = [
        ["start → first record (model load + first batch)", f"{w['start_to_first_record_s']} s"],
        ["records in finalized shards / distinct / shards / temp left"]
        + [f"{w['records']} / {w['distinct']} / {w['shards']} / {w['temp_shards']}"],
        ["peak RSS (VmHWM)", f"{w['peak_rss_mb']} MB"],
        ["exit code after SIGTERM", w["exit_code"]],
    ]
    t3 = [[name, s["ms_per_image"][name], f"{100 * s['share'][name]:.1f} %", what] for name, what in STEPS]
    lab_threads = "common.pictures.lab.lab_channels in the stage's thread pool"
    t3.append(["(lab in threads)", s["lab_threads_ms_per_image"], "overlaps the model", lab_threads])
    head = (
        f"### Embed ({result['images']} images, batch {result['batch_size']}, {result['device']}, "
        f"generated weights{', SMOKE' if result['smoke'] else ''})"
    )
    return "\n\n".join(
        [head, md_table(["measurement", "images/s", "ratio"], t1), md_table(["worker", "value"], t2)]
        + [
            "Share of time per step inside the worker (in-process):",
            md_table(["step", "ms/image", "share", "what"], t3),
        ]
        + [f"GPU: {result['gpu']}."]
    )


# ---- 4. the ceiling: the worker with a null model ------------------------------------------------


LAB_VARIANTS = {  # how the null-model worker computes Lab
    "Lab on this CPU": {},
    "Lab off the CPU": {"KOALA_NULL_LAB": "1"},  # zeros: what a GPU worker's CPU does
}
FOLDERS = {"local disk": RESULTS / "tmp", "tmpfs": Path("/dev/shm")}


def null_ceiling(n: int, batch_size: int, rounds: int) -> dict:
    """The ceiling of the worker's own path on each output folder, rounds alternating, medians."""
    variants = {
        f"{where}, {lab}": (folder / "null-bench", env)
        for where, folder in FOLDERS.items()
        for lab, env in LAB_VARIANTS.items()
    }
    load_before = os.getloadavg()
    runs = null_rounds("null", n, batch_size, rounds, variants, 1024 if n >= 1000 else 64)
    keys = ("images_per_s", "cpu_ms_per_image", "disk_mb_per_s", "records_mb_per_s", "records_vs_disk")
    outputs = {
        name: {
            "folder": str(variants[name][0].parent),
            "median": medians(rs, (*keys, "machine_busy_cores")),
            "runs": rs,
            "every_image_once": all(x["records"] == x["distinct"] == n and x["temp_shards"] == 0 for x in rs),
        }
        for name, rs in runs.items()
    }
    return {
        "bench": "embed-null-model",
        "images": n,
        "batch_size": batch_size,
        "rounds": rounds,
        "load_average_before": load_before,
        "outputs": outputs,
        "load_average_after": os.getloadavg(),
    }


def null_markdown(result: dict) -> str:
    keys = ("images_per_s", "cpu_ms_per_image", "records_mb_per_s", "disk_mb_per_s", "records_vs_disk")
    rows = [
        [name, o["folder"], *(o["median"][k] for k in (*keys, "machine_busy_cores"))]
        + ["yes" if o["every_image_once"] else "**NO**"]
        for name, o in result["outputs"].items()
    ]
    head = (
        f"### Embed worker ceiling (null model: {result['images']} images, batch {result['batch_size']}, "
        f"medians of {result['rounds']} rounds; load before "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_before'])})"
    )
    cols = "output|folder|images/s|worker CPU-ms/image|records MB/s|disk MB/s (fdatasync)|records / disk"
    return head + "\n\n" + md_table([*cols.split("|"), "machine busy cores", "each image once"], rows)


@click.command()
@click.option(
    "--images", "n", type=int, help="images per measurement (default 96, null model 3000; smoke 4, 64)"
)
@click.option(
    "--batch-size", type=int, help="images per model call (default 16, null model 128; smoke 2, 16)"
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--smoke", is_flag=True, help="a tiny run (seconds) that only checks the path works")
@click.option(
    "--null-model", is_flag=True, help="the worker's ceiling: a forward pass that returns zeros at once"
)
@click.option("--rounds", type=int, default=3, show_default=True, help="null model: rounds per output")
def main(
    n: int | None, batch_size: int | None, json_path: Path | None, smoke: bool, null_model: bool, rounds: int
) -> None:
    """Bare model vs embed worker, and the share of each step; or the worker's ceiling (--null-model)."""
    if null_model:
        result = null_ceiling(
            n or (64 if smoke else 3000), batch_size or (16 if smoke else 128), 1 if smoke else rounds
        )
        finish("embed-null", result, json_path, smoke, null_markdown(result))
        return
    batch_size = batch_size or (2 if smoke else 16)
    n = n or (2 * batch_size if smoke else 96)
    if n < 2 * batch_size:
        raise click.BadParameter("at least two batches of images", param_hint="--images")
    result = run(n, batch_size, smoke)
    finish("embed", result, json_path, smoke, markdown(result))


if __name__ == "__main__":
    main()
