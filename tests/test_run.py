"""`koala run`: the whole job on one machine with the embedded Redis, interrupted and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.output.records import iter_examples
from testkit import ROOT
from testkit.fleet import koala, reached, wait_for
from testkit.servers import ImageServer, worker_env

GOOD = ["jpeg_rgb", "jpeg_portrait", "jpeg_small", "png_rgba", "png_p", "webp"]


def run_env(tmp_path: Path, network: bool = False) -> dict[str, str]:
    # one image per message and batches of 2: an interrupted run stops between batches
    env = worker_env(
        "unused",
        tmp_path,
        KOALA_EXAMPLES_PER_SHARD="3",
        KOALA_BATCH_SIZE="2",
        KOALA_CHUNK_SIZE="1",
        KOALA_BATCH_WAIT="0.5",
        KOALA_CACHE_DIR=str(tmp_path / "cache"),
    )
    if not network:  # the stand-in model: a test about the run, not the network
        env.update(KOALA_NULL_MODEL="1", KOALA_LAB_ON_DEVICE="0")
    del env["KOALA_BROKER_URL"]  # no broker configured: koala run starts its own
    return env


def koala_run(listing: Path, out: Path, checkpoint: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "producer",
            "run",
            str(listing),
            "--out",
            str(out),
            "--checkpoint",
            str(checkpoint),
            "--download-workers",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A run started from a background job inherits SIGINT ignored (POSIX shells do that to `&`
    jobs), and Python then never turns it into KeyboardInterrupt: the interrupt test needs it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def record_names(out: Path) -> list[str]:
    from common.output.records import example_bytes_feature

    return sorted(
        example_bytes_feature(data, b"image_name").decode()
        for shard in out.glob("lab_images_*.tfrecord")
        for _, _, data in iter_examples(shard)
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def child_running(parent: int, kind: bytes) -> int:
    """The pid of `parent`'s worker child of `kind` (`python -m workers <kind>`)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            ppid = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and argv[1:4] == [b"-m", b"workers", kind]:
            return int(cmdline.parent.name)
    raise AssertionError(f"no {kind.decode()} worker under {parent}")


def listing_of(server: ImageServer, tmp_path: Path, hold: str = "") -> tuple[Path, list[str], list[str]]:
    """A loopback copy of data/unsplash.txt (its comments and blank lines kept, each photo URL
    replaced by a loopback image; with `hold`, all but the first two held until the test opens that gate
    on the server), plus two bad URLs."""
    good = [
        f"{server.base}/img/{n}" + (f"?hold={hold}" if hold and i >= 2 else "") for i, n in enumerate(GOOD)
    ]
    bad = [f"{server.base}/status/404", "ftp://127.0.0.1/x.jpg"]
    shipped = (ROOT / "data" / "unsplash.txt").read_text().splitlines()
    urls = iter(good)
    lines = [line if not line.startswith("http") else next(urls) for line in shipped]
    assert next(urls, None) is None, "data/unsplash.txt should list one URL per loopback image"
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(lines + bad) + "\n")
    return path, good, bad


@pytest.mark.timing
def test_run_does_the_whole_job_and_leaves_nothing_behind(image_server, tmp_path, fake_checkpoint):
    listing, good, bad = listing_of(image_server, tmp_path)
    out = tmp_path / "out"
    proc = koala_run(listing, out, fake_checkpoint, run_env(tmp_path))
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["failed"], summary["pending"]) == (len(good), len(bad), 0)
    assert summary["failures_by_reason"] == {"http_error": 1, "bad_scheme": 1}
    assert record_names(out) == sorted(hashlib.md5(u.encode()).hexdigest() for u in good)
    assert not list(out.glob(".*.tmp"))
    # children koala run stopped may still wait to be reaped by init: bounded, by what happened
    gone = reached(lambda: not [pid for pid in summary["processes"] if alive(pid)], 30)
    assert gone, "a child outlived koala run"
    assert not (out / ".redis" / "url").exists()
    status = subprocess.run(
        [sys.executable, "-m", "producer", "status", "--out", str(out), "--json", "--interval", "0"],
        cwd=ROOT,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["written"] == len(good)


@pytest.mark.timing
def test_interrupted_run_resumes_to_the_same_records(image_server, tmp_path, fake_checkpoint):
    # four images are held back by the server until the interrupt: it lands mid-run however fast or
    # slow the workers are
    listing, good, bad = listing_of(image_server, tmp_path, hold="run-interrupt")
    out = tmp_path / "out"
    env = run_env(tmp_path)
    env.update(KOALA_READ_TIMEOUT="60", KOALA_DOWNLOAD_DEADLINE="90")  # wait for the held ones
    proc = koala_run(listing, out, fake_checkpoint, env)
    url_file = out / ".redis" / "url"

    def written() -> int:
        if not url_file.exists():
            return 0
        try:
            return int(redis.Redis.from_url(url_file.read_text()).hget("koala:counts", "written") or 0)
        except redis.RedisError:
            return 0

    wait_for(lambda: written() >= 2 or proc.poll() is not None, 300, "two records")
    assert proc.poll() is None, "the run ended before it could be interrupted"
    embed = child_running(proc.pid, b"embed")
    proc.send_signal(signal.SIGINT)
    # the held images come once the embed worker has stopped (the download workers finish their
    # fetches as they stop, and their images wait in the queue for the next run): without that order
    # a fast machine wrote them all during the stop, and nothing was left to resume
    wait_for(lambda: not alive(embed), 200, "the embed worker to stop")
    image_server.open_gate("run-interrupt")
    _, stderr = proc.communicate(timeout=200)
    assert proc.returncode == 130, stderr[-3000:]
    assert "run the same command again" in stderr
    partial = record_names(out)
    assert 2 <= len(partial) < len(good) and len(set(partial)) == len(partial)  # the held ones not written

    again = koala_run(listing, out, fake_checkpoint, env)
    _, stderr = again.communicate(timeout=400)
    assert again.returncode == 0, stderr[-3000:]
    assert record_names(out) == sorted(hashlib.md5(u.encode()).hexdigest() for u in good)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["failed"], summary["pending"]) == (len(good), len(bad), 0)


