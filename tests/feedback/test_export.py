"""Export rows: preference pairs with their rank group, SFT messages; JSONL and Parquet files."""

import json
from pathlib import Path

import pyarrow.parquet as pq

from feedback.dataset import StoredEvent
from feedback.export import preference_rows, sft_row, write_rows

PROMPT = [{"role": "user", "content": "Pick a fruit."}]
RANKING = StoredEvent(
    "5-1", "ranking", {
        "ranking": [[2], [0, 1]], "comparison": {
            "messages": PROMPT, "policy_version": "v0002",
            "candidates": [{"index": i, "text": t} for i, t in enumerate(["pear", "fig", "apple"])],
        },
    },
)  # fmt: skip


def test_a_ranking_becomes_one_row_per_pair() -> None:
    rows = list(preference_rows(RANKING))
    # 2 beats 0 and 1; 0 and 1 tie: two rows.
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("apple", "pear"),
        ("apple", "fig"),
    ]
    assert rows[0] == {
        "prompt": PROMPT, "chosen": [{"role": "assistant", "content": "apple"}],
        "rejected": [{"role": "assistant", "content": "pear"}], "rank_group": "5-1", "chosen_index": 2,
        "rejected_index": 0, "policy_version": "v0002",
    }  # fmt: skip


def test_a_demonstration_becomes_sft_messages() -> None:
    event = StoredEvent("7-0", "demonstration", {"messages": PROMPT, "answer": "A pear."})
    assert sft_row(event) == {"messages": [*PROMPT, {"role": "assistant", "content": "A pear."}], "id": "7-0"}


def test_jsonl_and_parquet_hold_the_same_rows(tmp_path: Path) -> None:
    rows = list(preference_rows(RANKING))
    assert write_rows(iter(rows), tmp_path / "p.jsonl", "jsonl") == 2
    assert write_rows(iter(rows), tmp_path / "p.parquet", "parquet") == 2
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == rows
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == rows
    assert not list(tmp_path.glob("*.partial"))
