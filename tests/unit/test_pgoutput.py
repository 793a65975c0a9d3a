"""The pgoutput decoder (cdc/wire/pgoutput.py) against real server bytes and a reference encoder.

The fixtures in tests/fixtures/pgoutput/ were captured from PostgreSQL 15 by
tests/fixtures/capture_pgoutput.py; no database is needed here. OIDs, xids, LSNs and times
change with every capture, so the checks relate messages to each other (an Insert names
its Relation's oid, a Commit Prepared the gid of its Prepare) instead of pinning them.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
import typing
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.errors import ProtocolError
from cdc.wire import pgoutput as pg
from cdc.wire.pgoutput import UNCHANGED_TOAST, decode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pgoutput"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

CLASS_OF_TAG: dict[bytes, type] = {
    b"B": pg.Begin, b"C": pg.Commit, b"O": pg.Origin, b"R": pg.Relation,
    b"Y": pg.TypeMessage, b"I": pg.Insert, b"U": pg.Update, b"D": pg.Delete,
    b"T": pg.Truncate, b"M": pg.LogicalMessage, b"S": pg.StreamStart, b"E": pg.StreamStop,
    b"c": pg.StreamCommit, b"A": pg.StreamAbort, b"b": pg.BeginPrepare, b"P": pg.Prepare,
    b"K": pg.CommitPrepared, b"r": pg.RollbackPrepared, b"p": pg.StreamPrepare,
}  # fmt: skip
XID_CLASSES = (pg.Relation, pg.TypeMessage, pg.Insert, pg.Update, pg.Delete, pg.Truncate,
               pg.LogicalMessage)  # fmt: skip


class Fixture(typing.NamedTuple):
    file: str
    name: str
    data: bytes
    in_stream: bool


@cache
def fixtures() -> dict[str, Fixture]:
    found: dict[str, Fixture] = {}
    for path in sorted(FIXTURES.glob("v*.json")):
        for entry in json.loads(path.read_text()):
            assert entry["name"] not in found, f"duplicate fixture name {entry['name']}"
            found[entry["name"]] = Fixture(
                path.stem, entry["name"], bytes.fromhex(entry["hex"]), entry["in_stream"]
            )
    return found


def msg(name: str) -> typing.Any:
    """The decoded fixture ``name`` (typed Any: each check knows what it looks at)."""
    fixture = fixtures()[name]
    return decode(fixture.data, in_stream=fixture.in_stream)


FIXTURE_NAMES = sorted(fixtures())


def test_fixtures_cover_every_message_type_and_stay_small():
    tags = {fixture.data[:1] for fixture in fixtures().values()}
    # Only the v4 parallel Stream Abort is missing from PostgreSQL 15; built below instead.
    assert tags == set(CLASS_OF_TAG)
    assert {f.file for f in fixtures().values()} == {"v1", "v2", "v3"}
    assert sum(p.stat().st_size for p in FIXTURES.glob("*.json")) < 200_000


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_decodes_to_its_class(name):
    fixture = fixtures()[name]
    result = decode(fixture.data, in_stream=fixture.in_stream)
    assert type(result) is CLASS_OF_TAG[fixture.data[:1]]
    assert isinstance(result, typing.get_args(pg.Message))
    if isinstance(result, XID_CLASSES):
        # The leading xid exists exactly inside a stream block.
        assert (result.xid is not None) == fixture.in_stream
    for field in result.__slots__:
        value = getattr(result, field)
        if isinstance(value, datetime):
            assert value.tzinfo is UTC
            assert value.year >= 2024  # captured recently, so the epoch math is right
    # bytearray and memoryview give the same answer as bytes.
    assert decode(bytearray(fixture.data), in_stream=fixture.in_stream) == result
    assert decode(memoryview(fixture.data), in_stream=fixture.in_stream) == result


# -- field checks per captured scenario -----------------------------------------------------


def check_insert() -> None:
    begin, rel, ins, commit = map(
        msg, ("insert/begin", "insert/relation", "insert/insert", "insert/commit")
    )
    assert (rel.namespace, rel.name, rel.replica_identity) == ("public", "items", "d")
    assert [(c.name, c.type_oid) for c in rel.columns] == [
        ("id", 2950), ("name", 25), ("attrs", 3802), ("created_at", 1184), ("qty", 23),
        ("note", 25),
    ]  # fmt: skip
    assert [c.is_key for c in rel.columns] == [True] + [False] * 5
    assert {c.type_modifier for c in rel.columns} == {-1}
    assert ins.relation_oid == rel.oid
    assert ins.new == (
        b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b"widget", b'{"color": "red", "sizes": [1, 2]}',
        b"2024-05-01 12:34:56.789+00", b"42", None,
    )  # fmt: skip
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time == commit.commit_time
    assert begin.xid > 0 and commit.flags == 0


def check_update_full() -> None:
    rel = msg("update_full/relation")
    assert rel.replica_identity == "f" and all(c.is_key for c in rel.columns)
    assert [(c.name, c.type_oid) for c in rel.columns] == [("id", 23), ("val", 25)]
    update, delete = msg("update_full/update"), msg("update_full/delete")
    assert update == pg.Update(None, rel.oid, (b"1", b"before"), None, (b"1", b"after"))
    assert delete == pg.Delete(None, rel.oid, (b"1", b"after"), None)
    assert msg("update_full/begin_2").xid + 1 == msg("update_full/begin_3").xid


def check_update_key() -> None:
    rel, update, delete = (msg(f"update_key/{k}") for k in ("relation", "update", "delete"))
    assert update.relation_oid == delete.relation_oid == rel.oid
    assert update.old is None
    assert update.key == (b"c0eebc99-9c0b-4ef8-bb6d-6bb9bd380a33",) + (None,) * 5
    assert update.new[0] == b"b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a22"
    assert update.new[4] == b"43"
    assert delete.old is None
    assert delete.key == (b"b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a22",) + (None,) * 5


def check_truncate() -> None:
    parent, child = msg("truncate/relation_2"), msg("truncate/relation_3")
    assert (parent.name, child.name) == ("parent", "child")
    truncate = msg("truncate/truncate")
    assert truncate.relation_oids == (parent.oid, child.oid)
    assert truncate.options == 3 and truncate.cascade and truncate.restart_identity


def check_message() -> None:
    begin, tx_message, plain = map(msg, ("message/begin", "message/message", "message/message_2"))
    assert tx_message.transactional and tx_message.flags == 1
    assert (tx_message.prefix, tx_message.content) == ("outbox", b"tx-payload")
    assert tx_message.lsn <= begin.final_lsn
    assert not plain.transactional
    assert (plain.prefix, plain.content) == ("heartbeat", b"\x00\xff")
    assert plain.lsn > begin.final_lsn


def check_type() -> None:
    type_message, rel = msg("type/type"), msg("type/relation")
    assert (type_message.namespace, type_message.name) == ("public", "mood")
    assert [c.type_oid for c in rel.columns] == [23, type_message.oid]
    assert msg("type/insert").new == (b"1", b"happy")


def check_origin() -> None:
    assert msg("origin/origin") == pg.Origin(0xABCDEF, "pgoutput_capture_origin")
    assert msg("origin/insert").new == (b"3", b"o")


def check_toast() -> None:
    rel, update = msg("toast/relation"), msg("toast/update")
    assert [c.name for c in rel.columns] == ["id", "counter", "big"]
    assert update.new == (b"1", b"1", UNCHANGED_TOAST)
    assert update.new[2] is UNCHANGED_TOAST
    assert update.old is None and update.key is None


def check_binary() -> None:
    assert msg("binary/insert").new == (
        pg.BinaryValue(struct.pack(">i", 4)),
        pg.BinaryValue(b"bin"),
    )


def check_stream_commit() -> None:
    start = msg("stream_commit/stream_start")
    assert start.first_segment
    assert not msg("stream_commit/stream_start_2").first_segment
    assert msg("stream_commit/stream_stop") == pg.StreamStop()
    streamed = msg("stream_commit/streamed_message")
    assert (streamed.xid, streamed.prefix, streamed.content) == (start.xid, "outbox", b"streamed")
    assert streamed.transactional
    rel = msg("stream_commit/streamed_relation")
    assert (rel.xid, rel.name) == (start.xid, "big")
    for index, suffix in enumerate(["", "_2", "_3"], start=1):
        insert = msg(f"stream_commit/streamed_insert{suffix}")
        assert insert == pg.Insert(start.xid, rel.oid, (str(index).encode(), b"x" * 200))
    commit = msg("stream_commit/stream_commit")
    assert commit.xid == start.xid and commit.flags == 0
    assert commit.commit_lsn < commit.end_lsn


def check_stream_abort() -> None:
    start = msg("stream_abort/stream_start")
    assert msg("stream_abort/stream_abort") == pg.StreamAbort(start.xid, start.xid, None, None)
    sub_start = msg("stream_subabort/stream_start")
    abort = msg("stream_subabort/stream_abort")
    assert abort.xid == sub_start.xid != abort.subxid
    assert (abort.abort_lsn, abort.abort_time) == (None, None)
    assert msg("stream_subabort/stream_commit").xid == sub_start.xid


def check_two_phase() -> None:
    begin, prepare = msg("commit_prepared/begin_prepare"), msg("commit_prepared/prepare")
    commit = msg("commit_prepared/commit_prepared")
    assert begin.gid == prepare.gid == commit.gid == "gid-commit"
    assert begin.xid == prepare.xid == commit.xid
    assert (begin.prepare_lsn, begin.end_lsn) == (prepare.prepare_lsn, prepare.end_lsn)
    assert begin.prepare_time == prepare.prepare_time <= commit.commit_time
    assert prepare.end_lsn <= commit.commit_lsn < commit.end_lsn
    prepare = msg("rollback_prepared/prepare")
    rollback = msg("rollback_prepared/rollback_prepared")
    assert prepare.gid == rollback.gid == "gid-rollback" and prepare.xid == rollback.xid
    assert rollback.prepare_end_lsn == prepare.end_lsn < rollback.rollback_end_lsn
    assert rollback.prepare_time == prepare.prepare_time <= rollback.rollback_time


def check_stream_prepare() -> None:
    start = msg("stream_prepare/stream_start")
    prepare, commit = msg("stream_prepare/stream_prepare"), msg("stream_prepare/commit_prepared")
    assert prepare.gid == commit.gid == "gid-stream"
    assert prepare.xid == commit.xid == start.xid
    assert prepare.prepare_lsn < prepare.end_lsn <= commit.commit_lsn
    assert msg("stream_prepare/streamed_insert").new[0] == b"7001"


CHECKS: list[Callable[[], None]] = [
    check_insert, check_update_full, check_update_key, check_truncate, check_message,
    check_type, check_origin, check_toast, check_binary, check_stream_commit,
    check_stream_abort, check_two_phase, check_stream_prepare,
]  # fmt: skip


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_captured_fields(check):
    check()


# -- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_proper_prefix_is_a_truncation_error(name):
    fixture = fixtures()[name]
    for cut in range(len(fixture.data)):
        with pytest.raises(ProtocolError) as info:
            decode(fixture.data[:cut], in_stream=fixture.in_stream, lsn=0x1_0000_0010)
        assert 0 <= info.value.offset <= cut
        assert info.value.lsn == 0x1_0000_0010
        assert "1/10" in str(info.value)
        if cut:
            assert "truncated" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_trailing_bytes_are_an_error(name):
    fixture = fixtures()[name]
    for garbage in (b"\x00", b"garbage!"):
        with pytest.raises(ProtocolError) as info:
            decode(fixture.data + garbage, in_stream=fixture.in_stream)
        if fixture.data[:1] != b"A":  # a longer Stream Abort reads as the v4 form instead
            assert f"{len(garbage)} trailing byte(s)" in str(info.value)
            assert info.value.offset == len(fixture.data)


def test_unknown_tag_and_empty_message():
    with pytest.raises(ProtocolError, match=r"unknown message tag b'Z'.*byte offset 0") as info:
        decode(b"Z\x00\x00", lsn=0x16_B374D848)
    assert info.value.offset == 0
    assert "16/B374D848" in str(info.value)
    with pytest.raises(ProtocolError, match="empty message") as info:
        decode(b"")
    assert info.value.offset == 0


def test_truncation_names_the_missing_field():
    data = fixtures()["insert/begin"].data
    with pytest.raises(ProtocolError, match="expected Int64 commit_time") as info:
        decode(data[:12])
    assert info.value.offset == 9


def insert_bytes(*columns: bytes) -> bytes:
    return b"I" + struct.pack(">IcH", 42, b"N", len(columns)) + b"".join(columns)


def test_unknown_tuple_column_kind():
    data = insert_bytes(b"n", b"x")
    with pytest.raises(ProtocolError, match=r"unknown kind b'x' of column 1") as info:
        decode(data)
    assert info.value.offset == len(data) - 1


def test_negative_and_overlong_value_lengths():
    with pytest.raises(ProtocolError, match="negative length -1") as info:
        decode(insert_bytes(b"t" + struct.pack(">i", -1)))
    assert info.value.offset == 9
    with pytest.raises(ProtocolError, match="expected 5 bytes, 2 left"):
        decode(insert_bytes(b"t" + struct.pack(">i", 5) + b"ab"))


def test_missing_string_terminator_and_bad_utf8():
    relation = fixtures()["insert/relation"].data
    with pytest.raises(ProtocolError, match="namespace: expected a NUL-terminated") as info:
        decode(relation[:5] + b"public")
    assert info.value.offset == 5
    with pytest.raises(ProtocolError, match="invalid UTF-8") as info:
        decode(relation[:5] + b"pub\xfflic" + relation[12:])
    assert info.value.offset == 8


def test_wrong_submessages():
    update = fixtures()["update_full/update"].data
    with pytest.raises(ProtocolError, match=r"Update: unexpected submessage b'X'") as info:
        decode(update[:5] + b"X" + update[6:])
    assert info.value.offset == 5
    delete = fixtures()["update_full/delete"].data
    with pytest.raises(ProtocolError, match=r"Delete: unexpected submessage b'N'"):
        decode(delete[:5] + b"N" + delete[6:])
    old_len = update.index(b"N", 6)  # 'O' tuple, then the 'N' marker
    with pytest.raises(ProtocolError, match="expected 'N' before the new tuple") as info:
        decode(update[:old_len] + b"Q" + update[old_len + 1 :])
    assert info.value.offset == old_len


def test_timestamp_out_of_range():
    infinity = b"B" + struct.pack(">QqI", 1, 2**63 - 1, 7)  # PostgreSQL's 'infinity'
    with pytest.raises(ProtocolError, match=r"commit_time .* out of range") as info:
        decode(infinity)
    assert info.value.offset == 9


def test_v4_parallel_stream_abort_by_length():
    micros = 789_000_123_456
    data = b"A" + struct.pack(">IIQq", 700, 701, 0x16_B374D848, micros)
    abort_time = EPOCH + timedelta(microseconds=micros)
    assert decode(data) == pg.StreamAbort(700, 701, 0x16_B374D848, abort_time)
    assert decode(data[:9]) == pg.StreamAbort(700, 701, None, None)  # the v1-3 form
    for cut in [*range(1, 9), *range(10, len(data))]:
        with pytest.raises(ProtocolError, match="truncated Stream Abort"):
            decode(data[:cut])


@pytest.mark.parametrize(
    ("options", "cascade", "restart_identity"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate_options(options, cascade, restart_identity):
    truncate = decode(b"T" + struct.pack(">IBI", 1, options, 16400))
    assert truncate == pg.Truncate(None, options, (16400,))
    assert (truncate.cascade, truncate.restart_identity) == (cascade, restart_identity)


def test_flag_properties():
    assert pg.Column(1, "id", 23, -1).is_key and not pg.Column(0, "id", 23, -1).is_key
    assert pg.LogicalMessage(None, 1, 0, "p", b"").transactional
    assert not pg.LogicalMessage(None, 0, 0, "p", b"").transactional


def test_values_are_frozen_and_unchanged_toast_is_a_singleton():
    insert = msg("toast/update")
    with pytest.raises(FrozenInstanceError):
        insert.relation_oid = 1
    assert not hasattr(insert, "__dict__")
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(insert)) == insert
    assert pickle.loads(pickle.dumps(insert)).new[2] is UNCHANGED_TOAST
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"


# -- a reference encoder, and round trips through it ------------------------------------------


def enc_time(value: datetime) -> bytes:
    delta = value - EPOCH
    return struct.pack(">q", (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)


def enc_str(text: str) -> bytes:
    return text.encode() + b"\0"


def enc_tuple(values: pg.TupleData) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(value, pg.BinaryValue):
            out.append(b"b" + struct.pack(">i", len(value.data)) + value.data)
        else:
            assert isinstance(value, bytes)
            out.append(b"t" + struct.pack(">i", len(value)) + value)
    return b"".join(out)


def encode(message: pg.Message, in_stream: bool) -> bytes:
    xid = b""
    if in_stream and isinstance(message, XID_CLASSES):
        xid = struct.pack(">I", message.xid)
    match message:
        case pg.Begin(final_lsn, commit_time, txid):
            return b"B" + struct.pack(">Q", final_lsn) + enc_time(commit_time) + txid.to_bytes(4)
        case pg.Commit(flags, commit_lsn, end_lsn, commit_time):
            return b"C" + struct.pack(">BQQ", flags, commit_lsn, end_lsn) + enc_time(commit_time)
        case pg.Relation(_, oid, namespace, name, identity, columns):
            body = struct.pack(">I", oid) + enc_str(namespace) + enc_str(name)
            body += identity.encode() + struct.pack(">H", len(columns))
            for c in columns:
                body += struct.pack(">B", c.flags) + enc_str(c.name)
                body += struct.pack(">Ii", c.type_oid, c.type_modifier)
            return b"R" + xid + body
        case pg.Insert(_, oid, new):
            return b"I" + xid + struct.pack(">Ic", oid, b"N") + enc_tuple(new)
        case pg.Update(_, oid, old, key, new):
            first = b""
            if old is not None:
                first = b"O" + enc_tuple(old)
            elif key is not None:
                first = b"K" + enc_tuple(key)
            return b"U" + xid + struct.pack(">I", oid) + first + b"N" + enc_tuple(new)
        case pg.Delete(_, oid, old, key):
            which = b"O" + enc_tuple(old) if old is not None else b"K" + enc_tuple(key or ())
            return b"D" + xid + struct.pack(">I", oid) + which
        case pg.Truncate(_, options, oids):
            return b"T" + xid + struct.pack(f">IB{len(oids)}I", len(oids), options, *oids)
        case pg.LogicalMessage(_, flags, lsn, prefix, content):
            head = struct.pack(">BQ", flags, lsn) + enc_str(prefix)
            return b"M" + xid + head + struct.pack(">i", len(content)) + content
        case pg.StreamAbort(txid, subxid, abort_lsn, abort_time):
            tail = b""
            if abort_lsn is not None and abort_time is not None:
                tail = struct.pack(">Q", abort_lsn) + enc_time(abort_time)
            return b"A" + struct.pack(">II", txid, subxid) + tail
    raise AssertionError(f"no encoder for {message!r}")


u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
times = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
values = st.one_of(
    st.none(),
    st.just(UNCHANGED_TOAST),
    st.binary(max_size=24),
    st.builds(pg.BinaryValue, st.binary(max_size=8)),
)
tuples = st.lists(values, max_size=12).map(tuple)
columns = st.builds(pg.Column, u8, texts, u32, i32)


old_or_key = st.one_of(
    st.just((None, None)), tuples.map(lambda t: (t, None)), tuples.map(lambda t: (None, t))
)


def messages(in_stream: bool) -> st.SearchStrategy[tuple[pg.Message, bool]]:
    """Every encodable message; the xid-carrying ones get an xid exactly in a stream."""
    xid = u32 if in_stream else st.none()
    kinds = st.one_of(
        st.builds(pg.Begin, u64, times, u32),
        st.builds(pg.Commit, u8, u64, u64, times),
        st.builds(pg.Relation, xid, u32, texts, texts, st.sampled_from("dnfi"),
                  st.lists(columns, max_size=6).map(tuple)),
        st.builds(pg.Insert, xid, u32, tuples),
        st.builds(lambda x, oid, ok, new: pg.Update(x, oid, *ok, new), xid, u32, old_or_key,
                  tuples),
        st.builds(lambda x, oid, ok: pg.Delete(x, oid, *ok), xid, u32,
                  old_or_key.filter(lambda ok: ok != (None, None))),
        st.builds(pg.Truncate, xid, u8, st.lists(u32, max_size=5).map(tuple)),
        st.builds(pg.LogicalMessage, xid, u8, u64, texts, st.binary(max_size=32)),
        st.builds(pg.StreamAbort, u32, u32, st.none(), st.none()),
        st.builds(pg.StreamAbort, u32, u32, u64, times),
    )  # fmt: skip
    return kinds.map(lambda message: (message, in_stream))


@settings(max_examples=300, deadline=None)
@given(st.one_of(messages(False), messages(True)))
def test_decode_inverts_the_reference_encoder(case):
    message, in_stream = case
    data = encode(message, in_stream)
    assert decode(data, in_stream=in_stream) == message
    with pytest.raises(ProtocolError):
        decode(data[: len(data) - 1], in_stream=in_stream)


TAGS = [tag[0] for tag in CLASS_OF_TAG]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*TAGS, 0, ord("z")]), st.binary(max_size=80), st.booleans())
def test_random_bytes_decode_or_raise_protocol_error(tag, rest, in_stream):
    try:
        result = decode(bytes([tag]) + rest, in_stream=in_stream)
    except ProtocolError as exc:
        assert 0 <= exc.offset <= len(rest) + 1
    else:
        assert type(result) is CLASS_OF_TAG[bytes([tag])]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIXTURE_NAMES), st.data())
def test_corrupted_fixtures_decode_or_raise_protocol_error(name, data):
    fixture = fixtures()[name]
    raw = bytearray(fixture.data)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(u8)
    try:
        decode(raw, in_stream=data.draw(st.booleans()))
    except ProtocolError as exc:
        assert 0 <= exc.offset <= len(raw)


def _insert_message(values: list[bytes | None]) -> bytes:
    cols = b""
    for v in values:
        cols += b"n" if v is None else b"t" + struct.pack(">i", len(v)) + v
    return b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">H", len(values)) + cols


def test_a_large_insert_given_as_a_view_is_decoded_in_place():
    """Its large text values are views of the message (no copy), small ones bytes; the
    result equals the copying decoder's."""
    big = b'{"blob": "' + b"x" * pg.LARGE + b'"}'
    raw = _insert_message([b"id-1", b"device.started", big, None])
    view = memoryview(raw)
    msg = decode(view)
    assert isinstance(msg, pg.Insert)
    small_id, key, payload, null = msg.new
    assert type(small_id) is bytes and type(key) is bytes and null is None
    assert type(payload) is memoryview and payload.obj is raw  # a view, not a copy
    assert bytes(payload) == big
    assert decode(raw) == pg.Insert(None, 16384, (b"id-1", b"device.started", big, None))
    with pytest.raises(ProtocolError, match="trailing"):
        decode(memoryview(raw + b"\x00"))


def test_a_small_insert_given_as_a_view_has_bytes_values():
    raw = _insert_message([b"id-1", b"x" * 100])
    msg = decode(memoryview(raw))
    assert isinstance(msg, pg.Insert)
    assert all(type(v) is bytes for v in msg.new)