def read_all(out: Path) -> dict[str, dict]:
    from common.output.dataset import read_dataset

    files = sorted(str(p) for p in out.glob("lab_images_*.tfrecord"))
    return {
        r["image_name"].numpy().decode(): {k: v.numpy() for k, v in r.items()} for r in read_dataset(files)
    }


@pytest.mark.slow  # 68 s; tests/test_steps.py checks the steps' records against the fleet's functions
def test_the_original_three_steps_give_the_fleets_records(image_server, tmp_path, fake_checkpoint):
    import numpy as np

    listing, good, _ = listing_of(image_server, tmp_path)
    fleet_out = tmp_path / "fleet"
    env = run_env(tmp_path, network=True)
    proc = koala_run(listing, fleet_out, fake_checkpoint, env)
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]

    koala(env, "download", listing, tmp_path / "original", timeout=400, check=True)
    koala(env, "resize", tmp_path / "original", tmp_path / "resized", timeout=400, check=True)
    steps = ("lab-batch", "-c", fake_checkpoint, tmp_path / "resized", tmp_path / "steps", "-b", "4")
    koala(env, *steps, timeout=400, check=True)
    fleet, steps = read_all(fleet_out), read_all(tmp_path / "steps")
    assert sorted(fleet) == sorted(steps) == sorted(hashlib.md5(u.encode()).hexdigest() for u in good)
    for name, record in fleet.items():
        np.testing.assert_array_equal(record["image_l"], steps[name]["image_l"])
        np.testing.assert_array_equal(record["image_ab"], steps[name]["image_ab"])
        np.testing.assert_allclose(record["image_embedding"], steps[name]["image_embedding"], atol=1e-3)


def run_fails(args: list[str], env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "producer", "run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def test_run_says_in_one_line_why_it_cannot_start(image_server, tmp_path, fake_checkpoint):
    listing, _, _ = listing_of(image_server, tmp_path)
    env = run_env(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot write to the output folder" in run_fails(
        [str(listing), "--out", str(blocker / "out"), "--checkpoint", str(fake_checkpoint)], env
    )
    assert "no usable Inception checkpoint" in run_fails(
        [str(listing), "--out", str(tmp_path / "o1"), "--checkpoint", "http://127.0.0.1:9/x.tar.gz"], env
    )
    assert "cannot reach Redis" in run_fails(
        [str(listing), "--out", str(tmp_path / "o2"), "--checkpoint", str(fake_checkpoint)],
        {**env, "KOALA_BROKER_URL": "redis://127.0.0.1:9/0"},
    )
    assert "no such file or folder" in run_fails(
        [str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o3")], env
    )


def test_run_reports_a_corrupt_list_in_one_line_and_keeps_the_items_before_it(tmp_path, fake_checkpoint):
    import gzip

    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(5)]
    packed = bytearray(gzip.compress("".join(f"{u}\n" for u in urls).encode()))
    packed[-8] ^= 0xFF  # the CRC-32 no longer matches
    listing = tmp_path / "urls.txt.gz"
    listing.write_bytes(bytes(packed))
    env, out = run_env(tmp_path), tmp_path / "out"
    run = koala_run(listing, out, fake_checkpoint, env)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"{listing} is corrupt after line 5 (CRC check failed" in errors[0]
    assert "the 5 items before it were submitted; fix the file and run the same command again" in errors[0]
    status = koala(env, "status", "--out", out, "--json", "--interval", "0", timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["submitted"] == 5
