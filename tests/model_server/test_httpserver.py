"""The HTTP protocol's own way for inference requests (httpserver.DirectRoute), on a transport
that records what the protocol writes: which requests it answers itself and which it leaves to
the ASGI app, in order, in one write, and what happens when a handler waits, fails or its body
never comes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from model_server.httpserver import Answer, BodyBudget, DirectRoute, NoBody, limited_protocol


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # (written at once)

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/early":  # answered from its headers, its body not read
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % (len(body) + 5))]}
    )
    await send({"type": "http.response.body", "body": b"asgi:" + body})


class Handler:
    """Echoes the body; ``wait``: first waits on a future the test resolves."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | NoBody, tuple[str, int] | None]] = []
        self.wait: asyncio.Future[None] | None = None
        self.then: list[int] = []

    async def __call__(
        self, match: re.Match[str], headers: list[tuple[bytes, bytes]], client: Any, body: bytes | NoBody
    ) -> Answer:
        self.calls.append((match.group(1), body, client))
        if body == b"bug":
            raise RuntimeError("a bug")
        if self.wait is not None:
            await self.wait
        if isinstance(body, NoBody):
            return Answer(408 if body is NoBody.TIMED_OUT else 400, [], body.value.encode(), self.counted)
        return Answer(200, [(b"x-path", b"direct")], b"direct:" + body, self.counted)

    def counted(self) -> None:
        self.then.append(len(self.then))


def connect(
    handler: Handler, timeout_s: float = 30.0, budget: BodyBudget | None = None, **config: Any
) -> tuple[Any, Transport]:
    route = DirectRoute(re.compile(r"/m/([^/]+)/infer"), handler, MAX_BODY, frozenset({b"x-checked-first"}), budget)
    cls = limited_protocol(timeout_s, route)
    protocol = cls(Config(asgi_app, **config), ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


MAX_BODY = 256 * 1024


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def bodies(transport: Transport) -> list[bytes]:
    """The bodies of the responses written, in order (the ASGI way writes a head and a body)."""
    out, rest = [], b"".join(transport.writes)
    while rest:
        head, rest = rest.split(b"\r\n\r\n", 1)
        if head.startswith(b"HTTP/1.1 100 "):
            continue
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        out.append(rest[:length])
        rest = rest[length:]
    return out


def test_an_inference_request_is_answered_where_it_arrived_in_one_write() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/digits/infer", b"abc"))
        # Answered before the event loop ran again: no task.
        assert len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"x-path: direct\r\n" in transport.writes[0]
        assert b"content-length: 10\r\n" in transport.writes[0]
        assert bodies(transport) == [b"direct:abc"]
        assert handler.calls == [("digits", b"abc", ("127.0.0.1", 5000))]
        assert handler.then == [0]  # after it was written
        assert not transport.closed  # keep-alive
        # Its headers and body in separate reads: answered on the last one.
        head, body = post("/m/digits/infer", b"defg").split(b"\r\n\r\n")
        protocol.data_received(head + b"\r\n\r\n")
        protocol.data_received(body[:2])
        assert len(transport.writes) == 1
        protocol.data_received(body[2:])
        assert bodies(transport) == [b"direct:abc", b"direct:defg"]
        # A body of many reads (more than uvicorn buffers before it pauses reading) kept whole.
        big = post("/m/digits/infer", bytes(range(256)) * 1024)
        for i in range(0, len(big), 65536):
            protocol.data_received(big[i : i + 65536])
        assert bodies(transport)[-1] == b"direct:" + bytes(range(256)) * 1024

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"GET /m/digits/infer HTTP/1.1\r\nHost: x\r\n\r\n", "not a POST"),
        (post("/other/infer", b"abc"), "another path"),
        (post("/m/dig%69ts/infer", b"abc"), "a percent-encoded path"),
        (post("/m/digits/infer", b"a" * (MAX_BODY + 1)), "a body over the route's max_body"),
        (post("/m/digits/infer", b"abc", "Expect: 100-continue"), "Expect: 100-continue"),
        (post("/m/digits/infer", b"abc", "X-Checked-First: 1"), "one of the route's asgi_headers"),
        (
            b"POST /m/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "a chunked body",
        ),
    ],
)
def test_other_requests_go_the_asgi_way(request_bytes: bytes, why: str) -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(request_bytes)
        await settle()
        assert handler.calls == [], why
        assert bodies(transport)[-1].startswith(b"asgi:"), why

    asyncio.run(scenario())


def test_pipelined_requests_are_answered_in_order_whichever_way_each_goes() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        chunked = b"POST /m/x/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n2\r\n0\r\n\r\n"
        protocol.data_received(post("/m/x/infer", b"1") + chunked + post("/m/x/infer", b"3") + post("/o", b"4"))
        await settle()
        assert bodies(transport) == [b"direct:1", b"asgi:2", b"asgi:3", b"asgi:4"]

    asyncio.run(scenario())


def test_a_handler_that_waits_is_carried_on_by_a_task_and_answers_after() -> None:
    async def scenario() -> None:
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"slow") + post("/m/x/infer", b"next"))
        await settle()
        assert transport.writes == []
        assert len(protocol.tasks) == 1  # the server waits for it on shutdown
        handler.wait.set_result(None)
        await settle()
        assert bodies(transport) == [b"direct:slow", b"asgi:next"]  # the next one waited its turn
        assert not protocol.tasks

    asyncio.run(scenario())


