"""What several test modules share: a client of the model server, Triton's example models,
generated data (`tests/support`)."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import requests
from hypothesis import strategies as st

from model_server import predictionlog
from model_server.masking import KeyRing, Masker
from model_server.predictionlog import Inference, PredictionLog

TOKEN = "routing-token"  # the admin token of the servers these tests start
# How often a loopback server a test starts looks whether it is stopped: shutdown() waits for its
# next look (socketserver's 0.5 s made each stop half a second).
POLL_INTERVAL_S = 0.01


# -- the model server ---------------------------------------------------------------------------


def infer(server, image: bytes, headers: dict[str, str] | None = None, path: str = "/v2/models/digits/infer"):
    blob = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return requests.post(
        f"{server.http}{path}",
        data=header + blob,
        timeout=30,
        headers={"Inference-Header-Content-Length": str(len(header)), **(headers or {})},
    )


def put_policy(server, policy, token: str | None = TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.put(f"{server.http}/v2/models/digits/traffic", json=policy, headers=headers, timeout=30)


def settled(server, name: str, expected: float, timeout_s: float = 30.0, **labels: str) -> float | None:
    """The sample ``name`` of ``server``'s /metrics once it is ``expected`` (absent as 0) and the
    prediction log's writer holds no record (``prediction_log_held_records``: every record
    appended before is written, and counted), else as it is after ``timeout_s``: the live view
    counts a label once the writer has written its file (the next flush, 2 s by default), so a
    test waits for it, and a count a later flush would add is in the value returned (waiting
    for the value alone passed a test whose wrong count came a flush later). The deadline only
    bounds a failure: the caller asserts the value returned."""

    def done() -> bool:
        return (server.metric(name, **labels) or 0) == expected and not server.metric("prediction_log_held_records")

    server.wait_for(name, done, timeout_s, 0.05)
    return server.metric(name, **labels)


def mirroring(server_factory, repository: Path, tmp_path: Path):
    """A server on ``repository`` (its state in ``tmp_path``) serving digits 1 and mirroring all
    of its traffic to version 2."""
    s = server_factory(repository, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2)
    mirror = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
    assert put_policy(s, mirror).status_code == 200
    return s


# -- Triton's example models -------------------------------------------------------------------

SIMPLE_MODELS = ("simple", "simple_string")


def write_simple_models(repository: Path, *names: str) -> None:
    """Triton's ``simple`` and ``simple_string`` (its client examples' models) as ONNX graphs in a
    repository, version 1 each: INPUT0 and INPUT1 of [batch, 16] with max_batch_size 8 (Triton's
    dims [16]; config.json here writes the batch dimension), OUTPUT0 = INPUT0 + INPUT1 and
    OUTPUT1 = INPUT0 - INPUT1; INT32 for ``simple``, BYTES (ONNX strings, each the decimal text
    of an integer) for ``simple_string``. ``names``: which (default both)."""
    import onnx
    from onnx import TensorProto, helper

    from scripts.build_models import IR_VERSION, OPSET

    for name in names or SIMPLE_MODELS:
        strings = name == "simple_string"
        elem, datatype = (TensorProto.STRING, "BYTES") if strings else (TensorProto.INT32, "INT32")
        nodes = []
        a, b = "INPUT0", "INPUT1"
        if strings:  # the text as numbers, and the results back to text
            nodes += [helper.make_node("Cast", [x], [f"{x}_int"], to=TensorProto.INT32) for x in (a, b)]
            a, b = f"{a}_int", f"{b}_int"
        outs = ("sum", "diff") if strings else ("OUTPUT0", "OUTPUT1")
        nodes += [helper.make_node("Add", [a, b], [outs[0]]), helper.make_node("Sub", [a, b], [outs[1]])]
        if strings:
            nodes += [
                helper.make_node("Cast", [x], [y], to=TensorProto.STRING)
                for x, y in zip(outs, ("OUTPUT0", "OUTPUT1"), strict=True)
            ]
        tensors = [
            helper.make_tensor_value_info(t, elem, ["batch", 16]) for t in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
        ]
        graph = helper.make_graph(nodes, name, tensors[:2], tensors[2:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        folder = repository / name
        (folder / "1").mkdir(parents=True)
        onnx.save(model, folder / "1" / "model.onnx")
        spec = [{"name": t, "datatype": datatype, "dims": [-1, 16]} for t in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
        config = {
            "name": name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": 8,
            "input": spec[:2],
            "output": spec[2:],
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- generated data -----------------------------------------------------------------------------


def samples(n: int, ratio: float = 1.0, errors: tuple[float, float] = (0.0, 0.0), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(np.log(5), 0.3, n))
    canary = np.exp(rng.normal(np.log(5 * ratio), 0.3, n))
    return pd.DataFrame(
        {
            "arm": ["baseline"] * n + ["canary"] * n,
            "latency_ms": np.r_[base, canary],
            "error": np.r_[rng.random(n) < errors[0], rng.random(n) < errors[1]].astype(int),
        }
    )


def shadow_log(
    tmp_path,
    n: int,
    disagree: float,
    low_confidence: float = 0.0,
    errors: int = 0,
    seed: int = 0,
    dropped: int = 0,
    orphans: int = 0,
    forged: int = 0,
    self_mirrored: int = 0,
    not_finite: int = 0,
    shadow_not_finite: int = 0,
    hashed: bool = True,
    at: float | None = None,
    classes: int = 10,
    versions: tuple[str, str] = ("1", "2"),
    skew: float = 0.0,
    flushed: float = 1.0,
    roles: tuple[str, ...] = ("primary", "shadow"),
    mirrored: bool | None = None,
    shadow_output: Callable[[int, np.ndarray], np.ndarray] | None = None,
):
    """A prediction log written by the real writer: ``n`` primary records with their shadow
    records, then ``dropped`` primaries whose copies were dropped and ``orphans`` shadow records
    without a primary; the first ``forged`` requests also get a shadow record of another image,
    disagreeing, written before their copy. Then ``self_mirrored`` requests the candidate served
    itself, each with its copy on the candidate (Istio mirrors the whole weighted route): the
    same answer. Then ``not_finite`` requests whose input was NaN (both answers NaN, as a client
    sending NaN in a binary FP32 tensor gets) and ``shadow_not_finite`` whose shadow alone
    answered NaN. The first ``n`` requests are the same whatever the other counts. Without
    ``hashed`` no record has an input to hash (its ``image_sha256`` is null). Every record is
    received at ``at`` (a ``time.time()``), or when it is made. Answers are of ``classes`` classes.
    ``versions``: the primary's and the shadow's (other than the default ones, the request ids
    are led by the shadow's, so that two logs written into one folder hold distinct requests).
    ``skew``: seconds the shadow records' clock is ahead of the primaries' (another pod's).
    Records received at ``at`` are written ``flushed`` seconds after the last of them (by its
    files' names: a second, as a writer flushing on time would). Only the records of ``roles``
    are written (the shadow records alone: the copies of primaries written before). ``mirrored``:
    what the primaries say of their mirror's sampling (None: nothing, as an older writer's).
    ``shadow_output``: the shadow's output of the ``i``-th request made of the one it would give
    (``[1, classes]`` float32): another dtype or shape than the primary's."""
    keys = tmp_path / "keys.json"
    if not keys.exists():  # (one key for a folder's logs: a request's records mask alike)
        keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    log = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), replica="audit-test")

    class writer:  # (the records of ``roles``)
        @staticmethod
        def append(inference: Inference) -> None:
            if inference.role in roles:
                log.append(inference)

        flush = log.flush

    rng = np.random.default_rng(seed)
    primary, shadow = versions
    lead = "" if versions == ("1", "2") else f"v{shadow}-"

    def record(rid: str, version: str, role: str, scores, outcome: str = "ok", name: str = "img") -> Inference:
        image = np.array([f"{name}-{rid}".encode()], dtype=object) if hashed else None
        route = "route" if role == "primary" else "mirror"
        return Inference(
            (time.time() if at is None else at) + (skew if role == "shadow" else 0.0),
            "digits",
            version,
            role,
            route,
            rid,
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "00f067aa0ba902b7",
            1.0 if role == "primary" else 2.0,
            outcome,
            scores,
            image,
            True,
            {},
            mirrored=mirrored if role == "primary" else None,
        )

    for i in range(n + dropped + orphans):
        label = int(rng.integers(classes))
        p = np.full(classes, 0.09 / (classes - 1), dtype=np.float32)
        p[label] = 0.91
        q = p.copy()
        if rng.random() < disagree:
            q = np.roll(p, 1)
        elif rng.random() < low_confidence:
            q = np.full(classes, 0.45 / (classes - 1), dtype=np.float32)
            q[label] = 0.55
        rid = f"{lead}r{i}"
        if i < n + dropped:
            writer.append(record(rid, primary, "primary", p[None]))
        if i < forged:
            writer.append(record(rid, shadow, "shadow", np.roll(p, 1)[None], name="forged"))
        if i >= n + dropped or i < n:
            failed = i < errors
            answer = q[None] if shadow_output is None else shadow_output(i, q[None])
            writer.append(record(rid, shadow, "shadow", None if failed else answer, "BACKEND" if failed else "ok"))
        else:
            writer.append(record(rid, shadow, "shadow", None, "DROPPED"))
    for i in range(self_mirrored):
        p = np.full(10, 0.01, dtype=np.float32)
        p[i % 10] = 0.91
        writer.append(record(f"own-{i}", "2", "primary", p[None]))
        writer.append(record(f"own-{i}", "2", "shadow", p[None]))
    nan = np.full((1, 10), np.nan, dtype=np.float32)
    for i in range(not_finite + shadow_not_finite):
        p = np.full(10, 0.01, dtype=np.float32)
        p[i % 10] = 0.91
        writer.append(record(f"nan-{i}", "1", "primary", nan if i < not_finite else p[None]))
        writer.append(record(f"nan-{i}", "2", "shadow", nan))
    if at is None:
        writer.flush()
    else:
        with mock.patch.object(predictionlog, "time", _Clock(at + max(skew, 0.0) + flushed)):
            writer.flush()
    return tmp_path / "log"


