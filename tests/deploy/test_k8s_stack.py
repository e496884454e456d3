"""The Kubernetes manifests of the whole stack (deploy/k8s, `kubectl apply -k`): every object valid against
Kubernetes' own schemas (strictly), every Service, PodDisruptionBudget and claim pointing at something that exists,
every container running rankloop's commands as a non-root user with rankloop's settings and its secrets from the
Secret, and probes where the server has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SETTINGS = {"RANKLOOP_" + name.upper() for name in Settings.model_fields}


def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        found += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return found


def workloads() -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] in ("Deployment", "StatefulSet")]


def named(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_each_object_is_valid_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)  # raises when invalid


def test_the_stack_has_its_parts() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects())
    assert kinds == [
        ("Deployment", "rankloop-consumer"),
        ("Deployment", "rankloop-learner"),
        ("Deployment", "rankloop-serve"),
        ("PersistentVolumeClaim", "rankloop-data"),
        ("PodDisruptionBudget", "rankloop-serve"),
        ("Service", "rankloop"),
        ("Service", "rankloop-learner"),
        ("Service", "rankloop-redis"),
        ("StatefulSet", "rankloop-redis"),
    ]
    assert named("PersistentVolumeClaim", "rankloop-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert named("Deployment", "rankloop-serve")["spec"]["replicas"] >= 2
    for one in ("rankloop-consumer", "rankloop-learner"):  # never two writers of one dataset or store
        spec = named("Deployment", one)["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"


def test_services_and_the_budget_select_pods_that_exist() -> None:
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
    for selector in [s["spec"]["selector"] for s in objects() if s["kind"] == "Service"] + [
        named("PodDisruptionBudget", "rankloop-serve")["spec"]["selector"]["matchLabels"]
    ]:
        matches = [labels for labels in pods if selector.items() <= labels.items()]
        assert len(matches) == 1, selector
    for workload in workloads():
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )


def test_rankloop_containers_run_its_commands_with_its_settings_and_secrets() -> None:
    claims = {o["metadata"]["name"] for o in objects() if o["kind"] == "PersistentVolumeClaim"}
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod.get("initContainers", []) + pod["containers"]:
            if not container["image"].startswith("rankloop:"):
                continue  # Redis
            assert container["command"][0] == "rankloop"
            env = {e["name"]: e for e in container["env"]}
            assert set(env) <= SETTINGS, set(env) - SETTINGS  # a misspelt variable would be refused at start
            for secret in ("RANKLOOP_REDIS_URL", "RANKLOOP_ADMIN_TOKEN"):
                if secret in env:
                    assert "value" not in env[secret] and env[secret]["valueFrom"]["secretKeyRef"]["name"] == "rankloop"
            assert env["RANKLOOP_DATA_DIR"]["value"] == "/data"
            volumes = {v["name"]: v for v in pod["volumes"]}
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims


def test_pods_that_read_the_model_store_fill_an_empty_one_first() -> None:
    for name in ("rankloop-serve", "rankloop-learner"):
        pod = named("Deployment", name)["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        assert init["command"] == ["rankloop", "model", "import", "--if-empty"]  # one import, however many replicas
        assert init["image"] == pod["containers"][0]["image"]


def test_servers_listen_everywhere_only_with_keys_and_are_probed_where_they_answer() -> None:
    container = named("Deployment", "rankloop-serve")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RANKLOOP_HOST"] == "0.0.0.0" and env["RANKLOOP_AUTH"] == "keys"  # `open` would refuse to start
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"  # 503 while the engine or Redis is down
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/models"  # answers whenever the process does
    port = container["ports"][0]["containerPort"]
    assert port == int(env["RANKLOOP_PORT"])


def test_redis_keeps_its_aof_on_a_volume_and_never_evicts() -> None:
    redis = named("StatefulSet", "rankloop-redis")["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"


def test_the_servicemonitor_scrapes_ports_the_services_name() -> None:
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    ports = {p["name"] for s in objects() if s["kind"] == "Service" for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
