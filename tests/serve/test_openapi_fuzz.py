"""The published OpenAPI spec is truthful: schemathesis (`--checks all`) fuzzes it against a server process (fake
engine, real Redis, the admin API on) and finds nothing; every reference resolves, and no operation claims a 422."""

import subprocess
import sys
from pathlib import Path

import httpx

from deploy.redis_server import EmbeddedRedis
from tests.servers import server_process
from tests.tiny import tiny_versions_store

CONFIG = Path(__file__).resolve().parents[1] / "schemathesis.toml"
TOKEN = "fuzzing-admin-token-0123"


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def test_schemathesis_finds_nothing(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    store = tiny_versions_store(tmp_path)
    settings = {"admin_token": TOKEN, "max_model_len": 256, "max_tokens_limit": 128, "default_max_tokens": 64}
    with server_process(store.root.parent, redis_server.url, "fake", **settings) as url:
        spec = httpx.get(f"{url}/openapi.json").json()
        schemas = spec["components"]["schemas"]
        for ref in _refs(spec):
            assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                statuses = set(operation["responses"])
                assert "422" not in statuses and {"400", "415", "429", "503"} <= statuses, (method, path)
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "--config-file",
                str(CONFIG),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--max-examples",
                "50",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # its cache (.schemathesis/) goes there, not into the repository
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
