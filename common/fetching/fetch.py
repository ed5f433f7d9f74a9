"""Guarded HTTP download on aiohttp: http(s) only, public addresses only (checked after DNS and on
every redirect hop), byte limit, timeouts, an overall deadline that bounds every step (connect, TLS,
status line, headers, body), and retries only where they help.

All downloads of a `Client` run on one event loop in a thread of its own: a download worker keeps
64 in flight without 64 threads waking for every read (README, "The download stage", for what it
saved). `fetch` is the blocking call (the standalone `koala download`, tests), `Client.submit` the
callback one (the workers).
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar, cast
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from yarl import URL

from common.fetching.addresses import classify, parse_networks
from common.fetching.urls import url_problem
from common.settings import Settings
from common.state.failures import ItemError

log = logging.getLogger("koala.fetch")
_READ = 64 * 1024
_DRAIN = 64 * 1024  # error and redirect bodies up to this size are read so the connection is kept
_HEADERS = {"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "gzip, deflate"}
T = TypeVar("T")
Done = Callable[[bytes | Exception], None]  # gets the body, or why there is none
Rest = Callable[[float], Awaitable[None]]  # waits out the pause between attempts


class FetchError(ItemError):
    """A download that failed for good; `reason` is from the failure vocabulary."""


class TransientError(FetchError):
    """A failure worth another attempt (timeout, connection error, 429, 5xx)."""

    def __init__(self, reason: str, detail: str, retry_after: float = 0.0):
        super().__init__(reason, detail)
        self.retry_after = retry_after


# Not OSError subclasses on purpose: aiohttp wraps OSError from a resolver, these pass through.
class BlockedAddress(Exception):
    """The host resolved to an address the policy refuses."""


class DnsFailure(Exception):
    """The host name did not resolve; `lasting` when the answer was that it does not exist (or the
    name cannot be encoded), not that the lookup failed for now."""

    def __init__(self, message: str, lasting: bool):
        super().__init__(message)
        self.lasting = lasting


# getaddrinfo's answers that a name has no address (NXDOMAIN, no records): asking again gets the same
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


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


def resolve_checked(host: str, port: int, policy: Policy) -> list[tuple]:
    """getaddrinfo for host, refusing the whole host if any address is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DnsFailure(f"cannot resolve {host}: {e}", lasting=e.errno in _NO_SUCH_NAME) from e
    except UnicodeError as e:
        raise DnsFailure(f"cannot resolve {host}: {e}", lasting=True) from e
    for info in infos:
        ip = cast(str, info[4][0])  # an INET or INET6 sockaddr: (host, port, ...)
        why = classify(ip, allow_private=policy.allow_private, extra_blocked=policy.blocked)
        if why:
            raise BlockedAddress(f"{host} resolves to a refused address: {why}")
    return infos


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver: the addresses it connects to are the ones checked here (aiohttp skips
    the resolver for hosts that look like IP addresses: `_check_literal` covers those)."""

    def __init__(self, policy: Policy, lookups: int):
        self.policy = policy
        # getaddrinfo blocks: as many lookups at once as downloads (a dead name server can take seconds)
        self.pool = ThreadPoolExecutor(lookups, "dns")

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(self.pool, resolve_checked, host, port, self.policy)
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(hostname=host, host=addr[0], port=addr[1], family=fam, proto=proto, flags=flags)
            for fam, _, proto, _, addr in infos
        ]

    async def close(self) -> None:
        self.pool.shutdown(wait=False)


@lru_cache(maxsize=4096)
def _check_literal(host: str, policy: Policy) -> None:
    """Refuse a host aiohttp takes for an IP address (it connects without resolving) when the
    address it stands for is refused ("127.1" included: getaddrinfo reads it without DNS, so the
    verdict is the same every time: kept)."""
    if is_ip_address(host):
        resolve_checked(host, 0, policy)


@cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (certifi's roots, as requests used), shared by clients."""
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass
    return context


# --- the client ---------------------------------------------------------------------------------


@dataclass
class _Slots:
    """A host's semaphore and the downloads holding or waiting for it."""

    semaphore: asyncio.Semaphore
    users: int = 0


