"""Admin calls need the bearer token; loads stay inside the repository folder."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import requests
from tritonclient.utils import InferenceServerException


def policy(*versions: int) -> dict:
    return {"version_policy": {"specific": {"versions": list(versions)}}}


pytestmark = pytest.mark.integration


@pytest.mark.parametrize("action", ["load", "unload"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong-token", "wrong-scheme", "empty"],
)
def test_admin_calls_without_the_token_get_401(server, action, headers):
    r = requests.post(f"{server.http}/v2/repository/models/digits/{action}", headers=headers, timeout=10)
    assert r.status_code == 401
    assert "Bearer" in r.json()["error"]
    assert server.client().is_model_ready("digits")


def test_tritonclient_load_without_token_raises_401(server):
    with pytest.raises(InferenceServerException) as err:
        server.client().unload_model("digits")
    assert err.value.status() == "401"
    assert server.client().is_model_ready("digits")


def test_read_only_calls_need_no_token(server):
    c = server.client()
    assert c.get_model_repository_index()
    assert c.get_model_metadata("digits")


def test_without_a_token_admin_calls_are_open(server_factory, repo_copy):
    s = server_factory(repo_copy)
    s.client().unload_model("digits")
    assert not s.client().is_model_ready("digits")


def test_load_cannot_escape_the_repository(server_factory, repo_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(
        (repo_copy / "digits" / "config.json").read_text().replace('"digits"', '"outside"')
    )
    os.symlink(outside, repo_copy / "escape")
    s = server_factory(repo_copy, token="t0k3n")
    for name in ("..", "...", "escape", "..%2Foutside", "%2Fetc"):
        r = requests.post(f"{s.http}/v2/repository/models/{name}/load", headers=s.admin, timeout=10)
        assert r.status_code in (400, 404), (name, r.text)
        assert "error" in r.json()
    assert s.client().is_model_ready("digits")


def test_a_config_linked_out_of_the_model_folder_is_refused(server_factory, repo_copy, tmp_path):
    """config.json as a symlink out of the repository was read (and a parse error quoted it)."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a model config 13800138000"}')
    config = repo_copy / "digits" / "config.json"
    saved = config.read_text()
    config.unlink()
    os.symlink(secret, config)
    s = server_factory(repo_copy, "--no-exit-on-error", token="t0k3n", until="live")
    r = requests.post(f"{s.http}/v2/repository/models/digits/load", headers=s.admin, timeout=10)
    assert r.status_code == 400
    assert "link out of the model's folder" in r.json()["error"]
    assert "13800138000" not in r.text
    config.unlink()
    config.write_text(saved)
    assert requests.post(f"{s.http}/v2/repository/models/digits/load", headers=s.admin, timeout=10).status_code == 200


def test_load_override_rejects_unknown_keys_and_file_uploads(server):
    c = server.client()
    with pytest.raises(InferenceServerException) as err:
        c.load_model("digits", headers=server.admin, config=json.dumps({"backend": "python"}))
    assert err.value.status() == "400"
    assert "unsupported key(s) ['backend']" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        c.load_model("digits", headers=server.admin, config="{}", files={"file:1/model.onnx": b"x"})
    assert "not supported" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        c.load_model(
            "digits",
            headers=server.admin,
            config=json.dumps({"version_policy": {"specific": {"versions": [9]}}}),
        )
    assert "not in the repository" in err.value.message()
    assert c.get_model_metadata("digits")["versions"] == ["1"]


