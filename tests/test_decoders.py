"""The download worker's decoder processes: the same payloads and failures as decoding in the worker
itself, and a decoder that dies takes its worker with it (the messages come back, as for any death)."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.messages import encode_pixels
from common.pictures import images as img
from common.state.failures import ItemError
from testkit.fleet import Workers, koala, wait_for
from testkit.servers import ImageServer
from workers.decoders import DecoderDied, Decoders

LIMITS = {"size": (299, 299), "mode": "contain", "max_pixels": 50_000_000, "max_scans": 100}


@pytest.fixture
def decoders():
    died: list[DecoderDied] = []
    pool = Decoders(*LIMITS.values(), processes=2, on_death=died.append).start()
    pool.died = died  # type: ignore[attr-defined]
    yield pool
    pool.close()


def test_payloads_and_failures_are_the_ones_decoding_here_gives(decoders, images, bad_images):
    inputs = [*images.values(), *(data for data, _ in bad_images.values())]
    with ThreadPoolExecutor(8) as threads:  # many callers at once, answers in each caller's order
        got = list(threads.map(lambda data: _outcome(decoders.payload, data), inputs))
    here = [_outcome(lambda data: encode_pixels(img.load_rgb(data, **LIMITS)), data) for data in inputs]
    assert got == here
    assert {reason for ok, reason in got if not ok} == {reason for _, reason in bad_images.values()}


def _outcome(decode, data: bytes) -> tuple[bool, bytes | str]:
    try:
        return True, decode(data)
    except ItemError as e:
        return False, e.reason


def test_a_dead_decoder_is_reported_and_its_callers_fail(decoders, images):
    assert decoders.payload(images["jpeg_rgb"])
    os.kill(decoders.pids()[0], signal.SIGKILL)
    wait_for(lambda: decoders.died, 10, "the death reported")
    assert "exit code -9" in str(decoders.died[0])
    outcomes: list = []
    decoders._decoders[0].decode(images["jpeg_rgb"], outcomes.append)
    assert isinstance(outcomes[0], DecoderDied)
    assert decoders.payload(images["jpeg_rgb"])  # the other one still decodes


def test_a_worker_whose_decoder_dies_dies_with_it(
    image_server: ImageServer, workers: Workers, rclient, tmp_path
):
    env = {"KOALA_VISIBILITY_TIMEOUT": "3"}
    worker = workers.start("download", "-c", "4", **env)
    wait_for(lambda: _decoder_pids(worker.pid), 60, "the worker's decoder processes")
    os.kill(_decoder_pids(worker.pid)[0], signal.SIGKILL)
    assert worker.wait(30) == -signal.SIGKILL
    urls = [f"{image_server.base}/img/jpeg_small?after={i}" for i in range(6)]
    (tmp_path / "urls.txt").write_text("\n".join(urls))
    workers.start("download", "-c", "4", **env)
    assert koala(workers.env(**env), "submit", str(tmp_path / "urls.txt")).returncode == 0
    downloaded = lambda: int(rclient.hget("koala:counts", "downloaded") or 0)  # noqa: E731
    wait_for(lambda: downloaded() == 6, 60, "6 downloads", workers.logs)


def _decoder_pids(parent: int) -> list[int]:
    """The `python -m workers.decoders` children of a process."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError):
            continue
        if ppid == parent and b"workers.decoders" in command:
            found.append(int(entry))
    return found


def test_koala_run_layout_two_workers_at_least_and_a_decoder_more_than_each_share_of_cores():
    from producer.run import download_layout

    assert download_layout(cores=1) == (2, 2)
    assert download_layout(cores=2) == (2, 2)
    assert download_layout(cores=16) == (4, 5)
    assert download_layout(workers=1, cores=2) == (1, 3)


def test_ready_waits_for_every_decoder_to_answer(images):
    pool = Decoders(*LIMITS.values(), processes=2).ready()
    try:
        assert all(not d.owed for d in pool._decoders)
        assert pool.payload(images["jpeg_rgb"])
    finally:
        pool.close()
