"""Compose smoke test: the real stack under a real Docker engine, as a user runs it.

    .venv/bin/python -m testkit.compose_smoke [--keep] [--json report.json]

Needs a Docker engine with `docker compose` v2 and the base images (`python:3.11-slim`,
`redis:7`) present locally: it never pulls. Here: `../shared/tools/offline-docker` first.
In a copy of the working tree (the files git tracks or would track: a fresh clone's view), with a
generated `.env`, `./data` given to APP_UID and a generated-weights checkpoint, it:
builds (once: no dangling image left), brings the stack up and waits for every service to be
healthy, checks Flower's basic auth, serves generated images from a container on the compose
network, submits a list through the `producer` service and reads the records back, scales the
download workers to two and checks both take work, kills the embed container mid-job
(`docker kill -s KILL`, then `up`) and crashes its process (SIGKILL from the host: the restart
policy's case), checking every item still ends once, then `down`/`up` and checks the job state
survived. Then the object-store override with its `s3` profile (docker-compose.s3.yml: the `s3`
service built from Dockerfile.s3): a new list, the embed container killed with its scratch folder
deleted (a lost machine), every item once in the bucket's committed objects, no upload left open.
The project is `koala-smoke`; `down -v` at the end (the image stays, as a build cache).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "koala-smoke"
APP_UID = 10001
OVERRIDE = """\
services:
  images:                      # the image server, on the compose network: http://images:8000/...
    image: "${COMPOSE_PROJECT_NAME}-fleet:latest"
    entrypoint: ["python", "-m", "http.server", "8000", "--directory", "/data/www"]
    volumes: ["./data:/data"]
    healthcheck:
      test: ["CMD", "python", "-c",
             "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/', timeout=5)"]
      interval: 2s
      retries: 30
  download-worker:
    environment:
      KOALA_ALLOW_PRIVATE_ADDRESSES: "1"   # the list's URLs are on the compose network
  embed-worker:
    environment:
      KOALA_EXAMPLES_PER_SHARD: "4"
      KOALA_SHARD_MAX_AGE: "5"
  producer:
    environment:
      KOALA_CHUNK_SIZE: "2"                # several chunks per small list: both download workers get some
  flower:
    ports: !override ["127.0.0.1::5555"]   # a free host port: another stack may hold 5555
"""


class SmokeError(AssertionError):
    pass


def log(msg: str) -> None:
    print(f"[compose-smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stack:
    """`docker compose` on a copy of the project, with a generated .env and data folder."""

    def __init__(self, work: Path):
        self.dir = work / "koala"
        self.data = self.dir / "data"
        self.env = {
            "REDIS_PASSWORD": secrets.token_hex(12),
            "FLOWER_USER": "smoke",
            "FLOWER_PASSWORD": secrets.token_hex(12),
            "APP_UID": str(APP_UID),
            "APP_GID": str(APP_UID),
        }

    def prepare(self, images: int) -> dict[str, str]:
        """Copy the tree, write .env, the checkpoint, the images and the URL list; {url: key}."""
        from testkit.checkpoint import fake_checkpoint_in

        shutil.rmtree(self.dir, ignore_errors=True)
        files = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (self.dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.dir / name)
        (self.dir / "docker-compose.smoke.yml").write_text(OVERRIDE)
        # a new user's first steps work before .env exists (no variable is required to read the files)
        self.compose("config", "--quiet", timeout=120)
        self.compose("-f", "docker-compose.gpu.yml", "config", "--quiet", timeout=120)
        (self.dir / ".env").write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        fake_checkpoint_in(self.data)
        return self.write_images(images)

    def write_images(self, n: int) -> dict[str, str]:
        from testkit.corpus import GOOD

        www = self.data / "www"
        www.mkdir(parents=True, exist_ok=True)
        urls = {}
        for i in range(n):
            name = f"img{i}.jpg"
            (www / name).write_bytes(GOOD["jpeg_rgb"]() if i % 2 else GOOD["png_rgb"]())
            url = f"http://images:8000/{name}?n={i}"
            urls[url] = hashlib.md5(url.encode()).hexdigest()
        return urls

    def write_list(self, name: str, urls: list[str]) -> str:
        (self.data / name).write_text("\n".join(urls) + "\n")
        subprocess.run(["chown", "-R", f"{APP_UID}:{APP_UID}", str(self.data)], check=True)
        return f"/data/{name}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [
            "docker",
            "compose",
            "-p",
            PROJECT,
            "-f",
            "docker-compose.yml",
            "-f",
            "docker-compose.smoke.yml",
            *args,
        ]
        out = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise SmokeError(
                f"`{' '.join(cmd[2:])}` exited {out.returncode}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
            )
        return out

    def koala(self, *args: str, timeout: float = 600) -> str:
        """The producer tool: `docker compose run --rm producer ...`."""
        return self.compose("run", "--rm", "--pull", "never", "producer", *args, timeout=timeout).stdout

    def counts(self) -> dict[str, int]:
        """The job's counters, read in the redis container (its port is not published)."""
        read = 'redis-cli -a "$REDIS_PASSWORD" --no-auth-warning hgetall koala:counts'
        out = self.compose("exec", "-T", "redis", "sh", "-c", read).stdout.split()
        found = {k: int(v) for k, v in zip(out[::2], out[1::2], strict=True)}
        return {k: found.get(k, 0) for k in ("submitted", "written", "failed")}

    def ended(self) -> int:
        """Items written or failed (one read of the counters)."""
        counts = self.counts()
        return counts["written"] + counts["failed"]

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def up(self, *args: str) -> None:
        self.compose("up", "-d", "--pull", "never", "--wait", "--wait-timeout", "300", *args, timeout=420)

    def shard_keys(self) -> Counter:
        from common.output import records
        from common.output.shards import SHARD_GLOB

        out = self.data / "tfrecords"
        return Counter(
            records.example_key(data).decode()
            for shard in out.glob(SHARD_GLOB)
            for _, _, data in records.iter_examples(shard)
        )


