"""Where an endpoint may point: no loopback, private, link-local or otherwise non-public
address (the service's own network is not the merchant's to probe), unless the operator allows
it (WEBHOOK_ALLOW_PRIVATE_URLS, development and tests). Checked when an endpoint is saved and
again at each delivery, whose connection then goes to the very address that was checked, so
that a name re-pointed in between (DNS rebinding) cannot slip through."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from services.errors import ServiceError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 5.0


class WebhookUrlRefused(ServiceError):
    status = 422
    code = "webhook_url_refused"
    title = "This URL cannot receive webhooks"


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL and the address to connect to."""

    url: str
    host: str  # as written, for the Host header and TLS's server name
    address: Address

    @property
    def https(self) -> bool:
        return self.url.startswith("https:")

    def connect_url(self) -> str:
        """The URL with its host replaced by the checked address."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        return parts._replace(netloc=netloc).geturl()

    def host_header(self) -> str:
        parts = urlsplit(self.url)
        return parts.netloc


def _is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class UrlGuard:
    def __init__(self, *, allow_private: bool, require_https: bool) -> None:
        self.allow_private = allow_private
        self.require_https = require_https

    def parse(self, url: str) -> SplitResult:
        """The URL's form alone: scheme, host, no credentials, a valid port."""
        if len(url) > MAX_URL_LENGTH or any(ord(char) <= 32 for char in url):
            raise WebhookUrlRefused("The URL is too long or contains spaces or control bytes")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise WebhookUrlRefused("The URL cannot be parsed") from error
        schemes = ("https",) if self.require_https else ("https", "http")
        if parts.scheme not in schemes:
            raise WebhookUrlRefused(f"The URL's scheme must be {' or '.join(schemes)}")
        if not parts.hostname:
            raise WebhookUrlRefused("The URL names no host")
        if parts.username is not None or parts.password is not None:
            raise WebhookUrlRefused("Credentials in the URL are not accepted")
        if port == 0:
            raise WebhookUrlRefused("The URL's port must be 1-65535")
        if parts.fragment:
            raise WebhookUrlRefused("The URL must not have a fragment")
        return parts

    async def resolve(self, url: str) -> Target:
        """The address to deliver ``url`` to, every address its host has being allowed."""
        parts = self.parse(url)
        host = parts.hostname or ""
        addresses = await _addresses(host, parts.port or (443 if parts.scheme == "https" else 80))
        if not addresses:
            raise WebhookUrlRefused(f"The host {host!r} does not resolve")
        if not self.allow_private:
            refused = [address for address in addresses if not _is_public(address)]
            if refused:
                raise WebhookUrlRefused(
                    f"The host {host!r} resolves to a loopback, private, link-local or "
                    f"reserved address ({refused[0]})"
                )
        return Target(url=url, host=host, address=addresses[0])


async def _addresses(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
    except (OSError, UnicodeError, TimeoutError):
        return []
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found
