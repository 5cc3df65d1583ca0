"""Hooks turn Airflow connections (here from AIRFLOW_CONN_* variables) into the library's objects."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest

from rollout_airflow.hooks import ModelServerHook, PrometheusHook, slack_notifier
from tests.fakes.slack_api import FakeSlack
from tests.support import POLL_INTERVAL_S, samples
from vision_rollout.folders import Folder
from vision_rollout.notify import scrub


def conn(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def test_model_server_and_prometheus_hooks_read_their_connections(monkeypatch, tmp_path):
    conn(
        monkeypatch,
        "model_server_default",
        conn_type="http",
        host="127.0.0.1",
        port=8123,
        schema="http",
        password="s3cret-admin-token",
        extra={"repository": "models"},
    )
    conn(monkeypatch, "prometheus_default", conn_type="http", host="127.0.0.1", port=9191)
    hook = ModelServerHook()
    assert hook.settings.url == "http://127.0.0.1:8123"
    assert hook.settings.address == "127.0.0.1:8123"
    assert hook.settings.validation("digits") == Path("models/digits/validation")
    assert hook.settings.prediction_log == "run/predictions"  # the default
    assert "s3cret" not in repr(hook.settings)  # the token stays out of logs
    router = hook.router("digits", tmp_path / "original.json")
    assert (router.url, router.token) == ("http://127.0.0.1:8123", "s3cret-admin-token")
    assert PrometheusHook().source().url == "http://127.0.0.1:9191"


@pytest.mark.parametrize(
    ("executor", "extra", "refused"),
    [
        ("CeleryExecutor", {}, "run_dir ('run')"),
        ("LocalExecutor,KubernetesExecutor", {"run_dir": "s3://b/run"}, "prediction_log ('run/predictions')"),
        ("my_alias:my.module.CeleryExecutor", {"prediction_log": "s3://b/p"}, "run_dir"),
        ("CeleryExecutor", {"run_dir": "s3://b/run", "prediction_log": "s3://b/p"}, None),
        ("CeleryExecutor", {"shared_folders": True}, None),  # an NFS volume every worker mounts
        ("LocalExecutor", {}, None),  # one machine
    ],
)
def test_folders_on_one_disk_are_refused_where_workers_run_on_several_machines(monkeypatch, executor, extra, refused):
    """The outbox, the shadow audit's marks, mesh local's locks and the model servers' records must
    be where every worker finds them: a Celery worker on another machine re-audited and re-sent
    every hour another had marked, and found no lock held."""
    from vision_rollout.settings import SettingsError

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    conn(monkeypatch, "model_server_default", conn_type="http", host="127.0.0.1", extra=extra)
    if refused is None:
        assert ModelServerHook().settings.run_dir == extra.get("run_dir", "run")
        return
    with pytest.raises(SettingsError, match=re.escape(refused)) as exc:
        _ = ModelServerHook().settings
    assert "on one machine's disk" in str(exc.value)
    assert '"shared_folders": true' in str(exc.value)


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("http://digits.ml.svc.cluster.local:8000", None, "http://digits.ml.svc.cluster.local:8000"),
        ("https://prometheus.example.com/", None, "https://prometheus.example.com"),
        ("https://prometheus.example.com/prom", 8443, "https://prometheus.example.com:8443/prom"),
        ("http://127.0.0.1:9191", 9999, "http://127.0.0.1:9191"),
        ("10.0.0.7", None, "http://10.0.0.7:9090"),
    ],
)
def test_a_host_given_as_a_url_is_the_connections_url(monkeypatch, host, port, url):
    """As Airflow's HTTP connections take it (and the README's connection for the cluster writes
    it): the host may be the whole base URL, its scheme and port included."""
    conn(monkeypatch, "prometheus_default", conn_type="http", host=host, **({"port": port} if port else {}))
    assert PrometheusHook().source().url == url
    conn(monkeypatch, "model_server_default", conn_type="http", host=host, **({"port": port} if port else {}))
    assert ModelServerHook().settings.url == url.replace(":9090", ":8000")


@pytest.mark.parametrize(("host", "schema"), [("127.0.0.1", "models"), ("ftp://prometheus.example.com", None)])
def test_a_connection_that_is_not_http_fails_the_task_naming_it(monkeypatch, host, schema):
    """A schema field taken for a database's (or a host's other scheme): no request could go, and
    a stage's guards, unreadable, held every stage to its end before it rolled back."""
    from airflow.sdk.exceptions import AirflowFailException

    from rollout_airflow.steps import serving

    fields = {"conn_type": "http", "host": host, **({"schema": schema} if schema else {})}
    conn(monkeypatch, "prometheus_default", **fields)
    with pytest.raises(AirflowFailException, match=r"prometheus_default connection's schema .* must be http or https"):
        PrometheusHook().source()
    conn(monkeypatch, "model_server_default", **fields)
    with pytest.raises(AirflowFailException, match="model_server_default connection's schema"):
        serving()


