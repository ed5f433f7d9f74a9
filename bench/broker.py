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
import statistics
import tempfile
from pathlib import Path

import click

from bench.embed import cpu_seconds, default_json, drain, item_of, log, make_images, md_table, save_json

NAME = "broker"
CHUNK = 16  # images per message, as download workers publish a chunk (KOALA_CHUNK_SIZE's default)


def chunk_images(chunk: int) -> list[dict]:
    """`chunk` distinct photo-like images as download workers publish them."""
    from common.messages import embed_image
    from common.pictures.images import encode_pixels

    return [embed_image(item_of(i), encode_pixels(img)) for i, img in enumerate(make_images(chunk, chunk))]


def send(redis_url: str, images: list[dict], messages: int) -> None:
    """Publish `messages` messages of the chunk's images (a sender process)."""
    from common.celery_app import EMBED_QUEUE, EMBED_TASK, make_app
    from common.settings import Settings

    app = make_app(Settings(broker_url=redis_url))
    for _ in range(messages):
        app.send_task(EMBED_TASK, args=[images], queue=EMBED_QUEUE, argsrepr="[images]", kwargsrepr="{}")
    app.close()


def one_round(server, images: list[dict], n: int, senders: int) -> dict:
    """Senders and the consumer at once until n images went through; images/s and Redis CPU."""
    server.client().flushall()
    messages = n // len(images) // senders
    total = messages * len(images) * senders
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=send, args=(server.url, images, messages)) for _ in range(senders)]
    redis_cpu = cpu_seconds(server.proc.pid) or 0.0
    seen = drain(server.url, total, 128, "broker@bench", 600, start=lambda: [p.start() for p in procs])
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


def run(n: int, senders: int, rounds: int) -> dict:
    from testkit.servers import RedisServer

    images = chunk_images(CHUNK)
    payload_kb = sum(len(i["pixels"]) for i in images) / len(images) / 1000
    runs: list[dict] = []
    result: dict = {
        "bench": NAME,
        "images": n,
        "senders": senders,
        "rounds": rounds,
        "payload_kb_per_image": round(payload_kb, 1),
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="koala-bench-broker-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            for r in range(rounds):
                runs.append(one_round(server, images, n, senders))
                log(f"round {r + 1}/{rounds}: {runs[-1]}")
        finally:
            server.stop()
    keys = ("images_per_s", "redis_cpu_ms_per_image", "redis_bound_images_per_s")
    result["median"] = {k: statistics.median(x[k] for x in runs) for k in keys}
    result["runs"] = runs
    result["load_average_after"] = os.getloadavg()
    return result


def markdown(result: dict) -> str:
    """The table of a broker result."""
    median = result["median"]
    row = [
        f"chunk ({CHUNK} images per message)",
        median["images_per_s"],
        median["redis_cpu_ms_per_image"],
        median["redis_bound_images_per_s"],
    ]
    head = (
        f"### Broker: the `embed` queue on one Redis ({result['images']} images of "
        f"{result['payload_kb_per_image']} kB, {result['senders']} senders + 1 consumer on this machine, "
        f"medians of {result['rounds']} rounds)"
    )
    return (
        head
        + "\n\n"
        + md_table(
            [
                "message format",
                "images/s through the queue",
                "redis-server CPU-ms/image",
                "one Redis core's bound (images/s)",
            ],
            [row],
        )
    )


@click.command()
@click.option("--images", "n", type=int, default=None, help="images per round (default 8000; smoke 320)")
@click.option("--senders", type=int, default=2, show_default=True, help="sender processes")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--smoke", is_flag=True, help="a tiny run that only checks the path works")
def main(n: int | None, senders: int, rounds: int, json_path: Path | None, smoke: bool) -> None:
    """Images/s one Redis carries on the embed queue, and the bound its own CPU sets."""
    result = run(n or (320 if smoke else 8000), senders, 1 if smoke else rounds)
    path = json_path or default_json(NAME, smoke)
    save_json(result, path)
    text = markdown(result)
    path.with_suffix(".md").write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