class _Clock:
    """The ``time`` module, its ``time()`` stopped at ``now``."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def luhn_check_digit(body: str) -> str:
    """The digit that makes ``body`` + it pass the Luhn checksum (a card number's)."""
    digits = [int(d) for d in reversed(body)]  # the check digit's neighbour is doubled
    total = sum(d if i % 2 else 2 * d - 9 * (d > 4) for i, d in enumerate(digits))
    return str(-total % 10)


# Values every detector must mask: PRC mobile, resident ID, e-mail, card.
# Secrets in free text: a credential that a log line or an error quotes (an exception's URL, a
# header echoed in an error, a connection string), found by a key that names it, by its scheme,
# or by the shape its issuer gives it; neither the masking nor a Slack report's scrub lets one by.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
JWE = (  # RFC 7516's compact form: header, encrypted key, IV, ciphertext, tag
    "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.OKOawDo13gRp2ojaHV7LFpZcgV7T6DVZKTyKOMTYUmKoTCVJRgckCL9kiMT03JGe"
    ".48V1_ALb6US04U3b.5eym8TW_c8SuK0ltJ3rpYIzOeDQz7TALvtu6UG9oMo4vpzs9tX_EFShS8iB7j6jiSdiwkIr3ajwQzaBtQD_A"
    ".XFBoMYUZodetZdvTiFvSkQ"
)
JWE_DIR = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..GdYbHs7EbSQaGw1p.vbF3BHCl5g0DRz0q.Jtb_ScAwmGwq9zEDXa3UnA"
CREDENTIALS_IN_TEXT = {  # text: the secret in it
    "Authorization: Bearer abcDEF123456ghiJKL": "abcDEF123456ghiJKL",
    "headers={'Authorization': 'Basic dXNlcjpwYXNz'}": "dXNlcjpwYXNz",
    "proxy-authorization: Token 9f8e7d6c5b4a": "9f8e7d6c5b4a",
    f"token {JWT} rejected": JWT,
    "GET https://alice:s3cr%21t@minio.internal:9000/bucket failed": "s3cr!t",
    "connect postgresql://airflow:hunter2@db:5432/airflow": "hunter2",
    "redis://:p4ss/w0rd@cache:6379/0 refused": "p4ss/w0rd",
    # an "@" not encoded in the password or the user: the user information ends at the last one
    "GET https://user:p@ss@minio.internal/b failed": "p@ss",
    "connect ftp://bob@example.com:s3cret@files.internal/ refused": "s3cret",
    "retrying with password=Tr0ub4dor&3": "Tr0ub4dor",
    "db_password: 'correct horse battery'": "correct horse battery",
    '{"client_secret": "abc\\"def"} x': 'abc\\"def',
    "GET /cb?code=1&access_token=ya29.a0AfH6SMB&state=2": "ya29.a0AfH6SMB",
    "api_key: sk_live_51H8abcdefghij": "sk_live_51H8abcdefghij",
    "X-Api-Key=AbCdEf0123456789": "AbCdEf0123456789",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "key id AKIAIOSFODNN7EXAMPLE denied": "AKIAIOSFODNN7EXAMPLE",
    "slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx failed": (
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
    ),
    "socket mode xapp-1-A0123BCDEFG-1234567890123-abcdef0123456789 closed": (
        "xapp-1-A0123BCDEFG-1234567890123-abcdef0123456789"
    ),
    "POST https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX: 404": (
        "T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX"
    ),
    "clone with ghp_abcdefghijklmnopqrstuvwxyz0123456789 failed": "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "gitlab glpat-abcdefghij0123456789 expired": "glpat-abcdefghij0123456789",
    "maps AIzaSyA1234567890abcdefghijklmnopqrstuv ok": "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    # a cookie header's value: all its pairs, to the end of the line
    "Cookie: session=abc123; theme=dark\nHost: x": "session=abc123; theme=dark",
    "set-cookie: sid=Zx9y8W7v; Path=/; HttpOnly\r\n": "sid=Zx9y8W7v; Path=/; HttpOnly",
    # and written without a colon, as free text does
    "rejected cookie session=abc123 for user 7": "session=abc123",
    "Cookie session=Zx9y8W7v; theme=dark expired": "session=Zx9y8W7v; theme=dark",
    # "cookies", as a log line names a request's, and a dict's repr of them, masked whole
    "Cookies: session=abc123XYZ; theme=dark\nHost: x": "session=abc123XYZ; theme=dark",
    "cookies session=abc123XYZ for user 7": "session=abc123XYZ",
    "request cookies: {'session': 'abc123XYZ'} sent": "{'session': 'abc123XYZ'}",
    "Cookie: {'session': 'Zx9y8W7v', 'theme': 'dark'}": "{'session': 'Zx9y8W7v', 'theme': 'dark'}",
    # a key then its value after spaces, no ":" or "=" (a value that is no lower-case word)
    "login with password hunter2 refused": "hunter2",
    "the password is Tr0ub4dor&3": "Tr0ub4dor",
    "using api key AbCdEf0123456789 from env": "AbCdEf0123456789",
    "client secret P@ssw0rd-Xyz rejected": "P@ssw0rd-Xyz",
    "the secret hunter2 leaked": "hunter2",
    "secret is Hunter2 not found": "Hunter2",
    "Client Secret AbC123xyz456 rejected": "AbC123xyz456",
    # the word after "secret" is a Kubernetes Secret's name only as Kubernetes writes one: a value
    # after a credential's owner ("client secret"), of another shape, or that looks random is none
    "client secret AbCdEf123456 is invalid": "AbCdEf123456",
    "The provided client secret Xk9#pQ2!zR is invalid": "Xk9#pQ2!zR",
    "webhook secret whsec_4f8a9b2c1d3e is invalid": "whsec_4f8a9b2c1d3e",
    "Client Secret 8f14e45fceea167a5a36dedd4bea2543 rejected": "8f14e45fceea167a5a36dedd4bea2543",
    "the Secret 3f8e5a1c9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f": "3f8e5a1c9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f",
    'secret "3f8e5a1c9b7d2e4f6a8c0b1d" not found': "3f8e5a1c9b7d2e4f6a8c0b1d",
    "secret 9b2c4d6e-1a3f-4b5c-8d7e-0f1a2b3c4d5e not found": "9b2c4d6e-1a3f-4b5c-8d7e-0f1a2b3c4d5e",
    "shared secret k8s-p4ss-w0rd is invalid": "k8s-p4ss-w0rd",
    # and after the owner's possessive (its apostrophe typographic too: \u2019)
    "the client's secret abcdef-123456 is invalid": "abcdef-123456",
    "the webhook's secret whsec-4f8a9b2c1d3e is invalid": "whsec-4f8a9b2c1d3e",
    "the app\u2019s secret ab12-cd34-ef56 is invalid": "ab12-cd34-ef56",
    "Secret xk29fm4q7zr81pw3tn5v-2 rejected": "xk29fm4q7zr81pw3tn5v-2",
    # a key, spaces and a value in quotes: a literal, whatever its shape
    'login with password "hunter2" refused': "hunter2",
    "the api key is 'AbC 12 xyz' from env": "AbC 12 xyz",
    'my password is "correct horse battery staple"': "correct horse battery staple",
    "passwd 'Zq9' set": "Zq9",
    # a key's name of two words ("secret key", as "api key")
    "boto3 secret key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ignored": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "the client key is AbCdEf0123456789": "AbCdEf0123456789",
    'Secret is "Hunter2"': "Hunter2",
    # a header's value as Python writes bytes (botocore's debug log of a request's headers)
    "headers={'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEHUa'}": "IQoJb3JpZ2luX2VjEHUa",
    "{'Authorization': b'AWS4-HMAC-SHA256 SignedHeaders=host, Signature=fe5f80f77d5fa3be'}": (
        "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=fe5f80f77d5fa3be"
    ),
    "{'Cookie': b'session=Zx9y8W7v'}": "session=Zx9y8W7v",
    "token 9f8e7d6c5b4a expired": "9f8e7d6c5b4a",
    # a URL query's parameter named for a key, a signature or auth (what the Slack reports' scrub
    # found and the masking did not), and a Slack token of another letter
    "GET https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig=AbC%2Bdef123%3D failed": "AbC%2Bdef123%3D",
    "fetch https://storage.googleapis.com/b/o?X-Goog-Signature=0a1b2c3d4e&X-Goog-Date=20261203": "0a1b2c3d4e",
    "GET https://maps.example.com/api?key=abc123def456&q=x": "abc123def456",
    "GET http://cb.example/hook?auth=Zm9vYmFy9 sent": "Zm9vYmFy9",
    "refresh xoxe-1-My0xLTEyMzQ1Njc4OTAxMi0xMjM0 failed": "xoxe-1-My0xLTEyMzQ1Njc4OTAxMi0xMjM0",
    # a JWE (five parts; its encrypted key empty under "dir"), a Google OAuth access token and a
    # Cloud Storage HMAC access id, in free text
    f"decrypt {JWE} failed": JWE,
    f"claims {JWE_DIR} rejected": JWE_DIR,
    "gcs call with ya29.a0AfB_byC3x9Lq-T2vWm8KpZr4sNdE7hJ1uYiOg6fQ expired": (
        "ya29.a0AfB_byC3x9Lq-T2vWm8KpZr4sNdE7hJ1uYiOg6fQ"
    ),
    "hmac id GOOG1EJRUINPZ2TFDDJJ5HCVS5RM4DSY5C2W6JP6ZXTBJJJPH4UAIDCCJAUBO denied": (
        "GOOG1EJRUINPZ2TFDDJJ5HCVS5RM4DSY5C2W6JP6ZXTBJJJPH4UAIDCCJAUBO"
    ),
    # after a line end or tab written escaped (repr(), json.dumps of lines joined): its letter
    # is no part of the key or the credential after it
    "lines: 'retry\\npassword=Tr0ub4dor&3'": "Tr0ub4dor",
    '{"msg": "sent\\ntoken: Zx9y8W7vQ2"}': "Zx9y8W7vQ2",
    "keys: 'a\\nAKIAIOSFODNN7EXAMPLE'": "AKIAIOSFODNN7EXAMPLE",
    "headers: 'Host: x\\r\\nCookie: session=abc123'": "session=abc123",
    "fields: 'user\\tsecret hunter2'": "hunter2",
    # a JSON document held as a string (a log message, a request's body): its quotes escaped
    '{"body": "{\\"password\\": \\"hunter2\\"}"}': "hunter2",
    '{"body": "{\\"db_password\\":\\"x\\\\\\"Tr0ub4dor\\"}"}': 'x\\\\\\"Tr0ub4dor',
    '{"req": "{\\"Cookie\\": \\"session=abc123XYZ\\"}"}': "session=abc123XYZ",
    # and in a string held in it, its quotes escaped again (a log record's message of a request's
    # JSON body, json.dumps twice or three times): its value was left readable
    '{"body": "{\\"body\\": \\"{\\\\\\"password\\\\\\": \\\\\\"hunter2\\\\\\"}\\"}"}': "hunter2",
    '{"body": "{\\"body\\": \\"{\\\\\\"db_password\\\\\\": \\\\\\"x\\\\\\\\\\\\\\"Tr0ub4dor\\\\\\\\\\\\\\\\9\\\\\\"}\\"}"}': (
        'x\\\\\\\\\\\\\\"Tr0ub4dor\\\\\\\\\\\\\\\\9'
    ),
    '{"body": "{\\"body\\": \\"{\\\\\\"body\\\\\\": \\\\\\"{\\\\\\\\\\\\\\"api_key\\\\\\\\\\\\\\": '
    '\\\\\\\\\\\\\\"k1Xz9Q\\\\\\\\\\\\\\"}\\\\\\"}\\"}"}': "k1Xz9Q",
    # a dict's or a list's repr after a secret's key, masked whole to the bracket that closes it
    "password: {'a': 'b3cret9'} sent": "{'a': 'b3cret9'}",
    "api_key: ['k1Xz9Q', 'k2Yq8W'] set": "['k1Xz9Q', 'k2Yq8W']",
    "cookies: {'s': {'x': 'abc123XYZ'}} sent": "{'s': {'x': 'abc123XYZ'}}",
    "browser cookies: [{'name': 'sid', 'value': 'Zx9y8W7v'}] ok": "[{'name': 'sid', 'value': 'Zx9y8W7v'}]",
    # printed over lines (pprint, json.dumps(indent=2)), and after a key and a space: the first
    # line's bracket, or nothing, was masked
    'credentials = {\n  "token": "x9Kq",\n  "key": "y8Wz"\n}': '{\n  "token": "x9Kq",\n  "key": "y8Wz"\n}',
    '{\n  "api_key": [\n    "k1Xz9Q",\n    "k2Yq8W"\n  ]\n} sent': '[\n    "k1Xz9Q",\n    "k2Yq8W"\n  ]',
    "password {'db': 'b3cret9'} sent": "{'db': 'b3cret9'}",
    "login with token [\n 'k1Xz9Q',\n 'k2Yq8W'] refused": "[\n 'k1Xz9Q',\n 'k2Yq8W']",
    # a pair's repr, a key and its value in a tuple (an item of dict.items(), a call's arguments)
    "args ('password', 'hunter2-secret') sent": "hunter2-secret",
    'pairs [("api_key", "AbC123xyz9"), ("n", 1)] sent': "AbC123xyz9",
    "args ('Secret', 'Zq9Xw2Lk7Vb') sent": "Zq9Xw2Lk7Vb",
    "args ('secret', 'xk29fm4q7zr81pw3tn5v-2') sent": "xk29fm4q7zr81pw3tn5v-2",
    "args ('secret', 'abc-def') sent": "abc-def",  # (a field "secret", not the kind "Secret")
    # ASGI's headers (bytes), a pair as a list (json.dumps of dict.items()), a pair over lines
    "asgi headers [(b'x-api-key', b'AbCdEf0123456')]": "AbCdEf0123456",
    'pairs [["password", "hunter2"]] sent': "hunter2",
    "pairs [['password','Zq9Xw2Lk']] sent": "Zq9Xw2Lk",
    "args ('password',\n 'Tr0ub4dor9') sent": "Tr0ub4dor9",
    "args ('password', 'Tr0ub4dor9'\n) sent": "Tr0ub4dor9",  # (its ")" on a line of its own)
    'pairs [\n    ("api_key", "AbC123xyz9"\n    ),\n]': "AbC123xyz9",
    # a value whose key's name is the value of the field before it (Kubernetes' env, header lists)
    'env [{"name": "DB_PASSWORD", "value": "s3cr3t"}] set': "s3cr3t",
    # and its value first ({"value": ..., "name": ...}: a dict's keys in any order)
    'env [{"value": "s3cr3t", "name": "DB_PASSWORD"}] set': "s3cr3t",
    "headers [{'value': 'AbCdEf0123',\n  'key': 'X-Api-Key'}]": "AbCdEf0123",
    # a name of more than three prefixes, read from its start
    'env [{"name": "APP_DB_PRIMARY_ADMIN_PASSWORD", "value": "s3cr3t"}] set': "s3cr3t",
    "args ('app_db_primary_admin_password', 'Zq9Xw2Lk') sent": "Zq9Xw2Lk",
    "GET https://example.com/cb?app_db_primary_admin_token=Zq9Xw2Lk&x=1": "Zq9Xw2Lk",
    "env:\n- name: DB_PASSWORD\n  value: s3cr3t\n- name: LOG_LEVEL": "s3cr3t",
    "headers [{'key': 'X-Api-Key', 'value': 'AbCdEf0123'}]": "AbCdEf0123",
    'headers [{"name": "Cookie", "value": "session=abc123XYZ"}]': "session=abc123XYZ",
    'headers [{"name": "Set-Cookie", "value": "sid=Zx9y8W7v"}]': "sid=Zx9y8W7v",
    "env:\n- name: DB_PASSWORD # the db's\n  value: s3cr3t9\n": "s3cr3t9",
    '{"msg": "env:\\n- name: DB_PASSWORD\\n  value: \\"s3cr3t\\"\\n"}': "s3cr3t",
    # printed over lines (json.dumps(indent=2), pprint), its line ends written escaped too
    '{\n  "name": "DB_PASSWORD",\n  "value": "s3cr3t"\n}': "s3cr3t",
    "{'name': 'DB_PASSWORD',\n 'value': 'Zq9Xw2Lk',\n 'value_from': None}": "Zq9Xw2Lk",
    '{"m": "{\\n  \\"name\\": \\"X-Api-Key\\",\\n  \\"value\\": \\"AbCdEf0123\\"\\n}"}': "AbCdEf0123",
    # a YAML block scalar after the key ("password: |"): its lines, more indented than the key's
    "secrets:\n  db:\n    password: |\n      hunter2\n      Zq9Xw2\n    user: bob": "hunter2\n      Zq9Xw2",
    "\napi_token: >-\n  AbC123xyz9\nnext: 1": "AbC123xyz9",
    "\n- password: |\n    hunter2x\n  user: bob": "hunter2x",
    "\n  - 'db_password': |-\n      Zq9Xw2Lk\n    user: bob": "Zq9Xw2Lk",
    "\n-  password: |\n     Zq9Xw2Lk\n   user: bob": "Zq9Xw2Lk",  # (a list item's key after "-  ")
    # its line ends written escaped, its indicator's digit first, a comment after it, deep
    # indentation, a blank line in it
    '{"m": "password: |\\n  hunter2x\\n  more9"}': "hunter2x\\n  more9",
    "\npassword: |2-\n  Zq9Xw2Lk\nnext: 1": "Zq9Xw2Lk",
    "\npassword: | # the db's\n  Zq9Xw2Lk\nnext: 1": "Zq9Xw2Lk",
    "\ntoken: |\n" + " " * 40 + "AbC123xyz9\nnext: 1": "AbC123xyz9",
    "\npassword: |\n  line1x\n\n  line2y\nnext: 1": "line1x\n\n  line2y",
    # a plain value on the key's next line, more indented ("password:\n  hunter2"), escaped too
    "\npassword:\n  hunter2\nuser: bob": "hunter2",
    "db:\n  password: # set by ops\n    Zq9Xw2 Lk7\n  user: bob": "Zq9Xw2 Lk7",
    "\n- api_token:\n    AbC123xyz9\n  user: bob": "AbC123xyz9",
    '{"m": "password:\\n  hunter2x\\nuser: bob", "n": "a: b"}': "hunter2x",
}
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1b2c3d4\nq+/zYx==\n-----END RSA PRIVATE KEY-----"


sensitive_values = st.one_of(
    st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True),
    st.from_regex(r"[1-9][0-9]{5}(19|20)[0-9]{2}(0[1-9]|1[0-2])(0[1-9]|[12][0-9])[0-9]{3}[0-9X]", fullmatch=True),
    st.from_regex(r"[a-z]{1,8}\.[a-z]{1,8}@[a-z]{2,8}\.(com|cn|org)", fullmatch=True),
    st.from_regex(r"[3-6][0-9]{14}", fullmatch=True).map(lambda body: body + luhn_check_digit(body)),
)


