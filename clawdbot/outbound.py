"""Outbound HTTP for admin-defined tools, safe against server-side request forgery (SSRF).

A model chooses the arguments of a tool call, and an admin's URL may point anywhere, so a tool call must never
become a way into the machine or the office network. Every hop of a call is checked here:

- only http and https, and only to public addresses: loopback, private, link-local, multicast, unspecified,
  reserved, shared (carrier-grade NAT) and every IPv6 form that embeds an IPv4 address are refused, whatever
  the spelling (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1` and `[::ffff:7f00:1]` are all 127.0.0.1);
- unless the host, exactly as written in the URL, is in `CLAWDBOT_TOOL_ALLOWLIST`;
- the name is resolved once, every address it resolves to is checked, and the connection goes to that very
  address (the transport rewrites the URL to the IP and keeps the Host header and the TLS SNI and certificate
  check of the name), so a second, different DNS answer (DNS rebinding) is never used;
- redirects are followed by hand, each hop checked the same way, and the admin's headers (which may hold
  secrets) are not sent on to another host.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from clawdbot.errors import ClawdbotError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
"""(host, port) -> the addresses the host resolves to, as strings."""

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Spellings of an IPv4 address that inet_aton accepts (decimal, hex, octal, fewer than four parts).
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class OutboundRefused(ClawdbotError):
    """The URL may not be called: the message says which address was refused and why."""


class OutboundFailed(ClawdbotError):
    """The call was allowed but did not succeed (connection, timeout, size cap, too many redirects)."""


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for `host` (all addresses, IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one (NAT64, 6to4, Teredo, IPv4-compatible), if it carries one."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in network for network in _NAT64) or ip in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress) -> str:
    """Why `ip` may not be called (a few words), or "" when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"an IPv4-mapped IPv6 address (of {ip.ipv4_mapped})"
        inner = _embedded_ipv4(ip)
        if inner is not None and (why := refusal_reason(inner)):
            return f"an IPv6 address that embeds {inner}, {why}"
        if ip in _IPV4_COMPATIBLE:
            return "an IPv4-compatible IPv6 address"
    checks = (
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (not ip.is_global, "not a public address"),
    )
    return next((why for refused, why in checks if refused), "")


def literal_address(host: str) -> IPAddress | None:
    """The address a host that is an IP literal stands for, in any spelling the OS would accept; else None."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(bare) and not bare.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Target:
    """One hop: the URL, its host as written (lower case, no trailing dot) and the address it is pinned to."""

    url: httpx.URL
    host: str
    port: int
    address: str


class OutboundPolicy:
    """Which hosts and addresses tool calls may reach; `resolver` is injectable for tests."""

    def __init__(self, allowlist: Iterable[str] = (), resolver: Resolver = system_resolver) -> None:
        self.allowlist = frozenset(_host_key(h) for h in allowlist if h.strip())
        self.resolver = resolver

    def allowed_host(self, host: str) -> bool:
        return _host_key(host) in self.allowlist

    def target(self, url: str | httpx.URL) -> Target:
        """Check `url` and resolve its host once; raises OutboundRefused with the reason."""
        parsed = _parse(url)
        if parsed.scheme not in ("http", "https"):
            raise OutboundRefused(f"only http and https URLs may be called, not {parsed.scheme or 'this'!r}")
        host = parsed.host
        if not host:
            raise OutboundRefused("the URL has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        allowed = self.allowed_host(host)
        literal = literal_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                found = self.resolver(host.rstrip("."), port)
            except (OSError, UnicodeError) as exc:
                raise OutboundFailed(f"the host name {host!r} could not be resolved: {exc}") from exc
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
            if not addresses:
                raise OutboundFailed(f"the host name {host!r} has no address")
        if not allowed:
            for address in addresses:
                why = refusal_reason(address)
                if why:
                    raise _refused(host, address, why)
        return Target(parsed, _host_key(host), port, str(addresses[0]))


def _host_key(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _refused(host: str, address: IPAddress, why: str) -> OutboundRefused:
    shown = host if str(address) == host.strip("[]") else f"{host}: it is {address},"
    return OutboundRefused(
        f"refused to call {shown} {why}; tools may only reach public addresses "
        "(an operator can allow a host with CLAWDBOT_TOOL_ALLOWLIST)"
    )


def _parse(url: str | httpx.URL) -> httpx.URL:
    if isinstance(url, httpx.URL):
        return url
    try:
        return httpx.URL(url)
    except httpx.InvalidURL as exc:
        # httpx refuses some numeric spellings (octal parts) that the OS would happily connect to: name them.
        host = urlsplit(url).hostname or ""
        literal = literal_address(host) if host else None
        if literal is not None and (why := refusal_reason(literal)):
            raise _refused(host, literal, why) from exc
        raise OutboundRefused(f"not a valid URL: {exc}") from exc


class PinnedTransport(httpx.BaseTransport):
    """Sends each request to the address its host was pinned to, never resolving a name again.

    The request keeps its URL for the Host header and redirects; the connection is made to the IP, with the
    name as the TLS SNI so the certificate is still checked against the name. A request for a host that was not
    pinned is refused, so nothing can reach the network unchecked.
    """

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self._inner = inner or httpx.HTTPTransport(trust_env=False)
        self._pins: dict[tuple[str, int], str] = {}

    def pin(self, target: Target) -> None:
        self._pins[(target.host, target.port)] = target.address

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        address = self._pins.get((_host_key(url.host), port))
        if address is None:
            raise OutboundRefused(f"refused to call {url.host}: its address was not checked")
        request.url = url.copy_with(host=address)
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": url.host}
        try:
            return self._inner.handle_request(request)
        finally:
            request.url = url

    def close(self) -> None:
        self._inner.close()


@dataclass(frozen=True)
class OutboundResponse:
    """What a call returned: status, content type, at most the cap of body bytes, and the last hop's URL."""

    status_code: int
    content_type: str
    body: bytes
    url: str
    redirects: int


