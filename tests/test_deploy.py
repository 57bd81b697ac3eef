"""The deployment files validate and hang together: docker-compose.yaml against the
compose-spec JSON schema (tests/data/), infra/k8s/ against Kubernetes' own OpenAPI schemas
(kubernetes-validate, offline), the Dockerfile and .env.example against what the code expects.
No Docker engine or cluster is needed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from avatarq.celeryconfig import RENDER_QUEUE
from avatarq.settings import Settings
from avatarq_dev import livekit_official

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
K8S_DIR = ROOT / "infra" / "k8s"
#: Kubernetes version the manifests are checked against (the newest kubernetes-validate has).
K8S_VERSION = kubernetes_validate.utils.latest_version()
#: Secret-looking names that must never get a value in an image.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|LICENSE|API_KEY|CREDENTIAL", re.I)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def k8s_documents() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def env_example() -> dict[str, str]:
    """NAME -> value of .env.example, commented-out names (built-in defaults) included."""
    pairs = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=(\S*)", (ROOT / ".env.example").read_text(), re.M)
    return dict(pairs)


# --- docker-compose.yaml -------------------------------------------------------------------


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)


def test_compose_has_the_documented_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"redis", "livekit", "worker", "beat", "flower", "api"}
    assert expected <= set(services)
    assert services["avatar-gpu"]["profiles"] == ["avatar-gpu"]
    assert services["avatar-emulator"]["profiles"] == ["avatar-emulator"]
    assert services["livekit"]["image"].startswith("livekit/livekit-server:")
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_every_service_builds_or_pulls_and_its_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = ROOT / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for env_file in svc.get("env_file", []):
            if env_file.get("required", True):
                assert (ROOT / env_file["path"]).is_file(), (name, env_file)
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, volume)
            else:
                assert source in compose.get("volumes", {}), (name, volume)


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name


def test_ports_are_valid_and_workers_scale(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host, _, container = port.partition(":")
            number, _, proto = container.partition("/")
            assert 0 < int(host) < 65536 and 0 < int(number) < 65536, (name, port)
            assert proto in ("", "tcp", "udp"), (name, port)
    # `--scale worker=N` needs no fixed container name and no published host port.
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_workers_wait_for_healthy_redis_and_livekit(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    assert services["worker"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "livekit": {"condition": "service_healthy"},
    }


def test_worker_stop_grace_outlasts_the_drain(compose: dict[str, Any]) -> None:
    grace = float(env_example()["AVATARQ_SHUTDOWN_GRACE"])
    stop = compose["services"]["worker"]["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace


def test_compose_interpolations_have_defaults_matching_env_example() -> None:
    # `.env` is optional, so every ${VAR} needs a default, and it must be .env.example's.
    example = env_example()
    found = INTERPOLATION.findall(COMPOSE_FILE.read_text())
    assert found
    for name, rest in found:
        assert rest.startswith(":-"), name
        assert rest[2:] == example[name], name


def test_livekit_config_takes_keys_from_the_environment(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "infra" / "livekit.yaml").read_text())
    assert config["port"] == 7880 and {"tcp_port", "udp_port"} <= set(config["rtc"])
    assert "keys" not in config
    assert "LIVEKIT_KEYS" in compose["services"]["livekit"]["environment"]
    # livekit-server refuses API secrets shorter than 32 characters.
    assert len(env_example()["LIVEKIT_API_SECRET"]) >= 32


def test_env_example_lists_every_setting() -> None:
    example = env_example()
    for field_name, field in Settings.model_fields.items():
        names = field.validation_alias.choices  # type: ignore[union-attr]
        assert any(n in example for n in names), f"{field_name} ({names[0]}) not in .env.example"


# --- infra/Dockerfile ----------------------------------------------------------------------


def test_dockerfile_is_slim_nonroot_with_ffmpeg_and_no_secrets() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:[\d.]+-slim", text, re.M)
    assert "ffmpeg" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for line in lines:
        if line.startswith(("ENV ", "ARG ")):
            assert not SECRET_NAME.search(line), line
        if line.startswith(("COPY ", "ADD ")):
            assert ".env" not in line, line


def test_dockerfile_builds_the_console_where_the_api_serves_it_from() -> None:
    from producers.console import CONSOLE_DIST

    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^FROM node:\d+[\w.-]* AS console$", text, re.M)
    assert "RUN npm ci" in text and "RUN npm run build" in text
    built = CONSOLE_DIST.relative_to(ROOT).as_posix()
    assert f"COPY --from=console /src/{built} ./{built}" in text


# --- infra/k8s -----------------------------------------------------------------------------


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    kinds = []
    for doc in k8s_documents():
        kinds.append(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema in Kubernetes' OpenAPI; checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ScaledObject"} <= set(kinds)


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == kind}


def test_worker_deployment_drains_and_is_sized() -> None:
    worker = by_kind("Deployment")["avatarq-worker"]["spec"]["template"]["spec"]
    config = by_kind("ConfigMap")["avatarq-config"]["data"]
    assert worker["terminationGracePeriodSeconds"] > float(config["AVATARQ_SHUTDOWN_GRACE"])
    (container,) = worker["containers"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == set(by_kind("ConfigMap")) | set(by_kind("Secret"))


def test_beat_is_a_single_replica() -> None:
    beat = by_kind("Deployment")["avatarq-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"


def test_keda_scales_workers_on_the_queue_length() -> None:
    (scaled,) = by_kind("ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind("Deployment")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == RENDER_QUEUE
    assert int(trigger["metadata"]["listLength"]) > 0


def test_services_select_existing_pods() -> None:
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in k8s_documents()
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), name


def test_compose_pins_the_livekit_server_the_tests_run(compose: dict[str, Any]) -> None:
    image = compose["services"]["livekit"]["image"]
    assert image == f"livekit/livekit-server:{livekit_official.VERSION}"


# --- infra/monitoring: Grafana dashboard and Prometheus alert rules ------------------------

MONITORING = ROOT / "infra" / "monitoring"
#: Metrics that are not avatarq's, each with the exporter that provides it.
EXTERNAL_METRICS = {
    "redis_key_size": "redis_exporter, REDIS_EXPORTER_CHECK_SINGLE_KEYS=db0=avatarq"
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
#: Series names prometheus_client exports for each metric type.
TYPE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_series() -> dict[str, str]:
    """Series name -> metric family, for every avatarq metric the workers export."""
    from prometheus_client import REGISTRY

    import tasks.metrics  # noqa: F401  (registers the worker's metrics)

    return {
        metric.name + suffix: metric.name
        for metric in REGISTRY.collect()
        if metric.name.startswith("avatarq_")
        for suffix in TYPE_SUFFIXES[metric.type]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (after checking its brackets balance)."""
    depth: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            depth.append(")]}"["([{".index(char)])
        elif char in ")]}":
            assert depth and depth.pop() == char, f"unbalanced {char!r} in {expr}"
    assert not depth, f"unclosed {depth} in {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range windows
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue  # a function or an operator
        names.add(match.group())
    return names


