"""The guarded downloader against the loopback server (in-process, no workers)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from common.fetching import fetch as fetch_module
from common.fetching.addresses import parse_networks
from common.fetching.fetch import FetchError, Policy, fetch, make_session, open_stream
from testkit.servers import ImageServer, self_signed_cert


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(
        allow_private=True,
        blocked=parse_networks("127.0.0.2/32"),
        connect_timeout=2,
        read_timeout=1,
        deadline=6,
        max_bytes=3_000_000,
        retries=3,
        backoff=0.1,
    )


@pytest.fixture(scope="module")
def session(policy: Policy):
    with make_session(policy) as s:
        yield s


def reason_of(url: str, session, policy: Policy) -> str:
    with pytest.raises(FetchError) as info:
        fetch(url, session, policy)
    return info.value.reason


def test_good_image_is_returned_byte_for_byte(image_server: ImageServer, images, session, policy):
    assert fetch(f"{image_server.base}/img/jpeg_rgb", session, policy) == images["jpeg_rgb"]


def test_redirect_to_an_image_is_followed(image_server: ImageServer, images, session, policy):
    assert fetch(f"{image_server.base}/to-image/png_rgb", session, policy) == images["png_rgb"]


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ("/status/404", "http_error"),
        ("/status/410", "http_error"),
        ("/status/500", "http_error"),
        ("/huge-declared", "too_large"),
        ("/huge-chunked", "too_large"),
        # chunks and a Content-Length: refused as malformed (RFC 9112 6.3) before the body
        ("/huge-chunked-short-length", "connection_error"),
        ("/lying-length", "truncated"),
        ("/loop/a", "redirect_loop"),
        ("/to-file", "bad_scheme"),
        ("/to-blocked", "blocked_address"),
        ("/slow/3", "timeout"),
    ],
)
def test_misbehaving_routes_fail_with_their_reason(image_server, session, policy, route, reason):
    assert reason_of(image_server.base + route, session, policy) == reason


def test_a_gzip_encoded_body_is_decoded(image_server: ImageServer, images, session, policy):
    assert fetch(f"{image_server.base}/gzip/jpeg_rgb", session, policy) == images["jpeg_rgb"]


def test_a_gzip_bomb_stops_at_the_byte_limit(image_server: ImageServer, session, policy):
    # 64 KB on the wire, 64 MB decoded: the limit counts decoded bytes, and decoding stops at it
    with pytest.raises(FetchError) as info:
        fetch(f"{image_server.base}/gzip-bomb", session, policy)
    assert info.value.reason == "too_large" and str(policy.max_bytes) in info.value.detail


def test_404_is_not_retried_but_500_is(image_server: ImageServer, session, policy):
    reason_of(f"{image_server.base}/counted/404/a", session, policy)
    reason_of(f"{image_server.base}/counted/500/a", session, policy)
    assert image_server.behaviour.hits["/counted/404/a"] == 1
    assert image_server.behaviour.hits["/counted/500/a"] == policy.retries + 1


def test_a_timed_out_attempt_is_retried_at_once_the_others_after_a_backoff(image_server, monkeypatch):
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(fetch_module, "_sleep", record)
    quick = Policy(allow_private=True, read_timeout=0.2, deadline=6, retries=2, backoff=0.1)
    with make_session(quick) as s:
        assert reason_of(f"{image_server.base}/slow/1", s, quick) == "timeout"
        assert pauses == []  # three attempts, each waited its 0.2 s timeout, none a backoff
        assert reason_of(f"{image_server.base}/counted/500/backoff", s, quick) == "http_error"
        assert pauses == [0.1, 0.2]
    assert image_server.behaviour.hits["/counted/500/backoff"] == 3


def test_a_download_resting_between_attempts_holds_none_of_the_clients_slots(image_server, images):
    rested: list = []
    quick = Policy(allow_private=True, retries=1, backoff=0.1)
    with make_session(quick, concurrency=1) as s:

        async def rest(seconds: float) -> None:  # another download, on the client's one slot
            rested.append(seconds)
            rested.append(await asyncio.wait_for(s.fetch(f"{image_server.base}/img/jpeg_rgb"), 30))

        outcome: Future = Future()
        s.submit(f"{image_server.base}/counted/500/rest", outcome.set_result, rest)
        error = outcome.result(60)
    assert isinstance(error, FetchError) and error.reason == "http_error"
    assert rested == [0.1, images["jpeg_rgb"]]
    assert image_server.behaviour.hits["/counted/500/rest"] == 2


def test_503_then_200_is_retried_into_success(image_server: ImageServer, images, session, policy):
    url = f"{image_server.base}/flaky503/fetch-test"
    assert fetch(url, session, policy) == images["jpeg_rgb"]
    assert image_server.behaviour.hits["/flaky503/fetch-test"] == 3


def test_429_honours_retry_after(image_server: ImageServer, images, session, policy):
    start = time.monotonic()
    assert fetch(f"{image_server.base}/ratelimited/fetch-test", session, policy) == images["png_rgb"]
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 was waited, not the 0.1 s backoff


def test_directly_blocked_address_never_connects(image_server: ImageServer, session, policy):
    port = image_server.base.rsplit(":", 1)[1]
    assert reason_of(f"http://127.0.0.2:{port}/img/jpeg_rgb", session, policy) == "blocked_address"


def test_loopback_refused_without_allow_private(image_server: ImageServer):
    strict = Policy(allow_private=False, retries=0)
    with make_session(strict) as s:
        assert reason_of(f"{image_server.base}/img/jpeg_rgb", s, strict) == "blocked_address"


@pytest.mark.parametrize(
    ("errno", "lookups"),
    [(socket.EAI_NONAME, 1), (socket.EAI_AGAIN, 2)],  # no such name: not asked again; failed for now: retried
)
def test_dns_failure_is_dns_error(monkeypatch, errno, lookups):
    asked: list[str] = []

    def no_answer(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(errno, "no answer")

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)
    fast = Policy(allow_private=True, retries=1, backoff=0.01)
    with make_session(fast) as s:
        assert reason_of("http://no-such-host.invalid/x.jpg", s, fast) == "dns_error"
    assert asked == ["no-such-host.invalid"] * lookups


def test_host_resolving_to_metadata_is_blocked_even_with_private_allowed(monkeypatch):
    def metadata(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(socket, "getaddrinfo", metadata)
    p = Policy(allow_private=True, retries=0)
    with make_session(p) as s:
        assert reason_of("http://metadata.example/latest", s, p) == "blocked_address"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        ("javascript:alert(1)", "bad_scheme"),
        ("http://[::1/x", "invalid_url"),
        ("http://[fe80::1%25lo]/x", "invalid_url"),  # a zone id: was tried as a host name (dns_error)
    ],
)
def test_bad_urls_fail_without_traffic(url, reason, session, policy):
    assert reason_of(url, session, policy) == reason


def test_open_stream_reads_a_url_list(image_server: ImageServer, policy):
    image_server.files["__list__"] = b"line one\nline two\n"
    with open_stream(f"{image_server.base}/list/x", policy) as stream:
        assert stream.read() == b"line one\nline two\n"


def test_open_stream_reads_lines_to_the_end(image_server: ImageServer, policy):
    from common.fetching.sources import iter_items

    lines = b"".join(b"n%05d http://example.com/%05d.jpg\n" % (i, i) for i in range(5000))
    image_server.files["__list__"] = lines
    with open_stream(f"{image_server.base}/list/x", policy) as stream:
        items = list(iter_items(stream))
        assert stream.readline() == b""
    assert len(items) == 5000 and items[-1].url == "http://example.com/04999.jpg"


def test_per_host_limit_bounds_downloads_in_flight(image_server: ImageServer):
    from concurrent.futures import ThreadPoolExecutor

    limited = Policy(allow_private=True, per_host=2, read_timeout=5, deadline=20)
    behaviour = image_server.behaviour
    behaviour.max_in_flight = 0
    with make_session(limited, concurrency=8) as s, ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: fetch(f"{image_server.base}/concurrent/{i}", s, limited), range(8)))
    assert len(bodies) == 8 and all(bodies)
    assert behaviour.max_in_flight == 2


def test_user_agent_is_configurable(image_server: ImageServer):
    custom = Policy(allow_private=True, user_agent="koala-test/9")
    with make_session(custom) as s:
        fetch(f"{image_server.base}/img/png_rgb", s, custom)
    assert image_server.behaviour.user_agents[-1] == "koala-test/9"


def test_headers_dribbled_a_byte_at_a_time_end_at_the_deadline(image_server: ImageServer):
    # every byte comes well within the read timeout; only the overall deadline can stop it
    short = Policy(allow_private=True, connect_timeout=2, read_timeout=1, deadline=2, retries=3, backoff=0.1)
    with make_session(short) as s:
        started = time.monotonic()
        assert reason_of(f"{image_server.base}/dribble-headers/0.2", s, short) == "timeout"
    assert time.monotonic() - started < 3.5


# Each read comes within the 1 s read timeout (and the connect timeout is longer than the
# deadline): only the 1.5 s deadline can end these; retries must not start past it.
SHORT = Policy(allow_private=True, connect_timeout=5, read_timeout=1, deadline=1.5, retries=3, backoff=0.1)


def timed_reason(url: str, policy: Policy = SHORT) -> tuple[str, float]:
    with make_session(policy) as s:
        started = time.monotonic()
        reason = reason_of(url, s, policy)
        return reason, time.monotonic() - started


def test_headers_dribbled_after_a_prompt_status_line_end_at_the_deadline(image_server: ImageServer):
    reason, took = timed_reason(f"{image_server.base}/dribble-after-status/0.2")
    assert reason == "timeout" and took < SHORT.deadline + 1


def test_a_redirect_chain_of_slow_hops_ends_at_the_deadline(image_server: ImageServer):
    reason, took = timed_reason(f"{image_server.base}/slow-hops/0.6/5")  # 3.6 s in all
    assert reason == "timeout" and took < SHORT.deadline + 1


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """The port of a listening socket whose backlog is full: a new connect hangs (SYNs dropped)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # until one hangs: the backlog is full
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                try:
                    filler.connect(("127.0.0.1", port))
                except TimeoutError:
                    break
            else:
                pytest.skip("this kernel accepts connections beyond the backlog")
            yield port
        finally:
            for filler in fillers:
                filler.close()


