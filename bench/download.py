"""Download benchmark: our download workers vs img2dataset, alternating, on one loopback corpus served
by a process of its own (cached in bench/results/cache/: `photos`, testkit.corpus.photo_jpeg, the size
users download; `imagenet`, testkit.corpus.imagenet_jpeg; `small`, the photos at 0.4 of each side: each
image ~1/3 the CPU, as on a faster machine, where the per-image overheads weigh more); `--scenario mix`:
mostly dead links (MIX_SHARES), the same limits for both, in a network namespace holding only loopback.
img2dataset runs from its own venv; ours is a redis-server, WORKERS download workers at their default
settings, the producer and a sink draining `embed`.

`--threads`: also where each worker's CPU goes by thread (the kernel's per-thread clocks, the threads
named by py-spy, installed from PyPI into bench/results/py-spy-venv the first time).
`--against DIR`: this checkout's workers against another checkout's (e.g. `git worktree add DIR REV`),
alternating, instead of img2dataset: an A/B of a change, by the same method.

Run: .venv/bin/python -m bench.download [--corpus photos|imagenet|small] [--scenario mix] [--images 2000]
     [--rounds 3] [--against DIR] [--threads] [--json PATH] [--smoke]
     (mix as root; smoke: 40 images or 60 URLs, ours only)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import numpy as np

from bench import common
from bench.common import CACHE, RESULTS, ROOT, finish, log, machine_cpu_s, md_table, options

I2D_VENV, PY_SPY_VENV, TMP = RESULTS / "img2dataset-venv", RESULTS / "py-spy-venv", RESULTS / "tmp"
CORPORA = {"photos": "photos-v1", "imagenet": "corpus-v1", "small": "small-v1"}  # name -> cache folder
SMALL = 0.4  # the small corpus: the photos at this fraction of each side
SIZE, THREADS = 299, 64  # the output side; img2dataset's --thread_count
WORKERS, LATENCY = 2, 0.05  # our download workers = img2dataset's processes; seconds before each answer
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# what testkit.servers.worker_env sets for the tests (short timeouts, small limits, chunks of 4)
TEST_SETTINGS = "CONNECT_TIMEOUT READ_TIMEOUT DOWNLOAD_DEADLINE RETRY_BACKOFF MAX_BYTES MAX_PIXELS CHUNK_SIZE"
TEST_SETTINGS = tuple(f"KOALA_{s}" for s in (*TEST_SETTINGS.split(), "BLOCKED_NETWORKS"))
QUIET_WAIT = 30.0  # before each run, seconds to wait at most for other jobs' load to drop (smoke: 0)
CALIBRATION_IMAGES = 20  # corpus files timed before each run (calibrate)


def _make_one(job: tuple[str, int]) -> tuple[int, bytes]:
    from testkit.corpus import imagenet_jpeg, photo_jpeg, shrunk_jpeg

    name, index = job
    if name == "small":  # from the photos' cache where it has the file (a photo takes ~0.5 s to make)
        cached = CACHE / CORPORA["photos"] / f"{index:05d}.jpg"
        return index, shrunk_jpeg(cached.read_bytes() if cached.exists() else photo_jpeg(index), SMALL)
    return index, (photo_jpeg if name == "photos" else imagenet_jpeg)(index)


def ensure_corpus(n: int, name: str) -> list[Path]:
    """The first n files of a corpus, generating (in parallel, once) the ones not cached yet."""
    (folder := CACHE / CORPORA[name]).mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    if missing := [i for i, p in enumerate(paths) if not p.exists()]:
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

    from testkit.corpus import is_progressive

    sizes, pixels, wide, progressive = [], [], [], 0
    for p in paths:
        sizes.append(p.stat().st_size)
        with Image.open(p) as im:
            pixels.append(im.size[0] * im.size[1])
            wide.append(im.size[0] / im.size[1])
            progressive += is_progressive(im)
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


def _serve(folder: str, n: int, conn, slow_s: float, host: str) -> None:
    """Serve /img/<i>.jpg from memory after LATENCY s; for the mix also /html/... (a parked-domain page),
    /slow/<i>.jpg (dribbled over `slow_s` s) and a second port whose backlog is full (connects hang)."""
    files = {f"{i:05d}.jpg": (Path(folder) / f"{i:05d}.jpg").read_bytes() for i in range(n)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients that want it

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            kind, name = self.path.partition("?")[0].strip("/").partition("/")[::2]
            body = files.get(name.rsplit("/", 1)[-1])
            time.sleep(LATENCY)
            if kind == "html":
                self.answer(200, "text/html", b"<html><body>This domain is for sale</body></html>")
            elif body is not None:
                self.answer(200, "image/jpeg", body, dribble=slow_s if kind == "slow" else 0.0)
            else:
                self.answer(404, "text/plain", b"not found")

        def answer(self, code: int, ctype: str, body: bytes, dribble: float = 0.0) -> object:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not dribble:
                return self.wfile.write(body)
            step = math.ceil(len(body) / 20)
            for i in range(0, len(body), step):  # 20 pieces, evenly over `dribble` seconds
                self.wfile.write(body[i : i + step])
                time.sleep(dribble / 20)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # many clients connect at once; the default 5 drops SYNs

    httpd, hang = Server((host, 0), Handler), socket.socket()
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

    def __init__(self, folder: Path, n: int, slow_s: float, any_address: bool):
        parent, child = multiprocessing.get_context("fork").Pipe()
        host = "0.0.0.0" if any_address else "127.0.0.1"  # any: only inside the loopback-only namespace
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(str(folder), n, child, slow_s, host), daemon=True
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


# good (an image after the latency), slow (the image dribbled over slow_s), http404, html (a parked-domain
# page), dns (a name that does not resolve), hang (a port whose backlog is full: the connect hangs)
MIX_SHARES = {"good": 0.40, "http404": 0.25, "dns": 0.20, "html": 0.05, "slow": 0.05, "hang": 0.05}
SUCCEEDS, NETNS_FLAG = ("good", "slow"), "KOALA_BENCH_NETNS"
MIX = {"timeout_s": 10, "retries": 1, "slow_s": 3}  # both tools' limits on the mix
SMOKE_MIX = {"timeout_s": 2, "retries": 1, "slow_s": 1}


def mix_urls(server: CorpusServer, n: int, seed: int = 11) -> tuple[list[str], dict[str, int]]:
    """n URLs in MIX_SHARES (shuffled, the same list every run), and how many of each kind. A slow or
    dead server is a host of its own (an address of 127.0.0.0/8), as on the web: it must not use up the
    per-host slots of the host that serves the good images."""
    counts = {kind: int(share * n) for kind, share in MIX_SHARES.items()}
    counts["good"] += n - sum(counts.values())
    kinds = [kind for kind, c in counts.items() for _ in range(c)]
    random.Random(seed).shuffle(kinds)
    urls = []
    for i, kind in enumerate(kinds):
        own_host = f"127.{1 + i // 62500}.{i // 250 % 250 + 1}.{i % 250 + 1}"
        urls.append(
            {
                "good": f"{server.base}/img/{i:05d}.jpg",
                "slow": f"http://{own_host}:{server.port}/slow/{i:05d}.jpg",
                "http404": f"{server.base}/img/gone-{i:05d}.jpg",
                "html": f"{server.base}/html/{i:05d}",
                "dns": f"http://img{i}.host{i % 97}.invalid/{i:05d}.jpg",
                "hang": f"http://{own_host}:{server.hang_port}/img/{i:05d}.jpg",
            }[kind]
        )
    return urls, counts


def enter_private_network() -> None:
    """Re-run this command in a new network namespace holding only loopback (no packet leaves the
    machine, names fail at once), where every process of the run starts. Needs root, unshare and ip."""
    if os.environ.get(NETNS_FLAG):
        return
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not (unshare and ip):
        raise click.ClickException("--scenario mix needs unshare (util-linux) and ip (iproute2)")
    log("entering a private network namespace (loopback only)")
    inner = ["sh", "-c", f'{ip} link set lo up && exec "$@"', "sh", sys.executable, "-m", "bench.download"]
    os.execve(unshare, [unshare, "--net", "--", *inner, *sys.argv[1:]], {**os.environ, NETNS_FLAG: "1"})


def check_private_network() -> dict:
    """Refuse to run the mix unless the network has no way out and names fail fast."""
    with socket.socket() as probe:
        probe.settimeout(1)
        code = probe.connect_ex(("192.0.2.1", 80))  # TEST-NET-1: must be unreachable here
    if code != errno.ENETUNREACH:
        raise click.ClickException(f"a route leaves this namespace ({os.strerror(code)}); refusing the mix")
    started = time.monotonic()
    try:
        socket.getaddrinfo("koala-bench.invalid", 80)
    except socket.gaierror as e:
        dns = f"{e.strerror} in {time.monotonic() - started:.3f} s"
        return {"outside_address": os.strerror(code), "dns_failure": dns}
    raise click.ClickException("koala-bench.invalid resolves here; refusing to run the mix")


def tree_stats(roots: list[int]) -> list[tuple[int, float, float, int]]:
    """common.proc_stat of the roots and of all their live (or not yet reaped) descendants."""
    stats = {int(e): st for e in os.listdir("/proc") if e.isdigit() and (st := common.proc_stat(int(e)))}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st[0], []).append(pid)
    out, todo = [], [r for r in roots if r]
    while todo:
        pid = todo.pop()
        out += [stats[pid]] if pid in stats else []
        todo += children.get(pid, [])
    return out


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of the trees: their processes and the children they reaped."""
    return sum(st[1] + st[2] for st in tree_stats(roots))