def test_metric_names_parser_sees_what_an_expression_reads() -> None:
    expr = 'sum by (le) (rate(a_bucket{le="0.5"}[5m])) / clamp_min(b_total + c, 1e-9) > 0.1'
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    with pytest.raises(AssertionError, match="unbalanced"):
        metric_names("sum(rate(a[5m)))")


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    source = {"type": "prometheus", "uid": "${" + variable["name"] + "}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["type"] == "timeseries" and panel["datasource"] == source, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_alert_rules_cover_queue_failures_underruns_and_workers(
    alert_rules: list[dict[str, Any]],
) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    for rule in alert_rules:
        assert re.fullmatch(r"Avatarq[A-Z]\w+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    reads = {rule["alert"]: metric_names(rule["expr"]) for rule in alert_rules}
    assert reads["AvatarqQueueBacklog"] == {"redis_key_size"}
    assert "avatarq_jobs_failed_total" in reads["AvatarqHighFailureRate"]
    assert "avatarq_pacing_error_seconds_bucket" in reads["AvatarqAudioUnderruns"]
    assert (
        "absent(avatarq_streams_in_flight)" in alert_rules[names.index("AvatarqNoWorkers")]["expr"]
    )


def test_dashboard_and_alerts_read_only_metrics_that_exist(
    dashboard: dict[str, Any], alert_rules: list[dict[str, Any]]
) -> None:
    exported = exported_series()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    on_dashboard = set().union(*(metric_names(e) for e in exprs))
    in_alerts = set().union(*(metric_names(rule["expr"]) for rule in alert_rules))
    unknown = (on_dashboard | in_alerts) - set(exported) - set(EXTERNAL_METRICS)
    assert not unknown, f"not exported by tasks/metrics.py: {unknown}"
    # And the dashboard shows every metric the workers export.
    assert {exported[n] for n in on_dashboard if n in exported} == set(exported.values())
