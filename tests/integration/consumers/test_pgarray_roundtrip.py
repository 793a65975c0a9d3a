"""The ``text[]`` literals the workers send their id lists as, read back by PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from harness.session import db_url

from consumers.runtime.pgarray import text_array

AWKWARD = [
    "0b7d1c4e-3f0a-5a8e-9b61-2d4c8f6e1a37",
    "",
    "NULL",
    "null",
    "{x,y}",
    " lead and trail ",
    'say "hi"',
    "back\\slash",
    '\\"',
    "a,b",
    "é ü 日本",
    "tab\there\nnewline",
]


@pytest.mark.parametrize("values", [[], AWKWARD, AWKWARD[:1], ["plain"] * 3])
def test_postgresql_reads_back_every_element_unchanged(
    pg_session_db: str, values: list[str]
) -> None:
    with psycopg.connect(db_url(pg_session_db), autocommit=True) as conn:
        row = conn.execute("SELECT %s::text[]", (text_array(values),)).fetchone()
        assert row is not None and row[0] == values
        # and as the workers use it: membership through = ANY
        found = conn.execute(
            "SELECT v FROM unnest(%s::text[]) v WHERE v = ANY(%s::text[])",
            (text_array(values), text_array(values[:2])),
        ).fetchall()
        assert [v for (v,) in found] == [v for v in values if v in values[:2]]
