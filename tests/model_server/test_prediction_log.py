"""The prediction log: records, masking, layout, complete-or-absent files, the reader and the joins,
on a local folder and on an S3 API served on loopback; real servers sharing one log."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from devstack.processes import S3_BUCKET as BUCKET
from model_server import predictionlog
from model_server.app import is_shadow_host
from model_server.feedback import FeedbackSigner, read_key
from model_server.files import filesystem
from model_server.masking import DETECTORS, KeyRing, Masker, create_key_file, find_sensitive, reveal
from model_server.predictionlog import (
    GATE_COLUMNS,
    PAIR_COLUMNS,
    SCHEMA,
    Inference,
    Label,
    PredictionLog,
    copy_of,
    joined,
    key_codes,
    read,
    shadow_pairs,
    unmatched_labels,
)
from tests.support import TOKEN, DataReads, infer, put_policy, sensitive_values, settled
from vision_rollout.audit import audit

NOW = datetime.now(UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"  # the W3C example: no digit run a detector could read
IMAGES = np.array([b"\x89PNG-a", b"\x89PNG-b"], dtype=object)
MIRROR_ALL = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}


def window(minutes: float = 10) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(minutes=minutes), now + timedelta(minutes=minutes)


def keys_file(tmp_path, tenants: dict[str, str] | None = None):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": tenants or {}}))
    return path


def records(outcome: str) -> float:
    """prediction_log_records_total of one outcome, as /metrics shows it (0 before the first)."""
    return REGISTRY.get_sample_value("prediction_log_records_total", {"outcome": outcome}) or 0.0


def writer(tmp_path, uri=None, keys=None, **kw) -> PredictionLog:
    masker = Masker(KeyRing(keys or keys_file(tmp_path)), ["x-user-id"])
    return PredictionLog(uri or tmp_path / "log", masker, replica="test-1", compression=None, **kw)


def primary(
    rid: str = "r-1",
    metadata: dict[str, str] | None = None,
    when: float | None = None,
    scores=None,
    version: str = "1",
    model: str = "digits",
    outcome: str = "ok",
    role: str = "primary",
    route: str = "route",
) -> Inference:
    if scores is None and outcome == "ok":
        scores = np.eye(10, dtype=np.float32)[[3, 7]]
    return Inference(
        when or time.time(),
        model,
        version,
        role,
        route,
        rid,
        TRACE,
        "00f067aa0ba902b7",
        1.5,
        outcome,
        scores,
        IMAGES,
        True,
        metadata or {},
        2,
    )


def shadow(rid: str = "r-1", scores=None, outcome: str = "ok", when: float | None = None) -> Inference:
    if scores is None and outcome == "ok":
        scores = np.eye(10, dtype=np.float32)[[3, 2]]
    rec = primary(rid, {"x-user-id": "alice"}, when, scores, "2", outcome=outcome, role="shadow", route="mirror")
    return rec._replace(latency_ms=None if outcome == "DROPPED" else 4.0, span_id="b7ad6b7169203331")


@pytest.fixture(params=["folder", "s3"])
def log_uri(request, tmp_path):
    """The same tests on a local folder and on S3 (moto on loopback, pyarrow's S3 client)."""
    if request.param == "folder":
        return str(tmp_path / "log")
    return request.getfixturevalue("s3").uri()


def put_file(uri: str, relative: str, data: bytes) -> None:
    fs, root = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(f"{root}/{relative.rsplit('/', 1)[0]}")
    with fs.open_output_stream(f"{root}/{relative}") as f:
        f.write(data)


def files(uri: str) -> list[str]:
    fs, root = filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1 :] for i in found if i.type == pafs.FileType.File)


# -- the writer and the reader --------------------------------------------------------------------


def test_one_row_per_item_with_top_k_probabilities_and_masked_metadata(log_uri, tmp_path):
    w = writer(tmp_path, log_uri)
    w.append(primary(metadata={"x-user-id": "alice", "x-tenant": "acme", "x-device-type": "ios"}))
    w.append(shadow())
    assert w.flush() == 4
    df = read(log_uri, *window())
    p = df[df["role"] == "primary"].sort_values("item")
    assert list(p["item"]) == [0, 1]
    assert list(p["top1"]) == [3, 7]
    assert list(p["top1_prob"]) == [1.0, 1.0]
    assert list(p["topk_index"].iloc[0][:1]) == [3]
    assert len(p["topk_index"].iloc[0]) == 5
    assert len(p["probs"].iloc[0]) == 10  # 10 classes: at most --prediction-log-full-max, kept whole
    assert p["image_sha256"].iloc[0] == hashlib.sha256(b"\x89PNG-a").hexdigest()
    assert p["user_id"].iloc[0].startswith("tok_")  # a configured header: masked whole
    assert p["device_type"].iloc[0] == "ios"
    assert p["tenant"].iloc[0] == "acme"
    assert set(p["replica"]) == {"test-1"}
    assert set(p["route"]) == {"route"}
    s = df[df["role"] == "shadow"]
    assert set(s["route"]) == {"mirror"}
    assert list(s.sort_values("item")["top1"]) == [3, 2]
    assert list(df.columns) == SCHEMA.names


def test_many_classes_keep_the_top_k_and_logits_become_probabilities(tmp_path):
    w = writer(tmp_path, topk=3, full_max=32)
    logits = np.linspace(-5, 5, 1000, dtype=np.float32)[None]  # one item, 1000 classes, raw logits
    w.append(primary("big", scores=logits, model="resnet_bench"))
    w.append(shadow("big", scores=logits[:, ::-1].copy())._replace(model="resnet_bench"))
    w.flush()
    df = read(tmp_path / "log", *window(), model="resnet_bench")
    p = df[df["role"] == "primary"].iloc[0]
    assert p["probs"] is pd.NA  # over 32 classes: only the top-k (list columns are Arrow-backed)
    assert list(p["topk_index"]) == [999, 998, 997]
    expected = np.exp(5.0) / np.exp(np.linspace(-5, 5, 1000)).sum()
    assert p["top1_prob"] == pytest.approx(expected, rel=1e-4)  # softmax of the logits
    pairs = shadow_pairs(df)
    assert len(pairs) == 1
    rebuilt = pairs["primary_probs"].iloc[0]
    assert rebuilt.shape == (1000,)
    assert rebuilt[999] == pytest.approx(expected, rel=1e-4)
    assert rebuilt.sum() == pytest.approx(1.0, abs=1e-4)  # the rest of the mass spread evenly
    assert pairs["shadow_top1"].iloc[0] == 0


def test_failed_and_dropped_shadow_copies_are_records(tmp_path):
    w = writer(tmp_path)
    w.append(primary("ok-1"))
    w.append(shadow("ok-1"))
    w.append(primary("fault-1"))
    w.append(shadow("fault-1", outcome="FAULT"))
    w.append(primary("dropped-1"))
    w.append(shadow("dropped-1", outcome="DROPPED"))
    w.append(shadow("orphan-1"))  # its primary never reached the log
    w.flush()
    df = read(tmp_path / "log", *window())
    failed = df[(df["role"] == "shadow") & (df["outcome"] == "FAULT")]
    assert failed["top1"].isna().all()
    assert len(failed) == 2
    pairs = shadow_pairs(df)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert sorted(set(pairs["request_id"])) == ["fault-1", "ok-1"]
    errors = pairs[pairs["shadow_error"].notna()]
    assert set(errors["shadow_error"]) == {"FAULT"}
    assert errors["shadow_probs"].isna().all()
    assert pairs.attrs["shadow_dropped"] == 2  # two items
    assert pairs.attrs["shadow_without_primary"] == 2
    assert pairs.attrs["primary_without_shadow"] == 2  # dropped-1's items have no answer to pair


def test_a_shadow_record_of_another_input_is_no_copy_and_never_displaces_the_copy(tmp_path):
    """Anyone who reaches the data port can send a -shadow Host under a served request id: a
    record of another input is not paired, is counted, and the real copy after it still pairs."""
    w = writer(tmp_path)
    t = time.time()
    other = np.array([b"\x89PNG-x", b"\x89PNG-y"], dtype=object)
    forged = shadow(scores=np.eye(10, dtype=np.float32)[[9, 9]])._replace(data=other)
    w.append(primary("copied", when=t))
    w.append(shadow("copied", when=t + 0.1))
    w.append(primary("forged-first", when=t))
    w.append(forged._replace(request_id="forged-first", received_at=t + 0.1))  # before the copy
    w.append(shadow("forged-first", when=t + 0.2))
    w.append(primary("forged-only", when=t))
    w.append(forged._replace(request_id="forged-only", received_at=t + 0.1))
    w.append(primary("twice", when=t))
    w.append(shadow("twice", when=t + 0.1))
    w.append(shadow("twice", when=t + 0.2))
    w.flush()
    pairs = shadow_pairs(read(tmp_path / "log", *window()))
    assert sorted(set(pairs["request_id"])) == ["copied", "forged-first", "twice"]
    answers = sorted(zip(pairs["item"], pairs["shadow_top1"], strict=True))
    assert answers == [(0, 3)] * 3 + [(1, 2)] * 3  # each pair the copy's answer, none the forged 9s
    assert pairs.attrs["input_mismatch"] == 4  # two records of two items
    assert pairs.attrs["duplicates"] == 2  # twice's second copy only: a forged record is not one
    assert pairs.attrs["primary_without_shadow"] == 2  # forged-only's items: no copy reached the log
    assert pairs.attrs["shadow_without_primary"] == 0


def test_a_copy_of_a_request_its_own_version_served_is_no_comparison(tmp_path):
    """Istio mirrors every request of the weighted route, those it sends to the candidate too:
    such a copy agrees with its primary by construction. It is never paired; its items are
    counted once as self pairs (ran or dropped), its repeats as duplicates, and the candidate's
    own primaries are not primaries without a shadow."""
    w = writer(tmp_path)
    t = time.time()
    for i in range(6):  # the baseline's, mirrored: item 0 agrees (3, 3), item 1 does not (7, 2)
        w.append(primary(f"b-{i}", when=t))
        w.append(shadow(f"b-{i}", when=t + 0.1))
    w.append(primary("b-lost", when=t))  # its copy never reached the log
    for rid in ("c-0", "c-1", "c-2", "c-twice", "c-dropped", "c-forged", "c-sampled-out"):
        own = primary(rid, when=t, version="2")
        w.append(own)
        copy = own._replace(role="shadow", route="mirror", latency_ms=4.0, received_at=t + 0.1)
        if rid == "c-twice":
            w.append(copy)
            w.append(copy._replace(received_at=t + 0.2))
        elif rid == "c-dropped":
            w.append(shadow(rid, when=t + 0.1, outcome="DROPPED"))
        elif rid == "c-forged":  # another input under its id: no copy at all
            w.append(copy._replace(data=np.array([b"\x89PNG-x", b"\x89PNG-y"], dtype=object)))
        elif rid != "c-sampled-out":
            w.append(copy)
    w.flush()
    pairs = shadow_pairs(read(tmp_path / "log", *window()))
    assert sorted(set(pairs["request_id"])) == [f"b-{i}" for i in range(6)]
    assert set(pairs["primary_version"]) == {"1"}
    assert (pairs["primary_top1"] == pairs["shadow_top1"]).mean() == 0.5  # the true agreement
    assert pairs.attrs["self_pairs"] == 10  # c-0, c-1, c-2, c-twice, c-dropped: two items each
    assert pairs.attrs["duplicates"] == 2  # c-twice's second copy
    assert pairs.attrs["shadow_dropped"] == 0  # c-dropped's copy was no comparison to lose
    assert pairs.attrs["input_mismatch"] == 2
    assert pairs.attrs["primary_without_shadow"] == 2  # b-lost's items; no candidate-served one
    assert pairs.attrs["shadow_without_primary"] == 0


def test_a_version_both_mirrored_to_itself_and_mirrored_from_counts_only_its_lost_copies(tmp_path):
    """Version 2 both serves as a candidate (mirrored to itself) and, later in the range, as the
    baseline of version 3's mirror: its primaries with a self copy are not without a shadow."""
    w = writer(tmp_path)
    t = time.time()
    own = primary("self", when=t, version="2")
    w.append(own)
    w.append(own._replace(role="shadow", route="mirror", latency_ms=4.0, received_at=t + 0.1))
    w.append(primary("to-3", when=t + 1, version="2"))
    w.append(shadow("to-3", when=t + 1.1)._replace(version="3"))
    w.append(primary("lost", when=t + 1, version="2"))  # v3's copy of it never reached the log
    w.flush()
    pairs = shadow_pairs(read(tmp_path / "log", *window()))
    assert set(pairs["request_id"]) == {"to-3"}
    assert (pairs.attrs["self_pairs"], pairs.attrs["primary_without_shadow"]) == (2, 2)


def test_records_without_an_input_digest_pair_by_key_and_a_matching_copy_goes_first(tmp_path):
    w = writer(tmp_path)
    t = time.time()
    w.append(primary("no-digest-shadow", when=t))
    w.append(shadow("no-digest-shadow", when=t + 0.1)._replace(data=None))
    w.append(primary("no-digest-primary", when=t)._replace(data=None))
    w.append(shadow("no-digest-primary", when=t + 0.1))
    w.append(primary("both", when=t))
    w.append(shadow("both", when=t + 0.1, scores=np.eye(10, dtype=np.float32)[[9, 9]])._replace(data=None))
    w.append(shadow("both", when=t + 0.2))  # its digest equals the primary's: paired before the unchecked one
    w.flush()
    df = read(tmp_path / "log", *window())
    assert df["image_sha256"].isna().sum() == 6  # three records of two items
    pairs = shadow_pairs(df)
    assert sorted(set(pairs["request_id"])) == ["both", "no-digest-primary", "no-digest-shadow"]
    both = pairs[pairs["request_id"] == "both"].sort_values("item")
    assert list(both["shadow_top1"]) == [3, 2]  # the matching copy's answer, not the 9s
    assert pairs.attrs["input_mismatch"] == 0
    assert pairs.attrs["duplicates"] == 2  # both's unchecked record


def test_behind_istio_each_copy_is_its_own_attempts_whichever_attempts_the_mirror_sampled(tmp_path):
    """Istio's copies are stamped by the candidate's pod (0.4 s after their primary here), as no
    primary. ``sent``: one id sent three times, 5 s apart, the mirror sampling the second alone
    (its copy answering 9s); ``retried``: an id whose first attempt failed (FAULT) on the primary
    and on its copy, sent again 5 s later, both the retry and its copy answering. Each copy was
    paired with the id's earliest primary: the sampled copy with the first request (another
    request's answer), and the retry's with the failed attempt, its pair no comparison, the
    retry's copy a duplicate. Each copy is its own attempt's, the primary of its input nearest
    in time, one copy a primary (a k-th copy is not the k-th request's: the mirror samples)."""
    w = writer(tmp_path)
    t = time.time() - 60
    for k in range(3):
        w.append(primary("sent", when=t + 5 * k))
    w.append(shadow("sent", when=t + 5.4, scores=np.eye(10, dtype=np.float32)[[9, 9]]))
    w.append(primary("retried", when=t, outcome="FAULT"))
    w.append(shadow("retried", when=t + 0.4, outcome="FAULT"))
    w.append(primary("retried", when=t + 5))
    w.append(shadow("retried", when=t + 5.4))
    w.flush()
    df = read(tmp_path / "log", *window())
    pairs = shadow_pairs(df)
    at = pd.Timestamp(t + 5, unit="s", tz="UTC").floor("us")
    assert len(pairs) == 4
    assert (pairs["time"].dt.floor("ms") == at.floor("ms")).all()
    assert list(pairs.sort_values(["request_id", "item"])["shadow_top1"]) == [3, 2, 9, 9]
    assert pairs["shadow_error"].isna().all()
    # (the retried id's failed attempt, its pair no comparison; the sent id's other two requests)
    assert (pairs.attrs["primary_failed"], pairs.attrs["duplicates"], pairs.attrs["input_mismatch"]) == (2, 4, 0)
    first, of, paired = copy_of(df)
    copies = (df["role"] == "shadow").to_numpy()
    stamps = df["time"].to_numpy()
    assert (np.abs(stamps[of[copies]] - stamps[copies]) < np.timedelta64(500, "ms")).all()
    assert paired[copies].all()
    assert (df["outcome"][first] == "ok").all()
    assert first.sum() == 4


