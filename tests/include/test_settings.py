"""ServingSettings: the model server connection's extras, typed and checked once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vision_rollout.settings import BUILDKIT_IMAGE, BuildSettings, ServingSettings, SettingsError


def test_defaults_and_the_old_name_of_the_prediction_log():
    s = ServingSettings.from_connection("http://h:8000", "", {})
    assert (s.repository, s.prediction_log, s.run_dir, s.token) == (
        Path("models"),
        "run/predictions",
        "run",
        None,
    )
    assert s.build == BuildSettings()
    assert (
        ServingSettings.from_connection("http://h:8000", None, {"shadow_log": "s3://b/p"}).prediction_log == "s3://b/p"
    )


def test_paths_a_rollout_uses(tmp_path):
    s = ServingSettings.from_connection("http://h:8001", "t", {"run_dir": str(tmp_path), "repository": "/m"})
    assert s.address == "h:8001"
    assert s.admin.headers == {"Authorization": "Bearer t"}
    assert s.validation("digits") == Path("/m/digits/validation")
    assert s.outbox.path == tmp_path / "outbox"
    work = s.workdir("digits", "manual__2026-11-30T16:00:00+00:00/../x").path
    assert work is not None
    assert work.parent == tmp_path / "rollouts" / "digits"
    assert s.on_disk(s.workdir("digits", "x")).is_dir()
    assert s.workdir("digits", "..").path.parent == tmp_path / "rollouts" / "digits"


def test_a_run_folder_in_an_object_store_holds_reports_but_not_mesh_local_s_files():
    """Kubernetes mode's run folder is an object store's (a task's pod takes its disk with it):
    the outbox and the rollouts' reports go there; mesh local's lock files and routes cannot."""
    s = ServingSettings.from_connection("http://h:8000", None, {"run_dir": "s3://bucket/run?region=eu-west-1"})
    assert str(s.outbox) == "s3://bucket/run/outbox"
    assert str(s.workdir("digits", "manual__1")) == "s3://bucket/run/rollouts/digits/manual__1"
    with pytest.raises(SettingsError, match="run_dir must be a folder there, not an object store URI"):
        s.on_disk(s.run_folder / "locks")


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("run_dir", "ftp://host/run", "not 'ftp'://"),
        ("run_dir", "s3://AKIA123:ghp_SECRET@bucket/run", "credentials in the URI"),
        ("run_dir", "s3://bucket/run?access_key=AKIA&secret_key=ghp_SECRET", "credentials in the URI"),
        ("prediction_log", "gs://bucket/log?token=ghp_SECRET", "credentials in the URI"),
        ("shadow_log", "s3://bucket/log#ghp_SECRET", "fragment"),
        # (review s53-1: a NUL passed, then the first task failed on a bare "embedded null byte")
        ("run_dir", "/srv/run\x00SECRET", "a NUL character in it"),
        ("prediction_log", "s3://bucket/log\x00", "a NUL character in it"),
        ("repository", "/srv/models\x00", "a NUL character in it"),
    ],
)
def test_folders_in_object_stores_are_refused_with_credentials_in_them(name, value, needle):
    """Credentials come from the environment: a URI is shown in logs and reports."""
    with pytest.raises(SettingsError, match=f"extra {name}: .*{needle}") as caught:
        ServingSettings.from_connection("http://h:8000", None, {name: value})
    assert "SECRET" not in str(caught.value)
    assert "AKIA" not in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"predictions_log": "x"}, "extra (extras): unknown key(s) ['predictions_log']"),
        # Extras saved as JSON that is no object: a TypeError's or ValueError's traceback.
        ([["repository", "models"]], "extra (extras): must be of type 'object'"),
        ([1, 2], "extra (extras): must be of type 'object'"),
        ("models", "extra (extras): must be of type 'object'"),
        ({"build": "registry"}, "extra build: must be of type 'object'"),
        ({"build": {"replica": 2}}, "extra build: unknown key(s) ['replica']"),
        ({"build": {"replicas": "two"}}, "extra build.replicas: must be of type 'integer'"),
        ({"build": {"replicas": 1.7}}, "extra build.replicas: must be of type 'integer'"),
        ({"build": {"gpus": True}}, "extra build.gpus: must be of type 'integer'"),
        ({"build": {"replicas": 0}}, "extra build.replicas: must be at least 1"),
        ({"build": {"namespace": None}}, "extra build.namespace: must be of type 'string'"),
        ({"repository": 5}, "extra repository: must be of type 'string'"),
        ({"istio": {"gateways": "mesh"}}, "extra istio.gateways: must be of type 'array'"),
        ({"istio": {"namspace": "models"}}, "extra istio: unknown key(s) ['namspace']"),
        ({"build": {"context": "gs://b/ctx.tar.gz"}}, "extra build.context: must match '^(s3://|dir://|https://"),
        (
            {"build": {"context": "git://git.example.com/x.git"}},
            "(s3://, dir:// or https://host/..., with no credentials",
        ),
        ({"build": {"context": "https://u:token@git.example.com/x.git"}}, "extra build.context: must match"),
        ({"models": {"d": {"build": {"context": "/srv/ctx"}}}}, "extra models.d.build.context: must match"),
        ({"build": {"builder_image": ""}}, "extra build.builder_image: must be non-empty"),
        # JSON as Python reads it (a connection's extras) takes NaN and Infinity, which pass every
        # bound: the Deployment's preStop wait was then math.ceil(NaN), a ValueError at deploy.
        ({"build": {"drain_seconds": float("nan")}}, "extra build.drain_seconds: must be a finite number"),
        ({"build": {"drain_seconds": float("inf")}}, "extra build.drain_seconds: must be"),
        ({"models": {"d": {"build": {"drain_seconds": float("-inf")}}}}, "extra models.d.build.drain_seconds: must be"),
    ],
)
def test_wrong_extras_are_named(extra, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        ServingSettings.from_connection("http://h:8000", None, extra)


@pytest.mark.parametrize(
    "extra",
    [
        {"build": {"context": "https://x-access-token:ghp_SECRET123@github.com/acme/models.git"}},
        {"istio": {"url": "http://admin:ghp_SECRET123@digits.ml.svc:8000"}},
        {"models": {"digits": {"istio": {"url": "http://admin:ghp_SECRET123@digits.ml.svc:8000"}}}},
        {"build": {"registry": ["ghp_SECRET123"]}},
        {"run_dir": "ghp_SECRET123" * 400},
    ],
)
def test_a_refused_extra_is_never_quoted(extra):
    """The error named the extra and quoted its value: a token pasted into a URL reached the task
    log and, through the stage's failure, the Slack report. It names the extra and the rule only."""
    with pytest.raises(SettingsError) as refused:
        ServingSettings.from_connection("http://h:8000", None, extra)
    assert "SECRET" not in str(refused.value)
    assert "must" in str(refused.value)


def test_the_admin_clients_keep_the_token_out_of_their_repr():
    from vision_rollout.mesh import LocalRouter
    from vision_rollout.serving import ModelServerAdmin

    assert "SECRET-TOKEN" not in repr(LocalRouter("http://h:8000", "digits", "SECRET-TOKEN"))
    assert "SECRET-TOKEN" not in repr(ModelServerAdmin("http://h:8000", "SECRET-TOKEN"))


@pytest.mark.parametrize("token", ["SECRET-TOKEN\n", "SECRET\nTOKEN", "SECRET\rTOKEN"])
def test_a_token_no_header_can_carry_is_refused_without_quoting_it(token):
    """http.client refuses a header value with a line break and its ValueError quotes the value:
    a connection password pasted with its newline put the token in the task log and the report."""
    from vision_rollout.serving import AdminError, ModelServerAdmin

    with pytest.raises(AdminError) as refused:
        ModelServerAdmin("http://127.0.0.1:9", token).traffic("digits")
    assert "control character" in str(refused.value)
    assert "SECRET" not in str(refused.value)


def test_kubernetes_settings_are_required_where_used():
    s = ServingSettings.from_connection("http://h:8000", None, {"istio": {"namespace": "models", "service": "digits"}})
    with pytest.raises(SettingsError, match=r"extra istio\.name \(or models\.digits\.istio\.name\)"):
        s.istio_for("digits")
    with pytest.raises(SettingsError, match=r"extra build\.registry"):
        s.build.require("registry")
    full = ServingSettings.from_connection(
        "http://h:8000",
        None,
        {
            "istio": {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh"]},
            "build": {"registry": "r.example/x", "replicas": 3.0},
        },
    )
    target = full.istio_for("digits")
    assert (target.host, target.gateways) == ("digits.models.svc.cluster.local", ["mesh"])
    assert target.root_namespace == "istio-system"  # where the mesh's bucket EnvoyFilter is read
    rooted = {"namespace": "models", "service": "digits", "name": "digits", "root_namespace": "mesh-root"}
    assert ServingSettings.from_connection("http://h:8000", None, {"istio": rooted}).istio_for("d").root_namespace == (
        "mesh-root"
    )
    with pytest.raises(SettingsError, match="root_namespace"):
        ServingSettings.from_connection("http://h:8000", None, {"istio": {**rooted, "root_namespace": "Mesh_Root"}})
    assert full.build_for("digits").replicas == 3
    assert isinstance(full.build_for("digits").replicas, int)  # 3.0 is an integer to JSON Schema, and a count here


@pytest.mark.parametrize("gateway", ["ml/edge gw", "ml/", "/edge", "ml/edge/x", "edge_gw", "-edge", "a" * 64])
def test_a_gateway_istio_would_refuse_is_refused_when_the_target_is_read(gateway):
    """A gateway name istiod's webhook refuses (not ``<namespace>/<name>`` of DNS labels, nor a
    host name) passed the connection's checks and failed the first stage's write, after the
    image build. It is refused where the target is read, naming it."""
    istio = {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh", gateway]}
    s = ServingSettings.from_connection("http://h:8000", None, {"istio": istio})
    with pytest.raises(SettingsError, match=r"extra istio \(or models\.digits\.istio\).*istio gateway"):
        s.istio_for("digits")
    fine = ["mesh", "ml/edge", "istio-system/ingress-gw", "edge.ml.svc.cluster.local"]
    assert (
        ServingSettings.from_connection("http://h:8000", None, {"istio": {**istio, "gateways": fine}})
        .istio_for("digits")
        .gateways
        == fine
    )


def test_the_sizing_settings_of_kubernetes_mode():
    build = ServingSettings.from_connection(
        "http://h:8000", None, {"build": {"min_replicas": 2.0, "autoscaling": True, "max_replicas": 30}}
    ).build
    assert (build.min_replicas, build.autoscaling, build.max_replicas) == (2, True, 30)
    assert isinstance(build.min_replicas, int)
    assert (BuildSettings().min_replicas, BuildSettings().autoscaling, BuildSettings().max_replicas) == (1, False, None)
    assert BuildSettings().drain_seconds == 10.0
    assert (BuildSettings().admin_secret, BuildSettings().feedback_secret, BuildSettings().mask_secret) == (
        "model-server-admin",
        "model-server-feedback",
        "model-server-masking",
    )
    assert BuildSettings().storage_secret is None
    assert BuildSettings().builder_image == BUILDKIT_IMAGE
    mirror = {"builder_image": "mirror.example.com/moby/buildkit:v0.32.2-rootless"}
    assert ServingSettings.from_connection("h", None, {"build": mirror}).build.builder_image == mirror["builder_image"]
    assert ServingSettings.from_connection("h", None, {"build": {"drain_seconds": 2.5}}).build.drain_seconds == 2.5
    for extra, message in (
        ({"min_replicas": 0}, "extra build.min_replicas: must be at least 1"),
        ({"autoscaling": "yes"}, "extra build.autoscaling: must be of type 'boolean'"),
        ({"max_replicas": 10_001}, "extra build.max_replicas: must be at most 10000"),
        ({"drain_seconds": -1}, "extra build.drain_seconds: must be at least 0"),
        ({"storage_secret": ""}, "extra build.storage_secret: must be non-empty"),
    ):
        with pytest.raises(SettingsError, match=re.escape(message)):
            ServingSettings.from_connection("http://h:8000", None, {"build": extra})


QUEUE_TIME = {  # each pod's queue time, through a Prometheus adapter
    "type": "Pods",
    "pods": {
        "metric": {"name": "nv_inference_queue_duration_us", "selector": {"matchLabels": {"model": "{model}"}}},
        "target": {"type": "AverageValue", "averageValue": "50k"},
    },
}


def test_the_hpas_metrics_are_the_users_and_checked_whole():
    """Kubernetes' default metric, 80% CPU, says little of a GPU server's load: the HPAs take the
    extra's autoscaling_metrics, {model} filled in; a MetricSpec Kubernetes would not read as
    written (a field missing, misspelt or misplaced) is refused naming where it is."""
    from vision_rollout.deploy import render_hpa
    from vision_rollout.mesh import IstioTarget

    s = ServingSettings.from_connection(
        "http://h:8000", None, {"build": {"autoscaling": True, "autoscaling_metrics": [QUEUE_TIME]}}
    )
    metrics = s.build_for("digits").autoscaling_metrics
    assert metrics is not None
    assert metrics[0]["pods"]["metric"]["selector"] == {"matchLabels": {"model": "digits"}}
    hpa = render_hpa(IstioTarget("ml", "digits", "digits"), "2", 2, 20, metrics)
    assert hpa["spec"]["metrics"] == metrics
    assert "metrics" not in render_hpa(IstioTarget("ml", "digits", "digits"), "2", 2, 20)["spec"]  # Kubernetes' default
    no_target = {"type": "Pods", "pods": {"metric": {"name": "x"}}}
    misspelt = {**QUEUE_TIME, "pods": {"metric": {"name": "x"}, "target": {"type": "AverageValue", "averageValu": "5"}}}
    for where, extra, message in (
        ("build", {"build": {"autoscaling_metrics": [no_target]}}, "Invalid value for `target`, must not be `None`"),
        ("build", {"build": {"autoscaling_metrics": [QUEUE_TIME, misspelt]}}, "field misspelt, misplaced"),
        ("build", {"build": {"autoscaling_metrics": [{"type": "Gpu"}]}}, "breaks enum"),
        ("build", {"build": {"autoscaling_metrics": [QUEUE_TIME] * 9}}, "at most 8 items"),
        ("models.digits.build", {"models": {"digits": {"build": {"autoscaling_metrics": [no_target]}}}}, "`target`"),
    ):
        with pytest.raises(SettingsError, match=re.escape(f"extra {where}.autoscaling_metrics")) as refused:
            ServingSettings.from_connection("http://h:8000", None, extra)
        assert message in str(refused.value)


FLEET = {
    "istio": {"namespace": "models", "service": "{model}", "name": "{model}", "hosts": ["{model}.example.com"]},
    "build": {"registry": "registry.example.com/ml/{model}-server", "context": "s3://ml-builds/ctx.tar.gz", "gpus": 1},
}


def test_a_model_without_an_entry_gets_the_connection_wide_target_with_its_name_filled_in():
    s = ServingSettings.from_connection("http://h:8000", None, FLEET)
    target = s.istio_for("Resnet_50.v2")
    assert (target.namespace, target.service, target.name) == ("models", "resnet-50-v2", "resnet-50-v2")  # a DNS label
    assert target.hosts == ["resnet-50-v2.example.com"]
    build = s.build_for("digits")
    assert (build.registry, build.context, build.gpus) == (
        "registry.example.com/ml/digits-server",
        "s3://ml-builds/ctx.tar.gz",
        1,
    )
    assert s.build.registry == "registry.example.com/ml/{model}-server"  # the connection-wide section, as written


@pytest.mark.parametrize(
    ("model", "key"),
    [("m" * 64, "service"), ("model.", "service"), ("3d-detector", "service"), ("ok", "namespace"), ("ok", "name")],
)
def test_a_target_name_kubernetes_would_refuse_is_refused_when_read(model, key):
    """Filled in from a model's name (at most 128 of A-Z a-z 0-9 _ . -), a Service's name could
    be longer than 63, end in '-' or start with a digit: the API server refused it at
    deploy_candidate, after the image build. Now the first use of the target names it."""
    extra = {"istio": {**FLEET["istio"]}}
    if model == "ok":
        extra["istio"][key] = {"namespace": "Models", "name": "{model}..b"}[key]
    s = ServingSettings.from_connection("http://h:8000", None, extra)
    with pytest.raises(
        SettingsError, match=rf"extra istio\.{key} \(or models\.{re.escape(model)}\.istio\.{key}\) gives"
    ):
        s.istio_for(model)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("namespace", "ML Builds"),
        ("namespace", "ml.builds"),  # (a namespace is a DNS label: no dot)
        ("service_account", "Image_Builder"),
        ("admin_secret", "Model_Server_Admin"),
        ("mask_secret", "Mask Keys!"),
        ("storage_secret", "AWS/creds"),
        ("push_secret", "{model}_push"),  # (filled in: "digits_push")
    ],
)
def test_a_build_name_kubernetes_would_refuse_is_refused_when_read(key, value):
    """Review s53-1: the build section's Kubernetes names were checked for length only: the API
    server refused them after the lease was taken and the image built, naming a pod's field."""
    s = ServingSettings.from_connection("http://h:8000", None, {"build": {key: value}})
    rule = "a DNS label" if key == "namespace" else "a DNS subdomain"
    with pytest.raises(
        SettingsError, match=rf"extra build\.{key} \(or models\.digits\.build\.{key}\) gives .*not {rule}"
    ):
        s.build_for("digits")
    fine = ServingSettings.from_connection("http://h:8000", None, {"build": {key: "{model}-x"}})
    assert getattr(fine.build_for("digits"), key) == "digits-x"


def test_the_rollouts_own_requests_reach_each_model_through_its_service():
    """The replay and the probe: in mesh istio through the model's Service (``istio.url``, with
    {model} filled in, or a model's own), else the connection's host and port."""
    extra = {
        **FLEET,
        "istio": {**FLEET["istio"], "url": "http://{model}.models.svc.cluster.local:8000"},
        "models": {"detector": {"istio": {"url": "http://10.0.0.7:8000"}}},
    }
    s = ServingSettings.from_connection("http://h:8000", None, extra)
    assert s.serving_url("digits", "istio") == "http://digits.models.svc.cluster.local:8000"
    assert s.serving_url("detector", "istio") == "http://10.0.0.7:8000"
    assert s.serving_url("digits", "local") == "http://h:8000"
    assert (
        ServingSettings.from_connection("http://h:8000", None, FLEET).serving_url("digits", "istio") == "http://h:8000"
    )
    for bad in ("digits.svc:8000", "https://gw.example.com", "http://gw/v2/models", "http://u:p@digits.svc:8000"):
        with pytest.raises(SettingsError, match=re.escape("extra istio.url: must match '^http://")):
            ServingSettings.from_connection("http://h:8000", None, {"istio": {"url": bad}})


def test_a_models_own_sections_override_the_connection_wide_ones_field_by_field():
    extra = {
        **FLEET,
        "models": {
            "detector": {
                "istio": {"namespace": "vision", "gateways": ["edge"]},
                "build": {"gpus": 2, "replicas": 4.0, "registry": "registry.example.com/det"},
            },
            "digits": {"build": {"gpus": 0}},
        },
    }
    s = ServingSettings.from_connection("http://h:8000", None, extra)
    det = s.istio_for("detector")
    assert (det.namespace, det.service, det.name, det.gateways) == ("vision", "detector", "detector", ["edge"])
    assert det.hosts == ["detector.example.com"]  # not overridden: the connection-wide template
    build = s.build_for("detector")
    assert (build.gpus, build.replicas, build.registry) == (2, 4, "registry.example.com/det")
    assert isinstance(build.replicas, int)
    assert build.context == "s3://ml-builds/ctx.tar.gz"  # inherited
    assert s.build_for("digits").gpus == 0
    assert s.istio_for("digits").namespace == "models"  # no istio entry: the connection-wide one
    assert s.build_for("other") == BuildSettings(
        registry="registry.example.com/ml/other-server", context="s3://ml-builds/ctx.tar.gz", gpus=1
    )


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        (
            {"a": {"istio": {"name": "shared"}}, "b": {"istio": {"name": "shared"}}},
            "models: 'a' and 'b' share the VirtualService models/shared; give each its own istio.name",
        ),
        (
            {"a": {"istio": {"service": "svc"}}, "b": {"istio": {"service": "svc", "namespace": "models"}}},
            "models: 'a' and 'b' share the Service models/svc; give each its own istio.service",
        ),
        (  # two spellings of one Kubernetes name
            {"My_Model": {}, "my-model": {}},
            "models: 'My_Model' and 'my-model' share the VirtualService models/my-model",
        ),
        (  # (review s54-1: a gateway's host claimed by two VirtualServices)
            {"a": {"istio": {"hosts": ["x.example.com"]}}, "b": {"istio": {"hosts": ["x.example.com"]}}},
            "models: 'a' and 'b' share the host 'x.example.com'; give each its own istio.hosts",
        ),
        (  # (review s54-2: as Istio reads them: case, a trailing dot, a short name, a Service's own host)
            {"a": {"istio": {"hosts": ["X.example.com"]}}, "b": {"istio": {"hosts": ["x.example.com."]}}},
            "models: 'a' and 'b' share the host 'x.example.com'",
        ),
        (
            {"a": {"istio": {"hosts": []}}, "b": {"istio": {"hosts": ["a"]}}},
            "models: 'a' and 'b' share the host 'a.models.svc.cluster.local'",
        ),
        (  # (review s54-3: a gateway named by its host name)
            {
                "a": {"istio": {"gateways": ["gw/ext"], "hosts": ["x.example.com"]}},
                "b": {"istio": {"gateways": ["ext.gw.svc.cluster.local"], "hosts": ["x.example.com"]}},
            },
            "models: 'a' and 'b' share the host 'x.example.com' on the gateway gw/ext",
        ),
    ],
)
def test_two_models_driving_one_object_are_refused_naming_both(models, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        ServingSettings.from_connection("http://h:8000", None, {**FLEET, "models": models})


WIDE = {"namespace": "models", "service": "digits", "name": "digits"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (  # (review s53-1: letters' rollout drove digits' VirtualService, sending its requests to letters)
            {"istio": WIDE, "models": {"letters": {"istio": {"service": "letters"}}}},
            "models.letters: shares the VirtualService models/digits with every model not in models",
        ),
        (
            {"istio": WIDE, "models": {"letters": {"istio": {"name": "letters"}}}},
            "models.letters: shares the Service models/digits with every model not in models",
        ),
        (
            {"istio": {**WIDE, "service": "{model}"}},
            "istio: service holds {model} and name does not, so every model would share the VirtualService models/digits",
        ),
        (
            {"istio": {**WIDE, "name": "{model}-vs"}},
            "istio: name holds {model} and service does not, so every model would share the Service models/digits",
        ),
        (  # (review s54-1: every model's VirtualService claimed the gateway's host, each a catch-all route)
            {"istio": {**WIDE, "service": "{model}", "name": "{model}", "hosts": ["models.example.com"]}},
            "istio: name holds {model} and the host 'models.example.com' does not, so every model's VirtualService "
            "would claim it",
        ),
        (  # (review s54-1: a templated host left the shared VirtualService unchecked)
            {
                "istio": {**WIDE, "hosts": ["{model}.example.com"]},
                "models": {"letters": {"istio": {"service": "letters"}}},
            },
            "models.letters: shares the VirtualService models/digits with every model not in models",
        ),
        (
            {
                "istio": {**WIDE, "hosts": ["models.example.com"]},
                "models": {"letters": {"istio": {"service": "letters", "name": "letters"}}},
            },
            "models.letters: shares the host 'models.example.com' with every model not in models",
        ),
    ],
)
def test_a_model_sharing_the_connection_wide_objects_is_refused(extra, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        ServingSettings.from_connection("http://h:8000", None, extra)


@pytest.mark.parametrize(
    "extra",
    [
        {"istio": WIDE},  # (one model's fleet)
        {"istio": WIDE, "models": {"digits": {"build": {"gpus": 1}}}},  # (the connection-wide model itself)
        {"istio": WIDE, "models": {"letters": {"istio": {"service": "letters", "name": "letters"}}}},
        {"istio": {**WIDE, "namespace": "{model}"}},  # (a namespace a model)
        {"istio": {**WIDE, "service": "{model}", "name": "{model}"}},
        {"istio": {**WIDE, "service": "{model}", "name": "{model}", "hosts": ["{model}.example.com"]}},
        {
            "istio": {**WIDE, "hosts": ["models.example.com"]},
            "models": {"letters": {"istio": {"service": "letters", "name": "letters", "hosts": ["l.example.com"]}}},
        },
        {  # (review s54-2: one short name in two namespaces is two Services; one host on two gateways)
            "istio": {**WIDE, "service": "{model}", "name": "{model}"},
            "models": {
                "a": {"istio": {"namespace": "team-a", "hosts": ["digits"]}},
                "b": {"istio": {"hosts": ["digits"]}},
            },
        },
        {
            "istio": {**WIDE, "service": "{model}", "name": "{model}"},
            "models": {
                "a": {"istio": {"gateways": ["gw/internal"], "hosts": ["x.example.com"]}},
                "b": {"istio": {"gateways": ["gw/external"], "hosts": ["x.example.com"]}},
            },
        },
    ],
)
def test_models_of_their_own_objects_are_taken(extra):
    ServingSettings.from_connection("http://h:8000", None, extra)


def test_the_same_names_in_two_namespaces_are_two_objects():
    models = {
        "a": {"istio": {"name": "x", "service": "x"}},
        "b": {"istio": {"name": "x", "service": "x", "namespace": "b"}},
    }
    s = ServingSettings.from_connection("http://h:8000", None, {**FLEET, "models": models})
    assert (s.istio_for("a").namespace, s.istio_for("b").namespace) == ("models", "b")


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ({"digits": {"istoi": {}}}, "extra models.digits: unknown key(s) ['istoi']"),
        (
            {"digits": {"build": {"replica": 2}}},
            "extra models.digits.build: unknown key(s) ['replica']",
        ),
        ({"digits": {"build": {"gpus": -1}}}, "extra models.digits.build.gpus: must be at least 0"),
        ({"digits": {"istio": {"name": ""}}}, "extra models.digits.istio.name: must be non-empty"),
        ({"../etc": {}}, "extra models: each name must match"),
        ({"digits\n": {}}, "extra models: each name must match"),  # "$" of a search matches before it
        ({"digits": {"istio": {"url": "http://h:1\n"}}}, "extra models.digits.istio.url: must match"),
        ({"m" * 129: {}}, "extra models: each name must be at most 128 characters"),
        ({"digits": []}, "extra models.digits: must be of type 'object'"),
        ([], "extra models: must be of type 'object'"),
    ],
)
def test_wrong_model_sections_are_named(models, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        ServingSettings.from_connection("http://h:8000", None, {**FLEET, "models": models})


def test_the_number_of_models_is_bounded():
    models = {f"m{i}": {} for i in range(1001)}
    with pytest.raises(SettingsError, match="extra models: must have at most 1000 entries"):
        ServingSettings.from_connection("http://h:8000", None, {"models": models})


def test_conditional_put_probes_a_killed_process_left_are_pruned_after_an_hour(s3):
    """``objects.require_conditions`` puts a probe object at the run_dir's root and deletes it:
    a process killed mid-probe left ``.conditional-put-probe-<hex>`` there for good, which no
    prune removed. ``prune_runs`` (``rolloutctl prune``, the DAG's retention) lists those over
    an hour old, then removes them; a younger one (a probe going on) and other files stay."""
    import time

    from vision_rollout.folders import Folder
    from vision_rollout.settings import prune_runs

    run_dir = Folder(s3.uri())
    probe = ".conditional-put-probe-" + "a" * 32
    run_dir.write(probe, b"probe")
    run_dir.write("notes.txt", b"mine")
    now = time.time()
    assert prune_runs(run_dir, [], now - 86400, now)["conditional-put probes"] == []
    later = now + 3601
    assert prune_runs(run_dir, [], now - 86400, later, dry_run=True)["conditional-put probes"] == [probe]
    assert probe in run_dir.changed()
    assert prune_runs(run_dir, [], now - 86400, later)["conditional-put probes"] == [probe]
    assert sorted(run_dir.changed()) == ["notes.txt"]


def test_a_cluster_whose_dns_domain_is_not_cluster_local_is_named_by_its_own():
    """The rollout wrote every host as <service>.<namespace>.svc.cluster.local, with no way to
    say otherwise: on a cluster whose DNS domain is another (kubelet's clusterDomain, Istio's
    domainSuffix), the VirtualService's and DestinationRule's host named no service Istio
    knows, and its routes and subsets applied to nothing (Envoy spread the requests over every
    version). The istio section's cluster_domain names it; a domain Kubernetes would refuse is
    named."""
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import render_destination_rule, render_virtual_service

    istio = {"namespace": "models", "service": "digits", "name": "digits", "cluster_domain": "k8s.example.internal"}
    target = ServingSettings.from_connection("http://h:8000", None, {"istio": istio}).istio_for("digits")
    host = "digits.models.svc.k8s.example.internal"
    assert target.host == host
    vs = render_virtual_service(target, TrafficPolicy.from_dict({"route": [{"version": "1"}]}), ["1"])
    assert vs["spec"]["hosts"] == [host]
    assert {d["destination"]["host"] for r in vs["spec"]["http"] for d in r["route"]} == {host}
    assert render_destination_rule(target, ["1"])["spec"]["host"] == host
    for wrong in ("Example_Domain", "-k8s.local", "a" * 254):
        with pytest.raises(SettingsError, match="cluster_domain"):
            ServingSettings.from_connection("http://h:8000", None, {"istio": {**istio, "cluster_domain": wrong}})
    del istio["cluster_domain"]
    assert ServingSettings.from_connection("http://h:8000", None, {"istio": istio}).istio_for("d").host == (
        "digits.models.svc.cluster.local"
    )


def test_a_run_folder_holding_the_record_of_its_report_is_pruned(tmp_path):
    """notify keeps the run's Slack post in its run folder (``RUN_REPORT``): ``prune_runs`` took
    that file for someone else's and kept it, so every run that sent its report left its folder
    behind for good, the file alone in it, and prune counted no run folder removed. Now it goes
    with the run's other files, and a file that is not the run's still keeps its folder."""
    import os
    import time

    from vision_rollout import attempts
    from vision_rollout.folders import Folder
    from vision_rollout.settings import ENDED, RUN_REPORT, prune_runs, workdir

    store = Folder(str(tmp_path))
    for run_id in ("sent", "annotated"):
        folder = workdir(store, "digits", run_id)
        attempts.applied(folder, run_id, 0, time.time())
        folder.write(RUN_REPORT, b'{"report": "20260101T000000-000000001-aaaaaa", "channel": "C1", "ts": "1.2"}')
        folder.write(ENDED, b'{"holder": "%s", "decided": "promote"}' % run_id.encode())
    workdir(store, "digits", "annotated").write("notes.txt", b"mine")
    old = time.time() - 40 * 86400
    for p in tmp_path.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    now = time.time()
    assert prune_runs(store, ["digits"], now - 30 * 86400, now)["run folders"] == ["digits/sent"]
    assert (store / "rollouts" / "digits").folders() == ["annotated"]
    assert workdir(store, "digits", "annotated").names() == ["notes.txt"]


def test_a_host_or_gateway_istio_takes_is_taken_up_to_255_characters():
    """istiod's webhook takes a VirtualService's host and gateway of up to 255 characters
    (checkDNS1123Preconditions: 'domain name too long (max 255)'; ``mesh.ISTIO_HOST``,
    ``ISTIO_GATEWAY``); the settings' schema refused 254 and 255 (a Kubernetes name's 253). It
    takes what Istio takes and refuses 256, naming the setting."""
    istio = {"namespace": "models", "service": "digits", "name": "digits"}
    host = ".".join(["a" * 63] * 3 + ["b" * 62]) + "."  # 255, an absolute name
    gateway = ".".join(["g" * 63] * 4)  # 255
    too_long = ".".join(["c" * 63] * 3 + ["d" * 62, "e"])  # 256, each label Istio's
    assert (len(host), len(gateway), len(too_long)) == (255, 255, 256)
    target = ServingSettings.from_connection(
        "http://h:8000", None, {"istio": {**istio, "hosts": [host], "gateways": [gateway]}}
    ).istio_for("digits")
    assert (target.hosts, target.gateways) == ([host], [gateway])
    for key in ("hosts", "gateways"):
        with pytest.raises(SettingsError, match=key):
            ServingSettings.from_connection("http://h:8000", None, {"istio": {**istio, key: [too_long]}})


def test_a_guard_file_a_killed_removal_left_among_the_approval_counts_is_pruned(tmp_path):
    """An approval wait's count of failed reads is removed once it ends; on a disk the removal
    locks ``.<name>.lock`` beside it and removes it once done: one killed before removing its
    guard left it, and ``prune_runs`` took it for someone else's file and kept it for good. It
    goes like the count it guarded, once as old, under its lock."""
    import os
    import time

    from vision_rollout.folders import Folder
    from vision_rollout.settings import approvals, prune_runs

    store = Folder(str(tmp_path))
    counts = approvals(store, "digits")
    counts.write("notes.txt", b"mine")
    guard = tmp_path / "approvals" / "digits" / ".0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.json.lock"
    guard.write_bytes(b"")
    old = time.time() - 40 * 86400
    for p in (guard, tmp_path / "approvals" / "digits" / "notes.txt"):
        os.utime(p, (old, old))
    now = time.time()
    assert prune_runs(store, ["digits"], now - 30 * 86400, now, dry_run=True)["approval counts"] == [
        f"digits/{guard.name}"
    ]
    assert prune_runs(store, ["digits"], now - 30 * 86400, now)["approval counts"] == [f"digits/{guard.name}"]
    assert sorted(p.name for p in guard.parent.iterdir()) == ["notes.txt"]


def test_the_run_folder_an_advice_names_is_absolute_and_shell_quoted(tmp_path, monkeypatch):
    """A failure's advice (``rolloutctl restart-stage --run-dir ...``) named the run folder as the
    connection holds it: the default ``run`` is the worker's working directory's, so the command
    typed from anywhere else read another folder (or none); a path with a space split in two. It
    is the absolute path, shell-quoted; an object store URI as it is."""
    import shlex

    monkeypatch.chdir(tmp_path)
    for run_dir, said in [
        (None, str(tmp_path / "run")),
        ("my runs", str(tmp_path / "my runs")),
        (str(tmp_path / "a b"), str(tmp_path / "a b")),
        ("s3://bucket/rollouts", "s3://bucket/rollouts"),
    ]:
        extra = {} if run_dir is None else {"run_dir": run_dir}
        argument = ServingSettings.from_connection("http://127.0.0.1:8000", None, extra).run_dir_argument
        assert shlex.split(argument) == [said]
