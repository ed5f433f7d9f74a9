"""Download benchmark: our download workers vs img2dataset, side by side on one loopback corpus.

Run: .venv/bin/python -m bench.download [--corpus photos|imagenet] [--images 2000] [--latency 0.05]
                                        [--rounds 3] [--workers 2] [--json PATH]
     .venv/bin/python -m bench.download --smoke      (40 images, 1 round, no img2dataset: ~30 s)
     .venv/bin/python -m bench.download --scenario mix --images 1000   (as root)
     .venv/bin/python -m bench.download --scenario mix --smoke   (60 URLs, 2 s timeouts, ours only)

Corpora, generated once into bench/results/cache/: `photos` (the default), photos of the size users
download (testkit.corpus.photo_jpeg: 1.0-3.0 Mpix, mean ~1.3 Mpix and ~200 KB, seven aspect ratios
from 16:9 to 9:16, quality 80-93, a quarter progressive); `imagenet`, ImageNet-sized JPEGs
(make_jpeg: 0.87 Mpix and 179 KB mean, the corpus of the earlier runs).

`--scenario mix` is ImageNet's fall11_urls.txt as it is today, mostly dead links (MIX_SHARES): good
images, 404s, parked-domain HTML pages, names that do not resolve (*.invalid), connects that hang (a
port whose backlog is full), slow servers (the image dribbled), shuffled; both tools get the same
list, timeout and retry count (MIX). The run re-executes itself in a private network namespace
holding only loopback (`unshare --net`; needs root): nothing leaves the machine, names fail at once.

What runs, all on 127.0.0.1: a threaded keep-alive HTTP server (its own process) serving the corpus
after `--latency` seconds; img2dataset, installed into its own venv (bench/results/img2dataset-venv),
`--processes_count` = our worker count, `--thread_count` 64; ours: a redis-server, `--workers`
download workers started as `koala worker download` starts them (default settings, except
KOALA_PER_HOST_CONNECTIONS: one loopback host stands for many hosts), the producer
(`python -m producer submit`) and a sink draining the `embed` queue (standing for the embed
workers, not measured here). The tools alternate, `--rounds` times each. Per run: images/s for the
whole command (img2dataset's start-up included; ours from `submit` on, workers already up) and
steady (img2dataset's own in-shard span; ours first image to last); CPU-s per image (all the tool's
processes; ours split: workers' threads, decoders, redis-server, producer); busy cores (the tool's
CPU-s per second, whole and steady, and the whole machine's in the steady span); peak RSS (sum over
the tool's processes); what other jobs used. Compare the ratios: the machine may be shared.
"""

from __future__ import annotations

import base64
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import numpy as np

from bench.common import CACHE, RESULTS, ROOT, log, machine_cpu_s, md_table

I2D_VENV = RESULTS / "img2dataset-venv"
CORPORA = {"photos": "photos-v1", "imagenet": "corpus-v1"}  # name -> cache folder
SIZE = 299
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
THREADS = 64  # img2dataset's --thread_count
# what testkit.servers.worker_env sets for the tests (short timeouts, small limits, chunks of 4)
TEST_SETTINGS = (
    "KOALA_CONNECT_TIMEOUT",
    "KOALA_READ_TIMEOUT",
    "KOALA_DOWNLOAD_DEADLINE",
    "KOALA_RETRY_BACKOFF",
)
TEST_SETTINGS += ("KOALA_MAX_BYTES", "KOALA_MAX_PIXELS", "KOALA_CHUNK_SIZE", "KOALA_BLOCKED_NETWORKS")
QUIET_WAIT = 30.0  # before each run, seconds to wait at most for other jobs' load to drop (smoke: 0)


# --- corpora -------------------------------------------------------------------------------------


