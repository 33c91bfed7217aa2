"""Typed configuration, built once from ``PACS_AI_*`` environment variables.

Every command (``run``, ``listen``, ``worker``, ``studies list`` ...) reads the
same settings.  A bad value stops start-up with one readable line
(:class:`SettingsError`), never a traceback.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from dicomnode.pacs_query import QueryPeer
    from dicomnode.protocols import Destination

#: the demo models shipped in the wheel (worker/models/)
DEMO_MODELS_DIR = Path(__file__).resolve().parent / "models"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
# an API host allow-list entry: '*', '*.domain', a host name, an IPv4 or an IPv6 address
_ALLOWED_HOST = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9_.-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?)$")


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
    port: int = Field(default=11112, ge=0, le=65535)  # 0 = plain DICOM off
    database_url: str = ""
    broker_url: str = ""
    storage_dir: Path | None = None
    stable_seconds: float = Field(default=30.0, ge=0.0)
    allowed_calling_aets: str = ""
    max_pdu_size: int = Field(default=262144, ge=4096, le=16 * 1024 * 1024)
    network_timeout: float = Field(default=60.0, gt=0)
    # the listener on a hostile network (dicomnode/scp.py, dicomnode/guard.py)
    association_timeout: float = Field(default=10.0, gt=0)
    max_associations: int = Field(default=32, ge=1, le=1000)
    listener_processes: int = Field(default=0, ge=0, le=64)  # 0 = the number of cores
    max_associations_per_host: int = Field(default=8, ge=1, le=1000)
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)
    allowed_hosts: str = ""
    tls_port: int = Field(default=0, ge=0, le=65535)
    listener_tls_cert: Path | None = None
    listener_tls_key: Path | None = None
    listener_tls_ca: Path | None = None
    min_free_mb: int = Field(default=1024, ge=0)
    retention_hours: float = Field(default=0.0, ge=0)
    # audit records older than this many days are deleted (0: kept for ever)
    audit_retention_days: float = Field(default=0.0, ge=0)
    assembler_interval: float = Field(default=1.0, gt=0)
    reconcile_interval: float = Field(default=60.0, gt=0)
    requeue_after_seconds: float = Field(default=600.0, gt=0)
    task_soft_time_limit: float = Field(default=1800.0, gt=0)
    task_time_limit: float = Field(default=1900.0, gt=0)
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    job_max_attempts: int = Field(default=3, ge=1)
    # a running job's lease, renewed every quarter of it by the job's heartbeat
    job_lease_seconds: float = Field(default=60.0, ge=2, le=3600)
    # `pacs-ai run`: how long a part may take to stop on SIGTERM before it is killed
    stop_grace_seconds: float = Field(default=20.0, ge=1, le=600)
    models_dir: Path | None = None
    ort_threads: int = Field(default=0, ge=0, le=256)
    ort_providers: str = "CPUExecutionProvider"
    model_time_limit: float = Field(default=600.0, gt=0)
    log_level: str = "INFO"
    log_format: str = "text"
    # results returned to the PACS (dicomnode/results.py, worker/delivery/dispatch.py)
    uid_root: str = "2.25"
    destinations: str = Field(default="", repr=False)  # may hold user:password@
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # bearer token of stow+http(s):// destinations without user:password (never shown)
    dicomweb_token: str = Field(default="", repr=False)
    # deprecated and ignored: transient retries end by age (delivery_max_age_hours)
    delivery_max_attempts: int = Field(default=12, ge=1, le=1000)
    delivery_max_age_hours: float = Field(default=168.0, gt=0, le=24 * 365 * 10)
    delivery_alert_minutes: float = Field(default=60.0, gt=0)
    delivery_retry_base: float = Field(default=30.0, gt=0)
    delivery_retry_max: float = Field(default=3600.0, gt=0)
    dispatch_timeout: float = Field(default=60.0, gt=0)
    dispatch_concurrency: int = Field(default=2, ge=1, le=64)
    # the PACS asked (C-FIND) how many instances a study has: [tls://]AE@host:port
    pacs: str = ""
    # admin API and dashboard (worker/admin/api.py)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_token: str = ""
    api_read_tokens: str = ""
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    # Host header allow-list of the API (worker/admin/webguard.py); empty: loopback + api_host
    api_allowed_hosts: str = ""
    # STOW-RS in (worker/admin/stow_rs.py): tokens that may only store instances
    stow_tokens: str = Field(default="", repr=False)
    stow_max_request_bytes: int = Field(default=16 * 1024**3, ge=1024)
    # Prometheus multiprocess files (worker/metrics.py); optional per-process endpoint
    metrics_dir: Path | None = None
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # patient linkage and identifiers at rest (dicomnode/identity.py): the secret key;
    # unset: <data dir>/secret.key, created (mode 0600) when missing
    secret_key_file: Path | None = None
    # a nodule result's comparison with the patient's prior study (worker/results/priors.py):
    # off, local (studies pacs-ai processed) or pacs (also C-FIND/C-MOVE on PACS_AI_PACS)
    priors: str = "local"
    # seconds a job waits for a prior retrieved from the PACS to be processed
    prior_wait_seconds: float = Field(default=600.0, gt=0, le=3600)
    # saliency maps of classification findings (worker/pipeline/saliency.py): seconds of
    # occlusion per study for destinations with profile "map"; 0 turns them off
    saliency_budget_seconds: float = Field(default=20.0, ge=0, le=3600)

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

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        from dicomnode.guard import parse_networks

        try:
            parse_networks(_split(value))
        except ValueError as exc:
            raise ValueError(f"PACS_AI_ALLOWED_HOSTS: {exc}") from None
        return value

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        from dicomnode.uids import check_uid_root

        try:
            return check_uid_root(value)
        except ValueError as exc:
            raise ValueError(f"PACS_AI_UID_ROOT: {exc}") from None

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: str) -> str:
        from dicomnode.protocols import parse_destinations

        try:
            parse_destinations(value)
        except ValueError as exc:
            raise ValueError(f"PACS_AI_DESTINATIONS: {exc}") from None
        return value

    @field_validator("dicomweb_token")
    @classmethod
    def _dicomweb_token(cls, value: str) -> str:
        token = value.strip()
        if not all("\x21" <= c <= "\x7e" for c in token):  # it goes into an HTTP header
            raise ValueError(
                "PACS_AI_DICOMWEB_TOKEN: the token must be printable ASCII without spaces"
            )
        return token

    @field_validator("pacs")
    @classmethod
    def _pacs(cls, value: str) -> str:
        from dicomnode.pacs_query import parse_peer

        if value.strip():
            try:
                parse_peer(value)
            except ValueError as exc:
                raise ValueError(f"PACS_AI_PACS: {exc}") from None
        return value.strip()

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

    @field_validator("api_token", "api_read_tokens", "stow_tokens")
    @classmethod
    def _tokens(cls, value: str, info: ValidationInfo) -> str:
        name = f"PACS_AI_{str(info.field_name).upper()}"
        for item in _split(value):
            check_token_entry(item, name)
        return value

    @field_validator("api_allowed_hosts")
    @classmethod
    def _api_allowed_hosts(cls, value: str) -> str:
        for item in _split(value):
            if not _ALLOWED_HOST.match(item):
                raise ValueError(
                    f"PACS_AI_API_ALLOWED_HOSTS: {item!r} is not a host name, an IP address, "
                    "'*.domain' or '*' (no scheme, port or path)"
                )
        return value

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if not self.port and not self.tls_port:
            raise ValueError(
                "PACS_AI_PORT and PACS_AI_TLS_PORT are both 0: the listener would not listen"
            )
        if self.tls_port:
            if self.listener_tls_cert is None or self.listener_tls_key is None:
                raise ValueError(
                    "PACS_AI_TLS_PORT needs PACS_AI_LISTENER_TLS_CERT and PACS_AI_LISTENER_TLS_KEY"
                )
            if self.tls_port == self.port:
                raise ValueError("PACS_AI_TLS_PORT must differ from PACS_AI_PORT")
        for path, var in (
            (self.listener_tls_cert, "CERT"),
            (self.listener_tls_key, "KEY"),
            (self.listener_tls_ca, "CA"),
        ):
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"PACS_AI_LISTENER_TLS_{var}: no such file {str(path)!r}")
        if self.max_associations_per_host > self.max_associations:
            raise ValueError(
                "PACS_AI_MAX_ASSOCIATIONS_PER_HOST must not exceed PACS_AI_MAX_ASSOCIATIONS"
            )
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                "PACS_AI_TASK_TIME_LIMIT must be greater than PACS_AI_TASK_SOFT_TIME_LIMIT"
            )
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ValueError("PACS_AI_API_TLS_CERT and PACS_AI_API_TLS_KEY must be set together")
        for path, var in ((self.api_tls_cert, "CERT"), (self.api_tls_key, "KEY")):
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"PACS_AI_API_TLS_{var}: no such file {str(path)!r}")
        return self

    # -- derived values ---------------------------------------------------

    @field_validator("priors")
    @classmethod
    def _priors(cls, value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in {"off", "local", "pacs"}:
            raise ValueError(f"PACS_AI_PRIORS {value!r} is not 'off', 'local' or 'pacs'")
        return lowered

    @model_validator(mode="after")
    def _priors_need_pacs(self) -> Settings:
        if self.priors == "pacs" and not self.pacs:
            raise ValueError("PACS_AI_PRIORS=pacs needs PACS_AI_PACS (AE@host:port)")
        return self

    @property
    def secret_key_path(self) -> Path:
        """The secret key of patient linkage and identifiers at rest."""
        if self.secret_key_file is not None:
            return self.secret_key_file.expanduser().resolve()
        return self.data_path / "secret.key"

    @property
    def secret_key_is_default(self) -> bool:
        """No PACS_AI_SECRET_KEY_FILE: the key in the data dir, created when missing."""
        return self.secret_key_file is None

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
        return DEMO_MODELS_DIR

    @property
    def ort_provider_list(self) -> tuple[str, ...]:
        aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
        return tuple(aliases.get(p.lower(), p) for p in _split(self.ort_providers))

    @property
    def destination_list(self) -> tuple[Destination, ...]:
        from dicomnode.protocols import parse_destinations

        return parse_destinations(self.destinations)

    @property
    def pacs_peer(self) -> QueryPeer | None:
        """The PACS queried for instance counts (``PACS_AI_PACS``), or None."""
        from dicomnode.pacs_query import parse_peer

        return parse_peer(self.pacs) if self.pacs else None

    @property
    def outbox_path(self) -> Path:
        """Built result objects waiting for delivery (in the shared storage)."""
        return self.storage_path / ".outbox"

    @property
    def effective_listener_processes(self) -> int:
        import os

        return self.listener_processes or max(1, len(os.sched_getaffinity(0)))

    @property
    def allowed_host_list(self) -> tuple[str, ...]:
        return tuple(_split(self.allowed_hosts))

    @property
    def allowed_aets(self) -> frozenset[str]:
        return frozenset(_split(self.allowed_calling_aets))

    @property
    def metrics_path(self) -> Path:
        base = self.metrics_dir if self.metrics_dir is not None else self.data_path / "metrics"
        return base.expanduser().resolve()

    @property
    def api_admin_token_list(self) -> tuple[str, ...]:
        return tuple(_split(self.api_token))

    @property
    def api_read_token_list(self) -> tuple[str, ...]:
        return tuple(_split(self.api_read_tokens))

    @property
    def api_auth_enabled(self) -> bool:
        return bool(self.api_admin_token_list or self.api_read_token_list)

    @property
    def stow_token_list(self) -> tuple[str, ...]:
        return tuple(_split(self.stow_tokens))

    @property
    def api_allowed_host_list(self) -> tuple[str, ...]:
        """``PACS_AI_API_ALLOWED_HOSTS`` as given (lower case); empty: the defaults."""
        return tuple(item.lower() for item in _split(self.api_allowed_hosts))


#: a stored token: the plain token (16+ characters) or ``sha256:<64 hex digits>``
_HASHED_TOKEN = re.compile(r"^sha256:[0-9a-f]{64}$")
MIN_TOKEN_LENGTH = 16


def check_token_entry(item: str, name: str) -> None:
    if item.startswith("sha256:"):
        if not _HASHED_TOKEN.match(item):
            raise ValueError(f"{name}: a hashed token is 'sha256:' and 64 lowercase hex digits")
    elif len(item) < MIN_TOKEN_LENGTH or any(c.isspace() for c in item):
        raise ValueError(
            f"{name}: a token must be at least {MIN_TOKEN_LENGTH} characters without spaces "
            "(or 'sha256:<hex digest>')"
        )


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
