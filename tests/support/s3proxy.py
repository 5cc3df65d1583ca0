"""A pass-through HTTP proxy on loopback in front of the S3 API (moto's server): it records what
each request carried and lets a test act before one is forwarded (another writer's PUT landing
first) or answer it in the store's stead, or stand in for a store that ignores conditional
PUTs (``ignore_conditions``); stopped when the test ends."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import POLL_INTERVAL_S


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def put_of(self, key_end: str) -> bool:
        """Whether it is a PUT of the key ending in ``key_end``."""
        return self.method == "PUT" and self.path.split("?")[0].endswith(key_end)


@dataclass
class S3Proxy:
    port: int
    seen: list[Seen] = field(default_factory=list)
    # Called with each request before it is forwarded: (status, body) to answer it in the
    # store's stead, None to forward it.
    before: Callable[[Seen], tuple[int, bytes] | None] = lambda _: None
    # A store that ignores S3's conditional writes (older MinIO and Ceph RGW, some gateways):
    # ``If-Match`` and ``If-None-Match`` are not forwarded, so a PUT they would refuse is written.
    ignore_conditions: bool = False
    # Response headers not passed back (lower-cased): a store that sends no ETag.
    drop_response_headers: tuple[str, ...] = ()

    def uri(self, bucket: str, prefix: str) -> str:
        return f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def puts(self, key_end: str) -> list[Seen]:
        return [s for s in self.seen if s.put_of(key_end)]


@contextmanager
def s3_proxy(upstream_port: int) -> Iterator[S3Proxy]:
    proxy = S3Proxy(0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if not size:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def relay(self) -> None:
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self._body())
            proxy.seen.append(seen)
            answer = proxy.before(seen)
            if answer is not None:
                status, body, headers = answer[0], answer[1], {"Content-Type": "application/xml"}
            else:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                dropped = {"transfer-encoding"} | ({"if-match", "if-none-match"} if proxy.ignore_conditions else set())
                forwarded = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                forwarded["Content-Length"] = str(len(seen.body))
                conn.request(self.command, self.path, body=seen.body, headers=forwarded)
                response = conn.getresponse()
                status, body = response.status, response.read()
                dropped = ("transfer-encoding", "connection", *proxy.drop_response_headers)
                headers = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
                conn.close()
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = relay

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
