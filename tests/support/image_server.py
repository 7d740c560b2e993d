"""A local HTTP server with image, redirect, oversize and slow routes, and a `FakeNetwork`
that stands in for DNS and routing so the SSRF guard can be tested on loopback: test names
resolve to public (or to loopback, private, metadata) addresses, a connection to the public
test address lands on the local server, and every connection is recorded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support.vision import picture, png_bytes

PNG = png_bytes(picture(1, 20, 20))
PUBLIC = "93.184.216.34"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/cat.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif self.path == "/hop":
            self._send(302, headers={"Location": "/cat.png"})
        elif self.path == "/to-private":
            self._send(302, headers={"Location": "http://inside.test/cat.png"})
        elif self.path == "/to-unlisted":
            self._send(302, headers={"Location": "http://elsewhere.test/cat.png"})
        elif self.path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif self.path == "/page":
            self._send(200, b"<html></html>", {"Content-Type": "text/html"})
        elif self.path == "/missing":
            self._send(404)
        elif self.path == "/big-declared":
            self._send(200, b"x" * 5000, {"Content-Type": "image/png"})
        elif self.path == "/big-undeclared":
            # No Content-Length, the body just keeps coming: the cap counts what arrives.
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self._trickle(b"x" * 1024, 100, pause=0.0)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._trickle(b"x", 1000, pause=0.05)

    def _trickle(self, chunk: bytes, times: int, *, pause: float) -> None:
        try:
            for _ in range(times):
                self.wfile.write(chunk)
                self.wfile.flush()
                if pause:
                    time.sleep(pause)
        except OSError:
            return  # the client gave up: the point of the test


@contextmanager
def image_server() -> Iterator[int]:
    """The server's port on 127.0.0.1 while the block runs."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


@dataclass
class FakeNetwork:
    port: int
    names: dict[str, list[str]] = field(
        default_factory=lambda: {
            "images.test": [PUBLIC],
            "elsewhere.test": [PUBLIC],
            "loopback.test": ["127.0.0.1"],
            "inside.test": ["10.1.2.3"],
            "metadata.test": ["169.254.169.254"],
            "mixed.test": [PUBLIC, "192.168.0.7"],
            "mapped.test": ["::ffff:127.0.0.1"],
        }
    )
    connected: list[str] = field(default_factory=list)

    def resolve(self, host: str, port: int) -> list[str]:
        return list(self.names.get(host, []))

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        self.connected.append(address)
        assert address == PUBLIC, f"the guard let a connection to {address} through"
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
