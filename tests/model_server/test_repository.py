"""Hot swap: loads while requests flow lose nothing; old sessions drain, then close."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from model_server.errors import InvalidInput, ModelNotFound, StateNotSaved
from model_server.repository import ModelRepository
from tests.conftest import ADMIN_TOKEN


def policy(*versions: int) -> dict:
    return {"version_policy": {"specific": {"versions": list(versions)}}}


def test_retired_version_keeps_its_session_until_its_last_request(repo_copy):
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits")
    with repo.use("digits") as held:
        assert held.version == 1
        repo.load("digits", policy(2))  # v1 leaves service while a request holds it
        assert held.retired
        assert held.session is not None  # still running the held request
        assert REGISTRY.get_sample_value("model_server_open_sessions", {"model": "digits"}) == 2
        with repo.use("digits") as fresh:
            assert fresh.version == 2  # new requests already go to the new version
    assert held.session is None  # released after the last in-flight request
    assert REGISTRY.get_sample_value("model_server_open_sessions", {"model": "digits"}) == 1
    repo.close_all()


def test_a_version_back_in_service_shows_its_series_though_its_old_copy_closed_meanwhile(repo_copy, monkeypatch):
    """Review s54-1: a version's last retired copy, its request ending while a load brought the
    version back (the new copy warming up), took the version's series with it: the new copy's
    latency went to a child no scrape shows, and the P99 guard read no data of that server.
    A copy entering service takes its series again."""
    from model_server import model as model_mod

    def count(version: str, path: str = "primary") -> float | None:
        labels = {"model": "digits", "version": version, "path": path}
        return REGISTRY.get_sample_value("model_server_request_duration_seconds_count", labels)

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", policy(1, 2))
    held = repo.use("digits", "2")
    held.__enter__()  # (a request in flight on version 2)
    repo.load("digits", policy(1))  # (version 2 leaves service while it holds it)
    warmup = model_mod.LoadedVersion.warmup

    def ending_meanwhile(self):
        if self.version == 2:
            held.__exit__(None, None, None)  # (the old copy's last request ends, the copy closes)
        return warmup(self)

    monkeypatch.setattr(model_mod.LoadedVersion, "warmup", ending_meanwhile)
    try:
        repo.load("digits", policy(1, 2))
        with repo.use("digits", "2") as lv:
            lv.metrics.latency.observe(0.02)
            lv.shadow_metrics.latency.observe(0.03)
        assert (count("2"), count("2", "shadow")) == (1.0, 1.0)
        labels = {"model": "digits", "version": "2", "outcome": "error"}
        assert REGISTRY.get_sample_value("shadow_requests_total", labels) == 0.0
    finally:
        repo.close_all()


def test_unchanged_versions_are_kept_and_changed_files_reloaded(repo_copy):
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", policy(1, 2))
    _, first = repo.loaded("digits")
    repo.load("digits", policy(1, 2))
    _, same = repo.loaded("digits")
    assert same[1] is first[1]
    assert same[2] is first[2]
    shutil.copy(repo_copy / "digits" / "3" / "model.onnx", repo_copy / "digits" / "1" / "model.onnx")
    repo.load("digits", policy(1, 2))
    _, changed = repo.loaded("digits")
    assert changed[1] is not first[1]
    assert changed[2] is first[2]
    assert changed[1].sha256 != first[1].sha256
    assert first[1].session is None
    repo.close_all()


def test_a_version_folder_named_with_a_leading_zero_is_not_a_version_as_in_triton(repo_copy):
    """Triton ignores ``01`` or ``007``: here they loaded as versions 1 and 7, and ``02`` beside ``2``
    served whichever of the two the folder listed last."""
    model = repo_copy / "digits"
    shutil.copytree(model / "3", model / "02")
    shutil.copytree(model / "1", model / "007")
    shutil.copytree(model / "1", model / "0")
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    assert sorted(repo.versions_on_disk(model)) == [1, 2, 3]
    assert repo.load("digits", {"version_policy": {"all": {}}}) == [1, 2, 3]
    _, loaded = repo.loaded("digits")
    assert loaded[2].path == (model / "2" / "model.onnx").resolve()
    repo.close_all()


def test_a_version_folder_of_19_digits_is_a_version_and_a_folder_skipped_is_logged(repo_copy, caplog):
    """Triton reads a version folder's name as an int64 (std::stoll in model_lifecycle.cc's
    VersionsToLoad): 19 digits within int64 are a version. Here such a folder was left out
    without a word, as was every folder skipped; each folder named like a version and not
    taken is logged now, saying why (the model's other folders, validation/ say, are not)."""
    model = repo_copy / "digits"
    top = str(2**63 - 1)
    shutil.copytree(model / "3", model / top)
    shutil.copytree(model / "3", model / "1000000000000000000")
    for skipped in ("01", "0", str(2**63), "2-old"):
        shutil.copytree(model / "1", model / skipped)
    (model / "4").mkdir()
    (model / "validation").mkdir()
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="model_server.repository"):
        assert repo.load("digits", policy(2**63 - 1, 10**18)) == [10**18, 2**63 - 1]
    warned = sorted(r.getMessage() for r in caplog.records)
    assert warned == [
        f"model 'digits': ignoring folder '{skipped}': {why}"
        for skipped, why in sorted(
            [
                ("0", "versions start at 1"),
                ("01", "a version's folder has no leading zeros"),
                ("2-old", "not a version number (ASCII digits within int64)"),
                ("4", "it holds no model.onnx"),
                (str(2**63), "not a version number (ASCII digits within int64)"),
            ]
        )
    ]
    with repo.use("digits", top) as lv:
        assert lv.version == 2**63 - 1
    repo.close_all()