def test_a_connect_that_hangs_ends_at_the_deadline(full_backlog: int):
    reason, took = timed_reason(f"http://127.0.0.1:{full_backlog}/x.jpg")
    assert reason == "timeout" and took < SHORT.deadline + 1


def test_a_connect_timeout_says_so(full_backlog: int):
    quick = Policy(allow_private=True, connect_timeout=0.3, deadline=5, retries=0)
    with make_session(quick) as s, pytest.raises(FetchError) as info:
        fetch(f"http://127.0.0.1:{full_backlog}/x.jpg", s, quick)
    assert (info.value.reason, info.value.detail) == ("timeout", "connect timed out after 0.3s")


@pytest.fixture
def dribbling_tls_server() -> Iterator[int]:
    """A TCP server that answers a TLS ClientHello with a record header, then a byte per 0.2 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.recv(4096)
                for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 200:
                    if stop.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(5)


def test_a_dribbled_tls_handshake_ends_at_the_deadline(dribbling_tls_server: int):
    reason, took = timed_reason(f"https://127.0.0.1:{dribbling_tls_server}/x.jpg")
    assert reason == "timeout" and took < SHORT.deadline + 1


def test_connections_are_kept_alive_across_downloads_and_small_errors(images):
    server = ImageServer(dict(images)).start()
    try:
        p = Policy(allow_private=True, retries=0)
        with make_session(p) as s:
            for _ in range(3):
                assert fetch(f"{server.base}/img/png_rgb", s, p) == images["png_rgb"]
                assert reason_of(f"{server.base}/status/404", s, p) == "http_error"
                assert fetch(f"{server.base}/to-image/jpeg_rgb", s, p) == images["jpeg_rgb"]
        assert len(server.behaviour.peers) == 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_server(images, tmp_path_factory) -> Iterator[ImageServer]:
    tls = self_signed_cert(tmp_path_factory.mktemp("tls"))
    if tls is None:
        pytest.skip("no openssl to make a certificate")
    server = ImageServer(dict(images), tls=tls).start()
    server.cert = tls[0]  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_https_with_an_untrusted_certificate_fails(tls_server: ImageServer):
    p = Policy(allow_private=True, retries=0)
    with make_session(p) as s:
        assert reason_of(f"{tls_server.base}/img/png_rgb", s, p) == "connection_error"


def test_https_downloads_and_its_deadline_bounds_dribbled_headers(
    tls_server: ImageServer, images, monkeypatch
):
    context = ssl.create_default_context(cafile=str(tls_server.cert))  # type: ignore[attr-defined]
    monkeypatch.setattr(fetch_module, "_tls_context", lambda: context)
    p = Policy(allow_private=True, connect_timeout=2, read_timeout=1, deadline=2, retries=3, backoff=0.1)
    with make_session(p) as s:
        assert fetch(f"{tls_server.base}/img/jpeg_rgb", s, p) == images["jpeg_rgb"]
        started = time.monotonic()
        assert reason_of(f"{tls_server.base}/dribble-headers/0.2", s, p) == "timeout"
    assert time.monotonic() - started < 3.5
