"""The HTTP/1.1 connection: uvicorn's httptools protocol with the header limits Envoy has, and
inference requests answered by the protocol itself.

httptools buffers a header however long it is, and the request only reaches the application
once every header has arrived: a 16 MB header was parsed, kept and handed to the masking of
the shadow path. Here the request line and headers together are limited to
``MAX_HEADER_BYTES`` (Envoy's ``max_request_headers_kb`` default, 60 KiB), their number to
``MAX_HEADERS`` (Envoy's ``max_headers_count``, 100), and the time to send them to
``HEADER_TIMEOUT_S`` (a client trickling one header byte a minute would otherwise hold its
connection forever: the keep-alive timer stops at the first byte); a client that leaves its
answers unread must read 64 KiB of them within that time, again and again, once more than
64 KiB wait to be sent (or all of them, once the connection is closing), or the connection is
aborted. Over a limit the client gets
431 or 408 with the reason, as JSON like every other error, once the answers to the requests
pipelined before it are written, and the connection is closed; nothing reaches the application.
A chunked body's framing (chunk sizes, extensions, line ends) is bounded alike (400): llhttp
parses any amount of it, for no body or for a callback a byte.

A small inference request is most of its time on the server in the layers around the model:
uvicorn's request cycle (the ASGI scope, an event, a task, two writes) cost about 100 us a
request here, against 25 us for parsing and answering it alone (`BENCHMARKS.md`, "The request
path"). So a request the ``DirectRoute`` matches (POST, its path, a Content-Length within the
route's ``max_body``, no ``Expect: 100-continue``, none of the route's ``asgi_headers``, none
waiting before it on the connection) is buffered whole (as the ASGI way's handler buffers it:
no more memory), its handler started at once where its last byte arrived (run to the end there
when it never waits, as Python 3.12's eager tasks do; a task carries on where it does wait), and
the answer written in one piece. Anything else goes the ASGI way as before; the handler is the same
code on both ways (app.py). A body not complete within the request timeout is answered 408 by
the handler, as on the ASGI way, and the connection closed; one whose client disconnects first
is the handler's too (a 400 counted, nothing written), as the ASGI way's handler counts it. A
client that disconnects while its handler waits (its request queued for a batch, say) cancels
the handler's task, as the ASGI way's handler is cancelled: nothing is written; so does one that
pipelined requests behind it (a pause holds what arrives, up to ``MAX_HELD_BYTES``, rather than
stop reading, which would not hear the client go).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import json
import logging
import platform
import re
from collections.abc import Callable, Coroutine, Generator
from typing import Any, NamedTuple

import httptools
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from model_server.config import ascii_uint
from model_server.errors import EveryInterval, RequestRefused, ServerBusy
from model_server.metrics import HTTP_REFUSALS

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 60 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 30.0
# A chunked body's framing (chunk sizes, extensions, line ends): at most this beyond 1/16 of
# its bytes (chunks of 100 bytes and up pass whatever the length).
MAX_CHUNK_FRAMING = 64 * 1024
# Requests parsed and waiting behind the one in flight on a connection: uvicorn keeps each
# (~2.4 KB) and resumes parsing after every answer, so a client pipelining without reading
# grew the server by what it sent (8 MB of small requests: 180 MB). Past it (about 5 MB; a
# read of 80 KB of small requests is served whole) a request is refused 429 after the answers
# before it, and the connection closed.
MAX_PIPELINED = 2048
# Answered on a connection past --max-connections (then closed): a busy server's probes say it
# is alive and ready (a liveness probe refused would have it restarted, a readiness probe
# refused take it out of the Service as it sheds load), and they cost no more than a refusal.
# A model's or a version's readiness (the rollout polls it) is one too: its segments are
# bounded, and a segment never holds "/", so the match is linear in the path.
PROBES = frozenset({b"/v2/health/live", b"/v2/health/ready", b"/metrics"})
MODEL_PROBE = re.compile(rb"/v2/models/[^/]{1,512}(?:/versions/[^/]{1,64})?/ready")
# A connection not yet admitted within --max-connections (it has sent no request) is closed after
# this long idle, not the keep-alive timeout: one that never sent a byte held its file
# descriptor, and a place at accept's cutoff, for 75 s.
ADMISSION_IDLE_S = 5.0
# Bytes read and held unparsed while parsing is paused (a request pipelined behind one in
# flight, a body its handler has not taken yet); past them the connection is not read.
MAX_HELD_BYTES = 64 * 1024


# A refusal's WARNING line: at most one per interval, the next one counting those left out (a
# flood of connections past --max-connections wrote one a request, as fast as they came).
REFUSAL_LOG_INTERVAL_S = 10.0


class RefusalLog(EveryInterval):
    """The refusals of every connection together, logged one line per interval."""

    def __init__(self) -> None:
        super().__init__(REFUSAL_LOG_INTERVAL_S)

    def warn(self, logger: logging.Logger, reason: str, what: str = "a request") -> None:
        left_out = self.due()
        if left_out is None:
            return
        if left_out:
            logger.warning(
                "refused %s: %s (and %d more refused since the last such line, not logged)", what, reason, left_out
            )
        else:
            logger.warning("refused %s: %s", what, reason)


REFUSALS = RefusalLog()


class Answer(NamedTuple):
    """A response: status, headers (lower-case names, no Content-Length), body, and what to do
    once it is written."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    then: Callable[[], None] | None = None


