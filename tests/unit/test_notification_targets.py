"""Which webhook targets and email recipients are allowed (pure rules)."""

from __future__ import annotations

import pytest

from consumers.errors import PermanentError
from consumers.notifications.targets import (
    TargetPolicy,
    checked_address,
    email_recipient,
    parse_networks,
    webhook_target,
)

STRICT = TargetPolicy()
HTTP_OK = TargetPolicy(allow_http=True)


def test_https_url_is_split_for_the_connection():
    t = webhook_target("https://hooks.example.com/in/abc?token=s3cret", STRICT)
    assert (t.scheme, t.host, t.port, t.path) == (
        "https",
        "hooks.example.com",
        443,
        "/in/abc?token=s3cret",
    )
    assert t.where() == "https://hooks.example.com:443"
    assert (
        webhook_target("HTTPS://[2001:db8::1]:8443", STRICT).where() == "https://[2001:db8::1]:8443"
    )


@pytest.mark.parametrize(
    ("url", "policy", "words"),
    [
        ("http://hooks.example.com/x", STRICT, ["plain http", "CDC_WEBHOOK_ALLOW_HTTP"]),
        ("ftp://hooks.example.com/x", HTTP_OK, ["scheme 'ftp'"]),
        ("file:///etc/passwd", HTTP_OK, ["scheme 'file'"]),
        ("gopher://127.0.0.1:6379/_x", HTTP_OK, ["scheme 'gopher'"]),
        ("https:///nohost", STRICT, ["no host"]),
        ("https://user:pw@hooks.example.com/", STRICT, ["credentials"]),
        ("https://hooks.example.com:99999/", STRICT, ["not a valid URL"]),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url, policy, words):
    with pytest.raises(PermanentError) as err:
        webhook_target(url, policy)
    for word in words:
        assert word in str(err.value)
    assert "pw" not in str(err.value) and "_x" not in str(err.value)


def test_plain_http_is_allowed_when_configured():
    assert webhook_target("http://hooks.example.com", HTTP_OK).port == 80


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged by its IPv4 address
        ("240.0.0.1", "reserved"),
    ],
)
def test_internal_addresses_are_refused(address, why):
    target = webhook_target("https://hooks.example.com/x", STRICT)
    with pytest.raises(PermanentError) as err:
        checked_address(target, [address], STRICT)
    assert why in str(err.value)
    assert "CDC_WEBHOOK_ALLOWED_NETWORKS" in str(err.value)


def test_public_addresses_pass_and_the_first_is_used():
    target = webhook_target("https://hooks.example.com/x", STRICT)
    assert checked_address(target, ["93.184.216.34", "2606:4700::1111"], STRICT) == "93.184.216.34"


def test_one_internal_address_in_the_answer_refuses_the_target():
    target = webhook_target("https://hooks.example.com/x", STRICT)
    with pytest.raises(PermanentError, match=r"10\.0\.0\.5"):
        checked_address(target, ["93.184.216.34", "10.0.0.5"], STRICT)
    with pytest.raises(PermanentError, match="no address"):
        checked_address(target, [], STRICT)


def test_the_allow_list_admits_exactly_its_networks():
    policy = TargetPolicy(
        allow_http=True, allowed_networks=parse_networks(["127.0.0.1/32", "10.20.0.0/16"])
    )
    target = webhook_target("http://receiver.internal/x", policy)
    assert checked_address(target, ["127.0.0.1"], policy) == "127.0.0.1"
    assert checked_address(target, ["10.20.3.4"], policy) == "10.20.3.4"
    for other in ("127.0.0.2", "10.21.0.1", "169.254.169.254"):
        with pytest.raises(PermanentError):
            checked_address(target, [other], policy)
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])


@pytest.mark.parametrize(
    "address",
    ["a@b.test", "first.last+tag@mail.example.co.uk"],
)
def test_plain_email_addresses_pass(address):
    assert email_recipient(address) == address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "nobody",
        "a@b",
        "a@b.test, c@d.test",
        "a@b.test\r\nBcc: c@d.test",
        "Eve <e@x.test>",
        "a b@c.test",
    ],
)
def test_anything_but_one_address_is_refused(address):
    with pytest.raises(PermanentError, match="not one address"):
        email_recipient(address)


def _settings(**kw):
    from consumers.notifications.worker import NotificationSettings

    return NotificationSettings(
        database_url="postgresql://u@h/db", amqp_url="amqp://g:g@h/", **kw
    )


def test_a_configured_webhook_url_that_breaks_the_rules_stops_the_worker():
    from consumers.errors import ConfigError
    from consumers.notifications.worker import build

    with pytest.raises(ConfigError, match=r"CDC_WEBHOOK_URL: .*scheme 'ftp'"):
        build(_settings(webhook_url="ftp://hooks.example.com/x"))
    with pytest.raises(ConfigError, match="plain http"):
        build(_settings(webhook_url="http://hooks.example.com/x"))
    assert build(_settings(webhook_url="http://h.example.com/x", webhook_allow_http=True))


def test_allowed_networks_are_parsed_from_a_comma_separated_variable():
    from pydantic import ValidationError

    got = _settings(webhook_allowed_networks="127.0.0.1/32, 10.20.0.0/16")
    assert got.webhook_allowed_networks == ("127.0.0.1/32", "10.20.0.0/16")
    with pytest.raises(ValidationError, match="'nope' is not an IP network"):
        _settings(webhook_allowed_networks="10.0.0.0/8,nope")