def test_a_handler_cancelled_while_it_waits_is_cancelled_inside() -> None:
    async def scenario() -> None:
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"slow"))
        await settle()
        (task,) = protocol.tasks
        task.cancel()  # uvicorn's shutdown timed out
        await settle()
        assert handler.wait.cancelled()  # what the handler awaited, as a task's cancel does
        assert task.cancelled()
        assert transport.writes[0].startswith(b"HTTP/1.1 500 ")  # answered, then closed
        assert transport.closed

    asyncio.run(scenario())


def test_a_handler_bug_is_a_500_and_the_connection_closed_as_uvicorn_does() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"bug") + post("/m/x/infer", b"next"))
        assert len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 500 ")
        assert b"internal server error" in transport.writes[0]
        assert b"connection: close\r\n" in transport.writes[0]
        assert transport.closed

    asyncio.run(scenario())


def test_a_failure_after_the_answer_does_not_hold_up_the_next_request() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        handler.then = None  # type: ignore[assignment]  # then() raises: None has no append
        protocol.data_received(post("/m/x/infer", b"1") + post("/m/x/infer", b"2"))
        await settle()
        assert bodies(transport) == [b"direct:1", b"asgi:2"]
        assert not transport.closed

    asyncio.run(scenario())


def test_while_the_client_leaves_answers_unread_requests_wait_the_asgi_way() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.pause_writing()  # the transport's buffer is over its high-water mark
        protocol.data_received(post("/m/x/infer", b"1"))
        await settle()
        assert handler.calls == []
        assert transport.writes == []  # uvicorn's send waits for the buffer to drain
        protocol.resume_writing()
        await settle()
        assert bodies(transport) == [b"asgi:1"]

    asyncio.run(scenario())


def test_the_body_is_not_kept_once_the_handler_has_it() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"a" * 200_000))
        assert bodies(transport) == [b"direct:" + b"a" * 200_000]
        assert protocol.cycle.chunks == []  # the idle connection's cycle holds no body

    asyncio.run(scenario())


def test_many_small_pipelined_requests_in_one_read_are_not_one_long_header() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        many = b"".join(post("/m/x/infer", b"%d" % i) for i in range(1200))  # about 80 KB
        protocol.data_received(many + b"GET /o HTTP/1.1\r\n")  # and the start of one more
        for _ in range(2000):  # the ASGI way's answers, one task each (however busy the machine)
            if len(bodies(transport)) == 1200:
                break
            await asyncio.sleep(0.01)
        assert len(bodies(transport)) == 1200
        assert not transport.closed
        protocol.data_received(b"Host: x\r\n\r\n")
        await settle()
        assert len(bodies(transport)) == 1201

    asyncio.run(scenario())


def test_a_body_not_complete_in_time_is_answered_by_the_handler_and_the_connection_closed() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler, timeout_s=0.05)
        protocol.data_received(post("/m/x/infer", b"abcdef")[:-3])
        await asyncio.sleep(0.3)
        assert handler.calls == [("x", NoBody.TIMED_OUT, ("127.0.0.1", 5000))]
        assert transport.writes[0].startswith(b"HTTP/1.1 408 ")
        assert b"connection: close\r\n" in transport.writes[0]
        assert transport.closed

    asyncio.run(scenario())


class CountingLoop:
    """The loop, noting the protocol's own timers armed (not uvicorn's keep-alive)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.armed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        if callback.__name__ in ("_headers_too_slow", "_body_too_slow"):
            self.armed.append(callback.__name__)
        return self.loop.call_later(delay, callback, *args)


def test_timers_are_armed_only_for_a_message_a_read_left_unfinished() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, _ = connect(handler)
        protocol.loop = CountingLoop(protocol.loop)
        protocol.data_received(post("/m/x/infer", b"whole"))
        assert protocol.loop.armed == []
        request = post("/m/x/infer", b"abcdef")
        protocol.data_received(request[:20])  # headers cut short
        header_timer = protocol._header_timer
        assert header_timer is not None
        protocol.data_received(request[20:30])  # still: the same deadline
        assert protocol._header_timer is header_timer
        protocol.data_received(request[30:-3])  # headers done, the body cut short
        assert protocol._header_timer is None
        assert header_timer.cancelled()
        body_timer = protocol.cycle.timer
        assert body_timer is not None
        protocol.data_received(request[-3:])
        assert protocol.cycle.timer is None
        assert body_timer.cancelled()
        assert [c[1] for c in handler.calls] == [b"whole", b"abcdef"]
        assert protocol.loop.armed == ["_headers_too_slow", "_body_too_slow"]

    asyncio.run(scenario())


def test_http_1_0_and_connection_close_are_answered_then_closed() -> None:
    async def scenario() -> None:
        for request in (post("/m/x/infer", b"a", version="1.0"), post("/m/x/infer", b"a", "Connection: close")):
            handler = Handler()
            protocol, transport = connect(handler)
            protocol.data_received(request)
            assert bodies(transport) == [b"direct:a"]
            assert b"connection: close\r\n" in transport.writes[0]
            assert transport.closed

    asyncio.run(scenario())


def test_a_trusted_proxys_forwarded_client_is_the_client_as_uvicorns_middleware_has_it() -> None:
    async def scenario() -> None:
        handler = Handler()
        protocol, _ = connect(handler)  # 127.0.0.1 is trusted by default
        protocol.data_received(post("/m/x/infer", b"a", "X-Forwarded-For: 203.0.113.9"))
        untrusting, _ = connect(handler, proxy_headers=False)
        untrusting.data_received(post("/m/x/infer", b"a", "X-Forwarded-For: 203.0.113.9"))
        assert [c[2] for c in handler.calls] == [("203.0.113.9", 0), ("127.0.0.1", 5000)]

    asyncio.run(scenario())


def test_a_connection_lost_while_the_handler_waits_cancels_it_and_gets_no_write() -> None:
    """What it waits on (its place in the batcher's queue) is given up, not kept for no one."""

    async def scenario() -> None:
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"slow"))
        protocol.connection_lost(None)
        await settle()
        assert handler.wait.cancelled()
        assert transport.writes == []
        assert handler.then == []  # no answer: the handler counts its cancellation itself
        assert protocol.server_state.total_requests == 1
        assert not protocol.tasks

    asyncio.run(scenario())