def test_records_land_in_their_model_and_hour_and_only_those_folders_are_read(tmp_path):
    w = writer(tmp_path)
    base = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    for hours in (0, 1, 2):
        w.append(primary(f"r{hours}", when=(base + timedelta(hours=hours)).timestamp()))
    w.append(primary("other", when=base.timestamp(), model="resnet_bench", scores=np.eye(4)[[1]]))
    w.flush()
    folders = sorted({f.rsplit("/", 1)[0] for f in files(str(tmp_path / "log"))})
    assert folders == [
        "model=digits/dt=2026-11-25/hour=10",
        "model=digits/dt=2026-11-25/hour=11",
        "model=digits/dt=2026-11-25/hour=12",
        "model=resnet_bench/dt=2026-11-25/hour=10",
    ]
    name = files(str(tmp_path / "log"))[0].rsplit("/", 1)[1]
    assert name.startswith("part-test-1-")
    assert name.endswith(".parquet")
    # Garbage outside the range proves the reader never opens folders out of range.
    put_file(str(tmp_path / "log"), "model=digits/dt=2026-11-25/hour=09/part-x-1-garbage.parquet", b"junk")
    df = read(tmp_path / "log", base + timedelta(minutes=30), base + timedelta(hours=1, minutes=31))
    assert sorted(set(df["request_id"])) == ["r1"]
    assert df.attrs["skipped_files"] == 0
    assert read(tmp_path / "log", base - timedelta(hours=5), base - timedelta(hours=4)).empty
    assert set(read(tmp_path / "log", base, base + timedelta(hours=3), model="resnet_bench")["model"]) == {
        "resnet_bench"
    }
    assert read(tmp_path / "log", base, base + timedelta(hours=1)).attrs["skipped_files"] == 0
    assert read(tmp_path / "log", base - timedelta(hours=1), base).attrs["skipped_files"] == 1


