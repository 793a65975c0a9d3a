"""The settings both processes share (cdc/service/settings.py, cdc/service/urls.py) and the
refusal rules (cdc/service/refusals.py): URL checks, ``*_FILE`` secrets, secrets refused as
flags, one-line errors, which connection failures are refusals (exit 3) and which are outages
(retried)."""

from __future__ import annotations

import pytest

from cdc.config import RelaySettings
from cdc.errors import ConfigError
from cdc.service.refusals import amqp_refusal, postgres_refusal
from cdc.service.settings import load
from cdc.service.urls import check_host, parse_amqp_url, parse_dsn, url_has_password
from consumers.config import ConsumerSettings
from consumers.notifications.worker import NotificationSettings

pytestmark = pytest.mark.usefixtures("no_cdc_env")

DB_URL = "postgresql://relay@db.internal:5432/cloudphone"
AMQP_URL = "amqp://cdc@rabbit.internal:5672/%2F"
SECRET = "s3cr3t-value"


@pytest.fixture
def urls(monkeypatch):
    monkeypatch.setenv("CDC_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CDC_AMQP_URL", AMQP_URL)


# -- URLs -------------------------------------------------------------------------------------


def test_amqp_url_parts_and_defaults():
    url = parse_amqp_url("amqps://u:p%40ss@broker:5673/prod%2Fa?heartbeat=15&cafile=/ca.pem")
    assert (url.tls, url.host, url.port, url.vhost) == (True, "broker", 5673, "prod/a")
    assert (url.user, url.password, url.heartbeat, url.cafile) == ("u", "p@ss", 15, "/ca.pem")
    plain = parse_amqp_url("amqp://broker")
    assert (plain.port, plain.vhost, plain.user, plain.password) == (5672, "/", "guest", "guest")
    assert plain.heartbeat == 10 and plain.cafile is None
    assert parse_amqp_url("amqps://broker/").port == 5671


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://broker/", "amqp:// or amqps://"),
        ("broker:5672", "amqp:// or amqps://"),
        ("amqp://broker:99999/", "1 to 65535"),
        ("amqp://broker:0/", "1 to 65535"),
        ("amqp://broker:port/", "1 to 65535"),
        ("amqp:///vhost", "no host"),
        ("amqp://broker/?heartbeat=abc", "heartbeat"),
        ("amqp://broker/?heartbeat=-1", "heartbeat"),
        ("amqp://broker/?heartbeat=70000", "heartbeat"),
        ("amqp://broker/?cafile=/ca.pem", "needs an amqps://"),
    ],
)
def test_bad_amqp_urls_say_which_part(url, why):
    with pytest.raises(ValueError, match=why):
        parse_amqp_url(url)


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u@h/db", "host=h dbname=db", "postgresql:///db?host=/tmp", "host=a,b port=1,2"],
)
def test_good_dsns(dsn):
    assert parse_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "why"),
    [
        (f"localhost password={SECRET}", "neither a postgresql:// URL nor"),
        ("host=h port=99999", "1 to 65535"),
        ("postgresql://h:99999/db", "1 to 65535"),
        ("host=h port=abc", "1 to 65535"),
        ("host='unterminated", "neither"),
    ],
)
def test_bad_dsns_are_refused_without_echoing_them(dsn, why):
    with pytest.raises(ValueError, match=why) as info:
        parse_dsn(dsn)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("value", "has"),
    [
        ("postgresql://u:pw@h/db", True),
        ("postgresql://u@h/db", False),
        ("postgresql://u@h/db?password=pw", True),
        ("host=h password=pw", True),
        ("host=h user=u", False),
        ("amqp://u:pw@h/", True),
        ("amqp://u@h/", False),
        ("amqps://h/?cafile=/ca.pem", False),
    ],
)
def test_password_in_a_url_is_found(value, has):
    assert url_has_password(value) is has


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "pod-1.ns"])
def test_bind_hosts(host):
    assert check_host(host) == host


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "1.2.3.4.5", ":::", "bad host", "-x"])
def test_bad_bind_hosts(host):
    with pytest.raises(ValueError):
        check_host(host)


# -- loading: flags, files, one-line errors -----------------------------------------------------


