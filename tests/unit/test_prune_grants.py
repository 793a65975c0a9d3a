"""The relay's role gets DELETE on the outbox table only when it prunes it itself."""

from __future__ import annotations

from cdc.config import RelaySettings
from cdc.shell.privileges import outbox_privileges, relay_grants

URLS = {"database_url": "postgresql://u@db/app", "amqp_url": "amqp://u:p@mq/"}


def test_delete_is_granted_only_with_the_periodic_prune():
    plain = RelaySettings(**URLS)
    pruning = RelaySettings(**URLS, prune_older_than="7d")
    assert outbox_privileges(plain) == ("SELECT",)
    assert outbox_privileges(pruning) == ("SELECT", "DELETE")
    table_grant = relay_grants(pruning, "app", "cdc_relay")[2].as_string(None)
    assert table_grant == 'GRANT SELECT, DELETE ON TABLE "public"."event_outbox" TO "cdc_relay"'
    assert "DELETE" not in relay_grants(plain, "app", "cdc_relay")[2].as_string(None)