class Measure(threading.Thread):
    """What a run uses: every 0.1 s the CPU seconds of the process trees under roots(), the machine's
    busy CPU seconds and the trees' RSS (its peak kept); and what the image server, this process (sink,
    sampler) and everything else on the machine (other jobs: it may be shared) used meanwhile."""

    def __init__(self, roots: Callable[[], list[int]], server: CorpusServer):
        super().__init__(daemon=True)
        self.roots, self.server, self.done, self.peak = roots, server.proc.pid, threading.Event(), 0
        self.machine0, self.server0 = machine_cpu_s()[0], tree_cpu([self.server])
        self.self0 = time.process_time()
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, tool CPU s, machine CPU s)
        self.sample()
        self.start()

    def sample(self) -> None:
        stats = tree_stats(self.roots())
        self.samples.append((time.perf_counter(), sum(s[1] + s[2] for s in stats), machine_cpu_s()[0]))
        self.peak = max(self.peak, sum(s[3] for s in stats))

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()

    def result(self, n: int, success: int, wall: float, cpu: float, span: tuple) -> dict:
        """The figures of every run; `span` = (start, end, images in between) of the tool's steady span."""
        (t0, t1, images), (t, tool, machine) = span, np.array(self.samples).T
        busy = lambda y: round(float(np.interp(t1, t, y) - np.interp(t0, t, y)) / (t1 - t0), 2)  # noqa: E731
        steady = bool(t0 and t1 and t1 - t0 >= 0.3)
        server, bench = tree_cpu([self.server]) - self.server0, time.process_time() - self.self0
        others = max(0.0, machine_cpu_s()[0] - self.machine0 - cpu - server - bench)
        return {
            "images": n,
            "success": success,
            "wall_s": round(wall, 2),
            "images_per_s": round(success / wall, 1),
            "steady_images_per_s": round(images / (t1 - t0), 1) if steady else None,
            "cpu_s": round(cpu, 2),
            "cpu_ms_per_image": round(1000 * cpu / max(success, 1), 2),
            "busy_cores": round(cpu / wall, 2),
            "steady_busy_cores": busy(tool) if steady else None,
            "steady_machine_cores": busy(machine) if steady else None,
            "peak_rss_mb": round(self.peak / 2**20),
            "server_cpu_s": round(server, 2),
            "bench_cpu_s": round(bench, 2),
            "others_cores": round(others / wall, 2),
        }