INTERNAL_ERROR = Answer(
    500, [(b"content-type", b"application/json")], b'{"error": "internal server error; see the server log"}'
)


class NoBody(enum.Enum):
    """Why a DirectRoute's handler is called without the body."""

    TIMED_OUT = "not complete within the request timeout"
    DISCONNECTED = "the client disconnected before it was complete"


# (path match, headers as received, the client's (host, port), the body or why there is none)
# -> the answer. It answers every outcome itself: it does not raise. Until it first waits it
# runs inside the protocol's callback, not in a task: no asyncio.timeout() there.
DirectHandler = Callable[
    [re.Match[str], list[tuple[bytes, bytes]], tuple[str, int] | None, bytes | NoBody], Coroutine[Any, Any, Answer]
]


class BodyBudget:
    """The bytes of request bodies being received, on every connection together: taken as they
    arrive (the ASGI way's handler takes what it reads, the protocol what it buffers for a
    DirectRoute), given back once the body is whole, cut short or refused. Twenty clients each
    holding a 60 MB body one byte short held 1.3 GB; past ``limit`` a body is refused 503
    (counted: ``body_budget``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise ServerBusy (nothing taken)."""
        if self.held + size > self.limit:
            HTTP_REFUSALS.labels("body_budget").inc()
            raise ServerBusy(
                f"server busy: the request bodies being received hold its limit of {self.limit} bytes "
                "(--max-bodies-mb); retry shortly"
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None under another C library (musl, macOS): none to call."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


mallopt = _glibc_mallopt()
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold() -> None:
    """Blocks of ``MMAP_THRESHOLD_BYTES`` or more are mmapped, given back to the system as they
    are freed. glibc raises its threshold as large blocks are freed (up to 32 MB), so a large
    body then went to the heap, kept for reuse: after three bursts of 8 bodies of 30 MB a
    server's RSS stayed at 635 MB (129 MB before), idle. A fixed threshold stops the raising.
    (malloc_trim after such bodies gave it back too, but holds the arena's lock as it walks the
    heap: 60 to 120 ms of the event loop's allocations stalled.)"""
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class DirectRoute(NamedTuple):
    pattern: re.Pattern[str]  # on the whole path, as ASCII
    handler: DirectHandler
    max_body: int  # bytes; a longer Content-Length goes the ASGI way (its handler answers 413)
    # Requests with one of these headers go the ASGI way, where the handler may refuse them from
    # their headers before their body is read (here it would run once the whole body arrived).
    asgi_headers: frozenset[bytes] = frozenset()
    budget: BodyBudget | None = None  # taken by the bodies buffered here


class DirectCycle:
    """One request the protocol answers itself, in the place of uvicorn's RequestResponseCycle
    (``self.cycle``: the attributes uvicorn's own callbacks read and write)."""

    def __init__(self, match: re.Match[str], headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.match, self.headers, self.keep_alive = match, headers, keep_alive
        self.chunks: list[bytes] = []
        self.held = 0  # bytes of its body taken from the route's budget
        self.started = False  # the handler was called
        self.response_complete = False
        self.disconnected = False
        self.message_event = self  # uvicorn sets it on each event: nothing waits on it here
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # carries the handler on once it waited

    def set(self) -> None:
        pass


class Resume:
    """Awaiting it carries on a coroutine that was started by hand and is waiting on ``first``
    (what it yielded): ``yield from`` that starts from a value already yielded."""

    def __init__(self, coro: Coroutine[Any, Any, Answer], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Answer]:
        out = self.first
        while True:
            try:
                sent = yield out
            except BaseException as exc:  # cancelled (the server stops): into the coroutine
                try:
                    out = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = self.coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class HoldingFlow(FlowControl):
    """uvicorn's flow control, but a pause stops the parsing, not the reading: the protocol
    holds what arrives unparsed (``MAX_HELD_BYTES``, then the transport is paused too), so a
    client that disconnects while its request waits is still heard (a paused transport reads
    nothing, its end of file neither), and a request in flight is cancelled as it is without
    one pipelined behind it."""

    def __init__(self, transport: asyncio.Transport, resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._resume = resume

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._resume()


class EarlyAnswerCycle(RequestResponseCycle):
    """uvicorn's request cycle, but an answer that starts before the request's body was read
    whole (a 400, 408 or 413 from its headers or its first bytes) closes the connection: uvicorn
    would go on reading and throwing away the rest, however long it was declared, with no timer."""

    async def send(self, message: Any) -> None:
        if not self.response_started and self.more_body:
            self.keep_alive = False
        await super().send(message)


class Listener:
    """A port's connections: those open, and those admitted (served; at most its limit). A
    connection is admitted at its first request, not as it is accepted: one a pool opened while
    the limit's connections were served is served once they closed, and idle ones hold no place."""

    def __init__(self) -> None:
        self.open = 0
        self.admitted = 0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.run(app, http=limited_protocol(30.0, direct))``."""

    max_header_bytes = MAX_HEADER_BYTES
    max_headers = MAX_HEADERS
    header_timeout_s = HEADER_TIMEOUT_S
    direct: DirectRoute | None = None
    max_connections: int | None = None
    # The admin port (its own limit, --max-admin-connections), and each port's connections: a
    # flood on the data port leaves the admin calls (traffic, load, rollback) served.
    admin_port: int | None = None
    max_admin_connections: int | None = None
    listeners: dict[int | None, Listener]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = False  # between a message's first byte and its last header
        self._received = 0  # bytes read while this message's headers were incomplete
        self._header_bytes = 0  # bytes of its complete headers (on_header)
        self._header_count = 0
        self._hosts = 0  # Host headers
        self._header_timer: asyncio.TimerHandle | None = None
        # As uvicorn's ProxyHeadersMiddleware sees the client, for the requests answered here.
        self._trusted = _TrustedHosts(self.config.forwarded_allow_ips) if self.config.proxy_headers else None
        self._complete: DirectCycle | None = None  # its last byte arrived in this data_received
        self._ended_in_read = False  # a message ended in this data_received
        # A request that asked for an Upgrade: the bytes of its body still to come by its
        # Content-Length (None: none asked). The parser stopped at its headers: the bytes
        # after them are that body, and nothing after it is read.
        self._upgrade_body: int | None = None
        # A refusal waiting for the answers to the requests before it (nothing more is read),
        # and the request whose body broke, which is never run.
        self._refusal: bytes | None = None
        self._broken: RequestResponseCycle | None = None
        # A chunked body being read: the bytes read for it and its own bytes (None: none is).
        self._chunked: list[int] | None = None
        # The request whose handler runs: uvicorn's ``cycle`` is the last request parsed, which
        # may be one pipelined behind it.
        self._running: RequestResponseCycle | DirectCycle | None = None
        # What arrived while parsing was paused (HoldingFlow), in order (None: nothing held).
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._release_pending = False
        # While the answers written wait over the transport's high-water mark: the timer, and
        # the bytes waiting when it was armed.
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0
        self._listener = Listener()  # its port's (connection_made)
        self._opened = False  # counted among its port's open connections
        # Admitted within its port's limit (True), past it (False: its requests refused 503,
        # probes answered, and it is closed after the first), or not yet decided (its first request).
        self._admitted: bool | None = None

    def _should_upgrade(self) -> bool:
        return False  # no websocket is served here (on_headers_complete)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        port = sockname[1] if isinstance(sockname, tuple) else None
        self._limit, self._limit_flag = self.max_connections, "--max-connections"
        if port is not None and port == self.admin_port:
            self._limit, self._limit_flag = self.max_admin_connections, "--max-admin-connections"
        self._listener = self.listeners.setdefault(port, Listener())
        self._listener.open += 1
        self._opened = True
        waiting = self._listener.open - self._listener.admitted
        if self._limit is not None and waiting > 2 * self._limit:
            # More than twice the limit not admitted (idle, or refused and closing): not even a
            # probe is answered, its file descriptor given back at once (a flood of idle ones ran
            # the process out of them: then accept fails, for probes too). The admitted ones are
            # not counted: a server serving its limit still has its probes answered.
            REFUSALS.warn(
                self.logger,
                f"closed as it was accepted: {waiting} connections not admitted, past twice the limit of "
                f"{self._limit} ({self._limit_flag})",
                "a connection",
            )
            HTTP_REFUSALS.labels("at_accept").inc()
            transport.abort()
            return
        self.flow = HoldingFlow(transport, self._release_soon)
        # uvicorn arms its keep-alive timer after an answer: one that never sends a byte is held too.
        self._idle()

    def _idle(self) -> None:
        if self.timeout_keep_alive_task is None:
            timeout = self.timeout_keep_alive if self._admitted else min(self.timeout_keep_alive, ADMISSION_IDLE_S)
            self.timeout_keep_alive_task = self.loop.call_later(timeout, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        if self._held is not None or self.flow.read_paused:
            self._hold(data)
            return
        if self._upgrade_body is not None:  # (set in the read the parser stopped in)
            self._upgrade_body_received(data)
            return
        self._parse(data)
        cycle, self._complete = self._complete, None
        if self.transport.is_closing():
            return
        if cycle is not None:
            body, cycle.chunks = b"".join(cycle.chunks), []  # not kept while the connection idles
            self._start_direct(cycle, body)
        # The header and body timers run from the end of the read that left a message's headers
        # or a direct request's body unfinished (most requests arrive whole in one read: none).
        if self._in_headers and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        current = self.cycle
        if isinstance(current, DirectCycle) and not current.started and current.timer is None:
            current.timer = self.loop.call_later(self.header_timeout_s, self._body_too_slow, current)
        # A read that began no message (blank lines between messages) leaves the connection idle:
        # the keep-alive timer it stopped runs again.
        if not self._in_headers and not self.pipeline and (current is None or current.response_complete):
            self._idle()

    def _hold(self, data: bytes) -> None:
        """Keep what arrived while parsing is paused, for when it resumes."""
        if self._held is None:
            self._held = []
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > MAX_HELD_BYTES:
            self.transport.pause_reading()

    def _release_soon(self) -> None:
        """Parsing resumed: what was held is parsed on the loop's next turn (not inside the
        callback that resumed it, which may be the parser's own)."""
        if self._held is not None and not self._release_pending:
            self._release_pending = True
            self.loop.call_soon(self._release)

    def _release(self) -> None:
        self._release_pending = False
        if self._held is None or self.flow.read_paused or self.transport.is_closing():
            return  # (paused again before this turn: the next resume releases it)
        data, self._held, self._held_bytes = b"".join(self._held), None, 0
        self.transport.resume_reading()
        self.data_received(data)

    def _parse(self, data: bytes) -> None:
        was_in_headers = self._in_headers
        self._ended_in_read = False
        if self._chunked is not None:  # (reset by the next message's first byte, if in this read)
            self._chunked[0] += len(data)
        try:
            self._unset_keepalive_if_required()
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, RequestRefused):
                self._refuse(refused.status, str(refused), refused.retry_after_s)
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_body_received(data[upgrade.args[0] :])
            return
        if self._in_headers:
            # Everything of this message so far is its request line and headers (the parser
            # consumed it all and the headers are not complete). A read in which another
            # message ended holds that one's bytes too: it is not counted (at most one read
            # too few; the next counts), so pipelined small requests are not taken for one
            # long header.
            if self._ended_in_read:
                self._received = 0
            else:
                self._received = (self._received if was_in_headers else 0) + len(data)
            if self._received > self.max_header_bytes:
                self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")
        elif (
            self._chunked is not None
            and self._chunked[0] - self._chunked[1] > MAX_CHUNK_FRAMING + self._chunked[1] // 16
        ):
            # llhttp reads chunk extensions and chunks of a byte at the speed they arrive, for no
            # body (or one callback a byte): a client held the event loop for the whole request
            # timeout, and every other request waited 0.15 to 0.5 s.
            self._refuse(
                400,
                f"chunked body framing (chunk sizes, extensions) over {MAX_CHUNK_FRAMING} bytes beyond 1/16 of "
                "the body: send fewer, larger chunks",
            )

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)  # the request line counts with the headers, as in Envoy
        if self._header_bytes > self.max_header_bytes:
            raise RequestRefused(431, f"request headers exceed {self.max_header_bytes} bytes")
        super().on_url(url)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._chunked = None
        self._in_headers = True
        self._received = 0
        self._header_bytes = 0
        self._header_count = 0
        self._hosts = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            raise RequestRefused(431, f"more than {self.max_headers} request headers")
        if self._header_bytes > self.max_header_bytes:
            raise RequestRefused(431, f"request headers exceed {self.max_header_bytes} bytes")
        super().on_header(name, value)
        name = self.headers[-1][0]  # (lower-cased by uvicorn)
        if name == b"host":
            self._hosts += 1
        elif name == b"transfer-encoding":
            # RFC 9112 6.1: a coding the server does not apply is a 501 (llhttp frames "gzip,
            # chunked" by its chunks, and the body would be read still gzipped).
            for coding in value.split(b","):
                if coding.strip().lower() != b"chunked":
                    shown = coding.strip().decode("latin-1")[:64]
                    raise RequestRefused(501, f"Transfer-Encoding {shown!r} is not supported: only chunked")

    def on_headers_complete(self) -> None:
        self._end_header_phase()
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            self._chunked = [0, 0]
        # llhttp parses an HTTP/0.9 request line (no version) and an HTTP/2.0 one (other versions
        # are a 400): they are refused, as nginx does, rather than answered over HTTP/1.1.
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise RequestRefused(505, f"HTTP version {version} is not supported: only 1.0 and 1.1")
        # RFC 9112 3.2, as Envoy: an HTTP/1.1 request without Host, any with two, is a 400 (a
        # proxy in front and this server could each take a different one).
        if self._hosts > 1 or (not self._hosts and version == "1.1"):
            raise RequestRefused(400, "a request needs exactly one Host header")
        probe = False
        if self._admitted is None:
            # Its first request: admitted while fewer than its port's limit are (those admitted
            # before it serve on); past it its requests are refused 503 to retry, probes answered.
            self._admitted = self._limit is None or self._listener.admitted < self._limit
            self._listener.admitted += self._admitted
        if not self._admitted:
            url = self.url
            path = url if b"?" not in url else httptools.parse_url(url).path
            probe = self.parser.get_method() in (b"GET", b"HEAD") and (
                path in PROBES or MODEL_PROBE.fullmatch(path) is not None
            )
            if not probe:
                HTTP_REFUSALS.labels("over_limit").inc()
                raise RequestRefused(
                    ServerBusy.status,
                    f"server busy: it holds its limit of {self._limit} connections ({self._limit_flag}); retry shortly",
                    ServerBusy.retry_after_s,
                )
        # An Upgrade (h2c, as Java's HttpClient and curl --http2 ask it; websocket: none is
        # served here) stops the parser at these headers: the body would be parsed as the next
        # request. The request is served over HTTP/1.1 (RFC 9110 lets a server ignore Upgrade),
        # its body taken by its Content-Length (a chunked one is refused), and the connection
        # closed after the answer: nothing after that body is read.
        if self.parser.should_upgrade():
            length = 0
            for name, value in self.headers:
                if name == b"transfer-encoding":
                    raise RequestRefused(400, "Upgrade with a chunked body is not supported: send it without Upgrade")
                if name == b"content-length":
                    length = ascii_uint(value.decode("latin-1").strip()) or 0
            self._upgrade_body = length
        cycle = self._direct_cycle()
        if cycle is not None:
            self.cycle = cycle  # type: ignore[assignment]
            return
        if len(self.pipeline) >= MAX_PIPELINED:
            HTTP_REFUSALS.labels("pipelined").inc()
            raise RequestRefused(
                429, f"more than {MAX_PIPELINED} requests pipelined unanswered: read the answers before sending more"
            )
        super().on_headers_complete()
        if self._upgrade_body is not None or probe:
            self.cycle.keep_alive = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = EarlyAnswerCycle  # (before its task runs: its send is the one it calls)
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _upgrade_body_received(self, data: bytes) -> None:
        left = self._upgrade_body or 0
        if not left or not data:
            return
        self._upgrade_body = left - len(data[:left])
        self.on_body(data[:left])
        if not self._upgrade_body:
            self.on_message_complete()

    def _direct_cycle(self) -> DirectCycle | None:
        """The request as a DirectCycle, when the DirectRoute takes it (not while the client
        leaves answers unread: the ASGI way waits for the transport to drain)."""
        if self.direct is None or self.parser.get_method() != b"POST" or self.expect_100_continue:
            return None
        if self.flow.write_paused:
            return None
        if self.pipeline or not (self.cycle is None or self.cycle.response_complete) or self._upgrade_body is not None:
            return None
        url = self.url
        path = url if b"?" not in url and b"#" not in url else httptools.parse_url(url).path
        if b"%" in path or not path.isascii():
            return None  # percent-decoding and its errors: the ASGI way
        match = self.direct.pattern.fullmatch(path.decode("ascii"))
        if match is None:
            return None
        length = None
        asgi_headers = self.direct.asgi_headers
        for name, value in self.headers:
            if (
                name in asgi_headers
                or name == b"transfer-encoding"
                or (name == b"content-length" and length is not None)
            ):
                return None
            if name == b"content-length":
                length = ascii_uint(value.decode("latin-1").strip())
        if length is None or length > self.direct.max_body:
            return None
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        return DirectCycle(match, self.headers, keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._chunked is not None:
            self._chunked[1] += len(body)
        cycle = self.cycle
        if isinstance(cycle, DirectCycle):  # kept whole (no pause: nothing else would read it)
            if not cycle.started:
                self._take(cycle, len(body))
                cycle.chunks.append(body)
            return
        super().on_body(body)

    def _take(self, cycle: DirectCycle, size: int) -> None:
        budget = self.direct.budget if self.direct is not None else None
        if budget is None:
            return
        try:
            budget.take(size)
        except ServerBusy as busy:
            self._give_back(cycle)
            cycle.chunks = []
            raise RequestRefused(busy.status, busy.message, busy.retry_after_s) from None
        cycle.held += size

    def _give_back(self, cycle: DirectCycle) -> None:
        """Its body is whole, cut short or refused: its bytes leave the budget (once)."""
        if cycle.held and self.direct is not None and self.direct.budget is not None:
            self.direct.budget.give(cycle.held)
        cycle.held = 0

    def on_message_complete(self) -> None:
        self._ended_in_read = True
        self._chunked = None
        if self._upgrade_body:  # the parser ends the message at its headers: its body follows
            return
        cycle = self.cycle
        if isinstance(cycle, DirectCycle):
            if not cycle.started:  # (started: its body timed out, the handler answers that)
                self._complete = cycle
            return
        super().on_message_complete()

    def _client(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, int] | None:
        client = self.client
        if self._trusted is None or client is None or client[0] not in self._trusted:
            return client
        forwarded = [value for name, value in headers if name == b"x-forwarded-for"]
        if not forwarded:
            return client
        host, port = self._trusted.get_trusted_client_address(b", ".join(forwarded).decode("latin1"))
        return (host, port) if host else client

    def _start_direct(self, cycle: DirectCycle, body: bytes | NoBody) -> None:
        """Run the handler here until it waits; then a task carries it on."""
        cycle.started = True
        self._running = cycle
        self._give_back(cycle)
        if cycle.timer is not None:
            cycle.timer.cancel()
            cycle.timer = None
        assert self.direct is not None
        coro = self.direct.handler(cycle.match, cycle.headers, self._client(cycle.headers), body)
        try:
            first = coro.send(None)
        except StopIteration as done:
            self._answer(cycle, done.value)
            return
        except BaseException as exc:
            self._failed(cycle, exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise  # KeyboardInterrupt, SystemExit
            return
        task = cycle.task = self.loop.create_task(self._finish(cycle, Resume(coro, first)))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _finish(self, cycle: DirectCycle, rest: Resume) -> None:
        try:
            answer = await rest
        except BaseException as exc:  # cancelled too (the server's shutdown timed out): answered
            self._failed(cycle, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._answer(cycle, answer)

    def _failed(self, cycle: DirectCycle, exc: BaseException) -> None:
        """The handler raised (it should answer every outcome itself): 500, and the connection
        closed, as uvicorn does for an ASGI app that fails."""
        if isinstance(exc, Exception):
            log.exception("unhandled error on POST %s", cycle.match.string, exc_info=exc)
        cycle.keep_alive = False
        self._answer(cycle, INTERNAL_ERROR)

    def _answer(self, cycle: DirectCycle, answer: Answer) -> None:
        cycle.response_complete = True
        if not cycle.disconnected and not self.transport.is_closing():
            head = [STATUS_LINE[answer.status]]
            for name, value in (*self.server_state.default_headers, *answer.headers):
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-length: %d\r\n" % len(answer.body))
            if not cycle.keep_alive:
                head.append(b"connection: close\r\n")
            self.transport.write(b"".join([*head, b"\r\n", answer.body]))
            if not cycle.keep_alive:
                self.transport.close()
        try:
            if answer.then is not None:
                answer.then()
        except Exception:
            log.exception("after the answer to POST %s", cycle.match.string)
        self.on_response_complete()

    def pause_writing(self) -> None:
        """The client leaves answers unread: it must read 64 KiB of them (or all) within the
        request timeout, again and again, or the connection is closed. A client that never
        read held the connection, the answer's bytes and (on the ASGI way) its task forever."""
        super().pause_writing()
        self._watch_writes()

    def _watch_writes(self) -> None:
        if self._write_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(self.header_timeout_s, self._written_too_slow)

    def _closing(self) -> None:
        """The transport was closed: with answers unsent, it waits for the client to read them,
        forever for one that never does (under the high-water mark no pause_writing came), one
        file descriptor each. The client must read them as it must while writing is paused."""
        if self.transport.get_write_buffer_size():
            self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None and not self.transport.is_closing():  # (closing: until all is sent)
            self._write_timer.cancel()
            self._write_timer = None

    def _written_too_slow(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent <= self._unsent - MAX_HELD_BYTES:  # read on, if slowly: another round
            self._unsent = unsent
            self._write_timer = self.loop.call_later(self.header_timeout_s, self._written_too_slow)
            return
        self.logger.warning(
            "closed a connection: its client did not read its answer within %g s (%d bytes unsent)",
            self.header_timeout_s,
            unsent,
        )
        self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # (reading resumes)
        if self.transport.is_closing():  # (an answer with connection: close)
            self._closing()
            return
        if self._refusal is not None and not self._answers_pending():
            self._write_refusal(self._refusal)
            return
        if self._in_headers and self._header_timer is None and not self.flow.read_paused:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _body_too_slow(self, cycle: DirectCycle) -> None:
        """Its body not complete in time: the handler answers 408; the connection closes (the
        parser is in the middle of the body)."""
        cycle.timer = None
        if self.cycle is cycle and not cycle.started:
            cycle.keep_alive = False
            self._start_direct(cycle, NoBody.TIMED_OUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_header_phase()
        self._unset_keepalive_if_required()  # (uvicorn's only when the client closed cleanly)
        self._held = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        running, cycle = self._running, self.cycle
        if running is not None and running is not cycle and not running.response_complete:
            # In flight with a request parsed behind it, which uvicorn's cycle names (and tells
            # alone): told as it would be without one; those behind it never start.
            self._gone(running)
        if isinstance(cycle, DirectCycle) and not cycle.response_complete:
            self._gone(cycle)
        if self._opened:
            self._opened = False
            self._listener.open -= 1
        if self._admitted:
            self._admitted = False
            self._listener.admitted -= 1
        super().connection_lost(exc)

    def _gone(self, cycle: RequestResponseCycle | DirectCycle) -> None:
        """Its client disconnected before its answer."""
        if not isinstance(cycle, DirectCycle):  # as uvicorn tells its cycle (its watch cancels it: app.py)
            cycle.disconnected = True
            cycle.message_event.set()
            return
        if cycle.timer is not None:
            cycle.timer.cancel()
        cycle.disconnected = True  # (nothing is written)
        if not cycle.started:  # gone mid-body: the handler answers it, as the ASGI way's does
            self._start_direct(cycle, NoBody.DISCONNECTED)
        elif cycle.task is not None:  # gone while it waits (in the batcher's queue, say): given up
            # Once the task took its first step (scheduled when it was made): cancelled before
            # that, it would end without the handler, left waiting, ever hearing of it.
            self.loop.call_soon(cycle.task.cancel)

    def _end_header_phase(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.flow.read_paused:  # behind an answer not yet written: not read, so not late
            return  # (the time runs again once reading resumes: on_response_complete)
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, f"request headers not complete within {self.header_timeout_s:g} s")

    def _bad_request(self) -> None:
        self._refuse(400, "invalid HTTP request")

    def _refuse(self, status: int, reason: str, retry_after_s: int | None = None) -> None:
        """Answer ``status`` with ``reason`` and close the connection, once the answers to the
        requests before the refused one are written (a client that pipelines gets those, in
        order); nothing after it is read. A request whose body broke is never run."""
        self._end_header_phase()
        if self.transport.is_closing() or self._refusal is not None:
            return
        REFUSALS.warn(self.logger, reason)
        body = json.dumps({"error": reason}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        if retry_after_s is not None:
            head.append(b"retry-after: %d\r\n" % retry_after_s)
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self._refusal = b"".join(head)
        cycle = self.cycle
        in_line = False
        if isinstance(cycle, RequestResponseCycle) and cycle.more_body and not cycle.response_complete:
            # Its body is what broke: it runs already, or it waits in line behind one in flight
            # (the one uvicorn no longer names) and is taken out of it.
            self._broken = cycle
            in_line = any(waiting is cycle for waiting, _ in self.pipeline)
            self.pipeline = type(self.pipeline)(waiting for waiting in self.pipeline if waiting[0] is not cycle)
        elif isinstance(cycle, DirectCycle) and not cycle.started and cycle is not self._complete:
            # Its body is what was refused (BodyBudget): it is never run.
            if cycle.timer is not None:
                cycle.timer.cancel()
            cycle.started = cycle.response_complete = True
            self._give_back(cycle)
        if not in_line and not self._answers_pending():
            self._write_refusal(self._refusal)

    def _answers_pending(self) -> bool:
        """Requests before a refused one not yet answered: waiting in line, or in flight."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and cycle is not self._broken and not cycle.response_complete)

    def _write_refusal(self, refusal: bytes) -> None:
        self.transport.write(refusal)
        self.transport.close()
        self._closing()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._closing()

    def shutdown(self) -> None:
        super().shutdown()
        if self.transport.is_closing():
            self._closing()


def limited_protocol(
    header_timeout_s: float = HEADER_TIMEOUT_S,
    direct: DirectRoute | None = None,
    max_connections: int | None = None,
    admin_port: int | None = None,
    max_admin_connections: int | None = None,
) -> type[LimitedHttpToolsProtocol]:
    """The protocol class with its header and body timeout (the server's ``--request-timeout``),
    the requests it answers itself and the connections it serves on each port
    (``--max-connections``; on ``admin_port``, ``--max-admin-connections``)."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "direct": direct,
            "max_connections": max_connections,
            "admin_port": admin_port,
            "max_admin_connections": max_admin_connections,
            "listeners": {},
        },
    )
