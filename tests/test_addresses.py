"""Unit tests of common.fetching.addresses: which IP addresses may be fetched (pure: no sockets, no DNS)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.fetching.addresses import classify, parse_networks

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82b::200e",
    "::ffff:8.8.8.8",  # IPv4-mapped public
    "::8.8.8.8",  # IPv4-compatible public
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "100.63.255.255",  # just below carrier-grade NAT
    "100.128.0.0",  # just above it
    "172.15.255.255",
    "172.32.0.0",
    "169.253.255.255",
    "223.255.255.255",
    "192.0.1.1",
    "198.17.255.255",
    "198.20.0.0",
]

# (address, reason fragment): refused whatever allow_private says.
ALWAYS_REFUSED = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this-network"),
    ("169.254.0.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("192.0.0.192", "metadata"),
    ("168.63.129.16", "metadata"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.0.0.8", "special-purpose"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.200", "documentation"),
    ("192.88.99.1", "6to4 relay"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fe80::1%25", "link-local"),
    ("fd00:ec2::254", "metadata"),
    ("fd20:ce::254", "metadata"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:2::1", "special-purpose"),
    ("100::1", "discard-only"),
    ("64:ff9b:1::1", "NAT64 local-use"),
    ("5f00::1", "segment-routing"),
    ("4000::1", "reserved"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:224.0.0.1", "multicast"),
    ("::169.254.169.254", "metadata"),
    ("::2", "this-network"),
    ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
    ("2002:a9fe:a9fe::", "metadata"),  # 6to4 of 169.254.169.254
    ("2002:e000:1::", "multicast"),
]

# (address, reason fragment): refused by default, let through by allow_private.
PRIVATE = [
    ("127.0.0.1", "loopback address 127.0.0.1"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("::1", "loopback address ::1"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fd00:ec2::253", "private"),  # next to the AWS metadata address, but not it
    ("fec0::1", "private"),
    ("::ffff:127.0.0.1", "loopback address 127.0.0.1 (embedded in"),
    ("::ffff:10.1.2.3", "private address 10.1.2.3"),
    ("::127.0.0.1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::c0a8:101", "private address 192.168.1.1"),
    ("2002:7f00:1::", "loopback"),
    ("2002:a00:1::1", "private"),
]


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_may_be_fetched(ip: str, allow_private: bool) -> None:
    assert classify(ip, allow_private=allow_private) is None


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(("ip", "fragment"), ALWAYS_REFUSED)
def test_always_refused(ip: str, fragment: str, allow_private: bool) -> None:
    reason = classify(ip, allow_private=allow_private)
    assert reason is not None
    assert fragment in reason


@pytest.mark.parametrize(("ip", "fragment"), PRIVATE)
def test_private_refused_by_default_allowed_on_request(ip: str, fragment: str) -> None:
    reason = classify(ip)
    assert reason is not None
    assert fragment in reason
    assert classify(ip, allow_private=True) is None


def test_reason_names_the_address() -> None:
    assert classify("127.0.0.1") == "loopback address 127.0.0.1"
    assert classify("169.254.169.254") == "cloud metadata address 169.254.169.254"
    assert classify("fe80::1%eth0") == "link-local address fe80::1"


@pytest.mark.parametrize(
    "ip",
    [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.IPv6Address("fe80::1%eth0"),
        ipaddress.ip_address("8.8.8.8"),
    ],
)
def test_address_objects(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert classify(ip) == classify(str(ip).partition("%")[0])


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "localhost",
        "example.com",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4.5",
        "010.0.0.1",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        " 8.8.8.8",
        "8.8.8.8 ",
        "8.8.8.8%eth0",
        "fe80::1%",
        "[::1]",
        "::1::2",
        "gggg::1",
        "1.2.3.4/32",
        "::1/128",
    ],
)
def test_invalid_strings_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        classify(bad)


def test_non_string_raises_type_error() -> None:
    with pytest.raises(TypeError):
        classify(b"127.0.0.1")  # type: ignore[arg-type]


EXTRA = parse_networks("127.0.0.2/32, 203.0.114.0/24 2001:4860::/32")


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.2",
        "::ffff:127.0.0.2",
        "64:ff9b::7f00:2",
        "203.0.114.9",
        "2001:4860::8888",
        "2002:cb00:7209::",
    ],
)
def test_extra_blocked_always_refused(ip: str, allow_private: bool) -> None:
    reason = classify(ip, allow_private=allow_private, extra_blocked=EXTRA)
    assert reason is not None
    assert "blocked network" in reason


@pytest.mark.parametrize("ip", ["127.0.0.3", "::1", "10.0.0.1"])
def test_extra_blocked_leaves_other_private_addresses_alone(ip: str) -> None:
    assert classify(ip, allow_private=True, extra_blocked=EXTRA) is None


def test_extra_blocked_does_not_mix_versions() -> None:
    extra = parse_networks("0.0.0.0/0")
    assert classify("2606:4700:4700::1111", extra_blocked=extra) is None
    assert classify("8.8.8.8", extra_blocked=extra) is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("  , ,\n", ()),
        ("10.0.0.0/8", ("10.0.0.0/8",)),
        ("10.0.0.1", ("10.0.0.1/32",)),
        ("::1", ("::1/128",)),
        ("10.0.0.1/8", ("10.0.0.0/8",)),
        ("a::/16,b::/16", ("a::/16", "b::/16")),
        (
            "1.2.3.0/24, fd00::/8\t192.168.0.0/16\n127.0.0.2",
            ("1.2.3.0/24", "fd00::/8", "192.168.0.0/16", "127.0.0.2/32"),
        ),
        ("10.0.0.0/8 10.0.0.0/8", ("10.0.0.0/8",)),
    ],
)
def test_parse_networks(text: str, expected: tuple[str, ...]) -> None:
    assert parse_networks(text) == tuple(ipaddress.ip_network(n) for n in expected)


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("8.8.8.8, nope", "nope"),
        ("::1/129", "::1/129"),
        ("1.2.3.4/8/8", "1.2.3.4/8/8"),
        ("example.com", "example.com"),
        ("10.0.0.0/-1", "-1"),
    ],
)
def test_parse_networks_names_the_bad_entry(text: str, entry: str) -> None:
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_networks(text)
    assert entry in str(info.value)


@given(st.ip_addresses())
def test_classify_any_address_object_or_string(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    for allow_private in (False, True):
        reason = classify(ip, allow_private=allow_private)
        assert reason == classify(str(ip), allow_private=allow_private)
        assert reason is None or isinstance(reason, str)
    if classify(ip, allow_private=True) is not None:
        assert classify(ip) is not None  # allow_private never refuses more


@given(st.ip_addresses(v=4))
def test_mapped_address_judged_like_the_ipv4_address(ip: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    for allow_private in (False, True):
        assert (classify(mapped, allow_private=allow_private) is None) == (
            classify(ip, allow_private=allow_private) is None
        )


@given(st.ip_addresses())
def test_extra_blocked_host_network_always_refuses(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    extra = (ipaddress.ip_network(ip),)
    assert classify(ip, allow_private=True, extra_blocked=extra) is not None
