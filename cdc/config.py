"""The relay's settings: one pydantic-settings model, built once in the CLI and passed down.

Every field reads ``CDC_<NAME>`` from the environment (secrets also ``CDC_<NAME>_FILE``,
see ``cdc/service/settings.py``); the CLI turns each into a ``--name`` flag that overrides
it. Identifiers are validated here so nothing later pastes an unchecked name into SQL, and
values that can never work (a bad URL, a backoff whose minimum exceeds its maximum) stop
the process at start.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cdc.core.durations import parse_duration
from cdc.service.settings import (
    DEFAULT_EXCHANGE,
    CdcSettings,
    check_amqp_name,
    check_backoff,
    check_identifier,
    check_table,
)
from cdc.service.urls import check_host

#: The relay's parking queue (the exchange is ``cdc.service.settings.DEFAULT_EXCHANGE``).
DEFAULT_PARKING_QUEUE = "cdc.outbox.parked"

_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")


class RelaySettings(CdcSettings):
    """Configuration of one ``cdc`` process (see README, "Configuration")."""

    slot_name: str = Field("cdc_outbox", description="logical replication slot")
    publication_name: str = Field("cdc_outbox", description="publication of the outbox table")
    outbox_table: str = Field("public.event_outbox", description="outbox table, [schema.]table")
    exchange: str = Field(DEFAULT_EXCHANGE, description="topic exchange to publish to")
    parking_queue: str = Field(DEFAULT_PARKING_QUEUE, description="queue for parked events")
    metrics_port: int = Field(9190, ge=0, le=65535, description="/metrics port, 0 disables")
    metrics_host: str = Field("0.0.0.0", description="/metrics bind address")
    max_in_flight: int = Field(2000, ge=1, le=100_000, description="unconfirmed publish window")
    confirm_timeout: float = Field(30.0, gt=0, description="seconds before re-publishing")
    publish_linger: float = Field(
        0.0, ge=0, le=1.0,
        description="seconds a publish may wait to share its write with later ones (0: none)",
    )
    status_interval: float = Field(10.0, gt=0, le=3600, description="status update period (s)")
    source_timeout: float = Field(
        20.0, gt=0, le=3600, description="silence from PostgreSQL that ends the session (s)"
    )
    checkpoint_interval: float = Field(
        10.0, gt=0, le=3600, description="checkpoint and slot-health check period (s)"
    )
    reconnect_min_delay: float = Field(0.5, gt=0, description="first reconnect backoff (s)")
    reconnect_max_delay: float = Field(30.0, gt=0, description="largest reconnect backoff (s)")
    standby_poll_interval: float = Field(2.0, gt=0, description="standby retry period (s)")
    shutdown_timeout: float = Field(10.0, ge=0, description="drain time on SIGTERM (s)")
    prune_older_than: str = Field(
        "", description="relay's periodic prune: delete published rows older than this (7d)"
    )
    prune_interval: float = Field(3600.0, gt=0, description="seconds between periodic prunes")
    log_format: Literal["text", "json"] = Field("text", description="log output format")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("slot_name")
    @classmethod
    def _check_slot(cls, value: str) -> str:
        if not _SLOT_RE.fullmatch(value):
            raise ValueError("slot names may use only a-z, 0-9 and _, at most 63 characters")
        return value

    @field_validator("publication_name")
    @classmethod
    def _check_publication(cls, value: str) -> str:
        return check_identifier(value)

    @field_validator("outbox_table")
    @classmethod
    def _check_table(cls, value: str) -> str:
        return check_table(value)

    @field_validator("exchange", "parking_queue")
    @classmethod
    def _check_amqp_name(cls, value: str) -> str:
        return check_amqp_name(value)

    @field_validator("prune_older_than")
    @classmethod
    def _check_duration(cls, value: str) -> str:
        if value.strip():
            parse_duration(value)  # raises ValueError with the accepted form
        return value.strip()

    @property
    def prune_after(self) -> float | None:
        """:attr:`prune_older_than` in seconds, ``None`` when the periodic prune is off."""
        return parse_duration(self.prune_older_than) if self.prune_older_than else None

    @field_validator("metrics_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return check_host(value)

    @model_validator(mode="after")
    def _check_backoff(self) -> RelaySettings:
        check_backoff(self.reconnect_min_delay, self.reconnect_max_delay, "reconnect")
        return self

    @property
    def table_schema(self) -> str:
        """Schema part of :attr:`outbox_table`."""
        return self.outbox_table.split(".")[0]

    @property
    def table_name(self) -> str:
        """Table part of :attr:`outbox_table`."""
        return self.outbox_table.split(".")[1]
