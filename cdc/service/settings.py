"""What the relay's and the workers' settings share: secret files, URL checks, flags, errors.

- :class:`CdcSettings` is the base of both settings models (``cdc/config.py``,
  ``consumers/config.py``): the ``CDC_`` prefix, the two connection strings and their checks
  (a broker URL or DSN that can never connect is refused at start, exit 2).
- Every secret setting (a ``SecretStr`` field: ``CDC_DATABASE_URL``, ``CDC_AMQP_URL``, the
  notifications worker's ``CDC_WEBHOOK_SECRET`` and ``CDC_SMTP_PASSWORD``) may instead be
  given as ``CDC_<NAME>_FILE``: the path of a file holding the value, one trailing newline
  stripped, as Kubernetes secret volumes and compose secrets mount them. Setting both is an
  error.
- :func:`load` builds a model from the environment and the command line flags. A flag may
  not carry a secret, because every user of the host sees a process's arguments.
- One rule for the names a setting gives (:func:`check_identifier`, :func:`check_table`,
  :func:`check_amqp_name`), so a name the relay accepts the workers accept too.
- Every problem is a :class:`~cdc.errors.ConfigError` with one line naming the variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cdc.errors import ConfigError
from cdc.service.logs import redact
from cdc.service.urls import AmqpUrl, amqp_address, parse_dsn, url_has_password

PREFIX = "CDC_"
FILE_SUFFIX = "_FILE"

S = TypeVar("S", bound="CdcSettings")

#: The topic exchange the relay publishes to and the workers consume from.
DEFAULT_EXCHANGE = "cloudphone.events"

# A name PostgreSQL takes unquoted: a letter or ``_`` first, then letters, digits, ``_`` or
# ``$`` (PostgreSQL allows ``$`` there, never first: ``$1`` is a parameter), 63 at most.
# Names are still quoted (psycopg.sql.Identifier) wherever SQL uses them; the rule keeps
# out what would need quoting to mean the same thing in psql, docs and GRANTs.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_AMQP_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,255}")

#: What :func:`check_identifier` accepts, in words, for error messages.
IDENTIFIER_RULE = "a letter or '_', then letters, digits, '_' or '$'; 63 characters at most"


def is_identifier(value: str) -> bool:
    """True if ``value`` is a plain SQL identifier (see ``IDENTIFIER_RULE``)."""
    return _IDENTIFIER.fullmatch(value) is not None


def check_identifier(value: str) -> str:
    """``value`` if it is a plain SQL identifier, else ValueError saying the rule."""
    if not is_identifier(value):
        raise ValueError(f"must be a plain SQL identifier: {IDENTIFIER_RULE}")
    return value


def check_table(value: str) -> str:
    """``table`` or ``schema.table`` of plain identifiers -> ``schema.table``."""
    parts = value.split(".")
    if len(parts) > 2 or not all(is_identifier(p) for p in parts):
        raise ValueError(
            f"must be 'table' or 'schema.table' made of plain SQL identifiers ({IDENTIFIER_RULE})"
        )
    return value if len(parts) == 2 else f"public.{value}"


def check_amqp_name(value: str) -> str:
    """``value`` if it is a usable exchange or queue name, else ValueError."""
    if not _AMQP_NAME.fullmatch(value):
        raise ValueError("AMQP names may use letters, digits and . _ - : only (1-255)")
    return value


def variable(field: str) -> str:
    """The environment variable of a settings field (``amqp_url`` -> ``CDC_AMQP_URL``)."""
    return f"{PREFIX}{field.upper()}"


def is_secret(info: FieldInfo) -> bool:
    """True for ``SecretStr`` fields (optional ones included)."""
    return info.annotation is SecretStr or SecretStr in get_args(info.annotation)


def read_secret_file(name: str, path: str) -> str:
    """The value in file ``path`` (named by variable ``name``), one trailing newline removed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise SettingsError(f"{name}: cannot read {path}: {why}") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise SettingsError(f"{name}: {path} is empty")
    return text