S3 = ("-f", "docker-compose.s3.yml", "--profile", "s3")
# run in the producer container (the project installed, the override's AWS_* variables): the keys of
# every record in the bucket's committed shards, and the uploads left open
READ_BUCKET = """
import json
from common.output import records
from common.output.storage import Store
from producer.steps.preview import shard_records
store = Store("s3://koala/tfrecords")
keys = [records.example_key(r).decode() for n in store.shard_names() for r in shard_records(store.url(n))]
print(json.dumps({"keys": keys, "open_uploads": len(store.incomplete_uploads())}))
"""


def object_store_phase(stack: Stack, urls: list[str]) -> None:
    """The fleet on the `s3` profile: a list written to the bucket, though the embed container is
    killed after the submit and its scratch deleted; each item once in committed objects."""
    stack.compose(*S3, "build", "s3", timeout=1800)
    stack.compose(*S3, "up", "-d", "--pull", "never", "--wait", "--wait-timeout", "300", timeout=420)
    listing = stack.write_list("s3.txt", urls)
    stack.compose(*S3, "run", "--rm", "--pull", "never", "producer", "submit", listing, timeout=300)
    ended = stack.ended()
    subprocess.run(
        ["docker", "kill", "-s", "KILL", stack.containers("embed-worker")[0]], check=True, capture_output=True
    )
    shutil.rmtree(stack.data / "scratch" / "s3-koala-tfrecords", ignore_errors=True)  # the lost disk
    stack.compose(*S3, "up", "-d", "--pull", "never", "--wait", "--wait-timeout", "300", timeout=420)
    wait_until(lambda: stack.ended() == ended + len(urls), 600, "every item of the object-store list")
    stack.compose(*S3, "stop", "embed-worker")  # its last sweep of open uploads
    found = json.loads(
        stack.compose(
            *S3, "run", "--rm", "--pull", "never", "--entrypoint", "python", "producer", "-c", READ_BUCKET
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    keys = Counter(found["keys"])
    wanted = {hashlib.md5(u.encode()).hexdigest() for u in urls}
    expect(
        set(keys) == wanted and max(keys.values()) == 1,
        f"the bucket holds {len(keys)} of {len(wanted)} keys, {sum(keys.values())} records",
    )
    expect(found["open_uploads"] == 0, f"{found['open_uploads']} uploads left open")


def dangling() -> set[str]:
    out = subprocess.run(
        ["docker", "images", "-q", "-f", "dangling=true"], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def gpu_base_image() -> str:
    """The FROM of Dockerfile.gpu."""
    return next(
        line.split()[1]
        for line in (ROOT / "Dockerfile.gpu").read_text().splitlines()
        if line.startswith("FROM ")
    )


def image_id(tag: str) -> str:
    out = subprocess.run(["docker", "images", "-q", tag], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def container_logs(container: str) -> str:
    out = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SmokeError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(2)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def run(work: Path, keep: bool) -> dict:
    """Every step in order; returns the seconds each took."""
    stack = Stack(work)
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - step.t, 1)  # type: ignore[attr-defined]
        log(f"{name}: ok ({steps[name]} s)")
        step.t = time.monotonic()  # type: ignore[attr-defined]

    step.t = time.monotonic()  # type: ignore[attr-defined]
    urls = stack.prepare(images=32)
    url_list = list(urls)
    step("prepare")
    try:
        # a rebuild leaves the image it replaced untagged; any other new untagged image was a
        # second build of the same image
        replaced = image_id(f"{PROJECT}-fleet:latest")
        before = dangling()
        stack.compose("build", timeout=1800)
        expect(not dangling() - before - {replaced}, "the build left dangling images (built more than once)")
        root = stack.compose(
            "build", "--build-arg", "APP_UID=0", "download-worker", check=False, timeout=1800
        )
        expect(
            root.returncode != 0 and "would run the fleet as root" in root.stdout + root.stderr,
            "the build accepted APP_UID=0",
        )
        step("build (once; APP_UID=0 refused)")
        stack.up("images")
        first = stack.write_list("first.txt", url_list[:8] + ["http://images:8000/missing.jpg"])
        stack.up()
        for service in ("redis", "flower", "download-worker", "embed-worker"):
            expect(bool(stack.containers(service)), f"{service} is not running")
        step("up, every service healthy")
        port = stack.compose("port", "flower", "5555").stdout.strip().rsplit(":", 1)[1]
        flower = f"http://127.0.0.1:{port}/"
        expect(http_status(flower) == 401, "Flower answers without credentials")
        expect(http_status(flower, ("smoke", "wrong")) == 401, "Flower accepts a wrong password")
        expect(
            http_status(flower, (stack.env["FLOWER_USER"], stack.env["FLOWER_PASSWORD"])) == 200,
            "Flower refuses its credentials",
        )
        step("flower auth")
        stack.koala("submit", first, "--wait", timeout=900)
        status = stack.counts()
        expect(status["written"] == 8 and status["failed"] == 1, f"first list: {status}")
        expect("written" in stack.koala("status", timeout=120), "`koala status` through the producer")
        wait_until(lambda: sum(stack.shard_keys().values()) >= 8, 120, "the first 8 records in shards")
        expect(set(stack.shard_keys()) >= {urls[u] for u in url_list[:8]}, "records of the first list")
        step("submit through the producer, records read back")
        stack.up("--scale", "download-worker=2")
        workers = stack.containers("download-worker")
        expect(len(workers) == 2, f"{len(workers)} download workers after --scale 2")
        second = stack.write_list("second.txt", url_list[8:16])
        stack.koala("submit", second, "--wait", timeout=900)
        took = [c for c in workers if "koala.download[" in container_logs(c)]
        expect(len(took) == 2, f"only {len(took)} of the 2 download workers took chunks")
        step("scaled download workers share the work")
        # a user's kill: docker leaves the container stopped; `up` brings it back under its name
        third = stack.write_list("third.txt", url_list[16:24])
        stack.koala("submit", third, timeout=300)
        subprocess.run(
            ["docker", "kill", "-s", "KILL", stack.containers("embed-worker")[0]],
            check=True,
            capture_output=True,
        )
        stack.up()
        wait_until(
            lambda: stack.ended() == 25,
            600,
            "every item of the third list to end after `docker kill` and `up`",
        )
        step("embed container killed (docker kill), brought back, its work done")
        # a crash (the OOM killer's SIGKILL): the restart policy brings it back by itself
        fourth = stack.write_list("fourth.txt", url_list[24:])
        stack.koala("submit", fourth, timeout=300)
        embed = stack.containers("embed-worker")[0]
        pid = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", embed], capture_output=True, text=True, check=True
        ).stdout.strip()
        os.kill(int(pid), signal.SIGKILL)
        wait_until(lambda: stack.ended() == 33, 600, "every item of the fourth list to end after the crash")
        restarts = subprocess.run(
            ["docker", "inspect", "-f", "{{.RestartCount}}", embed],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        expect(int(restarts) >= 1, "the crashed embed container was not restarted")
        stack.compose("stop", "embed-worker")  # finalizes its open shard
        keys = stack.shard_keys()
        twice = [k for k, n in keys.items() if n > 1]
        expect(
            set(keys) == set(urls.values()) and not twice,
            f"records after the kills: {len(keys)} keys, written twice: {twice}",
        )
        step("embed process crashed, restarted by the policy, every item once")
        logs = "".join(container_logs(c) for c in stack.containers("embed-worker"))
        expect(
            "pidbox command error" not in logs and "Traceback" not in logs,
            "the embed worker logged errors while Flower ran:\n" + logs[-3000:],
        )
        step("no error in the embed worker's log (Flower's control commands answered)")
        counts = stack.counts()
        stack.compose("down", timeout=300)
        stack.up()
        after = stack.counts()
        expect(after == counts and counts["submitted"] == 33, f"{counts} -> {after}")
        step("down/up keeps the job state")
        object_store_phase(stack, [f"{u}?store=s3" for u in url_list[:8]])  # new items: new URLs
        step("object store (docker-compose.s3.yml, profile s3): a lost embed machine, each item once")
        base = gpu_base_image()
        if image_id(base):
            stack.compose("-f", "docker-compose.gpu.yml", "build", "embed-worker", timeout=1800)
            expect(bool(image_id(f"{PROJECT}-fleet:gpu")), "the GPU image was not built")
            step(f"GPU image built on {base}")
        else:
            log(f"GPU image not built: no {base} on this engine (GPU_STANDIN=1 offline-docker makes one)")
    finally:
        if not keep:
            stack.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
            shutil.rmtree(stack.dir, ignore_errors=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/koala-compose-smoke"))
    parser.add_argument("--keep", action="store_true", help="leave the stack and its folder up")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        steps = run(args.work, args.keep)
        ok, problem = True, None
    except (SmokeError, subprocess.TimeoutExpired) as e:
        steps, ok, problem = {}, False, str(e)
        log(f"FAILED: {e}")
    report = {"ok": ok, "problem": problem, "steps": steps, "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    log(f"{'passed' if ok else 'FAILED'} in {report['seconds']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
