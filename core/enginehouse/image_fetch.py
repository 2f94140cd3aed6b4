"""Images fetched over http(s): only from allowed domains, only from public addresses, and
within a deadline for the whole download.

Each hop (the URL, then every redirect, at most `MAX_REDIRECTS`) is checked before anything is
sent: an http(s) URL, a host under an allowed domain, and every address the host resolves to a
public one (not loopback, private, link-local, shared, reserved or multicast), unless the user
allowed those explicitly. The connection then goes to the address that was checked, so that a
second DNS answer cannot change it (DNS rebinding). The deadline covers connecting and reading
the headers and the body, however slowly the server drips them (at the deadline the socket is
shut under the reading thread); the name lookup has the system resolver's own timeouts.

Every failure of a fetch reads the same (`fetch_failed`): the answer must not tell a closed port
from a 404, a private address or a file that is not an image (a port scanner would read it).
The real reason goes to the log. A domain that is not allowed gets its own message: that tells
only the server's configuration.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import RequestError

if TYPE_CHECKING:
    from .config import EngineConfig

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 50 * 2**20
MAX_REDIRECTS = 5
DEFAULT_FETCH_TIMEOUT = 5.0  # s for one image, all of it (vLLM's VLLM_IMAGE_FETCH_TIMEOUT)
DEFAULT_TOTAL_TIMEOUT = 20.0  # s for all of one prompt's images
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(RequestError):
    """An image could not be fetched; the message never says why (see the module's doc)."""


def _describe(url: str) -> str:
    return repr(url if len(url) <= 60 else url[:57] + "...")


def fetch_failed(url: str, seconds: float) -> FetchError:
    return FetchError(
        f"could not fetch the image {_describe(url)}: the server fetches only http(s) URLs on "
        "allowed domains that resolve to public addresses and answer 200 with an image of at "
        f"most 50 MiB within {seconds:g} s; check the URL, or send the image inline as a data: "
        "URL"
    )


def domain_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is an allowed domain or a subdomain of one."""
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


def check_domain(url: str, allowed: list[str]) -> None:
    """Refuse a URL whose host is not under an allowed domain (a message of its own: it tells
    only the server's configuration)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if not domain_allowed(host, allowed):
        raise RequestError(
            f"fetching images from {host[:60]!r} is not allowed; allow the domain with "
            "EngineConfig(allowed_media_domains=[...]) or --allowed-media-domains, or send the "
            "image inline as a data: URL"
        )


def is_public(address: str) -> bool:
    """An address on the public internet (an IPv4 address mapped into IPv6 is read as IPv4)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Refused(Exception):
    """Why a fetch failed, for the log only."""


@dataclass(frozen=True)
class FetchPolicy:
    """Where images may come from and how long their downloads may take (`EngineConfig`'s
    allowed_media_domains, allow_private_media_addresses, image_fetch_timeout and
    image_fetch_total_timeout)."""

    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    timeout: float = DEFAULT_FETCH_TIMEOUT  # s for one image
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT  # s for all of one prompt's images

    @classmethod
    def of(cls, config: EngineConfig) -> FetchPolicy:
        return cls(
            tuple(config.allowed_media_domains),
            config.allow_private_media_addresses,
            config.image_fetch_timeout,
            config.image_fetch_total_timeout,
        )

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The bytes at `url`, within `timeout` (and before `deadline`, a `time.monotonic()`
        instant, when given). `RequestError` for a domain that is not allowed, `FetchError`
        (one message, whatever the reason) for every other failure."""
        end = time.monotonic() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        domains = list(self.allowed_domains)
        check_domain(url, domains)
        try:
            return _fetch(url, domains, self.allow_private, end)
        except RequestError:  # a redirect to a domain that is not allowed
            raise
        except Exception as e:  # every other reason reads the same to the client
            log.info("could not fetch the image %s: %s: %s", _describe(url), type(e).__name__, e)
            raise fetch_failed(url, self.timeout) from None


def _fetch(url: str, allowed: list[str], allow_private: bool, end: float) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Refused(f"a redirect to a {scheme or 'relative'}: URL")
        check_domain(url, allowed)
        host, port = parts.hostname or "", parts.port or (443 if scheme == "https" else 80)
        address = _public_address(host, port, allow_private, end)
        connection = _Connection(host, port, address, scheme == "https", _left(end))
        # Socket timeouts bound each read, not a server that drips its headers or body a
        # byte at a time: at the deadline the socket is shut, whatever is being read.
        watchdog = threading.Timer(_left(end), connection.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", path, headers={"Accept": "image/*"})
            response = connection.getresponse()
            if response.status in _REDIRECTS and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise _Refused(f"HTTP status {response.status}")
            return _read(response, end)
        finally:
            watchdog.cancel()
            connection.close()
    raise _Refused(f"more than {MAX_REDIRECTS} redirects")


def _left(end: float) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def _public_address(host: str, port: int, allow_private: bool, end: float) -> str:
    """An address of `host` to connect to; every one it has must be public (one private
    among public ones could be the one a later lookup returns)."""
    if not host or any(c in host for c in "\0\r\n% "):
        raise _Refused(f"the host {host!r} is not a host name")
    _left(end)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise _Refused(f"{host} has no address")
    if not allow_private:
        private = [a for a in addresses if not is_public(a)]
        if private:
            raise _Refused(f"{host} resolves to {private[0]}, not a public address")
    return addresses[0]


class _Connection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand, with the host's own name in
    the Host header and, for https, in the TLS handshake and the certificate check."""

    def __init__(self, host: str, port: int, address: str, tls: bool, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.tls = tls
        self.raw_socket: socket.socket | None = None

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            context = ssl.create_default_context()
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        self.raw_socket = self.sock  # the response reads from it after `close` (HTTP/1.0)

    def abort(self) -> None:
        """Shut the socket: a read waiting on it returns at once (from another thread)."""
        if self.raw_socket is not None:
            try:
                self.raw_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _read(response: http.client.HTTPResponse, end: float) -> bytes:
    """The body, at most `MAX_DOWNLOAD_BYTES`, all of it before `end`."""
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
        raise _Refused(f"{length} bytes announced")
    chunks, size = [], 0
    while chunk := response.read1(2**16):
        size += len(chunk)
        if size > MAX_DOWNLOAD_BYTES:
            raise _Refused("more than 50 MiB")
        chunks.append(chunk)
        _left(end)
    _left(end)  # an end cut short by the watchdog is no image
    return b"".join(chunks)
