from pathlib import Path

import pytest

from deploy.settings import SettingsError, cpu_list, load_settings, redact_url


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.default_n == 4
    assert settings.port == 8000
    assert settings.comparison_ttl_s == 7 * 24 * 3600
    assert settings.effective_redis_url == "redis://127.0.0.1:6390/0"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKLOOP_PORT", "9001")
    monkeypatch.setenv("RANKLOOP_DEFAULT_N", "3")
    monkeypatch.setenv("RANKLOOP_MAX_ADAPTER_RANK", "32")
    monkeypatch.setenv("RANKLOOP_LEARN_PTX_SOURCE", "reference")
    monkeypatch.setenv("RANKLOOP_PROMOTE_ON", "canary")
    settings = load_settings()
    assert (settings.port, settings.default_n, settings.max_adapter_rank) == (9001, 3, 32)
    assert (settings.learn_ptx_source, settings.promote_on) == ("reference", "canary")


def test_redis_url_without_prefix_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://db.example:6379/2")
    assert load_settings().effective_redis_url == "redis://db.example:6379/2"


def test_unknown_environment_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKLOOP_PROT", "9001")
    with pytest.raises(SettingsError, match="RANKLOOP_PROT"):
        load_settings()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RANKLOOP_DEFAULT_N", "0"),
        ("RANKLOOP_DEFAULT_N", "10"),
        ("RANKLOOP_PORT", "70000"),
        ("RANKLOOP_CPU_THREADS", "two"),
        ("RANKLOOP_CPU_THREADS", "3-1"),
        ("RANKLOOP_LEARN_CPUS", "1-"),
        ("RANKLOOP_REDIS_URL", "http://x"),
        ("RANKLOOP_ADMIN_TOKEN", "short-token"),
        ("RANKLOOP_MAX_ADAPTER_RANK", "33"),
        ("RANKLOOP_CANARY_SHARE", "0"),
    ],
)
def test_impossible_values_name_the_key(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=key.removeprefix("RANKLOOP_").lower()):
        load_settings()


def test_an_admin_token_of_16_characters_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKLOOP_ADMIN_TOKEN", "x" * 15)
    with pytest.raises(SettingsError, match="has 15 characters; use at least 16"):
        load_settings()
    monkeypatch.setenv("RANKLOOP_ADMIN_TOKEN", "x" * 16)
    token = load_settings().admin_token
    assert token is not None and token.get_secret_value() == "x" * 16


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(SettingsError, match="max_tokens_limit must be below max_model_len"):
        load_settings(max_model_len=512, max_tokens_limit=512, default_max_tokens=128)


def test_toml_file_is_read_and_its_unknown_keys_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "rankloop.toml"
    config.write_text('port = 8123\ndata_dir = "/srv/rankloop"\n')
    monkeypatch.setenv("RANKLOOP_CONFIG", str(config))
    settings = load_settings()
    assert settings.port == 8123
    assert settings.store_dir == Path("/srv/rankloop/models")

    monkeypatch.setenv("RANKLOOP_PORT", "8200")  # the environment wins over the file
    assert load_settings().port == 8200

    config.write_text("prot = 8123\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings()


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKLOOP_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match=r"nope\.toml"):
        load_settings()


def test_cpu_lists_name_their_cores() -> None:
    assert cpu_list("0") == {0}
    assert cpu_list("0-2,5") == {0, 1, 2, 5}
    assert cpu_list(" 4-5 , 1") == {1, 4, 5}
    for bad in ("", "a", "2-1", "1,,2", "-3"):
        with pytest.raises(ValueError, match="not a CPU list"):
            cpu_list(bad)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@db.example:6379/0", "redis://:***@db.example:6379/0"),
        ("rediss://ann:hunter2@db.example/1", "rediss://ann:***@db.example/1"),
        ("redis://db.example:6379/0", "redis://db.example:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_a_redis_password_is_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert load_settings(redis_url=url).shown_redis_url == shown
