"""The deployment files (``deploy/``) agree with the code and with the operator guide.

No Docker or Kubernetes here: the files are parsed and the fields the guide relies on are
checked against the settings, the CLI and the queue names the code really uses.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from scheduler.jobs.reconcile import GRACE_S
from shared import keys
from shared.cli.main import app
from shared.liveness import DEAD_AFTER_S
from shared.providers.config import parse_catalog
from shared.settings import PRIORITIES, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GUIDE = DEPLOY / "README.md"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
QUEUE_LABEL = "conclave/queue"
DEFAULT_NAMESPACE = Settings.model_fields["queue_namespace"].default

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
SETTING_ENV = {f"CONCLAVE_{name.upper()}" for name in Settings.model_fields}
CLIENT_ENV = {"CONCLAVE_API_URL", "CONCLAVE_API_KEY"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return dict(containers[0])


def argv(container: dict[str, Any]) -> list[str]:
    # `args` only: `command` would replace the image's ENTRYPOINT (tini).
    assert "command" not in container, container["name"]
    return [str(a) for a in container["args"]]


def option(args: list[str], name: str) -> str:
    assert name in args, (name, args)
    return args[args.index(name) + 1]


def worker_deployments() -> dict[str, dict[str, Any]]:
    found = {}
    for dep in of_kind("Deployment"):
        if labels(dep).get(COMPONENT_LABEL) == "worker":
            found[labels(dep)[QUEUE_LABEL]] = dep
    return found


def compose() -> dict[str, Any]:
    docs = load_all(COMPOSE)
    assert len(docs) == 1
    return docs[0]


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


# -- every file parses ----------------------------------------------------------------------------


def test_deploy_has_the_promised_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {
        "Dockerfile",
        "docker-compose.yml",
        "README.md",
        "k8s/namespace.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.example.yaml",
        "k8s/api.yaml",
        "k8s/migrate-job.yaml",
        "k8s/workers.yaml",
        "k8s/scheduler.yaml",
        "k8s/keda.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, path
    assert all(isinstance(doc, dict) for doc in docs)


def test_every_k8s_object_is_labelled_and_namespaced() -> None:
    for obj in k8s_objects():
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels(obj).get(NAME_LABEL) == "conclave", where
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "conclave", where


# -- workers and KEDA -----------------------------------------------------------------------------


def test_one_worker_deployment_per_priority() -> None:
    workers = worker_deployments()
    assert sorted(workers) == sorted(PRIORITIES)
    for priority, dep in workers.items():
        assert dep["metadata"]["name"] == f"conclave-worker-{priority}"
        template_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == {
            NAME_LABEL: "conclave",
            COMPONENT_LABEL: "worker",
            QUEUE_LABEL: priority,
        }
        for key, value in dep["spec"]["selector"]["matchLabels"].items():
            assert template_labels[key] == value


@pytest.mark.parametrize("priority", PRIORITIES)
def test_worker_pool_consumes_its_queue_and_drains(priority: str) -> None:
    dep = worker_deployments()[priority]
    args = argv(only_container(dep))
    assert args[:2] == ["conclave", "worker"]
    assert option(args, "--queues") == priority
    assert option(args, "--processes") == "1"
    assert int(option(args, "--threads")) >= 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    # KEDA owns the replica count.
    assert "replicas" not in dep["spec"]


@pytest.mark.parametrize("priority", PRIORITIES)
def test_each_worker_deployment_has_a_matching_scaled_object(priority: str) -> None:
    dep = worker_deployments()[priority]
    name = dep["metadata"]["name"]
    matching = [so for so in of_kind("ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == name]
    assert len(matching) == 1, name
    so = matching[0]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert labels(so)[QUEUE_LABEL] == priority
    assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert so["spec"]["cooldownPeriod"] > 0

    # The backlog waits in the queue's fair lanes (their depth list); the queue itself holds
    # what consumers are about to take and delayed re-sends: KEDA watches both.
    triggers = so["spec"]["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == {
        keys.fair_depth(DEFAULT_NAMESPACE, priority),
        keys.queue(DEFAULT_NAMESPACE, priority),
    }
    for trigger in triggers:
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        # KEDA's trigger metadata is a map of strings.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert int(meta["listLength"]) > 0
        assert int(meta["activationListLength"]) >= 0
        assert int(meta["databaseIndex"]) == 0

    # The queue named by --queues is the one KEDA watches.
    assert option(argv(only_container(dep)), "--queues") == priority

    # addressFromEnv is resolved from the target's containers: the variable must be there.
    env_name = meta["addressFromEnv"]
    config = config_map("conclave-config")
    assert {"configMapRef": {"name": "conclave-config"}} in only_container(dep)["envFrom"]
    assert env_name in config
    # ... and agree with the Redis URL the workers use.
    host_port = config["CONCLAVE_REDIS_URL"].split("://", 1)[1].split("/", 1)[0]
    assert host_port == config[env_name]


def test_queue_namespace_matches_the_lists_keda_watches() -> None:
    assert config_map("conclave-config").get("CONCLAVE_QUEUE_NAMESPACE", DEFAULT_NAMESPACE) == "conclave"
    assert DEFAULT_NAMESPACE == "conclave"


def config_map(name: str) -> dict[str, str]:
    (found,) = [cm for cm in of_kind("ConfigMap") if cm["metadata"]["name"] == name]
    return dict(found["data"])


# -- API, scheduler, migrations -------------------------------------------------------------------


def test_api_probes_point_at_health_endpoints_on_the_container_port() -> None:
    (dep,) = [d for d in of_kind("Deployment") if labels(d).get(COMPONENT_LABEL) == "api"]
    assert dep["spec"]["replicas"] == 2
    container = only_container(dep)
    args = argv(container)
    assert args[:2] == ["conclave", "api"]
    assert option(args, "--host") == "0.0.0.0"
    (port,) = container["ports"]
    assert int(option(args, "--port")) == port["containerPort"]

    def probe_port(probe: dict[str, Any]) -> int:
        value = probe["httpGet"]["port"]
        return port["containerPort"] if value == port.get("name") else int(value)

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in container:
            assert probe_port(container[kind]) == port["containerPort"], kind
    assert "resources" in container

    (service,) = of_kind("Service")
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port.get("name"), port["containerPort"])


def test_scheduler_runs_two_replicas() -> None:
    (dep,) = [d for d in of_kind("Deployment") if labels(d).get(COMPONENT_LABEL) == "scheduler"]
    assert dep["spec"]["replicas"] == 2
    assert argv(only_container(dep)) == ["python", "-m", "scheduler"]


def test_migrate_job_upgrades_the_database() -> None:
    (job,) = of_kind("Job")
    assert argv(only_container(job)) == ["conclave", "db", "upgrade"]


def test_pods_run_as_non_root_with_the_settings_and_providers() -> None:
    workloads = of_kind("Deployment") + of_kind("Job")
    assert len(workloads) == 6  # api, three worker pools, scheduler, migrate
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        sources = only_container(workload)["envFrom"]
        assert {"configMapRef": {"name": "conclave-config"}} in sources, where
        assert {"secretRef": {"name": "conclave-secrets"}} in sources, where


def test_example_secret_holds_every_key_the_processes_need() -> None:
    (secret,) = of_kind("Secret")
    assert secret["metadata"]["name"] != "conclave-secrets"  # applying it by accident overwrites nothing
    keys = set(secret["stringData"])
    catalog = tomllib.loads((DEPLOY / "providers.toml").read_text())
    assert {t["api_key_env"] for t in catalog["providers"].values()} | {"CONCLAVE_DATABASE_URL"} <= keys


def test_providers_file_is_valid_and_the_same_in_compose_and_k8s() -> None:
    text = (DEPLOY / "providers.toml").read_text()
    catalog = parse_catalog(tomllib.loads(text))
    assert not catalog.simulated
    assert config_map("conclave-providers")["providers.toml"].strip() == text.strip()
    assert config_map("conclave-config")["CONCLAVE_PROVIDERS_FILE"] == "/etc/conclave/providers.toml"


# -- compose --------------------------------------------------------------------------------------

APP_SERVICES = ("migrate", "web", "worker-high", "worker-normal", "worker-low", "scheduler")


def test_compose_has_every_process() -> None:
    services = compose()["services"]
    assert set(APP_SERVICES) | {"redis", "postgres"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["postgres"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])


def test_compose_app_services_share_one_database_and_redis() -> None:
    services = compose()["services"]
    env = compose()["x-conclave-env"]
    assert env["CONCLAVE_DATABASE_URL"] == "postgresql+psycopg://conclave:conclave@postgres:5432/conclave"
    assert env["CONCLAVE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["CONCLAVE_ENVIRONMENT"] == "production"
    for name in APP_SERVICES:
        service_env = services[name]["environment"]
        for key in ("CONCLAVE_DATABASE_URL", "CONCLAVE_REDIS_URL", "CONCLAVE_PROVIDERS_FILE"):
            assert service_env[key] == env[key], (name, key)
        target = service_env["CONCLAVE_PROVIDERS_FILE"]
        mounts = [v for v in services[name]["volumes"] if v["target"] == target]
        assert len(mounts) == 1 and mounts[0]["read_only"] is True, name
        assert (COMPOSE.parent / mounts[0]["source"]).is_file()


def test_compose_commands_and_start_order() -> None:
    services = compose()["services"]
    assert compose_command(services["migrate"]) == ["conclave", "db", "upgrade"]
    assert compose_command(services["scheduler"]) == ["python", "-m", "scheduler"]
    assert services["scheduler"]["deploy"]["replicas"] == 2
    web = compose_command(services["web"])
    assert web[:2] == ["conclave", "api"] and option(web, "--host") == "0.0.0.0"
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["web"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["web"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for priority in PRIORITIES:
        service = services[f"worker-{priority}"]
        assert option(compose_command(service), "--queues") == priority
        assert service["stop_grace_period"] == "120s"
        assert service["healthcheck"] == {"disable": True}


# -- commands and settings are real ---------------------------------------------------------------


def all_commands() -> list[list[str]]:
    commands = [compose_command(s) for s in compose()["services"].values() if "command" in s]
    for workload in of_kind("Deployment") + of_kind("Job"):
        commands.append(argv(only_container(workload)))
    return commands


def test_every_conclave_command_and_option_exists() -> None:
    # Typer's command tree (typer may vendor click, so it is walked by duck typing).
    cli: Any = typer.main.get_command(app)
    checked = 0
    for args in all_commands():
        if args[:3] == ["python", "-m", "scheduler"]:
            assert (ROOT / "scheduler" / "__main__.py").is_file()
            continue
        if args[0] != "conclave":
            continue  # redis-server, postgres
        command, rest = cli, args[1:]
        while hasattr(command, "commands"):
            assert rest and rest[0] in command.commands, args
            command, rest = command.commands[rest[0]], rest[1:]
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert {a for a in rest if a.startswith("--")} <= known, args
        checked += 1
    assert checked >= 10


def test_every_conclave_variable_is_a_real_setting() -> None:
    named: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\bCONCLAVE_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert {"CONCLAVE_DATABASE_URL", "CONCLAVE_REDIS_URL", "CONCLAVE_PROVIDERS_FILE"} <= named
    assert named <= SETTING_ENV | CLIENT_ENV, sorted(named - SETTING_ENV - CLIENT_ENV)


# -- the image ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_installs_the_project_and_runs_as_non_root() -> None:
    steps = dockerfile_instructions()
    froms = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    assert len(froms) >= 2  # a build stage and a runtime stage
    assert any("python:3.11-slim" in rest for k, rest in steps if k == "ARG") or all(
        "python:3.11-slim" in steps[i][1] for i in froms
    )
    runs = " ".join(rest for k, rest in steps[froms[0] : froms[-1]] if k == "RUN")
    assert re.search(r"pip install(\s+--?[\w-]+)*\s+\.(\s|$)", runs), runs
    assert "[dev]" not in DOCKERFILE.read_text()
    copied = [rest.split()[0] for k, rest in steps if k == "COPY" and not rest.startswith("--from")]
    assert "pyproject.toml" in copied

    runtime = steps[froms[-1] :]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    assert users[-1].split(":")[0] not in ("root", "0")
    healthchecks = [rest for k, rest in runtime if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    (cmd,) = [rest for k, rest in runtime if k == "CMD"]
    assert cmd.startswith('["conclave", "api"')


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].strip("/") for line in ignore if line.startswith("!")}
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source.strip("/") in included, source


# -- the operator guide ---------------------------------------------------------------------------


def test_procfile_processes_are_in_the_guide() -> None:
    guide = GUIDE.read_text()
    names = [line.split(":", 1)[0].strip() for line in (ROOT / "Procfile").read_text().splitlines() if line]
    assert {"web", "worker", "scheduler"} <= set(names)
    for name in names:
        assert f"`{name}`" in guide, name


def test_guide_states_the_recovery_timings_the_code_uses() -> None:
    guide = GUIDE.read_text()
    assert DEAD_AFTER_S == 30 and GRACE_S == 10
    assert f"after {DEAD_AFTER_S} s of missed heartbeats" in guide
    assert f"queued for {GRACE_S} s" in guide


def test_guide_describes_the_admin_fields_the_api_returns() -> None:
    guide = GUIDE.read_text()
    # The admin views' fields: the queue view in the route, the provider view in its read model.
    admin = (ROOT / "api" / "routes" / "admin.py").read_text() + (
        ROOT / "shared" / "providers" / "health.py"
    ).read_text()
    fields = [
        "depth",
        "delayed",
        "dead_lettered",
        "in_flight",
        "workers_alive",
        "circuit",
        "window_calls",
        "window_error_rate",
    ]
    for field in fields:
        assert f'"{field}"' in admin, field
        assert f"`{field}`" in guide, field
    for path in ("/healthz", "/readyz", "/v1/admin/queues", "/v1/admin/providers", "/v1/keys"):
        assert path in guide
    assert "## Metrics" in guide
