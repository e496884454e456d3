"""The event contract: what the server writes is what the dataset and the learner read back, typed; a comparison
is kept once however many rankings name it; what breaks the contract is never stored; events stored under schema 1
(a ranking with its comparison inside) and before `schema_version` existed still read."""

import json
from pathlib import Path

import pytest

from feedback.dataset import Dataset
from feedback.events import (
    Comparison,
    ComparisonEvent,
    DemonstrationEvent,
    EventError,
    RankingEvent,
    RankingRecord,
    StoredCandidate,
    comparison_head,
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


def spliced(comparison: Comparison) -> str:
    """What the append script streams before a comparison's first ranking: the head, the stored JSON, a brace."""
    return comparison_head() + comparison.model_dump_json() + "}"


def record(user: str | None, created: float = 99.0, ranking: list[list[int]] | None = None) -> str:
    tiers = ranking or [[1], [0]]
    return RankingRecord(ranking=tiers, user=user, created=created, comparison_id=COMPARISON.id).model_dump_json()


def embedded(user: str | None, created: float) -> str:
    """A ranking as schema 1 stored it: the comparison inside."""
    return json.dumps(
        {
            "kind": "ranking",
            "schema_version": 1,
            "ranking": [[1], [0]],
            "user": user,
            "created": created,
            "comparison": json.loads(COMPARISON.model_dump_json()),
        }
    )


def test_a_comparison_and_its_ranking_read_back_joined(tmp_path: Path) -> None:
    assert read_event("4-0", "comparison", spliced(COMPARISON)) == ComparisonEvent(comparison=COMPARISON)
    expected = RankingEvent(schema_version=2, ranking=[[1], [0]], user="ann", created=99.0, comparison=COMPARISON)
    with Dataset(tmp_path / "d.sqlite") as dataset:
        assert dataset.insert([("4-0", "comparison", spliced(COMPARISON)), ("5-0", "ranking", record("ann"))]) == 1
        assert list(dataset.rankings()) == [("5-0", expected)]
        # The index columns of a ranking that names its comparison: its policy version is the comparison's.
        row = dataset.db.execute("SELECT comparison_id, user, policy_version FROM events").fetchone()
        assert row == ("chatcmpl-1", "ann", "v0003")


def test_a_comparison_is_stored_once_however_many_rank_it(tmp_path: Path) -> None:
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([("4-0", "comparison", spliced(COMPARISON)), ("5-0", "ranking", record("ann"))])
        # A second user's ranking, then the whole batch redelivered: one comparison, two rankings.
        dataset.insert([("6-0", "ranking", record("bob", 100.0, [[0], [1]]))])
        assert dataset.insert([("4-0", "comparison", spliced(COMPARISON)), ("5-0", "ranking", record("ann"))]) == 0
        assert dataset.comparison_count() == 1 and dataset.counts() == {"ranking": 2}
        events = [event for _, event in dataset.rankings()]
        assert [(e.user, e.ranking, e.comparison) for e in events] == [
            ("ann", [[1], [0]], COMPARISON),
            ("bob", [[0], [1]], COMPARISON),
        ]
        [stored] = dataset.db.execute("SELECT length(data) FROM events WHERE user = 'bob'").fetchone()
        assert stored < 200  # the ranking alone: the comparison is not copied into it


def test_a_ranking_whose_comparison_has_not_arrived_is_passed_over_until_it_does(tmp_path: Path) -> None:
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([("5-0", "ranking", record("ann"))])  # another consumer still holds the comparison
        assert list(dataset.rankings()) == [] and dataset.count("ranking") == 1
        dataset.insert([("4-0", "comparison", spliced(COMPARISON))])
        assert [event_id for event_id, _ in dataset.rankings()] == ["5-0"]
        row = dataset.db.execute("SELECT policy_version FROM events").fetchone()
        assert row == (None,)  # looked up when the ranking was written: the index column stays empty


def test_a_schema_1_ranking_with_its_comparison_inside_still_reads(tmp_path: Path) -> None:
    expected = RankingEvent(ranking=[[1], [0]], user="ann", created=99.0, comparison=COMPARISON)
    assert read_event("5-0", "ranking", embedded("ann", 99.0)) == expected and expected.schema_version == 1
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([("5-0", "ranking", embedded("ann", 99.0)), ("7-0", "ranking", record("bob"))])
        dataset.insert([("6-0", "comparison", spliced(COMPARISON))])
        events = list(dataset.rankings())
        assert [(i, e.user, e.schema_version, e.comparison) for i, e in events] == [
            ("5-0", "ann", 1, COMPARISON),
            ("7-0", "bob", 2, COMPARISON),
        ]


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
        ("ranking", json.dumps({"kind": "ranking", "ranking": [[0]], "user": None, "created": 1.0}), "comparison_id"),
        ("demonstration", record(None), "filed as demonstration"),
        ("demonstration", spliced(COMPARISON), "filed as demonstration"),
        ("ranking", json.dumps(json.loads(embedded(None, 1.0)) | {"schema_version": 3}), "schema_version"),
        ("ranking", json.dumps(json.loads(record(None)) | {"schema_version": 1}), "schema_version"),
        ("comparison", json.dumps({"kind": "comparison", "schema_version": 2}), "comparison"),
        ("ranking", json.dumps({"kind": "vote"}), "`kind` must be one of"),
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
    with Dataset(tmp_path / "d.sqlite") as dataset:
        dataset.insert([(f"{ms}-{seq}", "ranking", record(None)) for ms, seq in [(9, 5), (9, 10), (10, 0)]])
        assert [dataset.count("ranking", after) for after in (None, "9-5", "9-10", "10-0")] == [3, 2, 1, 0]
        assert dataset.count("demonstration") == 0