def files_under(uri: str) -> dict[str, bytes]:
    """Every file below a folder or an object store prefix, by its path under it."""
    import pyarrow.fs as pafs

    from model_server.files import filesystem

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                found[info.path.removeprefix(root + "/")] = bytes(f.read())
    return found


class DataReads:
    """A local filesystem (``fs``: a ``pyarrow.fs.PyFileSystem`` over ``LocalFileSystem``; its
    ``filesystem`` stands in for ``model_server.files.filesystem``) that notes the reads of each
    file's data (columns), as (first byte, end) by path in ``reads``: the reads that do not end
    at the file's end, where its footer is (a footer alone is read in reads ending there)."""

    def __init__(self) -> None:
        import io

        import pyarrow as pa
        import pyarrow.fs as pafs

        local = pafs.LocalFileSystem()
        self.reads: dict[str, list[tuple[int, int]]] = {}
        noted = self.reads

        class Reading(io.RawIOBase):
            def __init__(self, path: str):
                self.path, self.file = path, open(path, "rb")
                self.size = local.get_file_info(path).size

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def seek(self, pos: int, whence: int = 0) -> int:
                return self.file.seek(pos, whence)

            def tell(self) -> int:
                return self.file.tell()

            def read(self, n: int = -1) -> bytes:
                first = self.file.tell()
                data = self.file.read(n)
                if first + len(data) < self.size:
                    noted.setdefault(self.path, []).append((first, first + len(data)))
                return data

            def close(self) -> None:
                self.file.close()
                super().close()

        class Handler(pafs.FileSystemHandler):
            def get_type_name(self):
                return "data-reads"

            def get_file_info(self, paths):
                return local.get_file_info(paths)

            def get_file_info_selector(self, selector):
                return local.get_file_info(selector)

            def normalize_path(self, path):
                return local.normalize_path(path)

            def open_input_file(self, path):
                return pa.PythonFile(Reading(path), mode="r")

            def open_input_stream(self, path):
                return self.open_input_file(path)

            def writes(self, *args):
                raise OSError("a reader writes nothing")

            copy_file = create_dir = delete_dir = delete_dir_contents = delete_file = writes
            delete_root_dir_contents = move = open_append_stream = open_output_stream = writes

        self.fs = pafs.PyFileSystem(Handler())

    def filesystem(self, uri: str | Path):
        return self.fs, Path(str(uri)).resolve().as_posix()