def test_credentials_in_a_hosts_url_fail_the_task_without_quoting_them(monkeypatch):
    """urllib sends no user:password@ of a URL (the request fails), and the URL is in logs,
    reports and the replay's errors."""
    from airflow.sdk.exceptions import AirflowFailException

    conn(monkeypatch, "prometheus_default", conn_type="http", host="https://rollout:s3cret@prometheus.example.com")
    with pytest.raises(AirflowFailException, match="host holds an '@'") as refused:
        PrometheusHook().source()
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("host", "secret", "error"),
    [
        ("http://admin:s3cr/et@models.example:8000", "s3cr", "host holds an '@'"),
        ("http://admin:1234/5678@models.example", "1234", "host holds an '@'"),
        ("admin:s3cret", "s3cret", "a port that is no number"),  # (no scheme: read as a host and its port)
        # (review s54-2: a password of digits before a "/", no scheme; urllib's NFKC refusal quoting the host)
        ("admin:1234/abcdef", "abcdef", "holds a '/' but no scheme"),
        ("admin:\uff03secretpw", "secretpw", "characters no URL takes"),
        # (review s54-3: an "@" before the scheme, quoted by the scheme's refusal)
        ("admin:Zq9passX1@https://prom:9090", "Zq9passX1", "host holds an '@'"),
        ("admin:Zq9passX1://prom", "Zq9passX1", "must be http or https, not something else"),
    ],
)
def test_credentials_that_end_the_host_early_are_never_quoted(monkeypatch, host, secret, error):
    """Review s54-1: a password holding "/" ended the host before its "@": the URL was taken
    whole and printed in every error naming the server; "user:password" without a scheme was
    refused quoting the password as the port's text."""
    from airflow.sdk.exceptions import AirflowFailException

    from rollout_airflow.steps import serving

    conn(monkeypatch, "model_server_default", conn_type="http", host=host)
    with pytest.raises(AirflowFailException, match=error) as refused:
        serving()
    assert secret not in str(refused.value)


def test_a_host_with_a_port_of_its_own_and_no_scheme_is_taken(monkeypatch):
    """Review s54-3: "digits.ml.svc:8000" in the host field, as Airflow's HttpHook takes it, was
    refused as a port that is no number (the default port added after its own)."""
    from rollout_airflow.hooks import _http_url

    for host, url in [("digits.ml.svc:8000", "http://digits.ml.svc:8000"), ("prom:9090/", "http://prom:9090")]:
        assert _http_url(types.SimpleNamespace(host=host, schema=None, port=None, conn_id="c"), 1) == url


@pytest.mark.parametrize("name", ["prometheus_default", "model_server_default"])
@pytest.mark.parametrize("tail", ["/?api_key=SUPERSECRET123", "?token=SUPERSECRET123", "/v2#SUPERSECRET123"])
def test_a_query_or_fragment_in_a_hosts_url_fails_the_task_without_quoting_it(monkeypatch, name, tail):
    """Review s53-1: a token in the host's query was kept in the base URL, and every error that
    named the server (a task's "model server at http://...?api_key=... unreachable") printed it."""
    from airflow.sdk.exceptions import AirflowFailException

    from rollout_airflow.steps import serving

    conn(monkeypatch, name, conn_type="http", host=f"http://127.0.0.1:8000{tail}")
    with pytest.raises(AirflowFailException, match="host holds a query or a fragment") as refused:
        PrometheusHook().source() if name == "prometheus_default" else serving()
    assert "SUPERSECRET123" not in str(refused.value)


