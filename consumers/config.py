"""Settings of one worker process: a pydantic-settings model, built once and passed down.

Connection variables are the relay's (``CDC_DATABASE_URL``, ``CDC_AMQP_URL``,
``CDC_EXCHANGE``, ``CDC_OUTBOX_TABLE``; the base ``cdc.service.settings.CdcSettings`` checks
the URLs and reads ``*_FILE`` secrets) so one environment serves the relay and its workers;
the runtime's own knobs are ``CDC_WORKER_*``. A worker subclasses this model to add its own
fields (``consumers.billing.worker.SETTINGS``, ...). Every field becomes a ``--flag`` of
``python -m consumers <worker>`` that overrides the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from cdc.service.cli import add_setting_flags
from cdc.service.settings import (
    DEFAULT_EXCHANGE,
    CdcSettings,
    check_amqp_name,
    check_backoff,
    check_table,
)
from cdc.service.urls import check_host

DEFAULT_INBOX_TABLE = "public.consumer_inbox"

#: The connection strings: a worker needs both, ``dlq`` only the broker.
DB, AMQP = "database_url", "amqp_url"



def parse_delays(value: object) -> object:
    """``"5,10,20"`` (the environment's form) -> ``(5.0, 10.0, 20.0)``; lists pass through."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        return tuple(float(part) for part in text.split(",") if part.strip())
    return value


class ConsumerSettings(CdcSettings):
    """Configuration of one ``python -m consumers <worker>`` process."""

    exchange: str = Field(DEFAULT_EXCHANGE, description="topic exchange the events come from")
    outbox_table: str = Field("public.event_outbox", description="where workers write events")

    # -- the runtime's knobs (CDC_WORKER_*) ------------------------------------------------
    worker_prefetch: int = Field(
        256, ge=1, le=65535, description="unacked messages the broker may push to this replica"
    )
    worker_batch_size: int = Field(
        100, ge=1, le=10_000, description="messages handled in one PostgreSQL transaction"
    )
    worker_batch_linger_max: float = Field(
        # 10 ms, not 50: at a paced 500 events/s through the whole pipeline p99 commit -> usage
        # record was 0.67x (median of 28 alternated pairs) and under 100 ms in 18 of 28 levels
        # against 6; webhooks under 150 ms in 10 of 28 either way; no drain rate or CPU lost.
        0.01,
        ge=0,
        le=10,
        description="most seconds a short batch waits for more messages (it waits about as "
        "long as the previous batch took, not at all after an idle spell; 0: never)",
    )
    worker_retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (5.0, 10.0, 20.0),
        description="seconds before retry 1, 2, 3... (comma-separated; the last one repeats)",
    )
    worker_max_attempts: int = Field(
        4, ge=1, le=100, description="attempts before a failing message is parked (1 + retries)"
    )
    worker_queue_type: Literal["quorum", "classic"] = Field(
        "quorum", description="x-queue-type of the worker, retry and parking queues"
    )
    worker_queue_prefix: str = Field(
        "", description="prepended to every queue/exchange name of the worker (e.g. 'staging.')"
    )
    worker_inbox_table: str = Field(
        DEFAULT_INBOX_TABLE, description="inbox table (consumer, message_id), [schema.]table"
    )
    worker_shutdown_timeout: float = Field(
        10.0, ge=0, description="seconds to finish and ack in-flight messages on SIGTERM"
    )
    worker_metrics_port: int = Field(
        9191, ge=0, le=65535, description="/metrics and /healthz port; 0 disables (one per host)"
    )
    worker_metrics_host: str = Field("0.0.0.0", description="/metrics bind address")
    worker_parked_poll_interval: float = Field(
        5.0, gt=0, description="seconds between reads of the parking queue depth (metric)"
    )
    worker_confirm_timeout: float = Field(
        30.0, gt=0, description="seconds to wait for a broker confirm of a retry/park publish"
    )
    worker_reconnect_min_delay: float = Field(
        0.5, gt=0, description="first reconnect backoff in seconds (full jitter)"
    )
    worker_reconnect_max_delay: float = Field(
        30.0, gt=0, description="largest reconnect backoff in seconds"
    )
    worker_log_format: Literal["text", "json"] = Field("text", description="log output format")
    worker_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level"
    )

    @field_validator("worker_retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        try:
            return parse_delays(value)
        except ValueError as exc:
            raise ValueError("must be seconds separated by commas, e.g. 5,10,20") from exc

    @field_validator("worker_retry_delays")
    @classmethod
    def _check_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one delay, e.g. 5,10,20")
        if any(d <= 0 or d > 86_400 for d in value):
            raise ValueError("each delay must be > 0 and at most 86400 seconds")
        return value

    @field_validator("outbox_table", "worker_inbox_table")
    @classmethod
    def _check_table(cls, value: str) -> str:
        return check_table(value)

    @field_validator("exchange")
    @classmethod
    def _check_exchange(cls, value: str) -> str:
        return check_amqp_name(value)

    @field_validator("worker_queue_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return check_amqp_name(value) if value else value

    @field_validator("worker_metrics_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return check_host(value)

    @model_validator(mode="after")
    def _check_backoff(self) -> ConsumerSettings:
        check_backoff(
            self.worker_reconnect_min_delay, self.worker_reconnect_max_delay, "worker_reconnect"
        )
        return self


def add_worker_flags(
    parser: argparse.ArgumentParser | Any,
    model: type[ConsumerSettings],
    fields: Sequence[str] | None = None,
    required: Sequence[str] = (DB, AMQP),
) -> None:
    """One ``--name`` flag per settings field (``CDC_NAME`` is the variable it overrides);
    the runtime's ``worker_*`` fields also answer to the short form (``--prefetch``)."""
    add_setting_flags(parser, model, fields, required, short_prefix="worker_")
