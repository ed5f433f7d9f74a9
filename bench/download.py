"""Download benchmark: our download stage vs img2dataset, same loopback corpus, same machine, same run.

Run: .venv/bin/python -m bench.download [--images 2000] [--latency 0.05] [--rounds 3] [--workers 2]
                                        [--json bench/results/download.json]
     .venv/bin/python -m bench.download --smoke      (40 images, 1 round, no img2dataset: ~30 s)
     .venv/bin/python -m bench.download --scenario mix --images 1000   (as root)
     .venv/bin/python -m bench.download --scenario mix --smoke   (60 URLs, 2 s timeouts, ours only)

`--scenario mix` is ImageNet's fall11_urls.txt as it is today, mostly dead links (MIX_SHARES): good
images (after the latency), 404s, parked-domain HTML pages, names that do not resolve (*.invalid),
connects that hang (a port whose backlog is full), slow servers (the image dribbled), shuffled; both
tools get the same list, timeout and retry count (MIX). The whole run re-executes itself in a
private network namespace that holds only loopback (`unshare --net`; needs root): nothing leaves the
machine, names fail at once.

What runs, all on 127.0.0.1:
- a threaded keep-alive HTTP server in its own process serving a generated corpus of ImageNet-like
  JPEGs (cached under bench/results/cache/), sleeping `--latency` seconds before each answer;
- img2dataset, installed by this script into its own venv (bench/results/img2dataset-venv; its pins
  never touch ours), as a subprocess: `--processes_count` = our worker count, `--thread_count` 64;
- ours: a redis-server, `--workers` download workers (`python -m workers download -c 64`), the
  producer (`python -m producer submit`), and a counting sink draining the `embed` queue (it
  stands for the embed workers, which are not measured here).
The two tools alternate, `--rounds` times each. Per run: images/s, CPU-seconds per image (all
processes of the tool: img2dataset's whole process tree; our workers + redis-server + producer),
peak RSS (sum over the tool's processes, sampled every 0.2 s), successes. Then single-thread costs
of each step of our path on the same corpus (the clean scenario only), among them the CPU per
response of common.fetching.fetch and of a bare http.client GET, and a markdown table.
Ratios, not absolute numbers, are what to compare: the machine is shared and noisy.
"""

from __future__ import annotations

import base64
import io
import json
import math
import multiprocessing
import os
import random
import resource
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
from urllib.parse import urlsplit

import click
import numpy as np

from bench.common import machine_cpu_s

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"
I2D_VENV = RESULTS / "img2dataset-venv"
CORPUS_VERSION = 1
SIZE = 299
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
THREADS = 64  # img2dataset's --thread_count, and our downloads in flight per worker (-c)
CEILING_SAMPLE = 100  # corpus images for the single-thread step costs (smoke: 20)
QUIET_WAIT = 30.0  # before each run, seconds to wait at most for other jobs' load to drop (smoke: 0)


# --- corpus -----------------------------------------------------------------------------------


def make_jpeg(index: int) -> bytes:
    """One deterministic photo-like JPEG: 400..1600 x 350..1200 (a quarter portrait), smooth colour
    field + flat shapes + sensor noise; quality adjusted so the file lands near 100..300 KB."""
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


def _make_one(index: int) -> tuple[int, bytes]:
    return index, make_jpeg(index)


def corpus_dir() -> Path:
    return CACHE / f"corpus-v{CORPUS_VERSION}"


def ensure_corpus(n: int) -> list[Path]:
    """The first n corpus files, generating (in parallel, once) the ones not cached yet."""
    folder = corpus_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2) as pool:
            for i, data in pool.imap_unordered(_make_one, missing, chunksize=8):
                tmp = paths[i].with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.rename(paths[i])
        log(f"generated {len(missing)} corpus images in {time.perf_counter() - started:.0f} s")
    return paths


def corpus_stats(paths: list[Path]) -> dict:
    """Sizes of the corpus files (bytes and pixels, from the JPEG headers)."""
    from PIL import Image

    sizes = np.array([p.stat().st_size for p in paths])
    pixels = []
    for p in paths:
        with Image.open(p) as im:
            pixels.append(im.size[0] * im.size[1])
    px = np.array(pixels)
    return {
        "images": len(paths),
        "mean_kb": round(sizes.mean() / 1000, 1),
        "kb_p5_p50_p95": [round(float(v) / 1000) for v in np.percentile(sizes, [5, 50, 95])],
        "share_100_300_kb": round(float(np.mean((sizes >= 100e3) & (sizes <= 300e3))), 3),
        "mean_mpix": round(px.mean() / 1e6, 3),
        "mpix_min_max": [round(px.min() / 1e6, 3), round(px.max() / 1e6, 3)],
    }


