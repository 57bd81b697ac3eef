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