@pytest.mark.parametrize("parameters", [[], "", 0, False, "x"])
def test_load_parameters_that_are_not_an_object_get_400(server, parameters):
    """An empty list, string, 0 or false was taken as no parameters (a load of config.json's
    versions), where "x" was a 400."""
    r = requests.post(
        f"{server.http}/v2/repository/models/digits/load",
        json={"parameters": parameters},
        headers=server.admin,
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"] == "'parameters' must be an object"


@pytest.mark.parametrize(
    ("parameters", "needle"),
    [
        ({"confg": '{"max_batch_size": 8}'}, "unknown load parameter(s) ['confg']: a load takes 'config'"),
        ({"config": {"max_batch_size": 8}}, "parameters.config must be a string: the configuration's JSON text"),
        ({"config": 8}, "parameters.config must be a string: the configuration's JSON text"),
    ],
)
def test_load_parameters_triton_does_not_read_get_400_naming_them(server, parameters, needle):
    """Triton's load reads each parameter as a string and only 'config' and 'file:...'
    (http_server.cc: MemberAsString, then "unexpected error on creating Triton parameter" for
    another name). A misspelt 'confg' here loaded config.json's own config with a 200, as if the
    override had been taken, and a config sent as an object was "the JSON object must be str,
    bytes or bytearray, not dict"."""
    r = requests.post(
        f"{server.http}/v2/repository/models/digits/load",
        json={"parameters": parameters},
        headers=server.admin,
        timeout=30,
    )
    assert (r.status_code, r.json()["error"][: len(needle)]) == (400, needle)


def test_a_load_config_nested_past_the_parser_gets_400(server):
    """A parameters.config nested deeper than Python's JSON parser goes was a 500 and a
    traceback in the log (the outer body parses: the nesting is inside a string)."""
    r = requests.post(
        f"{server.http}/v2/repository/models/digits/load",
        json={"parameters": {"config": "[" * 100_000}},
        headers=server.admin,
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("parameters.config is not a JSON object")
    assert server.client().get_model_metadata("digits")["versions"] == ["1"]


BIG = "S" * 200_000


def _load(config: dict) -> tuple[str, dict]:
    return "POST /v2/repository/models/digits/load", {"parameters": {"config": json.dumps(config)}}


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (_load({"version_policy": {"bogus": BIG}}), "version_policy: unknown or malformed policy"),
        (_load({"dynamic_batching": {"preserve_ordering": BIG}}), "preserve_ordering: must be true or false"),
        (
            _load({"dynamic_batching": {"default_queue_policy": {"allow_timeout_override": BIG}}}),
            "allow_timeout_override: must be true or false",
        ),
        (("PUT /v2/models/digits/traffic", {"route": [{"version": BIG}]}), "version must be a positive integer"),
        (("PUT /v2/models/digits/traffic", {"route": [{"version": "1", "weight": BIG}]}), "weight must be an integer"),
        (("PUT /v2/models/digits/traffic", {"route": [{"version": "1", BIG: 1}]}), "route[0]: unknown field(s)"),
        (
            ("PUT /v2/models/digits/traffic", {"route": [{"version": "1", "weight": 0}] * 20_000}),
            "a version appears more than once",
        ),
        (("PUT /v2/models/digits/traffic", {"route": [{"version": "1"}], BIG: 1}), "unknown policy field(s)"),
        (
            ("PUT /v2/models/digits/traffic", {"route": [{"version": "1"}], "rules": [{"route": [], BIG: 1}]}),
            "rules[0]: unknown field(s)",
        ),
        (("PUT /v2/models/digits/traffic", {"route": [{"version": "1"}], "mirror": {BIG: 1}}), "mirror: unknown"),
        (
            (
                "PUT /v2/models/digits/traffic",
                {"route": [{"version": "1"}], "mirror": {"version": "1", "percent": BIG}},
            ),
            "mirror.percent must be a number",
        ),
        (("PUT /v2/models/digits/versions/1/fault", {BIG: 1}), "fault: unknown field(s)"),
        (("PUT /v2/models/digits/versions/1/fault", {"delay": {BIG: 1}}), "fault.delay: unknown field(s)"),
        (("PUT /v2/models/digits/versions/1/fault", {"delay": {"ms": BIG}}), "fault.delay.ms must be"),
    ],
)
def test_an_admin_call_s_error_quotes_what_it_was_sent_shortened(server, call, needle):
    """A load's config, a traffic policy or a fault is refused naming its field and the value
    sent, shortened as every other message shortens a client's text: a value or field name of
    any length (up to the JSON limit, 4 MiB) was quoted whole, in the answer and, for a load,
    in a line of the log of as many bytes."""
    (method, path), body = call[0].split(" "), call[1]
    r = requests.request(method, f"{server.http}{path}", json=body, headers=server.admin, timeout=30)
    assert r.status_code == 400
    assert needle in r.json()["error"]
    assert len(r.content) < 2000
    assert server.client().get_model_metadata("digits")["versions"] == ["1"]


