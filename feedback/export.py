"""Dataset rows in the formats other trainers read.

Preferences: one row per (chosen, rejected) pair, in the conversational form TRL's reward and DPO trainers and
OpenRLHF's reward dataset read (`prompt` as messages, `chosen` and `rejected` as the assistant turn), plus
`rank_group` (the ranking's event id) so the K-wise grouping of a prompt survives the flattening.
Demonstrations: TRL's conversational SFT form, `messages` ending with the assistant's answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from feedback.events import DemonstrationEvent, RankingEvent
from feedback.ranking import pairs

Format = Literal["jsonl", "parquet"]


def preference_rows(event_id: str, event: RankingEvent) -> Iterator[dict[str, Any]]:
    comparison = event.comparison
    texts = {c.index: c.text for c in comparison.candidates}
    writers = {c.index: c.policy_version or comparison.policy_version for c in comparison.candidates}
    for chosen, rejected in pairs(event.ranking):
        yield {
            "prompt": comparison.messages,
            "chosen": [{"role": "assistant", "content": texts[chosen]}],
            "rejected": [{"role": "assistant", "content": texts[rejected]}],
            "rank_group": event_id,
            "chosen_index": chosen,
            "rejected_index": rejected,
            "policy_version": comparison.policy_version,  # the version served (a canary's candidate may be beside it)
            "chosen_policy_version": writers[chosen],
            "rejected_policy_version": writers[rejected],
        }


def sft_row(event_id: str, event: DemonstrationEvent) -> dict[str, Any]:
    return {"messages": event.conversation(), "id": event_id}


def write_rows(rows: Iterable[dict[str, Any]], path: Path, fmt: Format) -> int:
    """Write rows to `path` (written beside it, then renamed: a reader never sees half a file); return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if fmt == "jsonl":
        count = 0
        with partial.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(list(rows))
        pq.write_table(table, partial)
        count = table.num_rows
    partial.replace(path)
    return count
