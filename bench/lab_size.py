"""What KOALA_LAB_SIZE=224 costs the embed worker's CPU over 299 (the 224 path resizes as the original
record writer does: bilinear taps, the float sRGB power curve; on fewer pixels).

Run: .venv/bin/python -m bench.lab_size [--images 600] [--rounds 3] [--reps 9] [--smoke]

Two measures, each interleaving the sizes so that both see the same load: (1) the Lab channels alone,
process CPU-ms per image of each path as the worker runs it: numpy `lab_channels` one image at a time
(its thread pool), and the TensorFlow Lab of a batch (`lab_tf_padded`, XLA; what the model's function
adds on a CPU-only machine; on a GPU it runs on the device); (2) a real embed worker with the stand-in
forward pass (`bench.embed`'s ceiling round: the queue pre-filled, first record to last), worker
CPU-ms per image, numpy and TF Lab. Reported: medians, and the difference 224 − 299 paired by
repetition (median and range).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import click

from bench.device import _seconds
from bench.embed import default_json, log, make_images, md_table, null_round, payloads_of, quiet_tensorflow

NAME = "lab_size"
SIZES = (299, 224)
PATHS = {"numpy Lab": {"KOALA_LAB_ON_DEVICE": "0"}, "TF Lab": {"KOALA_LAB_ON_DEVICE": "1"}}


def lab_alone(batch: int, reps: int) -> dict[str, list[float]]:
    """CPU-ms per image of each (path, size) over `reps` interleaved repetitions."""
    import tensorflow as tf

    from common.pictures.lab import lab_channels
    from common.pictures.lab_tf import lab_tf_padded

    images = make_images(batch)
    tensor = tf.constant(images)
    calls = {
        **{f"numpy Lab {s}": (lambda s=s: [lab_channels(i, s) for i in images]) for s in SIZES},
        **{f"TF Lab {s}": (lambda s=s: [t.numpy() for t in lab_tf_padded(tensor, batch, s)]) for s in SIZES},
    }
    for call in calls.values():
        call()  # warm-up: compiling, work arrays
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(1000 * _seconds(call)[1] / batch)
    return times


def summary(times: dict[str, list[float]]) -> dict:
    """Medians, and 224 − 299 paired by repetition, per path."""
    out: dict = {"median": {k: round(statistics.median(v), 3) for k, v in times.items()}}
    for path in PATHS:
        diffs = sorted(a - b for a, b in zip(times[f"{path} 224"], times[f"{path} 299"], strict=True))
        out[f"{path}: 224 - 299"] = {
            "median": round(statistics.median(diffs), 3),
            "range": [round(diffs[0], 3), round(diffs[-1], 3)],
        }
    return out


def worker(n: int, batch: int, rounds: int) -> dict[str, list[float]]:
    """Embed worker CPU-ms per image (null model) of each (path, size), rounds interleaved."""
    from testkit.servers import RedisServer

    payloads = payloads_of(make_images(n))
    times: dict[str, list[float]] = {f"{p} {s}": [] for p in PATHS for s in SIZES}
    with tempfile.TemporaryDirectory(prefix="koala-bench-labsize-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            for r in range(rounds):
                for name in times:
                    path, size = name.rsplit(" ", 1)
                    extra = {**PATHS[path], "KOALA_LAB_SIZE": size}
                    run = null_round(
                        server, payloads, Path(tmp) / "out", batch, Path(tmp) / "w.log", extra, 64
                    )
                    times[name].append(run["cpu_ms_per_image"])
                    log(f"round {r + 1}/{rounds} {name}: {run['cpu_ms_per_image']} CPU-ms/image")
        finally:
            server.stop()
    return times


def markdown(result: dict) -> str:
    rows = []
    for what in ("lab_alone", "worker"):
        s = result[what]
        rows += [
            [what.replace("_", " "), path]
            + [s["median"][f"{path} {size}"] for size in SIZES]
            + [s[f"{path}: 224 - 299"]["median"], s[f"{path}: 224 - 299"]["range"]]
            for path in PATHS
        ]
    head = (
        f"### KOALA_LAB_SIZE=224 vs 299: CPU-ms per image (Lab alone: batch {result['batch']}, "
        f"{result['reps']} reps; worker: {result['images']} images, {result['rounds']} rounds; load "
        f"{result['load_before']} before, {result['load_after']} after)"
    )
    table = md_table(["measure", "path", "299", "224", "224 − 299 (median)", "range"], rows)
    return head + "\n\n" + table


@click.command()
@click.option("--images", type=int, default=600, show_default=True, help="images per worker round")
@click.option("--rounds", type=int, default=3, show_default=True, help="worker rounds per variant")
@click.option("--batch", type=int, default=32, show_default=True, help="images per call / worker batch")
@click.option("--reps", type=int, default=9, show_default=True, help="repetitions of the Lab-alone calls")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="tiny: checks the path works")
def main(images: int, rounds: int, batch: int, reps: int, json_path: Path | None, smoke: bool) -> None:
    """CPU cost of KOALA_LAB_SIZE=224 over 299, Lab alone and in an embed worker."""
    quiet_tensorflow()
    if smoke:
        images, rounds, batch, reps = 32, 1, 8, 1
    result: dict = {"bench": NAME, "images": images, "rounds": rounds, "batch": batch, "reps": reps}
    result["load_before"] = [round(v, 2) for v in os.getloadavg()]
    result["lab_alone"] = summary(lab_alone(batch, reps))
    result["worker"] = summary(worker(images, batch, rounds))
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    path = json_path or default_json(NAME, smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    path.with_suffix(".md").write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
