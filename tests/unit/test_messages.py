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
    Submit,
    Watch,
    decode,
    encode,
)

SAMPLES = [
    Submit(
        id=1,
        queue="q",
        payloads=[1, "two", {"three": [3]}, None, b"\x00"],
        priority=5,
        keys=["a", None, "c", None, "e"],
    ),
    Complete(id=2, items=[[1, 2, {"x": 1}], [3, 4, None]]),
    Fail(id=3, items=[[1, 2, "ValueError", "bad"]]),
    Watch(id=4, job_ids=[1, 2, 3]),
    Reply(id=5, data={"job_ids": [1]}),
    ErrorReply(id=None, code="malformed", message="m"),
    Deliver(jobs=[[1, 7, "q", [1, 2], 1, 30.0]]),
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
    assert touch.items == [[1, 2, 30.0]] and isinstance(touch.items[0][2], float)  # type: ignore[attr-defined]


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

    items = [[i, "done", "r" * 1000] for i in range(10)]
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
