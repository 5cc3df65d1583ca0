"""A local HTTP server speaking the Slack Web API methods the notifier uses, checking payloads.

``chat.postMessage`` (JSON body, bot token, at most 50 blocks, 3000 characters per text
field, 150 per header, 12,000 in all), ``files.getUploadURLExternal``, the upload URL it hands out, and
``files.completeUploadExternal``; answers ``{"ok": false, "error": ...}`` as Slack does, and
429 with Retry-After (``rate_limited``) as Slack's rate limiter does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

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
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
        return [c["body"] for c in self.calls if c["method"] == "chat.postMessage" and c["ok"]]

    def _handler(self):  # type: ignore[no-untyped-def]
        slack = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

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
                call = {"method": method, "body": body, "ok": False}
                slack.calls.append(call)
                if slack.rate_limited:
                    slack.rate_limited -= 1
                    data = json.dumps({"ok": False, "error": "ratelimited"}).encode()
                    self.send_response(429)
                    self.send_header("Retry-After", str(slack.retry_after))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if slack.cut:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b'{"ok": ')
                    self.close_connection = True
                    return None
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
                if method == "chat.postMessage":
                    if not body.get("channel"):
                        return self._reply({"ok": False, "error": "channel_not_found"})
                    if not body.get("text") and not body.get("blocks"):
                        return self._reply({"ok": False, "error": "no_text"})
                    problem = check_blocks(body.get("blocks", []))
                    if problem:
                        return self._reply({"ok": False, "error": problem})
                    call["ok"] = True
                    return self._reply(
                        {
                            "ok": True,
                            "channel": "C0ROLLOUT",
                            "ts": f"1700000000.{len(slack.calls):06d}",
                            "message": {"text": body.get("text")},
                        }
                    )
                if method == "files.getUploadURLExternal":
                    if not body.get("filename") or not str(body.get("length", "")).isdigit():
                        return self._reply({"ok": False, "error": "invalid_arguments"})
                    file_id = f"F{len(slack.calls):04d}"
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
                    if body.get("thread_ts") and body.get("channel_id") != "C0ROLLOUT":
                        return self._reply({"ok": False, "error": "channel_not_found"})
                    call["ok"] = True
                    return self._reply({"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]})
                return self._reply({"ok": False, "error": "unknown_method"})

        return Handler
