"""An HTTP server on loopback that answers what a test tells it to: garbage, another shape,
a huge body, or a body a byte at a time (``trickle``), or what a function of the path says
(``answering_server``); stopped when the test ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import POLL_INTERVAL_S


@contextmanager
def hostile_server(body: bytes = b"", trickle_s: float = 0.0, trickle_for_s: float = 10.0) -> Iterator[str]:
    """Every GET and PUT answers 200 with ``body``; with ``trickle_s`` a body that never ends,
    a byte every ``trickle_s`` seconds for at most ``trickle_for_s``. Yields its base URL."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(10**6 if trickle_s else len(body)))
            self.end_headers()
            if not trickle_s:
                self.wfile.write(body)
                return
            end = time.monotonic() + trickle_for_s
            while time.monotonic() < end and not stop.is_set():
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(trickle_s)

        do_GET = do_PUT = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def answering_server(answer: Callable[[str], tuple[int, bytes]]) -> Iterator[str]:
    """Every GET answers ``answer(path)``: its status and JSON body. Yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