def test_a_body_that_arrives_after_its_timeout_answer_began_is_not_run_again() -> None:
    async def scenario() -> None:
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler, timeout_s=0.05)
        request = post("/m/x/infer", b"abcdef")
        protocol.data_received(request[:-3])
        await asyncio.sleep(0.3)  # timed out: the handler runs with no body, and waits
        protocol.data_received(request[-3:])
        handler.wait.set_result(None)
        await settle()
        assert [c[1] for c in handler.calls] == [NoBody.TIMED_OUT]
        assert transport.writes[0].startswith(b"HTTP/1.1 408 ")
        assert protocol.server_state.total_requests == 1

    asyncio.run(scenario())


def test_a_client_gone_mid_body_is_answered_by_the_handler_and_nothing_written() -> None:
    """As the ASGI way's handler answers (and counts) a body cut short by a disconnect."""

    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        request = post("/m/x/infer", b"abcdef")
        protocol.data_received(request[:-3])
        protocol.connection_lost(None)
        await settle()
        assert [c[1] for c in handler.calls] == [NoBody.DISCONNECTED]
        assert handler.then == [0]
        assert transport.writes == []
        # Gone between requests, or after its answer: nothing to answer.
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"abc") + b"POST /m/x/infer HTTP/1.1\r\nHost: x")
        protocol.connection_lost(None)
        await settle()
        assert [c[1] for c in handler.calls] == [b"abc"]
        assert bodies(transport) == [b"direct:abc"]

    asyncio.run(scenario())


