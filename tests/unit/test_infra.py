"""Static checks of infra/: the compose stack, the Dockerfiles, the Kubernetes manifests and the deploy trigger (Docker cannot run here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
K8S = INFRA / "k8s"
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; $$ is a literal dollar.
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
GPU_SERVICES = {"model-fetch", "vllm", "gateway", "prometheus", "grafana"}
PROMETHEUS_CONFIG = INFRA / "prometheus" / "prometheus.yml"
DASHBOARD = INFRA / "grafana" / "llmops-serving.json"

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if "?" in op:
            raise AssertionError(f"${{{name}}} is required: {default}")
        return default

    return VAR_RE.sub(value, text).replace("$$", "$")


def services_of(compose: dict, profile: str | None) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if not s.get("profiles") or (profile in s["profiles"])}


def test_compose_top_level_and_every_service_has_an_image_or_build(compose):
    assert set(compose) <= {"name", "services", "volumes", "networks", "configs", "secrets"} | {k for k in compose if k.startswith("x-")}
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        assert set(service.get("profiles", [])) <= {"gpu", "ray"}, name


def test_every_variable_the_compose_file_uses_is_documented_in_env_example_and_none_is_stale(compose):
    used = set(VAR_RE.findall(COMPOSE.read_text()))
    used_names = {name for name, _, _ in used}
    documented = env_example()
    assert used_names - set(documented) == set(), "referenced in docker-compose.yml, missing from infra/.env.example"
    assert set(documented) - used_names == set(), "in infra/.env.example but never used"
    required = {name for name, op, _ in used if "?" in op}
    assert required == {"LLMOPS_API_KEY"}


def test_compose_interpolates_with_the_example_env_and_ports_are_numbers():
    env = env_example() | {"LLMOPS_API_KEY": "k"}
    resolved = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            host_port, container_port = str(port).rsplit(":", 2)[-2:]
            assert host_port.isdigit() and container_port.isdigit(), (name, port)
    with pytest.raises(AssertionError, match=r"LLMOPS_API_KEY\} is required"):
        interpolate(COMPOSE.read_text(), env | {"LLMOPS_API_KEY": ""})


def test_compose_dependencies_exist_and_healthy_ones_have_healthchecks(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dep, spec in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec.get("condition", "service_started")
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; {dep} has no healthcheck"
            if not service.get("profiles"):
                assert not services[dep].get("profiles"), f"default-profile {name} depends on profiled {dep}"


def test_compose_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
    assert declared == used, "declared volumes nobody mounts"


def test_compose_build_contexts_and_dockerfiles_exist(compose):
    for name, service in compose["services"].items():
        if build := service.get("build"):
            context = (INFRA / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name


def test_compose_default_profile_is_the_cpu_stack_and_gpu_adds_vllm_behind_the_proxy(compose):
    assert set(services_of(compose, None)) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
    assert set(services_of(compose, "gpu")) - set(services_of(compose, None)) == GPU_SERVICES
    assert set(services_of(compose, "ray")) - set(services_of(compose, None)) == {"ray-head", "ray-worker"}
    for name in ("ray-head", "ray-worker"):  # Ray reads the shards the pipeline writes, at the same path
        assert "pipeline-data:/opt/llmops/data" in compose["services"][name]["volumes"]
    assert compose["services"]["ray-worker"]["command"][:4] == ["ray", "start", "--address", "ray-head:6379"]
    vllm = compose["services"]["vllm"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "ports" not in vllm, "vLLM must not be published: clients go through the key-checking gateway"
    assert "--quantization" not in vllm["command"] and "--trust-remote-code" not in vllm["command"]
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:3] == ["python", "-m", "llmops.serving.proxy"] and (ROOT / "llmops/serving/proxy.py").is_file()
    mlflow = compose["services"]["mlflow"]["command"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql+psycopg://")
    assert mlflow[mlflow.index("--artifacts-destination") + 1].startswith("s3://")
    prefect = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect.startswith("postgresql+asyncpg://")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", sorted((INFRA / "docker").glob("*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_starts_from_an_image_and_copies_only_what_exists(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0][0] == "FROM" and ":" in instructions[0][1], "pin the base image tag"
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "ARG", "LABEL", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "HEALTHCHECK", "VOLUME", "SHELL"}
    for keyword, rest in instructions:
        assert keyword in known, f"{dockerfile.name}: unknown instruction {keyword}"
        if keyword in {"COPY", "ADD"} and "--from" not in rest:
            *sources, _dest = [part for part in rest.split() if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} not in the repository"
        if keyword in {"CMD", "ENTRYPOINT"} and rest.startswith("["):
            json.loads(rest)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image():
    ignored = set((INFRA / "docker" / "Dockerfile.dockerignore").read_text().split())
    assert {".secrets", ".venv", "mlflow.db", "mlartifacts", "models", "data"} <= ignored


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [dict(doc, _file=path.name) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(manifests: list[dict], kind: str, name: str) -> dict:
    return next(d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name)


API_VERSIONS = {
    "Deployment": "apps/v1", "Service": "v1", "PersistentVolumeClaim": "v1", "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1", "RayCluster": "ray.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}  # fmt: skip


def test_every_manifest_has_a_known_kind_name_and_labels(manifests):
    assert manifests
    for doc in manifests:
        assert API_VERSIONS[doc["kind"]] == doc["apiVersion"], doc["_file"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmops"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({d["_file"] for d in manifests})


def test_deployments_select_their_pods_and_mount_declared_volumes(manifests):
    claims = {d["metadata"]["name"] for d in manifests if d["kind"] == "PersistentVolumeClaim"}
    for deployment in (d for d in manifests if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']} mounts undeclared {mount['name']}"


def test_vllm_deployment_has_a_gpu_a_health_readiness_probe_and_the_model_cache(manifests):
    deployment = by_kind(manifests, "Deployment", "llmops-vllm")
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    vllm, gateway = containers["vllm"], containers["gateway"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "/health" in " ".join(vllm["readinessProbe"]["exec"]["command"])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "--quantization" not in vllm["args"] and "--trust-remote-code" not in vllm["args"]
    assert vllm["args"][vllm["args"].index("--host") + 1] == "127.0.0.1", "vLLM must be reachable only through the gateway"
    assert any(m["mountPath"] == "/models" for m in vllm["volumeMounts"])
    assert any(m["mountPath"] == "/models" for m in pod["initContainers"][0]["volumeMounts"])
    for container in (vllm, gateway):
        keys = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e]
        assert keys == ["llmops-api-key"], container["name"]


def test_vllm_service_targets_the_gateway_port_of_its_pods(manifests):
    service = by_kind(manifests, "Service", "llmops-vllm")
    pod = by_kind(manifests, "Deployment", "llmops-vllm")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_prefect_worker_has_rbac_for_jobs_and_serves_the_kubernetes_pool(manifests):
    worker = by_kind(manifests, "Deployment", "prefect-worker")
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    binding = by_kind(manifests, "RoleBinding", "prefect-worker")
    assert binding["subjects"][0]["name"] == account and by_kind(manifests, "ServiceAccount", account)
    role = by_kind(manifests, "Role", binding["roleRef"]["name"])
    assert any("jobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    pool = yaml.safe_load((INFRA / "prefect" / "prefect.kubernetes.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert args[args.index("--pool") + 1] == pool


def test_deploy_deployment_is_triggered_by_the_champion_event():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.deploy import deploy

    deployment = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "deploy")
    module, _, function = deployment["entrypoint"].partition(":")
    assert (ROOT / module).is_file() and function == deploy.name
    assert set(deployment["parameters"]) <= set(deploy.parameters.properties)
    trigger = DeploymentEventTrigger.model_validate(deployment["triggers"][0])
    assert trigger.expect == {"llmops.champion.changed"}
    assert set(trigger.parameters) == {"model"}


def test_the_ray_cluster_matches_the_pinned_ray_autoscales_and_shares_the_data_claim(manifests):
    cluster = by_kind(manifests, "RayCluster", "llmops-ray")
    pin = re.search(r'"ray==([0-9.]+)\.\*"', (ROOT / "pyproject.toml").read_text())
    assert pin and cluster["spec"]["rayVersion"].startswith(pin.group(1))
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    workers = cluster["spec"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"] and workers["maxReplicas"] > 1
    claim = by_kind(manifests, "PersistentVolumeClaim", "llmops-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads the same shards
    for pod in (cluster["spec"]["headGroupSpec"]["template"], workers["template"]):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c["volumeMounts"]}
        assert volumes[mounts["/opt/llmops/data"]]["persistentVolumeClaim"]["claimName"] == "llmops-data"


def mount_target(service: dict, source: str) -> str:
    """Where `service` mounts the bind source `source` (relative to infra/)."""
    return next(m.split(":")[1] for m in service["volumes"] if m.split(":")[0] == source)


def argument(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_prometheus_mounts_its_config_and_scrapes_the_gateways_metrics_paths_with_the_key(compose):
    from llmops.serving.metrics import BACKEND_METRICS_PATH, METRICS_PATH

    services = compose["services"]
    prometheus, gateway = services["prometheus"], services["gateway"]
    assert f"--config.file={mount_target(prometheus, './prometheus/prometheus.yml')}" in prometheus["command"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["metrics_path"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {METRICS_PATH, BACKEND_METRICS_PATH}
    gateway_target = f"gateway:{argument(gateway['command'], '--port')}"
    [secret] = prometheus["secrets"]
    assert compose["secrets"][secret] == {"environment": "LLMOPS_API_KEY"}
    for job in jobs.values():
        assert [t for c in job["static_configs"] for t in c["targets"]] == [gateway_target]
        assert job["authorization"] == {"type": "Bearer", "credentials_file": f"/run/secrets/{secret}"}, "the metrics paths are behind the key"


def test_compose_grafana_provisions_that_prometheus_and_the_dashboard(compose):
    services = compose["services"]
    grafana = services["grafana"]
    provisioning = mount_target(grafana, "./grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    [datasource] = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    container_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{container_port}"
    [provider] = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/llmops.yml").read_text())["providers"]
    assert Path(mount_target(grafana, "./grafana/llmops-serving.json")).parent == Path(provider["options"]["path"])
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


def test_the_dashboards_queries_use_only_metrics_the_proxy_exports():
    from llmops.serving.metrics import exported_names

    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        names = {name for target in panel["targets"] for name in re.findall(r"\bllmops_[a-z_]+", target["expr"])}
        assert names, f"panel {panel['title']!r} queries no llmops metric"
        used |= names
    assert used <= exported_names(), f"not exported by llmops/serving/metrics.py: {sorted(used - exported_names())}"
    needed = {"llmops_requests_total", "llmops_request_duration_seconds_bucket", "llmops_time_to_first_token_seconds_bucket", "llmops_generated_tokens_total", "llmops_backend_up"}
    assert needed <= used


def test_service_monitor_scrapes_both_metrics_paths_of_the_gateway_port_with_the_key_secret(manifests):
    from llmops.serving.metrics import BACKEND_METRICS_PATH, METRICS_PATH

    monitor = by_kind(manifests, "ServiceMonitor", "llmops-vllm")
    service = by_kind(manifests, "Service", "llmops-vllm")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    gateway = next(c for c in by_kind(manifests, "Deployment", "llmops-vllm")["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    service_port = next(p for p in service["spec"]["ports"] if p["name"] in {e["port"] for e in monitor["spec"]["endpoints"]})
    assert service_port["targetPort"] == "http" and {p["name"]: p["containerPort"] for p in gateway["ports"]}["http"] == int(argument(gateway["args"], "--port"))
    assert sorted(e["path"] for e in monitor["spec"]["endpoints"]) == sorted([METRICS_PATH, BACKEND_METRICS_PATH])
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "llmops-api-key", "key": "key"}}