@pytest.mark.parametrize("extra", ['{"repository": "/srv/models",}', "[1, 2]", '"models"', "{repository"])
def test_extras_that_are_not_a_json_object_fail_the_task_naming_the_connection(monkeypatch, extra):
    """Airflow reads extras that are not JSON as none: every setting would take its default
    (another repository, another prediction log and run folder) without a word."""
    from rollout_airflow.steps import serving

    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "host": "127.0.0.1", "extra": extra})
    )
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="model_server_default connection's extras are not a JSON object"):
        serving()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"login": "rollout", "password": "s3cret"}, "Basic cm9sbG91dDpzM2NyZXQ="),
        ({"password": "s3cret"}, "Bearer s3cret"),
    ],
)
def test_a_prometheus_behind_auth_gets_the_connections_login_and_password(monkeypatch, fields, expected):
    """As Airflow's HttpHook sends an http connection's login and password; without them a
    Prometheus behind auth answered every guard's query 401, and every stage held to its end."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Prometheus(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == expected
            body = json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [0, "7"]}})
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(body.encode() if ok else b"Unauthorized")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True).start()
    try:
        conn(monkeypatch, "prometheus_default", conn_type="http", host="127.0.0.1", port=server.server_port, **fields)
        source = PrometheusHook().source()
        assert source.query("vector(7)") == 7.0
        assert source.is_online()
        assert "s3cret" not in repr(source)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("password", ["s3cret\n", "\ufeffs3cret", "s3cret\u201d"])
def test_a_prometheus_token_that_no_header_can_carry_fails_without_quoting_it(monkeypatch, password):
    """A line break, or a character beyond Latin-1 (a byte-order mark, a typographic quote: a
    token pasted from a document), which http.client cannot put in a header. The latter went
    out as the source: each guard read failed as "Prometheus offline: 'latin-1' codec can't
    encode character", the stage held until guard_error_limit reads in a row and rolled back."""
    from airflow.sdk.exceptions import AirflowFailException

    conn(monkeypatch, "prometheus_default", conn_type="http", host="127.0.0.1", password=password)
    with pytest.raises(AirflowFailException, match="an HTTP header cannot carry") as refused:
        PrometheusHook().source()
    assert "s3cret" not in str(refused.value)


def test_slack_goes_through_the_provider_hook_or_the_outbox(monkeypatch, tmp_path):
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.notify import stage_message
    from vision_rollout.spec import RolloutSpec

    message = stage_message(RolloutSpec(), 5, evaluate_gate(samples(300)))
    outbox = slack_notifier("#rollouts", Folder(str(tmp_path / "outbox")), slack_conn_id="no_such_slack")
    assert "outbox" in outbox.send(message)
    fake = FakeSlack().start()
    try:
        conn(
            monkeypatch,
            "slack_api_default",
            conn_type="slack",
            password=fake.token,
            extra={"base_url": fake.base_url},
        )
        posted = slack_notifier("#rollouts", Folder(str(tmp_path / "outbox"))).send(message)
        assert posted["channel"] == "C0ROLLOUT"
        assert fake.messages()[-1]["channel"] == "#rollouts"
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("extra", "password", "error"),
    [
        ({"timeout": "ten"}, "xoxb-1", "the slack_api_default connection cannot be used: ValueError"),
        ({"base_url": "slack.example.com/api/"}, "xoxb-1", "ValueError: unknown url type"),
        ({}, "xoxb-s3cret\ntail", "its token holds a line break"),
        ({"timeout": "https://alice:s3cret@proxy.example"}, "xoxb-1", "cannot be used: ValueError"),
    ],
)
def test_a_slack_connection_that_cannot_be_used_leaves_the_report_in_the_outbox(
    monkeypatch, tmp_path, caplog, capfd, extra, password, error
):
    """A Slack connection the provider could not use (a timeout that is not a number, a base URL
    without its scheme, a token with a line break) raised out of notify: the report was in
    neither Slack nor the outbox, and the token's error quoted the token. A token with a line
    break was given to slack-sdk all the same, which logged http.client's refusal (the header,
    the token in it) as an error in the task log."""
    import json

    from vision_rollout.notify import rollback_message
    from vision_rollout.spec import RolloutSpec

    conn(monkeypatch, "slack_api_default", conn_type="slack", password=password, extra=extra)
    sent = slack_notifier("#rollouts", Folder(str(tmp_path / "outbox"))).send(rollback_message(RolloutSpec(), "r"))
    assert error in sent["slack_error"]
    assert "s3cret" not in sent["slack_error"]
    assert scrub(sent["slack_error"]) == sent["slack_error"]  # (the task log's line: no word taken for a token)
    assert "s3cret" not in caplog.text + capfd.readouterr().out  # (the provider's hook logs with structlog)
    record = json.loads((tmp_path / "outbox" / sent["outbox"].rsplit("/", 1)[1]).read_text())
    assert record["slack_error"] == sent["slack_error"]


