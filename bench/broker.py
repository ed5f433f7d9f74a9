"""Broker benchmark: how many images/s one Redis carries on the `embed` queue.

Run: .venv/bin/python -m bench.broker [--images 8000] [--rounds 3] [--json PATH] [--smoke]

2 sender processes publishing as download workers do (`send_task` of a chunk's 16 images) and one
consumer (the real `BatchConsumer`, its steps doing nothing) on loopback; no model, no disk. Images/s
through the queue, and redis-server's CPU-seconds per image: one Redis (single-threaded) carries at
most 1 / that, however many cores the senders and consumers have.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import click

from bench import common as c

CHUNK, SENDERS = 16, 2  # images per message (KOALA_CHUNK_SIZE's default), sender processes


def one_round(server, images: list[dict], n: int) -> dict:
    """Senders and the consumer at once until n images went through; images/s and Redis CPU."""
    server.client().flushall()
    messages = n // len(images) // SENDERS
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=c.send_chunks, args=(server.url, [images] * messages)) for _ in range(SENDERS)
    ]
    redis_cpu = c.cpu_seconds(server.proc.pid) or 0.0
    seen = c.drain(server.url, messages * len(images) * SENDERS, 128, 600, lambda: [p.start() for p in procs])
    for p in procs:
        p.join()
    received, redis_cpu = sum(k for _, k in seen), (c.cpu_seconds(server.proc.pid) or 0.0) - redis_cpu
    seconds = seen[-1][0] - seen[0][0]  # from the first batch to the last: the senders' start-up left out
    return {
        "images": received,
        "seconds": round(seconds, 3),
        "images_per_s": round((received - seen[0][1]) / seconds, 1),
        "redis_cpu_ms_per_image": round(1000 * redis_cpu / received, 4),
        "redis_bound_images_per_s": round(received / redis_cpu) if redis_cpu else None,
    }


@click.command()
@click.option("--images", "n", type=int, help="images per round (default 8000; smoke 320)")
@click.option("--rounds", type=int, default=3, show_default=True)
@c.options
def main(n: int | None, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """Images/s one Redis carries on the embed queue, and the bound its own CPU sets."""
    n, rounds = n or (320 if smoke else 8000), 1 if smoke else rounds
    images = c.payloads_of(c.make_images(CHUNK, CHUNK))  # distinct photo-like images, as workers send them
    kb = round(sum(len(i["pixels"]) for i in images) / len(images) / 1000, 1)
    result: dict = {"images": n, "senders": SENDERS, "rounds": rounds, "payload_kb_per_image": kb}
    result |= {"load_average_before": c.load(), "runs": []}
    with c.redis_server("broker") as server:
        for r in range(rounds):
            result["runs"].append(one_round(server, images, n))
            c.log(f"round {r + 1}/{rounds}: {result['runs'][-1]}")
    keys = ("images_per_s", "redis_cpu_ms_per_image", "redis_bound_images_per_s")
    result |= {"median": c.medians(result["runs"], keys), "load_average_after": c.load()}
    head = f"### Broker: the `embed` queue on one Redis ({n} images of {kb} kB, {SENDERS} senders + 1 "
    head += f"consumer on this machine, medians of {rounds} rounds)"
    cols = [
        "message format",
        "images/s through the queue",
        "redis-server CPU-ms/image",
        "one Redis core's bound",
    ]
    row = [f"chunk ({CHUNK} images per message)", *(result["median"][k] for k in keys)]
    c.finish("broker", result, json_path, smoke, head + "\n\n" + c.md_table(cols, [row]))


if __name__ == "__main__":
    main()
