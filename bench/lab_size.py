"""What KOALA_LAB_SIZE=224 costs the embed worker's CPU over 299 (the 224 path resizes as the original
record writer does: bilinear taps, the float sRGB power curve; on fewer pixels).

Run: .venv/bin/python -m bench.lab_size [--images 600] [--rounds 3] [--reps 9] [--smoke]

Two measures, each interleaving the sizes so that both see the same load: (1) the Lab channels alone,
process CPU-ms per image of each path as the worker runs it: numpy `lab_channels` one image at a time
(its thread pool), and the TensorFlow Lab of a batch (`lab_tf_padded`, XLA; what the model's function
adds on a CPU-only machine; on a GPU it runs on the device); (2) a real embed worker with the stand-in
forward pass (the ceiling's round, `bench.common.null_round`: the queue pre-filled, first record to
last), worker CPU-ms per image, numpy and TF Lab. Reported: medians, and the difference 224 − 299
paired by repetition (median and range).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import click

from bench.common import finish, interleaved, make_images, md_table, null_rounds, paired, quiet_tensorflow

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
    return {name: [1000 * cpu / batch for _, cpu in ts] for name, ts in interleaved(calls, reps).items()}


def worker(n: int, batch: int, rounds: int) -> dict[str, list[float]]:
    """Embed worker CPU-ms per image (null model) of each (path, size), rounds interleaved."""
    with tempfile.TemporaryDirectory(prefix="koala-bench-labsize-") as tmp:
        variants = {
            f"{p} {s}": (Path(tmp) / "out", {**env, "KOALA_LAB_SIZE": str(s)})
            for p, env in PATHS.items()
            for s in SIZES
        }
        runs = null_rounds("labsize", n, batch, rounds, variants)
    return {name: [r["cpu_ms_per_image"] for r in rs] for name, rs in runs.items()}


def summary(times: dict[str, list[float]]) -> dict:
    """Medians, and 224 − 299 paired by repetition, per path."""
    out: dict = {"median": {k: round(statistics.median(v), 3) for k, v in times.items()}}
    for p in PATHS:
        out[f"{p}: 224 - 299"] = paired(times[f"{p} 224"], times[f"{p} 299"])
    return out


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
    result: dict = {"bench": "lab_size", "images": images, "rounds": rounds, "batch": batch, "reps": reps}
    result["load_before"] = [round(v, 2) for v in os.getloadavg()]
    result["lab_alone"] = summary(lab_alone(batch, reps))
    result["worker"] = summary(worker(images, batch, rounds))
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    rows = [
        [what.replace("_", " "), p, *(result[what]["median"][f"{p} {s}"] for s in SIZES)]
        + [result[what][f"{p}: 224 - 299"]["median"], result[what][f"{p}: 224 - 299"]["range"]]
        for what in ("lab_alone", "worker")
        for p in PATHS
    ]
    head = (
        f"### KOALA_LAB_SIZE=224 vs 299: CPU-ms per image (Lab alone: batch {batch}, {reps} reps; "
        f"worker: {images} images, {rounds} rounds; load {result['load_before']} before, "
        f"{result['load_after']} after)"
    )
    table = md_table(["measure", "path", "299", "224", "224 − 299 (median)", "range"], rows)
    finish("lab_size", result, json_path, smoke, head + "\n\n" + table)


if __name__ == "__main__":
    main()
