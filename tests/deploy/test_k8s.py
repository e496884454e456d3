"""The learner's Kubernetes manifest (deploy/k8s/learner-pytorchjob.yaml): a PyTorchJob whose pods are valid
Kubernetes pods (checked against Kubernetes' own schemas, strictly) and whose processes are the ones the README's
torchrun launch describes, with no secret in plain text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.settings import Settings

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "learner-pytorchjob.yaml"


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return loaded


def test_it_is_a_pytorchjob_of_a_master_and_workers(job: dict[str, Any]) -> None:
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for role in specs.values():
        assert role["restartPolicy"] == "OnFailure"  # a pod that dies comes back; torchrun resumes the round
        assert [c["name"] for c in role["template"]["spec"]["containers"]] == ["pytorch"]  # the operator's name


@pytest.mark.parametrize("role", ["Master", "Worker"])
def test_each_pod_is_a_valid_kubernetes_pod(job: dict[str, Any], role: str) -> None:
    template = job["spec"]["pytorchReplicaSpecs"][role]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"learner-{role.lower()}", **template["metadata"]}}
    pod["spec"] = template["spec"]
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)  # raises when invalid


def test_the_pods_run_the_learner_under_torchrun_across_the_nodes(job: dict[str, Any]) -> None:
    specs = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(role["replicas"] for role in specs.values())
    container = specs["Master"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"] and container["args"][-3:] == ["-m", "rankloop", "learn"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--"))
    assert int(flags["nnodes"]) == nodes  # every pod is one node of the rendezvous
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(flags["nproc-per-node"]) == gpus  # one process per GPU (learn.distributed: cuda:LOCAL_RANK)
    assert flags["rdzv-endpoint"] == "$(MASTER_ADDR):$(MASTER_PORT)"  # where the operator puts the master


def test_its_settings_are_rankloops_and_its_secrets_come_from_a_secret(job: dict[str, Any]) -> None:
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    known = {"RANKLOOP_" + name.upper() for name in Settings.model_fields}
    assert names <= known, names - known  # a misspelt variable would be refused at start
    redis = next(e for e in container["env"] if e["name"] == "RANKLOOP_REDIS_URL")
    assert "value" not in redis and redis["valueFrom"]["secretKeyRef"]["name"] == "rankloop"
