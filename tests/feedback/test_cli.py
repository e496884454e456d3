"""`rankloop feedback consume|stats|export` end to end over the HTTP API and a real Redis server."""

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from deploy.redis_server import EmbeddedRedis
from rankloop.cli import app


@pytest.fixture
def env(redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    return tmp_path


async def test_rankings_flow_from_the_api_to_an_export(client: httpx.AsyncClient, env: Path) -> None:
    runner = CliRunner()
    for ranking in ([1, 0, 2], [[0, 1], 2]):
        served = (
            await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 3})
        ).json()
        response = await client.post("/v1/feedback", json={"comparison_id": served["id"], "ranking": ranking})
        assert response.status_code == 201
    demo = {"messages": [{"role": "user", "content": "hi"}], "answer": "Hello!"}
    assert (await client.post("/v1/demonstrations", json=demo)).status_code == 201

    stats = json.loads(runner.invoke(app, ["feedback", "stats", "--json"]).stdout)
    assert stats["dataset"] == {"ranking": 0, "demonstration": 0}
    # Each comparison streamed once before its ranking, then the two rankings and the demonstration.
    assert stats["stream"]["lag"] == 5 and stats["stream"]["length"] == 5
    assert stats["stream"]["max_backlog"] == 20_000 and stats["warnings"] == []

    consumed = runner.invoke(app, ["feedback", "consume", "--once"])
    assert consumed.exit_code == 0, consumed.output
    stats = json.loads(runner.invoke(app, ["feedback", "stats", "--json"]).stdout)
    assert stats["dataset"] == {"ranking": 2, "demonstration": 1} and stats["rejected"] == 0
    assert stats["comparisons"] == 2
    assert (stats["stream"]["pending"], stats["stream"]["lag"]) == (0, 0)

    out = env / "pairs.jsonl"
    exported = runner.invoke(app, ["feedback", "export", str(out)])
    assert exported.exit_code == 0, exported.output
    # [1, 0, 2] gives 3 pairs; [[0, 1], 2] gives 2 (0 and 1 tie).
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and len({r["rank_group"] for r in rows}) == 2
    sft = env / "sft.parquet"
    assert (
        runner.invoke(
            app, ["feedback", "export", str(sft), "--kind", "demonstrations", "--format", "parquet"]
        ).exit_code
        == 0
    )
    bad = runner.invoke(app, ["feedback", "export", str(out), "--format", "csv"])
    assert bad.exit_code == 2 and "use `jsonl` or `parquet`" in bad.output