class SecretFileSource(PydanticBaseSettingsSource):
    """``CDC_<NAME>_FILE`` for every secret field: the value is read from that file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` reads every secret field at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        environ = {k.upper(): v for k, v in os.environ.items()}
        values: dict[str, Any] = {}
        for field, info in self.settings_cls.model_fields.items():
            name = variable(field)
            path = environ.get(name + FILE_SUFFIX)
            if not is_secret(info) or path is None:
                continue
            if name in environ:
                raise SettingsError(
                    f"{name} and {name}{FILE_SUFFIX} are both set: keep one of them"
                )
            values[field] = read_secret_file(name + FILE_SUFFIX, path)
        return values


class CdcSettings(BaseSettings):
    """Base of the relay's and the workers' settings (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    # Optional in the model, because not every command uses both (``cdc status`` needs no
    # broker, ``dlq`` no database): each command names what it needs in :func:`load`, and
    # reads them through :meth:`dsn` and :meth:`broker_url`.
    database_url: SecretStr | None = Field(
        None, description="libpq URL or key=value DSN of the database"
    )
    amqp_url: SecretStr | None = Field(
        None, description="amqp:// or amqps:// URL of the broker"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then the environment, then ``*_FILE`` secrets (one of the two, not both)."""
        return (
            init_settings,
            env_settings,
            SecretFileSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_dsn(value.get_secret_value())
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            amqp_address(value.get_secret_value())
        return value

    def dsn(self) -> str:
        """The database URL; ConfigError naming ``CDC_DATABASE_URL`` if it is not set."""
        return self._required("database_url")

    def broker_url(self) -> str:
        """The broker URL; ConfigError naming ``CDC_AMQP_URL`` if it is not set."""
        return self._required("amqp_url")

    def broker_address(self) -> AmqpUrl:
        """The broker URL's parts, as checked at start; ConfigError if not set (or no longer
        valid: a ``?cafile=`` removed since)."""
        try:
            return amqp_address(self.broker_url())
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {variable('amqp_url')}: {exc}") from None

    def _required(self, field: str) -> str:
        value = getattr(self, field)
        if value is None:
            raise ConfigError(unset(field))
        return str(value.get_secret_value())


def check_backoff(minimum: float, maximum: float, field: str) -> None:
    """Refuse a reconnect backoff whose first delay exceeds its largest one."""
    if minimum > maximum:
        raise ValueError(
            f"{variable(field + '_min_delay')} ({minimum:g}) is larger than "
            f"{variable(field + '_max_delay')} ({maximum:g})"
        )


def unset(field: str, user: str = "") -> str:
    """The one line for a required variable that is not set (``user``: who needs it)."""
    name = variable(field)
    who = f": {user} needs it" if user else ""
    return f"invalid configuration: {name}: is not set (set {name} or {name}{FILE_SUFFIX}){who}"


def explain(exc: ValidationError) -> str:
    """A pydantic error as one line naming each variable; secrets redacted."""
    parts = []
    for error in exc.errors():
        field, *inside = [str(part) for part in error["loc"]] or [""]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            name = variable(field)
            message = f"is not set (set {name} or {name}{FILE_SUFFIX})"
        where = variable(field) + (f" [{'.'.join(inside)}]" if inside else "")
        parts.append(f"{where}: {message}" if field else message)
    return redact("invalid configuration: " + "; ".join(parts))


def refuse_secret_flags(model: type[CdcSettings], flags: Mapping[str, Any]) -> None:
    """ConfigError if a flag carries a secret (a password in a URL, or a secret itself)."""
    for field, value in flags.items():
        info = model.model_fields.get(field)
        if info is None or value is None or not is_secret(info):
            continue
        if field.endswith("_url") and not url_has_password(str(value)):
            continue
        flag, name = f"--{field.replace('_', '-')}", variable(field)
        raise ConfigError(
            f"invalid configuration: {flag} carries a password, and every user of this host "
            f"can read a process's arguments: set {name} or {name}{FILE_SUFFIX} instead"
        )


def load(
    model: type[S], flags: Mapping[str, Any], needs: Sequence[str] = (), user: str = ""
) -> S:
    """``model`` from the environment with the given ``flags`` (not None) overriding.

    ``needs`` names the optional fields (``database_url``, ``amqp_url``) the command cannot
    run without; ``user`` (the command) is named in the error when one is not set.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    refuse_secret_flags(model, given)
    try:
        settings = model(**given)
    except ValidationError as exc:
        raise ConfigError(explain(exc)) from None
    except SettingsError as exc:
        raise ConfigError(redact(f"invalid configuration: {exc}")) from None
    for field in needs:
        if getattr(settings, field) is None:
            raise ConfigError(unset(field, user))
    return settings
