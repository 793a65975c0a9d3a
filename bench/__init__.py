"""Benchmark harness of outbox-cdc (``python -m bench``; see docs/benchmarks.md).

It drives the installed relay as a black box (``cdc setup`` / ``cdc relay``, ``CDC_*``
variables, ``/metrics``, the published messages) against the local PostgreSQL and RabbitMQ.
Not part of ``make test``.
"""