def test_a_model_name_that_is_no_name_is_refused_shortened(server):
    """A model's name is at most 128 characters: one of any length (up to the 60 KiB of a
    request's head) was quoted whole in the 400, on every endpoint that names a model, and twice
    in the log's line for a load."""
    name = "a" * 50_000
    for method, path in (
        ("GET", f"/v2/models/{name}"),
        ("POST", f"/v2/models/{name}/infer"),
        ("POST", f"/v2/repository/models/{name}/load"),
    ):
        r = requests.request(method, f"{server.http}{path}", headers=server.admin, timeout=30)
        assert r.status_code == 400
        assert "invalid model name 'aaaa" in r.json()["error"]
        assert len(r.content) < 1000
    assert "a" * 1000 not in server.log.read_text()


def _model_server_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m model_server`` with ``args``, in an environment of its own (this checkout on
    PYTHONPATH, no GPU library's path), for a start refused before it serves."""
    import sys

    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "model_server", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


def test_cli_refuses_cuda_without_a_gpu_and_a_missing_repository(tmp_path):
    out = _model_server_command("--repository", str(tmp_path), "--device", "cuda")
    assert out.returncode == 2
    assert "NVML finds no GPU" in out.stderr
    out = _model_server_command("--repository", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "is not a folder" in out.stderr
    assert not (tmp_path / "nope").exists()  # no state folder made where the repository is not


@pytest.mark.parametrize(
    ("host", "extra", "words"),
    [
        ("0.0.0.0", [], "no admin token, and --host 0.0.0.0 is not loopback"),
        ("::", [], "no admin token, and --host :: is not loopback"),
        ("0.0.0.0", ["--allow-open-admin"], "WARNING model_server: no admin token: the admin API"),
        ("127.0.0.1", [], "WARNING model_server: no admin token: the admin API"),
    ],
)
def test_an_open_admin_api_is_refused_where_others_reach_it_and_always_said(tmp_path, host, extra, words):
    """With no token the admin API (load, unload, fault injection) was open even on 0.0.0.0,
    and nothing said so. (--port 70000 ends a start that got past the check, before it listens.)"""
    out = _model_server_command("--repository", str(tmp_path), "--host", host, "--port", "70000", *extra)
    assert out.returncode == 2
    assert words in out.stderr
    if "WARNING" in words:
        assert "--port 70000 is not a TCP port" in out.stderr
    else:
        assert "--allow-open-admin" in out.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"\xffSECRET", "cannot be read"),
        (b" \n", "is empty"),
        (b"SECRET\nTOKEN\n", "holds a line break or another control character"),
        ("SECRET-t\u00f6ken".encode(), "holds a character that is not printable ASCII"),
        ("SECRET-\u20ac".encode(), "holds a character that is not printable ASCII"),
    ],
)
def test_an_admin_token_file_that_cannot_be_used_is_exit_2(tmp_path, content, words):
    """A missing or non-UTF-8 file was a traceback, and only after every model had loaded; a
    token with a line break started a server whose admin calls no client could make, and so did
    one not ASCII (a header's value is bytes: sent as UTF-8 it never matched, as Latin-1 only)."""
    token = tmp_path / "token"
    if content is not None:
        token.write_bytes(content)
    out = _model_server_command("--repository", str(tmp_path), "--admin-token-file", str(token))
    assert out.returncode == 2
    assert words in out.stderr
    assert "Traceback" not in out.stderr
    assert "SECRET" not in out.stderr


