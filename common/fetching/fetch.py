"""Guarded HTTP download on urllib3: http(s) only, public addresses only (checked after DNS and on
every redirect hop), byte limit, timeouts, an overall deadline that bounds every socket read (status
line and headers included), and retries only where they help."""

from __future__ import annotations

import functools
import io
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.client import HTTPException
from ipaddress import IPv4Network, IPv6Network
from typing import cast
from urllib.parse import urljoin, urlsplit

from urllib3 import BaseHTTPResponse, PoolManager, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.ssl_ import create_urllib3_context

from common.fetching.addresses import classify, parse_networks
from common.fetching.urls import url_problem
from common.settings import Settings
from common.state.failures import ItemError

_READ = 64 * 1024
_DRAIN = 64 * 1024  # error and redirect bodies up to this size are read so the connection is kept
_HEADERS = {"User-Agent": "", "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "gzip, deflate"}
_deadline = threading.local()  # .at: monotonic deadline of the download this thread runs


class FetchError(ItemError):
    """A download that failed for good; `reason` is from the failure vocabulary."""


class TransientError(FetchError):
    """A failure worth another attempt (timeout, connection error, 429, 5xx)."""

    def __init__(self, reason: str, detail: str, retry_after: float = 0.0):
        super().__init__(reason, detail)
        self.retry_after = retry_after


# Not OSError subclasses on purpose: urllib3 re-wraps OSError, these pass through.
class BlockedAddress(Exception):
    """The host resolved to an address the policy refuses."""


class DnsFailure(Exception):
    """The host name did not resolve."""


@dataclass(frozen=True)
class Policy:
    """What a download may do; built from the settings."""

    allow_private: bool = False
    blocked: tuple[IPv4Network | IPv6Network, ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    deadline: float = 60.0
    max_bytes: int = 25_000_000
    max_redirects: int = 5
    retries: int = 3
    backoff: float = 1.0
    user_agent: str = "koala-fleet/0.1"
    per_host: int = 8
    _host_slots: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def host_slot(self, host: str) -> threading.BoundedSemaphore:
        """The semaphore that bounds concurrent downloads from one host (in this process)."""
        with self._lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = self._host_slots[host] = threading.BoundedSemaphore(self.per_host)
            return slot


def resolve_checked(host: str, port: int, policy: Policy) -> list[tuple]:
    """getaddrinfo for host, refusing the whole host if any address is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise DnsFailure(f"cannot resolve {host}: {e}") from e
    for info in infos:
        ip = cast(str, info[4][0])  # an INET or INET6 sockaddr: (host, port, ...)
        why = classify(ip, allow_private=policy.allow_private, extra_blocked=policy.blocked)
        if why:
            raise BlockedAddress(f"{host} resolves to a refused address: {why}")
    return infos


# --- sockets whose reads stop at the download's deadline ---------------------------------------


class _DeadlineReads:
    """Socket mixin: each read waits at most the timeout urllib3 set and never past the deadline
    of the download the calling thread runs (a server dribbling headers cannot hold it)."""

    _wanted: float | None = None
    _cut = False

    def settimeout(self, value: float | None) -> None:
        self._wanted, self._cut = value, False
        super().settimeout(value)  # type: ignore[misc]

    def _bound(self) -> None:
        at = getattr(_deadline, "at", None)
        left = None if at is None else at - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("the download deadline passed")
        if left is not None and (self._wanted is None or left < self._wanted):
            super().settimeout(left)  # type: ignore[misc]
            self._cut = True
        elif self._cut:
            super().settimeout(self._wanted)  # type: ignore[misc]
            self._cut = False

    def recv_into(self, *args, **kwargs) -> int:
        self._bound()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def recv(self, *args, **kwargs) -> bytes:
        self._bound()
        return super().recv(*args, **kwargs)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineReads, socket.socket):
    """A TCP socket with deadline-bounded reads."""


class _DeadlineSSLSocket(_DeadlineReads, ssl.SSLSocket):
    """A TLS socket with deadline-bounded reads (the SSL context creates it)."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (certifi's roots, as requests used), shared by pools."""
    context = create_urllib3_context()
    context.sslsocket_class = _DeadlineSSLSocket
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:
        context.load_default_certs()
    return context


@contextmanager
def _download_deadline(at: float) -> Iterator[None]:
    """Socket reads in this thread stop at `at` (time.monotonic) while the block runs."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = at
    try:
        yield
    finally:
        _deadline.at = previous


def _guarded_conn(base: type[HTTPConnection], policy: Policy) -> type[HTTPConnection]:
    """A urllib3 connection class that connects only to addresses the policy allows."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            last: OSError | None = None
            for family, kind, proto, _, addr in resolve_checked(self._dns_host, self.port, policy):
                sock = _DeadlineSocket(family, kind, proto)
                try:
                    sock.settimeout(self.timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock._bound()  # the connect, too, ends at the deadline
                    sock.connect(addr)
                    return sock
                except TimeoutError as e:
                    sock.close()
                    raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from e
                except OSError as e:
                    sock.close()
                    last = e
            raise NewConnectionError(self, f"cannot connect to {self.host}: {last}")

    return Guarded


# --- the client ---------------------------------------------------------------------------------


class Client:
    """Pooled guarded connections (a urllib3 PoolManager) and the request headers; close() or `with`.
    Proxy variables are never read: the guard must see the real peer."""

    def __init__(self, policy: Policy, pool_maxsize: int = 64):
        self.headers = {**_HEADERS, "User-Agent": policy.user_agent}
        self.pool = PoolManager(
            num_pools=256, maxsize=pool_maxsize, retries=False, ssl_context=_tls_context()
        )
        self.pool.pool_classes_by_scheme = {
            "http": type(
                "GuardedHTTPPool",
                (HTTPConnectionPool,),
                {"ConnectionCls": _guarded_conn(HTTPConnection, policy)},
            ),
            "https": type(
                "GuardedHTTPSPool",
                (HTTPSConnectionPool,),
                {"ConnectionCls": _guarded_conn(HTTPSConnection, policy)},
            ),
        }

    def close(self) -> None:
        self.pool.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_session(policy: Policy, pool_maxsize: int = 64) -> Client:
    """A pooled guarded client for fetch (keep one per process or thread pool)."""
    return Client(policy, pool_maxsize)


def fetch(url: str, session: Client, policy: Policy) -> bytes:
    """The body of url, following redirects, with retries; FetchError with a reason otherwise."""
    problem = url_problem(url)
    if problem:
        raise FetchError(*problem)
    start = time.monotonic()
    attempts = 0
    with _download_deadline(start + policy.deadline):
        while True:
            try:
                return _attempt(url, session, policy, start)
            except TransientError as e:
                attempts += 1
                # a timed-out attempt has waited already; backing off is for answers that came fast
                pause = (
                    0.0 if e.reason == "timeout" else max(policy.backoff * 2 ** (attempts - 1), e.retry_after)
                )
                if attempts > policy.retries or time.monotonic() - start + pause >= policy.deadline:
                    raise
                if pause:
                    time.sleep(pause)


def _attempt(url: str, client: Client, policy: Policy, start: float) -> bytes:
    """One attempt, holding one of the host's slots: follow the redirects, read the body."""
    with policy.host_slot(urlsplit(url).hostname or ""):
        response = _open(url, client, policy, start, checked=True)
        try:
            return _read_body(response, policy, start)
        finally:
            response.close()  # a no-op once the body is read: the connection went back to the pool


def _open(url: str, client: Client, policy: Policy, start: float, checked: bool = False) -> BaseHTTPResponse:
    """The 2xx response at the end of url's redirect chain, every hop checked (`checked`: the
    caller already checked url itself)."""
    seen = {url}
    for hop in range(policy.max_redirects + 1):
        problem = None if checked and hop == 0 else url_problem(url)
        if problem:
            raise FetchError(*problem)
        response = _get(url, client, policy, start)
        location = response.get_redirect_location()
        if not location:
            try:
                _check_status(response)
            except FetchError:
                _discard(response)
                raise
            return response
        _discard(response)
        target = urljoin(url, location)
        if target in seen:
            raise FetchError("redirect_loop", f"{url} redirects back to {target}")
        seen.add(target)
        url = target
    raise FetchError("redirect_loop", f"more than {policy.max_redirects} redirects")


def _discard(response: BaseHTTPResponse) -> None:
    """Done with a redirect or an error answer: keep the connection when its body is small."""
    declared = _framed_length(response)
    if declared is not None and declared <= _DRAIN:
        response.drain_conn()
        response.release_conn()
    else:
        response.close()


@contextmanager
def open_stream(url: str, policy: Policy) -> Iterator[io.BufferedReader[BaseHTTPResponse]]:
    """A URL list (or any large body) as a binary stream, with the same guards but no size cap."""
    with make_session(policy, pool_maxsize=1) as client:
        response = _open(url, client, replace(policy, deadline=float("inf")), time.monotonic())
        # stays readable at the end, as BufferedReader needs (an HTTPResponse, typed as its base)
        response.auto_close = False  # type: ignore[attr-defined]
        # readline: the buffered reader's is C; the response's own reads a byte per call
        with io.BufferedReader(response, _READ) as stream:
            yield stream


def policy_from_settings(settings: Settings) -> Policy:
    """The download policy the settings describe."""
    return Policy(
        allow_private=settings.allow_private_addresses,
        blocked=parse_networks(settings.blocked_networks),
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        deadline=settings.download_deadline,
        max_bytes=settings.max_bytes,
        max_redirects=settings.max_redirects,
        retries=settings.retries,
        backoff=settings.retry_backoff,
        user_agent=settings.user_agent,
        per_host=settings.per_host_connections,
    )


def _get(url: str, client: Client, policy: Policy, start: float) -> BaseHTTPResponse:
    """Send one GET within the remaining deadline, turning exceptions into reasons."""
    remaining = policy.deadline - (time.monotonic() - start)
    if remaining <= 0:
        raise FetchError("timeout", f"no time left of the {policy.deadline:g}s deadline")
    timeout = Timeout(
        connect=min(policy.connect_timeout, remaining), read=min(policy.read_timeout, remaining)
    )
    try:
        return client.pool.urlopen(
            "GET",
            url,
            headers=client.headers,
            redirect=False,
            retries=False,
            preload_content=False,
            timeout=timeout,
        )
    except BlockedAddress as e:
        raise FetchError("blocked_address", str(e)) from None
    except DnsFailure as e:
        raise TransientError("dns_error", str(e)) from None
    except LocationValueError as e:
        raise FetchError("invalid_url", str(e)) from None
    except NewConnectionError as e:  # a subclass of ConnectTimeoutError: test it first
        raise TransientError("connection_error", _cause(e)) from None
    except ConnectTimeoutError as e:
        raise TransientError("timeout", f"connect timed out: {_cause(e)}") from None
    except (ReadTimeoutError, TimeoutError) as e:
        waited = f"no response within {timeout.read_timeout:g}s"
        raise TransientError("timeout", f"{waited}: {_cause(e)}") from None
    except (HTTPError, HTTPException, OSError) as e:
        raise TransientError("connection_error", _cause(e)) from None


def _check_status(response: BaseHTTPResponse) -> None:
    """Refuse non-2xx answers; 429 and 5xx are worth a retry."""
    code = response.status
    if 200 <= code < 300:
        return
    detail = f"HTTP {code} {response.reason or ''}".strip()
    if code == 429 or code >= 500:
        raise TransientError("http_error", detail, _retry_after(response.headers.get("Retry-After")))
    raise FetchError("http_error", detail)


def _retry_after(value: str | None) -> float:
    """Seconds of a Retry-After header given in seconds (HTTP dates count as 0)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _read_body(response: BaseHTTPResponse, policy: Policy, start: float) -> bytes:
    """Read the body within the byte limit and the deadline."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} exceeds {policy.max_bytes} bytes")
    encoded = response.headers.get("Content-Encoding", "identity") not in ("", "identity")
    length = _framed_length(response)
    got = bytearray()
    body: bytes | bytearray = got
    try:
        if length is not None and not encoded:
            body = response.read(length)  # one read, no copy: the length is within the cap
        else:
            _read_capped(response, got, policy.max_bytes)
    except FetchError:
        raise
    except (ReadTimeoutError, TimeoutError):
        raise TransientError("timeout", f"read timed out after {len(body)} bytes") from None
    except (HTTPError, HTTPException, OSError, ValueError) as e:  # the body stopped early or is malformed
        raise TransientError("truncated", f"body ended after {len(body)} bytes: {_cause(e)}") from None
    if time.monotonic() - start > policy.deadline:
        raise TransientError("timeout", f"download exceeded the {policy.deadline:g}s deadline")
    if declared.isdigit() and not encoded and len(body) != int(declared):
        raise TransientError("truncated", f"got {len(body)} of {declared} bytes")
    return body if isinstance(body, bytes) else bytes(body)


def _framed_length(response: BaseHTTPResponse) -> int | None:
    """Content-Length when it frames the body (with Transfer-Encoding, chunks do: it is ignored)."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if declared.isdigit() and "Transfer-Encoding" not in response.headers else None


def _read_capped(response: BaseHTTPResponse, body: bytearray, max_bytes: int) -> None:
    """Append whatever bytes arrive (decoded) to body, refusing more than max_bytes."""
    while chunk := response.read1(_READ, decode_content=True):
        body += chunk
        if len(body) > max_bytes:
            raise FetchError("too_large", f"body exceeds {max_bytes} bytes")


def _cause(error: BaseException) -> str:
    """The innermost useful message of a wrapped urllib3 exception."""
    inner = error
    while True:
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if nxt is None or nxt is inner or not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    return text[:300]