class Client:
    """An aiohttp session on an event loop in a thread of its own ("fetch-loop"), pooled guarded
    connections, the per-host limits and at most `concurrency` downloads at once; close() or `with`.
    Proxy variables are never read (the guard must see the real peer) and cookies never kept."""

    def __init__(self, policy: Policy, concurrency: int = 64):
        self.policy = policy
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fetch-loop", daemon=True)
        self._thread.start()
        self._slots: dict[str, _Slots] = {}  # touched on the loop only
        self._tasks: set[asyncio.Task] = set()
        self.running = self.call(self._start(concurrency))  # attempts in flight

    async def _start(self, concurrency: int) -> asyncio.Semaphore:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            resolver=_GuardedResolver(self.policy, concurrency),
            ssl=_tls_context(),
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={**_HEADERS, "User-Agent": self.policy.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return asyncio.Semaphore(concurrency)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, url: str, done: Done, rest: Rest | None = None) -> None:
        """Start downloading url; `done` gets the body or the exception, on the loop's thread (it
        must not block). `rest(seconds)`, when given, is awaited between attempts instead of a sleep."""
        self.loop.call_soon_threadsafe(self._start_task, url, done, rest)

    def _start_task(self, url: str, done: Done, rest: Rest | None) -> None:
        task = self.loop.create_task(self._fetch_then(url, done, rest))
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _fetch_then(self, url: str, done: Done, rest: Rest | None) -> None:
        try:
            outcome: bytes | Exception = await self.fetch(url, rest)
        except Exception as e:
            outcome = e
        try:
            done(outcome)
        except Exception:  # never the loop's end: the other downloads go on
            log.exception("a download's callback failed")

    async def fetch(self, url: str, rest: Rest | None = None) -> bytes:
        """The body of url, following redirects, with retries; FetchError with a reason otherwise."""
        return await _fetch(url, self, self.policy, rest)

    @asynccontextmanager
    async def host_slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of the host's `per_host` slots (on this client); a host's semaphore is dropped when
        no download uses it (a URL list may name millions of hosts)."""
        entry = self._slots.get(host)
        if entry is None:
            entry = self._slots[host] = _Slots(asyncio.Semaphore(self.policy.per_host))
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._slots[host]

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.call(self.session.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_session(policy: Policy, concurrency: int = 64) -> Client:
    """A guarded client for fetch (keep one per process)."""
    return Client(policy, concurrency)


def fetch(url: str, client: Client, policy: Policy | None = None) -> bytes:
    """The body of url (blocking): `Client.fetch` on the client's loop, under `policy` when given."""
    if policy is None or policy == client.policy:
        return client.call(client.fetch(url))
    return client.call(_fetch(url, client, policy))


_sleep = asyncio.sleep  # the pause between attempts (tests record it)


async def _fetch(url: str, client: Client, policy: Policy, rest: Rest | None = None) -> bytes:
    problem = url_problem(url)
    if problem:
        raise FetchError(*problem)
    start = time.monotonic()
    attempts = 0
    while True:
        try:
            return await _attempt(url, client, policy, start)
        except TransientError as e:
            attempts += 1
            # a timed-out attempt has waited already; backing off is for answers that came fast
            pause = 0.0 if e.reason == "timeout" else max(policy.backoff * 2 ** (attempts - 1), e.retry_after)
            if attempts > policy.retries or time.monotonic() - start + pause >= policy.deadline:
                raise
            if pause:  # holding no slot of the client's: a waiting download is not in flight
                await (rest or _sleep)(pause)


async def _attempt(url: str, client: Client, policy: Policy, start: float) -> bytes:
    """One attempt within what is left of the deadline, holding one of the client's slots and one
    of the host's: follow the redirects, read the body."""
    remaining = policy.deadline - (time.monotonic() - start)
    if remaining <= 0:
        raise TransientError("timeout", f"no time left of the {policy.deadline:g}s deadline")
    async with client.running, client.host_slot(_parsed(url).host or ""):
        try:
            async with asyncio.timeout(remaining):
                response = await _open(url, client, policy, checked=True)
                try:
                    return await _read_body(response, policy)
                finally:
                    response.release()
        except TimeoutError:
            raise TransientError("timeout", f"download exceeded the {policy.deadline:g}s deadline") from None


def _parsed(url: str) -> URL:
    """url as yarl parses it (aiohttp requests it so); FetchError invalid_url where it cannot."""
    try:
        return URL(url)
    except ValueError as e:
        raise FetchError("invalid_url", str(e)) from None


async def _open(url: str, client: Client, policy: Policy, checked: bool = False) -> aiohttp.ClientResponse:
    """The 2xx response at the end of url's redirect chain, every hop checked (`checked`: the
    caller already checked url itself)."""
    seen = {url}
    for hop in range(policy.max_redirects + 1):
        problem = None if checked and hop == 0 else url_problem(url)
        if problem:
            raise FetchError(*problem)
        response = await _get(url, client, policy)
        location = response.headers.get("Location") if response.status in _REDIRECTS else None
        if not location:
            try:
                _check_status(response)
            except FetchError:
                await _discard(response)
                raise
            return response
        await _discard(response)
        target = urljoin(url, location)
        if target in seen:
            raise FetchError("redirect_loop", f"{url} redirects back to {target}")
        seen.add(target)
        url = target
    raise FetchError("redirect_loop", f"more than {policy.max_redirects} redirects")


