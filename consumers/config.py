"""Settings of one worker process: a pydantic-settings model, built once and passed down.

Connection variables are the relay's (``CDC_DATABASE_URL``, ``CDC_AMQP_URL``,
``CDC_EXCHANGE``, ``CDC_OUTBOX_TABLE``) so one environment serves the relay and its workers;
the runtime's own knobs are ``CDC_WORKER_*``. A worker subclasses this model to add its own
fields (``consumers.billing.worker.SETTINGS``, ...).
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_EXCHANGE = "cloudphone.events"


class ConsumerSettings(BaseSettings):
    """Configuration of one ``python -m consumers <worker>`` process."""

    model_config = SettingsConfigDict(env_prefix="CDC_", extra="ignore")

    database_url: SecretStr = Field(description="libpq URL of the database (inbox, effects)")
    amqp_url: SecretStr = Field(description="amqp:// URL of the broker")
    exchange: str = Field(DEFAULT_EXCHANGE, description="topic exchange the events come from")
    outbox_table: str = Field("public.event_outbox", description="where workers write events")
