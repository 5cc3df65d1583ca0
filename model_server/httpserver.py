"""The HTTP/1.1 connection: uvicorn's httptools protocol with the header limits Envoy has.

httptools buffers a header however long it is, and the request only reaches the application
once every header has arrived: a 16 MB header was parsed, kept and handed to the masking of
the shadow path. Here the request line and headers together are limited to
``MAX_HEADER_BYTES`` (Envoy's ``max_request_headers_kb`` default, 60 KiB), their number to
``MAX_HEADERS`` (Envoy's ``max_headers_count``, 100), and the time to send them to
``HEADER_TIMEOUT_S`` (a client trickling one header byte a minute would otherwise hold its
connection forever: the keep-alive timer stops at the first byte). Over a limit the client gets
431 or 408 with the reason, as JSON like every other error, and the connection is closed;
nothing reaches the application.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from model_server.errors import HeaderLimitExceeded

MAX_HEADER_BYTES = 60 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 30.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.run(app, http=limited_protocol(30.0))``."""

    max_header_bytes = MAX_HEADER_BYTES
    max_headers = MAX_HEADERS
    header_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = False  # between a message's first byte and its last header
        self._received = 0  # bytes read while this message's headers were incomplete
        self._header_bytes = 0  # bytes of its complete headers (on_header)
        self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        was_in_headers = self._in_headers
        try:
            self._unset_keepalive_if_required()
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeaderLimitExceeded):
                self._refuse(431, str(exc.__context__))
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers:
            # Everything of this message so far is its request line and headers (the parser
            # consumed it all and the headers are not complete); a message that began in this
            # chunk may count some bytes of the one before: at most one read too many.
            self._received = (self._received if was_in_headers else 0) + len(data)
            if self._received > self.max_header_bytes:
                self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._received = 0
        self._header_bytes = 0
        self._header_count = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            raise HeaderLimitExceeded(f"more than {self.max_headers} request headers")
        if self._header_bytes > self.max_header_bytes:
            raise HeaderLimitExceeded(f"request headers exceed {self.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._end_header_phase()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_header_phase()
        super().connection_lost(exc)

    def _end_header_phase(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, f"request headers not complete within {self.header_timeout_s:g} s")

    def _bad_request(self) -> None:
        self._refuse(400, "invalid HTTP request")

    def _refuse(self, status: int, reason: str) -> None:
        self._end_header_phase()
        if self.transport.is_closing():
            return
        self.logger.warning("refused a request before its headers were read: %s", reason)
        body = json.dumps({"error": reason}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def limited_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> type[LimitedHttpToolsProtocol]:
    """The protocol class with its header timeout (the server's ``--request-timeout``)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"header_timeout_s": header_timeout_s})