def test_flags_override_the_environment(urls):
    s = load(RelaySettings, {"slot_name": "other", "exchange": None})
    assert s.slot_name == "other" and s.exchange == "cloudphone.events"


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (RelaySettings, "database_url", f"postgresql://u:{SECRET}@h/db"),
        (RelaySettings, "database_url", f"host=h password={SECRET}"),
        (RelaySettings, "amqp_url", f"amqp://u:{SECRET}@h/"),
        (ConsumerSettings, "amqp_url", f"amqps://u:{SECRET}@h/"),
        (NotificationSettings, "webhook_secret", SECRET),
        (NotificationSettings, "smtp_password", SECRET),
    ],
)
def test_a_secret_in_a_flag_is_refused(urls, model, field, value):
    with pytest.raises(ConfigError) as info:
        load(model, {field: value})
    text = str(info.value)
    name = f"CDC_{field.upper()}"
    assert f"--{field.replace('_', '-')}" in text and f"{name}_FILE" in text
    assert SECRET not in text and "\n" not in text


def test_url_flags_without_a_password_are_fine(urls):
    s = load(RelaySettings, {"database_url": "postgresql://u@h/db", "amqp_url": "amqp://h/"})
    assert s.database_url.get_secret_value() == "postgresql://u@h/db"


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_secrets_from_files_lose_one_trailing_newline(monkeypatch, tmp_path, ending):
    db, mq = tmp_path / "db", tmp_path / "mq"
    db.write_text(f"postgresql://u:{SECRET}@h/db{ending}")
    mq.write_text(f"amqp://u:{SECRET}@h/{ending}")
    monkeypatch.setenv("CDC_DATABASE_URL_FILE", str(db))
    monkeypatch.setenv("CDC_AMQP_URL_FILE", str(mq))
    s = load(RelaySettings, {})
    assert s.database_url.get_secret_value() == f"postgresql://u:{SECRET}@h/db"
    assert s.amqp_url.get_secret_value() == f"amqp://u:{SECRET}@h/"
    w = load(ConsumerSettings, {})
    assert w.database_url == s.database_url


def test_every_secret_of_the_notifications_worker_has_a_file(urls, monkeypatch, tmp_path):
    hook, smtp = tmp_path / "hook", tmp_path / "smtp"
    hook.write_text("hook-key\n")
    smtp.write_text("smtp pass with spaces \n")
    monkeypatch.setenv("CDC_WEBHOOK_SECRET_FILE", str(hook))
    monkeypatch.setenv("CDC_SMTP_PASSWORD_FILE", str(smtp))
    s = load(NotificationSettings, {})
    assert s.webhook_secret is not None and s.webhook_secret.get_secret_value() == "hook-key"
    assert s.smtp_password is not None
    assert s.smtp_password.get_secret_value() == "smtp pass with spaces "


def test_only_secrets_have_file_variants(urls, monkeypatch, tmp_path):
    path = tmp_path / "slot"
    path.write_text("from_a_file\n")
    monkeypatch.setenv("CDC_SLOT_NAME_FILE", str(path))
    assert load(RelaySettings, {}).slot_name == "cdc_outbox"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("both", "CDC_AMQP_URL and CDC_AMQP_URL_FILE are both set"),
        ("missing", "CDC_AMQP_URL_FILE: cannot read"),
        ("empty", "CDC_AMQP_URL_FILE:"),
        ("directory", "CDC_AMQP_URL_FILE: cannot read"),
    ],
)
def test_bad_secret_files_are_one_line_errors(urls, monkeypatch, tmp_path, setup, message):
    path = tmp_path / "amqp"
    if setup == "empty":
        path.write_text("\n")
    elif setup == "directory":
        path.mkdir()
    elif setup == "both":
        path.write_text(AMQP_URL)
    if setup != "both":
        monkeypatch.delenv("CDC_AMQP_URL")
    monkeypatch.setenv("CDC_AMQP_URL_FILE", str(path))
    with pytest.raises(ConfigError, match=message) as info:
        load(RelaySettings, {})
    assert "\n" not in str(info.value)


def test_errors_are_one_line_naming_every_variable(monkeypatch):
    monkeypatch.setenv("CDC_AMQP_URL", f"http://u:{SECRET}@h/")
    monkeypatch.setenv("CDC_METRICS_HOST", "999.1.1.1")
    with pytest.raises(ConfigError) as info:
        load(RelaySettings, {})
    text = str(info.value)
    assert "\n" not in text and SECRET not in text
    assert text.startswith("invalid configuration: ")
    for part in (
        "CDC_AMQP_URL: must start with amqp:// or amqps://",
        "CDC_METRICS_HOST: '999.1.1.1' is not an IP address",
    ):
        assert part in text, text


