"""Fixtures that start real parts: Redis, the loopback image server, worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from testkit import corpus
from testkit.fleet import Workers
from testkit.s3 import S3Server
from testkit.servers import ImageServer, RedisServer

# Four test processes share the cores (pytest-xdist, pyproject.toml): one thread each for TensorFlow
# and BLAS, here and in the workers the tests start (they inherit this environment), not one per core
# each, which only thrashes.
for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


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


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    (tmp_path / "logs").mkdir()
    team = Workers(redis_url, tmp_path / "out", tmp_path / "logs")
    yield team
    team.stop_all()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (moto's server mode) on a loopback port, for this test process."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    """The test S3 server, emptied for this test, with a bucket `koala`."""
    s3_server.reset()
    s3_server.make_bucket("koala")
    return s3_server


@pytest.fixture(scope="session")
def fake_checkpoint() -> Path:
    """A fake Inception-ResNet-v2 checkpoint (slim layout, V1 single file, seed 0, ~230 MB), cached
    across runs (testkit.checkpoint.cached_fake_checkpoint)."""
    from testkit.checkpoint import cached_fake_checkpoint

    return cached_fake_checkpoint()


@pytest.fixture(scope="session")
def embedder(fake_checkpoint: Path):
    """The network of the fake checkpoint in this process, batches of 2, built once per test process."""
    from common.model.embedder import Embedder

    return Embedder(fake_checkpoint, batch_size=2)


# The files that take longest, longest first (a file runs in one test process: --dist loadfile), so
# that the four processes end together instead of one finishing a long file alone at the end.
LONGEST_FIRST = (
    "test_steps.py",
    "test_embed_fleet.py",
    "test_object_store.py",
    "test_remote_shards.py",
    "test_model.py",
    "test_run.py",
    "test_download_fleet.py",
    "test_embed_pipeline.py",
    "test_lab.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
