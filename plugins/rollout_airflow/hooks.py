"""Hooks: Airflow connections -> the rollout library's objects. Secrets come only from here.

- ``model_server_default`` (http): host, port, schema; the admin token as the password; the
  extras as ``vision_rollout.settings`` describes them (repository, prediction log, run folder,
  and for kubernetes mode ``istio`` and ``build``, connection-wide and per model).
- ``kubernetes_default`` (the cncf provider's): the cluster the IstioRouter and the build pods use.
- ``prometheus_default`` (http): the Prometheus HTTP API; login and password for basic auth, or
  a password alone for a bearer token.
- ``slack_api_default`` (slack): the Slack provider's own hook and connection (token as the
  password, optional ``base_url`` extra); without a token, reports go to an outbox folder.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from airflow.sdk import BaseHook

from vision_rollout.mesh import LocalRouter
from vision_rollout.metrics import PrometheusSource, ScrapeSource
from vision_rollout.serving import ModelServerAdmin
from vision_rollout.settings import ServingSettings

if TYPE_CHECKING:
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.folders import Folder
    from vision_rollout.locks import ModelLock
    from vision_rollout.mesh import IstioRouter, IstioTarget
    from vision_rollout.notify import SlackNotifier


T = TypeVar("T")


def _http_url(conn: Any, default_port: int) -> str:
    """The connection's base URL. A host given as a URL (``http://digits.ml.svc:8000``: Airflow's
    HTTP connections take "the entire url or the base of the url") is the URL, the port field
    added when it names none; else schema, host and port, each with its default. A scheme but
    http or https, credentials in the host (an "@" anywhere), a query or a fragment, a path with no
    scheme, or a host and port that make no URL (a space, a port that is no number), fail the task
    naming the connection, never quoting the host."""
    from airflow.sdk.exceptions import AirflowFailException

    host = (conn.host or "127.0.0.1").rstrip("/")
    # (the URL is in logs, reports and the replay's errors; urllib sends no userinfo. Anywhere, and
    # first: a password holding "/" ends the host)
    if "@" in host:
        raise AirflowFailException(
            f"the {conn.conn_id} connection's host holds an '@' (credentials, user:password@?): put them in its "
            "login and password"
        )
    if "://" not in host and re.fullmatch(r"[^:/\s]+:[0-9]{1,5}", host):  # (a port of its own: "digits.ml.svc:8000")
        host = f"{conn.schema or 'http'}://{host}"
    if "://" not in host:
        if "/" in host:  # (a path with no scheme: the port would go after it; "user:pass/word" kept a password)
            raise AirflowFailException(
                f"the {conn.conn_id} connection's host holds a '/' but no scheme: give a host name, or a URL "
                "(http://host:port/path)"
            )
        host = f"{conn.schema or 'http'}://{host}:{conn.port or default_port}"
    scheme, _, rest = host.partition("://")
    if scheme.lower() not in ("http", "https"):  # (a database's schema name, say: no request would go)
        shown = repr(scheme) if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}", scheme) else "something else"
        raise AirflowFailException(
            f"the {conn.conn_id} connection's schema (or its host's scheme) must be http or https, not {shown}"
        )
    netloc, sep, path = rest.partition("/")
    if "?" in rest or "#" in rest:  # (a token in a query would be in the same logs; no request takes one)
        raise AirflowFailException(
            f"the {conn.conn_id} connection's host holds a query or a fragment (?... or #...): give the base URL "
            "only, credentials in its login and password"
        )
    if conn.port and not re.search(r":[0-9]+$", netloc):
        netloc = f"{netloc}:{conn.port}"
    url = f"{scheme}://{netloc}{sep}{path}"
    try:  # (else every request fails on it: a guard read as Prometheus offline, poke after poke)
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not one)
        if re.search(r"[\x00-\x20\x7f]", netloc):
            raise ValueError("a space or a control character in the host")
        if not parts.hostname:
            raise ValueError("no host")
    except ValueError as exc:
        why = str(exc)  # (never urllib's own words, which quote the host: a password read as a port, or NFKC's)
        if why not in ("Invalid IPv6 URL", "no host", "a space or a control character in the host"):
            why = "a port that is no number from 0 to 65535" if "port" in why.lower() else "characters no URL takes"
        raise AirflowFailException(f"the {conn.conn_id} connection's host and port make no URL: {why}") from None
    return url


def _extras(conn: Any) -> dict[str, Any]:
    """The connection's extras, a JSON object. Airflow's ``extra_dejson`` takes extras that are
    not JSON for none at all (every setting its default: another folder, another log), and
    JSON that is not an object would fail as a TypeError; either fails naming the connection
    (not quoting it: an extra may hold what should stay out of logs)."""
    from vision_rollout.settings import SettingsError

    raw = conn.extra
    try:
        extra = json.loads(raw) if isinstance(raw, str) and raw.strip() else raw or {}
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise SettingsError(f"the {conn.conn_id} connection's extras are not a JSON object")
    return extra


def distributed_executor() -> str | None:
    """The first of Airflow's configured executors whose workers may run on several machines
    (Celery, Kubernetes, ...), or None where all run on this one (LocalExecutor)."""
    from airflow.configuration import conf

    for entry in str(conf.get("core", "executor", fallback="LocalExecutor")).split(","):
        name = entry.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1]  # an alias, a module path
        if name and name not in ("LocalExecutor", "SequentialExecutor"):
            return name
    return None


class ModelServerHook(BaseHook):
    """The ``model_server_default`` connection as typed settings (read once per hook), and what
    is built from them: the mesh router, the admin client, the version Deployments."""

    conn_name_attr = "model_server_conn_id"
    default_conn_name = "model_server_default"
    conn_type = "http"
    hook_name = "Model server (KServe v2)"

    def __init__(self, model_server_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.model_server_conn_id = model_server_conn_id

    @cached_property
    def settings(self) -> ServingSettings:
        """The connection's settings; folders on one machine's disk under an executor whose
        workers run on several fail the task naming the extra (``ServingSettings.unshared``)."""
        from vision_rollout.settings import SettingsError

        conn = self.get_connection(self.model_server_conn_id)
        settings = ServingSettings.from_connection(_http_url(conn, 8000), conn.password, _extras(conn))
        executor = distributed_executor()
        problem = settings.unshared(executor) if executor else None
        if problem:
            raise SettingsError(problem)
        return settings

    @property
    def admin(self) -> ModelServerAdmin:
        return self.settings.admin

    def router(self, model: str, state_file: Path) -> LocalRouter:
        return LocalRouter(self.settings.url, model, self.settings.token, state_file)

    def istio_router(
        self, model: str, versions: list[str], kubernetes_conn_id: str = "kubernetes_default"
    ) -> IstioRouter:
        """The IstioRouter for this model's VirtualService and DestinationRule, recording each
        mirror change it applies in the run folder (``mirror_log``: the hourly audit's)."""
        from vision_rollout.mesh import IstioRouter
        from vision_rollout.mirrors import mirror_log

        return IstioRouter(
            self._istio(model),
            versions,
            api_client=_kubernetes(kubernetes_conn_id),
            mirrors=mirror_log(self.settings.run_folder, model),
        )

    def deployments(self, model: str, kubernetes_conn_id: str = "kubernetes_default") -> VersionDeployments:
        """One Deployment per version behind the model's subsets (the model's ``build`` extras)."""
        from vision_rollout.deploy import VersionDeployments

        settings = self.settings
        return VersionDeployments(
            self._istio(model),
            model,
            _kubernetes(kubernetes_conn_id),
            settings.build_for(model),
            settings.prediction_log,
        )

    def model_lock(self, model: str, mesh: str, kubernetes_conn_id: str = "kubernetes_default") -> ModelLock:
        """One rollout at a time of what ``model``'s rollout writes: in mesh ``istio`` the Lease
        ``rollout-<VirtualService>`` in the target's namespace (models sharing one target share it),
        else a lock file under the run folder (``locks/<model>.lock``: one model server per model)."""
        from vision_rollout.locks import FileLock, LeaseLock

        if mesh == "istio":
            target = self._istio(model)
            return LeaseLock(model, target.namespace, _kubernetes(kubernetes_conn_id), key=target.name)
        return FileLock(model, self.on_disk(self.settings.run_folder / "locks"))

    def on_disk(self, folder: Folder) -> Path:
        """Mesh ``local``'s files on this machine's disk; a run folder in an object store fails
        the task naming the extra (no retry)."""
        return _or_fail(self.settings.on_disk, folder)

    def _istio(self, model: str) -> IstioTarget:
        """Kubernetes mode's Istio objects of the model; without them the task fails naming the
        extra (no retry)."""
        return _or_fail(self.settings.istio_for, model)

    def scrape(self) -> ScrapeSource:
        return ScrapeSource(self.settings.url)


def _or_fail(read: Callable[[Any], T], arg: Any) -> T:
    """``read(arg)``; a setting it finds wrong fails the task naming the extra (no retry)."""
    from airflow.sdk.exceptions import AirflowFailException

    from vision_rollout.settings import SettingsError

    try:
        return read(arg)
    except SettingsError as exc:
        raise AirflowFailException(str(exc)) from None


def _kubernetes(conn_id: str) -> Any:
    """The cluster's API client through the cncf provider's hook, sending its requests again
    when the API server did not serve them, and its reads when it may not have
    (``mesh.api_retries``). A connection the provider cannot make a client of (no kube config
    there, one that is no YAML, none in the cluster) fails the task naming it (no retry); one not
    defined raises AirflowNotFoundException, which names it."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

    from vision_rollout.mesh import with_retries

    try:
        client = KubernetesHook(conn_id=conn_id).api_client
    except AirflowNotFoundException:  # (it names the connection; the shadow audit goes on without one)
        raise
    except Exception as exc:
        raise AirflowFailException(
            f"the {conn_id} connection cannot be used: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
    return with_retries(client)


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
        """Its login and password as HTTP basic auth, as Airflow's HttpHook sends them; a
        password alone as a bearer token (a managed Prometheus, an auth proxy)."""
        conn = self.get_connection(self.prometheus_conn_id)
        authorization = None
        if conn.login:
            authorization = "Basic " + base64.b64encode(f"{conn.login}:{conn.password or ''}".encode()).decode()
        elif conn.password:
            if any(ord(c) < 32 or ord(c) == 127 or ord(c) > 255 for c in conn.password):
                # (http.client's refusal of such a header quotes it: the token, in logs and XCom; one
                # beyond Latin-1 it cannot encode, which read as Prometheus offline at every guard read)
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(
                    f"the {self.prometheus_conn_id} connection's password holds a line break or another "
                    "control character, or one beyond Latin-1 (a byte-order mark, a typographic quote), which "
                    "an HTTP header cannot carry"
                )
            authorization = f"Bearer {conn.password}"
        return PrometheusSource(_http_url(conn, 9090), authorization=authorization)


def slack_notifier(channel: str, outbox: Folder, slack_conn_id: str = "slack_api_default") -> SlackNotifier:
    """Through the Slack provider's hook when its connection has a token; else, or when Slack
    fails, the outbox."""
    from airflow.providers.slack.hooks.slack import SlackHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from vision_rollout.notify import SlackNotifier, one_line

    try:
        conn = BaseHook.get_connection(slack_conn_id)
    except AirflowNotFoundException:
        conn = None
    if conn is None or not conn.password:
        return SlackNotifier(channel, outbox=outbox)
    if re.search(r"[^\x21-\x7e]", conn.password):  # (slack-sdk logs http.client's refusal: the header, the token)
        unusable = (
            f"the {slack_conn_id} connection cannot be used: its token holds a line break, a space or a "
            "character beyond printable ASCII (a Slack token holds none)"
        )
        return SlackNotifier(channel, outbox=outbox, unusable=unusable)
    try:
        client = SlackHook(slack_conn_id=slack_conn_id).client
    except Exception as exc:  # (an extra the provider cannot read: a timeout that is not a number)
        unusable = f"the {slack_conn_id} connection cannot be used: {one_line(f'{type(exc).__name__}: {exc}')[:300]}"
        return SlackNotifier(channel, outbox=outbox, unusable=unusable)
    return SlackNotifier(channel, client=client, outbox=outbox)
