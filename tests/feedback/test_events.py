"""The event contract: what the server writes is what the dataset and the learner read back, typed; what breaks
the contract is never stored; events stored before `schema_version` existed still read."""

import json
from pathlib import Path

import pytest

from feedback.dataset import Dataset
from feedback.events import (
    Comparison,
    DemonstrationEvent,
    EventError,
    RankingEvent,
    StoredCandidate,
    ranking_head,
    read_event,
)
from tests.feedback.helpers import demonstration_json

COMPARISON = Comparison(
    id="chatcmpl-1",
    messages=[{"role": "user", "content": "Pick a fruit."}],
    prompt_token_ids=[5, 6, 7],
    candidates=[
        StoredCandidate(index=i, text=t, token_ids=[10 + i, 2], logprobs=[-0.5, -0.25], finish_reason="stop")
        for i, t in enumerate(["pear", "fig"])
    ],
    policy_version="v0003",
    created=12.5,
    sampling={"temperature": 1.0, "top_p": 1.0},
)


def spliced(head: str, comparison: Comparison) -> str:
    """What the append script makes of a ranking: the head, the comparison's stored JSON verbatim, a brace."""
    return head + comparison.model_dump_json() + "}"


def test_a_ranking_written_by_the_head_and_the_splice_reads_back_typed(tmp_path: Path) -> None:
    data = spliced(ranking_head([[1], [0]], "ann", 99.0), COMPARISON)
    expected = RankingEvent(ranking=[[1], [0]], user="ann", created=99.0, comparison=COMPARISON)
    assert read_event("5-0", "ranking", data) == expected and expected.schema_version == 1
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([("5-0", "ranking", data)])
        assert list(dataset.rankings()) == [("5-0", expected)]
        row = dataset.db.execute("SELECT comparison_id, user, policy_version FROM events").fetchone()
        assert row == ("chatcmpl-1", "ann", "v0003")


def test_an_event_stored_before_schema_version_still_reads(tmp_path: Path) -> None:
    old = {
        "kind": "demonstration",
        "messages": [{"role": "user", "content": "hi"}],
        "answer": "hello",
        "user": None,
        "comparison_id": "c9",
        "policy_version": "v0001",
        "created": 1.0,
    }
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([("3-0", "demonstration", json.dumps(old))])
        [(event_id, event)] = dataset.demonstrations()
    assert event_id == "3-0" and event == DemonstrationEvent(**old) and event.schema_version == 1
    assert event.conversation() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("kind", "data", "says"),
    [
        ("ranking", "{}", "kind"),
        ("ranking", json.dumps({"kind": "ranking", "ranking": [[0]], "user": None, "created": 1.0}), "comparison"),
        ("demonstration", spliced(ranking_head([[0], [1]], None, 1.0), COMPARISON), "filed as demonstration"),
        ("ranking", json.dumps({"kind": "ranking", "schema_version": 2}), "schema_version"),
        ("ranking", "not json", "invalid"),
    ],
)
def test_an_event_that_breaks_the_contract_is_set_aside(tmp_path: Path, kind: str, data: str, says: str) -> None:
    with pytest.raises(EventError, match=says):
        read_event("2-0", kind, data)
    good = [("1-0", "demonstration", demonstration_json(1)), ("3-0", "demonstration", demonstration_json(3))]
    with Dataset(tmp_path / "d.sqlite") as dataset:
        assert dataset.insert([good[0], ("2-0", kind, data), good[1]]) == 2  # the rest of the batch is stored
        assert dataset.ids() == ["1-0", "3-0"] and [e.id for e in dataset.events()] == ["1-0", "3-0"]
        [(event_id, why)] = dataset.rejected()
        assert event_id == "2-0" and why.startswith("event 2-0 ") and says in why
        assert dataset.insert([("2-0", kind, data)]) == 0 and len(dataset.rejected()) == 1  # redelivered: once


def test_count_after_an_event_is_done_in_sql(tmp_path: Path) -> None:
    data = spliced(ranking_head([[1], [0]], None, 1.0), COMPARISON)
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([(f"{ms}-{seq}", "ranking", data) for ms, seq in [(9, 5), (9, 10), (10, 0)]])
        assert [dataset.count("ranking", after) for after in (None, "9-5", "9-10", "10-0")] == [3, 2, 1, 0]
        assert dataset.count("demonstration") == 0