@pytest.mark.integration
def test_a_pod_serves_exactly_the_version_it_is_started_with(server_factory, repo_copy):
    """``--serve MODEL:VERSION`` (a pod of one version's Deployment): that version only, loaded at
    start, ready only once it is, and no load or unload can change it."""
    server = server_factory(repo_copy, "--serve", "digits:2", token="pin-token")
    c = server.client()
    assert c.get_model_metadata("digits")["versions"] == ["2"]  # config.json would load version 1
    assert c.is_server_ready()
    assert [e["name"] for e in c.get_model_repository_index() if e.get("state") == "READY"] == ["digits"]
    for call in (
        lambda: c.load_model("digits", headers=server.admin),  # config.json's version 1
        lambda: c.load_model("digits", headers=server.admin, config=json.dumps(policy(2, 3))),
        lambda: c.unload_model("digits", headers=server.admin),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "409"
        assert "serves version 2" in err.value.message()
    c.load_model("digits", headers=server.admin, config=json.dumps(policy(2)))  # the same: allowed
    assert c.get_model_metadata("digits")["versions"] == ["2"]


def test_serve_names_a_model_and_a_version_it_can_load(tmp_path, repo_copy):
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "ORT_DISABLE_TELEMETRY": "1"}

    def start(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "model_server", "--repository", str(repo_copy), "--port", "1", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    for spec, message in (("digits", "give MODEL:VERSION"), ("digits:0", "give MODEL:VERSION"), ("../x:1", "MODEL")):
        out = start("--serve", spec)
        assert out.returncode == 2, spec
        assert message in out.stderr, spec
    out = start("--serve", "digits:1", "--serve", "digits:2")
    assert out.returncode == 2
    assert "two versions of model 'digits'" in out.stderr
    out = start("--serve", "digits:9")  # a version the repository does not have: never ready
    assert out.returncode == 1
    assert "--serve digits:9" in out.stderr
    assert "not in the repository" in out.stderr


@pytest.mark.integration
def test_a_pod_whose_version_cannot_load_is_never_ready(server_factory, repo_copy):
    server = server_factory(repo_copy, "--serve", "digits:9", "--no-exit-on-error", until="live")
    r = requests.get(f"{server.http}/v2/health/ready", timeout=10)
    assert r.status_code == 503
    assert "model 'digits' version 9 (--serve) is not loaded" in r.json()["error"]


def test_with_an_admin_port_admin_calls_are_served_there_only(server_factory, repo_copy, digit_images):
    """--admin-port: the data port (the one a Kubernetes Service exposes) answers every admin
    call 404 naming the admin port, with the token or without; the admin port serves them, token
    checked; inference, metadata and the probe header (with the token) stay on the data port."""
    from devstack.processes import free_port
    from vision_rollout.serving import image_request

    admin_port = free_port()
    s = server_factory(repo_copy, "--admin-port", str(admin_port), token="t0k3n")
    admin = f"http://127.0.0.1:{admin_port}"
    calls = [
        ("GET", "/v2/models/digits/traffic"),
        ("PUT", "/v2/models/digits/versions/1/fault"),
        ("POST", "/v2/repository/models/digits/load"),
        ("POST", "/v2/repository/models/digits/unload"),
    ]
    for method, path in calls:
        r = requests.request(method, s.http + path, headers=s.admin, json={}, timeout=10)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == (
            f"{method} {path} is an admin call: it is served on the admin port {admin_port} only, not on this data port"
        )
        assert requests.request(method, admin + path, json={}, timeout=10).status_code == 401  # token still needed
    assert s.client().is_model_ready("digits")  # the unload on the data port did nothing
    r = requests.get(f"{admin}/v2/models/digits/traffic", headers=s.admin, timeout=10)
    assert r.status_code == 200
    assert "route" in r.json()
    assert requests.post(f"{admin}/v2/repository/models/digits/load", headers=s.admin, timeout=10).status_code == 200
    assert s.client().get_model_metadata("digits")["name"] == "digits"
    body = image_request([digit_images[0][0]])
    probe = requests.post(f"{s.http}/v2/models/digits/infer", json=body, headers={"X-Shadow-Probe": "1"}, timeout=30)
    assert probe.status_code == 401  # the probe is a data-path call, admitted by the token alone
    probe = requests.post(
        f"{s.http}/v2/models/digits/infer", json=body, headers={"X-Shadow-Probe": "1", **s.admin}, timeout=30
    )
    assert probe.status_code == 200, probe.text


def test_the_admin_port_must_be_a_port_of_its_own():
    import socket

    from model_server.__main__ import listeners

    with pytest.raises(ValueError, match="--admin-port 8000 is --port: give the admin API a port of its own"):
        listeners("127.0.0.1", 8000, 8000)
    with pytest.raises(ValueError, match=r"--admin-port 70000 is not a TCP port \(1 to 65535\)"):
        listeners("127.0.0.1", 8000, 70000)
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            listeners("127.0.0.1", 0, port)
    finally:
        busy.close()


def test_a_policy_and_a_load_of_one_model_each_see_what_the_other_left(repo_copy, tmp_path, monkeypatch):
    """A policy PUT (or the watched file) during a load was checked against the versions from
    before the load, and a load during a PUT read the policy from before it: both passed, and
    the policy routed to a version the load had left out (every routed request 503). Now each
    waits for the other and is checked against what it left."""
    import asyncio
    import threading

    from prometheus_client import REGISTRY

    from model_server.admin import Admin
    from model_server.errors import Conflict, InvalidInput
    from model_server.repository import ModelRepository
    from model_server.traffic import PolicyStore

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    policies = PolicyStore(None, lambda *_: None)
    admin = Admin(repo, policies)
    to_v2 = {"route": [{"version": "2", "weight": 100}]}
    traffic = tmp_path / "traffic.json"
    inside, go = threading.Event(), threading.Event()
    go.set()

    def held(real):
        """``real``, stopped at its start while ``during`` holds it."""

        def call(*args, **kwargs):
            if not go.is_set():
                inside.set()
                go.wait(60)
            return real(*args, **kwargs)

        return call

    def file_errors() -> float:
        return REGISTRY.get_sample_value("model_server_traffic_file_errors_total") or 0.0

    async def during(first, second):
        """``second()`` started while ``first()`` is stopped inside its change, then both ended."""
        inside.clear()
        go.clear()
        a = asyncio.ensure_future(first())
        await asyncio.to_thread(inside.wait, 60)
        b = asyncio.ensure_future(second())
        for _ in range(20):  # the second call's check, had it not to wait
            await asyncio.sleep(0)
        go.set()
        return await asyncio.gather(a, b, return_exceptions=True)

    async def scenario() -> None:
        with monkeypatch.context() as m:  # a load of version 3 only, while the policy moves to 2
            m.setattr(repo, "_load", held(repo._load))
            repo.load("digits", policy(1, 2), persist=False)
            loaded, put = await during(
                lambda: admin.load("digits", policy(3)), lambda: admin.set_policy("digits", to_v2)
            )
            assert loaded is None
            assert isinstance(put, InvalidInput)
            assert "version(s) ['2'] are not loaded (loaded: ['3'])" in put.message
            assert policies.get("digits") is None
            assert repo.loaded_versions("digits") == [3]

            # The watched file takes the same way.
            repo.load("digits", policy(1, 2), persist=False)
            traffic.write_text(json.dumps({"models": {"digits": to_v2}}))
            errors = file_errors()

            async def watch() -> None:
                watcher = asyncio.ensure_future(admin.watch_traffic_file(traffic, 0.01))
                while file_errors() == errors and policies.get("digits") is None:
                    await asyncio.sleep(0.01)
                watcher.cancel()

            await during(lambda: admin.load("digits", policy(3)), watch)
            assert file_errors() == errors + 1
            assert policies.get("digits") is None
            assert repo.loaded_versions("digits") == [3]

        repo.load("digits", policy(1, 2), persist=False)
        policies.remove("digits")
        with monkeypatch.context() as m:  # the policy moving to 2 while version 3 only is loaded
            m.setattr(policies, "apply", held(policies.apply))
            put, loaded = await during(
                lambda: admin.set_policy("digits", to_v2), lambda: admin.load("digits", policy(3))
            )
            assert put is None
            assert isinstance(loaded, Conflict)
            assert "routes to version(s) [2], which this load would not serve" in loaded.message
            assert policies.get("digits").versions() == {"2"}
            assert repo.loaded_versions("digits") == [1, 2]

    try:
        asyncio.run(scenario())
    finally:
        repo.close_all()


def digits_and_letters(repo_copy, tmp_path):
    """A repository of two models, digits and letters (versions 1 and 2 loaded, not persisted),
    and an empty state folder."""
    import shutil

    from model_server.repository import ModelRepository

    shutil.copytree(repo_copy / "digits", repo_copy / "letters")
    config = repo_copy / "letters" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "name": "letters"}))
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    for model in ("digits", "letters"):
        repo.load(model, policy(1, 2), persist=False)
    state = tmp_path / "state"
    state.mkdir()
    return repo, state