_REDIRECTS = (301, 302, 303, 307, 308)


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Done with a redirect or an error answer: keep the connection when its body is small."""
    declared = _framed_length(response)
    if declared is not None and declared <= _DRAIN:
        try:
            await response.read()
        except (aiohttp.ClientError, OSError):
            response.close()
            return
        response.release()
    else:
        response.close()


async def _get(url: str, client: Client, policy: Policy) -> aiohttp.ClientResponse:
    """Send one GET, turning exceptions into reasons."""
    timeout = aiohttp.ClientTimeout(sock_connect=policy.connect_timeout, sock_read=policy.read_timeout)
    parsed = _parsed(url)
    try:
        _check_literal(parsed.raw_host or "", policy)
        return await client.session.get(parsed, allow_redirects=False, timeout=timeout)
    except BlockedAddress as e:
        raise FetchError("blocked_address", str(e)) from None
    except DnsFailure as e:  # a name that does not exist is not retried; a lookup that failed for now is
        raise (FetchError if e.lasting else TransientError)("dns_error", str(e)) from None
    except aiohttp.InvalidURL as e:
        raise FetchError("invalid_url", _cause(e)) from None
    except aiohttp.ConnectionTimeoutError:
        raise TransientError("timeout", f"connect timed out after {policy.connect_timeout:g}s") from None
    except aiohttp.SocketTimeoutError:
        raise TransientError("timeout", f"no response within {policy.read_timeout:g}s") from None
    except aiohttp.ClientResponseError as e:  # status line or headers malformed: the same next time
        raise FetchError("connection_error", f"malformed response: {_cause(e)}") from None
    except (aiohttp.ClientError, OSError) as e:
        raise TransientError("connection_error", _cause(e)) from None


def _check_status(response: aiohttp.ClientResponse) -> None:
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


async def _read_body(response: aiohttp.ClientResponse, policy: Policy) -> bytes:
    """Read the body within the byte limit (of the decoded bytes, when the body is encoded)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} exceeds {policy.max_bytes} bytes")
    encoded = response.headers.get("Content-Encoding", "identity") not in ("", "identity")
    length = _framed_length(response)
    body = bytearray()
    try:
        if length is not None and not encoded:
            return await response.content.readexactly(length)
        while chunk := await response.content.readany():
            body += chunk
            if len(body) > policy.max_bytes:
                raise FetchError("too_large", f"body exceeds {policy.max_bytes} bytes")
    except asyncio.IncompleteReadError as e:
        raise TransientError("truncated", f"got {len(e.partial)} of {declared} bytes") from None
    except aiohttp.SocketTimeoutError:
        raise TransientError("timeout", f"read timed out after {len(body)} bytes") from None
    except (aiohttp.ClientError, OSError, ValueError) as e:  # the body stopped early or is malformed
        raise TransientError("truncated", f"body ended after {len(body)} bytes: {_cause(e)}") from None
    return bytes(body)


def _framed_length(response: aiohttp.ClientResponse) -> int | None:
    """Content-Length when it frames the body (with Transfer-Encoding, chunks do: it is ignored)."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if declared.isdigit() and "Transfer-Encoding" not in response.headers else None


def _cause(error: BaseException) -> str:
    """The innermost useful message of a wrapped exception."""
    inner = error
    while True:
        nxt = getattr(inner, "os_error", None) or inner.__cause__ or inner.__context__
        if nxt is None or nxt is inner or not isinstance(nxt, BaseException):
            break
        inner = nxt
    message = getattr(inner, "message", None)  # aiohttp's parse errors: "400, message: ..." otherwise
    text = message if isinstance(message, str) and message else str(inner)
    return " ".join(text.split())[:300] or type(inner).__name__


# --- a URL list as a stream ---------------------------------------------------------------------


class _ResponseStream(io.RawIOBase):
    """A blocking, readable view of a response's body read on the client's loop."""

    def __init__(self, client: Client, response: aiohttp.ClientResponse):
        self.client = client
        self.response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.client.call(self.response.content.read(len(buffer)))
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as e:
            raise OSError(f"the body stopped early: {_cause(e)}") from e
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def open_stream(url: str, policy: Policy) -> Iterator[io.BufferedReader[_ResponseStream]]:
    """A URL list (or any large body) as a binary stream, with the same guards but no size cap
    nor deadline."""
    with make_session(policy, concurrency=1) as client:
        response = client.call(_open(url, client, replace(policy, deadline=float("inf")), checked=False))
        try:
            with io.BufferedReader(_ResponseStream(client, response), _READ) as stream:
                yield stream
        finally:
            response.close()


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
