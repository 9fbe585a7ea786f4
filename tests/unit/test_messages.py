import msgpack
import pytest
from jobbroker.broker.errors import MalformedMessage
from jobbroker.broker.protocol.messages import (
    MESSAGE_TYPES,
    Complete,
    Deliver,
    ErrorReply,
    Fail,
    Heartbeat,
    Reply,
    Results,
    Submit,
    Watch,
    decode,
    encode,
)
from jobbroker.broker.protocol.rows import (
    CompleteRow,
    DeliveryRow,
    FailRow,
    ResultRow,
    TouchRow,
)

SAMPLES = [
    Submit(
        id=1,
        queue="q",
        payloads=[b"\x01", b"two", b"\xc1 not msgpack", b"", b"\x00"],
        priority=5,
        keys=["a", None, "c", None, "e"],
    ),
    Complete(id=2, items=[CompleteRow(1, 2, b"\x81\xa1x\x01"), CompleteRow(3, 4, b"")]),
    Fail(id=3, items=[FailRow(1, 2, "ValueError", "bad")]),
    Watch(id=4, job_ids=[1, 2, 3]),
    Reply(id=5, data={"job_ids": [1]}),
    ErrorReply(id=None, code="malformed", message="m"),
    Deliver(
        jobs=[DeliveryRow(1, 7, "q", b"\x92\x01\x02", 1, 30.0), DeliveryRow(2, 8, "q", b"", 1, 0.0, 5.0, [b"r", None])]
    ),
    Heartbeat(),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.op)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def test_every_op_is_registered_once() -> None:
    assert len(MESSAGE_TYPES) == len(set(MESSAGE_TYPES.values()))


