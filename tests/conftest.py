"""Fixtures that start real parts: Redis, the loopback image server, worker processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests import corpus
from tests.servers import ImageServer, RedisServer, worker_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The test Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def rclient(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    return corpus.good_images()


@pytest.fixture(scope="session")
def bad_images() -> dict[str, tuple[bytes, str]]:
    return corpus.bad_images()


@pytest.fixture(scope="session")
def image_server(images: dict[str, bytes], bad_images: dict[str, tuple[bytes, str]]) -> Iterator[ImageServer]:
    files = dict(images)
    files.update({f"bad_{name}": data for name, (data, _) in bad_images.items()})
    server = ImageServer(files).start()
    yield server
    server.stop()


class Workers:
    """Worker processes started by a test, stopped (and checked gone) at its end."""

    def __init__(self, redis_url: str, out_dir: Path, log_dir: Path):
        self.redis_url = redis_url
        self.out_dir = out_dir
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, kind: str = "download", *args: str, **env: str) -> subprocess.Popen:
        name = f"{kind}{len(self.procs)}@test"
        log = open(self.log_dir / f"{name}.log", "wb")  # closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", kind, "-n", name, *args],
            cwd=ROOT,
            env=worker_env(self.redis_url, self.out_dir, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.log_dir.glob("*.log"))


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    (tmp_path / "logs").mkdir()
    team = Workers(redis_url, tmp_path / "out", tmp_path / "logs")
    yield team
    team.stop_all()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str] = lambda: ""
) -> None:
    """Poll until predicate() is true; fail with `what` (and extra context) on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{on_timeout()}")
        time.sleep(0.2)


def reached(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll until predicate() is true or `timeout` passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="session")
def fake_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake Inception-ResNet-v2 checkpoint (slim layout, V1 single file, seed 0), written once (~230 MB)."""
    from tests.checkpoint import write_fake_checkpoint

    path = tmp_path_factory.mktemp("checkpoint") / "inception_resnet_v2_2016_08_30.ckpt"
    write_fake_checkpoint(path)
    return path