class SlowStore:
    """The log's folder as a store whose every file takes ``per_file`` seconds of ``now`` to
    open (``filesystem`` stands in for ``model_server.files.filesystem``)."""

    def __init__(self, now: float, per_file: float):
        import threading

        import pyarrow.fs as pafs

        self.now, self.per_file, self.opened = [now], per_file, 0
        self.local, self.lock = pafs.LocalFileSystem(), threading.Lock()

    def clock(self) -> float:
        return self.now[0]

    def sleep(self, seconds: float) -> None:
        self.now[0] += seconds

    def filesystem(self, uri):
        root = Path(str(uri)).resolve().as_posix()  # (a folder's, as filesystem gives it)
        store = self

        class Slow:
            def get_file_info(self, what):
                return store.local.get_file_info(what)

            def open_input_file(self, path):
                with store.lock:
                    store.opened += 1
                    store.now[0] += store.per_file
                return store.local.open_input_file(path)

        return Slow(), root


def one_hours_t0() -> float:
    """A stage start about 1000 s ago whose next 300 s lie in one hour: a flush of records
    straddling an hour writes a file to each hour's folder, and a test counting the files read
    failed when run in the minutes after an hour began."""
    t0 = time.time() - 1000
    return t0 - 400 if t0 % 3600 > 3600 - 300 else t0


