"""Flower with basic auth shows both kinds of workers, both queues and both tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from testkit import ROOT
from testkit.fleet import Workers, embed_env, koala, wait_for
from testkit.servers import ImageServer, free_port, worker_env


@pytest.fixture
def flower(redis_url: str, tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "common.celery_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--basic-auth=koala:secret",
        ],
        cwd=ROOT,
        env=worker_env(redis_url, tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(f"{base}/healthcheck"), 60, "Flower to start")
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_flower_shows_workers_queues_and_tasks(
    flower: str, image_server: ImageServer, workers: Workers, redis_url, rclient, tmp_path
):
    auth = ("koala", "secret")
    assert requests.get(f"{flower}/workers?json=1", timeout=5).status_code == 401
    workers.start("download", "-c", "2")
    workers.start("embed", **embed_env(None))  # the stand-in model: Flower does not see the network
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(f"{image_server.base}/img/{n}" for n in ("jpeg_rgb", "png_rgb", "webp")))
    assert koala(workers.env(), "submit", str(listing)).returncode == 0
    wait_for(lambda: rclient.hget("koala:counts", "written") == b"3", 240, "3 records", workers.logs)

    def names(path: str, key: str) -> set[str]:
        data = requests.get(f"{flower}{path}", auth=auth, timeout=10).json()
        rows = data["data"] if isinstance(data, dict) and "data" in data else data
        rows = rows.values() if isinstance(rows, dict) else rows
        return {row.get(key) for row in rows}

    wait_for(
        lambda: {"download0@test", "embed1@test"} <= names("/workers?json=1&refresh=1", "hostname"),
        60,
        "both workers in Flower",
    )
    wait_for(
        lambda: {"koala.download", "koala.embed"} <= names("/api/tasks", "name"),
        30,
        "both kinds of task in Flower",
    )

    def queues() -> set[str]:
        requests.get(f"{flower}/workers?refresh=1", auth=auth, timeout=10)
        lengths = requests.get(f"{flower}/api/queues/length", auth=auth, timeout=10).json()
        return {q["name"] for q in lengths["active_queues"]}

    wait_for(lambda: {"download", "embed"} <= queues(), 30, "both queues in Flower")
