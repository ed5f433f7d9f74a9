"""Real servers for the tests: a Redis server and a loopback HTTP server of images and misbehaviour."""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis

from producer.run import free_port, redis_binary

PACE_DIR = Path(__file__).resolve().parent / "pace"  # its sitecustomize.py paces a test's workers
HOLD_LIMIT = 300.0  # seconds a held answer waits for its gate at most (a test that forgot to open it)


class RedisServer:
    """A redis-server process on a free loopback port, state under a directory."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--hash-max-listpack-entries",
            "1024",
            "--protected-mode",
            "no",
            *extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Behaviour:
    """Per-server counters for flaky routes (503-then-200, 429-then-200)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.user_agents: list[str] = []
        self.in_flight = 0
        self.outage = False
        self.max_in_flight = 0
        self.peers: set[tuple] = set()  # client (address, port) pairs seen: one per connection
        self.gates: dict[str, threading.Event] = {}  # held /img answers wait for theirs to open
        self.lock = threading.Lock()

    def gate(self, name: str) -> threading.Event:
        """The gate `name` (closed until `ImageServer.open_gate`)."""
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def hit(self, path: str) -> int:
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            return self.hits[path]


class Handler(BaseHTTPRequestHandler):
    """Serves `files` under /img/<name> and the misbehaving routes of ROUTES (first path segment ->
    method); `make_handler` binds the files, the counters and the port."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes]
    behaviour: Behaviour
    port_ref: list[int]

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        head, _, rest = path.strip("/").partition("/")
        with self.behaviour.lock:
            self.behaviour.user_agents.append(self.headers.get("User-Agent", ""))
            self.behaviour.peers.add(self.client_address[:2])
        ROUTES.get(head, Handler.not_found)(self, path, rest)

    # ---- answers the routes are made of

    def send_body(
        self, body: bytes, ctype: str = "image/jpeg", code: int = 200, headers: dict | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, code: int = 302) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def dribble(self, gap: float, status_at_once: bool = False) -> None:
        """Each byte arrives well within any read timeout; the whole head takes minutes
        (`status_at_once`: the status line comes whole, only the headers dribble)."""
        status = b"HTTP/1.1 200 OK\r\n"
        head = status + b"Content-Type: image/jpeg\r\nX-Pad: " + b"x" * 600 + b"\r\n\r\n"
        self.close_connection = True
        try:
            if status_at_once:
                self.wfile.write(status)
                head = head[len(status) :]
            for byte in head:
                self.wfile.write(bytes([byte]))
                time.sleep(gap)
        except OSError:
            pass

    def chunked(self, short_length: bool) -> None:
        """6.5 MB in chunks, over the test limit: the limit must count bytes (`short_length`: with a
        Content-Length of 100 that the chunks override)."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        if short_length:
            self.send_header("Content-Length", "100")
        self.end_headers()
        block = b"\xff" * 65536
        try:
            for _ in range(100):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def cut_short(self, body: bytes) -> None:
        """A Content-Length of twice the body, the body, then the connection closes."""
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    # ---- the routes: (self, path, rest of the path after the first segment)

    def not_found(self, path: str, rest: str) -> None:
        self.send_body(b"not found", "text/plain", 404)

    def img(self, path: str, rest: str) -> None:
        """/img/<name>[?hold=G][&opens=O]: a file, as bytes; with `hold`, once the test opened gate G;
        with `opens`, gate O opens once it is sent."""
        if rest in self.files:
            query = parse_qs(urlsplit(self.path).query)
            if "hold" in query:
                self.behaviour.gate(query["hold"][0]).wait(HOLD_LIMIT)
            self.send_body(self.files[rest], "application/octet-stream")
            if "opens" in query:
                self.behaviour.gate(query["opens"][0]).set()
        else:
            self.not_found(path, rest)

    def busy_until(self, path: str, rest: str) -> None:  # /busy-until/<gate>: 503 until <gate> opens
        if self.behaviour.hit(path) > 1 and self.behaviour.gate(rest).wait(HOLD_LIMIT):
            self.send_body(self.files["jpeg_small"])
        else:
            self.send_body(b"busy", "text/plain", code=503)

    def counted(self, path: str, rest: str) -> None:  # /counted/<code>/<id>: counts hits, answers <code>
        self.behaviour.hit(path)
        self.send_body(b"counted", "text/plain", code=int(rest.split("/")[0]))

    def concurrent(self, path: str, rest: str) -> None:  # counts downloads in flight at once
        behaviour = self.behaviour
        with behaviour.lock:
            behaviour.in_flight += 1
            behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.in_flight)
        time.sleep(0.2)
        with behaviour.lock:
            behaviour.in_flight -= 1
        self.send_body(self.files["jpeg_small"])

    def outage(self, path: str, rest: str) -> None:  # 503 while the test says the outage lasts
        if self.behaviour.outage:
            self.send_body(b"down", "text/plain", code=503)
        else:
            self.send_body(self.files["png_rgb"], "image/png")

    def status(self, path: str, rest: str) -> None:  # /status/<code>
        self.send_body(b"no", "text/plain", code=int(rest))

    def flaky503(self, path: str, rest: str) -> None:  # 503 twice, then the image
        if self.behaviour.hit(path) <= 2:
            self.send_body(b"busy", "text/plain", code=503)
        else:
            self.send_body(self.files["jpeg_rgb"])

    def ratelimited(self, path: str, rest: str) -> None:  # 429 with Retry-After once, then the image
        if self.behaviour.hit(path) <= 1:
            self.send_body(b"slow down", "text/plain", 429, {"Retry-After": "1"})
        else:
            self.send_body(self.files["png_rgb"], "image/png")

    def html(self, path: str, rest: str) -> None:
        self.send_body(b"<html><body>not an image</body></html>", "text/html")

    def html_as_jpeg(self, path: str, rest: str) -> None:
        self.send_body(b"<!doctype html><html><body>gotcha</body></html>", "image/jpeg")

    def empty(self, path: str, rest: str) -> None:
        self.send_body(b"", "image/jpeg")

    def slow(self, path: str, rest: str) -> None:  # /slow/<seconds> (3), then the image
        time.sleep(float(rest or 3))
        self.send_body(self.files["jpeg_rgb"])

    def huge_declared(self, path: str, rest: str) -> None:  # declares 1 GB, sends 1 kB
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"\xff" * 1024)

    def huge_chunked(self, path: str, rest: str) -> None:
        self.chunked(short_length=False)

    def huge_chunked_short_length(self, path: str, rest: str) -> None:
        self.chunked(short_length=True)

    def lying_length(self, path: str, rest: str) -> None:  # promises more than it sends, then closes
        self.cut_short(self.files["jpeg_rgb"])

    def loop(self, path: str, rest: str) -> None:  # /loop/a <-> /loop/b
        self.redirect(f"/loop/{'b' if rest == 'a' else 'a'}")

    def to_file(self, path: str, rest: str) -> None:
        self.redirect("file:///etc/passwd")

    def to_blocked(self, path: str, rest: str) -> None:  # 127.0.0.2 is on KOALA_BLOCKED_NETWORKS in the tests
        self.redirect(f"http://127.0.0.2:{self.port_ref[0]}/img/jpeg_rgb")

    def to_image(self, path: str, rest: str) -> None:  # /to-image/<name>: 301 to /img/<name>
        self.redirect(f"/img/{rest}", 301)

    def dribble_headers(self, path: str, rest: str) -> None:  # status and headers one byte per `rest` s
        self.dribble(float(rest or 0.2))

    def dribble_after_status(self, path: str, rest: str) -> None:  # the status line at once, then dribbled
        self.dribble(float(rest or 0.2), status_at_once=True)

    def slow_hops(self, path: str, rest: str) -> None:  # /slow-hops/<gap>/<n>: wait <gap> s, redirect to n-1
        gap, hops = rest.split("/")[:2]
        time.sleep(float(gap))
        if int(hops) > 0:
            self.redirect(f"/slow-hops/{gap}/{int(hops) - 1}")
        else:
            self.send_body(self.files["jpeg_rgb"])

    def poison(self, path: str, rest: str) -> None:
        """/poison/<id>: SIGKILLs the worker process that asks (as the out-of-memory killer would)."""
        self.behaviour.hit(path)
        pid = pid_of_peer(self.client_address[1], self.server.server_address[1])
        if pid is None:
            raise RuntimeError(f"poison: no process holds the socket of port {self.client_address[1]}")
        if b"workers" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
        self.send_body(self.files["jpeg_small"])  # to a dead process; anyone else gets an image

    def gzipped(self, path: str, rest: str) -> None:  # /gzip/<name>: the file, gzip-encoded on the wire
        self.send_body(gzip.compress(self.files[rest]), headers={"Content-Encoding": "gzip"})

    def gzip_bomb(self, path: str, rest: str) -> None:  # 64 MB of zeros in ~64 KB of gzip
        self.send_body(_zeros_gzipped(), headers={"Content-Encoding": "gzip"})

    def url_list(self, path: str, rest: str) -> None:  # a URL list served over HTTP
        self.send_body(self.files["__list__"], "text/plain")

    def url_list_cut(self, path: str, rest: str) -> None:  # a URL list whose body stops at half its length
        self.cut_short(self.files["__list__"])