def test_a_version_of_19_digits_serves_through_tritonclient(server_factory, repo_copy, digit_images):
    """A version folder of 19 digits loads, answers its metadata and inference, and the traffic
    policy routes to it (a version of 19 digits was refused there as not a positive integer)."""
    top = str(2**63 - 1)
    shutil.copytree(repo_copy / "digits" / "2", repo_copy / "digits" / top)
    shutil.copytree(repo_copy / "digits" / "2", repo_copy / "digits" / "2-old")
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    assert "ignoring folder '2-old': not a version number (ASCII digits within int64)" in server.log.read_text()
    c = server.client()
    c.load_model("digits", headers=server.admin, config=json.dumps(policy(1, 2**63 - 1)))
    assert c.get_model_metadata("digits")["versions"] == ["1", top]
    assert c.is_model_ready("digits", top)
    assert f"loaded model 'digits' version {top} " in server.log.read_text()  # (no card number: masked as one before)
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([digit_images[0][0]], dtype=object))
    assert c.infer("digits", [inp], model_version=top).get_response()["model_version"] == top
    routes = {"route": [{"version": top, "weight": 100}]}
    r = requests.put(f"{server.http}/v2/models/digits/traffic", json=routes, headers=server.admin, timeout=10)
    assert r.status_code == 200, r.text
    assert c.infer("digits", [inp]).get_response()["model_version"] == top