def calibrate(paths: list[Path]) -> float:
    """One thread's CPU-ms per image decoding and resizing the first corpus files (the product's
    `load_rgb`): compares the machine's speed across runs, which the tools' ratio does not need."""
    from common.pictures.images import load_rgb

    datas = [p.read_bytes() for p in paths[:CALIBRATION_IMAGES]]
    load_rgb(datas[-1])  # first-call costs out of the timing
    start = time.thread_time()
    for data in datas:
        load_rgb(data)
    return round(1000 * (time.thread_time() - start) / len(datas), 2)


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


def spawn(command: list[str], log_path: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """A process in a session of its own (its group killed at once), its output into log_path."""
    with open(log_path, "wb") as f:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


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


def ensure_img2dataset() -> tuple[Path | None, str]:
    """Its venv (`python3 -m venv` + `pip install img2dataset` if missing): (bin dir, version) or
    (None, why not)."""
    bindir = I2D_VENV / "bin"
    run = {"check": True, "capture_output": True, "text": True, "timeout": 1200}
    try:
        if not (bindir / "img2dataset").exists():
            venv_with(I2D_VENV, "img2dataset")
        # its bytecode, which pip wrote at install: without it (deleted, or never written) every
        # img2dataset process compiles its imports (PYTHONDONTWRITEBYTECODE: a 1-image run 3 -> 7 s)
        for site in (I2D_VENV / "lib").glob("python3*/site-packages"):
            compile_all = [str(bindir / "python"), "-m", "compileall", "-q", "-j", "0", str(site)]
            subprocess.run(compile_all, capture_output=True, timeout=1200)  # rc 1: some file is not Python 3
        probe = "import importlib.metadata as m, cv2; print(m.version('img2dataset'), cv2.__version__)"
        version, cv2_version = subprocess.run([str(bindir / "python"), "-c", probe], **run).stdout.split()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return None, f"img2dataset not usable: {e}\n{(getattr(e, 'stderr', '') or '')[-2000:]}"
    return bindir, f"img2dataset {version}, opencv {cv2_version}"


def venv_with(venv: Path, package: str) -> None:
    """`python3 -m venv` + `pip install package` (a tool of the bench's own, beside the project's)."""
    log(f"installing {package} into its own venv ({venv.relative_to(ROOT)}) ...")
    run = {"check": True, "capture_output": True, "text": True, "timeout": 1200}
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], **run)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", package], **run)


