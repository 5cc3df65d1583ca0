"""A local HTTP server speaking the Slack Web API methods the notifier uses, checking payloads.

``chat.postMessage`` (JSON body, bot token, a text of 40,000 characters at most, at most 50
blocks, 3000 characters per text field, 150 per header, 12,000 in all; ``metadata`` an object of an ``event_type`` and an
``event_payload`` object, an event_type of another shape ignored with a warning; a reply with
``thread_ts``, kept out of the history), ``files.getUploadURLExternal``, the upload URL it hands out, and
``files.completeUploadExternal`` (a file completed into a thread becomes a reply there, its
``files`` named as uploaded); ``conversations.replies`` (a thread: its parent, then its replies,
oldest first, ``limit`` and ``cursor`` pages, metadata with ``include_all_metadata``); ``conversations.history`` (a channel's ID only, as Slack:
newest first, after ``oldest``, ``limit`` and ``cursor`` pages, the messages' metadata with
``include_all_metadata``) and ``conversations.list``, by GET or POST; each method refused
``missing_scope`` where the token lacks its scope (``scopes``). Answers ``{"ok": false, "error":
...}`` as Slack does, and 429 with Retry-After (``rate_limited``) as Slack's rate limiter does;
``conversations.history`` limited as for a new non-Marketplace app (``history_most``,
``history_every_s``).
A channel posted to by name or ID exists (the first is ``C0ROLLOUT``), unless named in
``missing``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.support import POLL_INTERVAL_S

BLOCK_TYPES = {"header", "section", "context", "divider", "image", "actions"}


def check_blocks(blocks: Any) -> str | None:
    """Slack's checks of a message's blocks, as documented for Block Kit: 50 blocks; a text object
    ``plain_text`` or ``mrkdwn`` of 1 to 3000 characters (a header's ``plain_text``, 150; a
    field's 2000); a section with a text or fields (10 at most); a context with 1 to 10 elements."""
    if not isinstance(blocks, list):
        return "invalid_blocks_format"
    if len(blocks) > 50:
        return "invalid_blocks: more than 50 blocks"
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") not in BLOCK_TYPES:
            return f"invalid_blocks: block {i} type {b.get('type') if isinstance(b, dict) else b!r}"
        kind = b["type"]
        if kind == "header" and (not isinstance(b.get("text"), dict) or b["text"].get("type") != "plain_text"):
            return f"invalid_blocks: block {i} header text must be plain_text"
        if kind == "section" and not b.get("text") and not b.get("fields"):
            return f"invalid_blocks: block {i} section needs a text or fields"
        if kind == "context" and not 1 <= len(b.get("elements", [])) <= 10:
            return f"invalid_blocks: block {i} context needs 1 to 10 elements"
        if len(b.get("fields", [])) > 10:
            return f"invalid_blocks: block {i} has more than 10 fields"
        texts = [(b.get("text"), 150 if kind == "header" else 3000), *((f, 2000) for f in b.get("fields", []))]
        for t, limit in texts + [(e, 3000) for e in b.get("elements", [])]:
            if t is None:
                continue
            if not isinstance(t, dict) or t.get("type") not in ("plain_text", "mrkdwn"):
                return f"invalid_blocks: block {i} text of a bad type"
            if not isinstance(t.get("text"), str) or not 1 <= len(t["text"]) <= limit:
                return f"invalid_blocks: block {i} text empty or over {limit} characters"
    total = sum(len(t.get("text", "")) for b in blocks for t in _texts(b))
    if total > 12000:  # (Slack's cumulative limit: 12,000 text characters, containers aside)
        return "msg_blocks_too_long"
    return None


# Each method's scope (a bot token's; a private channel's ``groups:*`` are not told apart here).
SCOPES = {
    "chat.postMessage": "chat:write",
    "files.getUploadURLExternal": "files:write",
    "files.completeUploadExternal": "files:write",
    "conversations.history": "channels:history",
    "conversations.replies": "channels:history",
    "conversations.list": "channels:read",
}
CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]+")
# Slack's metadata: an event_type of letters, digits, underscores and hyphens; another is ignored,
# the message posted with a warning (invalid_metadata_schema).
EVENT_TYPE = re.compile(r"[A-Za-z0-9_-]{1,255}")