def test_an_upgrade_is_served_over_http_1_1_its_body_by_its_length_then_the_connection_closed() -> None:
    """The parser stops at an Upgrade request's headers (Java's HttpClient sends h2c with the
    first POST of a connection): its body would be parsed as the next request, a request
    smuggled inside another's body. It is read as the body, whichever reads it arrives in, and
    nothing after it; none is upgraded."""
    inner = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    plain = b"GET /o HTTP/1.1\r\nHost: x\r\n"

    async def scenario() -> None:
        for path in ("/o", "/m/x/infer"):
            outer = post(path, inner, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAA")
            after = plain + b"\r\n"
            for reads in ([outer + after], [outer[: -len(inner)], inner[:5], inner[5:] + after]):
                handler = Handler()
                protocol, transport = connect(handler)
                for data in reads:
                    protocol.data_received(data)
                    await settle()
                assert bodies(transport) == [b"asgi:" + inner]  # its body, not a request; nothing after it
                assert b"connection: close\r\n" in transport.writes[0]
                assert transport.closed
                assert handler.calls == []
        chunked = (
            b"POST /o HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        protocol, transport = connect(Handler())
        protocol.data_received(chunked + b"3\r\nabc\r\n0\r\n\r\n")
        assert transport.writes[0].startswith(b"HTTP/1.1 400 ")
        assert b"Upgrade with a chunked body is not supported" in transport.writes[0]
        assert transport.closed
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(plain + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + plain + b"\r\n")
        protocol.data_received(post("/m/x/infer", b"later"))
        await settle()
        assert bodies(transport) == [b"asgi:"]  # answered once, over HTTP/1.1; nothing after it read
        assert b"connection: close\r\n" in transport.writes[0]
        assert transport.closed
        assert handler.calls == []

    asyncio.run(scenario())


def test_a_connection_reset_before_its_first_byte_keeps_no_timer() -> None:
    async def scenario() -> None:
        protocol, _ = connect(Handler())
        timer = protocol.timeout_keep_alive_task
        assert timer is not None  # armed at the start
        protocol.connection_lost(ConnectionResetError())
        assert timer.cancelled()

    asyncio.run(scenario())


def test_a_connection_idle_from_its_start_or_after_blank_lines_is_closed_by_the_keep_alive_timer() -> None:
    async def scenario() -> None:
        _, silent = connect(Handler(), timeout_keep_alive=0.05)
        protocol, blank = connect(Handler(), timeout_keep_alive=0.05)
        protocol.data_received(b"GET /o HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        protocol.data_received(b"\r\n")  # no message begins: the connection is idle again
        await asyncio.sleep(0.3)
        assert silent.closed
        assert silent.writes == []
        assert blank.closed
        assert bodies(blank) == [b"asgi:"]

    asyncio.run(scenario())


def test_a_request_whose_body_is_still_arriving_is_not_closed_as_idle() -> None:
    """The keep-alive timer (ADMISSION_IDLE_S, 5 s, for a connection before its first request)
    stops at a request's first byte and runs again only once it is answered: a body slower
    than it, within the request timeout, is read whole and answered, on either way."""

    async def scenario() -> None:
        for path in ("/m/digits/infer", "/other"):
            protocol, transport = connect(Handler(), timeout_keep_alive=0.05)
            whole = post(path, b"x" * 1000)
            protocol.data_received(whole[:-600])  # its headers and part of its body
            await asyncio.sleep(0.3)
            assert not transport.closed, path
            protocol.data_received(whole[-600:])
            await settle()
            assert len(bodies(transport)) == 1, (path, transport.writes)
            await asyncio.sleep(0.3)  # then idle: closed
            assert transport.closed, path

    asyncio.run(scenario())


def test_an_answer_before_its_body_was_read_closes_the_connection() -> None:
    """uvicorn would read and throw away the rest of the body, however long it was declared."""

    async def scenario() -> None:
        protocol, transport = connect(Handler())
        protocol.data_received(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nabc")
        await settle()
        assert transport.writes[0].startswith(b"HTTP/1.1 413 ")
        assert b"connection: close\r\n" in transport.writes[0]
        assert transport.closed
        protocol, transport = connect(Handler())
        protocol.data_received(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        await settle()
        assert b"connection: close" not in transport.writes[0]
        assert not transport.closed

    asyncio.run(scenario())


def test_the_request_line_counts_with_the_headers() -> None:
    async def scenario() -> None:
        protocol, transport = connect(Handler())
        url = "/o?" + "q" * 40_000
        protocol.data_received(f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Meta: {'v' * 30_000}\r\n\r\n".encode())
        assert transport.writes[0].startswith(b"HTTP/1.1 431 ")
        assert transport.closed

    asyncio.run(scenario())


def test_headers_waiting_behind_answers_not_yet_written_do_not_time_out() -> None:
    """A request pipelined behind one in flight pauses reading: the headers after it are not
    read, so not late."""

    async def scenario() -> None:
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler, timeout_s=0.05)
        last = post("/m/x/infer", b"3")
        protocol.data_received(post("/m/x/infer", b"1") + b"GET /o HTTP/1.1\r\nHost: x\r\n\r\n" + last[:10])
        await asyncio.sleep(0.3)
        assert transport.writes == []
        assert not transport.closed
        protocol.header_timeout_s = 30.0  # from here on, however slow the machine
        handler.wait.set_result(None)
        await settle()
        assert protocol._header_timer is not None  # from where reading resumed
        protocol.data_received(last[10:])
        await settle()
        assert bodies(transport) == [b"direct:1", b"asgi:", b"direct:3"]

    asyncio.run(scenario())


def test_a_refusal_is_written_after_the_answers_to_the_requests_before_it() -> None:
    """A client that pipelines gets every answer before the refused request, in order, then the
    refusal; a request whose body broke is never run; nothing after the refusal is read."""

    async def scenario() -> None:
        garbage = b"\x00GARBAGE\r\n\r\n"
        # A request and garbage in one read: the request is answered, then the 400.
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"1") + garbage)
        await settle()
        assert bodies(transport) == [b"direct:1", b'{"error": "invalid HTTP request"}']
        assert transport.writes[-1].startswith(b"HTTP/1.1 400 ")
        assert transport.closed

        # Behind a handler that waits and an ASGI request in line: nothing until they answer.
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler)
        protocol.data_received(post("/m/x/infer", b"slow") + b"GET /o HTTP/1.1\r\nHost: x\r\n\r\n" + garbage)
        protocol.data_received(post("/m/x/infer", b"never read"))
        await settle()
        assert transport.writes == []
        assert not transport.closed
        handler.wait.set_result(None)
        await settle()
        assert bodies(transport)[:2] == [b"direct:slow", b"asgi:"]
        assert transport.writes[-1].startswith(b"HTTP/1.1 400 ")
        assert transport.closed
        assert [call[1] for call in handler.calls] == [b"slow"]

        # A chunked body that breaks while waiting in line: that request never runs.
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler)
        broken = b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n"
        protocol.data_received(post("/m/x/infer", b"slow") + broken)
        await settle()
        assert transport.writes == []
        handler.wait.set_result(None)
        await settle()
        assert len(bodies(transport)) == 2
        assert bodies(transport)[0] == b"direct:slow"
        assert transport.writes[-1].startswith(b"HTTP/1.1 400 ")
        assert transport.closed

        # ... and while it runs (nothing before it to wait for): refused at once, the app sees
        # the client gone.
        protocol, transport = connect(Handler())
        protocol.data_received(broken)
        await settle()
        assert len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 400 ")
        assert transport.closed

        # Headers too slow behind an answer still being computed (reading is not paused).
        handler = Handler()
        handler.wait = asyncio.get_running_loop().create_future()
        protocol, transport = connect(handler, timeout_s=0.05)
        protocol.data_received(post("/m/x/infer", b"slow") + b"GET /o HTTP/1.1\r\nHo")
        await asyncio.sleep(0.3)  # (at least the timeout: the 408 is due, however slow the machine)
        assert transport.writes == []
        handler.wait.set_result(None)
        await settle()
        assert bodies(transport)[0] == b"direct:slow"
        assert transport.writes[-1].startswith(b"HTTP/1.1 408 ")
        assert transport.closed

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("head", "answered"),
    [
        (b"GET /o HTTP/1.1\r\nHost: x\r\n", True),
        (b"GET /o HTTP/1.0\r\n", True),  # (HTTP/1.0 has no Host)
        (b"GET /o HTTP/1.1\r\n", False),
        (b"GET /o HTTP/1.1\r\nHost: x\r\nhost: y\r\n", False),
        (b"GET /o HTTP/1.0\r\nHost: x\r\nHost: y\r\n", False),
        (b"POST /m/x/infer HTTP/1.1\r\nContent-Length: 1\r\n", False),  # the protocol's own way too
    ],
)
def test_a_request_needs_exactly_one_host_header(head: bytes, answered: bool) -> None:
    """RFC 9112 3.2, as Envoy: a proxy in front and this server could each take another Host."""

    async def scenario() -> None:
        handler = Handler()
        protocol, transport = connect(handler)
        protocol.data_received(head + b"\r\n" + (b"1" if head.startswith(b"POST") else b""))
        await settle()
        if answered:
            assert bodies(transport) == [b"asgi:"]
        else:
            assert bodies(transport) == [b'{"error": "a request needs exactly one Host header"}']
            assert transport.writes[0].startswith(b"HTTP/1.1 400 ")
            assert transport.closed
            assert handler.calls == []

    asyncio.run(scenario())


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"x-custom , chunked"])
def test_a_transfer_coding_other_than_chunked_is_a_501(coding: bytes) -> None:
    """RFC 9112 6.1: llhttp frames "gzip, chunked" by its chunks, and the body was read still
    gzipped. Plain chunked is served."""

    async def scenario() -> None:
        protocol, transport = connect(Handler())
        protocol.data_received(b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n")
        await settle()
        assert transport.writes[0].startswith(b"HTTP/1.1 501 ")
        assert b"is not supported: only chunked" in transport.writes[0]
        assert transport.closed
        protocol, transport = connect(Handler())
        protocol.data_received(b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n")
        await settle()
        assert bodies(transport) == [b"asgi:z"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("start", "flood"),
    [(b"", b"1\r\nz\r\n" * 10_000), (b"1;", b"e" * 60_000)],
    ids=["chunks-of-a-byte", "a-chunk-extension"],
)
def test_a_chunked_body_that_is_mostly_framing_is_refused_once_the_framing_is_past_its_bound(
    start: bytes, flood: bytes
) -> None:
    """llhttp reads chunk extensions, and chunks of a byte, as fast as they arrive: a body that
    never grows (or grows a callback a byte) held the event loop for the whole request timeout,
    every other request waiting 0.15 s (an extension) to 0.5 s (chunks of a byte) the while. Its
    framing is bounded; chunks of 128 bytes are served however many."""

    async def scenario() -> None:
        protocol, transport = connect(Handler())
        protocol.data_received(b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + start)
        sent = 0
        while not transport.closed and sent < 4 * 1024 * 1024:
            protocol.data_received(flood)
            sent += len(flood)
            await settle()
        assert transport.closed
        assert transport.writes[-1].startswith(b"HTTP/1.1 400 ")
        assert b"chunked body framing" in transport.writes[-1]
        assert sent < 256 * 1024
        protocol, transport = connect(Handler())
        chunk = b"80\r\n" + b"z" * 128 + b"\r\n"
        protocol.data_received(b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):
            protocol.data_received(chunk * 64)
            await settle()
        protocol.data_received(b"0\r\n\r\n")
        await settle()
        assert bodies(transport) == [b"asgi:" + b"z" * 128 * 64 * 64]

    asyncio.run(scenario())


def test_bodies_being_received_share_one_budget_past_which_a_body_is_a_503_to_retry() -> None:
    """Clients each holding a body one byte short held the server's memory without bound; the
    budget comes back whole however each body ends (complete, cut short, refused)."""

    async def scenario() -> None:
        handler, budget = Handler(), BodyBudget(100)
        holding, _ = connect(handler, budget=budget)
        holding.data_received(post("/m/x/infer", b"a" * 80)[:-1])  # one byte short: held
        assert budget.held == 79
        refused, transport = connect(handler, budget=budget)
        refused.data_received(post("/m/x/infer", b"b" * 30))
        answer = b"".join(transport.writes)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1\r\n" in answer
        assert b"--max-bodies-mb" in answer
        assert transport.closed
        assert budget.held == 79
        refused.connection_lost(None)
        holding.connection_lost(None)  # the holder gives up: its bytes come back
        await settle()
        assert budget.held == 0
        served, transport = connect(handler, budget=budget)
        served.data_received(post("/m/x/infer", b"c" * 90))
        await settle()
        assert bodies(transport) == [b"direct:" + b"c" * 90]
        assert budget.held == 0
        timed_out, transport = connect(handler, timeout_s=0.01, budget=budget)
        timed_out.data_received(post("/m/x/infer", b"d" * 10)[:-2])
        await asyncio.sleep(0.05)
        assert budget.held == 0
        assert transport.closed

    asyncio.run(scenario())


def test_a_body_refused_by_the_budget_is_counted_on_metrics() -> None:
    """A body refused 503 past --max-bodies-mb was a log line alone, while every other refusal
    was counted in model_server_http_refusals_total: an alert saw nothing of a server shedding
    bodies. Counted under its own reason, on both ways (the protocol buffering a body, and the
    ASGI way's handler taking what it reads), there from the start."""
    from model_server import metrics
    from model_server.errors import ServerBusy

    def counted() -> float:
        return float(
            metrics.REGISTRY.get_sample_value("model_server_http_refusals_total", {"reason": "body_budget"}) or 0
        )

    assert b'model_server_http_refusals_total{reason="body_budget"}' in metrics.exposition()
    before = counted()

    async def scenario() -> None:
        handler, budget = Handler(), BodyBudget(100)
        holding, _ = connect(handler, budget=budget)
        holding.data_received(post("/m/x/infer", b"a" * 80)[:-1])  # one byte short: held
        refused, transport = connect(handler, budget=budget)
        refused.data_received(post("/m/x/infer", b"b" * 30))
        assert b"".join(transport.writes).startswith(b"HTTP/1.1 503 ")
        refused.connection_lost(None)
        assert counted() == before + 1
        with pytest.raises(ServerBusy):  # as the ASGI way's handler takes a chunk it read
            budget.take(30)
        assert counted() == before + 2
        budget.take(21)  # within the budget: not counted
        assert counted() == before + 2
        holding.connection_lost(None)

    asyncio.run(scenario())


def test_the_server_fixes_glibc_s_mmap_threshold_so_freed_large_bodies_leave_the_heap(tmp_path, monkeypatch) -> None:
    """glibc raises its mmap threshold as large blocks are freed, and bodies then went to the
    heap, kept for reuse: after three bursts of 8 bodies of 30 MB a server's RSS stayed at 635 MB
    (129 MB before), idle. A malloc_trim after each large body gave it back but held the arena's
    lock while it walked the heap, stalling the event loop's allocations 60 to 120 ms. The
    server fixes the threshold at its start: large blocks are mmapped and unmapped when freed."""
    from model_server import httpserver
    from model_server.app import Settings, create_app
    from model_server.repository import ModelRepository

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(httpserver, "mallopt", lambda option, value: calls.append((option, value)) or 1)
    create_app(ModelRepository(tmp_path, ["CPUExecutionProvider"]), Settings())
    assert calls == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB
    monkeypatch.setattr(httpserver, "mallopt", None)  # another C library: nothing to call
    create_app(ModelRepository(tmp_path, ["CPUExecutionProvider"]), Settings())


def crowd(cls: Any, state: ServerState, count: int) -> None:
    """``count`` connections made on the data port, kept open, each having sent a request (those
    within the limit admitted)."""
    for _ in range(count):
        protocol = cls(Config(asgi_app, log_config=None), state, {}, _loop=asyncio.get_running_loop())
        protocol.connection_made(Transport())
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")


def test_a_connection_far_past_the_limit_is_closed_at_once_not_held_idle() -> None:
    """A connection past --max-connections was kept until its first request or its keep-alive
    timeout (75 s), a file descriptor each: a client opening idle ones faster than that ran the
    process out of them (accept fails, probes too). Up to twice the limit not admitted one is
    kept (its probe answered, other requests refused 503); past that it is closed as it is
    accepted. Those admitted are not counted there."""

    async def scenario() -> None:
        state = ServerState()
        cls = limited_protocol(30.0, None, max_connections=2)
        crowd(cls, state, 2)  # admitted
        kept = []
        for _ in range(4):  # not admitted, up to twice the limit
            protocol = cls(Config(asgi_app), state, {}, _loop=asyncio.get_running_loop())
            transport = Transport()
            protocol.connection_made(transport)
            assert not transport.closed
            kept.append(protocol)
        closed = cls(Config(asgi_app), state, {}, _loop=asyncio.get_running_loop())
        transport = Transport()
        closed.connection_made(transport)  # the 5th not admitted
        assert transport.closed
        closed.connection_lost(None)
        for protocol in kept:
            protocol.connection_lost(None)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("path", "answered"),
    [
        ("/v2/health/ready", True),
        ("/v2/models/digits/ready", True),
        ("/v2/models/digits/versions/3/ready", True),
        ("/v2/models/digits/versions/3/ready?x=1", True),
        ("/v2/models/digits/infer", False),
        ("/v2/models/digits/versions/3", False),
        ("/v2/models//ready", False),
        ("/v2/models/a/b/ready", False),
        ("/v2/models/" + "a" * 5000 + "/ready", False),
    ],
)
def test_a_connection_past_the_limit_has_its_model_readiness_probe_answered(path: str, answered: bool) -> None:
    """The rollout (serving.py ready()) polls /v2/models/{m}/versions/{v}/ready: past
    --max-connections it was refused 503 like any request, and a busy server read as one whose
    version is not ready. A model's (or a version's) readiness GET is a probe as health is."""

    async def scenario() -> None:
        state = ServerState()
        cls = limited_protocol(30.0, None, max_connections=2)
        crowd(cls, state, 3)
        protocol = cls(Config(asgi_app), state, {}, _loop=asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)  # the 4th: past the limit
        protocol.data_received(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await settle()
        status = b"".join(transport.writes).split(b" ", 2)[1]
        assert status == (b"200" if answered else b"503")
        protocol.connection_lost(None)

    asyncio.run(scenario())


def test_refusals_are_logged_once_per_interval_with_a_count_of_the_rest(monkeypatch, caplog) -> None:
    """Every refusal (503 past --max-connections, 429 pipelining, 4xx) wrote a WARNING line: a
    flood of connections past the limit wrote one per request, as fast as they came. One line
    per interval now, the next one counting those left out."""
    from model_server import errors, httpserver

    now = [1000.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: now[0])  # (EveryInterval's clock)
    monkeypatch.setattr(httpserver, "REFUSALS", httpserver.RefusalLog())

    async def scenario() -> None:
        state = ServerState()
        cls = limited_protocol(30.0, None, max_connections=2)
        crowd(cls, state, 2)  # the limit's, admitted
        for _ in range(50):
            config = Config(asgi_app, log_config=None)  # (uvicorn's own would stop its loggers' records)
            refused = cls(config, state, {}, _loop=asyncio.get_running_loop())
            transport = Transport()
            refused.connection_made(transport)  # past the limit
            refused.data_received(b"GET /v2/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"".join(transport.writes).startswith(b"HTTP/1.1 503 ")
            refused.connection_lost(None)
            now[0] += 0.01

    def refusals(records: list[logging.LogRecord]) -> list[str]:
        # (each record once: an earlier test's app may have given uvicorn's logger a handler too)
        return [r.getMessage() for r in {id(r): r for r in records}.values() if "refused" in r.getMessage()]

    monkeypatch.setattr(logging.getLogger("uvicorn"), "propagate", True)  # (to caplog's handler)
    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
        lines = refusals(caplog.records)
        assert len(lines) == 1, lines
        assert "--max-connections" in lines[0]
        now[0] += httpserver.REFUSAL_LOG_INTERVAL_S
        asyncio.run(scenario())
        lines = refusals(caplog.records)
        assert len(lines) == 2, lines
        assert "and 49 more refused" in lines[1]


class AdminTransport(Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5001), "sockname": ("127.0.0.1", 8001)}.get(name, default)


def test_each_listener_counts_its_own_connections() -> None:
    """The data and admin ports shared one count: a flood on the data port past
    --max-connections had every admin call (traffic, load, rollback) refused 503. Each port
    counts its own; the admin port's limit is --max-admin-connections."""

    async def scenario() -> None:
        state = ServerState()
        cls = limited_protocol(30.0, None, max_connections=2, admin_port=8001, max_admin_connections=1)

        def connect_to(transport: Transport) -> tuple[Any, Transport]:
            protocol = cls(Config(asgi_app), state, {}, _loop=asyncio.get_running_loop())
            protocol.connection_made(transport)
            return protocol, transport

        async def status(protocol: Any, transport: Transport) -> bytes:
            protocol.data_received(b"GET /v2/models HTTP/1.1\r\nHost: x\r\n\r\n")
            await settle()
            return b"".join(transport.writes).split(b" ", 2)[1]

        data = [connect_to(Transport()) for _ in range(4)]  # past the data port's limit
        assert [await status(*connection) for connection in data] == [b"200", b"200", b"503", b"503"]
        admin = connect_to(AdminTransport())
        assert await status(*admin) == b"200"  # the data port's flood leaves it be
        refused = connect_to(AdminTransport())
        assert await status(*refused) == b"503"
        assert b"--max-admin-connections" in b"".join(refused[1].writes)
        for protocol, _ in [*data, admin, refused]:
            protocol.connection_lost(None)

    asyncio.run(scenario())


async def loopback(cls: Any, **config: Any) -> tuple[asyncio.Server, ServerState, int]:
    """``cls`` serving on a loopback port: the server, its state (the connections it holds), the port."""
    state, loop = ServerState(), asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: cls(Config(asgi_app, log_config=None, **config), state, {}, _loop=loop), "127.0.0.1", 0
    )
    return server, state, server.sockets[0].getsockname()[1]


async def until(check: Callable[[], bool]) -> None:
    """Until the server has seen what the clients did (accepts, closes): its loop turns."""
    while not check():
        await asyncio.sleep(0.001)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def ask(connection: Connection, path: str) -> bytes:
    """GET ``path`` on the connection: the answer's status."""
    reader, writer = connection
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1]))  # type: ignore[index]
    return head.split(b" ", 2)[1]


