"""outbox-cdc: stream transactional-outbox INSERTs from PostgreSQL to RabbitMQ, confirm-gated."""

__version__ = "0.1.0"