def test_ints_are_accepted_where_floats_are_expected() -> None:
    message = decode(msgpack.packb({"op": "submit", "id": 1, "queue": "q", "payloads": [], "delay": 2}))
    assert isinstance(message, Submit) and message.delay == 2.0 and isinstance(message.delay, float)
    touch = decode(msgpack.packb({"op": "touch", "id": 1, "items": [[1, 2, 30]]}))
    assert touch.items == [TouchRow(1, 2, 30.0)] and isinstance(touch.items[0].seconds, float)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is never used
        (msgpack.packb([1, 2]), "not a msgpack map"),
        (msgpack.packb({"op": "explode", "id": 9}), "unknown op"),
        (msgpack.packb({"id": 9}), "unknown op"),
        (msgpack.packb({"op": "watch", "id": 9}), "lacks field 'job_ids'"),
        (msgpack.packb({"op": "watch", "id": 9, "job_ids": "1,2"}), "watch.job_ids must be an array"),
        (msgpack.packb({"op": "watch", "id": 9, "job_ids": [True]}), "watch.job_ids must be an array of int"),
        (msgpack.packb({"op": "complete", "id": 9, "items": [[1, 2]]}), "an array of arrays of at least 3"),
        (msgpack.packb({"op": "complete", "id": 9, "items": [[1, 2, 3]]}), "with bytes at position 2"),
        (msgpack.packb({"op": "submit", "id": 9, "queue": "q", "payloads": [{"n": 1}]}), "an array of bytes"),
        (msgpack.packb({"op": "results", "items": [[1, "done", b"r", "no map"]]}), "with a map at position 3"),
        (msgpack.packb({"op": "fail", "id": 9, "items": [[1, 2, "E", 5]]}), "with str at position 3"),
        (msgpack.packb({"op": "stats", "id": "9"}), "stats.id must be an integer"),
        (msgpack.packb({"op": "stats", "id": 1, "x": msgpack.ExtType(5, b"zz")}), "extension type 5"),
        (msgpack.packb({"op": "stats", "id": 1}) + b"\x00", "not valid msgpack"),
    ],
)
def test_malformed_bodies_raise_one_typed_error(body: bytes, fragment: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert fragment in str(info.value)


def test_malformed_request_keeps_its_id_for_the_error_reply() -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(msgpack.packb({"op": "watch", "id": 42, "job_ids": "x"}))
    assert info.value.request_id == 42


def test_deeply_nested_garbage_is_a_protocol_error_not_a_crash() -> None:
    body = b"\x91" * 100_000 + b"\x00"  # arrays nested far past the stack
    with pytest.raises(MalformedMessage):
        decode(body)


def test_encode_items_cuts_a_push_to_size_and_matches_encode() -> None:
    from jobbroker.broker.protocol.messages import Results, encode_items

    items = [ResultRow(i, "done", b"r" * 1000) for i in range(10)]
    body, count = encode_items(Results, items, 1_000_000)
    assert count == 10 and body == encode(Results(items))
    body, count = encode_items(Results, items, 3500)
    assert count == 3 and body == encode(Results(items[:3])) and len(body) <= 3500
    assert decode(body) == Results(items[:3])
    assert encode_items(Results, items, 500) == (b"", 0)  # not even one fits


def test_bounded_text_says_how_much_it_cut_and_stays_within_its_limit() -> None:
    from jobbroker.broker.protocol.messages import bounded

    text = "x" * 100_000 + "END"
    kept = bounded(text, 8192, keep_end=True)
    assert len(kept) <= 8192 and kept.endswith("END")
    cut = int(kept.split()[1])
    assert cut + len(kept.split("\n", 1)[1]) == len(text)  # the count is what was taken
    assert bounded("short", 10) == "short"
    assert bounded("a\udcffb", 10) == "a\\udcffb"  # valid UTF-8, for msgpack
    head = bounded("y" * 3000, 2000)
    assert len(head) <= 2000 and head.startswith("yyy") and "characters cut" in head


def test_rows_decode_as_their_named_types_with_defaults_filled_and_extra_columns_dropped() -> None:
    # A row may stop before its optional columns and carry columns of a later version.
    body = msgpack.packb({"op": "fail", "id": 1, "items": [[1, 2, "E", "m"], [3, 4, "E", "m", "tb", True, 2, "later"]]})
    message = decode(body)
    assert isinstance(message, Fail)
    assert message.items == [FailRow(1, 2, "E", "m"), FailRow(3, 4, "E", "m", "tb", True, 2.0)]
    assert message.items[1].retry_delay == 2.0 and isinstance(message.items[1].retry_delay, float)
    deliver = decode(msgpack.packb({"op": "deliver", "jobs": [[1, 2, "q", b"p", 1, 30]]}))
    assert isinstance(deliver, Deliver)
    (row,) = deliver.jobs
    assert type(row) is DeliveryRow and row.payload == b"p" and row.timeout is None and row.parents is None


def test_a_row_encodes_as_the_array_it_decodes_from() -> None:
    row = ResultRow(5, "dead", None, {"type": "E", "message": "m"})
    assert msgpack.unpackb(msgpack.packb(row)) == [5, "dead", None, {"type": "E", "message": "m"}]
    wire = {"op": "results", "items": [[5, "dead", None, {"type": "E", "message": "m"}]]}
    assert decode(msgpack.packb(wire)) == Results(items=[row])


def test_payloads_pass_through_as_bytes_whatever_they_hold() -> None:
    # Not msgpack, a msgpack value nested past the depth limit, an extension type: all opaque.
    payloads = [b"\xc1\xc1", b"\x91" * 5000 + b"\xc0", msgpack.packb(msgpack.ExtType(5, b"zz"))]
    message = decode(encode(Submit(id=1, queue="q", payloads=payloads)))
    assert isinstance(message, Submit) and message.payloads == payloads


def test_refused_rows_are_read_by_name_and_checked() -> None:
    from jobbroker.broker.protocol.rows import RefusedRow, refused_rows

    assert refused_rows({"refused": [[0, "lease_lost"]]}) == [RefusedRow(0, "lease_lost")]
    assert refused_rows({"refused": []}) == []
    for bad in ({}, {"refused": [[0]]}, {"refused": [["0", "x"]]}):
        with pytest.raises(MalformedMessage):
            refused_rows(bad)
