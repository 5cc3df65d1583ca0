"""Hooks: Airflow connections -> the rollout library's objects. Secrets come only from here.

- ``model_server_default`` (http): host, port, schema; the admin token as the password;
  extra ``{"repository": ..., "prediction_log": URI, "run_dir": ...}``; for kubernetes mode also
  ``"istio": {"namespace", "service", "name", "gateways"}`` and ``"build": {"registry", "context",
  "namespace", "service_account", "push_secret"}``.
- ``kubernetes_default`` (the cncf provider's): the cluster the IstioRouter and Kaniko pods use.
- ``prometheus_default`` (http): the Prometheus HTTP API.
- ``slack_api_default`` (slack): the Slack provider's own hook and connection (token as the
  password, optional ``base_url`` extra); without a token, reports go to an outbox folder.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from include.rollout.mesh import LocalRouter
from include.rollout.metrics import PrometheusSource, ScrapeSource

if TYPE_CHECKING:
    from include.rollout.deploy import VersionDeployments
    from include.rollout.mesh import IstioRouter, IstioTarget
    from include.rollout.notify import SlackNotifier


def _http_url(conn: Any, default_port: int) -> str:
    return f"{conn.schema or 'http'}://{conn.host or '127.0.0.1'}:{conn.port or default_port}"


class ModelServerHook(BaseHook):
    """The model server (KServe v2): its admin API, its metrics, its traffic policy."""

    conn_name_attr = "model_server_conn_id"
    default_conn_name = "model_server_default"
    conn_type = "http"
    hook_name = "Model server (KServe v2)"

    def __init__(self, model_server_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.model_server_conn_id = model_server_conn_id

    @cached_property
    def connection(self) -> Any:
        return self.get_connection(self.model_server_conn_id)

    @property
    def url(self) -> str:
        return _http_url(self.connection, 8000)

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it."""
        return self.url.split("://", 1)[1]

    @property
    def token(self) -> str | None:
        return self.connection.password or None

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson)

    @property
    def prediction_log(self) -> str:
        """The prediction log's URI (extra ``prediction_log``; ``shadow_log`` is its old name)."""
        return str(self.extra.get("prediction_log") or self.extra.get("shadow_log") or "run/predictions")

    def router(self, model: str, state_file: Path) -> LocalRouter:
        return LocalRouter(self.url, model, self.token, state_file)

    def _istio(self, kubernetes_conn_id: str) -> tuple[IstioTarget, Any]:
        """The extras' ``istio`` section (namespace, service, name, gateways, hosts) and the
        cluster's API client through the cncf provider's hook."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from include.rollout.mesh import IstioTarget

        istio = self.extra.get("istio") or {}
        missing = [k for k in ("namespace", "service", "name") if not istio.get(k)]
        if missing:
            raise ValueError(f"mesh 'istio' needs the {self.model_server_conn_id} extra istio.{missing[0]}")
        target = IstioTarget(istio["namespace"], istio["service"], istio["name"],
                             list(istio.get("gateways", [])), list(istio.get("hosts", [])))  # fmt: skip
        return target, KubernetesHook(conn_id=kubernetes_conn_id).api_client

    def istio_router(
        self, versions: list[str], kubernetes_conn_id: str = "kubernetes_default"
    ) -> IstioRouter:
        """The IstioRouter for this model's VirtualService and DestinationRule."""
        from include.rollout.mesh import IstioRouter

        target, api = self._istio(kubernetes_conn_id)
        return IstioRouter(target, versions, api_client=api)

    def deployments(self, model: str, kubernetes_conn_id: str = "kubernetes_default") -> VersionDeployments:
        """One Deployment per version behind the subsets (extras ``build.gpus``, default 1)."""
        from include.rollout.deploy import VersionDeployments

        target, api = self._istio(kubernetes_conn_id)
        return VersionDeployments(
            target, model, api, gpus=int((self.extra.get("build") or {}).get("gpus", 1))
        )

    def scrape(self) -> ScrapeSource:
        return ScrapeSource(self.url)

    def load_versions(self, model: str, versions: list[str]) -> None:
        """Serve exactly these versions of ``model`` (Triton's load API with a version policy)."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.address)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        policy = {"version_policy": {"specific": {"versions": sorted({int(v) for v in versions})}}}
        client.load_model(model, headers=headers, config=json.dumps(policy))


class PrometheusHook(BaseHook):
    """The ``prometheus_default`` connection (http): host, port and schema of the Prometheus the
    guards query."""

    conn_name_attr = "prometheus_conn_id"
    default_conn_name = "prometheus_default"
    conn_type = "http"
    hook_name = "Prometheus"

    def __init__(self, prometheus_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.prometheus_conn_id = prometheus_conn_id

    def source(self) -> PrometheusSource:
        return PrometheusSource(_http_url(self.get_connection(self.prometheus_conn_id), 9090))


def slack_notifier(channel: str, outbox: Path, slack_conn_id: str = "slack_api_default") -> SlackNotifier:
    """Through the Slack provider's hook when its connection has a token; else, or when Slack
    fails, the outbox."""
    from airflow.providers.slack.hooks.slack import SlackHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from include.rollout.notify import SlackNotifier

    try:
        conn = BaseHook.get_connection(slack_conn_id)
    except AirflowNotFoundException:
        conn = None
    if conn is None or not conn.password:
        return SlackNotifier(channel, outbox=outbox)
    return SlackNotifier(channel, client=SlackHook(slack_conn_id=slack_conn_id).client, outbox=outbox)