def test_each_command_names_only_the_connection_it_needs(monkeypatch):
    """The URLs are optional in the model; a command that needs one and lacks it gets one
    line naming the variable (and the command), a command that does not need it runs."""
    monkeypatch.setenv("CDC_DATABASE_URL", DB_URL)
    status = load(RelaySettings, {}, needs=("database_url",), user="`cdc status`")
    assert status.amqp_url is None and status.dsn() == DB_URL
    with pytest.raises(ConfigError) as info:
        load(RelaySettings, {}, needs=("database_url", "amqp_url"), user="`cdc relay`")
    assert str(info.value) == (
        "invalid configuration: CDC_AMQP_URL: is not set (set CDC_AMQP_URL or "
        "CDC_AMQP_URL_FILE): `cdc relay` needs it"
    )
    with pytest.raises(ConfigError, match="CDC_AMQP_URL: is not set"):
        status.broker_url()  # a code path that forgot to declare the need still says which
    monkeypatch.delenv("CDC_DATABASE_URL")
    monkeypatch.setenv("CDC_AMQP_URL", AMQP_URL)
    dlq = load(ConsumerSettings, {}, needs=("amqp_url",))
    assert dlq.database_url is None and dlq.broker_url() == AMQP_URL


def test_backoff_minimum_above_maximum_is_refused(urls):
    with pytest.raises(ConfigError, match=r"CDC_RECONNECT_MIN_DELAY \(5\) is larger"):
        load(RelaySettings, {"reconnect_min_delay": "5", "reconnect_max_delay": "1"})
    with pytest.raises(ConfigError, match=r"CDC_WORKER_RECONNECT_MIN_DELAY \(5\) is larger"):
        load(ConsumerSettings, {"worker_reconnect_min_delay": 5, "worker_reconnect_max_delay": 1})
    assert load(RelaySettings, {"reconnect_min_delay": 2, "reconnect_max_delay": 2})


def test_a_readable_cafile_is_accepted(urls, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load(RelaySettings, {"amqp_url": f"amqps://h/?cafile={ca}"})
    assert parse_amqp_url(s.amqp_url.get_secret_value()).cafile == str(ca)


# -- refusals (exit 3) and outages (retried) --------------------------------------------------

FATAL = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '


@pytest.mark.parametrize(
    ("message", "state"),
    [
        (FATAL + 'password authentication failed for user "relay"', "28P01"),
        (FATAL + 'database "cloudphone" does not exist', "3D000"),
        (FATAL + 'role "relay" does not exist', "28000"),
        (FATAL + 'no pg_hba.conf entry for replication connection from host "10.0.0.1"', "28000"),
        (FATAL + 'permission denied for database "cloudphone"', "42501"),
        (FATAL + 'role "relay" is not permitted to log in', "42501"),
        (FATAL + "must be superuser or replication role to start walsender", "42501"),
        ("connection failed: fe_sendauth: no password supplied", "28P01"),
        ("connection failed: SSL error: certificate verify failed", "TLS"),
    ],
)
def test_postgres_refusals(message, state):
    hint = postgres_refusal(message)
    assert hint is not None and hint.startswith(f"{state}: "), hint


@pytest.mark.parametrize(
    "message",
    [
        FATAL + "the database system is starting up",
        FATAL + "the database system is shutting down",
        FATAL + "sorry, too many clients already",
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        "Connection refused",
        "connection failed: server closed the connection unexpectedly",
        "connection timeout expired",
    ],
)
def test_postgres_outages_are_not_refusals(message):
    assert postgres_refusal(message) is None


def test_amqp_refusals_by_reply_code():
    assert "password" in (amqp_refusal(403) or "")
    assert "vhost" in (amqp_refusal(530) or "")
    for transient in (320, 501, 504, 541, 0):  # forced close, frame error, channel error...
        assert amqp_refusal(transient) is None


def test_values_the_environment_cannot_parse_are_one_line_errors(urls, monkeypatch):
    from consumers.billing.worker import BillingSettings

    monkeypatch.setenv("CDC_NOTIFICATIONS_DEFAULT_CHANNELS", "not json")
    with pytest.raises(ConfigError, match="notifications_default_channels"):
        load(NotificationSettings, {})
    monkeypatch.setenv("CDC_BILLING_PLAN_RATES", '{"pro": "lots"}')
    with pytest.raises(ConfigError, match=r"CDC_BILLING_PLAN_RATES \[pro\]: ") as info:
        load(BillingSettings, {})
    assert "\n" not in str(info.value)