@pytest.mark.parametrize("log_uri", ["folder", "s3"], indirect=True)
def test_a_long_range_lists_the_hours_that_exist_not_every_hour_of_it(log_uri, tmp_path, monkeypatch):
    """Ten years are 87,840 hours: a listing each took minutes on a folder and a round trip each
    on a store. Past BLIND_HOURS the reader lists the days, then the hours of the days in range."""
    w = writer(tmp_path, log_uri)
    old, recent = datetime(2019, 3, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    for rid, when in (("old", old), ("recent", recent), ("next-day", recent + timedelta(days=1))):
        w.append(primary(rid, when=when.timestamp()))
    w.flush()
    # Garbage an hour outside each edge of the ranges below: never listed, so never opened.
    for outside in (recent - timedelta(hours=30), recent + timedelta(days=1, hours=1)):
        put_file(log_uri, f"model=digits/dt={outside:%Y-%m-%d}/hour={outside:%H}/part-x-1-garbage.parquet", b"junk")
    listed: list[str] = []
    real_list = predictionlog._list

    def counting(fs, path, recursive=False):
        listed.append(path)
        return real_list(fs, path, recursive)

    monkeypatch.setattr(predictionlog, "_list", counting)
    everything = read(log_uri, datetime(2016, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert sorted(set(everything["request_id"])) == ["next-day", "old", "recent"]
    assert everything.attrs["skipped_files"] == 2  # the garbage, inside this range
    assert len(listed) <= 12, listed[:20]  # the models, the days, each existing day, each existing hour
    listed.clear()
    start = recent - timedelta(hours=29, minutes=30)  # 54 hours: past BLIND_HOURS
    df = read(log_uri, start, start + timedelta(hours=54))
    assert sorted(set(df["request_id"])) == ["next-day", "recent"]
    assert df.attrs["skipped_files"] == 0
    assert len(listed) <= 8, listed[:20]
    import pendulum  # Airflow's dates: one minus another divides by no timedelta

    for since, until in (
        (recent - timedelta(hours=1), recent + timedelta(hours=1)),
        (start, start + timedelta(hours=54)),
    ):
        df = read(log_uri, pendulum.instance(since), pendulum.instance(until))
        assert "recent" in set(df["request_id"])


def test_columns_are_projected_and_time_always_comes_along(tmp_path):
    w = writer(tmp_path)
    w.append(primary())
    w.flush()
    df = read(tmp_path / "log", *window(), columns=["model", "top1"])
    assert list(df.columns) == ["time", "model", "top1"]
    gate = read(tmp_path / "log", *window(), columns=GATE_COLUMNS, roles=["primary"])
    assert list(gate.columns) == GATE_COLUMNS
    assert len(gate) == 2
    # A file whose meta column has the wrong type is read when meta is not asked for, skipped when it is.
    bad = pq.read_table(next((tmp_path / "log").rglob("part-*.parquet")))
    bad = bad.set_column(bad.schema.get_field_index("meta"), "meta", pa.array([1, 2], pa.int64()))
    sink = pa.BufferOutputStream()
    pq.write_table(bad, sink)
    folder = next((tmp_path / "log").rglob("hour=*"))
    (folder / "part-other-1-x.parquet").write_bytes(sink.getvalue().to_pybytes())
    assert len(read(tmp_path / "log", *window(), columns=["top1"])) == 4
    everything = read(tmp_path / "log", *window())
    assert len(everything) == 2
    assert everything.attrs["skipped_files"] == 1
    assert "wrong schema: column meta" in next(iter(everything.attrs["skipped_file_reasons"].values()))
    with pytest.raises(ValueError, match="unknown prediction log column"):
        read(tmp_path / "log", *window(), columns=["nope"])


def test_files_written_before_the_range_are_not_opened(log_uri, tmp_path, monkeypatch):
    """A file's name holds the UTC second it was written (whatever the writer's time zone); every
    record in it was received before then, so a read of a range starting more than a minute after
    that never opens it: a log of hours costs what the range holds, not what its hour folders hold."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")  # the name is UTC all the same
    time.tzset()
    try:
        w = writer(tmp_path, log_uri)
        w.append(primary("now"))
        w.flush()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    (name,) = [f.rsplit("/", 1)[1] for f in files(log_uri)]
    written = datetime.strptime(predictionlog.WRITTEN.search(name).group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    assert abs((written - datetime.now(UTC)).total_seconds()) < 3600  # UTC, not Los Angeles' clock
    folder = files(log_uri)[0].rsplit("/", 1)[0]
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{files(log_uri)[0]}") as f:
        data = f.read()
    # The same records under names no writer would give them: written 10 minutes ago (so, were the
    # store's clock to say so too, never opened by a read from 5 minutes ago on; stored now, it says
    # otherwise: read and refused, its name before its records), and a name without a UTC time
    # (always opened).
    old = f"{written - timedelta(minutes=10):%Y%m%dT%H%M%S}Z"
    put_file(log_uri, f"{folder}/part-x-{old}-0123456789ab.parquet", data)
    put_file(log_uri, f"{folder}/part-x-1-unnamed.parquet", data)
    recent = read(log_uri, datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC) + timedelta(minutes=1))
    assert recent.attrs["files_read"] == 2
    assert len(recent) == 2 * 2  # two items each: the writer's file and the unnamed one
    assert recent.attrs["skipped_files"] == 1
    wide = read(log_uri, datetime.now(UTC) - timedelta(minutes=15), datetime.now(UTC) + timedelta(minutes=1))
    assert wide.attrs["files_read"] == 3


def test_a_file_named_before_the_hour_its_folder_holds_is_refused_and_counted_by_a_read_without_written(tmp_path):
    """A read without ``written`` (the audit's wait for copies, the masking probe's look) pruned
    by its name a file whose written second lies before the hour its folder holds, before every
    record in it (no writer names one so): its records of a range starting later were dropped
    unsaid, no file skipped. As the audit's read (f3461a7), it is listed, and refused where it
    holds records of the range: skipped, named, their count in the reason."""
    w = writer(tmp_path)
    w.append(primary("now"))
    w.flush()
    (path,) = (tmp_path / "log").rglob("part-*.parquet")
    second = datetime.strptime(predictionlog.WRITTEN.search(path.name).group(1), "%Y%m%dT%H%M%S")
    named = re.sub(r"-\d{8}T\d{6}Z-", f"-{second - timedelta(hours=2):%Y%m%dT%H%M%S}Z-", path.name)
    path.rename(path.with_name(named))
    recent = read(tmp_path / "log", datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC) + timedelta(minutes=1))
    assert (len(recent), recent.attrs["skipped_files"], recent.attrs["files_read"]) == (0, 1, 0)
    ((where, why),) = recent.attrs["skipped_file_reasons"].items()
    assert where.endswith(named)
    assert "lies before its records" in why
    assert "its 2 records of this range" in why


@pytest.mark.parametrize("written", [False, True])
def test_a_file_named_in_its_folder_s_hour_before_the_range_but_stored_in_it_is_read_and_refused(tmp_path, written):
    """A file whose name places it inside the hour its folder holds, but before a read's range
    (the audit's, from a minute before its hour, lists the hour before's folder), was pruned by
    that name alone: its records of the range were dropped without a word, no file skipped, the
    audit none the wiser (its name, anyone's to choose, hid them). Where the store says the file
    was written within the range (its listing's time, not before the range as its name says), the
    two disagree: it is read, and refused where its name lies before its records of the range,
    skipped and named, as one named before its folder's hour is. One the store dates before the
    range too is still never opened (a garbage file: opened, it would be skipped as unreadable;
    on a disk the store's time is the later of its mtime and ctime, and no one sets ctime back:
    it is stored now, in the folder of an hour to come)."""
    hour = datetime(2026, 1, 1, 5, tzinfo=UTC)
    w = writer(tmp_path)
    w.append(primary("late", when=(hour + timedelta(minutes=40)).timestamp()))
    w.flush()
    (path,) = (tmp_path / "log").rglob("part-*.parquet")
    assert path.parent.name == "hour=05"
    named = re.sub(r"-\d{8}T\d{6}Z-", f"-{hour + timedelta(minutes=10):%Y%m%dT%H%M%S}Z-", path.name)
    path.rename(path.with_name(named))  # (stored now: after the range, by the store's clock)
    df = read(tmp_path / "log", hour + timedelta(minutes=30), hour + timedelta(hours=1), written=written)
    assert len(df) == 0
    ((where, why),) = df.attrs["skipped_file_reasons"].items()
    assert where.endswith(named)
    assert "lies before its records" in why
    assert "its 2 records of this range" in why
    coming = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    folder = path.parent.parent.parent / f"dt={coming:%Y-%m-%d}" / f"hour={coming:%H}"
    folder.mkdir(parents=True)
    old = coming + timedelta(minutes=5)
    garbage = folder / f"part-x-{old:%Y%m%dT%H%M%S}Z-0123456789ab.parquet"
    garbage.write_bytes(b"PAR1 not parquet, and never opened")  # (stored now: before the range)
    later = read(tmp_path / "log", coming + timedelta(minutes=30), coming + timedelta(hours=1), written=written)
    assert len(later) == 0
    assert later.attrs["files_read"] == 0
    assert later.attrs["skipped_files"] == 0


@pytest.mark.parametrize("written", [False, True])
def test_a_file_whose_kept_mtime_dates_it_before_the_range_is_read_and_refused_all_the_same(tmp_path, written):
    """A file named in its folder's hour before a read's range, its mtime before the range too, was
    never opened, its records of the range dropped without a word: cp -p, rsync -a and mv from a
    spool keep a file's old mtime, and anyone may set it back. Its ctime, which no one in user
    space sets back, dates it now: read, and refused where its name lies before its records."""
    hour = datetime(2026, 1, 1, 5, tzinfo=UTC)
    w = writer(tmp_path)
    w.append(primary("late", when=(hour + timedelta(minutes=40)).timestamp()))
    w.flush()
    (path,) = (tmp_path / "log").rglob("part-*.parquet")
    named = path.with_name(re.sub(r"-\d{8}T\d{6}Z-", f"-{hour + timedelta(minutes=10):%Y%m%dT%H%M%S}Z-", path.name))
    path.rename(named)
    kept = (hour + timedelta(minutes=10)).timestamp()
    os.utime(named, (kept, kept))  # (as cp -p would keep it from a spool)
    df = read(tmp_path / "log", hour + timedelta(minutes=30), hour + timedelta(hours=1), written=written)
    assert len(df) == 0
    ((where, why),) = df.attrs["skipped_file_reasons"].items()
    assert where.endswith(named.name)
    assert "lies before its records" in why
    assert "its 2 records of this range" in why


def test_a_name_the_listing_leaves_out_by_itself_gets_no_stat(tmp_path, monkeypatch):
    """On a disk a name in its folder's hour before a read's range is asked its stored time (a
    stat), as it may hide records of the range; but one the read leaves out by its name anyway
    (the audit's read of the hours before, with ``written_after``: only files named after it) was
    asked first, a stat for each such name for nothing. The names decide first; the names of the
    same window a read takes by its stored time are each still asked once."""
    hour = datetime(2026, 1, 1, 5, tzinfo=UTC)
    folder = tmp_path / "log" / "model=m" / "dt=2026-01-01" / "hour=05"
    folder.mkdir(parents=True)
    names = {f"part-x-{hour + timedelta(minutes=10, seconds=k):%Y%m%dT%H%M%S}Z-{k:012x}.parquet" for k in range(20)}
    for name in names:
        (folder / name).write_bytes(b"PAR1 not parquet")  # (stored now: after the range, opened when listed)
    asked: list[str] = []
    scandir = os.scandir

    class Counted:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.entry, self.name, self.path = entry, entry.name, entry.path

        def is_file(self, **kw) -> bool:
            return self.entry.is_file(**kw)

        def stat(self, **kw) -> os.stat_result:
            asked.append(self.name)
            return self.entry.stat(**kw)

    @contextlib.contextmanager
    def counted(path):
        with scandir(path) as entries:
            yield (Counted(e) for e in entries)

    monkeypatch.setattr(predictionlog.os, "scandir", counted)
    start, end = hour + timedelta(minutes=30), hour + timedelta(hours=1)
    _, paths, _ = predictionlog.read_files(
        tmp_path / "log", start, end, "m", written=True, written_after=hour + timedelta(hours=2)
    )
    assert (paths, asked) == ([], [])
    _, paths, results = predictionlog.read_files(tmp_path / "log", start, end, "m", written=True)
    assert {p.rsplit("/", 1)[1] for p in paths} == names
    assert set(asked) == names  # (a DirEntry keeps its stat: the stored time's and the size's are one)
    assert all(r.table is None for r in results)


def test_row_groups_whose_time_statistics_hold_no_record_of_the_range_are_not_read(tmp_path, monkeypatch):
    """A read opened every file of its hour folders with all its columns, the probability
    vectors too, to keep the records of its range: a range ending a minute into an hour read
    that hour's files whole. A row group whose ``time`` statistics (read from the footer by the
    project's own parser) show no record of the range is not read, nor a file of such groups
    alone; without statistics it is read, and a damaged footer is still skipped and named."""
    uri = str(tmp_path / "log")
    w = writer(tmp_path, uri)
    w.append(primary("now"))
    w.flush()
    (good,) = files(uri)
    folder = good.rsplit("/", 1)[0]
    now = pq.read_table(f"{uri}/{good}")
    then = now.set_column(0, "time", pc.subtract(now["time"], pa.scalar(timedelta(hours=2))))
    then = then.set_column(6, "request_id", pa.array(["then"] * then.num_rows))

    def parquet(table: pa.Table, **kw) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=now.num_rows, **kw)
        return sink.getvalue().to_pybytes()

    both = parquet(pa.concat_tables([then, now]))
    put_file(uri, f"{folder}/part-x-1-both.parquet", both)  # (no write second in the name: always opened)
    put_file(uri, f"{folder}/part-x-1-unstated.parquet", parquet(pa.concat_tables([then, now]), write_statistics=False))
    put_file(uri, f"{folder}/part-x-1-then.parquet", parquet(then))
    put_file(uri, f"{folder}/part-x-1-damaged.parquet", both[:-20] + both[-8:])
    reads = DataReads()
    monkeypatch.setattr(predictionlog, "filesystem", reads.filesystem)
    df = read(uri, *window())
    assert sorted(df["request_id"]) == ["now"] * 6  # the writer's file's, both's and unstated's
    assert df.attrs["files_read"] == 4
    assert [p.rsplit("/", 1)[1] for p in df.attrs["skipped_file_reasons"]] == ["part-x-1-damaged.parquet"]
    by_name = {p.rsplit("/", 1)[1]: r for p, r in reads.reads.items()}
    assert set(by_name) == {good.rsplit("/", 1)[1], "part-x-1-both.parquet", "part-x-1-unstated.parquet"}
    first = pq.ParquetFile(pa.BufferReader(both)).metadata.row_group(0)
    chunks = [first.column(j) for j in range(first.num_columns)]
    group = (
        min(c.dictionary_page_offset or c.data_page_offset for c in chunks),
        max((c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size for c in chunks),
    )
    assert not [r for r in by_name["part-x-1-both.parquet"] if r[0] < group[1] and r[1] > group[0]]
    assert [r for r in by_name["part-x-1-unstated.parquet"] if r[0] < group[1] and r[1] > group[0]]
    since, until = window()
    wide = read(uri, since - timedelta(hours=2), until)
    assert sorted(wide["request_id"]) == ["now"] * 6 + ["then"] * 6  # (then's: both's, unstated's, then's)


def test_naive_datetimes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="timezone-aware"):
        read(tmp_path, datetime(2026, 1, 1), datetime(2026, 1, 2))


def test_truncated_garbage_and_malformed_records_are_skipped_and_counted(log_uri, tmp_path, caplog):
    w = writer(tmp_path, log_uri)
    w.append(primary("good"))
    w.flush()
    good = files(log_uri)[0]
    folder = good.rsplit("/", 1)[0]
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{good}") as f:
        data = f.read()
    put_file(log_uri, f"{folder}/part-x-1-truncated.parquet", data[: len(data) // 2])
    put_file(log_uri, f"{folder}/part-x-1-garbage.parquet", b"PAR1 this is not parquet")
    put_file(log_uri, f"{folder}/.part-x-1-temp.parquet.tmp", b"half written")  # hidden: never read
    malformed = pq.read_table(pa.BufferReader(data)).to_pylist()
    malformed[0]["role"] = "weird"
    malformed[1]["request_id"] = None
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(malformed, schema=SCHEMA), sink)
    put_file(log_uri, f"{folder}/part-x-1-malformed.parquet", sink.getvalue().to_pybytes())
    df = read(log_uri, *window())
    assert set(df["request_id"]) == {"good"}
    assert len(df) == 2
    assert df.attrs["skipped_files"] == 2
    assert df.attrs["skipped_records"] == 2
    assert df.attrs["files_read"] == 2
    reasons = df.attrs["skipped_file_reasons"]
    assert sorted(p.rsplit("/", 1)[1] for p in reasons) == [
        "part-x-1-garbage.parquet",
        "part-x-1-truncated.parquet",
    ]
    assert all(r.startswith("unreadable") for r in reasons.values())
    assert "part-x-1-truncated.parquet skipped" in caplog.text


def test_a_file_without_a_string_column_or_with_a_damaged_name_is_skipped_not_a_crash(log_uri, tmp_path):
    """A file of another writer's schema (an older server's, without ``route`` or ``meta``) and
    a file whose footer names a column in bytes that are no UTF-8 are skipped and named: either
    raised out of read (KeyError, UnicodeDecodeError), every gate's poke and audit with it."""
    w = writer(tmp_path, log_uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(log_uri)
    folder = good.rsplit("/", 1)[0]
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{good}") as f:
        data = f.read()
    sink = pa.BufferOutputStream()
    pq.write_table(pq.read_table(pa.BufferReader(data)).drop_columns(["route", "meta"]), sink)
    put_file(log_uri, f"{folder}/part-old-1.parquet", sink.getvalue().to_pybytes())
    put_file(log_uri, f"{folder}/part-x-1-damaged.parquet", data.replace(b"tenant", b"\xffenant"))
    for columns in (None, GATE_COLUMNS, [c for c in SCHEMA.names if c != "route"]):
        df = read(log_uri, *window(), columns=columns)
        assert set(df["request_id"]) == {"good"}
        reasons = {p.rsplit("/", 1)[1]: why for p, why in df.attrs["skipped_file_reasons"].items()}
        assert reasons["part-x-1-damaged.parquet"].startswith("unreadable")
        if columns is None or "route" in columns:
            assert reasons["part-old-1.parquet"] == "wrong schema: column route is missing"
        else:
            assert reasons["part-old-1.parquet"] == "wrong schema: column meta is missing"
    result = audit(log_uri, *window(), "digits")
    assert result.skipped_files == 2
    assert result.verdict == "inconclusive"


def test_a_file_whose_text_is_no_utf8_is_skipped_not_a_crash(log_uri, tmp_path):
    """A file whose strings hold bytes that are no UTF-8 (a damaged or foreign file): pyarrow
    reads them unchecked, and the frame's conversion raised ArrowException out of read, so
    every gate's poke and the hour's audit failed on one file, each time they ran."""
    w = writer(tmp_path, log_uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(log_uri)
    folder = good.rsplit("/", 1)[0]
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{good}") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    for column in ("request_id", "tenant", "meta", "model"):
        bad = pa.array([b"\xff\xfe" + column.encode()] * table.num_rows, pa.binary()).view(pa.string())
        sink = pa.BufferOutputStream()
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, bad), sink)
        put_file(log_uri, f"{folder}/part-x-1-{column}.parquet", sink.getvalue().to_pybytes())
    df = read(log_uri, *window())
    assert set(df["request_id"]) == {"good"}
    reasons = df.attrs["skipped_file_reasons"]
    assert len(reasons) == 4
    assert all("UTF8" in why for why in reasons.values())
    assert audit(log_uri, *window(), "digits").skipped_files == 4


def test_records_whose_top_k_no_answer_can_hold_are_malformed_not_a_vector_of_8_gb(log_uri, tmp_path, monkeypatch):
    """A damaged or foreign file's top-k index of 2**31 - 1 made the audit rebuild each vector
    of 2**31 classes (8 GB: a MemoryError, or the worker killed), a negative one wrote another
    class's probability, and fewer probabilities than indexes read the next record's. Such
    records are malformed: skipped and counted."""
    monkeypatch.setattr(predictionlog, "MAX_CLASSES", 1000)  # (a vector longer than it, in a test's memory)
    w = writer(tmp_path, log_uri)
    for rid in ("good", "huge", "negative", "short", "long"):
        w.append(primary(rid))
        w.append(shadow(rid))
    w.flush()
    (name,) = files(log_uri)
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{name}") as f:
        rows = pq.read_table(pa.BufferReader(f.read())).to_pylist()
    for row in rows:
        if row["request_id"] != "good":
            row["probs"] = None
        if row["request_id"] == "huge":
            row["topk_index"] = [2**31 - 1, *row["topk_index"][1:]]
        elif row["request_id"] == "negative":
            row["topk_index"] = [-1, *row["topk_index"][1:]]
        elif row["request_id"] == "short":
            row["topk_prob"] = row["topk_prob"][:-1]
        elif row["request_id"] == "long":
            row["probs"] = [0.0] * (predictionlog.MAX_CLASSES + 1)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
    fs.delete_file(f"{root}/{name}")
    put_file(log_uri, name, sink.getvalue().to_pybytes())
    df = read(log_uri, *window(), columns=predictionlog.SHADOW_PAIR_COLUMNS)
    assert set(df["request_id"]) == {"good"}
    assert df.attrs["skipped_records"] == 4 * 2 * 2  # (two items, two roles each)
    assert shadow_pairs(df, vectors=False).attrs["classes"] == 10
    assert set(read(log_uri, *window(), columns=GATE_COLUMNS)["request_id"]) == {
        "good",
        "huge",
        "negative",
        "short",
        "long",
    }


def refused_histogram(data: bytes) -> bytes:
    """The Parquet file ``data`` with its first column chunk's size statistics holding a
    definition level histogram of three counts, where the column's levels allow two."""
    n = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - n
    footer = predictionlog._Footer(data[start:-8])
    for wanted in (4, 1, 3):  # FileMetaData.row_groups, RowGroup.columns, ColumnChunk.meta_data
        for field, kind in footer.fields():
            if field == wanted:
                break
            footer.skip(kind)
        if wanted != 3:
            footer.items()
    for _, kind in footer.fields():  # up to the ColumnMetaData's stop
        footer.skip(kind)
    stop = start + footer.pos - 1
    statistics = b"\x0c\x20" + b"\x39\x36\x02\x02\x02" + b"\x00"  # field 16: {3: [1, 1, 1]}
    return data[:stop] + statistics + data[stop:-8] + (n + len(statistics)).to_bytes(4, "little") + b"PAR1"


def test_a_file_whose_size_statistics_pyarrow_refuses_is_skipped_not_the_readers_end(tmp_path):
    """pyarrow's accessor of a column chunk's metadata aborts the process (a C++ exception
    it does not catch) on size statistics it refuses, as a damaged footer's or another writer's
    (a level histogram left out): the memory bound read them through it, and every gate's
    poke, audit and rolloutctl run (no rollback then) ended in SIGABRT."""
    import subprocess
    import sys

    uri = str(tmp_path / "log")
    w = writer(tmp_path, uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(uri)
    with open(f"{uri}/{good}", "rb") as f:
        put_file(uri, f"{good.rsplit('/', 1)[0]}/part-x-1-refused.parquet", refused_histogram(f.read()))
    start, end = window()
    script = (
        "import sys; from datetime import datetime; from model_server.predictionlog import read; "
        f"df = read(sys.argv[1], datetime.fromisoformat({start.isoformat()!r}), "
        f"datetime.fromisoformat({end.isoformat()!r})); "
        "print(sorted(df['request_id']), list(df.attrs['skipped_file_reasons'].values()))"
    )
    done = subprocess.run([sys.executable, "-c", script, uri], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['good', 'good'] ['unreadable: Definition level histogram size mismatch" in done.stdout


def test_a_file_whose_fields_are_declared_not_null_is_read_beside_the_others(tmp_path):
    """A file of the log's columns whose writer declared some not null (another tool's, a
    compaction's) passed the schema check, and the concatenation of its table with the others'
    raised ArrowInvalid out of read: every gate's poke and audit of the range failed."""
    uri = str(tmp_path / "log")
    w = writer(tmp_path, uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(uri)
    table = pq.read_table(f"{uri}/{good}")
    strict = pa.schema([f.with_nullable(False) if f.name in ("time", "model", "item") else f for f in table.schema])
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(strict).set_column(6, "request_id", pa.array(["other"] * 2)), sink)
    put_file(uri, f"{good.rsplit('/', 1)[0]}/part-compacted-1.parquet", sink.getvalue().to_pybytes())
    for columns in (None, GATE_COLUMNS):
        df = read(uri, *window(), columns=columns, written=True)
        assert sorted(df["request_id"]) == ["good", "good", "other", "other"]
        assert df.attrs["skipped_files"] == 0


def test_a_file_named_with_no_real_write_second_is_read_not_a_crash(log_uri, tmp_path):
    """The write second in a name is parsed to prune files: a foreign name's impossible date,
    year 0 or last second of the year 9999 raised out of read (ValueError, OverflowError). Read
    with ``written`` (whose second decides whether the records came late), such a file is
    refused, named, not read as written on time."""
    w = writer(tmp_path, log_uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(log_uri)
    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{good}") as f:
        data = f.read()
    folder = good.rsplit("/", 1)[0]
    for i, stamp in enumerate(("20261399T999999", "00000101T000000", "99991231T235959")):
        put_file(log_uri, f"{folder}/part-x-{stamp}Z-{i:012x}.parquet", data)
    df = read(log_uri, *window())
    assert len(df) == 8  # the writer's file and the three copies, two items each
    assert df.attrs["skipped_files"] == 0
    df = read(log_uri, *window(), written=True)
    assert len(df) == 2  # the writer's file alone
    assert df.attrs["skipped_files"] == 3
    assert all("its name's written second" in r for r in df.attrs["skipped_file_reasons"].values())


def bomb(rows: int, request_id: str) -> bytes:
    """A Parquet file of the log's schema, small on disk, whose rows repeat one record: its
    strings stored once (dictionary), its other values as runs."""
    now = datetime.now(UTC)
    values = {"time": now, "model": "digits", "role": "primary", "request_id": request_id, "item": 0}
    cols = [
        pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), rows), pa.array([values[f.name]]))
        if f.type == pa.string() and f.name in values
        else pa.repeat(pa.scalar(values.get(f.name), f.type), rows)
        for f in SCHEMA
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols, names=SCHEMA.names), sink, compression="zstd", store_schema=False)
    return sink.getvalue().to_pybytes()


def test_a_file_that_would_take_more_memory_than_allowed_is_skipped_unread(log_uri, tmp_path, monkeypatch):
    """A small file can hold what takes gigabytes once read: 490 KB of one 1 KB request id
    repeated 3 million times took a reader 7 GB. It is skipped, counted, before it is decoded."""
    monkeypatch.setattr(predictionlog, "MAX_READ_BYTES", 16 * 1024 * 1024)
    w = writer(tmp_path, log_uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(log_uri)
    folder = good.rsplit("/", 1)[0]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    long_ids = bomb(100_000, "r" * 1000)  # 100 MB of ids
    many_rows = bomb(2_000_000, "r")  # 32 MB of times and ids
    assert max(len(long_ids), len(many_rows)) < 200_000
    put_file(log_uri, f"{folder}/part-x-{stamp}Z-{1:012x}.parquet", long_ids)
    put_file(log_uri, f"{folder}/part-x-{stamp}Z-{2:012x}.parquet", many_rows)
    df = read(log_uri, *window(), columns=["request_id"])
    assert list(df["request_id"]) == ["good", "good"]
    reasons = df.attrs["skipped_file_reasons"]
    assert sorted(p.rsplit("-", 1)[1] for p in reasons) == ["000000000001.parquet", "000000000002.parquet"]
    assert all(r.startswith("too large") for r in reasons.values())
    # the metadata stays categorical; the other strings are plain strings, as before
    full = read(log_uri, *window(), model="digits")
    assert full["tenant"].dtype == "category"
    assert full["request_id"].map(type).eq(str).all()


def test_a_file_is_never_named_before_its_records_when_the_clock_stepped_back(log_uri, tmp_path):
    """A record stamped 5 minutes after the writer's clock at the write (the clock stepped back
    in between) was in a file named by the write's second, which read pruned from every range
    starting over a minute after it: the record was never read."""
    w = writer(tmp_path, log_uri)
    ahead = time.time() + 300
    w.append(primary("stepped", when=ahead))
    assert w.flush() == 2
    at = datetime.fromtimestamp(ahead, UTC)
    df = read(log_uri, at - timedelta(seconds=10), at + timedelta(seconds=10), written=True)
    assert list(df["request_id"]) == ["stepped", "stepped"]
    assert (df["written"] >= df["time"].dt.floor("s")).all()


def test_a_flush_whose_second_file_fails_counts_the_first_written(tmp_path, monkeypatch):
    """The files of one flush are written one by one: a failure of the second counted the rows
    of the first, readable in the log, as lost too."""
    monkeypatch.setattr(predictionlog, "MAX_TABLE_BYTES", 65536)
    w = writer(tmp_path)
    for i in range(500):
        w.append(primary(f"r{i}"))
    calls = []
    real = predictionlog.write_private

    def second_fails(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(path, data)

    monkeypatch.setattr(predictionlog, "write_private", second_fails)
    before_written, before_error = records("written"), records("error")
    written = w.flush()
    on_disk = len(read(tmp_path / "log", *window()))
    assert len(calls) > 2
    assert 0 < written == on_disk < 1000
    assert records("written") - before_written == on_disk
    assert records("error") - before_error == 1000 - on_disk


def test_the_labels_of_a_file_that_fails_are_the_ones_told_lost(tmp_path, monkeypatch):
    """A flush of answers and labels in several files, every second one failing: the writer
    tells of each label that lost a row there (``on_label_dropped``: the data plane lets it be sent
    again), and of none written; and of each label whose rows are all written, once
    (``on_label_written``: the data plane counts it), whatever the files it had rows in. A label
    cut at a file's edge, a row written and a row lost, is lost, not written: never both."""
    monkeypatch.setattr(predictionlog, "MAX_TABLE_BYTES", 32768)
    w = writer(tmp_path)
    lost: list[str] = []
    written: list[str] = []
    w.on_label_dropped = lambda label: lost.append(label.request_id)
    w.on_label_written = lambda label: written.append(label.request_id)
    for i in range(300):
        w.append(primary(f"r{i}"))
        w.append(Label(time.time(), "digits", None, f"l{i}", [i % 10] * (2 + i % 7), None))
    calls = []
    real = predictionlog.write_private

    def every_second_fails(path, data):
        calls.append(path)
        if len(calls) % 2 == 0:
            raise OSError("No space left on device")
        real(path, data)

    monkeypatch.setattr(predictionlog, "write_private", every_second_fails)
    w.flush()
    df = read(tmp_path / "log", *window())
    rows = df.loc[df["role"] == "label", "request_id"].value_counts()
    short = {f"l{i}" for i in range(300) if rows.get(f"l{i}", 0) < 2 + i % 7}  # (a row or more not written)
    assert len(calls) > 2
    assert 0 < len(lost) < 300
    assert sorted(lost) == sorted(short)
    assert sorted(written) == sorted({f"l{i}" for i in range(300)} - short)  # each once
    assert any(0 < rows.get(r, 0) for r in short)  # (a label cut at a file's edge: some rows written)
    monkeypatch.setattr(predictionlog, "write_private", real)
    w.append(Label(time.time(), "digits", None, "next", [1], None))
    w.flush()  # (a later write tells of its own labels only: none counted twice)
    assert sorted(written) == sorted({f"l{i}" for i in range(300)} - short | {"next"})
    assert sorted(lost) == sorted(short)


def test_a_flush_that_fails_before_its_write_tells_its_labels_lost_and_writes_the_rest(tmp_path, monkeypatch):
    """A failure no step of a flush counted (its answers' and labels' tables not joined) left its
    labels told neither written nor lost (never counted in the live view, their resend refused
    until the TTL) and their rows in no outcome; a hook of the data plane's that raised lost the
    folders after it. Each group of a flush fails alone now, its labels told lost, its rows
    counted; a hook's failure is logged."""
    w = writer(tmp_path)
    lost: list[str] = []
    written: list[str] = []
    w.on_label_dropped = lambda label: lost.append(label.request_id)

    def count(label):
        written.append(label.request_id)
        if len(written) == 1:
            raise RuntimeError("a counter failed")

    w.on_label_written = count
    now = time.time()
    w.append(primary("p-old", when=now - 3600))
    w.append(Label(now - 3600, "digits", "1", "old-hour", [3], None))
    w.append(Label(now, "digits", "1", "this-hour", [4], None))
    w.append(Label(now, "digits", "1", "this-hour-too", [5], None))
    real = pa.concat_tables

    def not_joined(*args, **kwargs):
        raise pa.ArrowInvalid("Schema at index 1 was different")

    monkeypatch.setattr(predictionlog.pa, "concat_tables", not_joined)
    before = records("error")
    w.flush()  # (the old hour's two tables not joined; this hour's one table needs no join)
    assert (lost, written) == (["old-hour"], ["this-hour", "this-hour-too"])  # (the first count raised)
    assert records("error") == before + 3  # (its answer's two rows, its label's one)
    monkeypatch.setattr(predictionlog.pa, "concat_tables", real)
    df = read(tmp_path / "log", *window(120))
    assert sorted(df.loc[df["role"] == "label", "request_id"]) == ["this-hour", "this-hour-too"]


def test_a_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w.append(primary())
    before = records("error")

    def crash(fd):
        raise OSError("disk pulled")

    monkeypatch.setattr(predictionlog.os, "fsync", crash)  # after the bytes, before the rename
    assert w.flush() == 0
    assert [p for p in (tmp_path / "log").rglob("*") if p.is_file()] == []
    assert records("error") == before + 2


def test_the_records_the_writer_holds_are_a_gauge_until_written_or_lost(tmp_path, monkeypatch):
    """``prediction_log_held_records``: the records appended and not yet written or dropped (a
    flush in progress included: a label is counted in the live view at its write, after the
    queue is taken), so that a reader of /metrics knows when every record appended is in the
    log and counted (the tests' ``settled``); a flush that fails lets go of its records too, and
    one refused by a full queue was never held."""

    def held() -> float:
        return REGISTRY.get_sample_value("prediction_log_held_records") or 0.0

    w = writer(tmp_path, max_pending=3)
    start = held()
    during: list[float] = []
    w.on_label_written = lambda label: during.append(held() - start)
    for i in range(2):
        assert w.append(primary(f"r-{i}"))
    assert w.append(Label(time.time(), "digits", "1", "r-0", [3], None))
    assert not w.append(primary("r-full"))  # (dropped: never held)
    assert held() - start == 3
    w.flush()
    assert (during, held() - start) == ([3], 0)  # (held while its file was written)
    w.append(primary("r-3"))
    monkeypatch.setattr(predictionlog.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk pulled")))
    assert w.flush() == 0
    assert held() - start == 0


def test_each_file_is_one_put_on_s3(s3, tmp_path):
    """A single PUT is atomic: the object exists whole or not at all (a multipart upload is too,
    but needs its completion; the writer uses neither partial writes nor multipart)."""
    uri = s3.uri()
    w = writer(tmp_path, uri)
    for i in range(100):
        w.append(primary(f"r{i}"))
    assert w.flush() == 200
    (name,) = [f.rsplit("/", 1)[1] for f in files(uri)]
    requests_for_it = [line for line in s3.log.read_text().splitlines() if name in line]
    assert len(requests_for_it) == 1
    assert '"PUT ' in requests_for_it[0]
    assert "upload" not in requests_for_it[0]


def test_a_failed_put_is_counted_and_the_writer_goes_on(s3, tmp_path):
    missing = s3.uri().replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    w = writer(tmp_path, missing)
    w.append(primary())
    before = records("error")
    assert w.flush() == 0  # the PUT fails: counted, logged, nothing raised into the thread
    assert records("error") == before + 2
    good = writer(tmp_path, s3.uri())
    good.append(primary())
    assert good.flush() == 2


def test_large_flushes_are_split_into_files_under_the_put_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(predictionlog, "MAX_FILE_BYTES", 16384)
    w = writer(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(500):  # random answers: nothing for Parquet's dictionaries to fold
        w.append(primary(f"r{i}", scores=rng.dirichlet(np.ones(10), 2).astype(np.float32)))
    assert w.flush() == 1000
    written = list((tmp_path / "log").rglob("part-*.parquet"))
    assert len(written) > 1
    assert all(f.stat().st_size <= 16384 for f in written)
    assert len(read(tmp_path / "log", *window())) == 1000


def test_a_flush_is_split_into_files_whose_tables_readers_can_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(predictionlog, "MAX_TABLE_BYTES", 65536)
    w = writer(tmp_path)
    for i in range(500):
        w.append(primary(f"r{i}"))
    assert w.flush() == 1000
    written = [pq.read_table(f) for f in (tmp_path / "log").rglob("part-*.parquet")]
    assert len(written) > 1
    assert all(t.nbytes <= 65536 for t in written)
    assert sum(t.num_rows for t in written) == 1000


def test_a_tenant_without_a_usable_key_is_dropped_not_written_in_plaintext(tmp_path):
    keys = keys_file(tmp_path, {"acme": "bad"})
    w = writer(tmp_path, keys=keys)
    before = records("mask_unavailable")
    w.append(primary("acme-1", {"x-tenant": "acme", "x-meta-phone": "13800138000"}))
    w.append(primary("globex-1", {"x-tenant": "globex", "x-meta-phone": "13800138000"}))
    w.append(Label(time.time(), "digits", None, "acme-2", [1], "acme"))
    w.flush()
    df = read(tmp_path / "log", *window())
    assert set(df["request_id"]) == {"globex-1"}
    assert records("mask_unavailable") == before + 3
    for f in (tmp_path / "log").rglob("*.parquet"):
        assert b"13800138000" not in f.read_bytes()


def test_a_metadata_header_named_for_a_passport_is_written_only_masked(tmp_path):
    """An X-Meta-Passport value looks like any id ("E12345678"): no detector took it, and it
    reached the log in clear. A header whose name says it holds a passport, SSN or national id
    number is masked whole."""
    w = writer(tmp_path)
    w.append(primary("r-1", {"x-meta-passport-no": "E12345678", "x-meta-lang": "en"}))
    assert w.flush() == 2
    for f in (tmp_path / "log").rglob("*.parquet"):
        assert b"E12345678" not in f.read_bytes()
    meta = json.loads(read(tmp_path / "log", *window())["meta"].iloc[0])
    assert meta["x-meta-lang"] == "en"
    assert reveal(meta["x-meta-passport-no"], KeyRing(tmp_path / "keys.json")) == "E12345678"


def test_a_tenant_without_a_usable_key_logs_one_line_a_flush_not_one_a_request(tmp_path, caplog):
    """Each record of a tenant whose key could not be loaded logged its own error line: a
    thousand lines a second under a thousand requests a second, for one key's fault."""
    w = writer(tmp_path, keys=keys_file(tmp_path, {"acme": "bad"}))
    for i in range(500):
        w.append(primary(f"acme-{i}", {"x-tenant": "acme"}))
    w.append(Label(time.time(), "digits", None, "acme-label", [1], "acme"))
    w.append(primary("globex-1", {"x-tenant": "globex"}))
    with caplog.at_level("ERROR", logger="model_server.predictionlog"):
        assert w.flush() == 2
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 2  # the inferences' and the label's
    assert lines[0].startswith("prediction log records of request acme-0 and 499 more dropped: key file ")
    assert lines[1].startswith("prediction log records of request acme-label dropped: key file ")


def test_records_a_table_cannot_hold_lose_their_own_rows_not_the_others(tmp_path):
    """A label over the int32 column (the server refuses it; this is the writer's own guard)
    failed the whole flush of its model and hour, every inference with it."""
    w = writer(tmp_path)
    before = records("error")
    w.append(primary("a"))
    w.append(Label(time.time(), "digits", "1", "a", [2**31], None))
    w.append(Label(time.time(), "digits", "1", "b", [3, 4], None))
    assert w.flush() == 2  # the primary's two items
    assert records("error") == before + 3  # the two labels' three
    df = read(tmp_path / "log", *window())
    assert sorted(df["role"]) == ["primary", "primary"]
    w.append(Label(time.time(), "digits", "1", "b", [3, 4], "acme"))
    w.append(Label(time.time(), "digits", "2", "c", [5], None))
    assert w.flush() == 3
    df = read(tmp_path / "log", *window())
    labels = df[df["role"] == "label"].sort_values(["request_id", "item"])
    assert sorted(zip(labels["version"], labels["item"], labels["label"], strict=True)) == [
        ("1", 0, 3),
        ("1", 1, 4),
        ("2", 0, 5),
    ]
    assert labels["tenant"].notna().sum() == 2  # (masked)


def test_an_output_of_strings_is_written_without_a_top1_and_takes_no_other_record_with_it(tmp_path):
    """A version whose first output is a BYTES tensor (its labels as text) failed the
    conversion of the whole flush of its model and hour: every inference of it lost, the other
    version's too (both served by one replica). Its records are written as ones without an
    output; the others as they are."""
    w = writer(tmp_path)
    before = records("error")
    w.append(primary("numeric", version="1"))
    w.append(primary("text", version="2", scores=np.array([[b"cat"], [b"dog"]], dtype=object)))
    w.append(primary("flags", version="2", scores=np.array([[True, False], [False, True]])))
    assert w.flush() == 6
    assert records("error") == before
    df = read(tmp_path / "log", *window()).sort_values(["request_id", "item"])
    got = {(r, i): (t, p) for r, i, t, p in zip(df["request_id"], df["item"], df["top1"], df["top1_prob"], strict=True)}
    assert got[("numeric", 0)] == (3, 1.0)
    assert got[("flags", 1)] == (1, 1.0)
    assert all(pd.isna(t) and pd.isna(p) for t, p in (got[("text", 0)], got[("text", 1)]))


def test_an_output_of_no_rows_is_written_without_a_top1_and_takes_no_other_record_with_it(tmp_path):
    """A version whose first output counts detections, not batch items, answers an image with
    nothing in it with no rows ([0, 6]): its reshape failed the whole flush of its model and
    hour, every inference of it lost, the other version's too. Its record is written as one
    without an output; the others as they are."""
    w = writer(tmp_path)
    before = records("error")
    w.append(primary("numeric", version="1"))
    w.append(primary("nothing", version="2", scores=np.zeros((0, 6), np.float32))._replace(items=1))
    assert w.flush() == 3
    assert records("error") == before
    df = read(tmp_path / "log", *window()).set_index(["request_id", "item"])
    assert df.loc[("numeric", 0), "top1"] == 3
    assert pd.isna(df.loc[("nothing", 0), "top1"])


def test_a_full_buffer_drops_and_counts_without_blocking(tmp_path):
    w = writer(tmp_path, max_pending=2)
    before = records("dropped")
    assert w.append(primary("a"))
    assert w.append(primary("b"))
    assert not w.append(primary("c"))
    assert records("dropped") == before + 2  # its two items
    assert w.flush() == 4


def test_the_byte_budget_counts_a_records_output_and_a_shadow_copys_input(tmp_path):
    """The buffer's byte budget counted the request body alone: a detector's output (8.5 MB
    beside a 50 KB image) and every in-process shadow copy's input (counted 0 bytes) were held
    up to 100,000 records, tens of gigabytes, with the budget never reached."""
    from model_server.dataplane import shadow_record
    from model_server.protocol import InferInput
    from model_server.shadow import ShadowJob, ShadowResult
    from model_server.trace import TraceContext

    w = writer(tmp_path, max_pending_bytes=12 * 1024 * 1024)
    before = records("dropped")
    detector = np.zeros((1, 25200, 85), np.float32)
    assert w.append(primary("small", scores=detector)._replace(size=50_000, items=1))
    assert not w.append(primary("over", scores=detector)._replace(size=50_000, items=1))
    assert records("dropped") == before + 1
    w.flush()
    image = np.array([b"\x89PNG" + bytes(7 * 1024 * 1024)], dtype=object)
    job = ShadowJob(
        "digits",
        "1",
        "2",
        [InferInput("image", "BYTES", (1,), image)],
        ["probabilities"],
        "r-1",
        TraceContext.from_header(None),
        time.time(),
        1,
        1.0,
    )
    copy = shadow_record(ShadowResult(job, {"probabilities": np.eye(10, dtype=np.float32)[[3]]}, 2.0, None))
    assert copy.held >= 7 * 1024 * 1024
    assert w.append(copy)
    assert not w.append(copy._replace(request_id="r-2"))
    assert w.flush() == 1


def test_sampling_is_a_stable_share_of_request_ids(tmp_path):
    half = writer(tmp_path, sample=0.5)
    ids = [f"req-{i}" for i in range(10_000)]
    kept = [i for i in ids if half.sampled(i)]
    assert 4_700 < len(kept) < 5_300
    again = writer(tmp_path, sample=0.5)
    assert kept == [i for i in ids if again.sampled(i)]  # the same on every replica and restart
    assert not any(writer(tmp_path, sample=0.0).sampled(i) for i in ids[:100])


def test_replica_ids_and_settings_are_validated(tmp_path):
    masker = Masker(KeyRing(keys_file(tmp_path)))
    for bad in ("a/b", "", "x" * 65, "a b"):
        with pytest.raises(ValueError, match="replica id"):
            PredictionLog(tmp_path / "log", masker, replica=bad)
    with pytest.raises(ValueError, match="sample"):
        PredictionLog(tmp_path / "log", masker, replica="ok", sample=1.5)
    for flush in (0.0, -1.0, float("nan"), 61.0):  # 0 and below spun the writer thread
        with pytest.raises(ValueError, match=r"flush interval must be within 0.01..60 s"):
            PredictionLog(tmp_path / "log", masker, replica="ok", flush_s=flush)


def test_a_prediction_log_uri_with_credentials_stops_the_start_without_showing_them(tmp_path):
    """The server took any URI: one with a key in it started (the key then in every message
    naming the log), and one pyarrow refused echoed it, key included, to the pod's log."""
    from model_server.__main__ import parse_args
    from model_server.__main__ import prediction_log as start_log

    masker = Masker(KeyRing(keys_file(tmp_path)))
    for uri in (
        "s3://AKIAEXAMPLE:wJalrSECRETKEY@bucket/log?region=us-east-1&bogus=1",
        "s3://bucket/log?secret_key=wJalrSECRETKEY",
        "s3://bucket/log?session_token=wJalrSECRETKEY",
    ):
        with pytest.raises(SystemExit) as stopped:
            start_log(parse_args(["--repository", str(tmp_path), "--prediction-log", uri]), masker)
        assert "credentials in the URI" in str(stopped.value)
        assert "wJalrSECRETKEY" not in str(stopped.value)
    with pytest.raises(SystemExit, match=r"--prediction-log is not a folder: a folder, or a URI of"):
        start_log(parse_args(["--repository", str(tmp_path), "--prediction-log", "ftp://host/log"]), masker)
    plog = start_log(parse_args(["--repository", str(tmp_path), "--prediction-log", str(tmp_path / "log")]), masker)
    assert plog is not None


def test_joined_pairs_primary_shadow_and_labels_and_reports_the_unmatched(tmp_path):
    w = writer(tmp_path)
    w.append(primary("p-1"))
    w.append(shadow("p-1"))
    w.append(primary("p-2"))
    w.append(Label(time.time(), "digits", None, "p-1", [3, 9], None))
    w.append(Label(time.time() + 1, "digits", None, "p-1", [4, 4], None))  # a second label: counted
    w.append(Label(time.time(), "digits", None, "never-served", [5], None))
    w.flush()
    df = read(tmp_path / "log", *window())
    j = joined(df)
    assert len(j) == 4  # one row per primary record
    p1 = j[j["request_id"] == "p-1"].sort_values("item")
    assert list(p1["label"]) == [3, 9]  # the earliest label
    assert list(p1["shadow_top1"]) == [3, 2]
    assert list(p1["shadow_version"]) == ["2", "2"]
    assert j[j["request_id"] == "p-2"]["label"].isna().all()
    assert j.attrs["unmatched_labels"] == 1
    assert j.attrs["duplicate_labels"] == 2
    lost = unmatched_labels(df)
    assert list(lost["request_id"]) == ["never-served"]
    assert list(lost["label"]) == [5]


def test_joined_takes_the_request_copy_of_compares_of_an_id_sent_again(tmp_path):
    """A client sent p-1 at t (the primary failed: FAULT, its own mirror's copy failed too) and
    again 5 s later (answered, its copy answering class 2 for item 1), and labelled it. joined
    took the id's earliest primary and earliest copy by key alone: the failed attempt with the
    failed copy (outcome FAULT, no shadow answer), where ``copy_of`` compares the retry with its
    own copy. joined takes ``copy_of``'s request and that request's own copy: the retry, its
    copy's answers, the label; the failed attempt is the repeat counted."""
    t = time.time()
    w = writer(tmp_path)
    w.append(primary("p-1", when=t, outcome="FAULT"))
    w.append(shadow("p-1", when=t, outcome="FAULT"))
    w.append(primary("p-1", when=t + 5))
    w.append(shadow("p-1", when=t + 5))
    w.append(Label(t + 10, "digits", None, "p-1", [3, 9], None))
    w.flush()
    j = joined(read(tmp_path / "log", *window())).sort_values("item")
    assert list(j["outcome"]) == ["ok", "ok"]
    assert list(j["shadow_outcome"]) == ["ok", "ok"]
    assert list(j["shadow_top1"]) == [3, 2]
    assert list(j["label"]) == [3, 9]
    assert (j["time"] > pd.Timestamp(t + 4, unit="s", tz="UTC")).all()  # (the retry)
    assert (j.attrs["duplicate_primaries"], j.attrs["unmatched_shadows"]) == (2, 0)


def test_two_tenants_sending_one_request_id_are_two_requests(tmp_path):
    """Two clients (tenants acme and globex, one masking key) both sent request id order-7, 50 ms
    apart. The log joined by (model, request id, item) alone: globex's label of its own answer
    was joined to acme's (the id's earliest), acme's own label was counted a duplicate, and the
    copy of globex's request was compared with acme's answer. Where a key's answers carry two
    tenants, the tenant is part of the key: each label and copy joins its own tenant's answer; a
    label of a third tenant joins none (counted). Where they carry one, a label's tenant does not
    matter (a masked tenant changes with its key), as before."""
    t = time.time()
    w = writer(tmp_path)
    acme, globex = {"x-tenant": "acme"}, {"x-tenant": "globex"}
    w.append(primary("order-7", acme, when=t, scores=np.eye(10, dtype=np.float32)[[1, 1]]))
    w.append(primary("order-7", globex, when=t + 0.05, scores=np.eye(10, dtype=np.float32)[[2, 2]]))
    w.append(shadow("order-7", when=t + 0.05)._replace(metadata=globex))  # (the own mirror's, globex's)
    w.append(Label(t + 1, "digits", None, "order-7", [2, 2], "globex"))
    w.append(Label(t + 2, "digits", None, "order-7", [1, 1], "acme"))
    w.append(Label(t + 3, "digits", None, "order-7", [5, 5], "initech"))
    w.append(primary("alone", acme, when=t))
    w.append(Label(t + 1, "digits", None, "alone", [3, 7], "acme-after-rotation"))
    w.flush()
    j = joined(read(tmp_path / "log", *window())).sort_values(["request_id", "tenant", "item"])
    rows = j[j["request_id"] == "order-7"]
    assert list(rows["tenant"]) == ["acme", "acme", "globex", "globex"]
    assert list(rows["top1"]) == [1, 1, 2, 2]
    assert list(rows["label"]) == [1, 1, 2, 2]  # each tenant's own label
    assert rows["shadow_top1"].isna().tolist() == [True, True, False, False]  # the copy is globex's
    assert list(j[j["request_id"] == "alone"]["label"]) == [3, 7]
    assert (j.attrs["unmatched_labels"], j.attrs["duplicate_labels"], j.attrs["duplicate_primaries"]) == (2, 0, 0)


def test_an_id_re_sent_by_an_older_pods_tenant_of_no_characters_and_a_newer_pods_none_is_one_request():
    """An older pod logged an X-Tenant of "" where a newer one logs none: read as two tenants, one
    client's re-send across the two split its id, and its label moved from the first answer to
    the re-send. "" is none when read too: one request, the label on the first answer."""
    t = time.time()
    frame = pd.DataFrame(
        [
            {"time": t, "role": "primary", "top1": 1, "tenant": ""},
            {"time": t + 5, "role": "primary", "top1": 2, "tenant": None},
            {"time": t + 10, "role": "label", "label": 1, "tenant": None},
        ]
    ).assign(model="digits", request_id="r-1", item=0, time=lambda d: pd.to_datetime(d["time"], unit="s", utc=True))
    j = joined(frame)
    assert (list(j["top1"]), list(j["label"])) == ([1], [1])
    assert (j.attrs["duplicate_primaries"], j.attrs["unmatched_labels"]) == (1, 0)


def test_two_tenants_masked_under_their_own_keys_sending_one_request_id_are_two_requests(tmp_path):
    """With --mask-header x-tenant and a masking key per tenant, acme's and globex's requests
    under order-7 carry tokens of two keys; globex's label joins globex's answer, not acme's."""
    keys = keys_file(tmp_path, {t: base64.b64encode(os.urandom(32)).decode() for t in ("acme", "globex")})
    w = PredictionLog(tmp_path / "log", Masker(KeyRing(keys), ["x-tenant"]), replica="test-1", compression=None)
    t = time.time()
    w.append(primary("order-7", {"x-tenant": "acme"}, when=t, scores=np.eye(10, dtype=np.float32)[[3, 3]]))
    w.append(primary("order-7", {"x-tenant": "globex"}, when=t + 1, scores=np.eye(10, dtype=np.float32)[[7, 7]]))
    w.append(Label(t + 2, "digits", None, "order-7", [7, 7], "globex"))
    w.flush()
    df = read(tmp_path / "log", *window())
    assert df["tenant"].str.startswith("tok_").all()
    j = joined(df).sort_values(["top1", "item"])
    assert list(j["top1"]) == [3, 3, 7, 7]
    assert j["label"].tolist()[2:] == [7, 7]
    assert j["label"].isna().tolist()[:2] == [True, True]


def test_one_clients_re_send_masked_under_another_key_is_one_request_by_its_tag(tmp_path):
    """Two pods share the feedback key; pod b masks acme under a key pod a has not yet (a Secret
    not yet synced, a rotation). acme sent order-7 to pod a, re-sent it to pod b, and labelled it;
    globex sent order-7 to pod b and labelled its own. Its masked tenant is two tokens, so the log
    read acme's re-send as a third tenant's request and acme's label joined the re-send's answer,
    not the first. Each record's ``tenant_tag`` (the feedback signer's, the same on both pods) says
    whose request it is: acme's two answers are one request (its re-send counted), its label
    joins the first; globex's stays its own."""
    signer = FeedbackSigner(b"k" * 32)
    acme_a, acme_b, globex = (base64.b64encode(os.urandom(32)).decode() for _ in range(3))
    pods = []
    for pod, acme in (("a", acme_a), ("b", acme_b)):
        (tmp_path / pod).mkdir()
        keys = keys_file(tmp_path / pod, {"acme": acme, "globex": globex})
        w = PredictionLog(tmp_path / "log", Masker(KeyRing(keys), ["x-tenant"]), replica=f"pod-{pod}", compression=None)
        w.tag = signer.tag
        pods.append(w)
    a, b = pods
    t, eye = time.time(), np.eye(10, dtype=np.float32)
    a.append(primary("order-7", {"x-tenant": "acme"}, when=t, scores=eye[[3, 3]]))
    b.append(primary("order-7", {"x-tenant": "acme"}, when=t + 1, scores=eye[[5, 5]]))
    b.append(primary("order-7", {"x-tenant": "globex"}, when=t + 2, scores=eye[[7, 7]]))
    b.append(Label(t + 3, "digits", None, "order-7", [3, 3], "acme"))
    b.append(Label(t + 4, "digits", None, "order-7", [7, 7], "globex"))
    a.flush()
    b.flush()
    df = read(tmp_path / "log", *window())
    assert df["tenant_tag"].notna().all()
    assert df["tenant"].nunique() == 3  # (acme's two tokens)
    j = joined(df).sort_values(["top1", "item"])
    assert list(j["top1"]) == [3, 3, 7, 7]  # acme's first answer, globex's
    assert list(j["label"]) == [3, 3, 7, 7]
    assert (j.attrs["duplicate_primaries"], j.attrs["unmatched_labels"]) == (2, 0)


def test_a_tenant_written_as_it_came_has_no_tag(tmp_path):
    """The tag is for a tenant written masked (a token that changes with its key); one written as
    it came, or none, is the same on every pod: no tag, no HMAC a record on the writer's thread."""
    signer = FeedbackSigner(b"k" * 32)
    for masked in (["x-tenant"], []):
        w = PredictionLog(
            tmp_path / f"log{len(masked)}", Masker(KeyRing(keys_file(tmp_path)), masked), replica="t", compression=None
        )
        w.tag = signer.tag
        w.append(primary("r-1", {"x-tenant": "acme"}))
        w.append(primary("r-2"))
        w.append(Label(time.time(), "digits", None, "r-1", [3, 7], "acme"))
        w.flush()
        df = read(tmp_path / f"log{len(masked)}", *window()).sort_values(["request_id", "role", "item"])
        want = [signer.tag("digits", "r-1", "acme")] * 4 if masked else [None] * 4
        assert [None if pd.isna(v) else int(v) for v in df["tenant_tag"]][:4] == want
        assert df["tenant_tag"].isna().tolist()[4:] == [True, True]  # (r-2: no tenant)


@pytest.mark.parametrize(
    "case",
    ["feedback key rotated", "label of an older writer", "copy of an older writer", "copy of another feedback key"],
)
def test_a_tag_joins_two_tenant_values_of_one_request_and_never_parts_one(case):
    """Review s45-2: read as the requester, a tag parted what the tenant column joined: acme's
    re-send to a pod of another feedback key (a rotation, pods without --feedback-key-file) was a
    second request and acme's label moved to the re-send's answer (base: the first's); a label or
    an Istio copy of an older writer (no tag), or a copy from a pod of another feedback key, joined
    no answer on an id two tenants sent (base: its tenant's). A tag only joins two tenant values
    (one tenant masked under two keys); otherwise the tenant column decides, as before tags."""
    t0 = pd.Timestamp("2026-03-01T10:00:00Z")
    at = lambda s: t0 + pd.Timedelta(seconds=s)  # noqa: E731
    rows = [
        {"time": at(0), "role": "primary", "version": "1", "tenant": "tok_a", "tenant_tag": 11.0, "top1": 3},
        {"time": at(1), "role": "primary", "version": "1", "tenant": "tok_g", "tenant_tag": 21.0, "top1": 7},
    ]
    if case == "feedback key rotated":  # (acme's re-send, tagged under the new feedback key, labelled there)
        rows.append(
            {"time": at(2), "role": "primary", "version": "2", "tenant": "tok_a", "tenant_tag": 12.0, "top1": 5}
        )
        rows.append({"time": at(3), "role": "label", "tenant": "tok_a", "tenant_tag": 12.0, "label": 3})
    elif case == "label of an older writer":
        rows.append({"time": at(3), "role": "label", "tenant": "tok_a", "tenant_tag": np.nan, "label": 3})
    else:
        tag = np.nan if case == "copy of an older writer" else 13.0
        rows.append({"time": at(0), "role": "shadow", "version": "2", "tenant": "tok_a", "tenant_tag": tag, "top1": 4})
    frame = pd.DataFrame(rows).assign(model="digits", request_id="order-7", item=0, outcome="ok")
    j = joined(frame).sort_values("time")
    assert j["tenant"].tolist() == ["tok_a", "tok_g"]  # acme's first answer, globex's
    if case.startswith("copy"):
        assert j["shadow_top1"].tolist()[0] == 4
        assert j.attrs["unmatched_shadows"] == 0
    else:
        assert j["label"].tolist()[0] == 3
        assert j.attrs["unmatched_labels"] == 0


@pytest.mark.parametrize("feedback_keys", [1, 2])
def test_tags_split_masked_tenants_as_their_names_and_never_part_what_the_tenant_column_joins(feedback_keys):
    """Random frames (5 ids, acme, globex, none or "", primaries, copies and labels), each record
    masked under one of three masking keys. Under one feedback key, the split of masked tokens
    with tags is the split of the tenants' names; under two, tags never part what the tokens
    alone join."""
    rng = np.random.default_rng(feedback_keys)

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return len(set(zip(a, b, strict=True))) == len(set(a)) == len(set(b))

    for _ in range(300):
        n = int(rng.integers(1, 40))
        rid = rng.integers(0, 5, n).astype(str)
        name = np.array(["acme", "globex", None, None], dtype=object)[rng.integers(0, 4, n)]
        masking_key, feedback_key = rng.integers(0, 3, n), rng.integers(0, feedback_keys, n)
        token = np.array([None if t is None else f"tok{k}_{t}" for t, k in zip(name, masking_key, strict=True)])
        tag = [
            np.nan if t is None else float(int(hashlib.sha256(f"{r} {t} {f}".encode()).hexdigest()[:13], 16))
            for r, t, f in zip(rid, name, feedback_key, strict=True)
        ]
        frame = pd.DataFrame({"model": "m", "request_id": rid, "item": 0})
        frame["role"] = np.array(["primary", "shadow", "label"])[rng.integers(0, 3, n)]
        by_name, tagged = key_codes(frame.assign(tenant=name)), key_codes(frame.assign(tenant=token, tenant_tag=tag))
        untagged = key_codes(frame.assign(tenant=token))
        assert all(len(set(tagged[untagged == c])) == 1 for c in set(untagged))
        if feedback_keys == 1:
            assert same(by_name, tagged)


def test_istios_copy_of_one_of_two_tenants_requests_under_one_id_is_that_tenants():
    """Behind Istio (copies stamped by the candidate's pod), acme and globex sent order-7 2 ms
    apart and the mirror sampled globex's only; its copy was stamped 0.5 ms after acme's answer.
    ``copy_of`` paired it with acme's (the id's answer nearest in time): the audit compared
    globex's copy with acme's answer. A copy is its own tenant's request's where an id's answers
    carry two tenants."""
    t0 = pd.Timestamp("2026-03-01T10:00:00Z")
    frame = pd.DataFrame(
        [
            {"time": t0, "role": "primary", "version": "1", "tenant": "acme"},
            {"time": t0 + pd.Timedelta(milliseconds=2), "role": "primary", "version": "1", "tenant": "globex"},
            {"time": t0 + pd.Timedelta(microseconds=500), "role": "shadow", "version": "2", "tenant": "globex"},
        ]
    ).assign(model="digits", request_id="order-7", item=0, outcome="ok", image_sha256=None)
    first, of, own = copy_of(frame)
    assert first.tolist() == [True, True, False]  # two requests
    assert (of[2], bool(own[2])) == (1, True)  # globex's copy of globex's


def test_joined_takes_the_compared_requests_own_copy_else_its_earliest_copy_that_ran(tmp_path):
    """Istio's copies come from a pod 43.6 s behind (its clock offset, measured on the ids of one
    primary and one copy). ``own``: a copy stamped as its primary (the own mirror's, 3 and 2)
    and a later Istio copy of it stamped 43.6 s before (9s): the own copy. ``dropped``: a copy
    the own mirror dropped, and two Istio copies left to the request (5s, then 9s): the earliest
    that ran. ``retried``: a failed attempt and its retry 5 s later, each with an Istio copy
    (the retry's answering 7s): the retry and its own copy, not the copy nearest on the pod's
    clock. A label of no request and a copy of none are counted."""
    t = time.time() - 120
    late, nines = -43.6, np.eye(10, dtype=np.float32)[[9, 9]]
    w = writer(tmp_path)
    for k in range(3):
        w.append(primary(f"plain{k}", when=t + k))
        w.append(shadow(f"plain{k}", when=t + k + late))
    w.append(primary("own", when=t))
    w.append(shadow("own", when=t + late, scores=nines))
    w.append(shadow("own", when=t))
    w.append(primary("dropped", when=t + 10))
    w.append(shadow("dropped", when=t + 10, outcome="DROPPED"))
    w.append(shadow("dropped", when=t + 10.6 + late, scores=nines))
    w.append(shadow("dropped", when=t + 10 + late, scores=np.eye(10, dtype=np.float32)[[5, 5]]))
    w.append(primary("retried", when=t + 20, outcome="FAULT"))
    w.append(shadow("retried", when=t + 20 + late, outcome="FAULT"))
    w.append(primary("retried", when=t + 25))
    w.append(shadow("retried", when=t + 25 + late, scores=np.eye(10, dtype=np.float32)[[7, 7]]))
    w.append(shadow("lost", when=t))
    w.append(Label(t + 30, "digits", None, "retried", [1, 2], None))
    w.append(Label(t + 30, "digits", None, "never", [4], None))
    w.flush()
    j = joined(read(tmp_path / "log", *window())).sort_values(["request_id", "item"])
    plain = [f"plain{k}" for k in range(3) for _ in "ab"]
    assert list(j["request_id"]) == ["dropped"] * 2 + ["own"] * 2 + plain + ["retried"] * 2
    assert list(j["shadow_top1"]) == [5, 5, 3, 2, *[3, 2] * 3, 7, 7]
    assert list(j["shadow_outcome"]) == ["ok"] * 12
    assert list(j["outcome"]) == ["ok"] * 12
    assert list(j["label"].fillna(-1)) == [-1] * 10 + [1, 2]
    assert (j[j["request_id"] == "retried"]["time"] > pd.Timestamp(t + 24, unit="s", tz="UTC")).all()
    counts = ("unmatched_labels", "unmatched_shadows", "duplicate_labels", "duplicate_primaries")
    assert [j.attrs[k] for k in counts] == [1, 2, 0, 2]  # (lost: two items; retried's failed attempt)


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
    rid = entries[0][1][1]  # even the request id carries one
    w.append(primary(rid, metadata))
    w.append(shadow(rid)._replace(metadata=metadata))
    w.append(Label(time.time(), "digits", None, rid, [1, 2], metadata.get("x-tenant")))
    assert w.flush() == 6
    for f in (tmp_path / "log").rglob("*.parquet"):
        data = f.read_bytes().decode("latin-1")
        for _, value in entries:
            assert value[1] not in data
        for detector in DETECTORS:
            assert not detector.search(data), detector.name
        df = pq.read_table(f).to_pandas()
        for column in ("request_id", "user_id", "device_type", "tenant", "meta"):
            for cell in df[column].dropna():
                assert find_sensitive(cell) == []
        # The label's request id is masked like the prediction's, so the reader joins them.
        assert df[df["role"] == "label"]["request_id"].iloc[0] == df[df["role"] == "primary"]["request_id"].iloc[0]
    for f in (tmp_path / "log").rglob("*.parquet"):
        f.unlink()


@pytest.mark.parametrize(
    ("host", "shadow"),
    [
        ("digits.ml.svc-shadow:8000", True),  # Envoy: the suffix goes on the host, before the port
        ("digits-shadow", True),
        ("digits.ml.svc:8000-shadow", True),  # Envoy before 2018
        ("[::1]-shadow:8000", True),
        ("127.0.0.1:8000", False),
        ("shadow.example.com", False),
        ("digits-shadowy:8000", False),
        (None, False),
    ],
)
def test_shadow_hosts_are_recognised_as_envoy_writes_them(host, shadow):
    assert is_shadow_host(host) is shadow


# -- real servers ------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
def test_server_logs_masked_records_with_the_trace_of_the_primary(server_factory, repo_copy, tmp_path, digit_images):
    log_dir = tmp_path / "predictions"
    # The deprecated names of --prediction-log and its flush interval still work.
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
    keys = tmp_path / "predictions.mask-keys.json"
    assert oct(keys.stat().st_mode & 0o777) == "0o600"  # created on first start
    s.load_versions("digits", 1, 2)
    assert put_policy(s, MIRROR_ALL).status_code == 200
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
    start = NOW - timedelta(hours=1)
    assert wait_for(lambda: len(shadow_pairs(read(log_dir, start, datetime.now(UTC) + timedelta(minutes=1)))) == 10)
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=20)
    df = read(log_dir, start, datetime.now(UTC) + timedelta(minutes=1))
    assert sorted(df["role"].value_counts().items()) == [("primary", 10), ("shadow", 10)]
    assert (df["latency_ms"] > 0).all()
    assert set(df["outcome"]) == {"ok"}
    pairs = shadow_pairs(df)
    assert len(pairs) == 10
    for row in pairs.itertuples():
        trace_id, sha = sent[row.request_id]
        assert row.trace_id == trace_id  # the same trace on the primary response and both records
        assert row.image_sha256 == sha
        assert row.user_id.startswith("tok_")
        assert "example.com" not in row.meta
        assert "13800138000" not in row.meta
    assert set(df["trace_id"]) == {t for t, _ in sent.values()}
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


def logging_server(server_factory, repo_copy, tmp_path, *args: str, flush: str = "0.2", token: str = TOKEN, **kw):
    """A model server writing its prediction log to ``tmp_path / "predictions"`` every ``flush``
    seconds (its state in ``tmp_path / "state"``), its admin API behind ``token``; ``kw``:
    ``server_factory``'s (its ``port``)."""
    return server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--prediction-log",
        str(tmp_path / "predictions"),
        "--prediction-log-flush-s",
        flush,
        *args,
        token=token,
        **kw,
    )


def mirroring_server(server_factory, repo_copy, tmp_path, *args: str, flush: str = "0.2"):
    """``logging_server`` with versions 1 and 2 loaded, every request of version 1 mirrored to 2."""
    s = logging_server(server_factory, repo_copy, tmp_path, *args, flush=flush)
    s.load_versions("digits", 1, 2)
    assert put_policy(s, MIRROR_ALL).status_code == 200
    return s


@pytest.mark.integration
def test_nothing_a_client_sends_reaches_any_file_in_clear(server_factory, repo_copy, tmp_path, digit_images):
    """Request ids, header names, escaped and full-width values, values echoed by a 400: none
    of them reaches the server's log, the access log or the prediction log as sent; every file
    the server writes is mode 0600."""
    log_dir, state = tmp_path / "predictions", tmp_path / "state"
    s = mirroring_server(server_factory, repo_copy, tmp_path, "--access-log")
    image = digit_images[0][0]
    sent = [
        {"X-Request-ID": "order-13800138000"},
        {"X-Request-ID": "alice%40example.com"},
        {"X-Request-ID": "call-(555)-.234-4567"},
        {"X-Meta-13911112222": "1", "X-Meta-Note": "bob&#64;example.com"},
        {"X-Meta-Contact": "\uff11\uff13\uff18\uff10\uff10\uff11\uff13\uff18\uff10\uff10\uff10".encode()},
        {"X-Meta-Phone": "138\u200b0013\u200b8800".encode(), "X-Meta-Card": "4111\t1111\t1111\t1111"},
        {"X-Meta-Email": "jos\u00e9.m\u00fcller@example.de".encode()},
    ]
    for headers in sent:
        assert infer(s, image, headers).status_code == 200
    bad = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["carol@example.com"]}]}
    r = requests.post(
        f"{s.http}/v2/models/digits/infer", json=bad, headers={"X-Request-ID": "id-15900001111"}, timeout=10
    )
    assert r.status_code == 400
    assert "carol@example.com" in r.json()["error"]
    assert wait_for(lambda: len(read(log_dir, *window())) >= 2 * len(sent))
    s.stop()
    files = [f for f in [s.log, *log_dir.rglob("*"), *state.rglob("*")] if f.is_file()]
    # What a reader of each file sees: text as it is, Parquet decoded (its pages are compressed).
    written = "\n".join(
        json.dumps(pq.read_table(f).to_pylist(), default=str) if f.suffix == ".parquet" else f.read_text()
        for f in files
    ).encode()
    for clear in [
        b"13800138000",
        b"13911112222",
        b"15900001111",
        b"123-4567",
        b"example.com",
        b"example.de",
        b"%40",
        b"&#64;",
        "\uff11".encode(),
    ]:
        assert clear not in written, clear
    assert b'"request_id": "order-tok_' in written  # logged, and masked
    # The full-width number was read as a number and masked, not logged as Latin-1 mojibake
    # (which no detector reads, and any reader decodes back).
    metas = [json.loads(m) for m in read(log_dir, *window())["meta"].dropna().astype(str)]
    values = [v for m in metas for v in m.values()]
    # digits apart by zero-width spaces or tabs were read as the numbers they show, an address
    # with accented letters as an address: each masked whole
    hidden = [m[h] for m in metas for h in ("x-meta-phone", "x-meta-card", "x-meta-email") if h in m]
    assert len(hidden) == 6, metas
    assert all(re.fullmatch("tok_[A-Za-z_]+", v) for v in hidden), hidden
    assert any(v.startswith("tok_") for v in values)
    assert not any(re.search("[\u0080-\u00ff]", v) for v in values), values
    assert b'"status": 400' in written
    assert b"found 'tok_" in written
    private = [f for f in files if f != s.log]
    assert {f.suffix for f in private} >= {".json", ".parquet"}
    assert {oct(f.stat().st_mode & 0o777) for f in private} == {"0o600"}


@pytest.mark.integration
def test_killed_server_leaves_only_complete_files(server_factory, repo_copy, tmp_path, digit_images):
    log_dir = tmp_path / "predictions"
    s = mirroring_server(server_factory, repo_copy, tmp_path, flush="0.01")
    for i in range(150):
        infer(s, digit_images[i % 50][0])
    # (a busy machine's writer may lag the requests: the kill waits for its first file, then lands
    # while it writes more)
    assert wait_for(lambda: any(log_dir.rglob("part-*.parquet")), timeout=120), "the writer wrote nothing"
    for i in range(50):
        infer(s, digit_images[i][0])
    s.proc.send_signal(signal.SIGKILL)  # no clean shutdown: whatever was mid-write stays mid-write
    s.proc.wait(timeout=10)
    found = list(log_dir.rglob("part-*.parquet"))
    for f in found:
        assert pq.read_table(f).num_rows > 0  # every visible file is complete
    df = read(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert df.attrs["skipped_files"] == 0
    assert 0 < (df["role"] == "primary").sum() <= 200


@pytest.mark.integration
@pytest.mark.parametrize("storage", ["folder", "s3"])
def test_two_replicas_share_one_log_and_the_reader_joins_across_them(
    storage, request, server_factory, repo_copy, tmp_path, digit_images
):
    uri = str(tmp_path / "predictions") if storage == "folder" else request.getfixturevalue("s3").uri()
    keys = tmp_path / "keys.json"
    create_key_file(keys)
    ring = json.loads(keys.read_text())
    ring["tenants"] = {"acme": base64.b64encode(os.urandom(32)).decode()}  # acme's own key
    keys.write_text(json.dumps(ring))
    shared = tmp_path / "feedback-key"  # a Secret every replica mounts: any of them takes any label
    shared.write_text("a-feedback-secret-shared-by-the-replicas")
    common = (
        "--prediction-log",
        uri,
        "--mask-keys",
        str(keys),
        "--prediction-log-flush-s",
        "0.2",
        "--feedback-key-file",
        str(shared),
    )
    a = server_factory(repo_copy, "--state-dir", str(tmp_path / "a"), *common, "--replica-id", "replica-a", token=TOKEN)
    b = server_factory(repo_copy, "--state-dir", str(tmp_path / "b"), *common, "--replica-id", "replica-b", token=TOKEN)
    for s in (a, b):
        s.load_versions("digits", 1, 2)
        assert put_policy(s, MIRROR_ALL).status_code == 200
    start = datetime.now(UTC) - timedelta(seconds=5)
    truth, tokens = {}, {}
    for i in range(12):  # request ids carry a phone number: masked, under acme's key
        image, label = digit_images[i]
        rid = f"ra-{i}-13800138{i:03d}"
        r = infer(a, image, {"X-Request-ID": rid, "X-Tenant": "acme"})
        assert r.status_code == 200
        truth[rid], tokens[rid] = label, r.headers["X-Feedback-Token"]
    for i in range(8):
        assert infer(b, digit_images[20 + i][0], {"X-Request-ID": f"rb-{i}"}).status_code == 200
    labelled = list(truth)[:6]
    r = requests.post(
        f"{b.http}/v2/models/digits/feedback",
        headers={"X-Tenant": "acme"},
        timeout=10,
        json=[{"request_id": rid, "label": truth[rid], "token": tokens[rid]} for rid in labelled],
    )
    assert r.status_code == 200
    for answer in r.json()["results"]:  # b never served these: accepted into the log, not counted
        assert answer["status"] == 200
        assert answer["matched_locally"] is False
        assert answer["logged"] is True
    rid6 = list(truth)[6]
    r = requests.post(
        f"{a.http}/v2/models/digits/feedback",
        json={"request_id": rid6, "label": truth[rid6], "token": tokens[rid6]},
        timeout=10,
    )
    assert r.json()["matched_locally"] is True
    assert r.json()["version"] == "1"
    r = requests.post(
        f"{b.http}/v2/models/digits/feedback",
        json={
            "request_id": "never-served",
            "label": 4,
            "token": FeedbackSigner(read_key(shared)).token("digits", "never-served"),
        },
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["matched_locally"] is False
    # (each counts a label once its own writer wrote it: b's unmatched ones, then none matched)
    assert (
        settled(b, "feedback_unmatched_total", len(labelled) + 1, model="digits", reason="unknown") == len(labelled) + 1
    )
    assert (b.metric("feedback_total", model="digits", version="1") or 0) == 0  # b's live view: its own
    assert settled(a, "feedback_total", 1, model="digits", version="1") == 1
    assert wait_for(lambda: (a.metric("shadow_requests_total", model="digits", version="2", outcome="ok") or 0) == 12)
    assert wait_for(lambda: (b.metric("shadow_requests_total", model="digits", version="2", outcome="ok") or 0) == 8)
    a.stop()  # SIGTERM: each flushes what it holds
    b.stop()
    end = datetime.now(UTC) + timedelta(minutes=1)
    df = read(uri, start, end)
    assert df.attrs["skipped_files"] == 0
    assert {
        name.rsplit("/", 1)[1].split("-")[1] + "-" + name.rsplit("/", 1)[1].split("-")[2] for name in files(uri)
    } == {"replica-a", "replica-b"}
    assert set(df["replica"]) == {"replica-a", "replica-b"}
    j = joined(df)
    assert len(j) == 20
    with_label = j[j["label"].notna()]
    assert len(with_label) == 7  # six labelled through b, one through a
    assert set(with_label["replica"]) == {"replica-a"}
    assert not any("13800138" in rid for rid in df["request_id"])  # masked, yet joined
    assert j.attrs["unmatched_labels"] == 1
    assert list(unmatched_labels(df)["request_id"]) == ["never-served"]
    assert set(j["shadow_version"]) == {"2"}
    result = audit(uri, start, end, "digits")
    assert result.rows == 20  # every request of both replicas paired with its shadow by request id
    assert result.versions == {"primary": ["1"], "shadow": ["2"]}
    assert result.shadow_without_primary == 0
    assert result.primary_without_shadow == 0
    assert result.shadow_dropped == 0


@pytest.mark.integration
def test_a_request_for_a_shadow_host_is_a_shadow_copy(server_factory, repo_copy, tmp_path, digit_images):
    """What Istio's mirror sends (Host with -shadow) is logged and counted as shadow, never as
    primary, where a mesh mirrors (--mesh-mirror)."""
    log_dir = tmp_path / "predictions"
    s = logging_server(server_factory, repo_copy, tmp_path, "--mesh-mirror")
    hosts = ["digits.ml.svc.cluster.local-shadow:8000", "digits-shadow", f"127.0.0.1:{s.port}-shadow"]
    for i, host in enumerate(hosts):
        r = infer(s, digit_images[i][0], {"Host": host, "X-Request-ID": f"mirrored-{i}"})
        assert r.status_code == 200
        assert "X-Feedback-Token" not in r.headers  # no client was served: nothing to label
    assert infer(s, digit_images[5][0], {"X-Request-ID": "direct-1"}).status_code == 200
    assert s.metric("nv_inference_request_success", model="digits", version="1") == 1  # the direct one only
    assert s.metric("model_server_request_duration_seconds_count", model="digits", version="1", path="shadow") == 3
    assert s.metric("model_server_request_duration_seconds_count", model="digits", version="1", path="primary") == 1
    assert s.metric("shadow_requests_total", model="digits", version="1", outcome="ok") == 3
    assert (s.metric("model_server_routed_requests_total", model="digits", version="1", decided_by="mirror") or 0) == 0
    token = FeedbackSigner(read_key(tmp_path / "state" / "feedback-key")).token("digits", "mirrored-0")
    r = requests.post(
        f"{s.http}/v2/models/digits/feedback",
        json={"request_id": "mirrored-0", "label": 1, "token": token},
        timeout=10,
    )
    assert r.json()["matched_locally"] is False  # a shadow copy is not a prediction anyone was served
    s.stop()
    df = read(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    inferences = df[df["role"] != "label"]
    roles = dict(zip(inferences["request_id"], inferences["role"], strict=True))
    assert roles == {
        "mirrored-0": "shadow",
        "mirrored-1": "shadow",
        "mirrored-2": "shadow",
        "direct-1": "primary",
    }
    assert set(inferences[inferences["role"] == "shadow"]["route"]) == {"mirror"}


@pytest.mark.integration
def test_without_a_mesh_a_shadow_host_is_a_clients_request(server_factory, repo_copy, tmp_path, digit_images):
    """Review s53-2: a server that mirrors in process (no mesh in front) took any client's Host
    "...-shadow" for a mirror's copy, counted as the shadow's: 990 forged successes took a
    candidate failing every real copy from a shadow error rate of 100% to 1%, under the
    rollout's 0.1% guard. Without --mesh-mirror such a request is a client's, routed, counted and
    logged as the primary it is; its label is taken."""
    log_dir = tmp_path / "predictions"
    s = mirroring_server(server_factory, repo_copy, tmp_path)
    r = infer(s, digit_images[0][0], {"Host": "digits-shadow", "X-Request-ID": "forged"})
    assert r.status_code == 200
    assert r.headers["X-Model-Version"] == "1"  # (the policy's route: the mirror's version is 2)
    assert "X-Feedback-Token" in r.headers
    assert s.metric("model_server_routed_requests_total", model="digits", version="1", decided_by="route") == 1
    assert wait_for(lambda: s.metric("shadow_requests_total", model="digits", version="2", outcome="ok") == 1)
    item = {"request_id": "forged", "label": digit_images[0][1], "token": r.headers["X-Feedback-Token"]}
    fed = requests.post(f"{s.http}/v2/models/digits/feedback", json=item, headers={"Host": "digits-shadow"}, timeout=10)
    assert fed.json()["matched_locally"] is True
    start, end = NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    assert wait_for(lambda: len(read(log_dir, start, end)) == 3)  # the primary, its copy, the label
    s.stop()
    df = read(log_dir, start, end)
    assert sorted(df["role"]) == ["label", "primary", "shadow"]
    assert dict(zip(df["role"], df["version"], strict=True)) == {"primary": "1", "shadow": "2", "label": "1"}


@pytest.mark.integration
def test_a_shadow_host_request_of_another_image_is_not_paired_with_the_request_it_names(
    server_factory, repo_copy, tmp_path, digit_images
):
    """A client can send Host ...-shadow under a served request id, before the mirror's copy of
    that request, where a mesh mirrors (--mesh-mirror): with another image it pairs with nothing,
    and the copy still pairs."""
    log_dir = tmp_path / "predictions"
    s = mirroring_server(server_factory, repo_copy, tmp_path, "--mesh-mirror")
    assert infer(s, digit_images[1][0], {"Host": "x-shadow", "X-Request-ID": "served-1"}).status_code == 200
    assert infer(s, digit_images[0][0], {"X-Request-ID": "served-1"}).status_code == 200
    start, end = NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    assert wait_for(lambda: len(read(log_dir, start, end)) == 3)  # the primary, the forged record, the copy
    s.stop()
    df = read(log_dir, start, end)
    sha = hashlib.sha256(digit_images[0][0]).hexdigest()
    copy = df[(df["role"] == "shadow") & (df["image_sha256"] == sha)]
    assert len(copy) == 1
    pairs = shadow_pairs(df)
    assert list(pairs["span_id"]) == list(copy["span_id"])  # the mirror's copy, not the earlier record
    assert list(pairs["image_sha256"]) == [sha]
    assert pairs.attrs["input_mismatch"] == 1
    assert pairs.attrs["duplicates"] == 0


@pytest.mark.integration
def test_sampling_spares_mirrored_versions_and_named_versions(server_factory, repo_copy, tmp_path, digit_images):
    log_dir = tmp_path / "predictions"
    s = server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--prediction-log",
        str(log_dir),
        "--prediction-log-sample",
        "0",
        token=TOKEN,
    )
    s.load_versions("digits", 1, 2)
    assert put_policy(s, {"route": [{"version": "1", "weight": 100}]}).status_code == 200
    for i in range(5):
        assert infer(s, digit_images[i][0], {"X-Request-ID": f"plain-{i}"}).status_code == 200
    assert infer(s, digit_images[0][0], {"X-Request-ID": "named-0", "X-Model-Version": "2"}).status_code == 200
    assert put_policy(s, MIRROR_ALL).status_code == 200
    for i in range(4):
        assert infer(s, digit_images[i][0], {"X-Request-ID": f"mirrored-{i}"}).status_code == 200
    assert wait_for(lambda: (s.metric("shadow_requests_total", model="digits", version="2", outcome="ok") or 0) == 4)
    s.stop()
    df = read(log_dir, NOW - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    kept = df.groupby("role")["request_id"].apply(lambda x: sorted(set(x))).to_dict()
    assert kept["primary"] == ["mirrored-0", "mirrored-1", "mirrored-2", "mirrored-3", "named-0"]
    assert kept["shadow"] == ["mirrored-0", "mirrored-1", "mirrored-2", "mirrored-3"]


@pytest.mark.integration
def test_a_label_is_masked_under_the_key_of_its_tenant_as_the_client_wrote_it(
    server_factory, repo_copy, tmp_path, digit_images
):
    """A label this replica did not serve takes its tenant from the feedback request's X-Tenant,
    read as UTF-8 as an inference's is: read as Latin-1, a tenant "阿里" named no key (its label's
    request id was masked under the default key, so it joined no prediction of that tenant), and
    a full-width number in X-Tenant reached the label's tenant column as mojibake no detector read."""
    keys = tmp_path / "keys.json"
    create_key_file(keys)
    ring = json.loads(keys.read_text())
    ring["tenants"] = {"\u963f\u91cc": base64.b64encode(os.urandom(32)).decode()}
    keys.write_text(json.dumps(ring))
    shared = tmp_path / "feedback-key"
    shared.write_text("a-feedback-secret-shared-by-the-replicas")
    log_dir = tmp_path / "predictions"
    s = logging_server(
        server_factory, repo_copy, tmp_path, "--mask-keys", str(keys), "--feedback-key-file", str(shared)
    )
    signer = FeedbackSigner(read_key(shared))
    served = infer(s, digit_images[0][0], {"X-Request-ID": "order-13800138000", "X-Tenant": "\u963f\u91cc".encode()})
    assert served.status_code == 200
    sent = {
        "elsewhere-13800138000": "\u963f\u91cc",
        "elsewhere-13911112222": "\uff11\uff13\uff19\uff11\uff11\uff11\uff11\uff12\uff12\uff12\uff12",
    }
    for rid, tenant in sent.items():
        r = requests.post(
            f"{s.http}/v2/models/digits/feedback",
            headers={"X-Tenant": tenant.encode()},
            json={"request_id": rid, "label": 3, "token": signer.token("digits", rid, tenant)},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert r.json()["matched_locally"] is False
    s.stop()
    df = read(log_dir, *window())
    labels = df[df["role"] == "label"]
    assert len(labels) == 2, df
    masked = KeyRing(keys)
    tenant_kid = masked.key_for("\u963f\u91cc").kid
    primary_rid = df.loc[df["role"] == "primary", "request_id"].iloc[0]
    assert primary_rid.startswith(f"order-tok_{tenant_kid}_")
    by_tenant = {str(t): str(rid) for t, rid in zip(labels["tenant"], labels["request_id"], strict=True)}
    assert by_tenant["\u963f\u91cc"].startswith(f"elsewhere-tok_{tenant_kid}_"), by_tenant
    fullwidth = [t for t in by_tenant if t != "\u963f\u91cc"]
    assert len(fullwidth) == 1, by_tenant
    assert re.fullmatch("tok_[A-Za-z_]+", fullwidth[0]), by_tenant


def test_a_primary_says_whether_its_mirror_sampled_it_and_older_files_still_read(log_uri, tmp_path):
    """A primary record says whether the serving process sampled it for its mirror (``mirrored``:
    true, false, or null where it cannot know, as behind Istio's mirror), so a reader waits only
    for the copies that will come. A file of an older writer, without the column, is read as it
    was, its records' ``mirrored`` null, never skipped as of a wrong schema."""
    w = writer(tmp_path, log_uri)
    w.append(primary("sampled")._replace(mirrored=True))
    w.append(primary("unsampled")._replace(mirrored=False))
    w.append(shadow("sampled"))
    w.flush()
    (name,) = files(log_uri)
    df = read(log_uri, *window())
    said = {(r.request_id, r.role): None if pd.isna(r.mirrored) else bool(r.mirrored) for r in df.itertuples()}
    assert said == {("sampled", "primary"): True, ("unsampled", "primary"): False, ("sampled", "shadow"): None}

    fs, root = filesystem(log_uri)
    with fs.open_input_stream(f"{root}/{name}") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    older = table.drop_columns(["mirrored"])
    sink = pa.BufferOutputStream()
    pq.write_table(older, sink)
    put_file(log_uri, name.replace("part-test-1", "part-older"), sink.getvalue().to_pybytes())
    for columns in (None, ["request_id", "role", "mirrored"], GATE_COLUMNS):
        df = read(log_uri, *window(), columns=columns)
        assert df.attrs["skipped_files"] == 0, df.attrs["skipped_file_reasons"]
        assert len(df) == 2 * len(table)
    both = read(log_uri, *window(), columns=["request_id", "role", "mirrored"], written=True)
    assert both["mirrored"].isna().sum() == len(table) + 2  # the older file's rows, and the new file's shadow


@pytest.mark.integration
def test_server_metadata_says_where_the_log_is_written_and_nothing_secret(server_factory, repo_copy, tmp_path):
    """Nothing said where a model server writes its prediction log: a rollout reading another
    one found out only a flush and a replay round into a stage (over a minute). Its metadata
    says it now (``parameters.prediction_log``): the folder's absolute path, or the bucket and
    prefix of an object store without credentials, options or endpoint; null without a log."""
    from model_server.files import location

    with_log = server_factory(repo_copy, "--prediction-log", str(tmp_path / "log"), token=TOKEN)
    said = requests.get(f"{with_log.http}/v2", headers=with_log.admin, timeout=10).json()
    assert said["parameters"] == {"prediction_log": f"file://{(tmp_path / 'log').resolve()}"}
    without = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    said = requests.get(f"{without.http}/v2", headers=without.admin, timeout=10).json()
    assert said["parameters"] == {"prediction_log": None}

    secret = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/pre/fix/?endpoint_override=minio.internal:9000&secret_key=x"
    assert location(secret) == "s3://bucket/pre/fix"
    assert location("gcs://bucket/p") == location("gs://bucket/p/") == "gs://bucket/p"
    assert location(f"file://{tmp_path}/a/../log") == location(tmp_path / "log") == f"file://{tmp_path.resolve()}/log"


@pytest.mark.integration
def test_where_the_log_is_written_is_said_to_the_admin_token_alone_unless_told_otherwise(
    server_factory, repo_copy, tmp_path
):
    """``GET /v2`` said where the prediction log is written (the bucket and prefix, or the
    folder's absolute path) to anyone who reached the serving port. It is said by default only
    to a caller with the admin token (the rollout, which checks it against its own log), as the
    admin calls are; ``--show-prediction-log everyone`` says it to all, ``nobody`` to none (the
    rollout then finds a wrong log the slower way). Withheld, ``parameters`` has no
    ``prediction_log`` at all: null would say the server writes none."""
    from vision_rollout.engine import log_elsewhere

    log = str(tmp_path / "log")
    where = f"file://{(tmp_path / 'log').resolve()}"

    def opts(state: str) -> tuple[str, ...]:
        return ("--prediction-log", log, "--state-dir", str(tmp_path / state))

    default = server_factory(repo_copy, *opts("a"), token=TOKEN)
    assert requests.get(f"{default.http}/v2", timeout=10).json()["parameters"] == {}
    wrong = {"Authorization": "Bearer not-the-token"}
    assert requests.get(f"{default.http}/v2", headers=wrong, timeout=10).json()["parameters"] == {}
    said = requests.get(f"{default.http}/v2", headers=default.admin, timeout=10)
    assert said.status_code == 200
    assert said.json()["parameters"] == {"prediction_log": where}
    # The rollout asks with its token; without it, it cannot tell (and finds out the slower way).
    other = str(tmp_path / "other")
    assert log_elsewhere(default.url, other) is None
    assert f"it writes {where}" in (log_elsewhere(default.url, other, TOKEN) or "")

    shown = server_factory(repo_copy, *opts("b"), "--show-prediction-log", "everyone", token=TOKEN)
    assert requests.get(f"{shown.http}/v2", timeout=10).json()["parameters"] == {"prediction_log": where}

    hidden = server_factory(repo_copy, *opts("c"), "--show-prediction-log", "nobody", token=TOKEN)
    assert requests.get(f"{hidden.http}/v2", headers=hidden.admin, timeout=10).json()["parameters"] == {}
    with pytest.raises(RuntimeError, match=r"--show-prediction-log.*'somebody'"):
        server_factory(repo_copy, "--show-prediction-log", "somebody", token=TOKEN)


def test_an_hour_folder_of_too_many_files_is_listed_in_part_and_named(log_uri, tmp_path, monkeypatch):
    """Each hour folder was listed whole into memory (pyarrow's listing holds every entry): a
    writer flushing every 10 ms, or a folder of 100,000 stray files, made each read hold a
    million listing entries before it read one record. A read lists at most
    ``MAX_LISTED_FILES`` files of a folder (in S3 by pages of ``LIST_PAGE`` keys, never more
    pages than that takes), reads those, and counts the folder ``crowded_folders``; an empty
    part-file is skipped and named like any file that is no Parquet file."""
    monkeypatch.setattr(predictionlog, "MAX_LISTED_FILES", 5)
    monkeypatch.setattr(predictionlog, "LIST_PAGE", 2)
    w = writer(tmp_path, log_uri)
    for k in range(4):
        w.append(primary(f"r-{k}"))
        w.flush()
    whole = read(log_uri, *window(), columns=["request_id"])
    assert (whole.attrs["files_read"], whole.attrs["crowded_folders"]) == (4, 0)
    folder = files(log_uri)[0].rsplit("/", 1)[0]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for k in range(4):
        put_file(log_uri, f"{folder}/part-x-{stamp}Z-{k:012x}.parquet", b"")
    crowded = read(log_uri, *window(), columns=["request_id"])
    assert crowded.attrs["crowded_folders"] == 1
    assert crowded.attrs["files_read"] + crowded.attrs["skipped_files"] == 5
    assert all(r.startswith("unreadable") for r in crowded.attrs["skipped_file_reasons"].values())


def test_a_folder_of_many_unreadable_files_logs_a_few_lines_not_one_a_file(tmp_path, caplog):
    """Each file a read skipped was a warning of its own, again at every poke (a skipped file is
    never cached): an hour folder of 100,000 empty part-files wrote 100,000 lines into each
    poke's task log. The first ``LOGGED_SKIPS`` are named, the rest counted in one line; all are
    still in ``skipped_file_reasons``."""
    import logging

    w = writer(tmp_path)
    w.append(primary("good"))
    w.flush()
    uri = str(tmp_path / "log")
    folder = files(uri)[0].rsplit("/", 1)[0]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for k in range(50):
        put_file(uri, f"{folder}/part-x-{stamp}Z-{k:012x}.parquet", b"")
    with caplog.at_level(logging.WARNING, logger="model_server.predictionlog"):
        df = read(uri, *window(), columns=["request_id"])
    assert len(df.attrs["skipped_file_reasons"]) == 50
    lines = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == predictionlog.LOGGED_SKIPS + 1
    assert f"and {50 - predictionlog.LOGGED_SKIPS} more prediction log files" in lines[-1].getMessage()


@pytest.mark.timeout(90)
def test_a_log_file_the_store_never_answers_for_is_skipped_after_a_few_short_tries(s3, tmp_path, monkeypatch):
    """pyarrow's S3 client waited about 30 s for an answer, three times (about 100 s a request),
    on a store that lists and then never answers a file's read: each file of a gate's or an
    audit's read held it that long, past any deadline (one only keeps reads from beginning).
    Its requests wait ``READ_TIMEOUT_S`` for bytes (``CONNECT_TIMEOUT_S`` to connect), as
    boto3's do: the file is skipped, named unreadable, and the read goes on."""
    import threading

    from model_server import files as model_files
    from tests.support.s3proxy import s3_proxy

    prefix = f"log-{time.time_ns()}"
    w = writer(tmp_path, s3.uri(prefix))
    w.append(primary())
    assert w.flush() == 2
    monkeypatch.setattr(model_files, "READ_TIMEOUT_S", 0.5)
    released = threading.Event()

    def stall_reads(seen):
        if seen.method in ("GET", "HEAD") and "part-" in seen.path:
            released.wait(120)
        return None

    with s3_proxy(s3.port) as proxy:
        proxy.before = stall_reads
        try:
            df = read(proxy.uri(BUCKET, prefix), *window())
        finally:
            released.set()
    (reason,) = df.attrs["skipped_file_reasons"].values()
    assert reason.startswith("unreadable")
    assert "Timeout" in reason
    assert len(df) == 0


def test_a_footer_no_writer_of_the_log_makes_is_skipped_unparsed(tmp_path):
    """A file's footer was read whole and parsed byte by byte by the project's own parser,
    whatever its size: a file of one row group a record (2,000 took a footer of 3.8 MB and 3 s of
    a worker's CPU; pyarrow takes footers up to 100 MB, over a minute each) ran a read past its
    deadline, in each of its threads, and held the footers in memory. A writer's file (8 MiB at
    most) holds a row group or two: a footer over ``MAX_FOOTER_BYTES`` is skipped, named, never
    parsed, and the other files read."""
    uri = str(tmp_path / "log")
    w = writer(tmp_path, uri)
    w.append(primary("good"))
    w.flush()
    (good,) = files(uri)
    folder = good.rsplit("/", 1)[0]
    table = pq.read_table(f"{uri}/{good}").slice(0, 1)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables([table] * 700), sink, row_group_size=1)
    data = sink.getvalue().to_pybytes()
    assert int.from_bytes(data[-8:-4], "little") > predictionlog.MAX_FOOTER_BYTES
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    put_file(uri, f"{folder}/part-x-{stamp}Z-{1:012x}.parquet", data)
    df = read(uri, *window(), columns=["request_id"])
    assert list(df["request_id"]) == ["good", "good"]
    (reason,) = df.attrs["skipped_file_reasons"].values()
    assert reason.startswith("unreadable: its footer takes over"), reason


def test_the_writer_names_each_kind_of_output_once_not_each_record(tmp_path):
    """The writer named every record's output (``output_kind``: dtype and row shape, FP32[10])
    anew, 1.4 us of a record's 11 in its flush. A kind is named once now, every record of it
    still written with its name: a byte-swapped float32 is FP32 too, strings are BYTES."""
    predictionlog._kind.cache_clear()
    w = writer(tmp_path)
    for i in range(50):
        assert w.append(primary(f"r-{i}"))
    assert w.append(primary("swapped", scores=np.eye(10, dtype=">f4")[[1, 2]]))
    assert w.append(primary("labels", scores=np.array([["cat"], ["dog"]])))
    assert w.flush() == 104
    table = pa.concat_tables(pq.read_table(f) for f in (tmp_path / "log").rglob("*.parquet"))
    kinds = dict(zip(table["request_id"].to_pylist(), table["output"].to_pylist(), strict=True))
    assert {kinds["r-0"], kinds["r-49"], kinds["swapped"], kinds["labels"]} == {"FP32[10]", "BYTES[1]"}
    assert kinds["labels"] == "BYTES[1]"
    assert predictionlog._kind.cache_info().misses == 3  # float32, its byte-swapped twin, the strings


def test_behind_istio_pairs_stamped_further_apart_than_the_clocks_may_be_measure_no_clock_offset():
    """The copies' stamps are corrected by their pod's clock offset, measured on the keys of one
    primary and one copy of one input (their median), before the nearest-in-time matching; a
    pair stamped more than ``CLOCK_SKEW_S`` apart is no measure of it (another request's copy,
    a hostile stamp). 20 such keys, copies 100 s after their primary, and an id sent twice 1 s
    apart, each attempt's copy 0.1 s after it: taken as an offset of 100 s, each copy's nearest
    was the id's later attempt and the two swapped; each copy is its own attempt's."""
    t0 = pd.Timestamp("2026-03-01T10:10:00Z")
    rows = []
    for i in range(20):
        rows.append(("primary", f"r{i}", t0 + pd.Timedelta(seconds=i), f"img-{i}", "1", "primary-pod"))
        rows.append(("shadow", f"r{i}", t0 + pd.Timedelta(seconds=i + 100), f"img-{i}", "2", "shadow-pod"))
    for k in range(2):
        at = t0 + pd.Timedelta(seconds=50 + k)
        rows.append(("primary", "again", at, "img", "1", "primary-pod"))
        rows.append(("shadow", "again", at + pd.Timedelta(seconds=0.1), "img", "2", "shadow-pod"))
    df = pd.DataFrame(rows, columns=["role", "request_id", "time", "image_sha256", "version", "replica"])
    df["model"], df["item"], df["outcome"] = "digits", 0, "ok"
    _, of, paired = copy_of(df)
    again = np.flatnonzero((df["request_id"] == "again").to_numpy())
    assert list(of[again]) == [again[0], again[0], again[2], again[2]]
    assert paired[again[1::2]].all()