def stage_evidence(tmp_path: Path, t0: float, replay: bool) -> None:
    """Into the prediction log: from ``t0`` on, 90 s of live requests to versions 1 and 2 (the
    canary 1.5 times slower), each labelled, or with ``replay`` each validation image sent to both
    by name every 20 s, as the 50% and the 100% stage's gates judge them; their files named as
    written at 92 s (as a writer flushing every 2 s names them: evidence of a look at 100 s)."""
    from model_server.predictionlog import Label

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {}}))
    writer = PredictionLog(tmp_path / "log", Masker(KeyRing(keys), []), replica="pod-a", compression=None)
    scores = np.eye(10, dtype=np.float32)
    for i in range(200):
        v, t = "12"[i % 2], t0 + 1 + 0.45 * i
        if replay:
            image, route, rid = b"image-%d" % (i // 2 % 20), "version", f"replay-{i}"
        else:
            image, route, rid = b"photo-%d" % i, "route", f"live-{i}"
        latency = (5.0 if v == "1" else 7.5) * (1 + (i % 7) / 10)
        writer.append(
            Inference(
                t,
                "digits",
                v,
                "primary",
                route,
                rid,
                "t",
                "s",
                latency,
                "ok",
                scores[[i % 10]],
                np.array([image], dtype=object),
                True,
                {"x-user-id": "+1 555 0100"},
                1,
            )
        )
        if not replay:
            writer.append(Label(t + 0.1, "digits", v, rid, [i % 10 if i % 5 else 0], "acme"))
    before = set((tmp_path / "log").rglob("part-*"))
    writer.flush()
    second = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0 + 92))
    for path in set((tmp_path / "log").rglob("part-*")) - before:
        path.rename(path.with_name(re.sub(r"\d{8}T\d{6}Z", second, path.name)))


def png_title(png: bytes) -> str:
    """A PNG chart's title (its ``Title`` text chunk: ``latency_accuracy_chart``'s)."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).text["Title"]


def in_doubt_each_time(
    api, method: str, path: str, answer: int | None, tries: int, served: bool, first: int | None = 0
) -> None:
    """The next ``tries`` ``method`` requests on ``path`` to the fake API server (``FakeKubeAPI``),
    dry runs (``dryRun``) left out, answered ``answer`` (None: their connection closed), the first
    ``first`` where given (0: ``answer`` too), none served but the last where ``served`` (served
    first, then answered so: the client cannot tell it from the others)."""
    api.throttle, api.throttle_status, api.throttle_served = 0, answer, False
    api.throttled_methods, api.throttled_path = frozenset({method}), path
    seen = [0]

    def count() -> None:  # (run as each write arrives, before it is served: ``before_write``)
        record = api.requests[-1]
        doubted = record["method"] == method and record["path"].endswith(path) and "dryRun" not in record["query"]
        seen[0] += doubted
        api.throttle, api.throttle_served = int(doubted), served and seen[0] == tries
        api.throttle_status = first if seen[0] == 1 and first != 0 else answer
        if seen[0] < tries:
            api.before_write = count

    api.before_write = count
