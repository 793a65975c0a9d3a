"""TCP keepalives on the PostgreSQL connections (cdc/shell/source.py) and the look at a silent
walsender (cdc/shell/slot.py): is it busy decoding, or waiting on a dead connection?"""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from cdc.shell.slot import busy_with
from cdc.shell.source import with_keepalives


def test_keepalives_are_added_to_a_url_and_a_keyword_dsn():
    for dsn in ("postgresql://u@db:5432/app", "host=db user=u dbname=app"):
        params = conninfo_to_dict(with_keepalives(dsn))
        assert params["keepalives"] == "1"
        assert params["keepalives_idle"] == "10"
        assert params["keepalives_interval"] == "5"
        assert params["keepalives_count"] == "3"
        assert params["tcp_user_timeout"] == "30000"
        assert params["connect_timeout"] == "10"
        assert params["host"] == "db" and params["dbname"] == "app"


def test_values_the_dsn_sets_are_kept():
    params = conninfo_to_dict(with_keepalives("postgresql://db/app?keepalives_idle=60"))
    assert params["keepalives_idle"] == "60"
    assert params["keepalives_interval"] == "5"


def test_a_walsender_waiting_on_its_client_or_for_wal_is_not_busy():
    # WalSenderWaitForWal is PostgreSQL 17+'s name of WalSenderWaitForWAL.
    for event in (
        "WalSenderWaitForWAL", "WalSenderWaitForWal", "WalSenderWriteData", "WalSenderMain",
        "ClientRead", "ClientWrite",
    ):
        assert busy_with("active", event) is None
    assert busy_with(None, None) is None  # gone


def test_a_walsender_decoding_is_busy():
    assert busy_with("active", None) == "running"
    assert busy_with("active", "ReorderBufferRead") == "ReorderBufferRead"
    assert busy_with("active", "WALRead") == "WALRead"
