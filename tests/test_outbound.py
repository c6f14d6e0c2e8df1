"""SSRF policy of outbound tool calls, against a real HTTP server on 127.0.0.1.

Every refused URL below carries the port of that live server, so a check that let one through would reach it:
each test also asserts that the server received nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clawdbot.outbound import OutboundFailed, OutboundPolicy, OutboundRefused, Resolver, fetch, refusal_reason
from tests.tools_helpers import ToolServer, tool_server


@pytest.fixture
def server() -> Iterator[ToolServer]:
    with tool_server() as running:
        yield running


def resolver_of(table: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    """A resolver that answers from `table` (and remembers each question), as a DNS server could."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return table[host]

    return resolve


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.0.0.2",
    "[::1]",
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "0x7f.0.0.1",
    "0177.0.0.1",  # octal
    "017700000001",
    "127.1",  # short
    "127.0.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
    "[0000:0000:0000:0000:0000:ffff:7f00:0001]",
    "[::ffff:7f00:0001]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[64:ff9b::7f00:1]",  # NAT64
    "[2002:7f00:1::1]",  # 6to4
]
OTHER_REFUSED = [
    "10.0.0.1",
    "10.255.255.254",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "[fe80::1]",
    "[fc00::1]",
    "[fd12:3456::1]",
    "0.0.0.0",
    "0",
    "[::]",
    "224.0.0.1",
    "[ff02::1]",
    "100.64.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "[::ffff:10.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[::ffff:8.8.8.8]",  # IPv4-mapped, even of a public address
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + OTHER_REFUSED)
def test_private_loopback_and_special_addresses_are_refused_in_every_spelling(
    server: ToolServer, host: str
) -> None:
    with pytest.raises(OutboundRefused) as refused:
        fetch(OutboundPolicy(), "GET", f"http://{host}:{server.port}/ok", timeout_s=2)
    assert refused.value.message.startswith("refused to call "), refused.value.message
    assert "CLAWDBOT_TOOL_ALLOWLIST" in refused.value.message
    assert server.received == []


def test_the_refusal_names_the_address_a_spelling_stands_for(server: ToolServer) -> None:
    for host in ("2130706433", "0177.0.0.1", "127.1"):
        with pytest.raises(OutboundRefused) as refused:
            fetch(OutboundPolicy(), "GET", f"http://{host}:{server.port}/ok")
        assert "127.0.0.1" in refused.value.message and "loopback" in refused.value.message
    with pytest.raises(OutboundRefused) as mapped:
        fetch(OutboundPolicy(), "GET", f"http://[::ffff:7f00:1]:{server.port}/ok")
    assert "IPv4-mapped" in mapped.value.message


def test_public_addresses_pass_the_check() -> None:
    import ipaddress

    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"):
        assert refusal_reason(ipaddress.ip_address(address)) == "", address


def test_a_name_that_resolves_to_a_private_address_is_refused(server: ToolServer) -> None:
    policy = OutboundPolicy(resolver=resolver_of({"intranet.example": ["10.1.2.3"]}))
    with pytest.raises(OutboundRefused) as refused:
        fetch(policy, "GET", f"http://intranet.example:{server.port}/ok")
    assert "intranet.example: it is 10.1.2.3" in refused.value.message and "private" in refused.value.message
    # The system's own resolver: localhost is loopback.
    with pytest.raises(OutboundRefused):
        fetch(OutboundPolicy(), "GET", f"http://localhost:{server.port}/ok")
    assert server.received == []


def test_a_name_with_one_private_address_among_public_ones_is_refused(server: ToolServer) -> None:
    policy = OutboundPolicy(resolver=resolver_of({"mixed.example": ["93.184.216.34", "127.0.0.1"]}))
    with pytest.raises(OutboundRefused):
        fetch(policy, "GET", f"http://mixed.example:{server.port}/ok")
    assert server.received == []


def test_an_allowlisted_host_is_reached_at_a_private_address(server: ToolServer) -> None:
    response = fetch(OutboundPolicy(["127.0.0.1"]), "GET", f"{server.url}/ok", params={"city": "Berlin"})
    assert response.status_code == 200 and b"21.5" in response.body
    assert server.received[0].query == {"city": ["Berlin"]}
    # The allowlist names a host as written: another spelling of the same address is still refused.
    with pytest.raises(OutboundRefused):
        fetch(OutboundPolicy(["127.0.0.1"]), "GET", f"http://2130706433:{server.port}/ok")
    assert len(server.received) == 1


def test_dns_is_resolved_once_and_the_connection_pinned_to_that_address(server: ToolServer) -> None:
    calls: list[str] = []
    policy = OutboundPolicy(["tools.test"], resolver=resolver_of({"tools.test": ["127.0.0.1"]}, calls))
    response = fetch(policy, "GET", f"http://tools.test:{server.port}/ok")
    assert response.status_code == 200
    assert calls == ["tools.test"]
    # The name was never looked up by the OS (it does not exist there), yet the request arrived, with the name.
    assert server.received[0].headers["host"] == f"tools.test:{server.port}"


def test_a_redirect_to_a_private_address_is_refused(server: ToolServer) -> None:
    policy = OutboundPolicy(["tools.test"], resolver=resolver_of({"tools.test": ["127.0.0.1"]}))
    for target in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{server.port}/ok",
                   f"http://[::ffff:127.0.0.1]:{server.port}/ok", "http://10.0.0.1/"):  # fmt: skip
        with pytest.raises(OutboundRefused):
            fetch(policy, "GET", f"http://tools.test:{server.port}/redirect?to={target}")
    assert [r.path for r in server.received] == ["/redirect"] * 4  # only the first hop ever arrived


