"""A whole relay session (reader, publisher, confirms, watermark) over stand-ins for libpq
and the broker's socket (``bench.micro_relay``): a backlog larger than the window drains."""

from __future__ import annotations

import logging

from bench import micro_relay, micro_route
from cdc.config import RelaySettings

ROWS = 2_500  # more than the default window


def test_a_backlog_larger_than_the_window_drains_and_flushes_to_the_last_commit() -> None:
    assert RelaySettings().max_in_flight < ROWS
    messages = micro_relay.copy_data(ROWS, mix=True)
    log = logging.getLogger("cdc")
    level = log.level
    log.setLevel(logging.ERROR)  # one warning per parked row
    try:
        digest, session = micro_relay.run(messages)
        again, _ = micro_relay.run(messages)
    finally:
        log.setLevel(level)
    parked = len([i for i in range(ROWS) if i % 97 == 5])  # the rows with a NULL payload
    sample = session.publisher._metrics.registry.get_sample_value
    assert session.watermark.in_flight == 0
    last_commit_lsn = micro_route.stream(ROWS, None)[-1][1]
    assert session.watermark.flushed == last_commit_lsn + 48  # that Commit's end_lsn
    assert sample("cdc_events_published_total") == ROWS - parked
    assert sample("cdc_events_parked_total", {"kind": "malformed"}) == parked
    # The same bytes again: nothing in the frames depends on timing or batching.
    assert again == digest
