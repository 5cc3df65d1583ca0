"""The model server's admin API, as one client: traffic policies, version loads, the probe.

Every caller that changes what the model server serves goes through ``ModelServerAdmin``: the
mesh's ``LocalRouter``, the Airflow steps, ``rolloutctl``, the one-machine stack and the benches.
The admin token travels as a bearer token; an answer other than 2xx becomes ``AdminError`` with
the method, the path, the status and the server's own reason.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_server.traffic import TrafficPolicy


def image_request(images: Iterable[bytes], input_name: str = "image") -> dict[str, Any]:
    """A KServe v2 JSON inference request of encoded images (PNG, JPEG) as base64 BYTES."""
    data = [base64.b64encode(image).decode() for image in images]
    return {
        "inputs": [
            {
                "name": input_name,
                "shape": [len(data)],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": data,
            }
        ]
    }


MAX_ANSWER = 8 * 2**20  # an admin answer (a policy, the repository index) is far smaller


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part: what messages (logs, reports, Slack) may show."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def read_body(response: Any, limit: int, timeout_s: float) -> bytes:
    """At most ``limit + 1`` bytes of an answer, within about ``timeout_s`` in all: a socket's
    timeout is per read, so a server sending a byte every few seconds held ``read()`` for hours.
    TimeoutError past the time (the caller says who did not answer)."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = response.read1(min(2**16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the answer took more than {timeout_s:g} s")
    return b"".join(chunks)


