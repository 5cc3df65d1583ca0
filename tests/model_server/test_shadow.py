"""Shadow mirroring on a real server: off the primary path, bounded, counted, any body size."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from PIL import Image

from model_server.predictionlog import read
from tests.support import TOKEN, infer, put_policy

pytestmark = pytest.mark.integration

MIRROR_ALL = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}


def start(server_factory, repo_copy, tmp_path, *args: str):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), *args, token=TOKEN)
    s.load_versions("digits", 1, 2)
    assert put_policy(s, MIRROR_ALL).status_code == 200
    return s


def shadow_count(s, outcome: str) -> float:
    return s.metric("shadow_requests_total", model="digits", version="2", outcome=outcome) or 0.0


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def set_fault(s, version: str, fault: dict) -> None:
    r = requests.put(f"{s.http}/v2/models/digits/versions/{version}/fault", json=fault, headers=s.admin, timeout=10)
    assert r.status_code == 200, r.text


def test_every_request_is_mirrored_and_only_the_primary_counts_as_traffic(
    server_factory, repo_copy, tmp_path, digit_images
):
    s = start(server_factory, repo_copy, tmp_path)
    for i in range(40):
        r = infer(s, digit_images[i][0], {"X-User-ID": f"u{i}"})
        assert r.status_code == 200
        assert r.headers["X-Model-Version"] == "1"
    assert wait_until(lambda: shadow_count(s, "ok") == 40)
    assert s.metric("model_server_request_duration_seconds_count", model="digits", version="2", path="shadow") == 40
    assert s.metric("nv_inference_request_success", model="digits", version="1") == 40
    # The shadow's copies are not version 2's traffic: its primary counters stay at zero.
    assert (s.metric("nv_inference_request_success", model="digits", version="2") or 0) == 0
    assert s.metric("model_server_mirror_percent", model="digits", version="2") == 100


def logged(s, log_dir):
    """The server's prediction log, after a clean stop has flushed it."""
    s.stop()
    return read(log_dir, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))


def test_failing_shadow_leaves_the_primary_untouched(server_factory, repo_copy, tmp_path, digit_images):
    s = start(server_factory, repo_copy, tmp_path, "--prediction-log", str(tmp_path / "log"))
    set_fault(s, "2", {"abort": {"percent": 100}})
    for i in range(20):
        assert infer(s, digit_images[i][0]).status_code == 200
    assert wait_until(lambda: shadow_count(s, "error") == 20)
    assert shadow_count(s, "ok") == 0
    assert s.metric("nv_inference_request_success", model="digits", version="1") == 20
    assert (s.metric("nv_inference_request_failure", model="digits", version="1", reason="BACKEND") or 0) == 0
    df = logged(s, tmp_path / "log")
    shadows = df[df["role"] == "shadow"]
    assert len(shadows) == 20
    assert set(shadows["outcome"]) == {"FAULT"}  # the injected abort, told apart from a backend error
    assert shadows["top1"].isna().all()
    assert set(df[df["role"] == "primary"]["outcome"]) == {"ok"}


def test_requests_the_primary_failed_are_mirrored_as_envoy_mirrors_them(
    server_factory, repo_copy, tmp_path, digit_images
):
    """Envoy copies every request of a mirrored route before its primary's outcome is known. A
    request the primary failed reaches the shadow, whose outcome is its own; one the primary
    refused as the client's (the model's decoding and checks, the same for every version) is
    refused by the shadow alike, counted apart from its errors."""
    s = start(server_factory, repo_copy, tmp_path, "--prediction-log", str(tmp_path / "log"))
    set_fault(s, "1", {"abort": {"percent": 100}})
    n = 6
    for i in range(n):
        assert infer(s, digit_images[i][0], {"X-Request-ID": f"failed-{i}"}).status_code == 500
    assert wait_until(lambda: shadow_count(s, "ok") == n)
    garbage = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    r = requests.post(f"{s.http}/v2/models/digits/infer", json=garbage, headers={"X-Request-ID": "garbage"}, timeout=10)
    assert r.status_code == 400
    assert wait_until(lambda: shadow_count(s, "rejected") == 1)
    assert shadow_count(s, "error") == 0
    df = logged(s, tmp_path / "log")
    shadows = df[df["role"] == "shadow"].set_index("request_id")
    assert sorted(shadows.index) == sorted(df[df["role"] == "primary"]["request_id"])
    assert shadows.loc["garbage", "outcome"] == "INVALID_INPUT"
    assert set(shadows.drop(index="garbage")["outcome"]) == {"ok"}
    assert set(df[df["role"] == "primary"]["outcome"]) == {"FAULT", "INVALID_INPUT"}


