"""Embed options on this device: batch size, mixed precision, XLA (without a GPU: float32, no XLA, the
first batch size); the share of the peak (the best rate of large matrix products in the same run) the
model's FLOPs (TensorFlow's profiler) reach; and where the Lab channels are cheaper (the model alone, beside
numpy Lab in a pool of up to 4 threads, with TF Lab inside it, each Lab alone; repetitions interleaved).

Run: .venv/bin/python -m bench.device [--batches 16,64,128] [--lab-only] [--lab-reps 5] [--smoke]
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from bench import common as c


def model_gflops_per_image() -> float:
    """Float operations of one image through the model, counted on its graph by TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    from common.model.inception_resnet_v2 import IMAGE_SIZE, build_model

    model = build_model()
    spec = tf.TensorSpec([1, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    builder = option_builder.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    return model_analyzer.profile(graph, options=opts).total_float_ops / 1e9


def matmul_tflops(dtype: str, n: int, seconds: float) -> float:
    """Best TFLOP/s of n x n matrix products in `dtype` over about `seconds`."""
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    product = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32)))
    product(a, b).numpy()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        product(a, b).numpy()  # .numpy() waits for the device
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def embed_rate(checkpoint: Path, rgb: np.ndarray, batch: int, mixed: bool, xla: bool) -> dict:
    """images/s of Embedder.embed with these options (after a warm-up call that compiles)."""
    from common.model.embedder import Embedder

    started = time.perf_counter()
    embedder = Embedder(checkpoint, batch_size=batch, mixed_precision=mixed, xla=xla)
    embedder.embed(rgb[:batch])
    ready, calls, start = time.perf_counter() - started, max(2, len(rgb) // batch), time.perf_counter()
    for i in range(calls):
        embedder.embed(rgb[(i * batch) % len(rgb) :][:batch])
    img_s = calls * batch / (time.perf_counter() - start)
    row = {"batch": batch, "mixed_precision": mixed, "xla": xla, "images": calls * batch}
    return row | {"img_s": round(img_s, 2), "load_and_compile_s": round(ready, 1), "device": embedder.device}


def lab_comparison(checkpoint: Path, rgb: np.ndarray, batch: int, reps: int) -> dict:
    """Extra time per image that the Lab channels add to a model call: numpy in a thread pool beside it,
    or TensorFlow inside it (medians of `reps` interleaved repetitions, wall and CPU)."""
    from common.model.embedder import Embedder
    from common.pictures.lab import lab_channels
    from common.pictures.lab_tf import lab_tf_compiled

    embedder = Embedder(checkpoint, batch_size=batch)
    images = rgb[:batch]
    pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))  # as the embed worker's Lab pool

    def model_and_numpy_lab() -> None:
        labs = [pool.submit(lab_channels, image) for image in images]
        embedder.embed(images)
        for job in labs:
            job.result()

    calls = {
        "model": lambda: embedder.embed(images),
        "model_numpy_lab": model_and_numpy_lab,
        "model_tf_lab": lambda: embedder.embed_lab(images),
        "numpy_lab_alone": lambda: [lab_channels(image) for image in images],
        "tf_lab_alone": lambda: [t.numpy() for t in lab_tf_compiled()(images)],
    }
    times = c.interleaved(calls, reps)
    pool.shutdown()
    ms: dict = {}  # per image, medians; the extras paired with the model-alone call of the same repetition
    for i, kind in enumerate(("wall", "cpu")):
        per_image = {name: [1000 * t[i] / batch for t in ts] for name, ts in times.items()}
        ms[kind] = {name: round(statistics.median(v), 2) for name, v in per_image.items()}
        for path in ("numpy", "tf"):
            extra = c.paired(per_image[f"model_{path}_lab"], per_image["model"], 2)
            ms[kind] |= {f"{path}_extra": extra["median"], f"{path}_extra_range": extra["range"]}
    # the Lab's few ms per image are often below the model call's variation on a shared machine (see the
    # ranges): the CPU work of each Lab path alone, measured in the same run, decides
    result = {"batch": batch, "reps": reps, "device": embedder.device, "ms_per_image": ms}
    result["tf_cheaper"] = ms["cpu"]["tf_lab_alone"] < ms["cpu"]["numpy_lab_alone"]
    return result | {"load_average": c.load()}


def run(batches: list[int], smoke: bool, images: int, lab_reps: int) -> dict:
    """Measure the grid, the model's FLOPs, the device's matmul peak and the Lab comparison."""
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    matmul_n, peak_seconds = 8192 if on_gpu else (512 if smoke else 2048), 1.0 if smoke else 5.0
    checkpoint = c.ensure_checkpoint()
    rgb = c.make_images(max(images, max(batches)))
    gflops = model_gflops_per_image()
    c.log(f"model: {gflops:.2f} GFLOPs per image; measuring the matmul peak")
    peak = {"float32": round(matmul_tflops("float32", matmul_n, peak_seconds), 3)}
    # (batch, mixed precision, XLA): every combination on a GPU (a CPU only emulates float16)
    combos = [(batches[0], False, False)]
    if on_gpu and not smoke:
        combos = list(itertools.product(batches, (False, True), (False, True)))
        peak["float16"] = round(matmul_tflops("float16", matmul_n, peak_seconds), 3)
    rows = []
    for batch, mixed, xla in combos:
        c.log(f"batch {batch}, mixed precision {mixed}, XLA {xla}")
        row = embed_rate(checkpoint, rgb, batch, mixed, xla)
        row["model_tflops"] = round(row["img_s"] * gflops / 1000, 3)
        row["share_of_peak"] = round(row["model_tflops"] / peak["float16" if mixed else "float32"], 3)
        rows.append(row)
    c.log(f"Lab: numpy beside the model vs TF inside it, batch {batches[0]}, {lab_reps} repetitions")
    return {
        "bench": "device",
        "device": "GPU" if on_gpu else "CPU",
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "model_gflops_per_image": round(gflops, 2),
        "matmul_n": matmul_n,
        "peak_tflops": peak,
        "rows": rows,
        "best": max(rows, key=lambda r: r["img_s"]),
        "lab": lab_comparison(checkpoint, rgb, batches[0], lab_reps),
    }


@click.command()
@click.option("--batches", default="16,64,128", show_default=True, help="batch sizes (off GPU: the first)")
@click.option("--images", type=int, default=256, show_default=True, help="images per measurement")
@click.option("--lab-reps", type=int, default=5, show_default=True, help="repetitions of the Lab comparison")
@click.option("--lab-only", is_flag=True, help="only the Lab comparison (at the first batch size)")
@c.options
def main(batches: str, images: int, lab_reps: int, lab_only: bool, json_path: Path | None, smoke: bool):
    """Embed images/s per option on this device, the share of the measured peak, and the Lab comparison."""
    sizes = [int(b) for b in batches.split(",") if b.strip()]
    if smoke:
        sizes, images, lab_reps = [2], 4, 1
    if lab_only:
        lab = lab_comparison(c.ensure_checkpoint(), c.make_images(sizes[0]), sizes[0], lab_reps)
        return c.finish("device_lab", lab, json_path, smoke)
    c.finish("device", run(sizes, smoke, images, lab_reps) | {"smoke": smoke}, json_path, smoke)


if __name__ == "__main__":
    main()