def ensure_py_spy() -> Path:
    """py-spy in its own venv (installed if missing)."""
    exe = PY_SPY_VENV / "bin" / "py-spy"
    if not exe.exists():
        venv_with(PY_SPY_VENV, "py-spy")
    return exe


def thread_clocks(pids: list[int]) -> dict[int, float]:
    """CPU seconds of every thread of the processes, by thread id (the kernel's schedstat)."""
    clocks = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                clocks[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    return clocks


def thread_names(py_spy: Path, pids: list[int]) -> dict[int, str]:
    """Python's names of the processes' threads, by thread id, digits folded ("decoder-N-answers")."""
    names = {}
    for pid in pids:
        command = [str(py_spy), "dump", "--nonblocking", "--pid", str(pid)]
        dump = subprocess.run(command, capture_output=True, text=True).stdout
        for tid, name in re.findall(r'^Thread (\d+) [^"\n]*"([^"]*)"', dump, re.MULTILINE):
            names[int(tid)] = re.sub(r"\d+", "N", name)
    return names


def run_img2dataset(
    bindir: Path, url_list: Path, n: int, server: CorpusServer, timeout: float, **limits
) -> dict:
    """One img2dataset run over the list (`limits`: fetch_timeout, retries: its --timeout and
    --retries; it retries every failure, at once): the run's figures, its failures by message."""
    out = TMP / f"i2d-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder, in its default incremental mode
    flags = f"--input_format txt --processes_count {WORKERS} --thread_count {THREADS} --image_size {SIZE}"
    flags += " --resize_mode border --output_format files --encode_quality 95 --enable_wandb False"
    flags += f" --distributor multiprocessing --number_sample_per_shard {math.ceil(n / WORKERS)}"  # one each
    flags += f" --timeout {limits.get('fetch_timeout', 10):g} --retries {limits.get('retries', 0)}"
    cmd = [str(bindir / "img2dataset"), "--url_list", str(url_list), "--output_folder", str(out)]
    cmd += flags.split()
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS} | {"no_proxy": "127.0.0.1,localhost"}
    env |= {"NO_PROXY": "127.0.0.1,localhost", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    procs: list[subprocess.Popen] = []
    measure, clock = Measure(lambda: [p.pid for p in procs], server), time.time() - time.perf_counter()
    t0 = time.perf_counter()  # (clock: its stats give wall-clock times)
    procs.append(spawn(cmd, TMP / "i2d-last.log", env | {"PYTHONWARNINGS": "ignore"}, cwd=RESULTS))
    code, cpu = reap(procs[0], t0 + timeout)
    wall = time.perf_counter() - t0
    measure.stop()
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    success = sum(s.get("successes", 0) for s in stats)
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            errors[k] = errors.get(k, 0) + v * (k != "success")
    start = min((s["start_time"] for s in stats), default=0) - clock
    end = max((s["end_time"] for s in stats), default=0) - clock
    shutil.rmtree(out, ignore_errors=True)
    steady = (start, end, success) if stats else (0, 0, 0)
    result = {"tool": "img2dataset", "exit_code": code, **measure.result(n, success, wall, cpu, steady)}
    if errors := {k: v for k, v in errors.items() if v}:
        result["errors"] = errors
    if code != 0 or not stats:
        result["log_tail"] = (TMP / "i2d-last.log").read_text(errors="replace")[-1500:]
    return result


class Fleet:
    """WORKERS download workers at their default settings on `redis`, kept up across rounds (as a
    fleet is), run from the checkout `code` (this one by default) and reported as `tool`; `close`
    stops them."""

    def __init__(
        self,
        redis,
        workdir: Path,
        extra_env: dict[str, str],
        code: Path = ROOT,
        tool: str = "ours",
        py_spy: Path | None = None,
    ):
        from testkit.servers import worker_env

        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.redis_pid, self.workdir, self.client = redis.proc.pid, workdir, redis.client()
        # one loopback host stands for many; the sink drains `embed`: never hold back
        bench_env = {"KOALA_PER_HOST_CONNECTIONS": str(THREADS), "KOALA_EMBED_QUEUE_LIMIT": str(10**9)}
        self.env = worker_env(redis.url, workdir / "out", **(bench_env | extra_env))
        for var in (*PROXY_VARS, *TEST_SETTINGS):  # the product's defaults, not the tests' short ones
            if var not in extra_env:
                self.env.pop(var, None)
        # `python -m workers` and `-m producer` are found in the working directory first
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), self.env.get("PYTHONPATH")]))
        self.code, self.tool, self.py_spy = code, tool, py_spy
        started, logs = time.perf_counter(), [workdir / f"dl{i}.log" for i in range(1, WORKERS + 1)]
        command = [sys.executable, "-m", "workers", "download", "-n"]
        self.workers = [spawn([*command, f"{p.stem}@bench"], p, self.env, code) for p in logs]
        try:
            for proc, path in zip(self.workers, logs, strict=True):
                while "ready." not in path.read_text(errors="replace"):
                    if proc.poll() is not None or time.perf_counter() - started > 120:
                        raise RuntimeError(f"download worker did not start:\n{path.read_text()[-2000:]}")
                    time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        wall, cpu = round(time.perf_counter() - started, 2), round(tree_cpu(self.pids()), 2)
        self.startup = {"wall_s": wall, "cpu_s": cpu}

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
        main = sum(st[1] + st[2] for pid in self.pids() if (st := common.proc_stat(pid)))
        return {
            "workers": main,
            "decoders": tree_cpu(self.pids()) - main,
            "redis": tree_cpu([self.redis_pid]),
        }

    def run(self, url_list: Path, n: int, server: CorpusServer, timeout: float) -> dict:
        """Submit the list, drain `embed` until every item is downloaded or failed. The sink stands for
        the embed stage, which runs elsewhere: it counts the images of each message from its header
        (decoding each whole took ~0.15 of a core from the tools); the first message is decoded as the
        embed stage does, one image's pixels too. The steady span: first message's arrival to the last's."""
        from common.state.job import JobState

        self.reset()
        state, cpu0 = JobState(self.client), self.split()
        clocks0 = thread_clocks(self.pids()) if self.py_spy else {}
        producer: list[subprocess.Popen] = []  # not reaped before the end: its CPU stays in the samples
        measure = Measure(lambda: [*self.pids(), self.redis_pid, *(p.pid for p in producer)], server)
        count = failed = payload_bytes = messages = first_images = 0
        check, t_first, t_last, t_done, next_count = None, 0.0, 0.0, None, 0.0
        t0 = time.perf_counter()
        command = [sys.executable, "-m", "producer", "submit", str(url_list), "--json"]
        producer.append(spawn(command, self.workdir / "submit.json", self.env, self.code))
        while True:
            batch = self.client.rpop("embed", 64) or []
            for raw in batch:
                images = counted(raw)
                if check is None or images is None:
                    images, check = decoded(raw)
                count, payload_bytes, messages = count + images, payload_bytes + len(raw), messages + 1
                t_last = time.perf_counter()
                if not t_first:
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
        measure.stop()
        cpu = {k: v - cpu0[k] for k, v in self.split().items()} | {"producer": producer_cpu}
        total = sum(cpu.values())
        result = {"tool": self.tool, "producer_exit": code}
        result |= measure.result(n, count, wall, total, (t_first, t_last, count - first_images))
        result |= {f"cpu_ms_per_image_{k}": round(1000 * v / max(count, 1), 2) for k, v in cpu.items()}
        result |= {
            "failed": state.counts()["failed"],
            "first_image_s": round(t_first - t0, 2) if t_first else None,
            "images_per_message": round(count / max(messages, 1), 2),
            "bytes_per_image": round(payload_bytes / max(count, 1)),
            "payload_check": check,
        }
        if self.py_spy:
            result["cpu_ms_per_image_by_thread"] = self.by_thread(clocks0, count)
        if t_done is None:
            result["timed_out"] = True
        if result["failed"]:
            result["failures_by_reason"] = state.failures_by_reason()
        return result

    def by_thread(self, before: dict[int, float], images: int) -> dict[str, float]:
        """The workers' CPU-ms per image since `before`, by thread name (threads gone since: "ended")."""
        assert self.py_spy is not None
        clocks, names = thread_clocks(self.pids()), thread_names(self.py_spy, self.pids())
        spent: dict[str, float] = {}
        for tid in clocks.keys() | before.keys():
            name = names.get(tid, "unnamed") if tid in clocks else "ended"
            spent[name] = spent.get(name, 0.0) + clocks.get(tid, 0.0) - before.get(tid, 0.0)
        ranked = sorted(spent.items(), key=lambda kv: -kv[1])
        return {name: round(1000 * s / max(images, 1), 3) for name, s in ranked if s > 0}

    def close(self) -> None:
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def counted(raw: bytes) -> int | None:
    """The images of an `embed` message as its header says (`workers.tasks.publish_embed` writes
    argsrepr "[N images]"), without decoding its body; None when it does not say."""
    at = raw.rfind(b'"argsrepr"')
    head = raw[at + 10 : at + 40].lstrip(b': "[') if at >= 0 else b""
    number, _, rest = head.partition(b" ")
    return int(number) if number.isdigit() and rest.startswith(b"images]") else None


