"""TCP keepalives on the PostgreSQL connections (cdc/source.py): added unless the DSN says."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from cdc.source import with_keepalives


def test_keepalives_are_added_to_a_url_and_a_keyword_dsn():
    for dsn in ("postgresql://u@db:5432/app", "host=db user=u dbname=app"):
        params = conninfo_to_dict(with_keepalives(dsn))
        assert params["keepalives"] == "1"
        assert params["keepalives_idle"] == "10"
        assert params["keepalives_interval"] == "5"
        assert params["keepalives_count"] == "3"
        assert params["tcp_user_timeout"] == "30000"
        assert params["host"] == "db" and params["dbname"] == "app"


def test_values_the_dsn_sets_are_kept():
    params = conninfo_to_dict(with_keepalives("postgresql://db/app?keepalives_idle=60"))
    assert params["keepalives_idle"] == "60"
    assert params["keepalives_interval"] == "5"
