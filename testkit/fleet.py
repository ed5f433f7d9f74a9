"""Processes a test starts: worker processes, the `koala` CLI; and polling until something happens."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from testkit import ROOT
from testkit.servers import worker_env


def koala(
    env: Mapping[str, str], *args: str | Path, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`koala ARGS`, the real CLI (`python -m producer`), in a subprocess with environment `env`
    (usually `worker_env(...)`); `check`: fail unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "producer", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env),
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"koala {' '.join(map(str, args))} exited {done.returncode}\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def embed_env(checkpoint: Path | None, **extra: str) -> dict[str, str]:
    """Settings for an embed worker in tests, shards of 3, batches of 4: the network of this
    checkpoint, or with None the stand-in forward pass (KOALA_NULL_MODEL: zeros) and numpy's Lab,
    no TensorFlow in the process, for tests of everything but the network."""
    if checkpoint is None:
        model = {"KOALA_NULL_MODEL": "1", "KOALA_LAB_ON_DEVICE": "0"}
    else:
        model = {"KOALA_CHECKPOINT": str(checkpoint)}
    batches = {"KOALA_EXAMPLES_PER_SHARD": "3", "KOALA_BATCH_SIZE": "4", "KOALA_BATCH_WAIT": "0.5"}
    return {**model, **batches, **extra}


class Workers:
    """Worker processes started by a test, stopped (and checked gone) at its end."""

    def __init__(self, redis_url: str, out_dir: Path, log_dir: Path):
        self.redis_url = redis_url
        self.out_dir = out_dir
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The workers' environment (their Redis and output folder), for them and for `koala`."""
        return worker_env(self.redis_url, self.out_dir, **extra)

    def start(self, kind: str = "download", *args: str, **env: str) -> subprocess.Popen:
        name = f"{kind}{len(self.procs)}@test"
        log = open(self.log_dir / f"{name}.log", "wb")  # closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", kind, "-n", name, *args],
            cwd=ROOT,
            env=self.env(**env),
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