def check_metadata(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """chat.postMessage's ``metadata`` (an object, or its JSON in a form's field): the metadata
    the message keeps (None: ignored, with the warning) and Slack's error or warning where it is
    not ``{"event_type": "<a_type>", "event_payload": {...}}``."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None, "invalid_metadata_format"
    if not isinstance(raw, dict) or set(raw) != {"event_type", "event_payload"}:
        return None, "invalid_metadata_format"
    if not isinstance(raw["event_payload"], dict):
        return None, "invalid_metadata_format"
    if len(json.dumps(raw)) > 8000:
        return None, "metadata_too_large"
    if not isinstance(raw["event_type"], str) or not EVENT_TYPE.fullmatch(raw["event_type"]):
        return None, "warning:invalid_metadata_schema"
    return raw, None


def _texts(block: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in (block.get("text"), *block.get("fields", []), *block.get("elements", [])) if t]


class FakeSlack:
    def __init__(self, token: str = "xoxb-test-token") -> None:
        self.token = token
        self.calls: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.outage: int | None = None  # an HTTP status every API call answers (an outage), or None
        self.outage_body = b"upstream connect error"  # what it answers with
        self.cut = False  # every API call's answer cut off mid-body (a proxy dropping the connection)
        self.refuse: dict[str, str] = {}  # a method Slack refuses, with its error ("upload": the upload URL, 500)
        self.rate_limited = 0  # how many of the next API calls Slack refuses with 429 and Retry-After
        self.retry_after = 1  # seconds, the Retry-After those refusals name
        self.lose_answers = 0  # how many of the next API calls are carried out, their answers cut off
        self.stall: dict[str, float] = {}  # a method: seconds each call of it waits before it is carried out
        self.lose: dict[str, int] = {}  # a method: how many of its next calls are carried out, answers cut off
        self.files: dict[str, dict[str, Any]] = {}  # an upload's file ID -> its name and length
        self.replies: dict[tuple[str, str], list[dict[str, Any]]] = {}  # a thread's replies, oldest first
        self.metadata_refused: str | None = None  # an error a post with metadata gets (a token no app's)
        self.scopes = set(SCOPES.values())  # the token's
        self.channels: dict[str, str] = {}  # ID -> name, of the channels posted to
        self.missing: set[str] = set()  # channel names or IDs that do not exist
        self.history: dict[str, list[dict[str, Any]]] = {}  # a channel's messages, oldest first
        # conversations.history as Slack limits a non-Marketplace app made after May 2025: this many
        # messages a page at most, one call in this many seconds (else 429, Retry-After the rest).
        self.history_most = 999
        self.history_every_s = 0.0
        self._history_at = -1e9
        self._last_ts = 0.0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def start(self) -> FakeSlack:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def messages(self) -> list[dict[str, Any]]:
        """The bodies of the posts Slack took (an answer cut off too)."""
        return [c["body"] for c in self.calls if c["method"] == "chat.postMessage" and c["ok"]]

    def channel(self, ref: str) -> str | None:
        """The ID of the channel ``ref`` (``#name``, ``name`` or an ID) names, made at its first
        post (a name in lower case, as Slack's are); None where it is ``missing``."""
        name = ref.removeprefix("#")
        if not name or ref in self.missing or name in self.missing:
            return None
        if CHANNEL_ID.fullmatch(name):
            self.channels.setdefault(name, name.lower())
            return name
        name = name.lower()  # (Slack's channel names are lower case)
        for cid, known in self.channels.items():
            if known == name:
                return cid
        cid = "C0ROLLOUT" if not self.channels else f"C0ROLL{len(self.channels):04d}"
        self.channels[cid] = name
        return cid

    def _ts(self) -> str:
        now = max(time.time(), self._last_ts + 1e-6)
        self._last_ts = now
        return f"{now:.6f}"

    def _history(self, body: dict[str, Any]) -> dict[str, Any]:
        cid = str(body.get("channel", ""))
        if not CHANNEL_ID.fullmatch(cid) or cid not in self.channels or cid in self.missing:
            return {"ok": False, "error": "channel_not_found"}
        try:
            oldest = float(body.get("oldest") or 0)
            latest = float(body.get("latest") or 1e12)
        except ValueError:
            return {"ok": False, "error": "invalid_ts_oldest"}
        inclusive = str(body.get("inclusive", "")).lower() in ("1", "true")
        metadata = str(body.get("include_all_metadata", "")).lower() in ("1", "true")
        found = [
            m
            for m in reversed(self.history.get(cid, []))
            if (oldest <= float(m["ts"]) if inclusive else oldest < float(m["ts"])) and float(m["ts"]) < latest
        ]
        page = self._page(body, found, self.history_most)
        if isinstance(page, str):
            return {"ok": False, "error": page}
        messages, more, cursor = page
        shown = [m if metadata else {k: v for k, v in m.items() if k != "metadata"} for m in messages]
        return {
            "ok": True,
            "messages": shown,
            "has_more": more,
            "pin_count": 0,
            "response_metadata": {"next_cursor": cursor},
        }

    def thread_replies(self, cid: str, ts: str) -> list[dict[str, Any]]:
        """The replies in the thread of the post ``ts`` of channel ``cid``, oldest first."""
        return self.replies.get((cid, ts), [])

    def _replies(self, body: dict[str, Any]) -> dict[str, Any]:
        cid, ts = str(body.get("channel", "")), str(body.get("ts", ""))
        if not CHANNEL_ID.fullmatch(cid) or cid not in self.channels or cid in self.missing:
            return {"ok": False, "error": "channel_not_found"}
        parent = next((m for m in self.history.get(cid, []) if m["ts"] == ts), None)
        if parent is None:
            return {"ok": False, "error": "thread_not_found"}
        page = self._page(body, [parent, *self.thread_replies(cid, ts)], self.history_most)
        if isinstance(page, str):
            return {"ok": False, "error": page}
        messages, more, cursor = page
        metadata = str(body.get("include_all_metadata", "")).lower() in ("1", "true")
        shown = [m if metadata else {k: v for k, v in m.items() if k != "metadata"} for m in messages]
        return {"ok": True, "messages": shown, "has_more": more, "response_metadata": {"next_cursor": cursor}}

    def _list(self, body: dict[str, Any]) -> dict[str, Any]:
        types = str(body.get("types") or "public_channel").split(",")
        if not set(types) <= {"public_channel", "private_channel", "mpim", "im"}:
            return {"ok": False, "error": "invalid_types"}
        found = [
            {"id": cid, "name": name, "is_channel": True, "is_private": False, "is_archived": False}
            for cid, name in self.channels.items()
            if cid not in self.missing
        ]
        page = self._page(body, found, 1000)
        if isinstance(page, str):
            return {"ok": False, "error": page}
        return {"ok": True, "channels": page[0], "response_metadata": {"next_cursor": page[2]}}

    @staticmethod
    def _page(body: dict[str, Any], items: list[Any], most: int) -> tuple[list[Any], bool, str] | str:
        """``items`` from the ``cursor`` on, ``limit`` of them (default 100, ``most`` at most): the
        page, whether more follow, the next cursor; or Slack's error."""
        limit, cursor = str(body.get("limit") or "100"), str(body.get("cursor") or "")
        if not limit.isdigit() or int(limit) < 1:
            return "invalid_limit"
        if cursor and not (cursor.startswith("next:") and cursor[5:].isdigit()):
            return "invalid_cursor"
        start = int(cursor[5:]) if cursor else 0
        end = start + min(int(limit), most)
        more = end < len(items)
        return items[start:end], more, f"next:{end}" if more else ""

    def _handler(self):  # type: ignore[no-untyped-def]
        slack = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, body: dict[str, Any]) -> None:
                if getattr(self, "losing", False):
                    return self._cut()
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _limited(self, retry_after: int) -> None:
                data = json.dumps({"ok": False, "error": "ratelimited"}).encode()
                self.send_response(429)
                self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _cut(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b'{"ok": ')
                self.close_connection = True

            def do_GET(self) -> None:
                url = urlparse(self.path)
                body = {k: v[0] for k, v in parse_qs(url.query).items()}
                self._method(url.path.removeprefix("/api/"), body)

            def do_POST(self) -> None:
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if url.path.startswith("/upload/") and "upload" in slack.refuse:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if url.path.startswith("/upload/"):
                    slack.uploads[url.path.rsplit("/", 1)[1]] = raw
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                    return
                method = url.path.removeprefix("/api/")
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("application/json"):
                    body = json.loads(raw or b"{}")
                else:
                    body = {k: v[0] for k, v in parse_qs(raw.decode() or url.query).items()}
                    body.update({k: v[0] for k, v in parse_qs(url.query).items()})
                self._method(method, body)

            def _method(self, method: str, body: dict[str, Any]) -> None:
                self.losing = False
                time.sleep(slack.stall.get(method, 0.0))
                if slack.lose_answers and not slack.rate_limited and not slack.cut and slack.outage is None:
                    slack.lose_answers -= 1
                    self.losing = True  # (carried out, its answer cut off)
                if slack.lose.get(method) and not slack.rate_limited and not slack.cut and slack.outage is None:
                    slack.lose[method] -= 1
                    self.losing = True
                call = {"method": method, "body": body, "ok": False}
                slack.calls.append(call)
                if slack.rate_limited:
                    slack.rate_limited -= 1
                    return self._limited(slack.retry_after)
                if slack.cut:
                    return self._cut()
                if slack.outage is not None:
                    data = slack.outage_body
                    self.send_response(slack.outage)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if self.headers.get("Authorization") != f"Bearer {slack.token}":
                    return self._reply({"ok": False, "error": "invalid_auth"})
                if method in slack.refuse:
                    return self._reply({"ok": False, "error": slack.refuse[method]})
                scope = SCOPES.get(method)
                if scope and scope not in slack.scopes:
                    provided = ",".join(sorted(slack.scopes))
                    return self._reply({"ok": False, "error": "missing_scope", "needed": scope, "provided": provided})
                if method == "chat.postMessage":
                    cid = slack.channel(str(body.get("channel") or ""))
                    if cid is None:
                        return self._reply({"ok": False, "error": "channel_not_found"})
                    if not body.get("text") and not body.get("blocks"):
                        return self._reply({"ok": False, "error": "no_text"})
                    if len(str(body.get("text") or "")) > 40000:
                        return self._reply({"ok": False, "error": "msg_too_long"})
                    problem = check_blocks(body.get("blocks", []))
                    if problem:
                        return self._reply({"ok": False, "error": problem})
                    message = {"type": "message", "text": body.get("text"), "user": "U0BOT", "bot_id": "B0BOT"}
                    warning = None
                    if "metadata" in body:
                        if slack.metadata_refused:
                            return self._reply({"ok": False, "error": slack.metadata_refused})
                        metadata, problem = check_metadata(body["metadata"])
                        if problem and not problem.startswith("warning:"):
                            return self._reply({"ok": False, "error": problem})
                        warning = problem.removeprefix("warning:") if problem else None
                        if metadata is not None:
                            message["metadata"] = metadata
                    if "thread_ts" in body:  # (a reply: not in conversations.history, which lists parents)
                        message["thread_ts"] = str(body["thread_ts"])
                    call["ok"] = True
                    message["ts"] = slack._ts()
                    if "thread_ts" in message:
                        slack.replies.setdefault((cid, message["thread_ts"]), []).append(message)
                    else:
                        slack.history.setdefault(cid, []).append(message)
                    answer = {"ok": True, "channel": cid, "ts": message["ts"], "message": message}
                    return self._reply({**answer, **({"warning": warning} if warning else {})})
                if method == "conversations.history":
                    wait = slack._history_at + slack.history_every_s - time.monotonic()
                    if wait > 0:
                        return self._limited(math.ceil(wait))
                    slack._history_at = time.monotonic()
                    answer = slack._history(body)
                    call["ok"] = answer["ok"]
                    return self._reply(answer)
                if method == "conversations.replies":
                    answer = slack._replies(body)
                    call["ok"] = answer["ok"]
                    return self._reply(answer)
                if method == "conversations.list":
                    answer = slack._list(body)
                    call["ok"] = answer["ok"]
                    return self._reply(answer)
                if method == "files.getUploadURLExternal":
                    if not body.get("filename") or not str(body.get("length", "")).isdigit():
                        return self._reply({"ok": False, "error": "invalid_arguments"})
                    file_id = f"F{len(slack.calls):04d}"
                    slack.files[file_id] = {"name": body["filename"], "length": int(body["length"])}
                    call["ok"] = True
                    return self._reply(
                        {
                            "ok": True,
                            "file_id": file_id,
                            "upload_url": f"http://127.0.0.1:{slack.server.server_address[1]}/upload/{file_id}",
                        }
                    )
                if method == "files.completeUploadExternal":
                    files = json.loads(body.get("files", "[]"))
                    if not files or any(f["id"] not in slack.uploads for f in files):
                        return self._reply({"ok": False, "error": "file_not_found"})
                    if body.get("thread_ts") and body.get("channel_id") not in slack.channels:
                        return self._reply({"ok": False, "error": "channel_not_found"})
                    call["ok"] = True
                    shared = [{"id": f["id"], "title": f.get("title"), **slack.files.get(f["id"], {})} for f in files]
                    if body.get("thread_ts"):  # (shared in the thread: a reply holding the files)
                        reply = {"type": "message", "text": "", "user": "U0BOT", "bot_id": "B0BOT", "upload": True}
                        reply.update(ts=slack._ts(), thread_ts=body["thread_ts"], files=shared)
                        slack.replies.setdefault((body["channel_id"], body["thread_ts"]), []).append(reply)
                    return self._reply({"ok": True, "files": shared})
                return self._reply({"ok": False, "error": "unknown_method"})

        return Handler