@pytest.mark.integration
def test_the_admin_client_uses_the_admin_token(monkeypatch, server_factory, repo_copy, tmp_path):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token="hook-token")
    conn(
        monkeypatch,
        "model_server_default",
        conn_type="http",
        host="127.0.0.1",
        port=s.port,
        password="hook-token",
    )
    ModelServerHook().admin.load("digits", ["1", "2"])
    assert s.client().get_model_metadata("digits")["versions"] == ["1", "2"]
    from vision_rollout.serving import AdminError, ModelServerAdmin

    with pytest.raises(AdminError, match="HTTP 401") as refused:
        ModelServerAdmin(s.http, "wrong").load("digits", ["2"])
    assert refused.value.status == 401
    assert s.client().get_model_metadata("digits")["versions"] == ["1", "2"]  # nothing changed


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"kube_config_path": "/no/such/kubeconfig"}, "ConfigException"),
        ({"kube_config": "clusters: [unclosed"}, "ParserError"),
    ],
)
def test_a_kubernetes_connection_that_cannot_be_used_fails_naming_it(monkeypatch, tmp_path, extra, error):
    """kubernetes_default whose kube config is not there or is no YAML: the provider's error
    (\"Invalid kube-config file. No configuration found.\", a YAML parser's) failed the first step
    and was retried, and reached the report without naming the connection. Now it fails at once
    naming it."""
    from airflow.sdk.exceptions import AirflowFailException

    istio = {"namespace": "ml", "service": "digits", "name": "digits"}
    conn(monkeypatch, "model_server_default", conn_type="http", extra={"run_dir": str(tmp_path), "istio": istio})
    conn(monkeypatch, "kubernetes_default", conn_type="kubernetes", extra=extra)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))  # (no kube config of the machine's)
    with pytest.raises(AirflowFailException, match=f"the kubernetes_default connection cannot be used: {error}"):
        ModelServerHook().model_lock("digits", "istio")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"host": "http://[::1"}, "Invalid IPv6 URL"),
        ({"host": "prom ex.com"}, "a space or a control character"),
        ({"host": "http://prom:abc"}, "a port that is no number from 0 to 65535"),
        ({"host": "prom", "port": 99999}, "a port that is no number from 0 to 65535"),
        ({"host": "http://:9090"}, "no host"),
    ],
)
def test_a_prometheus_connection_whose_host_and_port_make_no_url_fails_naming_it(monkeypatch, fields, error):
    """A host with a space, a port that is no number or out of range, an IPv6 address unclosed:
    the source was made all the same, and every guard read failed on the URL (as Prometheus
    offline, or a ValueError out of the poke): the stage held for guard_error_limit pokes and
    rolled back, the connection never named. Now it fails the task at once, naming it."""
    from airflow.sdk.exceptions import AirflowFailException

    conn(monkeypatch, "prometheus_default", conn_type="http", **fields)
    with pytest.raises(AirflowFailException, match=f"the prometheus_default connection's host and port .*{error}"):
        PrometheusHook().source()