def test_a_traffic_file_is_applied_whole_or_not_at_all_and_tried_again(repo_copy, tmp_path, caplog):
    """Review s53-2: a traffic file of two models whose second's state file could not be written
    (a full or read-only state volume) moved the first's routes and kept them, logged "nothing
    changed", and was not tried again until the file changed. It is applied whole or not at
    all (the first model's policy put back, its state file too), and tried again at the next
    poll until it is applied."""
    import asyncio

    from model_server.admin import Admin
    from model_server.traffic import PolicyStore

    repo, state = digits_and_letters(repo_copy, tmp_path)
    policies = PolicyStore(state, lambda *_: None)
    admin = Admin(repo, policies)
    (state / "letters.json").mkdir()  # (a state file that cannot be written)
    traffic = tmp_path / "traffic.json"
    traffic.write_text(json.dumps({"models": {m: {"route": [{"version": "1"}]} for m in ("digits", "letters")}}))
    v2 = {"route": [{"version": "2", "weight": 100}]}

    async def scenario() -> None:
        await admin.set_policy("digits", v2)
        assert await admin.apply_traffic_file(traffic) is False
        assert (policies.get("digits").to_dict(), policies.get("letters")) == (v2, None)
        assert json.loads((state / "digits.json").read_text()) == v2
        assert "tried again at every poll" in caplog.text
        watcher = asyncio.ensure_future(admin.watch_traffic_file(traffic, 0.01))
        for _ in range(5):
            await asyncio.sleep(0.02)
        assert policies.get("letters") is None
        (state / "letters.json").rmdir()  # (the volume mended; the file itself unchanged)
        for _ in range(6000):
            if policies.get("letters") is not None:
                break
            await asyncio.sleep(0.01)
        watcher.cancel()

    try:
        asyncio.run(scenario())
    finally:
        repo.close_all()
    one = {"route": [{"version": "1", "weight": 100}]}
    assert [policies.get(m).to_dict() for m in ("digits", "letters")] == [one, one]
    assert [json.loads((state / f"{m}.json").read_text()) for m in ("digits", "letters")] == [one, one]


