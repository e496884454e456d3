"""`rankloop report` on a data dir with a little of everything: the page names what happened and embeds the
plots, which are real PNG files."""

import json
import time
from pathlib import Path

from deploy.model_store import Card, ModelStore
from deploy.registry import Event
from deploy.settings import load_settings
from lab.judge import Judgement, save
from lab.report import write_report
from learn.winrate import win_rate


def stub(folder: Path) -> None:
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):  # what the store insists on
        (folder / name).write_text("{}")


def test_the_report_shows_history_and_samples(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    now = time.time()
    rewards = ModelStore(settings.reward_store_dir, prefix="r")
    for n, accuracy in enumerate((0.7, 0.8), start=1):
        details = {"eval": {"accuracy": accuracy}}
        card = Card(version=f"r{n:04d}", parent="v0001", made_by="reward_model", details=details)
        rewards.publish(card, stub)
    store = ModelStore(settings.store_dir)
    store.publish(Card(version="v0001", parent=None, made_by="import"), stub)
    store.publish(Card(version="v0002", parent="v0001", made_by="ppo"), stub)
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = [
        {"step": i, "time": now + 60 * i, "reward": 0.1 * i, "kl_per_answer": 0.5, "answer_length": 40 - i}
        for i in range(1, 6)
    ]
    (runs / "v0001-ppo-r0002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save(
        Judgement(
            "v0002",
            "v0001",
            "concise",
            win_rate([1, 1, 0.5, 0]),
            30.0,
            45.0,
            2,
            2,
            0,
            now,
            [{"prompt": "Say <hi>", "a": "Hi.", "b": "Hello there, how are you?"}],
        ),
        tmp_path,
    )
    events = [Event("1-0", 1, "promote", "v0002", "v0001", "learner", "better", now + 400)]

    page = write_report(settings, events, tmp_path / "report" / "index.html").read_text()
    assert "2 reward models; 1 promotions and 0 rollbacks" in page
    assert "win rate 62.5%" in page and "mean length 30 vs 45 characters" in page
    assert "Say &lt;hi&gt;" in page  # sample answers escaped
    for png in ("rm_accuracy.png", "ppo_reward.png", "ppo_answer_length.png", "win_rate_0.png"):
        assert f"src='{png}'" in page
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "ppo_ptx_loss.png" not in page  # no data, no empty plot