def test_slow_shadow_does_not_slow_the_primary_and_overflow_is_dropped(
    server_factory, repo_copy, tmp_path, digit_images
):
    s = start(
        server_factory,
        repo_copy,
        tmp_path,
        "--shadow-queue",
        "2",
        "--shadow-workers",
        "1",
        "--prediction-log",
        str(tmp_path / "log"),
    )
    set_fault(s, "2", {"delay": {"ms": 4000, "percent": 100}})
    n = 10
    for i in range(n):
        assert infer(s, digit_images[i][0]).status_code == 200
    # Every primary has been answered and not one shadow copy has finished (each takes 4 s): the
    # client never waited for a shadow. One copy runs, two wait in the queue, the rest were dropped.
    assert shadow_count(s, "ok") == 0
    assert shadow_count(s, "dropped") >= n - 3
    assert wait_until(lambda: shadow_count(s, "ok") + shadow_count(s, "dropped") == n)
    assert shadow_count(s, "ok") >= 1
    assert (
        s.metric(
            "model_server_request_duration_seconds_bucket",
            model="digits",
            version="2",
            path="shadow",
            le="1.0",
        )
        or 0
    ) == 0
    ran, dropped = shadow_count(s, "ok"), shadow_count(s, "dropped")
    df = logged(s, tmp_path / "log")
    shadows = df[df["role"] == "shadow"]
    # Every copy is a record, run or dropped, so the primaries' pairs are complete.
    assert (shadows["outcome"] == "ok").sum() == ran
    assert (shadows["outcome"] == "DROPPED").sum() == dropped
    assert set(shadows["request_id"]) == set(df[df["role"] == "primary"]["request_id"])


def test_bodies_over_one_mebibyte_are_mirrored(server_factory, repo_copy, tmp_path, digit_images):
    s = start(server_factory, repo_copy, tmp_path)
    img = Image.open(io.BytesIO(digit_images[0][0])).resize((1024, 1024), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)  # about 1 MiB of pixels, stored
    big = buf.getvalue()
    assert len(big) > 1024 * 1024
    r = infer(s, big)
    assert r.status_code == 200
    assert wait_until(lambda: shadow_count(s, "ok") == 1)


def test_fault_injection_is_admin_only_and_validated(server_factory, repo_copy, tmp_path):
    s = start(server_factory, repo_copy, tmp_path)
    url = f"{s.http}/v2/models/digits/versions/2/fault"
    assert requests.put(url, json={"delay": {"ms": 5}}, timeout=5).status_code == 401
    r = requests.put(url, json={"delay": {"ms": -1}}, headers=s.admin, timeout=5)
    assert r.status_code == 400
    assert "delay.ms" in r.json()["error"]
    for constant in ("NaN", "Infinity", "-Infinity"):  # Python's json takes them; JSON has none
        r = requests.put(url, data=f'{{"delay": {{"ms": {constant}}}}}', headers=s.admin, timeout=5)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == f"malformed JSON in request body: {constant} is not a JSON value"
    assert requests.get(url, headers=s.admin, timeout=5).json()["delay"]["ms"] == 0
    set_fault(s, "2", {"delay": {"ms": 5, "percent": 50}})
    assert requests.get(url, headers=s.admin, timeout=5).json()["delay"] == {"ms": 5.0, "percent": 50.0}
    set_fault(s, "2", {})
    assert requests.get(url, headers=s.admin, timeout=5).json()["delay"]["ms"] == 0


def test_requests_that_name_their_version_are_not_mirrored(server_factory, repo_copy, tmp_path, digit_images):
    s = start(server_factory, repo_copy, tmp_path, "--shadow-workers", "1")  # one worker: copies in order
    assert infer(s, digit_images[0][0], path="/v2/models/digits/versions/1/infer").status_code == 200
    assert infer(s, digit_images[0][0], {"X-Model-Version": "1"}).status_code == 200
    assert infer(s, digit_images[0][0]).status_code == 200  # routed: mirrored
    # The routed request's copy ran last in the queue: any copy of the two before it ran first.
    assert wait_until(lambda: shadow_count(s, "ok") == 1)
    assert shadow_count(s, "ok") + shadow_count(s, "dropped") + shadow_count(s, "error") == 1