def test_a_traffic_file_not_saved_moves_no_policy_and_keeps_an_unreadable_one(repo_copy, tmp_path):
    """Review s54-1 (HIGH): a traffic file whose second model's state file could not be written
    put the first back by removing its policy: a first model whose persisted policy could not be
    read back (refused, its routed requests too) lost its state file and routed to its highest
    version; and every poll moved the first model to the file's policy and back. Now no policy
    moves until every state file is written, and those written are put back byte for byte."""
    import asyncio

    from model_server.admin import Admin
    from model_server.errors import ModelUnavailable
    from model_server.traffic import PolicyStore

    repo, state = digits_and_letters(repo_copy, tmp_path)
    persisted = '{"route": [{"version": "1", "weight": 100}], "future_field": 1}'  # (a newer server's)
    (state / "digits.json").write_text(persisted)
    changes: list[str] = []
    policies = PolicyStore(state, lambda model, _: changes.append(model))
    policies.restore()
    admin = Admin(repo, policies)
    (state / "letters.json").mkdir()  # (letters' state file cannot be written)
    traffic = tmp_path / "traffic.json"
    traffic.write_text(json.dumps({"models": {m: {"route": [{"version": "1"}]} for m in ("digits", "letters")}}))
    try:
        for _ in range(3):  # (three polls of the watcher)
            assert asyncio.run(admin.apply_traffic_file(traffic)) is False
        assert (sorted(policies.unreadable), policies.get("digits"), changes) == (["digits"], None, [])
        assert (state / "digits.json").read_text() == persisted
        with pytest.raises(ModelUnavailable, match="could not be read back"):
            admin.policy("digits")
        (state / "letters.json").rmdir()
        assert asyncio.run(admin.apply_traffic_file(traffic)) is True
    finally:
        repo.close_all()
    assert (policies.unreadable, sorted(changes)) == ({}, ["digits", "letters"])
    assert json.loads((state / "digits.json").read_text()) == {"route": [{"version": "1", "weight": 100}]}


