"""Guarded HTTP download: http(s) only, public addresses only (checked after DNS and on every
redirect hop), byte limit, timeouts, an overall deadline, and retries only where they help."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from common.addresses import classify, parse_networks
from common.settings import Settings
from common.sources import url_problem

_READ = 64 * 1024


class FetchError(Exception):
    """A download that failed for good; `reason` is from the failure vocabulary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransientError(FetchError):
    """A failure worth another attempt (timeout, connection error, 429, 5xx)."""

    def __init__(self, reason: str, detail: str, retry_after: float = 0.0):
        super().__init__(reason, detail)
        self.retry_after = retry_after


# Not OSError subclasses on purpose: urllib3 and requests re-wrap OSError, these pass through.
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
        why = classify(info[4][0], allow_private=policy.allow_private, extra_blocked=policy.blocked)
        if why:
            raise BlockedAddress(f"{host} resolves to a refused address: {why}")
    return infos


def _guarded_conn(base: type[HTTPConnection], policy: Policy) -> type[HTTPConnection]:
    """A urllib3 connection class that connects only to addresses the policy allows."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            last: OSError | None = None
            for family, kind, proto, _, addr in resolve_checked(self._dns_host, self.port, policy):
                sock = socket.socket(family, kind, proto)
                try:
                    sock.settimeout(self.timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connection pools use the guarded connections."""

    def __init__(self, policy: Policy, pool_maxsize: int = 64):
        self.policy = policy
        super().__init__(pool_connections=256, pool_maxsize=pool_maxsize, max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        http_conn = _guarded_conn(HTTPConnection, self.policy)
        https_conn = _guarded_conn(HTTPSConnection, self.policy)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }


def make_session(policy: Policy, pool_maxsize: int = 64) -> requests.Session:
    """A pooled session that ignores proxy variables (the guard must see the real peer)."""
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(policy, pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.5"})
    return session


def fetch(url: str, session: requests.Session, policy: Policy) -> bytes:
    """The body of url, following redirects, with retries; FetchError with a reason otherwise."""
    problem = url_problem(url)
    if problem:
        raise FetchError(*problem)
    start = time.monotonic()

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception()
        backoff = policy.backoff * 2 ** (state.attempt_number - 1)
        return max(backoff, getattr(error, "retry_after", 0.0))

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number > policy.retries:
            return True
        return time.monotonic() - start + wait(state) >= policy.deadline

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError), wait=wait, stop=stop,
        reraise=True, sleep=time.sleep)
    return retrying(_attempt, url, session, policy, start)


def _attempt(url: str, session: requests.Session, policy: Policy, start: float) -> bytes:
    """One attempt, holding one of the host's slots: follow the redirects, read the body."""
    with policy.host_slot(urlsplit(url).hostname or ""):
        with _open(url, session, policy, start) as response:
            return _read_body(response, policy, start)


def _open(url: str, session: requests.Session, policy: Policy, start: float) -> requests.Response:
    """The 2xx response at the end of url's redirect chain, every hop checked."""
    seen = {url}
    for _ in range(policy.max_redirects + 1):
        problem = url_problem(url)
        if problem:
            raise FetchError(*problem)
        response = _get(url, session, policy, start)
        if not response.is_redirect:
            try:
                _check_status(response)
            except FetchError:
                response.close()
                raise
            return response
        response.close()
        target = urljoin(url, response.headers.get("Location", ""))
        if target in seen:
            raise FetchError("redirect_loop", f"{url} redirects back to {target}")
        seen.add(target)
        url = target
    raise FetchError("redirect_loop", f"more than {policy.max_redirects} redirects")


@contextmanager
def open_stream(url: str, policy: Policy) -> Iterator[BinaryIO]:
    """A URL list (or any large body) as a binary stream, with the same guards but no size cap."""
    session = make_session(policy, pool_maxsize=1)
    response = _open(url, session, replace(policy, deadline=float("inf")), time.monotonic())
    with session, response:
        response.raw.decode_content = True
        yield response.raw


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


def _get(url: str, session: requests.Session, policy: Policy, start: float) -> requests.Response:
    """Send one GET within the remaining deadline, turning exceptions into reasons."""
    remaining = policy.deadline - (time.monotonic() - start)
    if remaining <= 0:
        raise FetchError("timeout", f"no time left of the {policy.deadline:g}s deadline")
    timeout = (min(policy.connect_timeout, remaining), min(policy.read_timeout, remaining))
    try:
        return session.get(url, stream=True, timeout=timeout, allow_redirects=False)
    except BlockedAddress as e:
        raise FetchError("blocked_address", str(e)) from None
    except DnsFailure as e:
        raise TransientError("dns_error", str(e)) from None
    except requests.exceptions.ConnectTimeout as e:
        raise TransientError("timeout", f"connect timed out: {_cause(e)}") from None
    except requests.exceptions.ReadTimeout as e:
        raise TransientError("timeout", f"no response within {timeout[1]:g}s: {_cause(e)}") from None
    except requests.exceptions.InvalidURL as e:
        raise FetchError("invalid_url", str(e)) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        raise TransientError("connection_error", _cause(e)) from None
    except requests.exceptions.RequestException as e:
        raise FetchError("connection_error", _cause(e)) from None


def _check_status(response: requests.Response) -> None:
    """Refuse non-2xx answers; 429 and 5xx are worth a retry."""
    code = response.status_code
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


def _read_body(response: requests.Response, policy: Policy, start: float) -> bytes:
    """Read the body within the byte limit and the deadline."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} exceeds {policy.max_bytes} bytes")
    body = bytearray()
    try:
        for chunk in _chunks(response):
            body += chunk
            if len(body) > policy.max_bytes:
                raise FetchError("too_large", f"body exceeds {policy.max_bytes} bytes")
            if time.monotonic() - start > policy.deadline:
                raise TransientError("timeout", f"download exceeded the {policy.deadline:g}s deadline")
    except FetchError:
        raise
    except requests.exceptions.ConnectionError as e:
        raise TransientError("timeout" if "timed out" in str(e) else "truncated", _cause(e)) from None
    except Exception as e:  # urllib3 protocol errors: the body stopped early or is malformed
        if "timed out" in str(e) or isinstance(e, TimeoutError):
            raise TransientError("timeout", f"read timed out after {len(body)} bytes") from None
        raise TransientError("truncated", f"body ended after {len(body)} bytes: {_cause(e)}") from None
    encoded = response.headers.get("Content-Encoding", "identity") not in ("", "identity")
    if declared.isdigit() and not encoded and len(body) != int(declared):
        raise TransientError("truncated", f"got {len(body)} of {declared} bytes")
    return bytes(body)


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """Whatever bytes arrive, as they arrive (read1 never waits to fill a buffer)."""
    raw = response.raw
    while True:
        chunk = raw.read1(_READ, decode_content=True)
        if not chunk:
            return
        yield chunk


def _cause(error: BaseException) -> str:
    """The innermost useful message of a wrapped requests/urllib3 exception."""
    inner = error
    while True:
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if nxt is None or nxt is inner or not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    return text[:300]