def decoded(raw: bytes) -> tuple[int, str]:
    """The images of one raw `embed` message decoded as the embed stage decodes them (kombu JSON
    envelope -> msgpack body -> common.messages.images_of; the first image's pixels): (images, what
    was found)."""
    import msgpack

    from common.messages import decode_pixels, images_of

    found: list = []
    try:
        found = images_of(msgpack.unpackb(base64.b64decode(json.loads(raw)["body"]), raw=False))
        return len(found), "x".join(str(d) for d in decode_pixels(found[0]["pixels"]).shape) + " ok"
    except Exception as e:  # a report, not a crash
        return len(found), f"cannot decode: {type(e).__name__}: {e}"


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
    "calibration_ms": "calibration CPU-ms",
}
SPLIT = ("workers", "decoders", "redis", "producer")  # our CPU per image by process
METHOD = (
    "images/s: whole command (img2dataset's start-up included; ours from `submit`, workers up) and steady "
    "(img2dataset's in-shard span; ours first image out to last). CPU-ms per image and busy cores (CPU-s "
    "per second): all the tool's processes (ours: workers, decoders, redis-server, producer); machine: every "
    "process in the steady span (the image server and the sink too); others: other jobs on this shared "
    "machine during the run; calibration: one thread's CPU-ms per image decoding and resizing the first "
    f"{CALIBRATION_IMAGES} corpus files, just before the run (the machine's own speed, which drifts between "
    "runs on a shared VM even when others are at 0)."
)


