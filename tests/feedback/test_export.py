"""Export rows: preference pairs with their rank group, SFT messages; JSONL and Parquet files."""

import json
from pathlib import Path

import pyarrow.parquet as pq

from feedback.events import Comparison, DemonstrationEvent, RankingEvent, StoredCandidate
from feedback.export import preference_rows, sft_row, write_rows

PROMPT = [{"role": "user", "content": "Pick a fruit."}]
CANDIDATES = [
    StoredCandidate(index=i, text=t, token_ids=[i], logprobs=[-1.0], finish_reason="stop")
    for i, t in enumerate(["pear", "fig", "apple"])
]
COMPARISON = Comparison(
    id="c1", messages=PROMPT, prompt_token_ids=[1, 2], candidates=CANDIDATES, policy_version="v0002", created=0.0
)
RANKING = RankingEvent(ranking=[[2], [0, 1]], user=None, created=0.0, comparison=COMPARISON)


def test_a_ranking_becomes_one_row_per_pair() -> None:
    rows = list(preference_rows("5-1", RANKING))
    # 2 beats 0 and 1; 0 and 1 tie: two rows.
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("apple", "pear"),
        ("apple", "fig"),
    ]
    assert rows[0] == {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": "apple"}],
        "rejected": [{"role": "assistant", "content": "pear"}],
        "rank_group": "5-1",
        "chosen_index": 2,
        "rejected_index": 0,
        "policy_version": "v0002",
        "chosen_policy_version": "v0002",
        "rejected_policy_version": "v0002",
    }


def test_a_canarys_pair_names_the_version_of_each_answer() -> None:
    mixed = RANKING.model_copy(deep=True)
    mixed.comparison.candidates[2].policy_version = "v0003"  # the canary wrote "apple"
    first = next(preference_rows("5-1", mixed))
    assert (first["policy_version"], first["chosen_policy_version"], first["rejected_policy_version"]) == (
        "v0002",
        "v0003",
        "v0002",
    )


def test_a_demonstration_becomes_sft_messages() -> None:
    event = DemonstrationEvent(
        messages=PROMPT, answer="A pear.", user=None, comparison_id=None, policy_version=None, created=0.0
    )
    assert sft_row("7-0", event) == {"messages": [*PROMPT, {"role": "assistant", "content": "A pear."}], "id": "7-0"}


def test_jsonl_and_parquet_hold_the_same_rows(tmp_path: Path) -> None:
    rows = list(preference_rows("5-1", RANKING))
    assert write_rows(iter(rows), tmp_path / "p.jsonl", "jsonl") == 2
    assert write_rows(iter(rows), tmp_path / "p.parquet", "parquet") == 2
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == rows
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == rows
    assert not list(tmp_path.glob("*.partial"))