class AdminError(Exception):
    """The model server refused or did not answer; ``status`` is None when it did not answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelServerAdmin:
    url: str  # http://host:port
    token: str | None = field(default=None, repr=False)  # out of logs
    timeout_s: float = 30.0
    load_timeout_s: float = 600.0  # a load answers once the versions are warm (GPU sessions take a while)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One request; the decoded JSON answer (at most ``MAX_ANSWER`` bytes), or None for an empty one."""
        timeout_s = timeout_s or self.timeout_s
        if self.token is not None and any(ord(c) < 32 or ord(c) == 127 or ord(c) > 255 for c in self.token):
            # http.client's refusal of such a header quotes its value: the token, in logs and reports;
            # one beyond Latin-1 it cannot encode, which read as a URL it cannot reach.
            raise AdminError(
                "the admin token holds a line break or another control character, or one beyond Latin-1 (a "
                "byte-order mark, a typographic quote), which an HTTP header cannot carry: check its file or "
                "the connection's password"
            )
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (the configured server)
            self.url.rstrip("/") + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.headers, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as r:  # noqa: S310
                raw = read_body(r, MAX_ANSWER, timeout_s)
        except urllib.error.HTTPError as exc:
            try:
                reason = str(json.loads(exc.read(MAX_ANSWER)).get("error", ""))[:1000]
            except (ValueError, AttributeError):
                reason = ""
            if exc.code == 401:  # the server's reason speaks of headers, not of where the token comes from
                reason = (
                    "the admin token given (--token-file, or the connection's password) was refused"
                    if self.token
                    else "no admin token was given: pass --token-file (in Airflow: the connection's password)"
                )
            raise AdminError(f"model server {method} {path}: HTTP {exc.code}: {reason}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
                raise AdminError(f"model server {method} {path}: no answer within {timeout_s:g} s") from None
            raise AdminError(f"model server at {redact(self.url)} unreachable: {exc}") from None
        except ValueError as exc:  # a URL urllib cannot use ("host:8000", "http://[::1")
            raise AdminError(f"model server at {redact(self.url)}: not a URL it can reach: {exc}") from None
        if len(raw) > MAX_ANSWER:
            raise AdminError(f"model server {method} {path}: an answer over {MAX_ANSWER} bytes")
        try:
            return json.loads(raw) if raw else None
        except ValueError:  # (UnicodeDecodeError too) not the model server, or not its admin API
            raise AdminError(f"model server {method} {path}: the answer is not JSON: {raw[:80]!r}") from None

    @staticmethod
    def _model(model: str) -> str:
        return urllib.parse.quote(model, safe="")

    def traffic(self, model: str) -> TrafficPolicy:
        path = f"/v2/models/{self._model(model)}/traffic"
        answer = self.call("GET", path)
        try:
            return TrafficPolicy.from_dict(answer)
        except ValueError as exc:  # (PolicyError) an answer that is no policy
            raise AdminError(f"model server GET {path}: the answer is not a traffic policy: {exc}") from None

    def set_traffic(self, model: str, policy: TrafficPolicy) -> None:
        self.call("PUT", f"/v2/models/{self._model(model)}/traffic", policy.to_dict())

    def load(self, model: str, versions: Iterable[int | str]) -> None:
        """Serve exactly these versions (Triton's load API with a specific version policy); the
        server refuses (409) a load that would drop a version its policy routes to."""
        policy = {"version_policy": {"specific": {"versions": sorted({int(v) for v in versions})}}}
        path = f"/v2/repository/models/{self._model(model)}/load"
        self.call("POST", path, {"parameters": {"config": json.dumps(policy)}}, timeout_s=self.load_timeout_s)

    def served_sha256(self, model: str, version: str) -> str:
        """The sha256 of the bytes the server loaded for that version (its metadata's
        ``parameters.versions``); AdminError for an answer without one."""
        path = f"/v2/models/{self._model(model)}/versions/{urllib.parse.quote(version, safe='')}"
        answer = self.call("GET", path)
        versions = (answer.get("parameters") or {}).get("versions") if isinstance(answer, dict) else None
        entry = versions.get(version) if isinstance(versions, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str):
            raise AdminError(f"model server GET {path}: the answer names no sha256 of version {version[:16]}")
        return digest

    def prediction_log(self) -> str | None:
        """Where the server says it writes its prediction log (its metadata's
        ``parameters.prediction_log``, a ``files.location``), None where it writes none;
        AdminError where it does not say (Triton, an older model server) or does not answer."""
        answer = self.call("GET", "/v2")
        parameters = answer.get("parameters") if isinstance(answer, dict) else None
        if not isinstance(parameters, dict) or "prediction_log" not in parameters:
            raise AdminError("model server GET /v2: the answer does not say where it writes its prediction log")
        where = parameters["prediction_log"]
        if where is not None and not isinstance(where, str):
            raise AdminError("model server GET /v2: its prediction_log is not a location")
        return where

    def serve_only(self, model: str, version: str) -> None:
        """That version alone loaded and at 100%: loaded beside what is routed now, routed, then
        alone (a load never drops a routed version)."""
        self.load(model, [version, *self.traffic(model).versions()])
        self.set_traffic(model, TrafficPolicy.from_dict({"route": [{"version": version, "weight": 100}]}))
        self.load(model, [version])

    def ready(self, model: str, version: str) -> bool:
        """Whether the server serves that version now (KServe v2 model readiness: 200, else 400)."""
        try:
            self.call("GET", f"/v2/models/{self._model(model)}/versions/{urllib.parse.quote(version, safe='')}/ready")
        except AdminError as exc:
            if exc.status is None:
                raise
            return False
        return True

    def infer(self, model: str, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Any:
        """A KServe v2 JSON inference with the admin token (which ``X-Shadow-Probe`` needs)."""
        return self.call("POST", f"/v2/models/{self._model(model)}/infer", body, headers)


def not_as_verified(
    admin: ModelServerAdmin, model: str, version: str, verified: str, path: Path | None = None
) -> str | None:
    """Why version ``version`` of ``model`` as the model server serves it is not the file verified
    (``verified``, its sha256); None when it is. Any load, and a restart of the server, reads the
    version's file again: written over since, the stages judged, and a promotion carried to 100%,
    bytes no check saw. ``path``: the version's file too, which the next load serves. The DAG's
    steps and ``rolloutctl run`` check it before each stage, at each look and before promoting."""
    what = f"version {version}"
    served = admin.served_sha256(model, version)
    if served != verified:
        return (
            f"{what} as the model server loaded it (sha256 {served[:16]}) is not the file verified "
            f"(sha256 {verified[:16]}): it changed after its check"
        )
    if path is not None:
        from model_server.model import file_sha256

        try:
            found = file_sha256(path)
        except OSError as exc:
            return f"{what}'s file {path} cannot be read ({exc}): the next load would not serve the file verified"
        if found != verified:
            return (
                f"{what}'s file {path} (sha256 {found[:16]}) is not the file verified (sha256 {verified[:16]}): "
                "it changed after its check, and the next load would serve it"
            )
    return None