def big_png(digit_images) -> bytes:
    img = Image.open(io.BytesIO(digit_images[0][0])).resize((1024, 1024), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def test_the_queue_is_bounded_in_bytes(server_factory, repo_copy, tmp_path, digit_images):
    """24 mirrored 16 MB requests held +311 MB: the count bound alone let the defaults reach
    16 GB. Copies past --shadow-queue-mb are dropped and counted, whatever the count bound."""
    s = start(server_factory, repo_copy, tmp_path, "--shadow-queue-mb", "1.5", "--shadow-workers", "1")
    set_fault(s, "2", {"delay": {"ms": 3000, "percent": 100}})
    big = big_png(digit_images)
    n = 6
    for _ in range(n):
        assert infer(s, big).status_code == 200
    # One copy runs (off the queue), one waits (1 MiB of 1.5), the others are over the bytes.
    assert shadow_count(s, "dropped") >= n - 2
    assert wait_until(lambda: shadow_count(s, "ok") + shadow_count(s, "dropped") == n)


def test_the_rollout_probe_runs_at_once_and_needs_the_admin_token(models_dir, digit_images):
    """The enable_shadow probe waited behind load for idle time that a slow candidate under
    traffic never had (a flaky end-to-end test). With X-Shadow-Probe its copy runs at once."""
    import asyncio

    import numpy as np

    from model_server.protocol import InferInput
    from model_server.repository import ModelRepository
    from model_server.shadow import ShadowJob, ShadowMirror
    from model_server.trace import TraceContext

    async def scenario() -> tuple[list[str], list[str]]:
        repo = ModelRepository(models_dir, ["CPUExecutionProvider"])
        repo.load("digits")
        done: list[str] = []
        mirror = ShadowMirror(repo, sink=lambda r: done.append(r.job.request_id))
        mirror.start()
        data = np.array([digit_images[0][0]], dtype=object)

        def job(rid: str, probe: bool) -> ShadowJob:
            return ShadowJob(
                "digits",
                "1",
                "1",
                [InferInput("image", "BYTES", (1,), data)],
                ["probabilities"],
                rid,
                TraceContext.from_header(None),
                time.time(),
                None,
                1.0,
                probe=probe,
            )

        with mirror.gate:  # a primary in flight, and another, and another: no idle time at all
            mirror.submit(job("queued", probe=False))
            mirror.submit(job("probe", probe=True))
            for _ in range(200):
                if done:
                    break
                await asyncio.sleep(0.05)
            during = list(done)
        for _ in range(200):
            if len(done) == 2:
                break
            await asyncio.sleep(0.05)
        await mirror.stop()
        repo.close_all()
        return during, done

    during, after = asyncio.run(scenario())
    assert during == ["probe"]  # the ordinary copy waits for idle time, the probe does not
    assert after == ["probe", "queued"]


def test_a_probe_without_the_admin_token_is_refused_and_one_with_it_is_logged_as_the_probe(
    server_factory, repo_copy, tmp_path, digit_images
):
    """The probe is nobody's traffic: its primary is logged as the route ``probe`` (the gate
    leaves it out of the baseline's evidence), its copy as any shadow."""
    s = start(server_factory, repo_copy, tmp_path, "--prediction-log", str(tmp_path / "log"))
    assert infer(s, digit_images[0][0], {"X-Shadow-Probe": "1"}).status_code == 401
    assert infer(s, digit_images[0][0], {"X-Shadow-Probe": "1", **s.admin}).status_code == 200
    assert infer(s, digit_images[1][0]).status_code == 200
    assert wait_until(lambda: shadow_count(s, "ok") == 2)
    df = logged(s, tmp_path / "log").sort_values("time")
    assert list(df.loc[df["role"] == "primary", "route"]) == ["probe", "route"]
    assert list(df.loc[df["role"] == "shadow", "route"]) == ["mirror", "mirror"]


def test_copies_for_a_version_that_left_service_are_dropped_not_failed(repo_copy, digit_images):
    """A rollback removes the mirror, then unloads the candidate: the copies still queued for it
    failed, counted as shadow errors (BACKEND in the log), which the shadow error-rate guard and
    the audit read as the candidate's failures. They are dropped, saying why."""
    import asyncio

    import numpy as np
    from prometheus_client import REGISTRY

    from model_server.protocol import InferInput
    from model_server.repository import ModelRepository
    from model_server.shadow import ShadowJob, ShadowMirror, ShadowResult
    from model_server.trace import TraceContext

    def versions(*numbers: int) -> dict:
        return {"version_policy": {"specific": {"versions": list(numbers)}}}

    def counted(outcome: str) -> float:
        labels = {"model": "digits", "version": "2", "outcome": outcome}
        return REGISTRY.get_sample_value("shadow_requests_total", labels) or 0.0

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", versions(1, 2))
    results: list[ShadowResult] = []
    mirror = ShadowMirror(repo, sink=results.append)
    data = np.array([digit_images[0][0]], dtype=object)
    job = ShadowJob(
        "digits",
        "1",
        "2",
        [InferInput("image", "BYTES", (1,), data)],
        ["probabilities"],
        "left-service",
        TraceContext.from_header(None),
        time.time(),
        None,
        1.0,
    )
    try:
        assert asyncio.run(mirror.run(job)).outcome == "ok"  # while version 2 serves
        before = {outcome: counted(outcome) for outcome in ("ok", "error", "dropped")}
        repo.load("digits", versions(1))
        assert asyncio.run(mirror.run(job)) is None
        repo.unload("digits")
        assert asyncio.run(mirror.run(job)) is None
    finally:
        repo.close_all()
    assert [r.outcome for r in results] == ["DROPPED", "DROPPED"]
    assert results[0].error == (
        "shadow version left service: model unavailable: model 'digits' version 2 is not loaded (loaded: [1]); "
        "chosen by the traffic policy's mirror"
    )
    assert results[1].error == "shadow version left service: model 'digits' is not loaded"
    assert before["ok"] >= 1
    # (its series went when it left service, as Triton's do: counted from 0 since)
    assert {outcome: counted(outcome) for outcome in before} == {"ok": 0, "error": 0, "dropped": 2}


def test_copies_in_flight_at_shutdown_are_recorded_as_dropped(server_factory, repo_copy, tmp_path, digit_images):
    """A stop finishes the queued copies for up to 5 s and then cancels the workers: the copy
    that was running then was neither counted nor logged, and its primary had no pair."""
    s = start(server_factory, repo_copy, tmp_path, "--shadow-workers", "1", "--prediction-log", str(tmp_path / "log"))
    set_fault(s, "2", {"delay": {"ms": 8000, "percent": 100}})  # longer than the stop's drain
    n = 3
    for i in range(n):
        assert infer(s, digit_images[i][0]).status_code == 200
    df = logged(s, tmp_path / "log")
    shadows = df[df["role"] == "shadow"]
    assert sorted(shadows["request_id"]) == sorted(df[df["role"] == "primary"]["request_id"])
    assert set(shadows["outcome"]) == {"DROPPED"}


def test_a_copy_waits_while_the_next_primary_runs(models_dir, digit_images):
    """Under load one primary ends and the next starts in the same turn of the event loop: the
    worker woken by the first end started its copy beside the second primary, on its cores."""
    import asyncio

    import numpy as np

    from model_server.protocol import InferInput
    from model_server.repository import ModelRepository
    from model_server.shadow import ShadowJob, ShadowMirror
    from model_server.trace import TraceContext

    async def scenario() -> tuple[list[str], list[str]]:
        repo = ModelRepository(models_dir, ["CPUExecutionProvider"])
        repo.load("digits")
        done: list[str] = []
        mirror = ShadowMirror(repo, sink=lambda r: done.append(r.job.request_id))
        mirror.start()
        data = np.array([digit_images[0][0]], dtype=object)
        job = ShadowJob(
            "digits",
            "1",
            "1",
            [InferInput("image", "BYTES", (1,), data)],
            ["probabilities"],
            "copy",
            TraceContext.from_header(None),
            time.time(),
            None,
            1.0,
        )
        with mirror.gate:
            mirror.submit(job)
            await asyncio.sleep(0.2)  # the worker has the copy and waits for idle time
        with mirror.gate:  # the next primary, with no await between
            for _ in range(20):
                await asyncio.sleep(0.05)
            during = list(done)
        for _ in range(200):
            if done:
                break
            await asyncio.sleep(0.05)
        await mirror.stop()
        repo.close_all()
        return during, done

    during, after = asyncio.run(scenario())
    assert during == []
    assert after == ["copy"]


def test_a_copy_of_the_servers_own_mirror_waits_no_longer_than_the_age_bound(models_dir, digit_images):
    """The in-process mirror's copies had no age bound (Istio's are dropped past
    ``--shadow-copy-max-age``): under primaries that left no idle time, a queued copy ran minutes
    later, its record stamped at its primary's arrival written after the audit's range had closed
    (late: its primary counted a lost copy) and its latency holding the shadow's watermark back.
    Past the bound it is dropped, counted ``too_old`` and logged DROPPED; one still queued by then
    too, though the shadow is idle when its turn comes; a copy made after runs."""
    import asyncio

    import numpy as np
    from prometheus_client import REGISTRY

    from model_server.protocol import InferInput
    from model_server.repository import ModelRepository
    from model_server.shadow import ShadowJob, ShadowMirror, ShadowResult
    from model_server.trace import TraceContext

    data = np.array([digit_images[0][0]], dtype=object)
    labels = {"model": "digits", "version": "1", "reason": "too_old"}
    before = REGISTRY.get_sample_value("shadow_dropped_total", labels) or 0.0

    def job(rid: str) -> ShadowJob:
        inputs = [InferInput("image", "BYTES", (1,), data)]
        return ShadowJob(
            "digits", "1", "1", inputs, ["probabilities"], rid, TraceContext.from_header(None), time.time(), 1, 1.0
        )

    async def scenario() -> list[ShadowResult]:
        repo = ModelRepository(models_dir, ["CPUExecutionProvider"])
        repo.load("digits")
        done: list[ShadowResult] = []
        mirror = ShadowMirror(repo, workers=1, sink=done.append, max_copy_age_s=0.3)
        mirror.start()
        with mirror.gate:  # primaries leave no idle time for a while
            mirror.submit(job("waited"))
            mirror.submit(job("queued"))
            for _ in range(40):
                await asyncio.sleep(0.05)
        mirror.submit(job("fresh"))
        for _ in range(200):
            if len(done) == 3:
                break
            await asyncio.sleep(0.05)
        await mirror.stop()
        repo.close_all()
        return done

    done = asyncio.run(scenario())
    assert [(r.job.request_id, r.outcome) for r in done] == [
        ("waited", "DROPPED"),
        ("queued", "DROPPED"),
        ("fresh", "ok"),
    ]
    assert "0.3 s" in (done[0].error or "")
    assert (REGISTRY.get_sample_value("shadow_dropped_total", labels) or 0.0) == before + 2


@pytest.mark.parametrize(
    ("option", "value"),
    [("--shadow-queue", "0"), ("--shadow-queue", "-1"), ("--shadow-workers", "0"), ("--shadow-queue-mb", "0")],
)
def test_a_shadow_queue_or_workers_below_one_stop_the_start(tmp_path, option, value):
    """--shadow-queue 0 made an asyncio queue of no bound: under a slow shadow the copies piled
    up without limit instead of being dropped. The start stops (exit 2), naming the option."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "model_server", "--repository", str(tmp_path), option, value],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 2
    assert f"argument {option}: must be" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["61", "3600", "1e9", "inf"])
def test_a_shadow_copy_age_past_the_audits_margin_stops_the_start(tmp_path, value):
    """--shadow-copy-max-age had no upper bound: a copy waiting an hour for idle time held the
    shadow's watermark (the audit's) back that long and was written after its range closed,
    late, in no audit. The start stops (exit 2), naming the option and its limit."""
    import subprocess
    import sys

    from model_server.config import MAX_COPY_AGE_LIMIT_S
    from tests.conftest import ROOT
    from vision_rollout.audit import CLOCK_SKEW_S

    assert MAX_COPY_AGE_LIMIT_S <= CLOCK_SKEW_S  # (a copy within it is written before its range closes)
    out = subprocess.run(
        [sys.executable, "-m", "model_server", "--repository", str(tmp_path), "--shadow-copy-max-age", value],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 2
    limit = f"at most {MAX_COPY_AGE_LIMIT_S:g}"
    assert f"argument --shadow-copy-max-age: must be a number of seconds above 0 and {limit}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", [3600.0, 0.0, -1.0, float("nan"), float("inf")])
def test_a_shadow_copy_age_past_the_audits_margin_is_refused_where_the_server_reads_it(tmp_path, value):
    """Only --shadow-copy-max-age was bounded: a server built from its Settings (an embedding, a
    test harness, another launcher) took shadow_copy_max_age_s=3600, its copies held the
    shadow's watermark back an hour and were written after the audit's range closed. The
    mirror that reads it refuses it, naming the setting and the value."""
    from model_server.app import Settings, create_app
    from model_server.repository import ModelRepository

    repo = ModelRepository(tmp_path, ["CPUExecutionProvider"])
    with pytest.raises(
        ValueError, match=r"shadow_copy_max_age_s\) must be a number of seconds above 0 and at most 60"
    ) as exc:
        create_app(repo, Settings(shadow_copy_max_age_s=value))
    assert f"got {str(value)!r}" in str(exc.value)


def test_the_queue_counts_the_body_a_binary_tensor_keeps(server_factory, tmp_path):
    """A binary tensor is a view of its request's body: a copy of 128 bytes of tensors behind
    900 kB of JSON held the 900 kB, and the queue counted 128 bytes (256 such copies held 230 MB
    under a bound of 1 MiB). A copy counts the body it keeps."""
    import json
    import shutil

    import numpy as np

    from tests.support import write_simple_models

    repository = tmp_path / "repository"
    write_simple_models(repository, "simple")
    shutil.copytree(repository / "simple" / "1", repository / "simple" / "2")
    s = server_factory(repository, "--shadow-queue-mb", "1", "--shadow-workers", "1", token=TOKEN)
    s.load_versions("simple", 1, 2)
    mirror_all = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
    r = requests.put(f"{s.http}/v2/models/simple/traffic", json=mirror_all, headers=s.admin, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.put(
        f"{s.http}/v2/models/simple/versions/2/fault", json={"delay": {"ms": 3000}}, headers=s.admin, timeout=10
    )
    assert r.status_code == 200, r.text
    tensor = np.arange(16, dtype=np.int32).reshape(1, 16).tobytes()
    inputs = [
        {"name": name, "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": len(tensor)}}
        for name in ("INPUT0", "INPUT1")
    ]
    header = (json.dumps({"inputs": inputs}) + " " * 900_000).encode()  # JSON takes any whitespace
    n = 6
    for _ in range(n):
        r = requests.post(
            f"{s.http}/v2/models/simple/infer",
            data=header + tensor + tensor,
            headers={"Inference-Header-Content-Length": str(len(header))},
            timeout=30,
        )
        assert r.status_code == 200, r.text

    def counted(outcome: str) -> float:
        return s.metric("shadow_requests_total", model="simple", version="2", outcome=outcome) or 0.0

    # One copy runs (off the queue), one waits (900 kB of 1 MiB), the others are over the bytes.
    assert counted("dropped") >= n - 2
    assert wait_until(lambda: counted("ok") + counted("dropped") == n)


def test_a_probe_in_flight_at_shutdown_is_recorded(server_factory, repo_copy, tmp_path, digit_images):
    """The stop waited for the queue's copies only: a masking probe's copy (run at once, off the
    queue) still running was left behind, and the log closed without its record."""
    s = start(server_factory, repo_copy, tmp_path, "--prediction-log", str(tmp_path / "log"))
    set_fault(s, "2", {"delay": {"ms": 8000, "percent": 100}})  # longer than the stop's drain
    assert infer(s, digit_images[0][0], {"X-Shadow-Probe": "1", **s.admin}).status_code == 200
    df = logged(s, tmp_path / "log")
    shadows = df[df["role"] == "shadow"]
    assert list(shadows["request_id"]) == list(df[df["role"] == "primary"]["request_id"])
    assert list(shadows["outcome"]) == ["DROPPED"]


def test_each_primary_record_says_whether_its_copy_will_come(server_factory, repo_copy, tmp_path, digit_images):
    """A primary record said nothing of the mirror's sampling: under 100%, a reader could not
    tell a copy not yet written from one never made, and waited minutes for those. Each says it
    now (``mirrored``): true exactly for those with a shadow record, false for the rest and for
    requests that named their version; null without a policy of this server's (a router in
    front of it, Istio's, may mirror them)."""
    s = start(server_factory, repo_copy, tmp_path, "--prediction-log", str(tmp_path / "log"))
    half = {**MIRROR_ALL, "mirror": {"version": "2", "percent": 50}}
    assert put_policy(s, half).status_code == 200
    for i in range(30):
        assert infer(s, digit_images[i][0], {"X-Request-ID": f"routed-{i}"}).status_code == 200
    assert infer(s, digit_images[0][0], {"X-Request-ID": "named", "X-Model-Version": "1"}).status_code == 200
    assert infer(s, b"not an image", {"X-Request-ID": "refused"}).status_code == 400
    df = logged(s, tmp_path / "log")
    primaries = df[df["role"] == "primary"].set_index("request_id")["mirrored"]
    copied = set(df[df["role"] == "shadow"]["request_id"])
    assert 0 < len(copied) < 31
    assert {rid for rid, said in primaries.items() if said is True} == copied
    assert {rid for rid, said in primaries.items() if said is False} == set(primaries.index) - copied
    assert primaries["named"] is False
    assert df[df["role"] == "shadow"]["mirrored"].isna().all()

    bare = server_factory(repo_copy, "--prediction-log", str(tmp_path / "bare"), token=TOKEN)
    assert infer(bare, digit_images[0][0], {"X-Request-ID": "unrouted"}).status_code == 200
    assert logged(bare, tmp_path / "bare")["mirrored"].isna().all()


