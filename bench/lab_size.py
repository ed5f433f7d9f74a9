"""What KOALA_LAB_SIZE=224 costs the embed worker's CPU over 299, both sizes interleaved (the same load):
the Lab channels alone (numpy `lab_channels`, TF `lab_tf_padded` of a batch) and a real null-model embed
worker (`bench.common.null_round`), CPU-ms per image; medians, and 224 − 299 paired by repetition.

Run: .venv/bin/python -m bench.lab_size [--images 600] [--rounds 3] [--batch 32] [--reps 9] [--smoke]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

from bench import common as c

SIZES = (299, 224)
PATHS = {"numpy Lab": {"KOALA_LAB_ON_DEVICE": "0"}, "TF Lab": {"KOALA_LAB_ON_DEVICE": "1"}}


def lab_alone(batch: int, reps: int) -> dict[str, list[float]]:
    """CPU-ms per image of each (path, size) over `reps` interleaved repetitions."""
    import tensorflow as tf

    from common.pictures.lab import lab_channels
    from common.pictures.lab_tf import lab_tf_padded

    images = c.make_images(batch)
    tensor = tf.constant(images)
    calls = {f"numpy Lab {s}": (lambda s=s: [lab_channels(i, s) for i in images]) for s in SIZES}
    calls |= {
        f"TF Lab {s}": (lambda s=s: [t.numpy() for t in lab_tf_padded(tensor, batch, s)]) for s in SIZES
    }
    return {name: [1000 * cpu / batch for _, cpu in ts] for name, ts in c.interleaved(calls, reps).items()}


def worker(n: int, batch: int, rounds: int) -> dict[str, list[float]]:
    """Embed worker CPU-ms per image (null model) of each (path, size), rounds interleaved."""
    with tempfile.TemporaryDirectory(prefix="koala-bench-labsize-") as tmp:
        variants = {
            f"{p} {s}": (Path(tmp) / "out", {**env, "KOALA_LAB_SIZE": str(s)})
            for p, env in PATHS.items()
            for s in SIZES
        }
        runs = c.null_rounds("labsize", n, batch, rounds, variants)
    return {name: [r["cpu_ms_per_image"] for r in rs] for name, rs in runs.items()}


def summary(times: dict[str, list[float]]) -> dict:
    """Medians, and 224 − 299 paired by repetition, per path."""
    out: dict = {"median": {k: round(statistics.median(v), 3) for k, v in times.items()}}
    return out | {f"{p}: 224 - 299": c.paired(times[f"{p} 224"], times[f"{p} 299"]) for p in PATHS}


@click.command()
@click.option("--images", type=int, default=600, show_default=True, help="images per worker round")
@click.option("--rounds", type=int, default=3, show_default=True, help="worker rounds per variant")
@click.option("--batch", type=int, default=32, show_default=True, help="images per call / worker batch")
@click.option("--reps", type=int, default=9, show_default=True, help="repetitions of the Lab-alone calls")
@c.options
def main(images: int, rounds: int, batch: int, reps: int, json_path: Path | None, smoke: bool) -> None:
    """CPU cost of KOALA_LAB_SIZE=224 over 299, Lab alone and in an embed worker."""
    if smoke:
        images, rounds, batch, reps = 32, 1, 8, 1
    result: dict = {"images": images, "rounds": rounds, "batch": batch, "reps": reps, "load_before": c.load()}
    result |= {"lab_alone": summary(lab_alone(batch, reps)), "worker": summary(worker(images, batch, rounds))}
    result["load_after"] = c.load()
    rows = [
        [what.replace("_", " "), p, *(result[what]["median"][f"{p} {s}"] for s in SIZES)]
        + [result[what][f"{p}: 224 - 299"]["median"], result[what][f"{p}: 224 - 299"]["range"]]
        for what in ("lab_alone", "worker")
        for p in PATHS
    ]
    head = f"### KOALA_LAB_SIZE=224 vs 299: CPU-ms per image (Lab alone: batch {batch}, {reps} reps; worker: "
    head += f"{images} images, {rounds} rounds; load {result['load_before']} before, {result['load_after']})"
    table = c.md_table(["measure", "path", "299", "224", "224 − 299 (median)", "range"], rows)
    c.finish("lab_size", result, json_path, smoke, head + "\n\n" + table)


if __name__ == "__main__":
    main()
