"""The shadow log: masked rows, hour partitions, complete-or-absent files, the reader."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_server import shadowlog
from model_server.masking import DETECTORS, KeyRing, Masker, find_sensitive
from model_server.protocol import InferInput
from model_server.shadow import ShadowJob, ShadowResult
from model_server.shadowlog import ShadowLogWriter, read_shadow_log
from model_server.trace import TraceContext
from tests.model_server.test_masking import sensitive_values
from tests.model_server.test_routing import TOKEN, infer, put_policy

NOW = datetime.now(UTC)


def result(
    metadata: dict[str, str], when: float | None = None, request_id: str = "r-1", error: str | None = None
):
    images = np.array([b"\x89PNG-a", b"\x89PNG-b"], dtype=object)
    probs = np.eye(10, dtype=np.float32)[[3, 7]]
    job = ShadowJob(
        model="digits",
        primary_version="1",
        shadow_version="2",
        inputs=[InferInput("image", "BYTES", (2,), images)],
        outputs=["probabilities"],
        request_id=request_id,
        # Fixed ids (the W3C example): random hex can hold a run of digits that reads as a phone or
        # card number to the detectors the property test runs over every byte of the file.
        trace=TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        received_at=when or time.time(),
        primary_outputs={"probabilities": probs},
        primary_latency_ms=1.5,
        metadata=metadata,
    )
    shadow = None if error else {"probabilities": np.eye(10, dtype=np.float32)[[3, 2]]}
    return ShadowResult(job, shadow, 4.0, error)


def writer(tmp_path, compression=None, keys=None) -> ShadowLogWriter:
    path = keys or tmp_path / "keys.json"
    if keys is None:
        path.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    return ShadowLogWriter(tmp_path / "log", Masker(KeyRing(path), ["x-user-id"]), compression=compression)


def test_one_row_per_image_with_both_answers(tmp_path):
    w = writer(tmp_path)
    w(result({"x-user-id": "alice", "x-tenant": "acme", "x-device-type": "ios"}))
    assert w.flush() == 2
    df = read_shadow_log(tmp_path / "log", NOW - timedelta(minutes=5), NOW + timedelta(minutes=5))
    assert list(df["item"]) == [0, 1]
    assert list(df["primary_top1"]) == [3, 7]
    assert list(df["shadow_top1"]) == [3, 2]
    assert df["image_sha256"][0] == hashlib.sha256(b"\x89PNG-a").hexdigest()
    assert df["user_id"][0].startswith("tok_")  # a configured header: masked whole
    assert df["device_type"][0] == "ios"
    assert df["tenant"][0] == "acme"


def test_shadow_errors_are_rows_with_the_error(tmp_path):
    w = writer(tmp_path)
    w(result({}, error="model 'digits' version 2 failed: injected fault (abort)"))
    w.flush()
    df = read_shadow_log(tmp_path / "log", NOW - timedelta(minutes=5), NOW + timedelta(minutes=5))
    assert df["shadow_top1"].isna().all()
    assert df["shadow_error"][0].endswith("injected fault (abort)")


def test_rows_land_in_their_hour_and_the_reader_selects_a_range(tmp_path):
    w = writer(tmp_path)
    base = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    for hours in (0, 1, 2):
        w(result({}, when=(base + timedelta(hours=hours)).timestamp(), request_id=f"r{hours}"))
    w.flush()
    folders = sorted(
        p.relative_to(tmp_path / "log").parent.as_posix() for p in (tmp_path / "log").rglob("*.parquet")
    )
    assert folders == ["dt=2026-11-25/hour=10", "dt=2026-11-25/hour=11", "dt=2026-11-25/hour=12"]
    df = read_shadow_log(
        tmp_path / "log", base + timedelta(minutes=30), base + timedelta(hours=1, minutes=31)
    )
    assert sorted(set(df["request_id"])) == ["r1"]
    assert read_shadow_log(tmp_path / "log", base - timedelta(hours=5), base - timedelta(hours=4)).empty


def test_a_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w(result({}))

    def crash(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk pulled")

    monkeypatch.setattr(shadowlog.pq, "write_table", crash)
    assert w.flush() == 0
    leftovers = [p for p in (tmp_path / "log").rglob("*") if p.is_file()]
    assert leftovers == []


def test_a_tenant_without_a_usable_key_is_dropped_not_written_in_plaintext(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {"acme": "bad"}})
    )
    w = writer(tmp_path, keys=keys)
    before = shadowlog.RECORDS.labels("mask_unavailable")._value.get()
    w(result({"x-tenant": "acme", "x-meta-phone": "13800138000"}, request_id="acme-1"))
    w(result({"x-tenant": "globex", "x-meta-phone": "13800138000"}, request_id="globex-1"))
    w.flush()
    df = read_shadow_log(tmp_path / "log", NOW - timedelta(minutes=5), NOW + timedelta(minutes=5))
    assert set(df["request_id"]) == {"globex-1"}
    assert shadowlog.RECORDS.labels("mask_unavailable")._value.get() == before + 1
    for f in (tmp_path / "log").rglob("*.parquet"):
        assert b"13800138000" not in f.read_bytes()


metadata_values = st.lists(
    st.tuples(
        st.sampled_from(["x-meta-note", "x-meta-contact", "x-device-type", "x-tenant"]),
        st.tuples(st.text("abc -:", max_size=6), sensitive_values),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata_values)
def test_property_no_detector_match_in_any_byte_of_any_file(tmp_path, entries):
    w = writer(tmp_path)  # uncompressed: a plaintext value would be visible as bytes
    metadata = {name: f"{pre} {value}" for name, (pre, value) in entries}
    w(result(metadata, request_id=entries[0][1][1]))  # even the request id carries one
    assert w.flush() == 2
    for f in (tmp_path / "log").rglob("*.parquet"):
        data = f.read_bytes().decode("latin-1")
        for _, value in entries:
            assert value[1] not in data
        for name, pattern in DETECTORS:
            assert pattern.search(data) is None, name
        df = pq.read_table(f).to_pandas()
        for column in ("request_id", "user_id", "device_type", "tenant", "meta"):
            for cell in df[column].dropna():
                assert find_sensitive(cell) == []
    for f in (tmp_path / "log").rglob("*.parquet"):
        f.unlink()


@pytest.mark.integration
def test_server_logs_masked_records_with_the_trace_of_the_primary(
    server_factory, repo_copy, tmp_path, digit_images
):
    log_dir = tmp_path / "shadow"
    s = server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--shadow-log",
        str(log_dir),
        "--shadow-log-flush-s",
        "0.2",
        "--mask-header",
        "x-user-id",
        "--access-log",
        token=TOKEN,
    )
    keys = tmp_path / "shadow.mask-keys.json"
    assert oct(keys.stat().st_mode & 0o777) == "0o600"  # created on first start
    s.load_versions("digits", 1, 2)
    assert (
        put_policy(
            s, {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
        ).status_code
        == 200
    )
    sent = {}
    for i in range(10):
        image = digit_images[i][0]
        r = infer(
            s,
            image,
            {
                "X-User-ID": f"user-{i}",
                "X-Tenant": "acme",
                "X-Device-Type": "android",
                "X-Meta-Contact": "li.wei@example.com, 13800138000",
            },
        )
        sent[r.headers["X-Request-ID"]] = (
            r.headers["traceparent"].split("-")[1],
            hashlib.sha256(image).hexdigest(),
        )
    deadline = time.monotonic() + 20
    df = read_shadow_log(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    while len(df) < 10 and time.monotonic() < deadline:
        time.sleep(0.2)
        df = read_shadow_log(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert len(df) == 10
    for row in df.itertuples():
        trace_id, sha = sent[row.request_id]
        assert row.trace_id == trace_id  # the same trace on the primary response and the shadow record
        assert row.image_sha256 == sha
        assert row.user_id.startswith("tok_")
        assert "example.com" not in row.meta
        assert "13800138000" not in row.meta
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=20)
    access = [
        json.loads(line.split("model_server.access: ", 1)[1])
        for line in s.log.read_text().splitlines()
        if "model_server.access: " in line
    ]
    for rid, (trace_id, sha) in sent.items():
        paths = {a["path"]: a for a in access if a["request_id"] == rid}
        assert set(paths) == {"primary", "shadow"}
        assert {a["trace_id"] for a in paths.values()} == {trace_id}
        assert all(a["image_sha256"] == [sha] for a in paths.values())
    for f in log_dir.rglob("*"):
        if f.is_file():
            assert b"13800138000" not in f.read_bytes()
            assert b"li.wei" not in f.read_bytes()


@pytest.mark.integration
def test_killed_server_leaves_only_complete_files(server_factory, repo_copy, tmp_path, digit_images):
    log_dir = tmp_path / "shadow"
    s = server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--shadow-log",
        str(log_dir),
        "--shadow-log-flush-s",
        "0.01",
        token=TOKEN,
    )
    s.load_versions("digits", 1, 2)
    assert (
        put_policy(
            s, {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
        ).status_code
        == 200
    )
    for i in range(150):
        infer(s, digit_images[i % 50][0])
    s.proc.send_signal(signal.SIGKILL)  # no clean shutdown: whatever was mid-write stays mid-write
    s.proc.wait(timeout=10)
    files = list(log_dir.rglob("part-*.parquet"))
    assert files
    for f in files:
        assert pq.read_table(f).num_rows > 0  # every visible file is complete
    df = read_shadow_log(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert 0 < len(df) <= 150