def make_jpeg(index: int) -> bytes:
    """One deterministic ImageNet-sized JPEG: 400..1600 x 350..1200 (a quarter portrait), smooth
    colour field + flat shapes + sensor noise; quality adjusted so the file lands near 100..300 KB."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(1000 + index)
    w = int(rng.integers(400, 1601))
    h = int(np.clip(w * rng.uniform(0.6, 0.95), 350, 1200))
    if rng.random() < 0.25:
        w, h = h, w
    field = rng.uniform(20, 235, (max(4, h // 24), max(4, w // 24), 3)).astype(np.uint8)
    img = Image.fromarray(field, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(img).astype(np.int16)
    arr += rng.normal(0, rng.uniform(3, 7), arr.shape).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    target, quality = rng.uniform(100_000, 300_000), 90
    for _ in range(3):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if 0.8 * target < buf.tell() < 1.25 * target:
            break
        quality = int(np.clip(quality + (6 if buf.tell() < target else -8), 60, 97))
    return buf.getvalue()


def _make_one(job: tuple[str, int]) -> tuple[int, bytes]:
    from testkit.corpus import photo_jpeg

    name, index = job
    return index, (photo_jpeg if name == "photos" else make_jpeg)(index)


def corpus_dir(name: str) -> Path:
    return CACHE / CORPORA[name]


def ensure_corpus(n: int, name: str) -> list[Path]:
    """The first n files of a corpus, generating (in parallel, once) the ones not cached yet."""
    folder = corpus_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2) as pool:
            for i, data in pool.imap_unordered(_make_one, [(name, i) for i in missing], chunksize=8):
                paths[i].with_suffix(".tmp").write_bytes(data)
                paths[i].with_suffix(".tmp").rename(paths[i])
        log(f"generated {len(missing)} {name} images in {time.perf_counter() - started:.0f} s")
    return paths


def corpus_stats(paths: list[Path]) -> dict:
    """Sizes of the corpus files: bytes, pixels, aspect ratios, progressive share (JPEG headers)."""
    from PIL import Image

    sizes, pixels, wide, progressive = [], [], [], 0
    for p in paths:
        sizes.append(p.stat().st_size)
        with Image.open(p) as im:
            pixels.append(im.size[0] * im.size[1])
            wide.append(im.size[0] / im.size[1])
            progressive += bool(im.info.get("progressive") or im.info.get("progression"))
    px, kb = np.array(pixels) / 1e6, np.array(sizes) / 1e3
    return {
        "images": len(paths),
        "mean_kb": round(float(kb.mean()), 1),
        "kb_p5_p50_p95": [round(float(v)) for v in np.percentile(kb, [5, 50, 95])],
        "mean_mpix": round(float(px.mean()), 3),
        "mpix_min_max": [round(float(px.min()), 3), round(float(px.max()), 3)],
        "aspect_min_max": [round(min(wide), 2), round(max(wide), 2)],
        "progressive_share": round(progressive / len(paths), 3),
    }


# --- the image server (its own process) ----------------------------------------------------------


def _serve(folder: str, n: int, latency: float, conn, slow_s: float = 3.0, host: str = "127.0.0.1") -> None:
    """Serve /img/<i>.jpg from memory, sleeping `latency` s first (`?nolatency` skips it); for the
    mix also /html/... (a parked-domain page), /slow/<i>.jpg (the image dribbled over `slow_s` s)
    and a second port that never accepts (its backlog is full: connects hang until they time out)."""
    files = {f"{i:05d}.jpg": (Path(folder) / f"{i:05d}.jpg").read_bytes() for i in range(n)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients that want it

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            kind, name = path.strip("/").partition("/")[::2]
            body = files.get(name.rsplit("/", 1)[-1])
            if latency and "nolatency" not in query:
                time.sleep(latency)
            if kind == "html":
                self.answer(200, "text/html", b"<html><body>This domain is for sale</body></html>")
            elif kind == "slow" and body is not None:
                self.answer(200, "image/jpeg", body, dribble=slow_s)
            elif body is not None:
                self.answer(200, "image/jpeg", body)
            else:
                self.answer(404, "text/plain", b"not found")

        def answer(self, code: int, ctype: str, body: bytes, dribble: float = 0.0) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not dribble:
                self.wfile.write(body)
                return
            step = math.ceil(len(body) / 20)
            for i in range(0, len(body), step):  # 20 pieces, evenly over `dribble` seconds
                self.wfile.write(body[i : i + step])
                time.sleep(dribble / 20)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # many clients connect at once; the default 5 drops SYNs

    httpd = Server((host, 0), Handler)
    hang = socket.socket()
    hang.bind((host, 0))
    hang.listen(0)
    filler = socket.create_connection(("127.0.0.1", hang.getsockname()[1]))  # fills the backlog: SYNs dropped
    conn.send((httpd.server_address[1], hang.getsockname()[1]))
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    try:
        httpd.serve_forever()
    finally:
        filler.close()


class CorpusServer:
    """The image server process; `base` is its URL, `hang_port` the port that never accepts."""

    def __init__(self, folder: Path, n: int, latency: float, slow_s: float = 3.0, any_address: bool = False):
        parent, child = multiprocessing.get_context("fork").Pipe()
        host = "0.0.0.0" if any_address else "127.0.0.1"  # any: only inside the loopback-only namespace
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(str(folder), n, latency, child, slow_s, host), daemon=True
        )
        self.proc.start()
        if not parent.poll(120):
            raise RuntimeError("the image server did not start")
        self.port, self.hang_port = parent.recv()
        self.base = f"http://127.0.0.1:{self.port}"

    def urls(self, n: int) -> list[str]:
        return [f"{self.base}/img/{i:05d}.jpg" for i in range(n)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# --- the realistic mix (what fall11_urls.txt is today: mostly dead links) -------------------------


MIX_SHARES = {"good": 0.40, "http404": 0.25, "dns": 0.20, "html": 0.05, "slow": 0.05, "hang": 0.05}
SUCCEEDS = ("good", "slow")
NETNS_FLAG = "KOALA_BENCH_NETNS"


@dataclass(frozen=True)
class Mix:
    """Shares of URL kinds, and the limits both tools get: good (image after the latency), slow (the
    image dribbled over slow_s), http404, html (a parked-domain page), dns (a name that does not
    resolve), hang (a port whose backlog is full: the connect hangs until the timeout)."""

    shares: dict[str, float]
    timeout: float
    retries: int
    slow_s: float

    def urls(self, server: CorpusServer, n: int, seed: int = 11) -> tuple[list[str], dict[str, int]]:
        """n URLs in the shares (shuffled, same list every run), and how many of each kind."""
        counts = {kind: int(share * n) for kind, share in self.shares.items()}
        counts["good"] = counts.get("good", 0) + n - sum(counts.values())
        kinds = [kind for kind, c in counts.items() for _ in range(c)]
        random.Random(seed).shuffle(kinds)
        return [self.url(kind, i, server) for i, kind in enumerate(kinds)], counts

    @staticmethod
    def url(kind: str, i: int, server: CorpusServer) -> str:
        # a slow or dead server is a host of its own (an address of 127.0.0.0/8), as on the web: it
        # must not use up the per-host slots of the host that serves the good images
        own_host = f"127.{1 + i // 62500}.{i // 250 % 250 + 1}.{i % 250 + 1}"
        return {
            "good": f"{server.base}/img/{i:05d}.jpg",
            "slow": f"http://{own_host}:{server.port}/slow/{i:05d}.jpg",
            "http404": f"{server.base}/img/gone-{i:05d}.jpg",
            "html": f"{server.base}/html/{i:05d}",
            "dns": f"http://img{i}.host{i % 97}.invalid/{i:05d}.jpg",
            "hang": f"http://{own_host}:{server.hang_port}/img/{i:05d}.jpg",
        }[kind]

    def our_env(self) -> dict[str, str]:
        return {
            "KOALA_CONNECT_TIMEOUT": f"{self.timeout:g}",
            "KOALA_READ_TIMEOUT": f"{self.timeout:g}",
            "KOALA_RETRIES": str(self.retries),
        }


MIX = Mix(MIX_SHARES, timeout=10, retries=1, slow_s=3)  # both tools' limits on the mix
SMOKE_MIX = Mix(MIX_SHARES, timeout=2, retries=1, slow_s=1)


def enter_private_network() -> None:
    """Re-run this command in a new network namespace holding only loopback (no route: no packet
    leaves the machine, names fail to resolve at once); servers, Redis, workers and img2dataset then
    all start inside it. Needs root (or CAP_SYS_ADMIN), unshare and ip."""
    if os.environ.get(NETNS_FLAG):
        return
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not (unshare and ip):
        raise click.ClickException("--scenario mix needs unshare (util-linux) and ip (iproute2)")
    log("entering a private network namespace (loopback only)")
    inner = [
        "sh",
        "-c",
        f'{ip} link set lo up && exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "bench.download",
        *sys.argv[1:],
    ]
    os.execve(unshare, [unshare, "--net", "--", *inner], {**os.environ, NETNS_FLAG: "1"})


def check_private_network() -> dict:
    """Refuse to run the mix unless the network has no way out and names fail fast."""
    probe = socket.socket()
    try:
        probe.settimeout(1)
        probe.connect(("192.0.2.1", 80))  # TEST-NET-1: must be unreachable here
        raise click.ClickException("a route leaves this network namespace; refusing to run the mix")
    except OSError as e:
        if isinstance(e, TimeoutError):
            raise click.ClickException("packets leave this namespace (connect timed out)") from None
        unreachable = e.strerror
    finally:
        probe.close()
    started = time.monotonic()
    try:
        socket.getaddrinfo("koala-bench.invalid", 80)
        raise click.ClickException("koala-bench.invalid resolves here; refusing to run the mix")
    except socket.gaierror as e:
        dns = f"{e.strerror} in {time.monotonic() - started:.3f} s"
    return {"outside_address": unreachable, "dns_failure": dns}


# --- what the processes use, from /proc ----------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, CPU seconds of the process and of its reaped children, RSS bytes), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # fields from the 3rd (state) on
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK  # utime stime cutime cstime
    return int(fields[1]), cpu, int(fields[21]) * PAGE


def process_tree(roots: list[int]) -> list[int]:
    """The roots and all their live (or not yet reaped) descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))):
            children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [r for r in roots if r]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(roots: list[int]) -> float:
    return sum(st[1] for pid in process_tree(roots) if (st := proc_stat(pid)))