def summarize(runs: list[dict]) -> dict:
    """Medians per tool and the ratios ours / the other tool (img2dataset, or another checkout)."""
    med: dict[str, dict] = {}
    for tool in dict.fromkeys(r["tool"] for r in runs):
        rows = [r for r in runs if r["tool"] == tool]
        values = {k: [r[k] for r in rows if r.get(k) is not None] for k in COLUMNS}
        med[tool] = {k: round(statistics.median(v), 2) if v else None for k, v in values.items()}
        med[tool]["runs"] = len(rows)
        med[tool]["all_images"] = all(r["success"] == r["expected"] for r in rows)
    out: dict = {"medians": med}
    ours, other = med.get("ours"), next((m for tool, m in med.items() if tool != "ours"), None)
    for k in ("images_per_s", "steady_images_per_s", "cpu_ms_per_image", "peak_rss_mb"):
        if ours and other and ours[k] and other[k]:
            out[f"ratio_{k}"] = round(ours[k] / other[k], 2)
    return out


def markdown(result: dict) -> str:
    """The tables printed to stdout and written beside the JSON."""
    cfg, c, summary, runs = result["config"], result["corpus"], result["summary"], result["runs"]
    mix, other = cfg.get("mix"), cfg.get("against") or "img2dataset"
    title = f"{cfg['corpus']} corpus" + (", realistic mix (mostly dead links)" if mix else "")
    lines = [
        f"### Download + resize to {SIZE}x{SIZE}, {title}: ours vs {other}\n\n`{cfg['command']}`  ",
        f"{cfg['images']} {'URLs' if mix else 'images'}: {c['mean_kb']} KB and {c['mean_mpix']} Mpix on "
        f"average ({c['mpix_min_max'][0]}-{c['mpix_min_max'][1]} Mpix, width/height "
        f"{c['aspect_min_max'][0]}-{c['aspect_min_max'][1]}, {c['progressive_share']:.0%} progressive), "
        f"{cfg['latency']} s latency per response, {cfg['workers']} processes each (ours: download workers "
        f"at their default settings, each with its decoder processes), {os.cpu_count()} CPU cores; "
        f"{result.get('img2dataset_version') or 'img2dataset not run'}.\n\n{METHOD}\n",
    ]
    if mix:
        kinds = ", ".join(f"{k} {v}" for k, v in mix["counts"].items())
        lines.append(
            f"Mix: {kinds}; {mix['expected_successes']} can succeed. Both tools: timeout "
            f"{mix['timeout_s']:g} s, {mix['retries']} retries (img2dataset retries every failure at once; "
            "ours timeouts at once; connection and DNS errors, 429 and 5xx after a 1 s backoff). Slow "
            f"servers dribble an image over {mix['slow_s']:g} s. Loopback-only network namespace "
            f"({result['network']['dns_failure']}). Rates and CPU per image count successful images only.\n"
        )
    rows = [
        [i, r["tool"], *(r.get(k) for k in COLUMNS), f"{r['success']} / {r['expected']}"]
        for i, r in enumerate(runs, 1)
    ]
    lines.append(md_table(["run", "tool", *COLUMNS.values(), "ok"], rows) + "\n")
    if ours := [r for r in runs if "cpu_ms_per_image_workers" in r]:
        rows = [[r["tool"], *(r[f"cpu_ms_per_image_{p}"] for p in SPLIT), r["first_image_s"]] for r in ours]
        table = md_table(["run of", *SPLIT, "first image s"], rows)
        lines.append(f"Our CPU-ms per image by process:\n\n{table}\n")
    if by_thread := [r for r in runs if "cpu_ms_per_image_by_thread" in r]:
        names = list(dict.fromkeys(n for r in by_thread for n in r["cpu_ms_per_image_by_thread"]))
        rows = [[n, *(r["cpu_ms_per_image_by_thread"].get(n, 0) for r in by_thread)] for n in names]
        table = md_table(["thread", *(f"{r['tool']} r{r['round']}" for r in by_thread)], rows)
        lines.append(
            "The workers' own processes (not their decoders), CPU-ms per image by thread (both workers; the "
            f"kernel's thread clocks, Python's thread names by py-spy; digits folded to N):\n\n{table}\n"
        )
    rows = [
        [tool, *(m[k] for k in COLUMNS), m["runs"], "yes" if m["all_images"] else "NO"]
        for tool, m in summary["medians"].items()
    ]
    lines.append(md_table(["median", *COLUMNS.values(), "runs", "all images"], rows))
    if fixed := result.get("img2dataset_fixed_cost_1_image"):
        start = result["ours_startup"]
        lines.append(
            f"\nimg2dataset's fixed cost (a 1-image run): {fixed['wall_s']} s, {fixed['cpu_s']} CPU-s. Our "
            f"workers' start-up (not in our runs): {start['wall_s']} s, {start['cpu_s']} CPU-s."
        )
    if "ratio_images_per_s" in summary:
        targets = "x1 or more" if mix else "x2 or more whole and steady; CPU per image x0.5 or less"
        lines.append(
            f"\n**ours / {other} (medians): images/s x{summary['ratio_images_per_s']}, steady "
            f"x{summary.get('ratio_steady_images_per_s')}, CPU per image "
            f"x{summary['ratio_cpu_ms_per_image']}, peak RSS x{summary['ratio_peak_rss_mb']}**"
            + ("" if cfg.get("against") else f" (targets: images/s {targets})")
        )
    for r in runs[-2:] if mix else []:
        why = sorted((r.get("failures_by_reason") or r.get("errors") or {}).items(), key=lambda kv: -kv[1])
        listed = "; ".join(f"{k[:70]}: {v}" for k, v in why[:6])
        lines.append(f"\n{r['tool']}, last run's failures: {listed or 'none'}")
    if result.get("img2dataset_error"):
        lines.append(f"\nimg2dataset not measured: {result['img2dataset_error']}")
    return "\n".join(lines)


