"""The tests never reconfigure or restart a server they did not start.

scripts/test.sh records the host's PostgreSQL on 127.0.0.1:5432 (``wal_level``,
``max_prepared_transactions``, start time) before the whole run, in
``CDC_TEST_HOST_PG_BEFORE``; after the suite (through containers), the image and the compose
tests, the host's server must be exactly as it was: same settings, not restarted.
"""

from __future__ import annotations

import json
import os

import psycopg
import pytest
from harness.session import SERVICES

pytestmark = pytest.mark.skipif(
    SERVICES.mode != "containers" or not os.environ.get("CDC_TEST_HOST_PG_BEFORE"),
    reason="only meaningful when the run used containers and a host PostgreSQL was recorded",
)

QUERY = """SELECT json_build_object('wal_level', current_setting('wal_level'),
  'max_prepared_transactions', current_setting('max_prepared_transactions'),
  'started', pg_postmaster_start_time())::text"""


def test_host_postgresql_settings_and_uptime_unchanged():
    before = json.loads(os.environ["CDC_TEST_HOST_PG_BEFORE"])
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", connect_timeout=5) as c:
        now = json.loads(c.execute(QUERY).fetchone()[0])
    assert now == before
    assert SERVICES.admin_url.split("@")[1] != "127.0.0.1:5432/postgres"  # not the host's