def test_a_queued_copy_holds_its_inputs_not_the_primarys_outputs(server_factory, tmp_path):
    """A queued copy kept its primary's outputs (only to count their rows) beside its inputs,
    uncounted by the queue's bound: a detector's ``[1, 25200, 85]`` answer is 8.5 MB beside a
    small input, and 256 copies waiting for a slow shadow held gigabytes under a bound of
    256 MiB. A copy keeps the primary's row count alone. (A model whose output is 40 MB from
    64 bytes of input: the server's memory does not grow by the outputs of the copies that wait.)

    The shadow's one thread is held by ten of the rollout's masking probes, sent first (run at
    once, in turn, each for 60 s): the first copy the worker takes waits behind them, the others
    in the queue, so none comes to its turn past its age bound and is dropped unless the test
    runs ten minutes (with one copy run every 20 s, a run of 81 s on a loaded machine had one
    queued 60 s before its turn came, dropped)."""
    import json
    import shutil

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from scripts.build_models import IR_VERSION, OPSET

    repository = tmp_path / "repository"
    (repository / "wide" / "1").mkdir(parents=True)
    repeats = helper.make_tensor("repeats", TensorProto.INT64, [2], [1, 625_000])
    graph = helper.make_graph(
        [helper.make_node("Tile", ["INPUT0", "repeats"], ["OUTPUT0"])],
        "wide",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT32, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["batch", 10_000_000])],
        [repeats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = IR_VERSION
    onnx.save(model, repository / "wide" / "1" / "model.onnx")
    config = {
        "name": "wide",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 1,
        "input": [{"name": "INPUT0", "datatype": "INT32", "dims": [-1, 16]}],
        "output": [{"name": "OUTPUT0", "datatype": "INT32", "dims": [-1, 10_000_000]}],
    }
    (repository / "wide" / "config.json").write_text(json.dumps(config))
    shutil.copytree(repository / "wide" / "1", repository / "wide" / "2")
    s = server_factory(repository, "--shadow-workers", "1", "--shadow-copy-max-age", "60", token=TOKEN)
    s.load_versions("wide", 1, 2)
    mirror_all = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
    r = requests.put(f"{s.http}/v2/models/wide/traffic", json=mirror_all, headers=s.admin, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.put(
        f"{s.http}/v2/models/wide/versions/2/fault", json={"delay": {"ms": 60_000}}, headers=s.admin, timeout=10
    )
    assert r.status_code == 200, r.text
    tensor = np.arange(16, dtype=np.int32).reshape(1, 16).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()

    def send(probe: bool = False) -> None:
        r = requests.post(
            f"{s.http}/v2/models/wide/infer",
            data=header + tensor,
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                **({"X-Shadow-Probe": "1", **s.admin} if probe else {}),
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text[:200]
        assert len(r.content) > 40_000_000

    def rss() -> int:
        status = Path(f"/proc/{s.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    # (the probes' copies run one after another for 10 minutes, in the order sent, before any
    # queued copy; the first runs at once: the allocator and the caches settle)
    for _ in range(10):
        send(probe=True)
    for _ in range(3):
        send()
    before = rss()
    for _ in range(12):
        send()
    assert not s.metric("shadow_requests_total", model="wide", version="2", outcome="dropped")
    assert rss() - before < 160_000_000  # 12 outputs held: 480 MB