async def hang_up(state: ServerState, *connections: Connection) -> None:
    """Close the connections, until the server has seen them go."""
    left = len(state.connections) - len(connections)
    for _, writer in connections:
        writer.close()
        await writer.wait_closed()
    await until(lambda: len(state.connections) == left)


def test_a_connection_is_admitted_at_its_first_request_not_refused_for_good_at_accept() -> None:
    """A connection's place within --max-connections was decided as it was accepted, counting
    every connection open: one a pool opened while the limit's connections were served was
    refused 503 on its first request after they closed, on an idle server, and connections idle
    past the limit had a new client refused once a served one closed. A connection is admitted
    at its first request, while fewer than the limit are admitted; idle ones take no place."""

    async def scenario() -> None:
        server, state, port = await loopback(limited_protocol(30.0, None, max_connections=2))
        first, second = (
            await asyncio.open_connection("127.0.0.1", port),
            await asyncio.open_connection("127.0.0.1", port),
        )
        assert await ask(first, "/x") == b"200"
        assert await ask(second, "/x") == b"200"
        pooled = await asyncio.open_connection("127.0.0.1", port)  # opened while the limit's are served
        idle = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: len(state.connections) == 4)
        await hang_up(state, first)
        late = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(late, "/x") == b"200"  # the idle ones hold no place
        assert await ask(second, "/x") == b"200"
        await hang_up(state, second, late)
        assert await ask(pooled, "/x") == b"200"  # room now: admitted
        await hang_up(state, pooled, idle)
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_connections_idle_past_the_limit_leave_probes_answered_and_are_not_held_for_the_keep_alive(
    monkeypatch, caplog
) -> None:
    """Connections past --max-connections counted with those served, and one that never sent a
    byte was held for the keep-alive timeout (75 s): the limit's connections served and as many
    idle made every new connection one past twice the limit, closed as it was accepted, a
    readiness probe too (reset), and nothing said so. Not yet admitted, a connection is closed
    after ADMISSION_IDLE_S idle; the cutoff at accept counts only those not admitted, and says so."""
    from model_server import httpserver

    monkeypatch.setattr(httpserver, "REFUSALS", httpserver.RefusalLog())
    monkeypatch.setattr(logging.getLogger("uvicorn"), "propagate", True)  # (to caplog's handler)

    async def scenario() -> None:
        server, state, port = await loopback(limited_protocol(30.0, None, max_connections=2), timeout_keep_alive=75)
        served = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        assert [await ask(connection, "/x") for connection in served] == [b"200", b"200"]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until(lambda: len(state.connections) == 4)
        clients = {writer.get_extra_info("sockname") for _, writer in idle}
        loop = asyncio.get_running_loop()
        for protocol in state.connections:
            if protocol.client in clients:  # closed within ADMISSION_IDLE_S, not 75 s
                assert protocol.timeout_keep_alive_task.when() <= loop.time() + httpserver.ADMISSION_IDLE_S
        probe = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(probe, "/v2/health/ready") == b"200"
        assert await probe[0].read() == b""  # (answered, then closed: not admitted)
        idle += [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # twice the limit
        await until(lambda: len(state.connections) == 6)
        cut = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):
            assert await cut[0].read() == b""
        await hang_up(state, *served, *idle)
        cut[1].close()
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    lines = {id(r): r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()}
    assert len(lines) == 1, lines
    assert "--max-connections" in next(iter(lines.values()))