@functools.cache
def _zeros_gzipped() -> bytes:
    return gzip.compress(bytes(64 << 20), compresslevel=9)


def pid_of_peer(port: int, server_port: int) -> int | None:
    """The process holding the TCP socket from local `port` to `server_port` (from /proc), if any.
    Both ports: a local port alone may also be another connection's, to another server (an
    ephemeral port is reused across destinations), and that process is not the one to kill."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
            if (local, remote) == (port, server_port):
                inodes.add(f"socket:[{fields[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return int(fd_dir.parent.name)
            except OSError:  # this descriptor closed meanwhile (a busy worker): the others still count
                continue
    return None


ROUTES: dict[str, Callable[[Handler, str, str], None]] = {
    "img": Handler.img,
    "poison": Handler.poison,
    "counted": Handler.counted,
    "concurrent": Handler.concurrent,
    "outage": Handler.outage,
    "status": Handler.status,
    "flaky503": Handler.flaky503,
    "ratelimited": Handler.ratelimited,
    "busy-until": Handler.busy_until,
    "html": Handler.html,
    "html-as-jpeg": Handler.html_as_jpeg,
    "empty": Handler.empty,
    "slow": Handler.slow,
    "huge-declared": Handler.huge_declared,
    "huge-chunked": Handler.huge_chunked,
    "huge-chunked-short-length": Handler.huge_chunked_short_length,
    "lying-length": Handler.lying_length,
    "loop": Handler.loop,
    "to-file": Handler.to_file,
    "to-blocked": Handler.to_blocked,
    "to-image": Handler.to_image,
    "dribble-headers": Handler.dribble_headers,
    "dribble-after-status": Handler.dribble_after_status,
    "slow-hops": Handler.slow_hops,
    "gzip": Handler.gzipped,
    "gzip-bomb": Handler.gzip_bomb,
    "list": Handler.url_list,
    "list-cut": Handler.url_list_cut,
}


def make_handler(files: dict[str, bytes], behaviour: Behaviour, port_ref: list[int]) -> type[Handler]:
    """The Handler class bound to these files, counters and port (a one-element list, set once the
    server has its port)."""
    return type("BoundHandler", (Handler,), {"files": files, "behaviour": behaviour, "port_ref": port_ref})


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 serving generated images and misbehaving routes;
    HTTPS when given `tls` = (certificate chain file, key file)."""

    def __init__(self, files: dict[str, bytes], tls: tuple[Path, Path] | None = None):
        self.files = files
        self.behaviour = Behaviour()
        self._port: list[int] = [0]
        self.scheme = "https" if tls else "http"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(files, self.behaviour, self._port))
        self.httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            # the handshake then happens in the handler's thread, not in the accept loop
            self.httpd.socket = context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            self.httpd.handle_error = lambda *args: None  # failed handshakes are what some tests want
        self._port[0] = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._port[0]}"

    def open_gate(self, name: str) -> None:
        """Let the answers held at gate `name` (`/img/<name>?hold=<gate>`) go."""
        self.behaviour.gate(name).set()

    def start(self) -> ImageServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed_cert(directory: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 and its key (openssl CLI), or None without openssl."""
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def worker_env(redis_url: str, out_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for worker processes in tests: loopback allowed, 127.0.0.2 blocked, short timeouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_") or k.startswith("KOALA_TEST_")}
    env.update(
        {
            "KOALA_BROKER_URL": redis_url,
            "KOALA_OUTPUT_DIR": str(out_dir),
            "KOALA_ALLOW_PRIVATE_ADDRESSES": "1",
            "KOALA_BLOCKED_NETWORKS": "127.0.0.2/32",
            "KOALA_CONNECT_TIMEOUT": "2",
            "KOALA_READ_TIMEOUT": "1",
            "KOALA_DOWNLOAD_DEADLINE": "6",
            "KOALA_RETRY_BACKOFF": "0.1",
            "KOALA_MAX_BYTES": "3000000",
            "KOALA_MAX_PIXELS": "50000000",
            "KOALA_CHUNK_SIZE": "4",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    if any(env.get(f"KOALA_TEST_{hook}") for hook in ("PACE", "POISON_GREY", "DIE_ON_DELIVERY")):
        # test hooks in the workers (testkit/pace/sitecustomize.py)
        env["PYTHONPATH"] = os.pathsep.join([str(PACE_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
