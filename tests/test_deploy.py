"""The Kubernetes layout (deploy/k8s) and the Grafana dashboard, offline.

Every overlay renders with the real kustomize (the one inside the `kubectl` of the venv) and validates strictly
against pinned Kubernetes schemas, the KEDA and Prometheus Operator objects against their operators' schemas. The
manifests may only name settings, ports, probe paths and metrics that the service really has.
"""

import base64
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics import MetricWrapperBase

from dsd_model.serving import metrics
from dsd_model.settings import Settings
from dsd_serve.job_store import EvictingJobStore, RedisJobStore
from servers import ROOT, RedisServer, start_service, wait_ready

KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
"""The oldest Kubernetes the manifests support (native preStop sleep) and the newest schema at hand."""
K8S = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAYS = sorted(path.parent.name for path in (K8S / "overlays").glob("*/kustomization.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dsd-dashboard.json"
OPERATING = ROOT / "docs" / "deployment.md"
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
                    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
                    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule}
TARGET_LABELS = {"namespace", "service", "pod", "job", "instance", "endpoint", "container"}
"""Labels Prometheus Operator adds to every scraped series."""
SERVICE = "dsd"
REDIS = "dsd-redis"
JOBS_REDIS = "dsd-jobs-redis"
OPERATOR_SECRETS = {"DSD_WEBHOOK_SECRET": "whsec_" + base64.b64encode(bytes(32)).decode()}
"""Secrets the operator creates, in the format docs/deployment.md makes them (`whsec_$(openssl rand -base64 32)`)."""
each_overlay = pytest.mark.parametrize("overlay", OVERLAYS, ids=[f"overlays/{name}" for name in OVERLAYS])
"""A plain `gpu` id would read as the `gpu` marker, which skips tests without CUDA."""


def exposed_series() -> dict[str, set[str]]:
    """Every series name of dsd_model/serving/metrics.py as Prometheus stores it, with its label names."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            family = collector.describe()[0]
            for suffix in suffixes[family.type]:
                series[family.name + suffix] = set(collector._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return series


SERIES = exposed_series()


def check_promql(expression: str) -> set[str]:
    """Parse `expression`; every selector must name a series of the service and only its labels. Returns the
    series it reads."""
    nodes = []
    promql_parser.walk(promql_parser.parse(expression), lambda node: nodes.append(node))
    selectors = [node for node in nodes if isinstance(node, promql_parser.VectorSelector)]
    assert selectors, expression
    labels = set(TARGET_LABELS)
    for selector in selectors:
        assert selector.name in SERIES, f"{selector.name} (in {expression}) is not a metric of dsd_model/serving/metrics.py"
        labels |= SERIES[selector.name]
    used = {matcher.name for selector in selectors for matcher in selector.matchers.matchers}
    used |= {label for node in nodes if isinstance(node, promql_parser.AggregateExpr) and node.modifier
             for label in node.modifier.labels}
    assert used <= labels, f"{expression} uses labels {sorted(used - labels)} that its metrics do not have"
    return {selector.name for selector in selectors}


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(yaml.safe_load_all(done.stdout))


def objects(overlay: str, kind: str) -> list[dict]:
    return [doc for doc in render(overlay) if doc["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> dict:
    (found,) = [doc for doc in objects(overlay, kind) if doc["metadata"]["name"] == name]
    return found


def container(overlay: str) -> dict:
    (server,) = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]["containers"]
    return server


def environment(overlay: str) -> dict[str, str]:
    """The server container's variables as the pod sees them; Secrets that the overlay leaves to the operator
    read as a placeholder."""
    server = container(overlay)
    env = {}
    for source in server.get("envFrom", []):
        env.update(named(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in server.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            secrets = [doc for doc in objects(overlay, "Secret") if doc["metadata"]["name"] == reference["name"]]
            value = (base64.b64decode(secrets[0]["data"][reference["key"]]).decode() if secrets
                     else OPERATOR_SECRETS.get(variable["name"], "from-operator"))
            env[variable["name"]] = value
    return env


def settings_of(overlay: str, monkeypatch) -> Settings:
    for name in [name for name in os.environ if name.startswith("DSD_")]:
        monkeypatch.delenv(name)
    for name, value in environment(overlay).items():
        monkeypatch.setenv(name, value)
    return Settings()


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def pod_labels(overlay: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
            for doc in objects(overlay, "Deployment")}


def test_there_is_a_gpu_and_a_dev_overlay():
    assert {"gpu", "dev"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@each_overlay
def test_renders_and_validates_strictly(overlay, version):
    for doc in render(overlay):
        model = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
        if model is None:
            kubernetes_validate.validate(doc, version, strict=True)
        else:
            again = model.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)
            assert again == doc, f"{doc['kind']} has fields or types its schema does not know"
    for scaled in objects(overlay, "ScaledObject"):
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        autoscaler = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                      "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVICE},
                               "maxReplicas": scaled["spec"]["maxReplicaCount"], "behavior": behavior}}
        kubernetes_validate.validate(autoscaler, version, strict=True)


@each_overlay
def test_settings_are_the_services_own(overlay, monkeypatch):
    env = environment(overlay)
    unknown = [name for name in env if name.startswith("DSD_")
               and name.removeprefix("DSD_").lower() not in Settings.model_fields]
    assert not unknown, f"not settings of dsd_model/settings.py: {unknown}"
    settings = settings_of(overlay, monkeypatch)
    spec = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False, "service links would add DSD_* variables of their own"
    ports = {port["name"]: port["containerPort"] for port in container(overlay)["ports"]}
    assert ports == {"http": BentoMLContainer.http.port.get(), "grpc": settings.grpc_port}
    service = named(overlay, "Service", SERVICE)["spec"]
    assert selects(service["selector"], pod_labels(overlay)[SERVICE])
    assert {(port["name"], port["targetPort"]) for port in service["ports"]} == {("http", "http"), ("grpc", "grpc")}
    assert all(port.get("appProtocol") for port in service["ports"])
    for url in filter(None, (settings.redis_url, settings.jobs_redis_url)):
        url = urlsplit(url)
        redis = named(overlay, "Service", url.hostname)
        assert url.port in {port["port"] for port in redis["spec"]["ports"]}


@each_overlay
def test_real_weights_need_a_gpu_and_a_read_only_volume(overlay, monkeypatch):
    settings = settings_of(overlay, monkeypatch)
    if settings.resolved_profile != "real":
        pytest.skip(f"{overlay} serves the tiny profile")
    server = container(overlay)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.device == "cuda"
    pod = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    weights = [mount for mount in server["volumeMounts"] if str(settings.model_dir).startswith(mount["mountPath"])]
    assert len(weights) == 1 and weights[0]["readOnly"] is True
    claim = volumes[weights[0]["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    # read-only for every replica, written by the weights Job alone (test_weights_job_fills_what_the_gpu_overlay_serves)
    assert named(overlay, "PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteMany"]
    paths = [settings.transformer_path, *settings.adapters.values()]
    assert all(str(path).startswith(weights[0]["mountPath"]) for path in paths)


@each_overlay
def test_compiled_artefacts_persist_on_a_shared_writable_volume(overlay, monkeypatch):
    settings = settings_of(overlay, monkeypatch)
    if settings.compile_cache_dir is None:
        pytest.skip(f"{overlay} keeps no compiled artefacts across restarts")
    server = container(overlay)
    mounts = [m for m in server["volumeMounts"] if str(settings.compile_cache_dir).startswith(m["mountPath"])]
    assert len(mounts) == 1 and not mounts[0].get("readOnly", False)
    pod = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
    claim = {v["name"]: v for v in pod["volumes"]}[mounts[0]["name"]]["persistentVolumeClaim"]
    assert named(overlay, "PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteMany"]


@each_overlay
def test_probes_and_shutdown_outlast_the_longest_request(overlay, monkeypatch):
    settings = settings_of(overlay, monkeypatch)
    server = container(overlay)
    assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"]
    assert startup >= (1800 if settings.resolved_profile == "real" else 300), "too short for the model load"
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.max_deadline_s < settings.drain_timeout_s
    assert grace >= pause + settings.drain_timeout_s + 10, "SIGKILL would cut requests that are still draining"


@each_overlay
def test_pods_run_locked_down(overlay):
    for deployment in objects(overlay, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for box in pod.get("initContainers", []) + pod["containers"]:
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= box["resources"]["requests"].keys() and "memory" in box["resources"]["limits"]
            writable = {mount["mountPath"] for mount in box["volumeMounts"] if "emptyDir" in volumes[mount["name"]]
                        or "persistentVolumeClaim" in volumes[mount["name"]] and not mount.get("readOnly", False)}
            if box["name"] == SERVICE:
                env = {variable["name"]: variable.get("value") for variable in box["env"]}
                assert {"/tmp", env["BENTOML_HOME"]} <= writable
                assert env["XDG_CACHE_HOME"].startswith("/tmp/")
            elif box in pod["containers"]:
                assert writable
            else:
                assert all(mount.get("readOnly") for mount in box["volumeMounts"]), "an init container only waits"


@each_overlay
def test_tmp_holds_every_upload_being_read(overlay, monkeypatch):
    settings = settings_of(overlay, monkeypatch)
    server = container(overlay)
    pod = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (tmp,) = [mount["name"] for mount in server["volumeMounts"] if mount["mountPath"] == "/tmp"]
    limit = volumes[tmp]["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi")
    # room beside the spooled uploads for XDG_CACHE_HOME
    assert int(limit[:-2]) * 2**30 >= 1.5 * settings.max_upload_bytes * settings.max_concurrent_uploads


@each_overlay
def test_selectors_disruption_budget_and_network_policy(overlay):
    labels = pod_labels(overlay)
    budget = named(overlay, "PodDisruptionBudget", SERVICE)["spec"]
    assert [name for name, pod in labels.items() if selects(budget["selector"]["matchLabels"], pod)] == [SERVICE]
    assert budget["maxUnavailable"] == 1
    for policy in objects(overlay, "NetworkPolicy"):
        protected = [name for name, pod in labels.items() if selects(policy["spec"]["podSelector"]["matchLabels"], pod)]
        assert len(protected) == 1 and protected[0] in (REDIS, JOBS_REDIS)
        (rule,) = policy["spec"]["ingress"]
        (source,) = rule["from"]
        allowed = [name for name, pod in labels.items() if selects(source["podSelector"]["matchLabels"], pod)]
        assert allowed == [SERVICE]
        (redis,) = named(overlay, "Deployment", protected[0])["spec"]["template"]["spec"]["containers"]
        assert [port["port"] for port in rule["ports"]] == [port["containerPort"] for port in redis["ports"]]
    guarded = {name for policy in objects(overlay, "NetworkPolicy") for name, pod in labels.items()
               if selects(policy["spec"]["podSelector"]["matchLabels"], pod)}
    assert {REDIS, JOBS_REDIS} & set(labels) <= guarded, "an in-cluster Redis needs its NetworkPolicy"


def redis_serving(overlay: str, url: str) -> dict:
    """The container of the in-cluster Redis that `url` reaches (through its Service)."""
    service = named(overlay, "Service", urlsplit(url).hostname)
    (deployment,) = [doc for doc in objects(overlay, "Deployment")
                     if selects(service["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"])]
    (box,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment | {"container": box}


def redis_options(box: dict) -> dict[str, str]:
    args = box["args"]
    return {args[i].removeprefix("--"): args[i + 1] for i in range(0, len(args), 2)}


@each_overlay
def test_jobs_live_in_a_durable_redis_apart_from_the_evicting_cache(overlay, monkeypatch, tmp_path):
    """The job Redis keeps every key (noeviction) in an append-only file on a persistent volume, the cache Redis
    evicts and keeps nothing; a real redis-server run with each one's options passes (jobs) or fails (cache) the
    service's start-up check."""
    settings = settings_of(overlay, monkeypatch)
    jobs, cache = redis_serving(overlay, settings.jobs_redis_url), redis_serving(overlay, settings.redis_url)
    assert jobs["metadata"]["name"] != cache["metadata"]["name"]
    options = redis_options(jobs["container"])
    assert options["maxmemory-policy"] == "noeviction"
    assert options["appendonly"] == "yes" and options["appendfsync"] == "everysec"
    (data,) = [mount for mount in jobs["container"]["volumeMounts"] if mount["mountPath"] == options["dir"]]
    volumes = {volume["name"]: volume for volume in jobs["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert named(overlay, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert jobs["spec"]["replicas"] == 1 and jobs["spec"]["strategy"]["type"] == "Recreate"
    assert redis_options(cache["container"])["maxmemory-policy"] == "allkeys-lru"
    for box, durable in ((jobs["container"], True), (cache["container"], False)):
        arguments = [arg for pair in redis_options(box).items() if pair[0] != "dir" for arg in (f"--{pair[0]}", pair[1])]
        redis = RedisServer(tmp_path, arguments=arguments)
        redis.start()
        try:
            store = RedisJobStore(redis.url, 60, 30, 10)
            if durable:
                store.check_durable()
            else:
                with pytest.raises(EvictingJobStore, match="DSD_JOBS_REDIS_URL"):
                    store.check_durable()
        finally:
            redis.stop()


@each_overlay
def test_monitoring_and_scaling(overlay, monkeypatch):
    if settings_of(overlay, monkeypatch).resolved_profile == "real":
        assert objects(overlay, "ServiceMonitor") and objects(overlay, "ScaledObject")
        assert objects(overlay, "PrometheusRule")
    services = {doc["metadata"]["name"]: doc for doc in objects(overlay, "Service")}
    for monitor in objects(overlay, "ServiceMonitor"):
        chosen = [name for name, service in services.items()
                  if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])]
        assert chosen == [SERVICE]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {port["name"] for port in services[SERVICE]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    for scaled in objects(overlay, "ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] == SERVICE
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        read = set()
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            read |= check_promql(trigger["metadata"]["query"])
            assert f'namespace="{scaled["metadata"]["namespace"]}"' in trigger["metadata"]["query"]
        assert read == {"dsd_queue_depth", "dsd_jobs_backlog"}
    for rules in objects(overlay, "PrometheusRule"):
        for group in rules["spec"]["groups"]:
            for rule in group["rules"]:
                check_promql(rule["expr"])
                assert f'namespace="{rules["metadata"]["namespace"]}"' in rule["expr"], rule["alert"]


@each_overlay
def test_the_backlog_alert_counts_up_to_the_scaled_objects_maximum(overlay):
    at_most = [int(found) for rules in objects(overlay, "PrometheusRule") for group in rules["spec"]["groups"]
               for rule in group["rules"]
               for found in re.findall(r"count\(dsd_queue_depth\{[^}]*\}\) >= (\d+)", rule["expr"])]
    assert at_most == [scaled["spec"]["maxReplicaCount"] for scaled in objects(overlay, "ScaledObject")]


@each_overlay
def test_tls_files_come_from_a_read_only_secret_and_the_ingress_terminates_https(overlay, monkeypatch):
    settings = settings_of(overlay, monkeypatch)
    server = container(overlay)
    volumes = {volume["name"]: volume for volume in named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
               ["volumes"]}
    for path in (settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca):
        if path is None:
            continue
        (mount,) = [mount for mount in server["volumeMounts"] if path.parent == Path(mount["mountPath"])]
        assert mount["readOnly"] is True and "secret" in volumes[mount["name"]], path
    ports = {port["name"] for port in named(overlay, "Service", SERVICE)["spec"]["ports"]}
    for ingress in objects(overlay, "Ingress"):
        secured = {host for entry in ingress["spec"]["tls"] for host in entry["hosts"]}
        assert all(entry["secretName"] for entry in ingress["spec"]["tls"])
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] in secured, f"{rule['host']} would be served without TLS"
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == SERVICE and backend["port"]["name"] in ports
    if settings.resolved_profile == "real":
        assert settings.grpc_tls_cert is not None and objects(overlay, "Ingress")


def operator_secrets(overlay: str) -> list[str]:
    """How docs/deployment.md must tell the operator to create each Secret the overlay names but does not render
    (regular expressions of the `kubectl` commands; a mounted Secret may hold a TLS pair or any files)."""
    server = container(overlay)
    pod = named(overlay, "Deployment", SERVICE)["spec"]["template"]["spec"]
    commands = []
    for variable in server["env"]:
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            commands.append((reference["name"], re.escape(f"create secret generic {reference['name']} "
                                                          f"--from-literal={reference['key']}=")))
    mounted = {mount["name"] for mount in server["volumeMounts"]}
    for volume in pod["volumes"]:
        if "secret" in volume and volume["name"] in mounted:
            name = volume["secret"]["secretName"]
            commands.append((name, f"create secret (tls|generic) {name} "))
    for ingress in objects(overlay, "Ingress"):
        commands += [(entry["secretName"], f"create secret tls {re.escape(entry['secretName'])} ")
                     for entry in ingress["spec"]["tls"]]
    rendered = {doc["metadata"]["name"] for doc in objects(overlay, "Secret")}
    return [command for name, command in commands if name not in rendered]


@each_overlay
def test_secrets_left_to_the_operator_are_documented(overlay):
    for command in operator_secrets(overlay):
        assert re.search(command, OPERATING.read_text()), command


def dashboard_expressions() -> list[str]:
    grafana = {"$__rate_interval": "1m", "$namespace": "dsd"}
    pattern = re.compile("|".join(re.escape(variable) for variable in grafana))
    expressions = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expressions.append(pattern.sub(lambda match: grafana[match.group()], target["expr"]))
    return expressions


def test_dashboard_reads_only_the_services_metrics():
    read = set()
    for expression in dashboard_expressions():
        assert "$" not in expression, f"unknown dashboard variable in {expression}"
        read |= check_promql(expression)
    assert set(re.findall(r"\bdsd_\w+", DASHBOARD.read_text())) <= SERIES.keys()
    quantiles = re.findall(r"histogram_quantile\((0\.\d+), sum by \(le\) \(rate\(dsd_request_duration_seconds_bucket",
                           " ".join(dashboard_expressions()))
    assert set(quantiles) == {"0.5", "0.95", "0.99"}
    assert {"dsd_request_duration_seconds_bucket", "dsd_queue_depth", "dsd_queue_wait_seconds_bucket",
            "dsd_step_duration_seconds_bucket", "dsd_batch_rows_sum", "dsd_cache_hits_total",
            "dsd_cache_misses_total", "dsd_cache_errors_total", "dsd_requests_rejected_total",
            "dsd_requests_cancelled_total", "dsd_requests_timed_out_total", "dsd_jobs_backlog",
            "dsd_jobs_finished_total", "dsd_jobs_reclaimed_total", "dsd_job_duration_seconds_bucket",
            "dsd_webhook_attempts_total", "dsd_webhook_abandoned_total", "dsd_webhook_latency_seconds_bucket",
            "dsd_watermarks_total", "dsd_c2pa_manifests_total", "dsd_safety_decisions_total",
            "dsd_output_stage_duration_seconds_bucket", "dsd_prompt_enhancements_total",
            "dsd_step_cache_rows_total", "dsd_forward_rows_total", "dsd_forwards_total", "dsd_running_sizes",
            "dsd_adapter_loads_total", "dsd_adapter_cache_hits_total", "dsd_adapter_evictions_total",
            "dsd_adapter_load_seconds_bucket", "dsd_adapter_cache_bytes", "dsd_engine_failures_total"} <= read


def test_probe_paths_metrics_and_grpc_health_answer_on_the_real_server(tmp_path):
    paths = set()
    for overlay in OVERLAYS:
        server = container(overlay)
        paths |= {server[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
        paths |= {endpoint["path"] for monitor in objects(overlay, "ServiceMonitor")
                  for endpoint in monitor["spec"]["endpoints"]}
    service = start_service(tmp_path)
    try:
        wait_ready(service)
        for path in sorted(paths):
            assert httpx.get(f"{service.url}{path}", timeout=10).status_code == 200, path
        assert "# TYPE dsd_queue_depth gauge" in httpx.get(f"{service.url}/metrics", timeout=10).text
        with grpc.insecure_channel(f"127.0.0.1:{service.env['DSD_GRPC_PORT']}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert service.stop() == 0, service.log_tail()


JOBS = K8S / "jobs"
JOB_LAYOUTS = ("jobs", "jobs/vllm")


@functools.cache
def render_jobs(layout: str) -> tuple[dict, ...]:
    done = subprocess.run([str(KUBECTL), "kustomize", str(K8S / layout)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(yaml.safe_load_all(done.stdout))


def jobs() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in render_jobs("jobs") if doc["kind"] == "Job"}


def job_argv(box: dict, index: int = 0) -> list[str]:
    """The `dsd` command line a Job container runs, as worker `index` of an Indexed Job sees it."""
    argv = [arg.replace("$(JOB_COMPLETION_INDEX)", str(index)) for arg in box["command"] + box.get("args", [])]
    return argv[argv.index("dsd_model.cli") + 1 :]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("layout", JOB_LAYOUTS)
def test_jobs_render_and_validate_strictly(layout, version):
    for doc in render_jobs(layout):
        kubernetes_validate.validate(doc, version, strict=True)


def test_job_commands_parse_and_settings_are_the_data_pipelines_own(monkeypatch):
    from dsd_model.cli import build_parser
    from dsd_model.data.settings import DataSettings
    from dsd_model.training import TrainConfig

    (config_map,) = [doc for doc in render_jobs("jobs") if doc["kind"] == "ConfigMap"]
    for name in [name for name in os.environ if name.startswith("DSD_")]:
        monkeypatch.delenv(name)
    for name, value in config_map["data"].items():
        assert name.removeprefix("DSD_DATA_").lower() in DataSettings.model_fields, name
        monkeypatch.setenv(name, value)
    settings = DataSettings()
    commands = {}
    for name, job in jobs().items():
        for box in job["spec"]["template"]["spec"].get("initContainers", []) + job["spec"]["template"]["spec"][
            "containers"
        ]:
            args = build_parser().parse_args(job_argv(box))
            commands[box["name"]] = args
            if args.command == "data":
                assert [source["configMapRef"]["name"] for source in box["envFrom"]] == [config_map["metadata"]["name"]]
    assert set(commands) == {"grids", "curate", "merge", "pairs", "train"}
    train = commands["train"]
    config = TrainConfig(dataset=train.dataset, **{k: getattr(train, k) for k in TrainConfig.model_fields
                                                     if k != "dataset" and hasattr(train, k)})
    assert config.dataset == settings.resolved_dataset_dir, "training reads the dataset the pairs Job writes"
    assert config.resume_from == "auto", "a retried training pod continues from its newest checkpoint"
    vlm = [doc for doc in render_jobs("jobs/vllm") if doc["kind"] == "Service"][0]
    url = urlsplit(settings.vlm_base_url)
    assert url.hostname == vlm["metadata"]["name"] and url.port == vlm["spec"]["ports"][0]["port"]
    (server,) = [doc for doc in render_jobs("jobs/vllm") if doc["kind"] == "Deployment"]
    served = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert served[served.index("--served-model-name") + 1] == settings.vlm_model


@pytest.mark.parametrize("name", ["dsd-grids", "dsd-curate"])
def test_indexed_jobs_split_the_work_into_as_many_shards_as_pods(name):
    from dsd_model.cli import build_parser
    from dsd_model.data.manifest import Shard

    spec = jobs()[name]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    (box,) = spec["template"]["spec"]["containers"]
    shards = [Shard.parse(build_parser().parse_args(job_argv(box, i)).shard) for i in range(spec["completions"])]
    assert shards == [Shard(i, spec["completions"]) for i in range(spec["completions"])]


def test_training_job_runs_one_process_per_gpu():
    (box,) = jobs()["dsd-train"]["spec"]["template"]["spec"]["containers"]
    launch = box["command"]
    assert launch[:2] == ["accelerate", "launch"] and "--multi_gpu" in launch
    assert int(launch[launch.index("--num_processes") + 1]) == box["resources"]["limits"]["nvidia.com/gpu"]


def test_job_volumes_hold_the_work_dir_and_read_the_weights_read_only(monkeypatch):
    weights_claims = {doc["metadata"]["name"] for doc in objects("gpu", "PersistentVolumeClaim")}
    claims = {doc["metadata"]["name"]: doc for doc in render_jobs("jobs") if doc["kind"] == "PersistentVolumeClaim"}
    assert claims["dsd-data"]["spec"]["accessModes"] == ["ReadWriteMany"], "shard workers write from several nodes"
    (config_map,) = [doc for doc in render_jobs("jobs") if doc["kind"] == "ConfigMap"]
    work_dir = config_map["data"]["DSD_DATA_WORK_DIR"]
    for job in jobs().values():
        pod = job["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for box in pod.get("initContainers", []) + pod["containers"]:
            mounts = {mount["mountPath"]: mount for mount in box["volumeMounts"]}
            claim_of = {path: volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
                        for path, mount in mounts.items()}
            (data,) = [path for path, claim in claim_of.items() if claim == "dsd-data"]
            assert work_dir.startswith(data + "/") and not mounts[data].get("readOnly", False)
            for path, claim in claim_of.items():
                if claim not in (None, "dsd-data"):
                    assert claim in weights_claims and mounts[path]["readOnly"] is True
                    assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["readOnly"] is True
            weights = [path for path, claim in claim_of.items() if claim in weights_claims]
            reads = [config_map["data"]["DSD_DATA_TEACHER_DIR"]] if box["name"] == "grids" else [
                arg for arg in box.get("args", []) if arg.startswith("/") and not arg.startswith(data + "/")
            ]
            assert all(any(path.startswith(mount + "/") for mount in weights) for path in reads), (box["name"], reads)


def test_job_pods_run_locked_down():
    for job in jobs().values():
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for box in pod.get("initContainers", []) + pod["containers"]:
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= box["resources"]["requests"].keys() and "memory" in box["resources"]["limits"]
            assert "/tmp" in {mount["mountPath"] for mount in box["volumeMounts"] if "emptyDir" in
                              volumes[mount["name"]]}


def test_the_gpu_overlay_checks_outputs_with_nudenet_and_the_tiny_profile_does_not(monkeypatch):
    assert settings_of("gpu", monkeypatch).output_check_backend == "nudenet"
    tiny = settings_of("dev", monkeypatch)
    assert tiny.resolved_profile == "tiny" and tiny.output_check_backend == "classifier"
    assert tiny.output_check_model is None


WEIGHTS_JOB = JOBS / "weights-job.yaml"


def weights_job() -> dict:
    (job,) = yaml.safe_load_all(WEIGHTS_JOB.read_text())
    return job


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_weights_job_validates_strictly(version):
    kubernetes_validate.validate(weights_job(), version, strict=True)


def test_weights_job_fills_what_the_gpu_overlay_serves(monkeypatch):
    """The Job pulls into the gpu overlay's weights claim, then verifies every byte; the settings `dsd weights pull`
    prints for that directory are the overlay's, the service finds the lock file the pull writes, and the replicas
    wait for that file."""
    from dsd_model.cli import build_parser
    from dsd_model.weights.lock import LOCK_NAME
    from dsd_model.weights.pull import DEFAULT_LORAS, parse_pairs, settings_lines

    job = weights_job()
    pod = job["spec"]["template"]["spec"]
    deployment = named("gpu", "Deployment", SERVICE)
    assert job["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert {box["image"] for box in pod["initContainers"] + pod["containers"]} == {container("gpu")["image"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (pull,) = pod["initContainers"]
    (check,) = pod["containers"]
    pulled, checked = build_parser().parse_args(job_argv(pull)), build_parser().parse_args(job_argv(check))
    assert (pulled.command, pulled.weights_command, checked.weights_command) == ("weights", "pull", "verify")
    assert checked.directory == pulled.directory and checked.full

    def claim_at(box, path) -> tuple[str, bool]:
        (mount,) = [m for m in box["volumeMounts"] if str(path).startswith(m["mountPath"])]
        return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    (served,) = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "weights"]
    assert claim_at(pull, pulled.directory) == (served, False)
    assert claim_at(check, checked.directory) == (served, True)
    env = {variable["name"]: variable for variable in pull["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dsd-hf-token", "key": "token"}
    assert env["HF_HUB_OFFLINE"]["value"] == "0", "the image sets HF_HUB_OFFLINE=1 for the service"
    assert "create secret generic dsd-hf-token --from-literal=token=" in OPERATING.read_text()

    settings = settings_of("gpu", monkeypatch)
    names = parse_pairs(pulled.lora or list(DEFAULT_LORAS), "--lora")
    printed = dict(line.split("=", 1) for line in settings_lines(pulled.directory, pulled.base, list(names)))
    assert Path(printed["DSD_MODEL_DIR"]) == settings.model_dir
    assert Path(printed["DSD_TRANSFORMER_PATH"]) == settings.transformer_path
    assert {name: Path(path) for name, path in json.loads(printed["DSD_ADAPTERS"]).items()} == settings.adapters
    lock = pulled.directory / LOCK_NAME
    assert settings.weights_lock is None and settings.model_dir.parent / LOCK_NAME == lock
    assert settings.verify_weights == "sizes"
    (waiting,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert f"[ -f {lock} ]" in waiting["command"][-1]


def test_weights_job_pod_runs_locked_down():
    pod = weights_job()["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for box in pod["initContainers"] + pod["containers"]:
        context = box["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= box["resources"]["requests"].keys() and "memory" in box["resources"]["limits"]