def test_refusals_are_counted_by_reason_on_metrics() -> None:
    """The server's refusals were a rate-limited log line alone: a 503 past --max-connections, a
    429 to a client pipelining past MAX_PIPELINED and a connection closed as it was accepted
    were nowhere on /metrics, so no alert could see a server shedding load. Each is counted in
    model_server_http_refusals_total by reason, each reason there from the start."""
    from model_server import metrics

    def counted() -> dict[str, float]:
        return {
            reason: float(
                metrics.REGISTRY.get_sample_value("model_server_http_refusals_total", {"reason": reason}) or 0
            )
            for reason in ("over_limit", "pipelined", "at_accept")
        }

    async def scenario() -> None:
        server, state, port = await loopback(limited_protocol(30.0, None, max_connections=1))
        served = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(served, "/x") == b"200"
        refused = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(refused, "/x") == b"503"
        assert await refused[0].read() == b""
        await hang_up(state, served)
        pipelining = await asyncio.open_connection("127.0.0.1", port)
        pipelining[1].write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)  # (in a read or a few)
        answers = await pipelining[0].read()
        assert re.findall(rb"HTTP/1.1 (\d+) ", answers)[-1] == b"429"
        await until(lambda: not state.connections)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # twice the limit
        await until(lambda: len(state.connections) == 2)
        cut = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):
            assert await cut[0].read() == b""
        await hang_up(state, *idle)
        cut[1].close()
        server.close()
        await server.wait_closed()

    before = counted()
    asyncio.run(scenario())
    after = counted()
    assert {reason: after[reason] - before[reason] for reason in after} == {
        "over_limit": 1,
        "pipelined": 1,
        "at_accept": 1,
    }
    assert b'model_server_http_refusals_total{reason="at_accept"}' in metrics.exposition()
