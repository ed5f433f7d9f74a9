"""Which IP addresses the fleet may fetch from: public ones only (pure, no I/O).

`classify` refuses loopback, private, link-local, multicast, unspecified, reserved, special-purpose
and cloud-metadata addresses; IPv6 forms that embed an IPv4 address are judged by that address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["IPAddress", "IPNetwork", "classify", "parse_networks"]


class _Rule(NamedTuple):
    """A labelled set of networks; `private_ok` rules are let through by allow_private."""

    label: str
    private_ok: bool
    networks: tuple[IPNetwork, ...]


def _rule(label: str, private_ok: bool, *cidrs: str) -> _Rule:
    """A rule over the given CIDRs."""
    return _Rule(label, private_ok, tuple(ipaddress.ip_network(c) for c in cidrs))


# First matching rule wins, so the specific ranges come before the ranges that contain them.
_V4_RULES: tuple[_Rule, ...] = (
    # AWS/GCP/Azure IMDS, AWS ECS task metadata, Alibaba, Oracle, Azure WireServer.
    _rule(
        "cloud metadata",
        False,
        "169.254.169.254/32",
        "169.254.170.2/32",
        "100.100.100.200/32",
        "192.0.0.192/32",
        "168.63.129.16/32",
    ),
    _rule("unspecified", False, "0.0.0.0/32"),
    _rule("this-network", False, "0.0.0.0/8"),
    _rule("loopback", True, "127.0.0.0/8"),
    _rule("private", True, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"),
    _rule("private (carrier-grade NAT)", True, "100.64.0.0/10"),
    _rule("link-local", False, "169.254.0.0/16"),
    _rule("broadcast", False, "255.255.255.255/32"),
    _rule("multicast", False, "224.0.0.0/4"),
    _rule("reserved", False, "240.0.0.0/4"),
    _rule("special-purpose (IETF protocol assignments)", False, "192.0.0.0/24"),
    _rule("benchmarking", False, "198.18.0.0/15"),
    _rule("documentation", False, "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"),
    _rule("deprecated 6to4 relay anycast", False, "192.88.99.0/24"),
)

_V6_RULES: tuple[_Rule, ...] = (
    _rule("cloud metadata", False, "fd00:ec2::254/128", "fd20:ce::254/128"),  # AWS, GCP
    _rule("unspecified", False, "::/128"),
    _rule("loopback", True, "::1/128"),
    _rule("Teredo", False, "2001::/32"),
    _rule("link-local", False, "fe80::/10"),
    _rule("private (deprecated site-local)", True, "fec0::/10"),
    _rule("private (unique local)", True, "fc00::/7"),
    _rule("multicast", False, "ff00::/8"),
    _rule("documentation", False, "2001:db8::/32", "3fff::/20"),
    _rule("special-purpose (IETF protocol assignments)", False, "2001::/23"),
    _rule("discard-only", False, "100::/64"),
    _rule("NAT64 local-use", False, "64:ff9b:1::/48"),
    _rule("segment-routing SID", False, "5f00::/16"),
)

_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_SEPARATORS = re.compile(r"[\s,]+")


def _to_address(ip: str | IPAddress) -> IPAddress:
    """Parse a string (an IPv6 zone such as '%eth0' is dropped) or normalize an address object."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if isinstance(ip, ipaddress.IPv6Address):
        return ipaddress.IPv6Address(int(ip))  # drops any scope id
    if not isinstance(ip, str):
        raise TypeError(f"expected an IP address or string, got {type(ip).__name__}")
    text = ip
    if "%" in text and ":" in text:
        text, _, zone = text.partition("%")
        if not zone:
            raise ValueError(f"empty IPv6 zone in {ip!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    value = int(addr)
    if value >> 32 == 0 or addr in _NAT64_WKP:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if addr in _SIX_TO_FOUR:
        return addr.sixtofour
    return None


def _blocked(addr: IPAddress, extra_blocked: Sequence[IPNetwork]) -> str | None:
    """A reason when `addr` lies in one of the extra blocked networks."""
    for net in extra_blocked:
        if addr.version == net.version and addr in net:
            return f"address {addr} in blocked network {net}"
    return None


def _match(addr: IPAddress, rules: Sequence[_Rule]) -> _Rule | None:
    """The first rule whose networks hold `addr`."""
    for rule in rules:
        if any(addr in net for net in rule.networks):
            return rule
    return None


def _judge(addr: IPAddress, rule: _Rule | None, allow_private: bool) -> str | None:
    """The reason a matched rule gives, or None when no rule matched or allow_private lets it by."""
    if rule is None or (allow_private and rule.private_ok):
        return None
    return f"{rule.label} address {addr}"


def _classify_v4(addr: ipaddress.IPv4Address, allow_private: bool) -> str | None:
    """Classify an IPv4 address by the IPv4 rules."""
    return _judge(addr, _match(addr, _V4_RULES), allow_private)


def _classify_v6(
    addr: ipaddress.IPv6Address, allow_private: bool, extra_blocked: Sequence[IPNetwork]
) -> str | None:
    """Classify an IPv6 address, judging embedded IPv4 addresses by their IPv4 rules."""
    inner = _embedded_v4(addr) if int(addr) > 1 else None  # '::' and '::1' are not IPv4
    if inner is not None:
        reason = _blocked(inner, extra_blocked) or _classify_v4(inner, allow_private)
        return None if reason is None else f"{reason} (embedded in {addr})"
    rule = _match(addr, _V6_RULES)
    if rule is None and addr not in _GLOBAL_UNICAST_V6:
        return f"reserved address {addr}"
    return _judge(addr, rule, allow_private)


def classify(
    ip: str | IPAddress,
    *,
    allow_private: bool = False,
    extra_blocked: Sequence[IPNetwork] = (),
) -> str | None:
    """None when the address may be fetched, else a short reason ('loopback address 127.0.0.1').

    allow_private lets loopback and private ranges through; `extra_blocked` networks are always
    refused. Raises ValueError for a string that is not an IP address.
    """
    addr = _to_address(ip)
    reason = _blocked(addr, extra_blocked)
    if reason is not None:
        return reason
    if isinstance(addr, ipaddress.IPv4Address):
        return _classify_v4(addr, allow_private)
    return _classify_v6(addr, allow_private, extra_blocked)


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Parse 'a.b.c.d/n, x::/m 10.0.0.1' (comma and/or whitespace separated) into networks.

    A bare address is a /32 or /128; host bits are masked off ('10.0.0.1/8' is 10.0.0.0/8).
    Raises ValueError naming the bad entry.
    """
    networks: list[IPNetwork] = []
    for entry in _SEPARATORS.split(text.strip()):
        if not entry:
            continue
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid network {entry!r}: {exc}") from None
        if net not in networks:
            networks.append(net)
    return tuple(networks)