def fetch(
    policy: OutboundPolicy,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    json_body: Any = None,
    timeout_s: float = 10.0,
    max_bytes: int = 1_000_000,
    transport: httpx.BaseTransport | None = None,
) -> OutboundResponse:
    """Call `url` under `policy`: each hop checked and pinned, the whole call within `timeout_s`, the body
    read up to `max_bytes` (OutboundFailed beyond it). Raises OutboundRefused or OutboundFailed."""
    deadline = time.monotonic() + timeout_s
    pinned = PinnedTransport(transport)
    extra = dict(headers or {})
    first = policy.target(url)
    current = first
    method = method.upper()
    body = json_body
    with httpx.Client(transport=pinned, trust_env=False, follow_redirects=False) as client:
        for hop in range(MAX_REDIRECTS + 1):
            pinned.pin(current)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OutboundFailed(f"the call took longer than its {timeout_s:g} s timeout")
            # The admin's headers may carry secrets: they go to the configured host only.
            sent = extra if current.host == first.host else {}
            request = client.build_request(
                method,
                current.url,
                headers=sent,
                params=params if hop == 0 else None,
                json=body,
                timeout=httpx.Timeout(remaining),
            )
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                raise OutboundFailed(f"{current.host} did not answer within {timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise OutboundFailed(f"could not reach {current.host}: {_reason(exc)}") from exc
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    if hop == MAX_REDIRECTS:
                        raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects")
                    current = policy.target(urljoin(str(current.url), location))
                    if response.status_code == 303 or (
                        response.status_code in (301, 302) and method == "POST"
                    ):
                        method, body = "GET", None
                    continue
                data = _read_capped(response, max_bytes, deadline, timeout_s)
                return OutboundResponse(
                    response.status_code,
                    response.headers.get("content-type", ""),
                    data,
                    str(current.url),
                    hop,
                )
            finally:
                response.close()
    raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects")  # pragma: no cover - the loop returns


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise OutboundFailed(f"the response is larger than the tool's cap of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise OutboundFailed(f"the response took longer than the {timeout_s:g} s timeout")
            chunks.append(chunk)
    except httpx.TimeoutException as exc:
        raise OutboundFailed(f"the response took longer than the {timeout_s:g} s timeout") from exc
    except httpx.HTTPError as exc:
        raise OutboundFailed(f"the response broke off: {_reason(exc)}") from exc
    return b"".join(chunks)


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "certificate" in text or "ssl" in text:
        return "the TLS certificate could not be verified"
    return " ".join(str(exc).split())[:160] or type(exc).__name__