class Sampler(threading.Thread):
    """Every `interval` s: the CPU seconds of the process trees under roots() (summed), the machine's
    busy CPU seconds, and the trees' summed RSS (its peak kept)."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.1):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, tool CPU s, machine CPU s)
        self.peak = 0
        self.done = threading.Event()
        self.sample()
        self.start()

    def sample(self) -> None:
        stats = [st for pid in process_tree(self.roots()) if (st := proc_stat(pid))]
        self.samples.append((time.perf_counter(), sum(s[1] for s in stats), machine_cpu_s()[0]))
        self.peak = max(self.peak, sum(s[2] for s in stats))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.sample()
        return self.peak

    def cores(self, t0: float, t1: float) -> tuple[float, float] | None:
        """(the trees' cores, the machine's busy cores) between t0 and t1 (interpolated)."""
        if t1 - t0 < 0.3:
            return None
        t, tool, machine = (np.array(col) for col in zip(*self.samples, strict=True))
        span = t1 - t0
        return (
            round(float(np.interp(t1, t, tool) - np.interp(t0, t, tool)) / span, 2),
            round(float(np.interp(t1, t, machine) - np.interp(t0, t, machine)) / span, 2),
        )


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most max_wait s) for a 1-second window in which the machine is busy less than
    `threshold` cores; returns the last window's busy cores (others' load before a run)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_cpu_s()[0], time.monotonic()
        time.sleep(1.0)
        busy = (machine_cpu_s()[0] - b0) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() > deadline:
            return round(busy, 2)


class Others:
    """What else used the CPU during a run: the image server, this process (sink, sampler) and
    everything else on the machine (other people's jobs: the machine is shared)."""

    def __init__(self, server: CorpusServer):
        self.server, self.machine0 = server, machine_cpu_s()[0]
        self.server0, self.self0 = tree_cpu([server.proc.pid]), time.process_time()

    def finish(self, tool_cpu: float, wall: float) -> dict:
        server = tree_cpu([self.server.proc.pid]) - self.server0
        bench = time.process_time() - self.self0
        others = max(0.0, machine_cpu_s()[0] - self.machine0 - tool_cpu - server - bench)
        return {
            "server_cpu_s": round(server, 2),
            "bench_cpu_s": round(bench, 2),
            "others_cores": round(others / wall, 2),
        }


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return env | extra


def reap(proc: subprocess.Popen, deadline: float) -> tuple[int, float]:
    """Wait for proc (killing its group past the deadline); (exit code, CPU s of its reaped tree)."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.02)


def tool_result(n: int, success: int, wall: float, cpu: float, sampler: Sampler, steady: tuple) -> dict:
    """The figures every run reports: rates, CPU per image, busy cores (whole, steady), peak RSS;
    `steady` = (start, end, images in between) of the tool's steady span."""
    t0, t1, images = steady
    cores = sampler.cores(t0, t1) if t0 and t1 else None
    return {
        "images": n,
        "success": success,
        "wall_s": round(wall, 2),
        "images_per_s": round(success / wall, 1),
        "steady_images_per_s": round(images / (t1 - t0), 1) if cores else None,
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_image": round(1000 * cpu / max(success, 1), 2),
        "busy_cores": round(cpu / wall, 2),
        "steady_busy_cores": cores[0] if cores else None,
        "steady_machine_cores": cores[1] if cores else None,
        "peak_rss_mb": round(sampler.peak / 2**20),
    }


# --- img2dataset ---------------------------------------------------------------------------------


def ensure_img2dataset() -> tuple[Path | None, str]:
    """Its venv (created with `python3 -m venv` + `pip install img2dataset` if missing): (bin dir,
    version) or (None, why not)."""
    python = I2D_VENV / "bin" / "python"
    try:
        if not (I2D_VENV / "bin" / "img2dataset").exists():
            log("installing img2dataset into its own venv (bench/results/img2dataset-venv) ...")
            run = {"check": True, "capture_output": True, "text": True, "timeout": 1200}
            subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(I2D_VENV)], **run)
            subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"], **run)
        probe = "import importlib.metadata as m, cv2; print(m.version('img2dataset'), cv2.__version__)"
        out = subprocess.run(
            [str(python), "-c", probe], check=True, capture_output=True, text=True, timeout=120
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return None, f"img2dataset not usable: {e}\n{(getattr(e, 'stderr', '') or '')[-2000:]}"
    version, cv2_version = out.stdout.split()
    return I2D_VENV / "bin", f"img2dataset {version}, opencv {cv2_version}"


def run_img2dataset(
    bindir: Path, url_list: Path, n: int, processes: int, server: CorpusServer, timeout: float, **limits
) -> dict:
    """One img2dataset run over the list (`limits`: fetch_timeout, retries: its --timeout and
    --retries; it retries every failure, at once): the run's figures, its failures by message."""
    out = RESULTS / "tmp" / f"i2d-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder, in its default incremental mode
    options = {
        "url_list": url_list,
        "input_format": "txt",
        "output_folder": out,
        "processes_count": processes,
        "thread_count": THREADS,
        "image_size": SIZE,
        "resize_mode": "border",
        "output_format": "files",
        "encode_quality": 95,
        "number_sample_per_shard": max(1, math.ceil(n / processes)),  # one shard per process
        "timeout": f"{limits.get('fetch_timeout', 10):g}",
        "retries": limits.get("retries", 0),
        "enable_wandb": "False",
        "distributor": "multiprocessing",
    }
    cmd = [str(bindir / "img2dataset"), *(x for k, v in options.items() for x in (f"--{k}", str(v)))]
    env = clean_env(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    log_path = RESULTS / "tmp" / "i2d-last.log"
    with open(log_path, "wb") as logf:
        others = Others(server)
        clock = time.time() - time.perf_counter()  # its stats give wall-clock times
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=RESULTS, start_new_session=True
        )
        sampler = Sampler(lambda: [proc.pid])
        code, cpu = reap(proc, t0 + timeout)
        wall = time.perf_counter() - t0
        sampler.stop()
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    success = sum(s.get("successes", 0) for s in stats)
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            errors[k] = errors.get(k, 0) + v * (k != "success")
    start = min((s["start_time"] for s in stats), default=0) - clock
    end = max((s["end_time"] for s in stats), default=0) - clock
    shutil.rmtree(out, ignore_errors=True)
    result = {"tool": "img2dataset", "exit_code": code}
    result |= tool_result(n, success, wall, cpu, sampler, (start, end, success) if stats else (0, 0, 0))
    result |= others.finish(cpu, wall)
    if errors := {k: v for k, v in errors.items() if v}:
        result["errors"] = errors
    if code != 0 or not stats:
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return result


# --- ours ----------------------------------------------------------------------------------------


class Fleet:
    """A redis-server and `workers` download workers at their default settings, kept up across
    rounds (as a fleet is)."""

    def __init__(self, workers: int, workdir: Path, extra_env: dict[str, str] | None = None):
        from testkit.servers import RedisServer, worker_env

        shutil.rmtree(workdir, ignore_errors=True)
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis").start()
        bench_env = {
            "KOALA_PER_HOST_CONNECTIONS": str(THREADS),  # one loopback host stands for many
            "KOALA_EMBED_QUEUE_LIMIT": str(10**9),  # the sink drains; never hold back
        }
        self.env = worker_env(self.redis.url, workdir / "out", **(bench_env | (extra_env or {})))
        for var in (*PROXY_VARS, *TEST_SETTINGS):  # the product's defaults, not the tests' short ones
            if var not in (extra_env or {}):
                self.env.pop(var, None)
        started = time.perf_counter()
        self.workers, logs = [], [workdir / f"dl{i + 1}.log" for i in range(workers)]
        for i, path in enumerate(logs):
            with open(path, "wb") as f:
                command = [sys.executable, "-m", "workers", "download", "-n", f"dl{i + 1}@bench"]
                self.workers.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=self.env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for proc, path in zip(self.workers, logs, strict=True):
            while "ready." not in path.read_text(errors="replace"):
                if proc.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"download worker did not start:\n{path.read_text()[-2000:]}")
                time.sleep(0.1)
        self.startup = {
            "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(tree_cpu(self.pids()), 2),
        }
        self.client = self.redis.client()

    def pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def reset(self) -> None:
        """FLUSHALL, keeping kombu's routing table (the workers declared their queues only once:
        without their bindings, the next messages would go to kombu's dead-letter queue)."""
        deadline = time.monotonic() + 30
        while (self.client.llen("download") or self.client.hlen("unacked")) and time.monotonic() < deadline:
            time.sleep(0.05)
        bindings = {k: self.client.smembers(k) for k in self.client.scan_iter("_kombu.binding.*")}
        self.client.flushall()
        for key, members in bindings.items():
            if members:
                self.client.sadd(key, *members)

    def split(self) -> dict[str, float]:
        """CPU seconds so far: the workers' own processes (their threads), their decoders, Redis."""
        main = sum(st[1] for pid in self.pids() if (st := proc_stat(pid)))
        return {
            "workers": main,
            "decoders": tree_cpu(self.pids()) - main,
            "redis": tree_cpu([self.redis.proc.pid]),
        }

    def run(self, url_list: Path, n: int, server: CorpusServer, timeout: float) -> dict:
        """Submit the list, drain `embed` until every item is downloaded or failed."""
        from common.state.job import JobState

        self.reset()
        state = JobState(self.client)
        others, cpu0 = Others(server), self.split()
        producer: list[subprocess.Popen] = []  # not reaped before the end: its CPU stays in the samples
        sampler = Sampler(lambda: [*self.pids(), self.redis.proc.pid, *(p.pid for p in producer)])
        count = failed = payload_bytes = messages = 0
        check, t_first, t_last, t_done, next_count, first_images = None, 0.0, 0.0, None, 0.0, 0
        t0 = time.perf_counter()
        with open(self.workdir / "submit.json", "wb") as out:
            command = [sys.executable, "-m", "producer", "submit", str(url_list), "--json"]
            producer.append(
                subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            )
        while True:
            # The sink stands for the embed stage, which runs elsewhere: it counts the images of each
            # message from its header (decoding each whole took ~0.15 of a core from the tools); the
            # first message is decoded as the embed stage does, one image's pixels too
            batch = self.client.rpop("embed", 64) or []
            for raw in batch:
                images = counted(raw)
                if check is None or images is None:
                    found, check = images_in(raw)
                    check, images = check or (found and check_pixels(found[0])), len(found)
                count, payload_bytes, messages = count + images, payload_bytes + len(raw), messages + 1
                t_last = time.perf_counter()
                if not t_first:  # the steady span: from the first message's arrival to the last's
                    t_first, first_images = t_last, images
            now = time.perf_counter()
            if batch:
                continue
            if now >= next_count:
                failed, next_count = state.counts()["failed"], now + 0.2
            if count + failed >= n or now - t0 > timeout:
                t_done = now if count + failed >= n else None
                break
            time.sleep(0.01)
        wall = (t_done or time.perf_counter()) - t0
        code, producer_cpu = reap(producer[0], time.perf_counter() + 60)
        sampler.stop()
        cpu = {k: v - cpu0[k] for k, v in self.split().items()} | {"producer": producer_cpu}
        total = sum(cpu.values())
        result = {"tool": "ours", "producer_exit": code}
        result |= tool_result(n, count, wall, total, sampler, (t_first, t_last, count - first_images))
        result |= {f"cpu_ms_per_image_{k}": round(1000 * v / max(count, 1), 2) for k, v in cpu.items()}
        result |= others.finish(total, wall)
        result |= {
            "failed": state.counts()["failed"],
            "first_image_s": round(t_first - t0, 2) if t_first else None,
        }
        result |= {
            "images_per_message": round(count / max(messages, 1), 2),
            "bytes_per_image": round(payload_bytes / max(count, 1)),
            "payload_check": check,
        }
        if t_done is None:
            result["timed_out"] = True
        if result["failed"]:
            result["failures_by_reason"] = state.failures_by_reason()
        return result

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.redis.stop()


