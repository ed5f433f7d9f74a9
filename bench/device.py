"""Embed options on this machine's device: batch size, mixed precision, XLA; and the share of the
device's peak that the model's FLOPs reach.

Run: .venv/bin/python -m bench.device [--batches 16,64,128] [--json bench/results/device.json] [--smoke]

The peak is not a data-sheet figure: it is the best rate of large matrix products measured in the
same run (float32, and float16 for the mixed-precision rows), so the fraction is a ratio of two
numbers measured side by side. FLOPs per image come from TensorFlow's profiler on the model's graph
(2 per multiply-add). Without a GPU the default grid is float32 without XLA at batch 16 (mixed
precision on a CPU only emulates float16); `--grid full` runs every combination anywhere.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import click
import numpy as np

from bench.embed import CACHE, default_json, ensure_checkpoint, log, make_images, md_table, quiet_tensorflow

NAME = "device"


def model_gflops_per_image() -> float:
    """Float operations of one image through the model, counted on its graph by TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    from common.model import IMAGE_SIZE, build_model

    model = build_model()
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)).graph
    options = (option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
               .with_empty_output().build())
    return model_analyzer.profile(graph, options=options).total_float_ops / 1e9


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
    from common.model import Embedder

    started = time.perf_counter()
    embedder = Embedder(checkpoint, batch_size=batch, mixed_precision=mixed, xla=xla)
    embedder.embed(rgb[:batch])
    ready = time.perf_counter() - started
    calls = max(2, len(rgb) // batch)
    start = time.perf_counter()
    for i in range(calls):
        embedder.embed(rgb[(i * batch) % len(rgb):][:batch])
    seconds = time.perf_counter() - start
    return {"batch": batch, "mixed_precision": mixed, "xla": xla, "images": calls * batch,
            "img_s": round(calls * batch / seconds, 2), "load_and_compile_s": round(ready, 1),
            "device": embedder.device}


def grid(kind: str, on_gpu: bool, batches: list[int]) -> list[tuple[int, bool, bool]]:
    """(batch, mixed precision, XLA) combinations to measure."""
    if kind == "full" or (kind == "auto" and on_gpu):
        return list(itertools.product(batches, (False, True), (False, True)))
    return [(batches[0], False, False)]


def run(batches: list[int], kind: str, images: int, matmul_n: int, peak_seconds: float, cache: Path) -> dict:
    """Measure the grid, the model's FLOPs and the device's matmul peak."""
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    checkpoint = ensure_checkpoint(cache)
    rgb = make_images(max(images, max(batches)))
    gflops = model_gflops_per_image()
    log(f"model: {gflops:.2f} GFLOPs per image; measuring the matmul peak")
    peak = {"float32": round(matmul_tflops("float32", matmul_n, peak_seconds), 3)}
    combos = grid(kind, on_gpu, batches)
    if any(mixed for _, mixed, _ in combos):
        peak["float16"] = round(matmul_tflops("float16", matmul_n, peak_seconds), 3)
    rows = []
    for batch, mixed, xla in combos:
        log(f"batch {batch}, mixed precision {mixed}, XLA {xla}")
        row = embed_rate(checkpoint, rgb, batch, mixed, xla)
        row["model_tflops"] = round(row["img_s"] * gflops / 1000, 3)
        row["share_of_peak"] = round(row["model_tflops"] / peak["float16" if mixed else "float32"], 3)
        rows.append(row)
    return {"bench": NAME, "device": "GPU" if on_gpu else "CPU",
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "model_gflops_per_image": round(gflops, 2), "matmul_n": matmul_n, "peak_tflops": peak,
            "rows": rows, "best": max(rows, key=lambda r: r["img_s"])}


def markdown(result: dict) -> str:
    """The table of a device result."""
    peak = ", ".join(f"{k} {v} TFLOP/s" for k, v in result["peak_tflops"].items())
    head = (f"### Embed options on the {result['device']} — model {result['model_gflops_per_image']} GFLOPs "
            f"per image; measured matmul peak ({result['matmul_n']}²): {peak}")
    rows = [[r["batch"], "yes" if r["mixed_precision"] else "no", "yes" if r["xla"] else "no", r["img_s"],
             r["model_tflops"], f"{100 * r['share_of_peak']:.1f} %", r["load_and_compile_s"]]
            for r in result["rows"]]
    table = md_table(["batch", "mixed precision", "XLA", "images/s", "model TFLOP/s", "share of peak",
                      "load + compile s"], rows)
    best = result["best"]
    last = (f"Best: {best['img_s']} images/s (batch {best['batch']}, mixed precision "
            f"{best['mixed_precision']}, XLA {best['xla']}).")
    return "\n\n".join([head, table, last])


@click.command()
@click.option("--batches", default="16,64,128", show_default=True,
              help="batch sizes (the first alone off GPU)")
@click.option("--grid", "kind", type=click.Choice(["auto", "full", "single"]), default="auto",
              show_default=True, help="auto: every combination on a GPU, else the first batch in float32")
@click.option("--images", type=int, default=256, show_default=True, help="images per measurement")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="batch 2, 4 images, a small matmul: checks the path works")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=CACHE,
              help="where the generated checkpoint is kept")
def main(batches: str, kind: str, images: int, json_path: Path | None, smoke: bool, cache: Path) -> None:
    """Embed images/s per option on this device, and the share of the measured peak."""
    quiet_tensorflow()
    sizes = [int(b) for b in batches.split(",") if b.strip()]
    if smoke:
        sizes, images, kind = [2], 4, "single"
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    matmul_n = 8192 if on_gpu else (512 if smoke else 2048)
    result = run(sizes, kind, images, matmul_n, 1.0 if smoke else 5.0, cache)
    result["smoke"] = smoke
    path = json_path or default_json(NAME, smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    path.with_suffix(".md").write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
