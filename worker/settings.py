"""Typed configuration, built once from ``PACS_AI_*`` environment variables.

Every command (``run``, ``listen``, ``worker``, ``studies list`` ...) reads the
same settings.  A bad value stops start-up with one readable line
(:class:`SettingsError`), never a traceback.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class SettingsError(Exception):
    """A configuration value is invalid; the message is one readable line."""


def _check_ae_title(value: str, name: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value) or len(stripped) > 16:
        raise ValueError(
            f"{name} {value!r} is not a valid AE title (1-16 printable characters, no backslash)"
        )
    return stripped


class Settings(BaseSettings):
    """All settings of a pacs-ai node. See the README for the table."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_AI_",
        env_file=None,
        extra="ignore",
        validate_default=True,
        # An empty variable (``PACS_AI_STORAGE_DIR=`` in an env file) means the
        # default, never "the current directory" or "all interfaces".
        env_ignore_empty=True,
        # inf would pass ``ge=0`` and break timedelta arithmetic later on.
        allow_inf_nan=False,
    )

    data_dir: Path = Field(default=Path("./pacs-ai-data"))
    ae_title: str = "PACSAI"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the network by design
    port: int = Field(default=11112, ge=1, le=65535)
    database_url: str = ""
    broker_url: str = ""
    storage_dir: Path | None = None
    stable_seconds: float = Field(default=30.0, ge=0.0)
    allowed_calling_aets: str = ""
    max_pdu_size: int = Field(default=0, ge=0)
    network_timeout: float = Field(default=60.0, gt=0)
    assembler_interval: float = Field(default=1.0, gt=0)
    reconcile_interval: float = Field(default=60.0, gt=0)
    requeue_after_seconds: float = Field(default=600.0, gt=0)
    task_soft_time_limit: float = Field(default=1800.0, gt=0)
    task_time_limit: float = Field(default=1900.0, gt=0)
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    job_max_attempts: int = Field(default=3, ge=1)
    models_dir: Path | None = None
    ort_threads: int = Field(default=0, ge=0, le=256)
    ort_providers: str = "CPUExecutionProvider"
    model_time_limit: float = Field(default=600.0, gt=0)
    log_level: str = "INFO"
    log_format: str = "text"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value, "PACS_AI_AE_TITLE")

    @field_validator("allowed_calling_aets")
    @classmethod
    def _allowed(cls, value: str) -> str:
        for item in _split(value):
            _check_ae_title(item, "PACS_AI_ALLOWED_CALLING_AETS entry")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(
                f"PACS_AI_LOG_LEVEL {value!r} is not one of DEBUG, INFO, WARNING, ERROR"
            )
        return upper

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in {"text", "json"}:
            raise ValueError(f"PACS_AI_LOG_FORMAT {value!r} is not 'text' or 'json'")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError(
                "PACS_AI_DATABASE_URL must start with sqlite:// or postgresql:// "
                "(for example postgresql+psycopg://user@host/db)"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value and not re.match(r"^(filesystem|redis|rediss|amqp|memory)://", value):
            raise ValueError(
                "PACS_AI_BROKER_URL must be filesystem://, redis://, rediss:// or amqp://"
            )
        return value

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                "PACS_AI_TASK_TIME_LIMIT must be greater than PACS_AI_TASK_SOFT_TIME_LIMIT"
            )
        return self

    # -- derived values ---------------------------------------------------

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def storage_path(self) -> Path:
        base = self.storage_dir if self.storage_dir is not None else self.data_path / "storage"
        return base.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'pacs-ai.sqlite3'}"

    @property
    def is_filesystem_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.data_path / "broker"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def models_path(self) -> Path:
        if self.models_dir is not None:
            return self.models_dir.expanduser().resolve()
        from worker.registry import DEMO_MODELS_DIR

        return DEMO_MODELS_DIR

    @property
    def ort_provider_list(self) -> tuple[str, ...]:
        aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
        return tuple(aliases.get(p.lower(), p) for p in _split(self.ort_providers))

    @property
    def allowed_aets(self) -> frozenset[str]:
        return frozenset(_split(self.allowed_calling_aets))


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    name = f"PACS_AI_{loc.upper()}" if loc else "configuration"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if msg.startswith("PACS_AI_"):
        return f"invalid configuration: {msg}"
    value: Any = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"invalid configuration: {name}: {msg}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built on first use (never at import)."""
    return load_settings()
