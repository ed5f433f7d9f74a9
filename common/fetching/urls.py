"""Whether a URL can be fetched at all, from its text alone (no DNS): http or https, a well-formed
authority, no whitespace or control characters, not too long."""

from __future__ import annotations

import ipaddress
import re

MAX_URL_CHARS = 4096  # longest URL that may be fetched
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_FETCHABLE_SCHEMES = frozenset({"http", "https"})
_PORT = re.compile(r"[0-9]+")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")  # WHATWG: host must then be IPv4
# RFC 3986 reg-name characters without %-escapes, plus any non-ASCII character (IDN)
_HOST_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=\u0080-\U0010ffff]+")
_AUTHORITY_END = re.compile(r"[/?#]")


def url_problem(url: str) -> tuple[str, str] | None:
    """('bad_scheme' | 'invalid_url', detail) when `url` can't be fetched, else None (no DNS)."""
    scheme = SCHEME.match(url)
    if scheme is None:
        return ("invalid_url", "no URI scheme")
    name = scheme.group()[:-1].lower()
    if name not in _FETCHABLE_SCHEMES:
        return ("bad_scheme", f"scheme {name!r} is not http or https")
    problem = _text_problem(url) or _authority_problem(url[scheme.end() :])
    return None if problem is None else ("invalid_url", problem)


def _text_problem(url: str) -> str | None:
    """Length, whitespace and control characters."""
    if len(url) > MAX_URL_CHARS:
        return f"URL longer than {MAX_URL_CHARS} characters"
    for char in url:
        if char.isspace() or ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
            return f"whitespace or control character {char!r} in URL"
    return None


def _authority_problem(rest: str) -> str | None:
    """Check the '//userinfo@host:port' part that follows 'http:'."""
    if not rest.startswith("//"):
        return "no '//' authority after the scheme"
    end = _AUTHORITY_END.search(rest, 2)
    authority = rest[2 : end.start() if end else len(rest)]
    host_port = authority.rpartition("@")[2]  # userinfo (credentials included) is allowed
    if host_port.startswith("["):
        host, sep, after = host_port[1:].partition("]")
        if not sep:
            return "unterminated IPv6 literal"
        return _ipv6_problem(host) or _port_problem(after)
    host, sep, port = host_port.partition(":")
    return _host_problem(host) or (_port_problem(sep + port) if sep else None)


def _ipv6_problem(host: str) -> str | None:
    """An IPv6 literal without a zone: a zone ('%25eth0') only names a link-local interface, and
    link-local addresses are always refused (see common.fetching.addresses)."""
    if "%" in host:
        return f"IPv6 zone ids are not supported ({host!r})"
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"unparseable IPv6 literal {host!r}"
    return None


def _port_problem(after: str) -> str | None:
    """What follows the host: nothing, ':' or ':<port 1..65535>'."""
    if after in ("", ":"):
        return None
    port = after[1:]
    if not after.startswith(":") or not _PORT.fullmatch(port):
        return f"bad port {after!r}"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} out of range"
    return None


def _host_problem(host: str) -> str | None:
    """A registered name or dotted IPv4 literal: no empty labels, no stray characters."""
    if not host:
        return "no host"
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if any(not label for label in labels):
        return f"empty label in host {host!r}"
    if not _HOST_CHARS.fullmatch(host):
        return f"bad character in host {host!r}"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            return f"invalid IPv4 address {host!r}"
    return None


# ---- opening sources: URL lists (file, .gz, http(s) URL) and folders of images ------------------