def test_broken_model_file_fails_the_load_and_keeps_what_was_served(repo_copy):
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", policy(1, 2))
    (repo_copy / "digits" / "3" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(InvalidInput, match=r"failed to load model 'digits' version 3"):
        repo.load("digits", policy(1, 2, 3))
    _, versions = repo.loaded("digits")
    assert sorted(versions) == [1, 2]
    assert all(v.session is not None for v in versions.values())
    entry = [e for e in repo.index() if e["name"] == "digits"]
    assert [(e["version"], e["state"]) for e in entry] == [("1", "READY"), ("2", "READY"), ("3", "UNAVAILABLE")]
    assert entry[2]["reason"].startswith("failed to load model 'digits' version 3 from model.onnx")
    repo.close_all()


def test_a_version_that_vanishes_while_it_is_loaded_fails_the_load_by_name(repo_copy, monkeypatch):
    """A version folder removed between the listing and the read of its file (a rollout's
    cleanup during a reload) raised FileNotFoundError through the load: a bare 500, no error
    counted or kept for the model."""
    from model_server import repository

    def errors() -> float:
        return REGISTRY.get_sample_value("model_server_model_loads_total", {"model": "digits", "outcome": "error"}) or 0

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", policy(1, 2))
    before = errors()

    def vanished(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(repository, "file_sha256", vanished)
    with pytest.raises(InvalidInput, match=r"failed to load 'digits': .*No such file or directory"):
        repo.load("digits", policy(1, 2))
    assert errors() == before + 1
    assert "No such file or directory" in repo._errors["digits"]
    assert repo.loaded_versions("digits") == [1, 2]
    repo.close_all()


def test_a_load_or_unload_whose_state_cannot_be_saved_changes_nothing(repo_copy, tmp_path):
    """The state was written after the swap: a full or read-only state volume answered a bare
    500 with the new versions already serving, and a restart brought back the old ones."""
    loads = tmp_path / "state" / "loads"
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"], loads)
    repo.load("digits", policy(1))
    shutil.rmtree(loads)
    loads.write_text("")  # where the state folder was: nothing can be written under it
    saved = r"cannot write the state file .*/state/loads/digits\.json: File exists; nothing changed"
    with pytest.raises(StateNotSaved, match=r"failed to load 'digits': " + saved) as err:
        repo.load("digits", policy(1, 2))
    assert err.value.status == 503
    assert repo.loaded_versions("digits") == [1]
    with pytest.raises(StateNotSaved, match=saved):
        repo.unload("digits")
    assert repo.loaded_versions("digits") == [1]
    loads.unlink()
    repo.load("digits", policy(1, 2))
    assert repo.loaded_versions("digits") == [1, 2]
    assert repo.persisted("digits") == (True, policy(1, 2))
    repo.close_all()


def test_loads_of_names_the_repository_lacks_add_no_series_and_keep_no_error(repo_copy):
    """Each name an admin load was sent (any of up to 128 characters) added a series to
    model_server_model_loads_total and kept its error message, for as long as the server ran."""

    def errors(model: str) -> float | None:
        return REGISTRY.get_sample_value("model_server_model_loads_total", {"model": model, "outcome": "error"})

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    unknown = errors("_unknown") or 0.0
    for name in ("nope-1", "nope-2", "nope-3"):
        with pytest.raises(ModelNotFound, match=f"failed to load '{name}'"):
            repo.load(name)
        assert errors(name) is None
        assert name not in repo._errors
    assert errors("_unknown") == unknown + 3
    digits = errors("digits") or 0.0  # a model the repository has keeps its own, and its last error
    with pytest.raises(InvalidInput, match="not in the repository"):
        repo.load("digits", policy(9))
    assert errors("digits") == digits + 1
    assert "not in the repository" in repo.index()[0]["reason"]


def test_graph_that_does_not_match_config_is_refused(repo_copy, models_dir):
    # resnet's graph in digits' slot: loads in ORT, but its signature is not digits'.
    shutil.copy(models_dir / "resnet_bench" / "1" / "model.onnx", repo_copy / "digits" / "3" / "model.onnx")
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    with pytest.raises(InvalidInput, match=r"preprocess.onnx_input 'input' is not a graph input|not in the graph"):
        repo.load("digits", policy(3))


@pytest.mark.integration
@pytest.mark.parametrize("batching", [None, {"max_queue_delay_microseconds": 2000}], ids=["alone", "batched"])
def test_hot_swap_under_concurrent_load_loses_no_request(server_factory, repo_copy, digit_images, batching):
    if batching is not None:  # every version loaded below runs the dynamic batcher
        config = json.loads((repo_copy / "digits" / "config.json").read_text())
        (repo_copy / "digits" / "config.json").write_text(json.dumps({**config, "dynamic_batching": batching}))
    server = server_factory(repo_copy, token="swap-token")
    images = np.array([img for img, _ in digit_images[:4]], dtype=object)
    stop = threading.Event()
    served: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        client = server.client()
        inp = httpclient.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(images)
        while not stop.is_set():
            try:
                result = client.infer("digits", [inp])
                probs = result.as_numpy("probabilities")
                assert probs.shape == (4, 10)
                with lock:
                    served[result.get_response()["model_version"]] += 1
            except (InferenceServerException, AssertionError) as exc:
                with lock:
                    failures.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()

    def requests_so_far() -> int:
        with lock:
            return sum(served.values())

    def settle(n: int = 40) -> None:
        target = requests_so_far() + n
        deadline = time.monotonic() + 60
        while requests_so_far() < target and time.monotonic() < deadline:
            time.sleep(0.01)

    admin = server.client()
    try:
        settle()
        admin.load_model("digits", headers=server.admin, config=json.dumps(policy(1, 2)))
        settle()
        admin.load_model("digits", headers=server.admin, config=json.dumps(policy(2)))
        settle()
        # A changed file for a loaded version is swapped in place.
        shutil.copy(repo_copy / "digits" / "3" / "model.onnx", repo_copy / "digits" / "2" / "model.onnx")
        admin.load_model("digits", headers=server.admin, config=json.dumps(policy(2)))
        settle()
        # A broken file: the load fails with a clear error, serving goes on.
        (repo_copy / "digits" / "3" / "model.onnx").write_bytes(b"\x00broken")
        with pytest.raises(InferenceServerException) as err:
            admin.load_model("digits", headers=server.admin, config=json.dumps(policy(3)))
        assert err.value.status() == "400"
        assert "failed to load model 'digits' version 3" in err.value.message()
        settle()
        admin.load_model("digits", headers=server.admin)  # config.json: version 1
        settle()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert served["1"] > 0
    assert served["2"] > 0
    assert sum(served.values()) >= 200
    assert admin.get_model_metadata("digits")["versions"] == ["1"]
    # Every retired session was released once its requests finished: one left, the serving one.
    assert server.metric("model_server_open_sessions", model="digits") == 1
    assert server.metric("model_server_model_loads_total", model="digits", outcome="error") == 1
    if batching is not None:  # four clients: requests were merged (fewer executions than requests)
        executions = server.metric("nv_inference_exec_count", model="digits", version="1")
        assert executions < server.metric("nv_inference_request_success", model="digits", version="1")


def test_a_model_name_ending_in_a_line_break_is_no_name(repo_copy):
    """'$' also matched before a last line break: 'digits\\n' passed as a model name (a folder's,
    an operator's --serve, a load's). A name ends at its last character now."""
    from model_server.__main__ import pins

    name = "digits\n"
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    with pytest.raises(InvalidInput, match="invalid model name"):
        repo.model_dir(name)
    with pytest.raises(ValueError, match="give MODEL:VERSION"):
        pins([f"{name}:1"])
    assert repo.model_dir("digits").name == "digits"
