"""Broker benchmark: how many images/s one Redis carries on the `embed` queue.

Run: .venv/bin/python -m bench.broker [--images 8000] [--senders 2] [--rounds 3] [--json PATH] [--smoke]

Senders (processes, publishing as download workers do: `send_task` of a chunk's 16 images) and one
consumer (the real `BatchConsumer`, its steps doing nothing: receive, decode the envelope, ack) on
loopback; no model, no disk. Images/s through the queue, and redis-server's own CPU-seconds per
image, which bounds what one Redis (single-threaded) carries however many cores the senders and
consumers have: 1 / that figure.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import click

from bench.common import (
    cpu_seconds,
    drain,
    finish,
    log,
    make_images,
    md_table,
    medians,
    payloads_of,
    redis_server,
)
from bench.common import send_chunks as send

CHUNK = 16  # images per message, as download workers publish a chunk (KOALA_CHUNK_SIZE's default)


def one_round(server, images: list[dict], n: int, senders: int) -> dict:
    """Senders and the consumer at once until n images went through; images/s and Redis CPU."""
    server.client().flushall()
    messages = n // len(images) // senders
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=send, args=(server.url, [images] * messages)) for _ in range(senders)]
    redis_cpu = cpu_seconds(server.proc.pid) or 0.0
    seen = drain(server.url, messages * len(images) * senders, 128, 600, lambda: [p.start() for p in procs])
    for p in procs:
        p.join()
    received = sum(k for _, k in seen)
    redis_cpu = (cpu_seconds(server.proc.pid) or 0.0) - redis_cpu
    # from the first batch to the last: the senders' start-up (a process each) left out
    timed, seconds = received - seen[0][1], seen[-1][0] - seen[0][0]
    return {
        "images": received,
        "seconds": round(seconds, 3),
        "images_per_s": round(timed / seconds, 1),
        "redis_cpu_ms_per_image": round(1000 * redis_cpu / received, 4),
        "redis_bound_images_per_s": round(received / redis_cpu) if redis_cpu else None,
    }


@click.command()
@click.option("--images", "n", type=int, help="images per round (default 8000; smoke 320)")
@click.option("--senders", type=int, default=2, show_default=True, help="sender processes")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--smoke", is_flag=True, help="a tiny run that only checks the path works")
def main(n: int | None, senders: int, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """Images/s one Redis carries on the embed queue, and the bound its own CPU sets."""
    n, rounds = n or (320 if smoke else 8000), 1 if smoke else rounds
    images = payloads_of(make_images(CHUNK, CHUNK))  # distinct photo-like images, as workers send them
    kb = round(sum(len(i["pixels"]) for i in images) / len(images) / 1000, 1)
    result: dict = {"bench": "broker", "images": n, "senders": senders, "rounds": rounds}
    result.update(payload_kb_per_image=kb, load_average_before=os.getloadavg(), runs=[])
    with redis_server("broker") as server:
        for r in range(rounds):
            result["runs"].append(one_round(server, images, n, senders))
            log(f"round {r + 1}/{rounds}: {result['runs'][-1]}")
    keys = ("images_per_s", "redis_cpu_ms_per_image", "redis_bound_images_per_s")
    result.update(median=medians(result["runs"], keys), load_average_after=os.getloadavg())
    head = (
        f"### Broker: the `embed` queue on one Redis ({n} images of {kb} kB, {senders} senders + 1 "
        f"consumer on this machine, medians of {rounds} rounds)"
    )
    cols = ["message format", "images/s through the queue", "redis-server CPU-ms/image"]
    row = [f"chunk ({CHUNK} images per message)", *(result["median"][k] for k in keys)]
    finish(
        "broker",
        result,
        json_path,
        smoke,
        head + "\n\n" + md_table([*cols, "one Redis core's bound (images/s)"], [row]),
    )


if __name__ == "__main__":
    main()
