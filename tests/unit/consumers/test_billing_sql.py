"""Billing's DDL comes from the package's ``.sql`` files, with the schema quoted, not pasted."""

from __future__ import annotations

from importlib import resources

import pytest

from consumers.billing.store import schema_ddl
from consumers.errors import ConfigError


def test_every_sql_file_of_the_package_is_applied_with_the_schema_quoted():
    ddl = schema_ddl("Bill_2", lock_timeout=0.25)
    files = sorted(
        p.name for p in (resources.files("consumers.billing") / "sql").iterdir()
        if p.name.endswith(".sql")
    )
    assert len(ddl) == 1 + len(files)  # CREATE SCHEMA, then one statement or script per file
    assert "nspname = 'Bill_2'" in ddl[0] and 'CREATE SCHEMA "Bill_2"' in ddl[0]
    text = "\n".join(ddl)
    for function in ("billing_state", "billing_state_many", "billing_write"):
        assert f'CREATE OR REPLACE FUNCTION "Bill_2".{function}(' in text
    assert 'CREATE TABLE IF NOT EXISTS "Bill_2".balance_alerts' in text
    assert text.count("SET lock_timeout = '250ms'") == 3
    assert "{" not in text and "}" not in text  # no placeholder left over


@pytest.mark.parametrize("schema", ["bill; DROP TABLE x", 'a"b', "1bill", ""])
def test_a_schema_that_is_not_a_plain_name_is_a_config_error(schema):
    with pytest.raises(ConfigError, match="CDC_BILLING_SCHEMA"):
        schema_ddl(schema)