# --- the image server (its own process) -------------------------------------------------------


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

    def __init__(self, n: int, latency: float, slow_s: float = 3.0, any_address: bool = False):
        parent, child = multiprocessing.get_context("fork").Pipe()
        host = "0.0.0.0" if any_address else "127.0.0.1"  # any: only inside the loopback-only namespace
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(str(corpus_dir()), n, latency, child, slow_s, host), daemon=True
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


# --- the realistic mix (what fall11_urls.txt is today: mostly dead links) ------------------------


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


# --- process accounting from /proc -------------------------------------------------------------


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
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st:
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
    """Samples the summed RSS of the process trees under roots() every `interval` seconds."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.2):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss = sum(st[2] for pid in process_tree(self.roots()) if (st := proc_stat(pid)))
            self.peak = max(self.peak, rss)
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def wait_rusage(
    proc: subprocess.Popen, deadline: float, poll: Callable[[], None] = lambda: None
) -> tuple[int, float, float]:
    """Wait for proc (killing its group past the deadline); (exit code, CPU s of its whole reaped
    tree, time it ended). Calls poll() while waiting."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime, time.perf_counter()
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            deadline = float("inf")
        poll()
        time.sleep(0.02)


def _reaped(proc: subprocess.Popen, now: float) -> tuple[int, float, float] | None:
    """(exit code, CPU seconds, `now`) of a child that has exited, without waiting; else None."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if not pid:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, now


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


class Background:
    """What else used the CPU during a run: the image server, this process (sink, sampler) and
    everything else on the machine (other people's jobs: the machine is shared)."""

    def __init__(self, server: CorpusServer):
        self.server = server
        self.machine0, self.steal0 = machine_cpu_s()
        self.server0 = tree_cpu([server.proc.pid])
        self.self0 = self_cpu_s()

    def finish(self, tool_cpu: float, wall: float) -> dict:
        machine, steal = machine_cpu_s()
        server = tree_cpu([self.server.proc.pid]) - self.server0
        bench = self_cpu_s() - self.self0
        others = max(0.0, machine - self.machine0 - tool_cpu - server - bench)
        return {
            "server_cpu_s": round(server, 2),
            "bench_process_cpu_s": round(bench, 2),
            "others_cores": round(others / wall, 2),
            "steal_cores": round((steal - self.steal0) / wall, 2),
        }


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def log(msg: str) -> None:
    print(f"[bench.download {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- img2dataset -------------------------------------------------------------------------------


def ensure_img2dataset() -> tuple[Path | None, str]:
    """Its venv (created with `python3 -m venv` + `pip install img2dataset` if missing): (bin dir,
    version) or (None, why not)."""
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        log("installing img2dataset into its own venv (bench/results/img2dataset-venv) ...")
        try:
            subprocess.run(
                [shutil.which("python3") or sys.executable, "-m", "venv", str(I2D_VENV)],
                check=True,
                capture_output=True,
                text=True,
            )
            subprocess.run(
                [str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"],
                check=True,
                capture_output=True,
                text=True,
                timeout=1200,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            tail = (getattr(e, "stderr", "") or "")[-2000:]
            return None, f"cannot install img2dataset: {e}\n{tail}"
    try:
        out = subprocess.run(
            [
                str(I2D_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m, cv2; print(m.version('img2dataset'), cv2.__version__)",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return None, f"img2dataset does not import: {(getattr(e, 'stderr', '') or str(e))[-2000:]}"
    version, cv2_version = out.stdout.split()
    return I2D_VENV / "bin", f"img2dataset {version}, opencv {cv2_version}"


def run_img2dataset(
    bindir: Path,
    url_list: Path,
    n: int,
    processes: int,
    threads: int,
    server: CorpusServer,
    timeout: float,
    fetch_timeout: float = 10,
    retries: int = 0,
) -> dict:
    """One img2dataset run over the list; timing, CPU, RSS and successes (`fetch_timeout`, `retries`:
    its --timeout and --retries; it retries every failure, at once)."""
    out = RESULTS / "tmp" / f"i2d-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    per_shard = max(1, math.ceil(n / processes))  # one shard per process: all of them busy
    # A fresh folder each run, in the default incremental mode: img2dataset 1.47's
    # `--incremental_mode overwrite` deletes its own _tmp folder and then retries for ever.
    cmd = [
        str(bindir / "img2dataset"),
        "--url_list",
        str(url_list),
        "--input_format",
        "txt",
        "--output_folder",
        str(out),
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--image_size",
        str(SIZE),
        "--resize_mode",
        "border",
        "--output_format",
        "files",
        "--encode_quality",
        "95",
        "--number_sample_per_shard",
        str(per_shard),
        "--timeout",
        f"{fetch_timeout:g}",
        "--retries",
        str(retries),
        "--enable_wandb",
        "False",
        "--distributor",
        "multiprocessing",
    ]
    env = clean_env(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    log_path = RESULTS / "tmp" / "i2d-last.log"
    with open(log_path, "wb") as logf:
        background = Background(server)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=RESULTS, start_new_session=True
        )
        sampler = Sampler(lambda: [proc.pid])
        sampler.start()
        code, cpu, t_end = wait_rusage(proc, t0 + timeout)
        peak = sampler.stop()
    wall = t_end - t0
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    success = sum(s.get("successes", 0) for s in stats)
    files = len(list(out.glob("**/*.jpg")))
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            if k != "success":
                errors[k] = errors.get(k, 0) + v
    inner = (max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)) if stats else 0
    shutil.rmtree(out, ignore_errors=True)
    result = {
        "tool": "img2dataset",
        "threads": threads,
        "processes": processes,
        "images": n,
        "success": success,
        "files_written": files,
        "failed": n - success,
        "wall_s": round(wall, 2),
        "images_per_s": round(success / wall, 1),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_image": round(cpu / max(success, 1), 5),
        "peak_rss_mb": round(peak / 2**20),
        "exit_code": code,
        "shard_phase_s": round(inner, 2),
        "shard_phase_images_per_s": round(success / inner, 1) if inner else None,
        "steady_images_per_s": round(success / inner, 1) if inner else None,
        **background.finish(cpu, wall),
    }
    if errors:
        result["errors"] = errors
    if code != 0 or not stats:
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return result


# --- ours --------------------------------------------------------------------------------------


class Fleet:
    """A redis-server and `workers` download workers, kept up across rounds (as a fleet is)."""

    def __init__(
        self,
        workers: int,
        concurrency: int,
        workdir: Path,
        extra_env: dict[str, str] | None = None,
    ):
        from testkit.servers import RedisServer, worker_env

        shutil.rmtree(workdir, ignore_errors=True)
        self.workdir = workdir
        self.name = "ours"
        self.redis = RedisServer(workdir / "redis").start()
        self.env = worker_env(
            self.redis.url,
            workdir / "out",
            **{
                # the bench corpus is one host standing for many: the per-host cap must not bind
                "KOALA_PER_HOST_CONNECTIONS": str(concurrency),
                "KOALA_EMBED_QUEUE_LIMIT": str(10**9),  # the sink drains; never hold back
                "KOALA_CHUNK_SIZE": "16",  # the default (testkit.servers sets 4)
                "KOALA_CONNECT_TIMEOUT": "10",
                "KOALA_READ_TIMEOUT": "10",
                "KOALA_DOWNLOAD_DEADLINE": "60",
                "KOALA_RETRY_BACKOFF": "1",
                "KOALA_MAX_BYTES": "25000000",
                "KOALA_MAX_PIXELS": "89478485",
                **(extra_env or {}),
            },
        )
        for var in PROXY_VARS:
            self.env.pop(var, None)
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        started = time.perf_counter()
        for i in range(workers):
            path = workdir / f"dl{i + 1}.log"
            with open(path, "wb") as f:
                self.workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "workers",
                            "download",
                            "-c",
                            str(concurrency),
                            "-n",
                            f"dl{i + 1}@bench",
                        ],
                        cwd=ROOT,
                        env=self.env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            self.logs.append(path)
        for proc, path in zip(self.workers, self.logs, strict=True):
            while "ready." not in path.read_text(errors="replace"):
                if proc.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"download worker did not start:\n{path.read_text()[-2000:]}")
                time.sleep(0.1)
        self.startup_s = round(time.perf_counter() - started, 2)
        self.startup_cpu_s = round(tree_cpu([p.pid for p in self.workers]), 2)
        self.client = self.redis.client()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def reset(self) -> None:
        """FLUSHALL, keeping kombu's routing table (the workers declared their queues only once:
        without their bindings, the next messages would go to kombu's dead-letter queue)."""
        deadline = time.monotonic() + 30
        while self.client.llen("download") or self.client.hlen("unacked"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        bindings = {k: self.client.smembers(k) for k in self.client.scan_iter("_kombu.binding.*")}
        self.client.flushall()
        for key, members in bindings.items():
            if members:
                self.client.sadd(key, *members)

    def run(self, url_list: Path, n: int, server: CorpusServer, timeout: float) -> dict:
        """Submit the list, drain `embed` until every item is downloaded or failed."""
        from common.pictures import images
        from common.state.job import JobState

        self.reset()
        state = JobState(self.client)
        fleet_pids = [*self.worker_pids(), self.redis.proc.pid]
        cpu0 = {pid: tree_cpu([pid]) for pid in fleet_pids}
        background = Background(server)
        producer: list[subprocess.Popen] = []
        sampler = Sampler(lambda: fleet_pids + [p.pid for p in producer if p.returncode is None])
        sampler.start()
        out_path = self.workdir / "submit.json"
        count = failed = payload_bytes = messages = 0
        check = None
        t_first = t_last = 0.0
        sink_cpu0 = time.thread_time()
        t0 = time.perf_counter()
        with open(out_path, "wb") as out:
            producer.append(
                subprocess.Popen(
                    [sys.executable, "-m", "producer", "submit", str(url_list), "--json"],
                    cwd=ROOT,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        prod_usage: tuple[int, float, float] | None = None
        t_done = None
        next_count = 0.0
        while True:
            # The sink stands for the embed stage, which runs elsewhere. A message carries a chunk's
            # images: it counts images, decoding only the envelope and the msgpack body; the first
            # image's pixels are checked as the embed stage reads them.
            batch = self.client.rpop("embed", 64) or []
            taken = 0
            for raw in batch:
                found, problem = _images_in(raw)
                if problem or (check is None and found):
                    check = problem or _check_pixels(found[0], images)
                taken += len(found)
                payload_bytes += len(raw)
            messages += len(batch)
            if taken:
                t_last = time.perf_counter()
                t_first = t_first or t_last
                count += taken
                continue
            now = time.perf_counter()
            if prod_usage is None:
                prod_usage = _reaped(producer[0], now)
            if now >= next_count:
                failed = state.counts()["failed"]
                next_count = now + 0.2
            if count + failed >= n:
                t_done = now
                break
            if now - t0 > timeout:
                break
            time.sleep(0.01)
        sink_cpu = time.thread_time() - sink_cpu0
        failed = state.counts()["failed"]
        if prod_usage is None:
            prod_usage = wait_rusage(producer[0], time.perf_counter() + 60)
        peak = sampler.stop()
        cpu1 = {pid: tree_cpu([pid]) for pid in fleet_pids}
        workers_cpu = sum(cpu1[p] - cpu0[p] for p in self.worker_pids())
        redis_cpu = cpu1[self.redis.proc.pid] - cpu0[self.redis.proc.pid]
        cpu = workers_cpu + redis_cpu + prod_usage[1]
        wall = (t_done or time.perf_counter()) - t0
        result = {
            "tool": self.name,
            "images": n,
            "success": count,
            "failed": failed,
            "wall_s": round(wall, 2),
            "images_per_s": round(count / wall, 1),
            "cpu_s": round(cpu, 2),
            "cpu_s_per_image": round(cpu / max(count, 1), 5),
            "peak_rss_mb": round(peak / 2**20),
            "cpu_s_workers": round(workers_cpu, 2),
            "cpu_s_redis": round(redis_cpu, 2),
            "cpu_s_producer": round(prod_usage[1], 2),
            "producer_wall_s": round(prod_usage[2] - t0, 2),
            "producer_exit": prod_usage[0],
            "sink_cpu_s": round(sink_cpu, 2),
            "first_image_s": round(t_first - t0, 2) if t_first else None,
            "steady_images_per_s": round((count - 1) / (t_last - t_first), 1)
            if t_first and t_last > t_first
            else None,
            **background.finish(cpu, wall),
            "bytes_per_message": round(payload_bytes / max(messages, 1)),
            "images_per_message": round(count / max(messages, 1), 2),
            "payload_check": check,
        }
        if t_done is None:
            result["timed_out"] = True
        if failed:
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


def _images_in(raw: bytes) -> tuple[list[dict], str | None]:
    """The images of one raw `embed` message (kombu JSON envelope -> msgpack body ->
    common.messages.images_of), and what was wrong if it cannot be read."""
    import msgpack

    from common.messages import images_of

    try:
        body = base64.b64decode(json.loads(raw)["body"])
        return images_of(msgpack.unpackb(body, raw=False)), None
    except Exception as e:  # a report, not a crash
        return [], f"cannot decode: {type(e).__name__}: {e}"


def _check_pixels(image: dict, images) -> str:
    """Decode one image's pixels as the embed stage would."""
    try:
        pixels = images.decode_pixels(image["pixels"])
        return f"{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]} ok"
    except Exception as e:  # a report, not a crash
        return f"cannot decode: {type(e).__name__}: {e}"


# --- single-thread costs of our steps (the ceiling) ---------------------------------------------


def _cost(fn: Callable, items: list) -> dict:
    fn(items[0])
    c0, w0 = time.thread_time(), time.perf_counter()
    for x in items:
        fn(x)
    return {
        "cpu_ms": round((time.thread_time() - c0) / len(items) * 1e3, 2),
        "wall_ms": round((time.perf_counter() - w0) / len(items) * 1e3, 2),
    }


def our_ceiling(files: list[Path], urls: list[str], redis_url: str) -> dict:
    """Per-image single-thread cost of each step of our path, on corpus bytes (and loopback)."""
    import msgpack

    from common.celery_app import make_app
    from common.fetching.fetch import fetch, make_session, policy_from_settings
    from common.messages import EMBED_QUEUE, EMBED_TASK, embed_image
    from common.pictures import images
    from common.settings import Settings
    from common.state.job import JobState, connect

    size = (SIZE, SIZE)
    datas = [p.read_bytes() for p in files]
    rgbs = [images.load_rgb(d, size=size) for d in datas]
    payloads = [images.encode_pixels(a) for a in rgbs]
    keys = [f"{i:032x}" for i in range(len(datas))]
    messages = [embed_image({"k": k, "u": u}, p) for k, u, p in zip(keys, urls, payloads, strict=True)]
    settings = Settings(
        broker_url=redis_url, allow_private_addresses=True, per_host_connections=4, embed_queue_limit=10**9
    )
    policy = policy_from_settings(settings)
    session = make_session(policy, 4)
    client = connect(redis_url)
    state = JobState(client)
    pending = [*keys, f"{len(keys):032x}"]  # _cost calls once more to warm up
    state.register(pending, state.new_run())
    app = make_app(settings)
    app.conf.task_send_sent_event = False  # as workers.tasks
    steps = {
        "load_rgb (the worker's path: simplejpeg at a DCT scale + cykooz Lanczos-3 + pad)": _cost(
            lambda d: images.load_rgb(d, size=size), datas
        ),
        "encode_pixels": _cost(images.encode_pixels, rgbs),
        "msgpack of the embed message": _cost(lambda m: msgpack.packb(m, use_bin_type=True), messages),
        "send_task to embed (serialize + LPUSH)": _cost(
            lambda m: app.send_task(
                EMBED_TASK, args=[m], queue=EMBED_QUEUE, argsrepr=f"({m['name']!r})", kwargsrepr="{}"
            ),
            messages,
        ),
        "mark_downloaded (Lua, 1 round trip)": _cost(
            lambda k: state.mark_downloaded_many([pending.pop()]), keys
        ),
        "Redis PING round trip": _cost(lambda k: client.ping(), keys),
        **fetch_costs(urls, policy, session, fetch),
    }
    client.delete(EMBED_QUEUE)
    return {
        "steps": steps,
        "payload_bytes": round(float(np.mean([len(p) for p in payloads]))),
    }


def fetch_costs(urls: list[str], policy, session, fetch: Callable) -> dict:
    """CPU per response over loopback keep-alive (no latency), in one run: common.fetching.fetch on urllib3
    and a bare http.client GET (the floor)."""
    urls = [u + "?nolatency" for u in urls]
    floor = http_client_get(urls[0])
    return {
        "fetch (urllib3 guarded, loopback, no latency)": _cost(lambda u: fetch(u, session, policy), urls),
        "GET with http.client (floor: no guards)": _cost(floor, urls),
    }


def http_client_get(url: str) -> Callable[[str], bytes]:
    """A GET on one kept-alive http.client connection to url's host: no guards, no pool."""
    import http.client

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def get(u: str) -> bytes:
        path = urlsplit(u)
        conn.request("GET", f"{path.path}?{path.query}")
        return conn.getresponse().read()

    return get


# --- report -------------------------------------------------------------------------------------


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 5) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians per tool (per img2dataset thread count) and the ratios ours / best img2dataset."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        name = r["tool"] if r["tool"].startswith("ours") else f"img2dataset T={r['threads']}"
        groups.setdefault(name, []).append(r)
    med = {
        name: {
            k: median(rows, k)
            for k in (
                "images_per_s",
                "steady_images_per_s",
                "cpu_s_per_image",
                "peak_rss_mb",
                "wall_s",
                "others_cores",
            )
        }
        | {"runs": len(rows), "all_images": all(r["success"] == _expected(r) for r in rows)}
        for name, rows in groups.items()
    }
    out: dict = {"medians": med}
    i2d = [k for k in med if k.startswith("img2dataset")]
    if "ours" in med and i2d and all(med[k]["images_per_s"] for k in i2d):
        best = max(i2d, key=lambda k: med[k]["images_per_s"] or 0)
        out["ratio_vs"] = best
        out |= _ratios(med["ours"], med[best])
    return out


def _expected(run: dict) -> int:
    """Images the run could deliver (the mix's good and slow URLs; every image when clean)."""
    return run.get("expected", run["images"])


def _ratios(a: dict, b: dict) -> dict:
    out = {
        "ratio_images_per_s": round(a["images_per_s"] / b["images_per_s"], 2),
        "ratio_cpu_s_per_image": round(a["cpu_s_per_image"] / b["cpu_s_per_image"], 2),
    }
    if a.get("steady_images_per_s") and b.get("steady_images_per_s"):
        out["ratio_steady_images_per_s"] = round(a["steady_images_per_s"] / b["steady_images_per_s"], 2)
    return out


def mix_lines(result: dict) -> list[str]:
    """What the mix was and how each tool's last run failed (empty for the clean scenario)."""
    mix = result["config"].get("mix")
    if not mix:
        return []
    kinds = ", ".join(f"{k} {v}" for k, v in mix["counts"].items())
    lines = [
        f"Mix of {result['config']['images']} URLs: {kinds}; {mix['expected_successes']} can succeed. "
        f"Both tools: timeout {mix['timeout_s']:g} s, "
        f"{mix['retries']} retries (img2dataset retries every failure at once; ours timeouts, "
        f"connection and DNS errors, 429 and 5xx, after a {mix['our_retry_backoff_s']} s backoff "
        f"doubling, within a {mix['our_deadline_s']} s deadline). Slow servers dribble an image over "
        f"{mix['slow_s']:g} s. Run in a private network namespace (loopback only; "
        f"{result.get('network', {}).get('dns_failure', '')}). images/s and CPU-s per image count "
        "successful images only: the dead links' cost is in them.",
        "",
    ]
    last: dict[str, dict] = {}
    for r in result["runs"]:
        last[r["tool"] if r["tool"].startswith("ours") else f"img2dataset T={r['threads']}"] = r
    for name, r in last.items():
        why = r.get("failures_by_reason") or r.get("errors") or {}
        top = sorted(why.items(), key=lambda kv: -kv[1])[:6]
        listed = "; ".join(f"{k[:70]}: {v}" for k, v in top) or "none"
        lines.append(f"- {name}, last run's failures: {listed}")
    return [*lines, ""]


def markdown(result: dict) -> str:
    """The tables printed to stdout and written to download.md."""
    cfg = result["config"]
    title = "clean corpus" if cfg.get("scenario", "clean") == "clean" else "realistic mix (mostly dead links)"
    lines = [
        f"## Download + resize to {SIZE}x{SIZE}, {title}: ours vs img2dataset",
        "",
        f"`{cfg['command']}`  ",
        f"{cfg['images']} images ({result['corpus']['mean_kb']} KB, "
        f"{result['corpus']['mean_mpix']} Mpix on average), {cfg['latency']} s latency per "
        f"response, {cfg['workers']} processes each, {os.cpu_count()} CPU cores; "
        f"{result.get('img2dataset_version') or 'img2dataset not run'}",
        "",
        "images/s: whole command (img2dataset: its start-up included; ours: from `submit` to the "
        "last image, workers already up); steady: img2dataset's own in-shard rate, ours from the "
        "first image out to the last; CPU-s per image and cores used: all processes of the tool "
        "(img2dataset's process tree; our workers + redis-server + producer), not the image server "
        "nor the counting sink; others: cores used by other jobs on this shared machine during "
        "the run.",
        "",
        *mix_lines(result),
        "| run | tool | images/s | steady images/s | CPU-s per image | cores used | peak RSS MB "
        "| ok / images | wall s | others (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["runs"], 1):
        tool = r["tool"] if r["tool"].startswith("ours") else f"img2dataset T={r['threads']}"
        lines.append(
            f"| {i} | {tool} | {r['images_per_s']} | {r.get('steady_images_per_s')} | "
            f"{r['cpu_s_per_image']:.4f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['peak_rss_mb']} | "
            f"{r['success']} / {_expected(r)} | "
            f"{r['wall_s']} | {r.get('others_cores')} |"
        )
    summary = result["summary"]
    lines += [
        "",
        "| median | images/s | steady images/s | CPU-s per image | peak RSS MB | runs | all images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["medians"].items():
        lines.append(
            f"| {name} | {m['images_per_s']} | {m['steady_images_per_s']} | "
            f"{m['cpu_s_per_image']:.4f} | {m['peak_rss_mb']} | {m['runs']} | "
            f"{'yes' if m['all_images'] else 'NO'} |"
        )
    fixed = result.get("img2dataset_fixed_cost_1_image")
    if fixed:
        lines += [
            "",
            f"img2dataset's fixed cost (a 1-image run): {fixed['wall_s']} s, "
            f"{fixed['cpu_s']} CPU-s, {fixed['peak_rss_mb']} MB. "
            "Our workers' start-up (not in our runs): "
            f"{result['ours_startup']['wall_s']} s, {result['ours_startup']['cpu_s']} CPU-s.",
        ]
    lines += _ratio_lines(result, summary)
    if result.get("img2dataset_error"):
        lines += ["", f"img2dataset not measured: {result['img2dataset_error']}"]
    lines += _ceiling_lines(result.get("ceiling", {}), cfg)
    return "\n".join(lines) + "\n"


def _ratio_lines(result: dict, summary: dict) -> list[str]:
    """markdown's ours-vs-img2dataset ratios."""
    lines: list[str] = []
    if "ratio_images_per_s" in summary:
        lines += [
            "",
            f"**ours / {summary['ratio_vs']}: images/s x{summary['ratio_images_per_s']}, "
            f"CPU-s per image x{summary['ratio_cpu_s_per_image']}** (medians; targets: "
            + (
                "images/s x1 or more"
                if result["config"].get("scenario") == "mix"
                else "images/s x2 or more, whole and steady; CPU-s per image x0.5 or less"
            )
            + ")",
        ]
        if "ratio_steady_images_per_s" in summary:
            lines.append(
                f"Steady state (start-ups excluded on both sides): images/s "
                f"x{summary['ratio_steady_images_per_s']}"
            )
    return lines


def _ceiling_lines(ceiling: dict, cfg: dict) -> list[str]:
    """markdown's single-thread step costs (none when not measured)."""
    if not ceiling:
        return []
    lines = [
        "",
        f"Single-thread cost per image ({cfg['ceiling_sample']} corpus images, this process, "
        "no network unless said):",
        "",
        "| step | CPU ms | wall ms |",
        "|---|---|---|",
    ]
    for name, c in ceiling.get("ours", {}).get("steps", {}).items():
        lines.append(f"| ours: {name} | {c['cpu_ms']} | {c['wall_ms']} |")
    return lines


@click.command()
@click.option("--images", type=int, default=2000, show_default=True, help="corpus size (mix: URLs)")
@click.option("--latency", type=float, default=0.05, show_default=True, help="seconds before each answer")
@click.option("--rounds", type=int, default=3, show_default=True, help="runs of each tool, alternating")
@click.option(
    "--workers", type=int, default=2, show_default=True, help="our download workers = img2dataset processes"
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
    help="default bench/results/download[-mix][-smoke].json",
)
def main(
    images: int, latency: float, rounds: int, workers: int, scenario: str, smoke: bool, json_path: str | None
) -> None:
    """Download + resize throughput and CPU: ours vs img2dataset on a loopback corpus."""
    mix = (SMOKE_MIX if smoke else MIX) if scenario == "mix" else None
    if smoke:
        images, rounds = (60 if mix else 40), 1
    if mix:
        leave_the_network(images, smoke)
    default_name = f"download{'-mix' if mix else ''}{'-smoke' if smoke else ''}.json"
    json_out = Path(json_path) if json_path else RESULTS / default_name
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    paths = ensure_corpus(images)
    sample = 0 if mix else (20 if smoke else CEILING_SAMPLE)  # the step costs are the clean scenario's
    config = config_of(scenario, images, latency, rounds, workers, sample)
    result: dict = {"config": config, "corpus": corpus_stats(paths), "runs": []}
    if mix:
        result["network"] = check_private_network()
    bindir = _find_img2dataset(result, smoke)
    server = CorpusServer(images, latency, mix.slow_s if mix else 3.0, any_address=mix is not None)
    try:
        compare(result, server, mix, bindir, paths, 0 if smoke else QUIET_WAIT)
    finally:
        server.stop()
    result["summary"] = summarize(result["runs"])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    json_out.with_suffix(".md").write_text(table)
    print(table)


def leave_the_network(images: int, smoke: bool) -> None:
    """Before the mix: what needs the network (pip) or many files, then the private namespace."""
    ensure_corpus(images)
    if not smoke:
        ensure_img2dataset()
    enter_private_network()


def config_of(scenario: str, images: int, latency: float, rounds: int, workers: int, sample: int) -> dict:
    """The run's settings, as the JSON and the tables report them."""
    return {
        "command": ("python -m bench.download " + " ".join(sys.argv[1:])).strip(),
        "scenario": scenario,
        "images": images,
        "latency": latency,
        "rounds": rounds,
        "workers": workers,
        "concurrency": THREADS,
        "img2dataset_threads": [THREADS],
        "ceiling_sample": sample,
        "cpu_count": os.cpu_count(),
        "per_host_connections": THREADS,
        "chunk_size": 16,
    }


def compare(
    result: dict, server: CorpusServer, mix: Mix | None, bindir: Path | None, paths: list[Path], quiet: float
) -> None:
    """The rounds (img2dataset, then ours) and our single-thread step costs, into `result`."""
    cfg = result["config"]
    n, workers = cfg["images"], cfg["workers"]
    urls = server.urls(n)
    url_list, expected = write_url_list(result, server, mix, urls)
    timeout = max(120.0, n / 5) + (2 * (mix.retries + 1) * mix.timeout + mix.slow_s if mix else 0)
    limits = {"fetch_timeout": mix.timeout, "retries": mix.retries} if mix else {}
    fleet = Fleet(workers, THREADS, RESULTS / "tmp" / "fleet", mix.our_env() if mix else None)
    try:
        result["ours_startup"] = {"wall_s": fleet.startup_s, "cpu_s": fleet.startup_cpu_s}
        if bindir:
            result["img2dataset_fixed_cost_1_image"] = img2dataset_fixed_cost(
                bindir, urls[0], workers, server
            )
        for round_no in range(1, cfg["rounds"] + 1):
            if bindir:
                result["runs"].append(
                    one_run(
                        f"round {round_no} img2dataset T={THREADS}",
                        lambda: run_img2dataset(
                            bindir, url_list, n, workers, THREADS, server, timeout, **limits
                        ),
                        round_no,
                        expected,
                        quiet,
                    )
                )
            ours = one_run(
                f"round {round_no} ours",
                lambda: fleet.run(url_list, n, server, timeout),
                round_no,
                expected,
                quiet,
            )
            result["runs"].append(ours)
        if cfg["ceiling_sample"]:
            result["ceiling"] = _ceilings(paths[: cfg["ceiling_sample"]], urls, fleet)
    finally:
        fleet.stop()


def write_url_list(result: dict, server: CorpusServer, mix: Mix | None, urls: list[str]) -> tuple[Path, int]:
    """The URL list both tools get (clean: the corpus; mix: its kinds shuffled) and how many can succeed."""
    cfg = result["config"]
    path = RESULTS / "tmp" / f"urls-{cfg['scenario']}-{cfg['images']}.txt"
    if mix is None:
        path.write_text("\n".join(urls) + "\n")
        return path, cfg["images"]
    mixed, counts = mix.urls(server, cfg["images"])
    expected = sum(counts.get(k, 0) for k in SUCCEEDS)
    cfg["mix"] = {
        "counts": counts,
        "expected_successes": expected,
        "timeout_s": mix.timeout,
        "retries": mix.retries,
        "slow_s": mix.slow_s,
        "our_deadline_s": 60,
        "our_retry_backoff_s": 1,
    }
    path.write_text("\n".join(mixed) + "\n")
    return path, expected


def one_run(label: str, run: Callable[[], dict], round_no: int, expected: int, quiet: float) -> dict:
    """One run, after waiting (at most `quiet` s) for a quiet machine; logged, with its round."""
    before = wait_quiet(quiet) if quiet else None
    r = run()
    log(
        f"{label}: {r['images_per_s']} img/s, {r['cpu_s_per_image']:.4f} CPU-s/img, {r['success']}/{expected}"
    )
    return {"round": round_no, "others_before_cores": before, "expected": expected, **r}


def img2dataset_fixed_cost(bindir: Path, url: str, workers: int, server: CorpusServer) -> dict:
    """img2dataset's start-up: wall, CPU and peak RSS of a run over one URL."""
    path = RESULTS / "tmp" / "urls-1.txt"
    path.write_text(url + "\n")
    fixed = run_img2dataset(bindir, path, 1, workers, THREADS, server, 120)
    return {k: fixed[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")}


def _find_img2dataset(result: dict, skip: bool) -> Path | None:
    """img2dataset's bin folder (None when skipped or missing); its version or error goes into `result`."""
    if skip:
        return None
    bindir, info = ensure_img2dataset()
    result["img2dataset_version" if bindir else "img2dataset_error"] = info
    if bindir is None:
        log(info)
    return bindir


def _ceilings(sample: list[Path], urls: list[str], fleet: Fleet) -> dict:
    """Single-thread step costs of our path on `sample` (corpus files and their URLs)."""
    fleet.reset()
    return {"ours": our_ceiling(sample, urls[: len(sample)], fleet.redis.url)}


if __name__ == "__main__":
    main()