def test_a_policy_is_parsed_once_and_off_the_event_loop(repo_copy, tmp_path, monkeypatch):
    """A policy's rules (each regex compiled) were parsed on the event loop, and the traffic
    file's twice: a large valid file held every request for seconds."""
    import asyncio
    import threading

    from model_server.admin import Admin
    from model_server.repository import ModelRepository
    from model_server.traffic import PolicyStore, TrafficPolicy

    parse = TrafficPolicy.from_dict.__func__
    parsed_on: list[int] = []

    def from_dict(cls, raw):
        parsed_on.append(threading.get_ident())
        return parse(cls, raw)

    monkeypatch.setattr(TrafficPolicy, "from_dict", classmethod(from_dict))
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", policy(1, 2), persist=False)
    admin = Admin(repo, PolicyStore(None, lambda *_: None))
    traffic = tmp_path / "traffic.json"
    traffic.write_text(json.dumps({"models": {"digits": {"route": [{"version": "1"}]}}}))

    async def scenario() -> int:
        await admin.set_policy("digits", {"route": [{"version": "2"}]})
        assert admin.policy("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
        await admin.apply_traffic_file(traffic)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(scenario())
    finally:
        repo.close_all()
    assert admin.policy("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert len(parsed_on) == 2
    assert loop_thread not in parsed_on


def test_a_policy_for_a_model_not_loaded_is_a_400(repo_copy):
    """The policy's versions are not loaded: a client's error like any other such policy, where
    it was the 503 of an unavailable model (the server's fault, to be retried)."""
    import asyncio

    from model_server.admin import Admin
    from model_server.errors import InvalidInput, ModelNotFound
    from model_server.repository import ModelRepository
    from model_server.traffic import PolicyStore

    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    policies = PolicyStore(None, lambda *_: None)
    admin = Admin(repo, policies)
    with pytest.raises(InvalidInput) as refused:
        asyncio.run(admin.set_policy("digits", {"route": [{"version": "1"}]}))
    assert refused.value.status == 400
    assert "version(s) ['1'] are not loaded (loaded: [])" in refused.value.message
    with pytest.raises(ModelNotFound):
        asyncio.run(admin.set_policy("nosuch", {"route": [{"version": "1"}]}))
    assert policies.models() == []


@pytest.mark.integration
def test_a_load_of_triton_s_config_persists_what_it_changes_not_the_rest(server_factory, repo_copy, tmp_path):
    """A load with the config get_model_config answered is kept across a restart as the fields
    it changed: the fields it echoed were the model's then, and an edit of config.json since
    (a new version's held-out accuracy in its metadata) left the model unloaded at start."""
    state = tmp_path / "state"
    server = server_factory(repo_copy, "--state-dir", str(state), token="t")
    c = server.client()
    cfg = c.get_model_config("digits")
    c.load_model("digits", headers=server.admin, config=json.dumps({**cfg, "max_batch_size": 32}))
    server.stop()
    config = json.loads((repo_copy / "digits" / "config.json").read_text())
    config["metadata"]["description"] = "retrained"
    (repo_copy / "digits" / "config.json").write_text(json.dumps(config))
    server = server_factory(repo_copy, "--state-dir", str(state), token="t")
    c = server.client()
    assert c.is_model_ready("digits")
    assert c.get_model_config("digits")["max_batch_size"] == 32