@click.command()
@click.option("--images", type=int, default=2000, show_default=True, help="corpus size (mix: URLs)")
@click.option("--rounds", type=int, default=3, show_default=True, help="runs of each tool, alternating")
@click.option("--corpus", type=click.Choice(sorted(CORPORA)), default="photos", show_default=True)
@click.option("--scenario", type=click.Choice(["clean", "mix"]), default="clean", show_default=True)
@click.option(
    "--against",
    type=click.Path(file_okay=False, exists=True, resolve_path=True, path_type=Path),
    default=None,
    help="another checkout's workers instead of img2dataset (an A/B of a change)",
)
@click.option("--threads", is_flag=True, help="also our workers' CPU by thread (installs py-spy)")
@options
def main(
    images: int,
    rounds: int,
    corpus: str,
    scenario: str,
    against: Path | None,
    threads: bool,
    json_path: Path | None,
    smoke: bool,
) -> None:
    """Download + resize throughput, CPU and busy cores: ours vs img2dataset (or vs another checkout)
    on a loopback corpus (smoke: 40 images, mix 60 URLs and 2 s timeouts; 1 round, no img2dataset)."""
    mix = (SMOKE_MIX if smoke else MIX) if scenario == "mix" else None
    if smoke:
        images, rounds = (60 if mix else 40), 1
    paths = ensure_corpus(images, corpus)
    if against:
        bindir, i2d = None, "not run (--against)"
    else:
        bindir, i2d = (None, "not run (--smoke)") if smoke else ensure_img2dataset()
    if mix:
        enter_private_network()  # after what needs the network (pip) and many files; runs again inside
    TMP.mkdir(parents=True, exist_ok=True)
    command = ("python -m bench.download " + " ".join(sys.argv[1:])).strip()
    config = {"command": command, "corpus": corpus, "scenario": scenario, "images": images}
    config |= {"latency": LATENCY, "rounds": rounds, "workers": WORKERS}
    if against:
        config["against"] = checkout_name(against)
    result: dict = {"config": config, "corpus": corpus_stats(paths)}
    result |= {"runs": [], "img2dataset_version" if bindir else "img2dataset_error": i2d}
    if mix:
        result["network"] = check_private_network()
    server = CorpusServer(CACHE / CORPORA[corpus], images, mix["slow_s"] if mix else 3.0, mix is not None)
    try:
        py_spy = ensure_py_spy() if threads else None
        compare(result, server, mix, bindir, 0 if smoke else QUIET_WAIT, paths, against, py_spy)
    finally:
        server.stop()
    result["summary"] = summarize(result["runs"])
    name = ("download-mix" if mix else "download") + ("-against" if against else "")
    finish(name, result, json_path, smoke, markdown(result))


