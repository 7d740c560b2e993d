"""Where an image's bytes come from: a data URI, or an http(s) URL behind an SSRF guard.

A client-supplied URL makes the neuron open a connection on the client's behalf, from
inside the operator's network. So fetching is off unless the operator turns it on, and
then a URL is fetched only when:

- its host is on the allow-list (exact names, compared lower-case);
- every address the name resolves to is a public one (not loopback, private, link-local,
  which covers cloud metadata at 169.254.169.254, shared, multicast or reserved), and the
  connection goes to the address that was checked, not to a second lookup (DNS rebinding);
- every redirect passes the same checks again (at most `max_redirects`);
- the answer is a 200 with an `image/*` content type, no larger than `max_bytes`, and the
  whole exchange ends before the deadline.

Everything else is an `ApiError` 400 that names the image and the reason. `Network` is the
seam for resolving and connecting (the tests map an allow-listed name to a local server).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from cortex_core.errors import ApiError

REDIRECTS = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 << 10


class Network(Protocol):
    def resolve(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to."""
        ...

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        """A connected TCP socket to `address`."""
        ...


class SystemNetwork:
    def resolve(self, host: str, port: int) -> list[str]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((address, port), timeout=timeout)


@dataclass(frozen=True)
class FetchPolicy:
    """The operator's rules for image URLs (neuron.toml `[vision]`)."""

    fetch_urls: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    max_bytes: int = 20 << 20
    timeout_secs: float = 10.0
    max_redirects: int = 3
    network: Network = field(default_factory=SystemNetwork)


class ImageRefused(ApiError):
    """An image the neuron will not use: 400, naming the image (`param`) and why."""

    def __init__(self, where: str, reason: str, code: str = "image_refused") -> None:
        super().__init__(400, f"{where}: {reason}", code=code, param=where)


def is_public_address(address: str) -> bool:
    """Only globally routable unicast addresses (an IPv4-mapped IPv6 address as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def decode_data_uri(uri: str, where: str, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, media type) of a `data:` URI, base64 or percent-encoded."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageRefused(where, "malformed data URI (no comma)", "image_invalid")
    params = header[len("data:") :].split(";")
    media = params[0].strip().lower() or "text/plain"
    if not media.startswith("image/"):
        raise ImageRefused(where, f"data URI media type {media!r} is not an image", "image_invalid")
    # Base64 is 4 characters per 3 bytes: refuse the oversized before decoding them.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageRefused(where, f"image larger than the {max_bytes}-byte limit", "image_too_large")
    try:
        data = (
            base64.b64decode(payload, validate=True) if "base64" in params[1:] else unquote_to_bytes(payload)
        )
    except (binascii.Error, ValueError) as exc:
        raise ImageRefused(where, f"data URI is not valid base64 ({exc})", "image_invalid") from exc
    if len(data) > max_bytes:
        raise ImageRefused(where, f"image larger than the {max_bytes}-byte limit", "image_too_large")
    return data, media


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one already-checked address, speaking to `host` by name."""

    def __init__(
        self, host: str, port: int, address: str, *, tls: bool, network: Network, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._tls = tls
        self._network = network
        # Kept past http.client's own reference (it drops `sock` once a response says it
        # closes) so every read's timeout can be set to what is left of the deadline.
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        sock = self._network.connect(self._address, self.port, self.timeout or 10.0)
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = self.pinned = sock


class ImageFetcher:
    """Fetches image URLs under a `FetchPolicy` (blocking: it runs on a request's worker thread)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy

    def load(self, url: str, where: str) -> bytes:
        """The image bytes behind `url` (a data URI or, when allowed, http/https)."""
        policy = self.policy
        if url.startswith("data:"):
            return decode_data_uri(url, where, policy.max_bytes)[0]
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageRefused(where, f"unsupported image URL scheme {scheme or '(none)'!r}; send a data URI")
        if not policy.fetch_urls:
            raise ImageRefused(
                where,
                "this neuron does not fetch image URLs (vision.fetch_urls is off); send the image as a "
                "data URI or base64",
            )
        deadline = time.monotonic() + policy.timeout_secs
        try:
            return self._follow(url, where, deadline)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline or isinstance(exc, TimeoutError):
                raise ImageRefused(
                    where, f"fetching {url} took longer than {policy.timeout_secs:g} s", "image_fetch_failed"
                ) from exc
            raise ImageRefused(where, f"fetching {url} failed: {exc}", "image_fetch_failed") from exc

    def _follow(self, url: str, where: str, deadline: float) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            status, location, body = self._get(url, where, deadline)
            if status not in REDIRECTS:
                return body
            if not location:
                raise ImageRefused(where, f"{url} redirected without a Location", "image_fetch_failed")
            url = urljoin(url, location)
        raise ImageRefused(where, f"more than {self.policy.max_redirects} redirects", "image_fetch_failed")

    def _target(self, url: str, where: str) -> tuple[str, int, str, bool]:
        """(host, port, checked address, tls) for `url`, or a refusal."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageRefused(where, f"redirected to unsupported scheme {scheme!r}")
        host = (parts.hostname or "").lower()
        if host not in self.policy.allowed_hosts:
            raise ImageRefused(where, f"host {host!r} is not in vision.allowed_hosts")
        port = parts.port or (443 if scheme == "https" else 80)
        addresses = self.policy.network.resolve(host, port)
        if not addresses:
            raise ImageRefused(where, f"host {host!r} does not resolve", "image_fetch_failed")
        # Every address, not just the first: a name that also points inside is refused.
        for address in addresses:
            if not is_public_address(address):
                raise ImageRefused(
                    where, f"host {host!r} resolves to {address}, which is not a public address"
                )
        return host, port, addresses[0], scheme == "https"

    def _get(self, url: str, where: str, deadline: float) -> tuple[int, str | None, bytes]:
        host, port, address, tls = self._target(url, where)
        remaining = max(0.001, deadline - time.monotonic())
        connection = _PinnedConnection(
            host, port, address, tls=tls, network=self.policy.network, timeout=remaining
        )
        try:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"Accept": "image/*", "User-Agent": "cortex-neuron"})
            response = connection.getresponse()
            if response.status in REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.status != 200:
                raise ImageRefused(where, f"{url} answered HTTP {response.status}", "image_fetch_failed")
            media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if not media.startswith("image/"):
                raise ImageRefused(where, f"{url} is {media or 'untyped'}, not an image", "image_invalid")
            return response.status, None, self._read(connection, response, where, deadline)
        finally:
            connection.close()
            if connection.pinned is not None:
                connection.pinned.close()

    def _read(
        self, connection: _PinnedConnection, response: http.client.HTTPResponse, where: str, deadline: float
    ) -> bytes:
        limit = self.policy.max_bytes
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ImageRefused(where, f"image larger than the {limit}-byte limit", "image_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed while reading")
            if connection.pinned is not None:
                # A trickling server must not hold the fetch past its deadline: each read
                # waits at most what is left of it.
                connection.pinned.settimeout(remaining)
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise ImageRefused(where, f"image larger than the {limit}-byte limit", "image_too_large")
            chunks.append(chunk)