def test_a_redirect_through_a_name_that_resolves_privately_is_refused(server: ToolServer) -> None:
    resolve = resolver_of({"tools.test": ["127.0.0.1"], "evil.example": ["192.168.0.10"]})
    policy = OutboundPolicy(["tools.test"], resolver=resolve)
    with pytest.raises(OutboundRefused) as refused:
        fetch(
            policy, "GET", f"http://tools.test:{server.port}/redirect?to=http://evil.example:{server.port}/ok"
        )
    assert "evil.example: it is 192.168.0.10" in refused.value.message


def test_allowed_redirects_are_followed_and_secrets_stay_with_the_configured_host(server: ToolServer) -> None:
    resolve = resolver_of({"tools.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    policy = OutboundPolicy(["tools.test", "other.test"], resolver=resolve)
    same = fetch(
        policy, "GET", f"http://tools.test:{server.port}/redirect?to=/ok", headers={"X-Key": "s3cret"}
    )
    assert same.redirects == 1 and same.url.endswith("/ok")
    assert server.received[-1].headers.get("x-key") == "s3cret"
    other = f"http://other.test:{server.port}/ok"
    moved = fetch(policy, "POST", f"http://tools.test:{server.port}/redirect?to={other}", headers={"X-Key": "s3cret"},
                  json_body={"a": 1})  # fmt: skip
    assert moved.status_code == 200 and moved.url == other
    last = server.received[-1]
    assert last.headers["host"] == f"other.test:{server.port}" and "x-key" not in last.headers
    assert last.method == "GET"  # a 302 after a POST is followed with GET, as browsers do


def test_too_many_redirects_end_the_call(server: ToolServer) -> None:
    policy = OutboundPolicy(["127.0.0.1"])
    with pytest.raises(OutboundFailed, match="more than 5 redirects"):
        fetch(policy, "GET", f"{server.url}/loop")
    assert len(server.received) == 6


def test_only_http_and_https_are_called() -> None:
    for url in ("file:///etc/passwd", "ftp://example.org/x", "gopher://127.0.0.1:70/", "http:///nohost"):
        with pytest.raises(OutboundRefused):
            fetch(OutboundPolicy(), "GET", url)


def test_the_response_size_cap_and_the_timeout_hold(server: ToolServer) -> None:
    policy = OutboundPolicy(["127.0.0.1"])
    with pytest.raises(OutboundFailed, match="larger than the tool's cap of 1000 bytes"):
        fetch(policy, "GET", f"{server.url}/big", max_bytes=1000)
    with pytest.raises(OutboundFailed, match="timeout"):
        fetch(policy, "GET", f"{server.url}/slow", timeout_s=0.6)


def test_a_closed_port_is_a_clear_failure() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OutboundFailed, match="connection refused"):
        fetch(OutboundPolicy(["127.0.0.1"]), "GET", f"http://127.0.0.1:{port}/", timeout_s=2)
