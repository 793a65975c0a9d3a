"""Wire formats: bytes <-> frozen dataclasses (pgoutput, replication, AMQP frames); pure, no I/O."""
