"""Settings: every contract name, the order of sources, and one clear line for a bad value."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from clawdbot.errors import SettingsError
from clawdbot.settings import ACCEPTED, Settings, env_name, load_settings

CONTRACT_NAMES = {
    "CLAWDBOT_DATABASE_URL", "CLAWDBOT_DATA_DIR", "OLLAMA_HOST", "CLAWDBOT_BACKEND", "CLAWDBOT_DEFAULT_MODEL",
    "CLAWDBOT_FALLBACK_MODEL", "CLAWDBOT_CONTEXT_BUDGET", "CLAWDBOT_MAX_CONCURRENT", "CLAWDBOT_QUEUE_SIZE",
    "CLAWDBOT_QUEUE_TIMEOUT", "CLAWDBOT_RATE_LIMIT", "CLAWDBOT_CONNECT_TIMEOUT", "CLAWDBOT_READ_TIMEOUT",
    "CLAWDBOT_RETRIES", "CLAWDBOT_KEEP_ALIVE", "CLAWDBOT_VRAM_GUARD", "CLAWDBOT_MAX_UPLOAD_MB",
    "CLAWDBOT_SECRET_KEY", "CLAWDBOT_REDIS_URL", "CLAWDBOT_EMBEDDED_MODEL", "CLAWDBOT_TOOL_ALLOWLIST",
}  # fmt: skip


def test_every_contract_setting_exists_with_its_default(workdir: Path) -> None:
    assert {env_name(f) for f in Settings.model_fields} == CONTRACT_NAMES
    assert set(ACCEPTED) == set(Settings.model_fields)
    s = load_settings()
    assert s.database_url == "sqlite:///data/clawdbot.db"
    assert s.data_dir == Path("data")
    assert s.ollama_host == "http://127.0.0.1:11434"
    assert (s.backend, s.default_model, s.fallback_model) == ("auto", "qwen3:32b", "")
    assert (s.context_budget, s.max_concurrent, s.queue_size, s.queue_timeout) == (7500, 4, 3, 60)
    assert s.rate_limit == "12/minute;3/10seconds"
    assert (s.connect_timeout, s.read_timeout, s.retries, s.keep_alive) == (30, 120, 2, "5m")
    assert (s.vram_guard, s.max_upload_mb, s.secret_key, s.redis_url) == (0.95, 25, None, "")
    assert (s.embedded_model, s.tool_allowlist) == ("", "")


def test_environment_wins_over_dotenv_which_wins_over_toml(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "clawdbot.toml").write_text(
        'max_concurrent = 2\nqueue_size = 9\nollama_host = "http://toml:1"\nretries = 5\n', encoding="utf-8"
    )
    (workdir / ".env").write_text("CLAWDBOT_MAX_CONCURRENT=3\nCLAWDBOT_QUEUE_SIZE=8\n", encoding="utf-8")
    monkeypatch.setenv("CLAWDBOT_MAX_CONCURRENT", "7")
    s = load_settings()
    assert s.max_concurrent == 7  # environment
    assert s.queue_size == 8  # .env
    assert s.retries == 5  # clawdbot.toml
    assert s.ollama_host == "http://toml:1"
    monkeypatch.setenv("OLLAMA_HOST", "http://gpu-box:11434/")
    assert load_settings().ollama_host == "http://gpu-box:11434"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CLAWDBOT_MAX_CONCURRENT", "0", "CLAWDBOT_MAX_CONCURRENT=0: expected a whole number from 1 to 256"),
        ("CLAWDBOT_MAX_CONCURRENT", "four", "CLAWDBOT_MAX_CONCURRENT=four: expected a whole number"),
        ("CLAWDBOT_RATE_LIMIT", "12/fortnight", "CLAWDBOT_RATE_LIMIT=12/fortnight: expected rate strings"),
        ("CLAWDBOT_BACKEND", "gpu", "CLAWDBOT_BACKEND=gpu: expected one of ollama, embedded, auto"),
        ("CLAWDBOT_VRAM_GUARD", "1.5", "CLAWDBOT_VRAM_GUARD=1.5: expected a fraction"),
        ("CLAWDBOT_KEEP_ALIVE", "forever", "CLAWDBOT_KEEP_ALIVE=forever: expected an Ollama duration"),
        ("OLLAMA_HOST", "gpu-box:11434", "OLLAMA_HOST=gpu-box:11434: expected an http:// or https:// URL"),
        (
            "CLAWDBOT_DATABASE_URL",
            "mysql://x/y",
            "CLAWDBOT_DATABASE_URL=mysql://x/y: expected a SQLAlchemy URL",
        ),
        ("CLAWDBOT_REDIS_URL", "localhost:6379", "CLAWDBOT_REDIS_URL=localhost:6379: expected a redis://"),
        (
            "CLAWDBOT_EMBEDDED_MODEL",
            "/nonexistent.gguf",
            "CLAWDBOT_EMBEDDED_MODEL=/nonexistent.gguf: expected",
        ),
        ("CLAWDBOT_QUEUE_SIZE", "-1", "CLAWDBOT_QUEUE_SIZE=-1: expected a whole number from 0 to 10000"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid setting {expected}")
    assert "\n" not in message


def test_a_short_secret_key_is_refused_without_showing_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAWDBOT_SECRET_KEY", "hunter2")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "CLAWDBOT_SECRET_KEY" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_secret_key_is_generated_once_and_kept_private(workdir: Path) -> None:
    s = load_settings()
    first = s.session_secret()
    assert len(first) >= 32
    key_file = workdir / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_settings().session_secret() == first


def test_tool_allowlist_is_split_into_hosts(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWDBOT_TOOL_ALLOWLIST", " intranet.local , Wiki.Corp ,")
    assert load_settings().allowlisted_hosts == frozenset({"intranet.local", "wiki.corp"})