def counted(raw: bytes) -> int | None:
    """The images of an `embed` message as its header says (`workers.tasks.publish_embed` writes
    argsrepr "[N images]"), without decoding its body; None when it does not say."""
    at = raw.rfind(b'"argsrepr"')
    head = raw[at + 10 : at + 40].lstrip(b': "[') if at >= 0 else b""
    number, _, rest = head.partition(b" ")
    return int(number) if number.isdigit() and rest.startswith(b"images]") else None


def images_in(raw: bytes) -> tuple[list[dict], str | None]:
    """The images of one raw `embed` message (kombu JSON envelope -> msgpack body ->
    common.messages.images_of), and what was wrong if it cannot be read."""
    import msgpack

    from common.messages import images_of

    try:
        return images_of(msgpack.unpackb(base64.b64decode(json.loads(raw)["body"]), raw=False)), None
    except Exception as e:  # a report, not a crash
        return [], f"cannot decode: {type(e).__name__}: {e}"


def check_pixels(image: dict) -> str:
    """Decode one image's pixels as the embed stage would."""
    from common.messages import decode_pixels

    try:
        pixels = decode_pixels(image["pixels"])
        return f"{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]} ok"
    except Exception as e:  # a report, not a crash
        return f"cannot decode: {type(e).__name__}: {e}"