def checkout_name(code: Path) -> str:
    """`ours@<commit>` of a checkout (`+changes` when its tracked files differ from the commit)."""
    git = ["git", "-C", str(code)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode == 1
    name = commit.stdout.strip() or code.name  # not a git checkout: its folder's name
    return f"ours@{name}" + ("+changes" if changed else "")


def url_list(name: str, urls: list[str]) -> Path:
    (path := TMP / f"{name}.txt").write_text("\n".join(urls) + "\n")
    return path


def compare(
    result: dict,
    server: CorpusServer,
    mix: dict | None,
    bindir: Path | None,
    quiet: float,
    paths: list[Path],
    against: Path | None = None,
    py_spy: Path | None = None,
) -> None:
    """img2dataset's fixed cost, then the rounds (img2dataset, then ours; or the other checkout's
    workers, then ours, each fleet on a Redis of its own), into `result`."""
    cfg, n = result["config"], result["config"]["images"]
    urls, expected, env, limits, timeout = server.urls(n), n, {}, {}, max(120.0, n / 5)
    if mix:
        urls, counts = mix_urls(server, n)
        expected = sum(counts[k] for k in SUCCEEDS)
        cfg["mix"] = {"counts": counts, "expected_successes": expected, **mix}
        env = {f"KOALA_{k}_TIMEOUT": f"{mix['timeout_s']:g}" for k in ("CONNECT", "READ")}
        env["KOALA_RETRIES"] = str(mix["retries"])
        limits = {"fetch_timeout": mix["timeout_s"], "retries": mix["retries"]}
        timeout += 2 * (mix["retries"] + 1) * mix["timeout_s"] + mix["slow_s"]
    listed = url_list(f"urls-{cfg['scenario']}-{n}", urls)
    checkouts = [(cfg["against"], against)] if against else []
    with contextlib.ExitStack() as stack:
        fleets = {}
        for tool, code in [*checkouts, ("ours", ROOT)]:
            redis = stack.enter_context(common.redis_server("download"))
            workdir = TMP / ("fleet" if tool == "ours" else "fleet-against")
            fleet = Fleet(redis, workdir, env, code, tool, py_spy)
            fleets[tool] = stack.enter_context(contextlib.closing(fleet))
        result["ours_startup"] = fleets["ours"].startup
        if bindir:
            fixed = run_img2dataset(bindir, url_list("urls-1", urls[:1]), 1, server, 120)
            result["img2dataset_fixed_cost_1_image"] = {
                k: fixed[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")
            }
        for fleet in fleets.values():  # a warm-up: connections, the decoders' first images
            fleet.run(url_list("urls-warm", server.urls(min(n, 200))), min(n, 200), server, timeout)
        for round_no in range(1, cfg["rounds"] + 1):
            for tool in ("img2dataset", *fleets) if bindir else fleets:
                before = wait_quiet(quiet) if quiet else None
                calibration_ms = calibrate(paths)
                if tool in fleets:
                    r = fleets[tool].run(listed, n, server, timeout)
                else:
                    r = run_img2dataset(bindir, listed, n, server, timeout, **limits)
                more = {
                    "round": round_no,
                    "expected": expected,
                    "others_before_cores": before,
                    "calibration_ms": calibration_ms,
                }
                result["runs"].append(r | more)
                rate, cpu = r["images_per_s"], r["cpu_ms_per_image"]
                log(f"round {round_no} {tool}: {rate} img/s, {cpu} CPU-ms/img, {r['success']}/{expected}")


if __name__ == "__main__":
    main()