# --- report --------------------------------------------------------------------------------------

COLUMNS = {  # run table: key -> heading
    "images_per_s": "images/s",
    "steady_images_per_s": "steady images/s",
    "cpu_ms_per_image": "CPU-ms per image",
    "busy_cores": "busy cores",
    "steady_busy_cores": "steady busy cores",
    "steady_machine_cores": "machine cores (steady)",
    "peak_rss_mb": "peak RSS MB",
    "wall_s": "wall s",
    "others_cores": "others (cores)",
}


def summarize(runs: list[dict]) -> dict:
    """Medians per tool and the ratios ours / img2dataset."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["tool"], []).append(r)
    med = {
        tool: {
            k: statistics.median(v) if (v := [r[k] for r in rows if r.get(k) is not None]) else None
            for k in COLUMNS
        }
        | {"runs": len(rows), "all_images": all(r["success"] == r["expected"] for r in rows)}
        for tool, rows in groups.items()
    }
    out: dict = {"medians": med}
    ours, i2d = med.get("ours"), med.get("img2dataset")
    if ours and i2d:
        for k in ("images_per_s", "steady_images_per_s", "cpu_ms_per_image", "peak_rss_mb"):
            if ours[k] and i2d[k]:
                out[f"ratio_{k}"] = round(ours[k] / i2d[k], 2)
    return out


def markdown(result: dict) -> str:
    """The tables printed to stdout and written beside the JSON."""
    cfg, corpus, summary = result["config"], result["corpus"], result["summary"]
    mix = cfg.get("mix")
    title = f"{cfg['corpus']} corpus" + (", realistic mix (mostly dead links)" if mix else "")
    lines = [
        f"### Download + resize to {SIZE}x{SIZE}, {title}: ours vs img2dataset",
        "",
        f"`{cfg['command']}`  ",
        f"{cfg['images']} {'URLs' if mix else 'images'}: {corpus['mean_kb']} KB and "
        f"{corpus['mean_mpix']} Mpix on average "
        f"({corpus['mpix_min_max'][0]}-{corpus['mpix_min_max'][1]} Mpix, "
        f"width/height {corpus['aspect_min_max'][0]}-{corpus['aspect_min_max'][1]}, "
        f"{corpus['progressive_share']:.0%} progressive), "
        f"{cfg['latency']} s latency per response, {cfg['workers']} processes each (ours: download workers "
        f"at their default settings, each with its decoder processes), {os.cpu_count()} CPU cores; "
        f"{result.get('img2dataset_version') or 'img2dataset not run'}.",
        "",
        "images/s: whole command (img2dataset's start-up included; ours from `submit`, workers up) and "
        "steady (img2dataset's in-shard span; ours first image out to last). CPU-ms per image and busy "
        "cores (CPU-s per second): all the tool's processes (ours: workers, decoders, redis-server, "
        "producer); machine: every process in the steady span (the image server and the sink too); "
        "others: other jobs on this shared machine during the run.",
        "",
    ]
    if mix:
        kinds = ", ".join(f"{k} {v}" for k, v in mix["counts"].items())
        lines += [
            f"Mix: {kinds}; {mix['expected_successes']} can succeed. Both tools: timeout "
            f"{mix['timeout_s']:g} s, "
            f"{mix['retries']} retries (img2dataset retries every failure at once; ours timeouts, connection "
            "and DNS errors, 429 and 5xx, after a 1 s backoff). Slow servers dribble an image over "
            f"{mix['slow_s']:g} s. Loopback-only network namespace ({result['network']['dns_failure']}). "
            "Rates and CPU per image count successful images only.",
            "",
        ]
    runs = result["runs"]
    rows = [
        [i, r["tool"], *(r[k] for k in COLUMNS), f"{r['success']} / {r['expected']}"]
        for i, r in enumerate(runs, 1)
    ]
    lines += [md_table(["run", "tool", *COLUMNS.values(), "ok"], rows), ""]
    ours = [r for r in result["runs"] if r["tool"] == "ours"]
    if ours:
        parts = ("workers", "decoders", "redis", "producer")
        split = [
            [i, *(r[f"cpu_ms_per_image_{p}"] for p in parts), r["first_image_s"]]
            for i, r in enumerate(ours, 1)
        ]
        lines += [
            "Our CPU-ms per image by process:",
            "",
            md_table(["ours run", *parts, "first image s"], split),
            "",
        ]
    med = summary["medians"]
    rows = [
        [tool, *(m[k] for k in COLUMNS), m["runs"], "yes" if m["all_images"] else "NO"]
        for tool, m in med.items()
    ]
    lines += [md_table(["median", *COLUMNS.values(), "runs", "all images"], rows)]
    start = result["ours_startup"]
    if fixed := result.get("img2dataset_fixed_cost_1_image"):
        lines += [
            "",
            f"img2dataset's fixed cost (a 1-image run): {fixed['wall_s']} s, {fixed['cpu_s']} CPU-s. Our "
            f"workers' start-up (not in our runs): {start['wall_s']} s, {start['cpu_s']} CPU-s.",
        ]
    if "ratio_images_per_s" in summary:
        targets = "x1 or more" if mix else "x2 or more whole and steady; CPU per image x0.5 or less"
        lines += [
            "",
            f"**ours / img2dataset (medians): images/s x{summary['ratio_images_per_s']}, steady "
            f"x{summary.get('ratio_steady_images_per_s')}, CPU per image "
            f"x{summary['ratio_cpu_ms_per_image']}, "
            f"peak RSS x{summary['ratio_peak_rss_mb']}** (targets: images/s {targets})",
        ]
    if mix:
        for r in result["runs"][-2:]:
            why = r.get("failures_by_reason") or r.get("errors") or {}
            listed = "; ".join(f"{k[:70]}: {v}" for k, v in sorted(why.items(), key=lambda kv: -kv[1])[:6])
            lines.append(f"\n{r['tool']}, last run's failures: {listed or 'none'}")
    if result.get("img2dataset_error"):
        lines += ["", f"img2dataset not measured: {result['img2dataset_error']}"]
    return "\n".join(lines) + "\n"


# --- the run -------------------------------------------------------------------------------------


@click.command()
@click.option("--images", type=int, default=2000, show_default=True, help="corpus size (mix: URLs)")
@click.option("--latency", type=float, default=0.05, show_default=True, help="seconds before each answer")
@click.option("--rounds", type=int, default=3, show_default=True, help="runs of each tool, alternating")
@click.option(
    "--workers", type=int, default=2, show_default=True, help="our download workers = img2dataset processes"
)
@click.option(
    "--corpus",
    type=click.Choice(sorted(CORPORA)),
    default="photos",
    show_default=True,
    help="photos: of the size users download (>= 1 Mpix); imagenet: ImageNet-sized (0.87 Mpix)",
)
@click.option(
    "--scenario",
    type=click.Choice(["clean", "mix"]),
    default="clean",
    show_default=True,
    help="clean: every URL a good image; mix: mostly dead links (MIX_SHARES), in a private network namespace",
)
@click.option("--smoke", is_flag=True, help="40 images (mix: 60, 2 s timeouts), 1 round, no img2dataset")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="default bench/results/download[-mix].json",
)
def main(
    images: int,
    latency: float,
    rounds: int,
    workers: int,
    corpus: str,
    scenario: str,
    smoke: bool,
    json_path: str | None,
) -> None:
    """Download + resize throughput, CPU and busy cores: ours vs img2dataset on a loopback corpus."""
    mix = (SMOKE_MIX if smoke else MIX) if scenario == "mix" else None
    if smoke:
        images, rounds = (60 if mix else 40), 1
    paths = ensure_corpus(images, corpus)
    bindir, i2d = (None, "not run (--smoke)") if smoke else ensure_img2dataset()
    if mix:
        enter_private_network()  # after what needs the network (pip) and many files; runs again inside
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    command = ("python -m bench.download " + " ".join(sys.argv[1:])).strip()
    config = {
        "command": command,
        "corpus": corpus,
        "scenario": scenario,
        "images": images,
        "latency": latency,
    }
    result: dict = {
        "config": config | {"rounds": rounds, "workers": workers},
        "corpus": corpus_stats(paths),
        "runs": [],
    }
    result["img2dataset_version" if bindir else "img2dataset_error"] = i2d
    if mix:
        result["network"] = check_private_network()
    server = CorpusServer(
        corpus_dir(corpus), images, latency, mix.slow_s if mix else 3.0, any_address=mix is not None
    )
    try:
        compare(result, server, mix, bindir, 0 if smoke else QUIET_WAIT)
    finally:
        server.stop()
    result["summary"] = summarize(result["runs"])
    json_out = (
        Path(json_path)
        if json_path
        else RESULTS / ("smoke" if smoke else "") / f"download{'-mix' if mix else ''}.json"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    json_out.with_suffix(".md").write_text(table)
    print(table)


def compare(result: dict, server: CorpusServer, mix: Mix | None, bindir: Path | None, quiet: float) -> None:
    """img2dataset's fixed cost, then the rounds (img2dataset, then ours), into `result`."""
    cfg = result["config"]
    n = cfg["images"]
    urls, expected = server.urls(n), n
    if mix:
        urls, counts = mix.urls(server, n)
        expected = sum(counts.get(k, 0) for k in SUCCEEDS)
        cfg["mix"] = {
            "counts": counts,
            "expected_successes": expected,
            "timeout_s": mix.timeout,
            "retries": mix.retries,
            "slow_s": mix.slow_s,
        }
    url_list = RESULTS / "tmp" / f"urls-{cfg['scenario']}-{n}.txt"
    url_list.write_text("\n".join(urls) + "\n")
    timeout = max(120.0, n / 5) + (2 * (mix.retries + 1) * mix.timeout + mix.slow_s if mix else 0)
    limits = {"fetch_timeout": mix.timeout, "retries": mix.retries} if mix else {}
    fleet = Fleet(cfg["workers"], RESULTS / "tmp" / "fleet", mix.our_env() if mix else None)
    try:
        result["ours_startup"] = fleet.startup
        if bindir:
            one = RESULTS / "tmp" / "urls-1.txt"
            one.write_text(urls[0] + "\n")
            fixed = run_img2dataset(bindir, one, 1, cfg["workers"], server, 120)
            result["img2dataset_fixed_cost_1_image"] = {
                k: fixed[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")
            }
        warm = RESULTS / "tmp" / "urls-warm.txt"  # a warm-up: connections, the decoders' first images
        warm.write_text("\n".join(server.urls(min(n, 200))) + "\n")
        fleet.run(warm, min(n, 200), server, timeout)
        for round_no in range(1, cfg["rounds"] + 1):
            runs: dict[str, Callable[[], dict]] = {"ours": lambda: fleet.run(url_list, n, server, timeout)}
            if bindir:
                runs = {
                    "img2dataset": lambda: run_img2dataset(
                        bindir, url_list, n, cfg["workers"], server, timeout, **limits
                    )
                } | runs
            for tool, run in runs.items():
                before = wait_quiet(quiet) if quiet else None
                r = run() | {"round": round_no, "expected": expected, "others_before_cores": before}
                result["runs"].append(r)
                rate, cpu = r["images_per_s"], r["cpu_ms_per_image"]
                log(f"round {round_no} {tool}: {rate} img/s, {cpu} CPU-ms/img, {r['success']}/{expected}")
    finally:
        fleet.stop()


if __name__ == "__main__":
    main()
